-- Session view merge and weighted online policy: the shared part of the
-- projector's Redis function library (script.rs builds the library from the
-- files of this folder, with the `#!lua name=...` line and `FN`, the prefix
-- of the function names, in front).
--
-- The merge is SessionView::apply of iot_core::view, field for field; the
-- policy is Policy::evaluate of iot_core::policy with the same sequence of
-- floating-point operations. Every timestamp and epoch is below 2^52, so Lua's
-- doubles hold them exactly; values are stored as the strings the caller sent.
--
-- Common arguments (1..10) of the device and heartbeat functions:
--   now_ms, policy enabled (1/0), heartbeat_timeout_ms, tcp_down_window_ms,
--   ack_window_ms, tcp_down_penalty, ack_timeout_penalty, threshold,
--   view ttl_ms, TTL refresh threshold ms (the view's TTL, and the
--   connection key's by the caller, are refreshed by uplinks and ACKs once
--   the remaining TTL is below it).
--
-- The view's expiry only follows signs of life: an event merged through
-- the full path sets it to now + ttl, a folded seen score (the due
-- evaluation) to last_seen + ttl unless it is already later. Whenever it
-- moves, the record carries it, and the caller gives the connection key the
-- same expiry.

local NOW = 0
local P = {}
local TTL = 0
local CONN_REFRESH = 0
local COMMON = 10
-- The device's score in its shard's seen set, passed by the caller (the
-- set is in another hash slot), or nil; reset by setup.
local SEEN = nil

-- Reads the common arguments of one call.
local function setup(args)
  NOW = tonumber(args[1])
  P = {
    enabled = args[2] == '1',
    hb = tonumber(args[3]),
    tw = tonumber(args[4]),
    aw = tonumber(args[5]),
    p1 = tonumber(args[6]),
    p2 = tonumber(args[7]),
    th = tonumber(args[8]),
  }
  TTL = tonumber(args[9])
  CONN_REFRESH = tonumber(args[10])
  SEEN = nil
end

-- Sets SEEN from an argument ('' for none).
local function set_seen(v)
  if v ~= nil and v ~= '' then SEEN = tonumber(v) else SEEN = nil end
end

-- Tie-break rank of how a connection ended (view::Ended::rank) and, for the
-- tcp_down reasons, their order (TcpDownReason's Ord).
local RANK = {
  closed = 1, reset = 2, keepalive = 3, takeover = 4, server_shutdown = 5,
  server_lost = 6, protocol_error = 7, revoked = 8, disconnected = 9,
}

local FIELDS = {
  'phy_id', 'epoch', 'conn_id', 'server_id', 'connected_at', 'ended',
  'ended_at', 'last_seen', 'last_tcp_down', 'last_tcp_down_reason',
  'last_ack_timeout', 'online', 'reason', 'since', 'rev',
}

local function istr(n)
  return string.format('%d', n)
end

local function num(v)
  if v == nil then return nil end
  return tonumber(v)
end

-- The stored state (absent or empty fields are nil).
local function load(key)
  local v = redis.call('HMGET', key, unpack(FIELDS))
  local s = {}
  for i, f in ipairs(FIELDS) do
    if v[i] and v[i] ~= '' then s[f] = v[i] end
  end
  return s
end

-- Pending writes: fields to set and fields to delete.
local function writes()
  return { set = {}, del = {} }
end

local function put(s, w, f, v)
  s[f] = v
  w.set[f] = v
  w.del[f] = nil
end

-- Raises last_seen to SEEN (SessionView::fold_seen); true when it moved.
local function fold_seen(s, w)
  if SEEN ~= nil and (s.last_seen == nil or SEEN > tonumber(s.last_seen)) then
    put(s, w, 'last_seen', istr(SEEN))
    return true
  end
  return false
end

local function drop(s, w, f)
  s[f] = nil
  w.set[f] = nil
  w.del[f] = true
end

-- (t, r) > (ct, cr), lexicographically.
local function later(t, r, ct, cr)
  if t ~= ct then return t > ct end
  return r > cr
end

-- Merges one event into the state s (SessionView::apply_parts). ev: kind
-- (c connected, h heartbeat, u uplink, t tcp_down, d disconnected, a ack,
-- x ack_timeout), epoch, conn, server, ts (strings), reason (tcp_down).
-- Returns the superseded binding {conn, server, epoch} if a higher epoch
-- took over.
local function merge(s, w, ev)
  local ts = tonumber(ev.ts)
  local k = ev.kind
  if k == 'c' or k == 'h' or k == 'u' or k == 'a' or k == 'd' then
    if s.last_seen == nil or ts > tonumber(s.last_seen) then
      put(s, w, 'last_seen', ev.ts)
    end
  elseif k == 't' then
    if ev.reason ~= 'takeover' then
      local cur = num(s.last_tcp_down)
      if cur == nil or later(ts, RANK[ev.reason] or 0, cur, RANK[s.last_tcp_down_reason or 'closed'] or 0) then
        put(s, w, 'last_tcp_down', ev.ts)
        put(s, w, 'last_tcp_down_reason', ev.reason)
      end
    end
  elseif k == 'x' then
    if s.last_ack_timeout == nil or ts > tonumber(s.last_ack_timeout) then
      put(s, w, 'last_ack_timeout', ev.ts)
    end
  end

  -- Binding: highest epoch, every kind (a heartbeat too, without
  -- connected_at).
  local superseded = nil
  local ep = tonumber(ev.epoch)
  local cur = tonumber(s.epoch or '0')
  if ep > cur then
    if s.conn_id ~= nil then
      superseded = { s.conn_id, s.server_id or '', s.epoch or '0' }
    end
    put(s, w, 'epoch', ev.epoch)
    put(s, w, 'conn_id', ev.conn)
    put(s, w, 'server_id', ev.server)
    if s.connected_at ~= nil then drop(s, w, 'connected_at') end
    if s.ended ~= nil then drop(s, w, 'ended') end
    if s.ended_at ~= nil then drop(s, w, 'ended_at') end
    cur = ep
  end
  if ep == cur and ep > 0 then
    if k == 'c' then
      if s.connected_at == nil or ts > tonumber(s.connected_at) then
        put(s, w, 'connected_at', ev.ts)
      end
    elseif k == 't' or k == 'd' then
      local how = ev.reason
      if k == 'd' then how = 'disconnected' end
      local et = num(s.ended_at)
      if s.ended == nil or et == nil or later(ts, RANK[how] or 0, et, RANK[s.ended] or 0) then
        put(s, w, 'ended', how)
        put(s, w, 'ended_at', ev.ts)
      end
    end
  end
  return superseded
end

local function within(now, t, window)
  return (now - t) <= window
end

local function window_end(now, t, window)
  local e = t + window + 1
  if e > now then return e end
  return nil
end

-- Policy::evaluate: online (boolean), reason name, score, next change (or nil).
local function evaluate(ls, ltd, ltdr, lat, disconnected, now)
  local fresh = ls ~= nil and within(now, ls, P.hb)
  local tcp = P.enabled and ltd ~= nil and within(now, ltd, P.tw)
  local ack = P.enabled and lat ~= nil and within(now, lat, P.aw)

  local score = 0.0
  if fresh then score = score + 1.0 end
  if tcp then score = score - P.p1 end
  if ack then score = score - P.p2 end
  local passes
  if P.enabled then passes = score >= P.th else passes = fresh end
  local online = passes and not disconnected

  local reason
  if online then
    reason = 'heartbeat_fresh'
  elseif disconnected then
    reason = 'disconnected'
  elseif ls == nil then
    reason = 'never_seen'
  elseif not fresh then
    reason = 'heartbeat_expired'
  else
    local t = nil
    local a = nil
    if tcp then t = ltd end
    if ack then a = lat end
    if t ~= nil and a ~= nil and a > t then
      reason = 'ack_timeout'
    elseif t ~= nil then
      reason = 'tcp_down:' .. (ltdr or 'closed')
    elseif a ~= nil then
      reason = 'ack_timeout'
    else
      reason = 'heartbeat_expired'
    end
  end

  local nxt = nil
  local function consider(e)
    if e ~= nil and (nxt == nil or e < nxt) then nxt = e end
  end
  if fresh then consider(window_end(now, ls, P.hb)) end
  if tcp then consider(window_end(now, ltd, P.tw)) end
  if ack then consider(window_end(now, lat, P.aw)) end
  return online, reason, score, nxt
end

local function evaluate_state(s)
  return evaluate(num(s.last_seen), num(s.last_tcp_down), s.last_tcp_down_reason,
    num(s.last_ack_timeout), s.ended == 'disconnected', NOW)
end

-- Newest timestamp of the view (for the known index).
local function newest(s)
  local m = num(s.last_seen)
  local v = num(s.connected_at)
  if v ~= nil and (m == nil or v > m) then m = v end
  v = num(s.ended_at)
  if v ~= nil and (m == nil or v > m) then m = v end
  v = num(s.last_tcp_down)
  if v ~= nil and (m == nil or v > m) then m = v end
  v = num(s.last_ack_timeout)
  if v ~= nil and (m == nil or v > m) then m = v end
  return m or NOW
end

-- Result record, the same for every script (see script.rs, Record):
--  1 phy, 2 status (i: index update needed, n: conn key touch only),
--  3 online 1/0, 4 rev, 5 lifecycle reason, 6 changed 1/0, 7 policy reason,
--  8 due ms, 9 known ms, 10 epoch, 11 bound conn, 12 bound server,
--  13 bound conn live 1/0, 14 superseded conn, 15 superseded server,
--  16 the connection key's new expiry ms ('': leave it), 17 since,
--  18 binding maintenance 1/0, 19 superseded epoch.
local RECORD_LEN = 19

-- Evaluates the policy on the merged state, records the projected fields,
-- writes the view and returns its record. kind: the event kind ('' for a
-- time-based evaluation); ttl: how the view's expiry moves ('event': to
-- now + TTL; 'seen': to last_seen + TTL if that is later; nil: it stays,
-- unless the view has none); full: binding maintenance (server set) wanted
-- (the connection key then gets the view's expiry even if it did not move,
-- so that a replay repairs a key whose write was lost).
local function settle(key, phy, s, w, kind, ttl, full, superseded)
  local online, reason, _, nxt = evaluate_state(s)
  local changed = false
  local rev
  if s.phy_id == nil then
    -- A new view starts offline at rev = now (ms): revisions stay above those
    -- of an earlier, expired view of the same device.
    put(s, w, 'phy_id', phy)
    rev = NOW
    if online then
      rev = rev + 1
      changed = true
    end
    put(s, w, 'rev', istr(rev))
    put(s, w, 'since', istr(NOW))
    put(s, w, 'online', online and '1' or '0')
  else
    rev = tonumber(s.rev or '') or NOW
    if (s.online == '1') ~= online or s.rev == nil then
      if (s.online == '1') ~= online then
        changed = true
        rev = rev + 1
        put(s, w, 'since', istr(NOW))
      end
      put(s, w, 'rev', istr(rev))
      put(s, w, 'online', online and '1' or '0')
    end
  end
  if s.reason ~= reason then put(s, w, 'reason', reason) end

  local dels = {}
  for f, _ in pairs(w.del) do dels[#dels + 1] = f end
  if #dels > 0 then redis.call('HDEL', key, unpack(dels)) end
  local sets = {}
  for f, v in pairs(w.set) do
    sets[#sets + 1] = f
    sets[#sets + 1] = v
  end
  if #sets > 0 then redis.call('HSET', key, unpack(sets)) end

  -- Relative times (PEXPIRE, not PEXPIREAT): NOW is the caller's clock.
  local expiry
  local moved = false
  if ttl == 'event' then
    redis.call('PEXPIRE', key, TTL)
    expiry = NOW + TTL
    moved = true
  else
    local pttl = redis.call('PTTL', key)
    if pttl < 0 then
      redis.call('PEXPIRE', key, TTL)
      pttl = TTL
      moved = true
    elseif ttl == 'seen' and s.last_seen ~= nil then
      local left = tonumber(s.last_seen) + TTL - NOW
      if left > pttl then
        redis.call('PEXPIRE', key, left)
        pttl = left
        moved = true
      end
    end
    expiry = NOW + pttl
  end
  local due = expiry
  if nxt ~= nil and nxt < due then due = nxt end

  local lc = reason
  if online then
    if kind == 'c' then lc = 'connected' else lc = 'recovered' end
  end
  local live = s.epoch ~= nil and s.conn_id ~= nil and s.ended == nil
  local conn_expiry = ''
  if s.conn_id ~= nil and (moved or full) then conn_expiry = expiry end
  local sup = superseded or { '', '', '' }
  -- Numbers go back as integer replies (cheaper than formatting them).
  return {
    phy, 'i', online and '1' or '0', rev, lc, changed and '1' or '0', reason,
    due, newest(s), s.epoch or '0', s.conn_id or '', s.server_id or '',
    live and '1' or '0', sup[1], sup[2], conn_expiry, num(s.since) or NOW,
    full and '1' or '0', sup[3],
  }
end

-- Applies one event to the view at key and returns its record.
local function apply_event(key, phy, ev)
  local s = load(key)
  local w = writes()
  fold_seen(s, w)
  local superseded = merge(s, w, ev)
  return settle(key, phy, s, w, ev.kind, 'event', true, superseded)
end

-- An uplink or an ACK (u, a): only last_seen changes, unless the view is
-- new or the event's epoch is higher than the bound one (then it binds: the
-- full merge). The common case costs an HMGET, a PTTL and at most one HSET;
-- the policy runs only when the event made a stale view fresh, because with
-- the same `now` nothing else such an event does can change the state or
-- its reason (a view without any sign of life yet, whose reason is
-- never_seen, takes the full path). last_seen also takes SEEN. Returns the
-- record, a connection-key touch record, or nil when nothing outside the
-- slot needs doing. force: always return the full record, with binding
-- maintenance (redelivered entries: the first delivery may have bound the
-- view and lost its writes outside the slot). Heartbeats do not come here: the seen set takes those of
-- devices online at an epoch at least theirs, the full merge the others.
local function beat(key, phy, ev, force)
  local cur = redis.call('HMGET', key, 'epoch', 'last_seen', 'conn_id')
  -- No last_seen: a new view, or one without a sign of life yet (whose
  -- reason changes now): the full path.
  if not cur[2] or tonumber(ev.epoch) > tonumber(cur[1] or '0') then
    return apply_event(key, phy, ev)
  end
  local t = tonumber(ev.ts)
  if SEEN ~= nil and SEEN > t then t = SEEN end
  local ls = tonumber(cur[2])
  local stale = not within(NOW, ls, P.hb)
  if t > ls then
    redis.call('HSET', key, 'last_seen', istr(t))
  end
  local refresh = redis.call('PTTL', key) < CONN_REFRESH
  if force or (stale and within(NOW, t, P.hb)) then
    local ttl = nil
    if refresh then ttl = 'event' end
    return settle(key, phy, load(key), writes(), ev.kind, ttl, force, nil)
  end
  if refresh then
    redis.call('PEXPIRE', key, TTL)
    if cur[3] then
      return { phy, 'n', '', '', '', '', '', '', '', '', cur[3], '', '', '', '', NOW + TTL, '', '0', '' }
    end
  end
  return nil
end
