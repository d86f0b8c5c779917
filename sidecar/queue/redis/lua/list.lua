-- list.lua: one page of the records of one status, from its sorted set: O(log N + page), no
-- SCAN or KEYS. Reads only (what is due is left to the sweep).
-- KEYS: the eleven of common.lua.
-- ARGV: 1-2 as in common.lua; 3 status (queued, delayed, processing, completed, failed,
--   expired); 4 priority or '' (any); 5 '1' newest first, else oldest; 6 limit (1-1000);
--   7 the score the previous page ended at, or '' (from the start); 8 its queue_id;
--   9 '1' with payloads; 10 (optional) the most bytes of records in the reply.
-- Order (the score): arrival (seq) for queued, not_before for delayed, lease end (ms) for
-- processing, end of retention for the rest. Queued merges the ten priority bands of pending.
-- A filter (a priority, or completed among the cancelled records that share its index)
-- examines at most 10 * limit entries, so a page may be short while the next score is set.
-- Returns: {0, next_score | false, next_id | false, record, record, ...}.
local status = arg_text(3, 'status')
local want_priority = tonumber(ARGV[4])
local newest = ARGV[5] == '1'
local limit = arg_int(6, 'limit', 1, 1000)
local after_score, after_id = tonumber(ARGV[7]), ARGV[8]
local with_payload = ARGV[9] == '1'
-- 10 (optional): the most bytes of records in the reply; '' or absent: no bound. The page stops
-- before the record that would pass it, keeping at least one, and its next_* name the last one.
local max_bytes = tonumber(ARGV[10] or '')
local used = 0

local function fetch_record(id)
  if with_payload then
    return pairs_of(K_REQ .. id)
  end
  return redis.call('HGETALL', K_REQ .. id)
end

-- Whether a record of `rec` (HGETALL pairs) still fits the byte bound; counts it if so.
local function fits(rec, taken)
  local n = 0
  for i = 1, #rec do
    n = n + #rec[i] + 2
  end
  if max_bytes and taken > 0 and used + n > max_bytes then
    return false
  end
  used = used + n
  return true
end

if status == 'queued' then
  -- Each band of pending holds seq in arrival order: a range per band, merged by seq. Merged,
  -- the rows are in order up to the lowest last row of a band that was cut at limit + 1.
  local rows = {}
  local safe = nil
  local lo_p, hi_p = 0, 9
  if want_priority then
    lo_p, hi_p = want_priority, want_priority
  end
  for p = lo_p, hi_p do
    local base = p * SHIFT
    local lo, hi = string.format('%d', base), string.format('%d', base + SHIFT - 1)
    local got
    if newest then
      if after_score then
        hi = '(' .. string.format('%d', base + after_score)
      end
      got = redis.call('ZREVRANGEBYSCORE', K_PENDING, hi, lo, 'WITHSCORES', 'LIMIT', 0, limit + 1)
    else
      if after_score then
        lo = '(' .. string.format('%d', base + after_score)
      end
      got = redis.call('ZRANGEBYSCORE', K_PENDING, lo, hi, 'WITHSCORES', 'LIMIT', 0, limit + 1)
    end
    for i = 1, #got, 2 do
      rows[#rows + 1] = {tonumber(got[i + 1]) - base, got[i]}
    end
    if #got == 2 * (limit + 1) then
      local last = tonumber(got[#got]) - base
      if not safe or (newest and last > safe) or (not newest and last < safe) then
        safe = last
      end
    end
  end
  table.sort(rows, function(a, b)
    if newest then
      return a[1] > b[1]
    end
    return a[1] < b[1]
  end)
  local out = {OK, false, false}
  local taken, last = 0, nil
  for _, row in ipairs(rows) do
    if taken == limit or (safe and ((newest and row[1] < safe) or (not newest and row[1] > safe))) then
      out[2], out[3] = string.format('%d', last[1]), last[2] -- more follow
      return out
    end
    -- Skip an entry whose hash is gone or no longer queued (an orphan of pending).
    if redis.call('HGET', K_REQ .. row[2], 'status') == 'queued' then
      local rec = fetch_record(row[2])
      if not fits(rec, taken) then
        out[2], out[3] = string.format('%d', last[1]), last[2]
        return out
      end
      out[#out + 1] = rec
      taken = taken + 1
    end
    last = row
  end
  return out
end

local key, need_status
if status == 'delayed' then
  key, need_status = K_DELAYED, 'queued'
elseif status == 'processing' then
  key, need_status = K_LEASES, 'processing'
elseif status == 'completed' then
  key, need_status = K_RETAINED, 'completed'
elseif status == 'failed' then
  key, need_status = K_DEAD_FAILED, 'failed'
elseif status == 'expired' then
  key, need_status = K_DEAD_EXPIRED, 'expired'
else
  fail_arg(3, 'status')
end
local filtered = want_priority ~= nil or status == 'completed'
local budget = limit + 1
if filtered then
  budget = limit * 10
end

-- The entries after (after_score, after_id): by rank when that entry is still there with
-- that score (ties are ordered by member), else by score.
local got
local rank = nil
if after_score then
  local score = redis.call('ZSCORE', key, after_id)
  if score and tonumber(score) == after_score then
    if newest then
      rank = redis.call('ZREVRANK', key, after_id)
    else
      rank = redis.call('ZRANK', key, after_id)
    end
  end
end
if rank then
  if newest then
    got = redis.call('ZREVRANGE', key, rank + 1, rank + budget, 'WITHSCORES')
  else
    got = redis.call('ZRANGE', key, rank + 1, rank + budget, 'WITHSCORES')
  end
elseif after_score then
  if newest then
    got = redis.call('ZREVRANGEBYSCORE', key, '(' .. ARGV[7], '-inf', 'WITHSCORES', 'LIMIT', 0, budget)
  else
    got = redis.call('ZRANGEBYSCORE', key, '(' .. ARGV[7], '+inf', 'WITHSCORES', 'LIMIT', 0, budget)
  end
elseif newest then
  got = redis.call('ZREVRANGE', key, 0, budget - 1, 'WITHSCORES')
else
  got = redis.call('ZRANGE', key, 0, budget - 1, 'WITHSCORES')
end

local out = {OK, false, false}
local taken = 0
local last_score, last_id
for i = 1, #got, 2 do
  local id, score = got[i], got[i + 1]
  if taken == limit then
    out[2], out[3] = last_score, last_id -- more follow
    return out
  end
  local v = redis.call('HMGET', K_REQ .. id, 'status', 'priority')
  if v[1] == need_status and (not want_priority or tonumber(v[2]) == want_priority) then
    local rec = fetch_record(id)
    if not fits(rec, taken) then
      out[2], out[3] = last_score, last_id -- the byte bound ended the page
      return out
    end
    out[#out + 1] = rec
    taken = taken + 1
  end
  last_score, last_id = score, id
end
if #got == 2 * budget then
  out[2], out[3] = last_score, last_id -- the budget ended the page: more may follow
end
return out
