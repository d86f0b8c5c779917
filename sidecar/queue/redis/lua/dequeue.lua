-- dequeue.lua: lease up to N of the most urgent queued requests (lowest score first), after
-- reclaiming lapsed leases and moving delayed requests whose time has come into pending; expired requests met on the way are expired, never handed out,
-- and an index entry whose hash is gone is dropped.
-- KEYS: the eleven of common.lua.
-- ARGV: 1-2 as in common.lua; 3 lease_until (epoch seconds); 4 sweep_limit (lapsed leases
--   reclaimed first, at most); 5 max_bytes (-1: no bound): stop before the request whose cost
--   (size_bytes + #queue_id + #lease_id + job_fixed) would take the total past it, leaving it
--   first in line, but always hand out one; 6 job_fixed (bytes); 7.. one fresh lease_id per
--   request wanted (their count is N).
-- Returns: {0, records, {expired, requeued, failed}}: each record the field/value pairs of a
--   leased request (record()); then what this run did on the way (requests expired, lapsed
--   leases queued again, lapsed leases failed), for the daemon's per-host counters.
-- Run twice with the same lease ids (a resent pipeline), it returns the requests the first
-- run leased, and leases nothing more: every request a run leases carries one of the call's
-- lease ids and sits in the leases zset at exactly lease_until's score (ms_score).
local lease_until, lease_until_s = arg_time(3, 'lease_until')
local lease_ms = ms_score(lease_until)
local limit = arg_int(4, 'sweep_limit', 0, 1000000)
local room = arg_int(5, 'max_bytes', -1, 1e15)
local bounded = room >= 0 -- room itself goes below 0 after a first job over the budget
local job_fixed = arg_int(6, 'job_fixed', 0, 1e9)
local FIRST_LEASE = 7
local want = #ARGV - (FIRST_LEASE - 1)
local mine = {}
for i = 1, want do
  mine[ARGV[FIRST_LEASE - 1 + i]] = i
end

local function leased_before()
  local found = {}
  local same = redis.call('ZRANGEBYSCORE', K_LEASES, lease_ms, lease_ms)
  for _, id in ipairs(same) do
    local key = K_REQ .. id
    local pos = mine[redis.call('HGET', key, 'lease_id')]
    if pos then
      found[#found + 1] = {pos, pairs_of(key)}
    end
  end
  table.sort(found, function(a, b) return a[1] < b[1] end)
  local out = {}
  for i, item in ipairs(found) do
    out[i] = item[2]
  end
  return out
end

local again = leased_before()
if #again > 0 then
  return {OK, again, {0, 0, 0}} -- the first run counted what it did
end
local lapsed = reclaim_leases(limit)
local expired = lapsed.expired
promote_delayed(limit)
-- The most urgent requests come off pending together; what the byte budget leaves goes back
-- with its score. Their expiry and lease index entries change in one call each, at the end.
local out, back, unexpiring, leased = {}, {}, {}, {}
local full = false
while #out < want and not full do
  local top = redis.call('ZPOPMIN', K_PENDING, want - #out)
  if #top == 0 then
    break
  end
  for j = 1, #top, 2 do
    local id, score = top[j], top[j + 1]
    local r = not full and load(id)
    if full then
      back[#back + 1] = score -- behind a request over the budget: first in line again
      back[#back + 1] = id
    elseif not r then
      drop_orphan(id, true)
    elseif r.status ~= 'queued' then
      redis.call('ZREM', K_EXPIRY, id) -- stale entry: the request moved on
    elseif r.expires_at <= NOW then
      to_expired(r)
      expired = expired + 1
    elseif bounded and #out > 0
        and (r.size or 0) + #id + #ARGV[FIRST_LEASE + #out] + job_fixed > room then
      full = true
      back[#back + 1] = score -- over the budget: first in line again
      back[#back + 1] = id
    else
      if bounded then
        room = room - ((r.size or 0) + #id + #ARGV[FIRST_LEASE + #out] + job_fixed)
      end
      unexpiring[#unexpiring + 1] = id
      redis.call('HSET', r.key, 'status', 'processing', 'lease_id', ARGV[FIRST_LEASE + #out],
        'lease_expires_at', lease_until_s, 'updated_at', NOW_S,
        'attempts', string.format('%d', r.attempts + 1)) -- not a Lua number: '%.14g' costs more
      leased[#leased + 1] = lease_ms
      leased[#leased + 1] = id
      -- Leased means it must stay: drop a native TTL that an older version may have set.
      redis.call('PERSIST', r.key)
      out[#out + 1] = record(r)
    end
  end
end
zadd_many(K_PENDING, back)
zrem_many(K_EXPIRY, unexpiring)
zadd_many(K_LEASES, leased)
return {OK, out, {expired, lapsed.requeued, lapsed.failed}}
