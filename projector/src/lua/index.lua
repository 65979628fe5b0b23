-- FN..'index': the shard-level projection of one event shard; every key is
-- tagged {shard}: keys = online, presence_rev, lifecycle, due, known, seen,
-- bound.
--
-- Arguments: lifecycle maxlen ('' for no cap: the archiver trims), quiet (1:
-- no lifecycle entries), now ms (when the records were evaluated),
-- heartbeat timeout ms, then records of 10:
--   op ('u' update, 'g' gone), phy, online (1/0), rev, lifecycle reason,
--   at ms, epoch, due ms ('' none), known ms ('' none), lease (1: remove the
--   due lease 'L:phy').
--
-- 'u' applies "phy is online=X at rev R" only if R is above the stored
-- revision, so late, duplicate or reordered updates from several projectors
-- never overwrite a newer state, and appends a lifecycle entry only when
-- the online membership flips: exactly once in effect under redelivery.
-- The bound hash follows the online index: while a device is online it holds
-- the bound epoch of its newest state (raised by a state of the same
-- revision too: a takeover while online does not flip); the view's epoch
-- never goes back, so the stored one is never above the view's. A hash, not
-- a sorted set: the projector reads it for every heartbeat (HMGET hands
-- back the stored digits; ZMSCORE would format a double for each).
-- A flip to offline for heartbeat_expired is refused while the seen set
-- holds a heartbeat within the timeout of `now`: that heartbeat reached the
-- seen set after the evaluation read it (the evaluation would have found it
-- fresh), so the device is evaluated again at once instead (the due round
-- folds the newest score in), and no false offline/online pair is written.
-- The due time only ever moves earlier here (ZADD LT): an early evaluation is
-- harmless, a late one is not. 'g' (the view expired; rev = the evaluation's
-- now) removes the device from every index and the seen set unless a newer
-- view was indexed.
-- Returns the flips: phy, online, reason, ...
redis.register_function(FN .. 'index', function(keys, args)
  local maxlen = args[1]
  local function lifecycle(...)
    if maxlen == '' then
      redis.call('XADD', keys[3], '*', ...)
    else
      redis.call('XADD', keys[3], 'MAXLEN', '~', maxlen, '*', ...)
    end
  end
  local quiet = args[2] == '1'
  local now = tonumber(args[3])
  local hb = tonumber(args[4])
  local out = {}
  local i = 5
  while i + 9 <= #args do
    local op, phy, on, rev, lc, at, epoch, due, known, lease =
      args[i], args[i + 1], args[i + 2], args[i + 3], args[i + 4],
      args[i + 5], args[i + 6], args[i + 7], args[i + 8], args[i + 9]
    i = i + 10
    local cur = redis.call('HGET', keys[2], phy)
    if op == 'u' then
      if not cur or tonumber(rev) > tonumber(cur) then
        local member = redis.call('ZSCORE', keys[1], phy)
        local flip = (on == '1') ~= (member ~= false)
        local refuse = false
        if flip and on == '0' and lc == 'heartbeat_expired' then
          local seen = redis.call('ZSCORE', keys[6], phy)
          refuse = seen ~= false and tonumber(seen) >= now - hb
        end
        if refuse then
          redis.call('ZADD', keys[4], 'LT', now, phy)
        else
          redis.call('HSET', keys[2], phy, rev)
          if on == '1' then
            if not member then redis.call('ZADD', keys[1], 0, phy) end
            redis.call('HSET', keys[7], phy, epoch)
          else
            if member then redis.call('ZREM', keys[1], phy) end
            redis.call('HDEL', keys[7], phy)
          end
          if flip then
            if not quiet then
              lifecycle('phy_id', phy, 'online', on, 'reason', lc, 'at_ms', at, 'epoch', epoch, 'rev', rev)
            end
            out[#out + 1] = phy
            out[#out + 1] = on
            out[#out + 1] = lc
          end
        end
      elseif on == '1' and tonumber(rev) == tonumber(cur) and redis.call('ZSCORE', keys[1], phy) then
        local held = redis.call('HGET', keys[7], phy)
        if not held or tonumber(epoch) > tonumber(held) then
          redis.call('HSET', keys[7], phy, epoch)
        end
      end
      if due ~= '' then redis.call('ZADD', keys[4], 'LT', due, phy) end
      if known ~= '' then redis.call('ZADD', keys[5], 'GT', known, phy) end
    elseif op == 'g' then
      if not cur or tonumber(cur) < tonumber(rev) then
        if redis.call('ZREM', keys[1], phy) == 1 then
          local r = string.format('%d', tonumber(cur or '0') + 1)
          if not quiet then
            lifecycle('phy_id', phy, 'online', '0', 'reason', 'heartbeat_expired', 'at_ms', at, 'epoch', epoch, 'rev', r)
          end
          out[#out + 1] = phy
          out[#out + 1] = '0'
          out[#out + 1] = 'heartbeat_expired'
        end
        redis.call('HDEL', keys[2], phy)
        redis.call('ZREM', keys[4], phy)
        redis.call('ZREM', keys[5], phy)
        redis.call('ZREM', keys[6], phy)
        redis.call('HDEL', keys[7], phy)
      end
    end
    if lease == '1' then redis.call('ZREM', keys[4], 'L:' .. phy) end
  end
  return out
end)
