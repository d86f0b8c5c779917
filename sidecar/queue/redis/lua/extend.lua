-- extend.lua: push a live lease's end to lease_until (run twice, it sets the same end).
-- KEYS: the eleven of common.lua; 12 the request's hash.
-- ARGV: 1-2 as in common.lua; 3 queue_id; 4 lease_id; 5 lease_until (epoch seconds).
-- Returns: {0, record}; {-1} not found; {-2, status} not processing; {-3} lease mismatch.
local lease_until, lease_until_s = arg_time(5, 'lease_until')
local r = load_live(ARGV[3], KEYS[NKEYS + 1])
local err = check_leased(r, ARGV[4])
if err then
  return err
end
redis.call('HSET', r.key, 'lease_expires_at', lease_until_s, 'updated_at', NOW_S)
redis.call('ZADD', K_LEASES, ms_score(lease_until), r.id)
return {OK, record(r)}
