-- cancel.lua: fail a queued request with the reason "cancelled".
-- KEYS: the eleven of common.lua; 12 the request's hash.
-- ARGV: 1-2 as in common.lua; 3 queue_id; 4 a token fresh for each cancel call, so the same
--   call run twice (a resent pipeline) answers the cancelled record, while a second cancel
--   call answers invalid_state.
-- Returns: {0, record} (a repeat: {0, record, 1}); {-1} not found; {-2, status} not queued.
local token = 'cancel:' .. arg_text(4, 'token')
local r = load_live(ARGV[3], KEYS[NKEYS + 1])
if repeated(r, token) then
  return {OK, record(r), 1} -- 1: a repeat, which changed nothing (not counted again)
end
if not r then
  return {ERR_NOT_FOUND}
end
if r.status ~= 'queued' then
  return {ERR_INVALID_STATE, r.status}
end
to_terminal(r, 'failed', 'cancelled', token)
return {OK, record(r)}
