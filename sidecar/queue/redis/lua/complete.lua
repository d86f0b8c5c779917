-- complete.lua: mark leased requests completed, each on its own (concurrent completes of one
-- loop pass share a run); repeating one with the same lease (a client's retry, or a resent
-- pipeline) returns the record as it is, even when its hash is gone.
-- KEYS: the eleven of common.lua; then (12..) each request's hash, in the order of ARGV's pairs.
-- ARGV: 1-2 as in common.lua; then queue_id, lease_id, want per request (n = (#ARGV - 2) / 3):
--   want '1' returns the request's record, '0' only its code (a worker that needs no record
--   spares Redis reading the hash back and the reply carrying it).
-- Returns: {0, results}, one per request: {0, record} ({0} when not wanted); {-1} not found;
--   {-2, status} not processing; {-3} lease mismatch. One request's refusal never affects
--   another's result.
local function complete_one(i)
  local at = 2 + 3 * i
  local id, lease = arg_text(at - 2, 'queue_id'), arg_text(at - 1, 'lease_id')
  local want = arg_text(at, 'want') == '1'
  local token = 'complete:' .. lease
  local r = load_live(id, KEYS[NKEYS + i])
  -- Records written before settled_by existed are recognised by their kept lease_id.
  if repeated(r, token) or (r and r.status == 'completed' and r.lease_id == lease) then
    return want and {OK, record(r)} or {OK}
  end
  local err = check_leased(r, lease)
  if err then
    return err
  end
  SNAPSHOT = want
  to_terminal(r, 'completed', false, token)
  SNAPSHOT = true
  return want and {OK, record(r)} or {OK}
end

local n = (#ARGV - 2) / 3
if n < 1 or n ~= math.floor(n) or #KEYS ~= NKEYS + n then
  fail_arg(3, 'queue_id, lease_id, want triples, one hash key each')
end
local out = {}
defer_start()
for i = 1, n do
  out[i] = complete_one(i)
end
flush_deferred()
return {OK, out}
