-- cancel.lua: fail a queued request with the reason "cancelled".
-- KEYS: the seven of common.lua.
-- ARGV: 1-3 as in common.lua; 4 queue_id.
-- Returns: {0, record}; {-1} not found; {-2, status} not queued.
local r = load_live(ARGV[4])
if not r then
  return {ERR_NOT_FOUND}
end
if r.status ~= 'queued' then
  return {ERR_INVALID_STATE, r.status}
end
to_terminal(r, 'failed', 'cancelled')
return {OK, record(r)}
