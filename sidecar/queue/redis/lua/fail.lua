-- fail.lua: end a lease with a failure: queued again (keeping its seq) when retry is asked and
-- attempts remain, else failed ("attempts_exhausted: <reason>" when retry was asked).
-- With retry and counts "0" the delivery this fail ends is not counted: attempts goes back by
-- one (dequeue added it), and the request is always queued again (the TTL alone bounds it).
-- Repeating it with the same lease (a client's retry, or a resent pipeline) returns the record
-- as it is now, like complete: the repeat is recognised before anything changes, so an attempt
-- is never given back twice.
-- KEYS: the eleven of common.lua; 12 the request's hash.
-- ARGV: 1-2 as in common.lua; 3 queue_id; 4 lease_id; 5 reason; 6 retry ("1" or "0");
--   7 not_before (optional; epoch seconds; with retry, the request is not handed out before it: it waits
--   in the delayed zset, and dequeue or the sweep moves it back into pending, keeping its seq);
--   8 counts (optional, after 7; "0": not counted, as above; anything else or absent: counted).
-- Returns: {0, record} (a repeat: {0, record, 1}); {-1} not found; {-2, status} not processing; {-3} lease mismatch.
local token = 'fail:' .. arg_text(4, 'lease_id')
local reason = arg_text(5, 'reason')
local retry = arg_text(6, 'retry') == '1'
-- Optional, so a caller that predates delay_s keeps working: absent means no delay.
local not_before = nil
if ARGV[7] then
  not_before = select(2, arg_time(7, 'not_before'))
end
-- Optional too: a caller that predates counts has every delivery counted.
local counted = ARGV[8] ~= '0'
local r = load_live(ARGV[3], KEYS[NKEYS + 1])
if repeated(r, token) then
  return {OK, record(r), 1} -- 1: a repeat, which changed nothing (not counted again)
end
local err = check_leased(r, ARGV[4])
if err then
  return err
end
if retry and not counted then
  if r.attempts > 0 then
    r.attempts = r.attempts - 1
    redis.call('HSET', r.key, 'attempts', string.format('%d', r.attempts))
  end
  to_requeued(r, reason, token, not_before)
elseif retry then
  if r.attempts < r.max_attempts then
    to_requeued(r, reason, token, not_before)
  else
    to_terminal(r, 'failed', 'attempts_exhausted: ' .. reason, token)
  end
else
  to_terminal(r, 'failed', reason, token)
end
return {OK, record(r)}
