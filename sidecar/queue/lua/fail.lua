-- fail.lua: end a lease with a failure: queued again (keeping its seq) when retry is asked and
-- attempts remain, else failed ("attempts_exhausted: <reason>" when retry was asked).
-- Repeating it with the same lease (a client's retry, or a resent pipeline) returns the record
-- as it is now, like complete.
-- KEYS: the eight of common.lua; 9 the request's hash.
-- ARGV: 1-2 as in common.lua; 3 queue_id; 4 lease_id; 5 reason; 6 retry ("1" or "0").
-- Returns: {0, record}; {-1} not found; {-2, status} not processing; {-3} lease mismatch.
local token = 'fail:' .. arg_text(4, 'lease_id')
local reason = arg_text(5, 'reason')
local retry = arg_text(6, 'retry') == '1'
local r = load_live(ARGV[3], KEYS[9])
if repeated(r, token) then
  return {OK, record(r)}
end
local err = check_leased(r, ARGV[4])
if err then
  return err
end
if retry then
  if r.attempts < r.max_attempts then
    to_requeued(r, reason, token)
  else
    to_terminal(r, 'failed', 'attempts_exhausted: ' .. reason, token)
  end
else
  to_terminal(r, 'failed', reason, token)
end
return {OK, record(r)}
