-- Appends a command id to a device's offline queue unless it is full.
-- KEYS[1] downlink:queue:{phyID}   ARGV[1] id   ARGV[2] cap   ARGV[3] ttl ms
-- The queue's expiry only ever grows: it must outlive its longest-lived
-- command, not follow the newest one (PTTL is -1 for the fresh list).
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
