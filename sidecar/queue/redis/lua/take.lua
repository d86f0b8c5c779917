-- take.lua: lease the one request a queue_id names, if it is queued (ready in pending, or held
-- back in delayed) and not past its TTL; a caller's pick-up of its result (protocol.md, take).
-- KEYS: the eleven of common.lua; 12 the request's hash.
-- ARGV: 1-2 as in common.lua; 3 queue_id; 4 a fresh lease_id; 5 lease_until (epoch seconds).
-- Returns: {0, record} leased (a repeat of the same call, a resent pipeline: the record it
--   leased, as it is); {-1} not found (or its retention ended); {-2, status} not queued
--   (processing, or finished; an expired one is expired on the way).
local lease_id = arg_text(4, 'lease_id')
local lease_until, lease_until_s = arg_time(5, 'lease_until')
local r = load_live(ARGV[3], KEYS[NKEYS + 1])
if not r then
  return {ERR_NOT_FOUND}
end
if r.status == 'processing' and r.lease_id == lease_id then
  return {OK, record(r)} -- this very call ran before: its lease stands
end
if r.status ~= 'queued' then
  return {ERR_INVALID_STATE, r.status}
end
redis.call('ZREM', K_PENDING, r.id)
redis.call('ZREM', K_DELAYED, r.id)
redis.call('ZREM', K_EXPIRY, r.id)
redis.call('HDEL', r.key, 'not_before')
redis.call('HSET', r.key, 'status', 'processing', 'lease_id', lease_id,
  'lease_expires_at', lease_until_s, 'updated_at', NOW_S,
  'attempts', string.format('%d', r.attempts + 1))
-- Leased means it must stay: drop a native TTL that an older version may have set.
redis.call('PERSIST', r.key)
redis.call('ZADD', K_LEASES, ms_score(lease_until), r.id)
return {OK, record(r)}
