-- Moves a command to a new status, atomically, if it is allowed.
-- KEYS[1] command:{id}   KEYS[2] command:{id}:log
-- ARGV[1] new status
-- ARGV[2] allowed current statuses, space-separated ("*": any non-terminal)
-- ARGV[3] now (ms)   ARGV[4] reason ("" for none)   ARGV[5] detail ("" for none)
-- ARGV[6..] field, value pairs to set as well
-- Returns the previous status, or false when nothing changed (unknown
-- command, terminal already, or not in an allowed status).
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return false end
if cur == 'acked' or cur == 'timed_out' or cur == 'expired' or cur == 'failed' then
  return false
end
if ARGV[2] ~= '*' then
  local ok = false
  for s in string.gmatch(ARGV[2], '%S+') do
    if s == cur then ok = true end
  end
  if not ok then return false end
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[3], 'reason', ARGV[4])
for i = 6, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('RPUSH', KEYS[2], cjson.encode({status = ARGV[1], at_ms = tonumber(ARGV[3]), reason = ARGV[4], detail = ARGV[5]}))
return cur
