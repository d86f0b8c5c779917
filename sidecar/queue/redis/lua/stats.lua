-- stats.lua: one bounded sweep step, then a consistent snapshot of the books.
-- KEYS: the eleven of common.lua.
-- ARGV: 1-2 as in common.lua; 3 sweep limit.
-- Returns: {0, {expired, requeued, failed, purged}, queued, processing, retained,
--   {accepted, completed, failed, expired, bytes, max_expired_age_s}, oldest_created_at | false,
--   {dead letters, dead_bytes, dead_dropped}}.
local swept = sweep(arg_int(3, 'limit', 0, 1000000))
-- The oldest queued request has the lowest seq; the first entry of each priority band holds
-- that band's lowest seq, so ten O(log n) lookups find it.
local oldest_seq, oldest_id = nil, nil
for p = 0, 9 do
  local lo = p * SHIFT
  local first = redis.call('ZRANGEBYSCORE', K_PENDING, string.format('%d', lo),
    '(' .. string.format('%d', lo + SHIFT), 'WITHSCORES', 'LIMIT', 0, 1)
  if #first > 0 then
    local seq = tonumber(first[2]) - lo
    if not oldest_seq or seq < oldest_seq then
      oldest_seq, oldest_id = seq, first[1]
    end
  end
end
local oldest_created = false
if oldest_id then
  oldest_created = redis.call('HGET', K_REQ .. oldest_id, 'created_at')
end
local counters = redis.call('HMGET', K_STATS, 'accepted', 'completed', 'failed', 'expired',
  'bytes', 'max_expired_age_s')
local dead = redis.call('ZCARD', K_DEAD_FAILED) + redis.call('ZCARD', K_DEAD_EXPIRED)
local dead_books = redis.call('HMGET', K_STATS, 'dead_bytes', 'dead_dropped')
return {OK, swept, redis.call('ZCARD', K_PENDING) + redis.call('ZCARD', K_DELAYED), redis.call('ZCARD', K_LEASES),
  redis.call('ZCARD', K_RETAINED) + dead, counters, oldest_created,
  {dead, dead_books[1] or 0, dead_books[2] or 0}}
