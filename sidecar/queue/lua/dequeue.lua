-- dequeue.lua: lease up to N of the most urgent queued requests (lowest score first), after
-- reclaiming lapsed leases; expired requests met on the way are expired, never handed out,
-- and an index entry whose hash is gone is dropped.
-- KEYS: the seven of common.lua.
-- ARGV: 1-3 as in common.lua; 4 lease_until (epoch seconds); 5 sweep_limit (lapsed leases
--   reclaimed first, at most); 6.. one fresh lease_id per request wanted (their count is N).
-- Returns: {0, records}, each record the HGETALL field/value pairs of a leased request.
local lease_until_s = ARGV[4]
local lease_until = tonumber(lease_until_s)
reclaim_leases(tonumber(ARGV[5]))
local want = #ARGV - 5
local out = {}
while #out < want do
  local top = redis.call('ZPOPMIN', K_PENDING)
  if #top == 0 then
    break
  end
  local id = top[1]
  local r = load(id)
  if not r then
    drop_orphan(id, true)
  elseif r.status ~= 'queued' then
    redis.call('ZREM', K_EXPIRY, id) -- stale entry: the request moved on
  elseif r.expires_at <= NOW then
    to_expired(r)
  else
    redis.call('ZREM', K_EXPIRY, id)
    redis.call('HINCRBY', r.key, 'attempts', 1)
    redis.call('HSET', r.key, 'status', 'processing', 'lease_id', ARGV[6 + #out],
      'lease_expires_at', lease_until_s, 'updated_at', NOW_S)
    redis.call('ZADD', K_LEASES, lease_until_s, id)
    -- A lease may outlive the TTL; the hash must outlive both.
    expire_at(r.key, math.max(r.expires_at, lease_until) + RETENTION + GRACE_S)
    out[#out + 1] = record(r)
  end
end
return {OK, out}
