-- Moves a command to a new status, atomically, if it is allowed.
-- KEYS[1] command:{id}   KEYS[2] command:{id}:log
-- ARGV[1] new status
-- ARGV[2] allowed current statuses, space-separated ("*": any non-terminal)
-- ARGV[3] now (ms)   ARGV[4] reason ("" for none)   ARGV[5] detail ("" for none)
-- ARGV[6] reporting instance ("" for none)   ARGV[7] its connection's epoch
--         (a verdict from a connection: while the command is dispatched or
--         sent, it must be dispatched to that instance, with that epoch or
--         an older one of the same device, else the verdict is stale)
-- ARGV[8] n, then n field/value pairs that must hold ("" = field missing)
-- then field, value pairs to set as well
-- Returns {1, previous status, seq} when the change was made (seq: its
-- 1-based place in the log), else {0, why, 0} with why one of unknown,
-- terminal, status (not in an allowed status), stale, guard.
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, 'unknown', 0} end
if cur == 'acked' or cur == 'timed_out' or cur == 'expired' or cur == 'failed' then
  return {0, 'terminal', 0}
end
if ARGV[2] ~= '*' then
  local ok = false
  for s in string.gmatch(ARGV[2], '%S+') do
    if s == cur then ok = true end
  end
  if not ok then return {0, 'status', 0} end
end
if ARGV[6] ~= '' and (cur == 'dispatched' or cur == 'sent') then
  local srv = redis.call('HGET', KEYS[1], 'server_id') or ''
  local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '')
  if srv ~= ARGV[6] or epoch == nil or epoch > tonumber(ARGV[7]) then
    return {0, 'stale', 0}
  end
end
local guards = tonumber(ARGV[8])
for i = 0, guards - 1 do
  local have = redis.call('HGET', KEYS[1], ARGV[9 + 2 * i]) or ''
  if have ~= ARGV[10 + 2 * i] then return {0, 'guard', 0} end
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[3], 'reason', ARGV[4])
for i = 9 + 2 * guards, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local seq = redis.call('LLEN', KEYS[2]) + 1
redis.call('RPUSH', KEYS[2], cjson.encode({seq = seq, status = ARGV[1], at_ms = tonumber(ARGV[3]), reason = ARGV[4], detail = ARGV[5]}))
return {1, cur, seq}
