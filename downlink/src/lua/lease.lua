-- Takes up to ARGV[2] members of the deadline set due at ARGV[1] (ms) and
-- pushes their score to ARGV[3] (the lease: a whole ms plus half a ms, a
-- score no other writer uses), so that other sweepers skip them while this
-- one works; the caller sets the real next deadline afterwards, only if
-- nobody else has set one meanwhile (reschedule.lua).
-- KEYS[1] commands:deadline
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[3], id)
end
return due
