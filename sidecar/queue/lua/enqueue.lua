-- enqueue.lua: store a batch of new requests (status queued); an existing queue_id is returned
-- as it is, never stored twice, so a retried write or a repeated migration is harmless.
-- KEYS: the seven of common.lua.
-- ARGV: 1-3 as in common.lua; 4 n (requests in the batch); then seven per request, starting at
--   5 + (i - 1) * 7: queue_id, priority, created_at, expires_at, max_attempts, payload
--   (opaque bytes, never decoded here), attempts (0 for a new request; the deliveries a
--   request moved from the local queue already had).
-- Returns: {0, items}; items[i] = {1, seq} when this call created request i, or {0, record}
--   (HGETALL field/value pairs) when it already existed (a repeat inside the batch included).
local n = tonumber(ARGV[4])
local items = {}
for i = 1, n do
  local base = 5 + (i - 1) * 7
  local id = ARGV[base]
  local r = load_live(id)
  if r then
    items[i] = {0, record(r)}
  else
    local key = REQ .. id
    local payload = ARGV[base + 5]
    local seq = redis.call('INCR', K_SEQ)
    local priority = tonumber(ARGV[base + 1])
    local expires_at = tonumber(ARGV[base + 3])
    redis.call('HSET', key, 'queue_id', id, 'priority', ARGV[base + 1], 'seq', seq,
      'created_at', ARGV[base + 2], 'expires_at', ARGV[base + 3], 'status', 'queued',
      'attempts', ARGV[base + 6], 'max_attempts', ARGV[base + 4], 'updated_at', NOW_S,
      'payload', payload, 'size_bytes', #payload)
    redis.call('ZADD', K_PENDING, string.format('%d', priority * SHIFT + seq), id)
    redis.call('ZADD', K_EXPIRY, ARGV[base + 3], id)
    redis.call('HINCRBY', K_STATS, 'accepted', 1)
    redis.call('HINCRBY', K_STATS, 'bytes', #payload)
    expire_at(key, math.max(expires_at, NOW) + RETENTION + GRACE_S)
    items[i] = {1, seq}
  end
end
return {OK, items}
