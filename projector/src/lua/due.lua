-- FN..'due': takes the devices of one shard whose evaluation is due:
-- keys[1] = the due zset, keys[2] = the seen set (same slot). Arguments:
-- now ms, lease-until ms, limit.
--
-- Each taken device is leased: its entry is replaced by 'L:phy' at
-- lease-until (phyIDs never hold ':'), so several projectors do not evaluate
-- the same device, and the device comes due again if its evaluator dies. The
-- evaluator's index update removes the lease. A due lease is taken like any
-- entry. Returns phy, seen score ('' for none) pairs: the evaluation folds
-- the score into the view.
redis.register_function(FN .. 'due', function(keys, args)
  local items = redis.call('ZRANGEBYSCORE', keys[1], '-inf', args[1], 'LIMIT', 0, tonumber(args[3]))
  local out = {}
  for _, m in ipairs(items) do
    local phy = m
    if string.sub(m, 1, 2) == 'L:' then phy = string.sub(m, 3) end
    redis.call('ZREM', keys[1], m)
    redis.call('ZADD', keys[1], args[2], 'L:' .. phy)
    out[#out + 1] = phy
    out[#out + 1] = redis.call('ZSCORE', keys[2], phy) or ''
  end
  return out
end)
