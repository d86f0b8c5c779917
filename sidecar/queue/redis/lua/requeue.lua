-- requeue.lua: dead letters back to queued, attempts 0, id and payload kept, last in line
-- (a fresh seq), their TTL counted anew from now. Safe to repeat: a queued one is unchanged.
-- All or none: every id is checked before any changes, so an error leaves all as they were.
-- KEYS: the eleven of common.lua; 12.. the requests' hashes, one per queue_id, in order.
-- ARGV: 1-2 as in common.lua; 3 '1' check only (change nothing), else '0'; 4.. queue_ids.
-- Returns: {0, 'requeued' | 'unchanged', ...} (one per id; {0} when checking only);
--   {-1, queue_id} unknown or past its retention; {-2, status, queue_id} not a dead letter
--   (completed, cancelled, processing, or kept without its payload).
local check_only = arg_text(3, 'check') == '1'
local n = #ARGV - 3
if n < 1 or #KEYS ~= NKEYS + n then
  error({err = 'ERR sidecar: requeue of ' .. n .. ' requests needs ' .. (NKEYS + n) .. ' keys'})
end
local rs = {}
for i = 1, n do
  local id = ARGV[3 + i]
  local r = load_live(id, KEYS[NKEYS + i])
  if not r or (r.purge_at and r.purge_at <= NOW) then
    return {ERR_NOT_FOUND, id}
  end
  if r.status ~= 'queued' then
    local dead = r.status == 'failed' or r.status == 'expired'
    if not dead or redis.call('ZSCORE', dead_key(r.status), r.id) == false
        or redis.call('EXISTS', body_key(r.key)) == 0 then
      return {ERR_INVALID_STATE, r.status, id}
    end
  end
  rs[i] = r
end
if check_only then
  return {OK}
end
local out = {OK}
for _, r in ipairs(rs) do
  if r.status == 'queued' then
    out[#out + 1] = 'unchanged'
  else
    redis.call('ZREM', dead_key(r.status), r.id)
    redis.call('HINCRBY', K_STATS, 'dead_bytes', -r.size)
    local seq = redis.call('INCR', K_SEQ)
    local expires_at = clamp_time(NOW + (r.expires_at - r.created_at))
    redis.call('HDEL', r.key, 'reason', 'lease_id', 'lease_expires_at', 'purge_at',
      'settled_by', 'not_before')
    redis.call('HSET', r.key, 'status', 'queued', 'attempts', '0', 'seq',
      string.format('%d', seq), 'expires_at', fmt(expires_at), 'updated_at', NOW_S)
    redis.call('PERSIST', r.key)
    redis.call('PERSIST', body_key(r.key))
    redis.call('ZADD', K_PENDING, string.format('%d', r.priority * SHIFT + seq), r.id)
    redis.call('ZADD', K_EXPIRY, ms_score(expires_at), r.id)
    -- Accepted again, and held again: the books balance as for a new request.
    redis.call('HINCRBY', K_STATS, 'accepted', 1)
    redis.call('HINCRBY', K_STATS, 'bytes', r.size)
    out[#out + 1] = 'requeued'
  end
end
return out
