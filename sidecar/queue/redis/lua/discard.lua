-- discard.lua: remove a queued request as if this Redis had never accepted it, because the
-- failover manager keeps another copy of it (an enqueue whose reply was lost during failover).
-- A request in any other state is left alone: it was handed out or settled here.
-- KEYS: the eleven of common.lua; 12 the request's hash; 13 a marker named by a token fresh for
--   each call, left for 60 s once it discarded, so the same call run twice (a resent pipeline)
--   answers 1 again instead of "nothing discarded".
-- ARGV: 1-2 as in common.lua; 3 queue_id.
-- Returns: {0, 1} discarded; {0, 0} nothing discarded (unknown, processing or terminal).
if redis.call('EXISTS', KEYS[NKEYS + 2]) == 1 then
  return {OK, 1}
end
local r = load_live(ARGV[3], KEYS[NKEYS + 1])
if not r or r.status ~= 'queued' then
  return {OK, 0}
end
redis.call('ZREM', K_PENDING, r.id)
redis.call('ZREM', K_DELAYED, r.id)
redis.call('ZREM', K_EXPIRY, r.id)
redis.call('DEL', r.key, body_key(r.key))
redis.call('HINCRBY', K_STATS, 'accepted', -1)
redis.call('HINCRBY', K_STATS, 'bytes', -r.size)
redis.call('SET', KEYS[NKEYS + 2], r.id, 'PX', 60000)
return {OK, 1}
