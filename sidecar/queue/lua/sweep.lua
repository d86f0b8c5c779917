-- sweep.lua: one bounded step of the periodic sweep: expire queued requests past their TTL,
-- reclaim lapsed leases, forget terminal records past their retention. Atomic, so when two
-- daemons sweep at once each request is moved exactly once.
-- KEYS: the seven of common.lua.
-- ARGV: 1-3 as in common.lua; 4 limit (per kind of work).
-- Returns: {0, {expired, requeued, failed, purged}}.
return {OK, sweep(tonumber(ARGV[4]))}
