-- complete.lua: mark a leased request completed; repeating it with the same lease returns
-- the completed record.
-- KEYS: the seven of common.lua.
-- ARGV: 1-3 as in common.lua; 4 queue_id; 5 lease_id.
-- Returns: {0, record}; {-1} not found; {-2, status} not processing; {-3} lease mismatch.
local r = load_live(ARGV[4])
if r and r.status == 'completed' and r.lease_id == ARGV[5] then
  return {OK, record(r)}
end
local err = check_leased(r, ARGV[5])
if err then
  return err
end
to_terminal(r, 'completed', false)
return {OK, record(r)}
