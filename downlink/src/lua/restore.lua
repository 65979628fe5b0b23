-- Puts a command id back into a device's offline queue unless it is there
-- already: before the first id that sorts after it (ids are UUID v7, so
-- this is creation order), else at the tail. The queue cap is not applied
-- (the command was accepted before). The queue's expiry grows to ARGV[2]
-- ms if that is longer than what it has.
-- KEYS[1] downlink:queue:{phyID}   ARGV[1] id   ARGV[2] ttl ms
-- Returns 1 if it was put back, 0 if it was in the queue already.
if redis.call('LPOS', KEYS[1], ARGV[1]) then return 0 end
local before = nil
for _, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if v > ARGV[1] then
    before = v
    break
  end
end
if before then
  redis.call('LINSERT', KEYS[1], 'BEFORE', before, ARGV[1])
else
  redis.call('RPUSH', KEYS[1], ARGV[1])
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
