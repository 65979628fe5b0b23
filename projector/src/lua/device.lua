-- FN..'device': one device; keys[1] = its view (session:device:{phy}).
--
-- Arguments after the common ones:
--   'ev', phy, kind, epoch, conn, server, ts, tcp_down reason, force (1/0),
--        seen: merge one event; returns its record (or nothing)
--   'eval', phy, seen: evaluate the view at now (no event); returns
--        {phy, 'g'} when the view no longer exists
--   'policy', last_seen, last_tcp_down, last_tcp_down_reason, last_ack_timeout,
--        disconnected (1/0): the policy alone (no key is touched), as
--        {online, reason, score (%.17g), next change or ''}; for tests.
-- seen: the device's score in its shard's seen set ('' for none), folded
-- into last_seen first. An evaluation whose seen score moved last_seen
-- moves the view's expiry to last_seen + TTL (never earlier than it was;
-- the record tells the caller to move the connection key's with it).
redis.register_function(FN .. 'device', function(keys, args)
  setup(args)
  local op = args[COMMON + 1]
  if op == 'ev' then
    set_seen(args[COMMON + 10])
    local ev = {
      kind = args[COMMON + 3],
      epoch = args[COMMON + 4],
      conn = args[COMMON + 5],
      server = args[COMMON + 6],
      ts = args[COMMON + 7],
      reason = args[COMMON + 8],
    }
    local k = ev.kind
    if k == 'u' or k == 'a' then
      return beat(keys[1], args[COMMON + 2], ev, args[COMMON + 9] == '1') or {}
    end
    return apply_event(keys[1], args[COMMON + 2], ev)
  elseif op == 'eval' then
    local phy = args[COMMON + 2]
    set_seen(args[COMMON + 3])
    if redis.call('EXISTS', keys[1]) == 0 then
      return { phy, 'g' }
    end
    local s = load(keys[1])
    local w = writes()
    local ttl = nil
    if fold_seen(s, w) then ttl = 'seen' end
    return settle(keys[1], phy, s, w, '', ttl, false, nil)
  elseif op == 'policy' then
    local function opt(v)
      if v == nil or v == '' then return nil end
      return tonumber(v)
    end
    local reason_arg = args[COMMON + 4]
    if reason_arg == '' then reason_arg = nil end
    local online, reason, score, nxt = evaluate(opt(args[COMMON + 2]), opt(args[COMMON + 3]),
      reason_arg, opt(args[COMMON + 5]), args[COMMON + 6] == '1', NOW)
    local n = ''
    if nxt ~= nil then n = istr(nxt) end
    return { online and '1' or '0', reason, string.format('%.17g', score), n }
  end
  return redis.error_reply('device function: unknown op ' .. tostring(op))
end)
