-- Puts ids back at the head of a device's offline queue, keeping their
-- order (ARGV[2..] oldest first), and extends the queue's expiry to
-- ARGV[1] ms if that is longer than what it has (it never shrinks).
-- KEYS[1] downlink:queue:{phyID}
for i = #ARGV, 2, -1 do
  redis.call('LPUSH', KEYS[1], ARGV[i])
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return #ARGV - 1
