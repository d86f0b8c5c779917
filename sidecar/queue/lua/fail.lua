-- fail.lua: end a lease with a failure: queued again (keeping its seq) when retry is asked and
-- attempts remain, else failed ("attempts_exhausted: <reason>" when retry was asked).
-- KEYS: the seven of common.lua.
-- ARGV: 1-3 as in common.lua; 4 queue_id; 5 lease_id; 6 reason; 7 retry ("1" or "0").
-- Returns: {0, record}; {-1} not found; {-2, status} not processing; {-3} lease mismatch.
local r = load_live(ARGV[4])
local err = check_leased(r, ARGV[5])
if err then
  return err
end
local reason = ARGV[6]
if ARGV[7] == '1' then
  if r.attempts < r.max_attempts then
    to_requeued(r, reason)
  else
    to_terminal(r, 'failed', 'attempts_exhausted: ' .. reason)
  end
else
  to_terminal(r, 'failed', reason)
end
return {OK, record(r)}
