-- status.lua: one request as stored now, after applying what is due for it (expiry, lease
-- lapse, end of retention), so a status read never shows a stale state.
-- KEYS: the eleven of common.lua; 12 the request's hash.
-- ARGV: 1-2 as in common.lua; 3 queue_id.
-- Returns: {0, record}; {-1} unknown or past its retention.
local r = load_live(ARGV[3], KEYS[NKEYS + 1])
-- A request that became terminal in this very call with a retention of 0 (an expiry that was
-- due) is past its retention already: not found, as the local store answers, and never the
-- snapshot settle_due kept for a settle's reply.
if not r or (r.purge_at and r.purge_at <= NOW) then
  return {ERR_NOT_FOUND}
end
return {OK, record(r)}
