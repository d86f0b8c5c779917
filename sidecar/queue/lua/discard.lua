-- discard.lua: remove a queued request as if this Redis had never accepted it, because the
-- failover manager keeps another copy of it (an enqueue whose reply was lost during failover).
-- A request in any other state is left alone: it was handed out or settled here.
-- KEYS: the seven of common.lua.
-- ARGV: 1-3 as in common.lua; 4 queue_id.
-- Returns: {0, 1} discarded; {0, 0} nothing discarded (unknown, processing or terminal).
local r = load_live(ARGV[4])
if not r or r.status ~= 'queued' then
  return {OK, 0}
end
redis.call('ZREM', K_PENDING, r.id)
redis.call('ZREM', K_EXPIRY, r.id)
redis.call('DEL', r.key)
redis.call('HINCRBY', K_STATS, 'accepted', -1)
redis.call('HINCRBY', K_STATS, 'bytes', -r.size)
return {OK, 1}
