-- extend.lua: push a live lease's end to lease_until.
-- KEYS: the seven of common.lua.
-- ARGV: 1-3 as in common.lua; 4 queue_id; 5 lease_id; 6 lease_until (epoch seconds).
-- Returns: {0, record}; {-1} not found; {-2, status} not processing; {-3} lease mismatch.
local r = load_live(ARGV[4])
local err = check_leased(r, ARGV[5])
if err then
  return err
end
redis.call('HSET', r.key, 'lease_expires_at', ARGV[6], 'updated_at', NOW_S)
redis.call('ZADD', K_LEASES, ARGV[6], r.id)
expire_at(r.key, math.max(r.expires_at, tonumber(ARGV[6])) + RETENTION + GRACE_S)
return {OK, record(r)}
