-- Appends a command id to a device's offline queue unless it is full.
-- KEYS[1] downlink:queue:{phyID}   ARGV[1] id   ARGV[2] cap   ARGV[3] ttl ms
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
