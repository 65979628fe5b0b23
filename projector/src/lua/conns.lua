-- FN..'conns': an instance's connection set under the epoch rule.
-- keys[1] = the set (session:server:{S}:conns); keys[2..4] = its marks of
-- the previous, current and next generation of the caller's clock
-- (session:server:{S}:marks:{g}, hashes conn -> epoch, same hash tag).
-- Arguments: the marks' TTL (ms), then triples (op, conn, epoch), op 'l'
-- (the view binds the connection and it has not ended) or 'd' (it ended,
-- or a newer connection took the device over).
--
-- A connection's membership follows its newest statement: 'l' at epoch e
-- adds it unless a statement at e or later was applied, 'd' at e removes
-- it unless one later than e was (at the same epoch 'd' wins: an ended
-- connection never comes back at that epoch). The mark (the newest epoch
-- applied) goes to the current generation, so the result does not depend
-- on the order in which projectors' writes arrive, nor on how often they
-- are repeated. Marks are only needed while a late write may still be on
-- its way; each generation's hash expires with its marks (TTL set when it
-- is created), which bounds them by the binding churn of a few generations.
-- Reads look at three generations, so callers' clocks may disagree by up
-- to a generation. A statement already applied writes nothing.
redis.register_function(FN .. 'conns', function(keys, args)
  local ttl = args[1]
  local wrote = false
  for i = 2, #args, 3 do
    local op, c, es = args[i], args[i + 1], args[i + 2]
    local e = tonumber(es)
    local m = nil
    for k = 2, 4 do
      local v = redis.call('HGET', keys[k], c)
      if v then
        local n = tonumber(v)
        if m == nil or n > m then m = n end
      end
    end
    if op == 'l' then
      if m == nil or e > m then
        redis.call('SADD', keys[1], c)
        redis.call('HSET', keys[3], c, es)
        wrote = true
      end
    elseif m == nil or e >= m then
      redis.call('SREM', keys[1], c)
      -- Written again at the same epoch too: the mark of an ended
      -- connection lives from its end, not from its start.
      redis.call('HSET', keys[3], c, es)
      wrote = true
    end
  end
  if wrote then redis.call('PEXPIRE', keys[3], ttl, 'NX') end
  return 0
end)
