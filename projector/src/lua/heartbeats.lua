-- FN..'seen': heartbeats of devices of one shard; keys = the shard's seen
-- set and online index (both tagged {shard}, one hash slot).
--
-- Arguments: force (1: return every device, for redelivered entries), then
-- phy, ts pairs.
--
-- One `ZADD GT` puts every heartbeat into the seen set (max-merge, so order
-- and duplicates do not matter). A device in the online index needs nothing
-- else: a heartbeat cannot change an online device's state, and the due
-- evaluation folds the seen score into its view (and refreshes the view's
-- TTL) before it could expire. The others (offline, or without a view) may
-- come online: returns phy, seen score pairs for those, which the caller
-- merges into their views with the device function.
redis.register_function(FN .. 'seen', function(keys, args)
  local force = args[1] == '1'
  local zargs = {}
  local phys = {}
  for i = 2, #args - 1, 2 do
    zargs[#zargs + 1] = args[i + 1]
    zargs[#zargs + 1] = args[i]
    phys[#phys + 1] = args[i]
  end
  if #phys == 0 then return {} end
  redis.call('ZADD', keys[1], 'GT', unpack(zargs))
  local want = phys
  if not force then
    local on = redis.call('ZMSCORE', keys[2], unpack(phys))
    want = {}
    for j, p in ipairs(phys) do
      if not on[j] then want[#want + 1] = p end
    end
    if #want == 0 then return {} end
  end
  local scores = redis.call('ZMSCORE', keys[1], unpack(want))
  local out = {}
  for j, p in ipairs(want) do
    out[#out + 1] = p
    out[#out + 1] = scores[j]
  end
  return out
end)
