-- requeue.lua: a dead letter back to queued, attempts 0, id and payload kept, last in line
-- (a fresh seq), its TTL counted anew from now. Safe to repeat: a queued one is unchanged.
-- KEYS: the eleven of common.lua; 12 the request's hash.
-- ARGV: 1-2 as in common.lua; 3 queue_id.
-- Returns: {0, 'requeued' | 'unchanged'}; {-1} unknown or past its retention; {-2, status}
--   not a dead letter (completed, cancelled, processing, or kept without its payload).
local r = load_live(ARGV[3], KEYS[NKEYS + 1])
if not r or (r.purge_at and r.purge_at <= NOW) then
  return {ERR_NOT_FOUND}
end
if r.status == 'queued' then
  return {OK, 'unchanged'}
end
local dead = r.status == 'failed' or r.status == 'expired'
if not dead or redis.call('ZSCORE', dead_key(r.status), r.id) == false
    or redis.call('EXISTS', body_key(r.key)) == 0 then
  return {ERR_INVALID_STATE, r.status}
end
redis.call('ZREM', dead_key(r.status), r.id)
redis.call('HINCRBY', K_STATS, 'dead_bytes', -r.size)
local seq = redis.call('INCR', K_SEQ)
local expires_at = clamp_time(NOW + (r.expires_at - r.created_at))
redis.call('HDEL', r.key, 'reason', 'lease_id', 'lease_expires_at', 'purge_at', 'settled_by',
  'not_before')
redis.call('HSET', r.key, 'status', 'queued', 'attempts', '0', 'seq', string.format('%d', seq),
  'expires_at', fmt(expires_at), 'updated_at', NOW_S)
redis.call('PERSIST', r.key)
redis.call('PERSIST', body_key(r.key))
redis.call('ZADD', K_PENDING, string.format('%d', r.priority * SHIFT + seq), r.id)
redis.call('ZADD', K_EXPIRY, ms_score(expires_at), r.id)
-- Accepted again, and held again: the books balance as for a new request.
redis.call('HINCRBY', K_STATS, 'accepted', 1)
redis.call('HINCRBY', K_STATS, 'bytes', r.size)
return {OK, 'requeued'}
