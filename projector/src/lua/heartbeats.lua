-- FN..'heartbeats': a batch of heartbeats of one instance; keys[i] = the
-- view of the i-th device (several hash slots: on Redis Cluster it must be
-- called with one device per call).
--
-- Arguments after the common ones: server, force (1: return every device's
-- record, for redelivered entries), then per heartbeat: phy, conn, epoch, ts.
-- Returns the records (flattened) of the devices that need work outside
-- their slot; see `beat`.
redis.register_function(FN .. 'heartbeats', function(keys, args)
  setup(args)
  local server = args[COMMON + 1]
  local force = args[COMMON + 2] == '1'
  local out = {}
  local n = 0
  local i = COMMON + 3
  while i + 3 <= #args do
    n = n + 1
    local rec = beat(keys[n], args[i], {
      kind = 'h', epoch = args[i + 2], conn = args[i + 1], server = server, ts = args[i + 3],
    }, force)
    i = i + 4
    if rec then
      for _, v in ipairs(rec) do out[#out + 1] = v end
    end
  end
  return out
end)
