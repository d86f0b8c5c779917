-- purge.lua: forget up to `limit` records of one status, from its sorted set, oldest first;
-- with a cutoff, only those that finished (or, live ones, arrived) at or before it. A live
-- request (queued, delayed, processing) ends failed with the reason `purged` first, so the
-- books balance. The caller checks the force flag and calls again while `examined` = limit.
-- KEYS: the eleven of common.lua.
-- ARGV: 1-2 as in common.lua; 3 status; 4 cutoff (epoch s) or ''; 5 limit; 6 offset (entries
--   kept by the cutoff in earlier calls of this purge, skipped).
-- Returns: {0, purged, examined, kept}: kept (by the cutoff, or another status sharing the
--   index) stay where they are, so the next call's offset grows by kept.
local status = arg_text(3, 'status')
local cutoff = tonumber(ARGV[4])
local limit = arg_int(5, 'limit', 1, 10000)
local offset = arg_int(6, 'offset', 0, 1e15)
local key, need = nil, status
if status == 'queued' then
  key = K_PENDING
elseif status == 'delayed' then
  key, need = K_DELAYED, 'queued'
elseif status == 'processing' then
  key = K_LEASES
elseif status == 'completed' then
  key = K_RETAINED
elseif status == 'failed' then
  key = K_DEAD_FAILED
elseif status == 'expired' then
  key = K_DEAD_EXPIRED
else
  fail_arg(3, 'status')
end
local ids = redis.call('ZRANGE', key, offset, offset + limit - 1)
local purged, kept = 0, 0
for _, id in ipairs(ids) do
  local r = load(id)
  if not r then
    redis.call('ZREM', key, id) -- a stale entry
  elseif r.status == need then
    local live = need == 'queued' or need == 'processing'
    local since = live and r.created_at or tonumber(redis.call('HGET', r.key, 'updated_at'))
    if not cutoff or since <= cutoff then
      if live then
        to_terminal(r, 'failed', 'purged', false)
      end
      purge(r)
      purged = purged + 1
    else
      kept = kept + 1
    end
  else
    kept = kept + 1
  end
end
return {OK, purged, #ids, kept}
