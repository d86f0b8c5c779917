-- sweep.lua: one bounded step of the periodic sweep: expire queued requests past their TTL,
-- reclaim lapsed leases, forget terminal records past their retention. Atomic, so when two
-- daemons sweep at once each request is moved exactly once.
-- KEYS: the nine of common.lua.
-- ARGV: 1-2 as in common.lua; 3 limit (per kind of work).
-- Returns: {0, {expired, requeued, failed, purged}}.
return {OK, sweep(arg_int(3, 'limit', 0, 1000000))}
