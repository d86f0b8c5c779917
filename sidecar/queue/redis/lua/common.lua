-- common.lua: shared helpers, loaded with every other script (sidecar/queue/redis/keys.py
-- assembles them).
--
-- Every script runs as a Redis Function of one library: this file once, at the library's top,
-- then each script's body as a function that starts with begin(keys, args). A library's
-- top-level locals live from one call to the next, so begin() sets every one that depends on
-- the call (the keys, the times, DEFER and SNAPSHOT); the helpers are made once, not per call.
-- Where the server has no Functions (before Redis 7) each script is sent as a plain script:
-- this file, begin(KEYS, ARGV), the body. Both ways declare `local KEYS, ARGV` before this file.
--
-- KEYS (see sidecar/queue/redis/keys.py; every key shares one hash tag, so one cluster slot):
--   1 pending (zset: queue_id by priority * 2^48 + seq)   2 leases (zset: queue_id by lease end, ms)
--   3 expiry (zset: queued queue_id by expires_at, ms)         4 retained (zset: terminal queue_id by purge time)
--   5 seq (string counter)   6 stats (hash of counters)   7 generation (string marker)
--   8 the request key prefix, e.g. "{sidecar}:req:" (declared, so the only keys a script builds
--     itself are those of ids it reads from an index, and each hash's payload key `<hash>:p`,
--     all in the same slot)
--   9 delayed (zset: queued queue_id by the time a `fail` with delay_s lets it be handed out)
--   10 dead:failed, 11 dead:expired (zsets: dead letters by the end of their dead retention)
--   12.. the request hashes the call names (one per queue_id in ARGV, in the same order)
-- ARGV (the same first two for every script):
--   1 now, epoch seconds from the caller's clock: every expiry, lease and retention decision
--     uses it, so hosts sharing one Redis need synchronised clocks
--   2 retention_s, how long a terminal record stays readable; or "retention_s,dead_retention_s,
--     max_dead[,max_dead_bytes]": dead letters (failed for good, or expired unprocessed) keep
--     their payload for dead_retention_s, at most max_dead of them holding at most
--     max_dead_bytes of payload (past either cap the oldest go, counted dead_dropped)
-- Return codes (first element of every reply): 0 ok, -1 not found, -2 invalid state (the
-- second element is the current status), -3 lease mismatch.
--
-- Safety rules every script keeps:
-- - Arguments are checked before the first write: a script that raises half-way keeps what it
--   already wrote (Redis has no rollback), so a bad argument must fail before any change.
-- - Lua numbers are doubles and '%d' of one past 2^63 turns negative: every time is clamped to
--   MAX_TIME (2^53 ms, exact as a double) before it is formatted, so no expiry lands in the past.
-- - Only a terminal hash carries a native TTL (its retention, counted by Redis's clock), and
--   not a dead letter's (dead_bytes needs its size when it goes). A queued or leased
--   hash never expires by itself: it must stay until a script settles it, and the `bytes`
--   counter stays exact because every hash it counts leaves through a script.
-- - A script may run twice for one call (redis-py resends a whole pipeline after a dropped
--   connection): dequeue recognises its own leases, settles record who settled them
--   (settled_by) and answer a repeat with the record as it is.

-- Set per call by begin(): the fixed keys, `now` (number and stored text), the whole
-- milliseconds at or before it, and retention_s.
local K_PENDING, K_LEASES, K_EXPIRY, K_RETAINED, K_SEQ, K_STATS, K_REQ, K_DELAYED
local K_DEAD_FAILED, K_DEAD_EXPIRED
local NOW, NOW_S, NOW_MS, RETENTION, DEAD_RETENTION, MAX_DEAD, MAX_DEAD_BYTES
-- The fixed keys before the request hashes a call names.
local NKEYS = 11

local OK, ERR_NOT_FOUND, ERR_INVALID_STATE, ERR_LEASE_MISMATCH = 0, -1, -2, -3
local SHIFT = 281474976710656 -- 2^48: priority sits above the 48 bits of seq
-- The latest time a script handles, in epoch seconds: 2^53 ms, so a time in milliseconds is
-- an exact integer (mirrored by keys.MAX_TIME_S).
local MAX_TIME = 9007199254740

local function fail_arg(i, what)
  error({err = 'ERR sidecar: ARGV[' .. i .. '] (' .. what .. ') is ' .. tostring(ARGV[i])})
end

-- A number argument (not NaN); nil raises before anything was written.
local function arg_number(i, what)
  local x = tonumber(ARGV[i])
  if not x or x ~= x then
    fail_arg(i, what)
  end
  return x
end

-- A string argument that must be present.
local function arg_text(i, what)
  if not ARGV[i] then
    fail_arg(i, what)
  end
  return ARGV[i]
end

-- A whole-number argument within [lo, hi].
local function arg_int(i, what, lo, hi)
  local x = arg_number(i, what)
  if x ~= math.floor(x) or x < lo or x > hi then
    fail_arg(i, what)
  end
  return x
end

local function clamp_time(t)
  if t > MAX_TIME then
    return MAX_TIME
  end
  return t
end

local function fmt(x)
  return string.format('%.17g', x)
end

-- A time argument, clamped: returns the number and the text stored for it.
local function arg_time(i, what)
  local t = clamp_time(arg_number(i, what))
  return t, fmt(t)
end

-- The leases and expiry zsets score a time (a lease's end, a request's expiry) in whole
-- milliseconds, rounded up. An integer score is kept as a number in a small (listpack) zset,
-- where a fractional one is text that Redis parses again at every comparison: with ~64 leases
-- out, strtod under ZADD and ZREM was an eighth of Redis's work per job (callgrind), and an
-- insert into a small expiry zset parsed every score before its place. The exact time stays
-- in the request's hash, which decides.
local function ms_score(t)
  return string.format('%d', math.ceil(clamp_time(t) * 1000))
end

-- One ZADD (flat: score, member, score, member, ...) or ZREM (flat: members) for many
-- members: a redis.call costs Redis about as much as the work of one small write, so a
-- batch's index updates go in one call (in chunks, within Lua's limit on unpack).
local CHUNK = 1000
local function many(cmd, key, flat, step)
  for i = 1, #flat, CHUNK * step do
    redis.call(cmd, key, unpack(flat, i, math.min(#flat, i + CHUNK * step - 1)))
  end
end

local function zadd_many(key, flat)
  many('ZADD', key, flat, 2)
end

local function zrem_many(key, members)
  many('ZREM', key, members, 1)
end

-- Relative to Redis's own clock, so a daemon whose clock differs from Redis's never sets an
-- expiry that Redis already sees as past; `seconds` is positive and clamped, so '%d' is exact.
local function expire_in(key, seconds)
  redis.call('PEXPIRE', key, string.format('%d', math.ceil(clamp_time(seconds) * 1000)))
end

-- The number fields of a request as load() reads them, by name: each is parsed on first use.
-- A settle reads two or three of them, and parsing a time (tonumber of 17 digits) is one of
-- the costliest steps of a script (callgrind: strtod was a sixth of Redis's work per job).
local NUMBER_AT = {
  priority = 2, seq = 3, expires_at = 4, created_at = 5, attempts = 6, max_attempts = 7,
  lease_expires_at = 9, purge_at = 10, size = 11,
}
local LAZY = {
  __index = function(r, name)
    local at = NUMBER_AT[name]
    if not at then
      return nil
    end
    local x = tonumber(r.raw[at])
    rawset(r, name, x)
    return x
  end,
}

local function load(id, key)
  key = key or (K_REQ .. id)
  local v = redis.call('HMGET', key, 'status', 'priority', 'seq', 'expires_at', 'created_at',
    'attempts', 'max_attempts', 'lease_id', 'lease_expires_at', 'purge_at', 'size_bytes',
    'settled_by')
  if not v[1] then
    return nil
  end
  return setmetatable({
    id = id, key = key, raw = v, status = v[1], lease_id = v[8],
    settled_by = v[12],
  }, LAZY)
end

-- A pending request's payload lives beside its hash, in a string key of its own: the hash then
-- holds only short values, which Redis keeps as a compact listpack (a 1 KB value would turn the
-- whole hash into a hash table, about 900 bytes more per request). A hash written by an older
-- version keeps its payload in the field `payload`: both are read, and both are removed.
local function body_key(key)
  return key .. ':p'
end

-- The HGETALL pairs of the hash at key, with its payload (from either place) among them.
local function pairs_of(key)
  local pairs = redis.call('HGETALL', key)
  local body = redis.call('GET', body_key(key))
  if body then
    pairs[#pairs + 1] = 'payload'
    pairs[#pairs + 1] = body
  end
  return pairs
end

-- The record of a request; once it became terminal, the snapshot taken then (its hash may be
-- gone already when the retention is 0).
local function record(r)
  return r.snapshot or pairs_of(r.key)
end

-- An index entry whose hash is gone (deleted by hand, or a native TTL set by an older
-- version): count it as expired once. Its size is unknown, so `bytes` cannot be reduced.
local function drop_orphan(id, was_pending)
  redis.call('DEL', body_key(K_REQ .. id))
  local removed = redis.call('ZREM', K_PENDING, id) + redis.call('ZREM', K_LEASES, id)
    + redis.call('ZREM', K_DELAYED, id)
  redis.call('ZREM', K_EXPIRY, id)
  if was_pending or removed > 0 then
    redis.call('HINCRBY', K_STATS, 'expired', 1)
  end
end

-- Forget a terminal record: its hash, its payload (a dead letter's) and its index entry.
local function purge(r)
  redis.call('DEL', r.key, body_key(r.key))
  redis.call('ZREM', K_RETAINED, r.id)
  if redis.call('ZREM', K_DEAD_FAILED, r.id) + redis.call('ZREM', K_DEAD_EXPIRED, r.id) > 0 then
    redis.call('HINCRBY', K_STATS, 'dead_bytes', -r.size)
  end
end

-- A dead letter: failed for good (not cancelled or purged by someone), or expired.
local function is_dead(status, reason)
  return status == 'expired' or (status == 'failed' and reason ~= 'cancelled'
    and reason ~= 'purged')
end

local function dead_key(status)
  if status == 'expired' then
    return K_DEAD_EXPIRED
  end
  return K_DEAD_FAILED
end

-- Make room for a dead letter of `size` bytes: while MAX_DEAD are kept, or their bytes and
-- size would pass MAX_DEAD_BYTES, the oldest (of both kinds) go, counted in dead_dropped. Run
-- before the new one is indexed, so it never drops the dead letter being made.
local function trim_dead(size)
  local count = redis.call('ZCARD', K_DEAD_FAILED) + redis.call('ZCARD', K_DEAD_EXPIRED)
  local bytes = tonumber(redis.call('HGET', K_STATS, 'dead_bytes') or '0')
  while count > 0 and (count >= MAX_DEAD or bytes + size > MAX_DEAD_BYTES) do
    local f = redis.call('ZRANGE', K_DEAD_FAILED, 0, 0, 'WITHSCORES')
    local e = redis.call('ZRANGE', K_DEAD_EXPIRED, 0, 0, 'WITHSCORES')
    local key = K_DEAD_FAILED
    if #f == 0 or (#e > 0 and tonumber(e[2]) < tonumber(f[2])) then
      key, f = K_DEAD_EXPIRED, e
    end
    local r = load(f[1])
    if r then
      purge(r)
      bytes = bytes - r.size
    else
      redis.call('ZREM', key, f[1])
    end
    redis.call('HINCRBY', K_STATS, 'dead_dropped', 1)
    count = count - 1
  end
end

-- A script that settles many requests in one run (complete.lua) sets DEFER to a fresh table:
-- to_terminal then leaves each request's index and counter updates in it, and
-- flush_deferred applies them all in one call per key before the script returns.
local DEFER
-- Whether to_terminal keeps the record it leaves (r.snapshot, the settle's reply); complete.lua
-- clears it for a settle whose caller wants no record.
local SNAPSHOT

local function defer_start()
  DEFER = {leases = {}, retained = {}, counts = {}, bytes = 0}
end

local function flush_deferred()
  local d = DEFER
  DEFER = nil
  zrem_many(K_LEASES, d.leases)
  zadd_many(K_RETAINED, d.retained)
  for status, count in pairs(d.counts) do
    redis.call('HINCRBY', K_STATS, status, count)
  end
  if d.bytes ~= 0 then
    redis.call('HINCRBY', K_STATS, 'bytes', -d.bytes)
  end
end

-- settled_by: which op and token ended the request's last lease ('complete:<lease_id>',
-- 'fail:<lease_id>', 'cancel:<call token>'), so the same call run again is recognised.
local function to_terminal(r, status, reason, settled_by)
  local dead = is_dead(status, reason) and DEAD_RETENTION > 0 and MAX_DEAD > 0
    and MAX_DEAD_BYTES > 0
  if dead and r.size > MAX_DEAD_BYTES then
    -- Larger than all dead letters may hold: dropped at once (metadata kept, as retained).
    redis.call('HINCRBY', K_STATS, 'dead_dropped', 1)
    dead = false
  end
  local purge_at = clamp_time(NOW + (dead and DEAD_RETENTION or RETENTION))
  local purge_s = fmt(purge_at) -- formatted once: '%.17g' is one of a settle's costlier steps
  -- Only metadata outlives the request; lease_id stays so a repeated complete is recognised.
  -- Every field that goes in one HDEL and every field that changes in one HSET: each
  -- redis.call is a good part of what a settle costs Redis.
  local gone = {'payload', 'lease_expires_at'}
  local set = {'status', status, 'updated_at', NOW_S, 'purge_at', purge_s}
  if r.status == 'queued' then
    redis.call('ZREM', K_PENDING, r.id)
    redis.call('ZREM', K_DELAYED, r.id)
    redis.call('ZREM', K_EXPIRY, r.id)
    gone[#gone + 1] = 'not_before'
  elseif DEFER then
    DEFER.leases[#DEFER.leases + 1] = r.id
  else
    redis.call('ZREM', K_LEASES, r.id)
  end
  if reason then
    set[#set + 1] = 'reason'
    set[#set + 1] = reason
  else
    gone[#gone + 1] = 'reason'
  end
  if settled_by then
    set[#set + 1] = 'settled_by'
    set[#set + 1] = settled_by
  end
  redis.call('HDEL', r.key, unpack(gone))
  if not dead then
    redis.call('DEL', body_key(r.key))
  end
  redis.call('HSET', r.key, unpack(set))
  if DEFER then
    DEFER.counts[status] = (DEFER.counts[status] or 0) + 1
    DEFER.bytes = DEFER.bytes + r.size
  else
    redis.call('HINCRBY', K_STATS, status, 1)
    redis.call('HINCRBY', K_STATS, 'bytes', -r.size)
  end
  if SNAPSHOT then
    r.snapshot = redis.call('HGETALL', r.key)
  end
  r.status = status
  r.purge_at = purge_at
  if purge_at <= NOW then
    purge(r) -- a retention of 0: the reply (the snapshot) is the last time it is seen
  elseif dead then
    -- Kept with its payload; indexed by kind, after the oldest made room. No native TTL: only
    -- a script forgets it (the sweep at purge_at, a trim, a purge), reading its size from the
    -- hash, so dead_bytes stays exact (the caps bound what waits for a sweep).
    trim_dead(r.size)
    redis.call('ZADD', dead_key(status), purge_s, r.id)
    redis.call('HINCRBY', K_STATS, 'dead_bytes', r.size)
  else
    if DEFER then
      DEFER.retained[#DEFER.retained + 1] = purge_s
      DEFER.retained[#DEFER.retained + 1] = r.id
    else
      redis.call('ZADD', K_RETAINED, purge_s, r.id)
    end
    expire_in(r.key, purge_at - NOW)
  end
end

local function to_expired(r)
  local age = NOW - r.created_at
  local worst = tonumber(redis.call('HGET', K_STATS, 'max_expired_age_s'))
  if not worst or age > worst then
    redis.call('HSET', K_STATS, 'max_expired_age_s', fmt(age))
  end
  to_terminal(r, 'expired', 'ttl_elapsed', false)
end

local function pending_add(r)
  redis.call('ZADD', K_PENDING, string.format('%d', r.priority * SHIFT + r.seq), r.id)
end

-- Back in line with its original seq, ahead of younger requests of the same priority; with a
-- not_before time (text) after NOW, held in the delayed zset until then (promote_delayed).
local function to_requeued(r, reason, settled_by, not_before)
  redis.call('ZREM', K_LEASES, r.id)
  redis.call('HDEL', r.key, 'lease_id', 'lease_expires_at')
  redis.call('HSET', r.key, 'status', 'queued', 'updated_at', NOW_S, 'reason', reason)
  if settled_by then
    redis.call('HSET', r.key, 'settled_by', settled_by)
  end
  if not_before and tonumber(not_before) > NOW then
    redis.call('HSET', r.key, 'not_before', not_before)
    redis.call('ZADD', K_DELAYED, not_before, r.id)
  else
    pending_add(r)
  end
  redis.call('ZADD', K_EXPIRY, ms_score(r.expires_at), r.id)
  r.status = 'queued'
end

-- Move up to `limit` delayed requests whose time has come into pending, keeping their seq, so
-- they take their old place in line. Idempotent: a second run finds nothing due.
local function promote_delayed(limit)
  local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', NOW_S, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    redis.call('ZREM', K_DELAYED, id)
    local r = load(id)
    if r and r.status == 'queued' then
      redis.call('HDEL', r.key, 'not_before')
      pending_add(r)
    end
  end
  return #due
end

-- A lease ran out: expired if past its TTL, queued again while attempts remain, else failed.
-- Returns which of the three happened.
local function lapse(r)
  if r.expires_at <= NOW then
    to_expired(r)
    return 'expired'
  elseif r.attempts < r.max_attempts then
    to_requeued(r, 'lease_expired', false)
    return 'requeued'
  end
  to_terminal(r, 'failed', 'attempts_exhausted: lease_expired', false)
  return 'failed'
end

-- Apply whatever is due for one request (expiry, lease lapse, end of retention) at NOW.
-- Returns the record, or nil when its retention has ended.
local function settle_due(r)
  if r.status == 'queued' and r.expires_at <= NOW then
    to_expired(r)
  elseif r.status == 'processing' and r.lease_expires_at and r.lease_expires_at <= NOW then
    lapse(r)
  end
  if r.purge_at and r.purge_at <= NOW then
    if not r.snapshot then
      purge(r)
      return nil
    end
    -- It became terminal in this very call (a retention of 0): answer with its snapshot.
  end
  return r
end

local function load_live(id, key)
  local r = load(id, key)
  if r then
    r = settle_due(r)
  end
  return r
end

-- The checks every settle of a lease makes, in the contract's order.
local function check_leased(r, lease_id)
  if not r then
    return {ERR_NOT_FOUND}
  end
  if r.status ~= 'processing' then
    return {ERR_INVALID_STATE, r.status}
  end
  if r.lease_id ~= lease_id then
    return {ERR_LEASE_MISMATCH}
  end
  return nil
end

-- The same settle run again (a resent pipeline, or a client repeating it): the request left
-- the lease this token ended, so answer with the record as it is now.
local function repeated(r, settled_by)
  return r and r.settled_by == settled_by and r.status ~= 'processing'
end

-- Reclaim up to `limit` lapsed leases; returns {expired, requeued, failed}.
local function reclaim_leases(limit)
  local counts = {expired = 0, requeued = 0, failed = 0}
  local due = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', NOW_MS, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    local r = load(id)
    if not r then
      drop_orphan(id, false)
      counts.expired = counts.expired + 1
    elseif r.status == 'processing' and r.lease_expires_at and r.lease_expires_at <= NOW then
      local what = lapse(r)
      counts[what] = counts[what] + 1
    elseif r.status == 'processing' and r.lease_expires_at then
      -- A live lease scored in seconds (by a version before millisecond scores): indexed
      -- again at its end, never dropped, or it would not be reclaimed if its worker died.
      redis.call('ZADD', K_LEASES, ms_score(r.lease_expires_at), id)
    else
      redis.call('ZREM', K_LEASES, id) -- stale entry: the request moved on
    end
  end
  return counts
end

-- Expire up to `limit` queued requests past their TTL; returns how many.
local function expire_queued(limit)
  local n = 0
  local due = redis.call('ZRANGEBYSCORE', K_EXPIRY, '-inf', NOW_MS, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    local r = load(id)
    if not r then
      drop_orphan(id, false)
      n = n + 1
    elseif r.status == 'queued' and r.expires_at <= NOW then
      to_expired(r)
      n = n + 1
    elseif r.status == 'queued' then
      -- Scored in seconds by a version before millisecond scores: indexed again at its
      -- expiry, never dropped, or the sweep would not expire it.
      redis.call('ZADD', K_EXPIRY, ms_score(r.expires_at), id)
    else
      redis.call('ZREM', K_EXPIRY, id)
    end
  end
  return n
end

-- Forget up to `limit` terminal records of one index whose retention ended; returns how many.
local function purge_index(key, limit)
  local due = redis.call('ZRANGEBYSCORE', key, '-inf', NOW_S, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    local r = load(id)
    if r and r.purge_at and r.purge_at <= NOW then
      purge(r)
    else
      -- Gone already (Redis's own TTL), or a stale entry: only the index entry remains.
      redis.call('ZREM', key, id)
    end
  end
  return #due
end

local function purge_retained(limit)
  return purge_index(K_RETAINED, limit) + purge_index(K_DEAD_FAILED, limit)
    + purge_index(K_DEAD_EXPIRED, limit)
end

-- One full sweep step; returns {expired, requeued, failed, purged}.
local function sweep(limit)
  local expired = expire_queued(limit)
  promote_delayed(limit)
  local leases = reclaim_leases(limit)
  local purged = purge_retained(limit)
  return {expired + leases.expired, leases.requeued, leases.failed, purged}
end

-- The start of every call: its keys and arguments, and the state derived from them.
local function begin(keys, args)
  KEYS, ARGV = keys, args
  K_PENDING, K_LEASES, K_EXPIRY, K_RETAINED = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  K_SEQ, K_STATS, K_REQ, K_DELAYED = KEYS[5], KEYS[6], KEYS[8], KEYS[9]
  K_DEAD_FAILED, K_DEAD_EXPIRED = KEYS[10], KEYS[11]
  NOW, NOW_S = arg_time(1, 'now')
  -- Entries whose score is at most this may be due (whether one is, its hash's time decides).
  NOW_MS = string.format('%d', math.floor(NOW * 1000))
  local r, d, m, b = string.match(ARGV[2] or '', '^([^,]*),([^,]*),([^,]*),([^,]*)$')
  if not r then
    r, d, m = string.match(ARGV[2] or '', '^([^,]*),([^,]*),([^,]*)$')
    b = '9e18' -- no byte cap (a caller before max_dead_bytes)
  end
  if r then
    RETENTION, DEAD_RETENTION, MAX_DEAD = tonumber(r), tonumber(d), tonumber(m)
    MAX_DEAD_BYTES = tonumber(b)
    if not (RETENTION and DEAD_RETENTION and MAX_DEAD and MAX_DEAD_BYTES) or DEAD_RETENTION < 0
      or MAX_DEAD < 0 or MAX_DEAD_BYTES < 0 or DEAD_RETENTION ~= DEAD_RETENTION then
      fail_arg(2, 'retention_s,dead_retention_s,max_dead,max_dead_bytes')
    end
  else
    RETENTION = arg_number(2, 'retention_s')
    DEAD_RETENTION, MAX_DEAD, MAX_DEAD_BYTES = RETENTION, 0, 0 -- no dead letters, as before
  end
  if not RETENTION or RETENTION < 0 or RETENTION ~= RETENTION then
    fail_arg(2, 'retention_s')
  end
  DEFER = nil
  SNAPSHOT = true
end
