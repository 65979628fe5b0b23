-- Takes the given ids (peeked from the head of a device's offline queue,
-- oldest first) out of the queue, every copy of each, and returns those
-- that were there, in the given order. The caller has pushed their sweeper
-- deadlines before (see CommandStore::take_queued): an id that leaves the
-- queue here always has one.
-- KEYS[1] downlink:queue:{phyID}   ARGV ids
local taken = {}
for i = 1, #ARGV do
  if redis.call('LREM', KEYS[1], 0, ARGV[i]) > 0 then
    taken[#taken + 1] = ARGV[i]
  end
end
return taken
