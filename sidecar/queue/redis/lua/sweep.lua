-- sweep.lua: one bounded step of the periodic sweep: expire queued requests past their TTL,
-- reclaim lapsed leases, forget terminal records past their retention. Atomic, so when two
-- daemons sweep at once each request is moved exactly once.
-- KEYS: the eleven of common.lua.
-- ARGV: 1-2 as in common.lua; 3 limit (per kind of work).
-- Returns: {0, {expired, requeued, failed, purged}, dead_dropped (the counter, so the caller
--   logs the dead letters any script dropped since it last looked)}.
local counts = sweep(arg_int(3, 'limit', 0, 1000000))
return {OK, counts, redis.call('HGET', K_STATS, 'dead_dropped') or 0}
