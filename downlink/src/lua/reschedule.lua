-- Moves a sweeper deadline to ARGV[3] only while it still has the score of
-- the sweeper's lease ARGV[2]: if anyone set a deadline since the lease (a
-- drain taking the command, a forward, a requeue) or removed it (a
-- terminal state), theirs stands.
-- KEYS[1] commands:deadline   ARGV[1] id   ARGV[2] lease score   ARGV[3] new score
-- Returns 1 if moved, else 0.
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
