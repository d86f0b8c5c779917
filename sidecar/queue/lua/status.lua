-- status.lua: one request as stored now, after applying what is due for it (expiry, lease
-- lapse, end of retention), so a status read never shows a stale state.
-- KEYS: the seven of common.lua.
-- ARGV: 1-3 as in common.lua; 4 queue_id.
-- Returns: {0, record}; {-1} unknown or past its retention.
local r = load_live(ARGV[4])
if not r then
  return {ERR_NOT_FOUND}
end
return {OK, record(r)}
