-- complete.lua: mark a leased request completed; repeating it with the same lease (a client's
-- retry, or a resent pipeline) returns the record as it is, even when its hash is gone.
-- KEYS: the nine of common.lua; 10 the request's hash.
-- ARGV: 1-2 as in common.lua; 3 queue_id; 4 lease_id.
-- Returns: {0, record}; {-1} not found; {-2, status} not processing; {-3} lease mismatch.
local token = 'complete:' .. arg_text(4, 'lease_id')
local r = load_live(ARGV[3], KEYS[NKEYS + 1])
-- Records written before settled_by existed are recognised by their kept lease_id.
if repeated(r, token) or (r and r.status == 'completed' and r.lease_id == ARGV[4]) then
  return {OK, record(r)}
end
local err = check_leased(r, ARGV[4])
if err then
  return err
end
to_terminal(r, 'completed', false, token)
return {OK, record(r)}
