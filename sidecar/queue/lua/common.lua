-- common.lua: shared helpers, prepended to every other script when it is loaded.
--
-- KEYS (the same for every script; see sidecar/queue/redis_keys.py):
--   1 pending (zset: queue_id by priority * 2^48 + seq)   2 leases (zset: queue_id by lease end)
--   3 expiry (zset: queued queue_id by expires_at)         4 retained (zset: terminal queue_id by purge time)
--   5 seq (string counter)   6 stats (hash of counters)   7 generation (string marker)
-- ARGV (the same first three for every script):
--   1 the request hash key prefix, e.g. "{sidecar}:req:" (request keys share the hash tag, so
--     building them here keeps every key of a call in one cluster slot)
--   2 now, epoch seconds from the caller's clock: every expiry, lease and retention decision
--     uses it, so hosts sharing one Redis need synchronised clocks
--   3 retention_s, how long a terminal record stays readable
-- Return codes (first element of every reply): 0 ok, -1 not found, -2 invalid state (the
-- second element is the current status), -3 lease mismatch.

local K_PENDING, K_LEASES, K_EXPIRY, K_RETAINED = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_SEQ, K_STATS = KEYS[5], KEYS[6]
local REQ = ARGV[1]
local NOW_S = ARGV[2]
local NOW = tonumber(NOW_S)
local RETENTION = tonumber(ARGV[3])

local OK, ERR_NOT_FOUND, ERR_INVALID_STATE, ERR_LEASE_MISMATCH = 0, -1, -2, -3
local SHIFT = 281474976710656 -- 2^48: priority sits above the 48 bits of seq
-- A pending hash outlives its logical expiry by this much, so the sweep (not Redis's own
-- TTL) always moves it to "expired" first and the books stay balanced.
local GRACE_S = 3600

local function fmt(x)
  return string.format('%.17g', x)
end

local function expire_at(key, t)
  redis.call('PEXPIREAT', key, string.format('%d', math.ceil(t * 1000)))
end

local function load(id)
  local key = REQ .. id
  local v = redis.call('HMGET', key, 'status', 'priority', 'seq', 'expires_at', 'created_at',
    'attempts', 'max_attempts', 'lease_id', 'lease_expires_at', 'purge_at', 'size_bytes')
  if not v[1] then
    return nil
  end
  return {
    id = id, key = key, status = v[1], priority = tonumber(v[2]), seq = tonumber(v[3]),
    expires_s = v[4], expires_at = tonumber(v[4]), created_at = tonumber(v[5]),
    attempts = tonumber(v[6]), max_attempts = tonumber(v[7]), lease_id = v[8],
    lease_expires_at = tonumber(v[9]), purge_at = tonumber(v[10]), size = tonumber(v[11]),
  }
end

local function record(r)
  return redis.call('HGETALL', r.key)
end

-- An index entry whose hash is gone (Redis's own TTL won the race): count it as expired once.
local function drop_orphan(id, was_pending)
  local removed = redis.call('ZREM', K_PENDING, id) + redis.call('ZREM', K_LEASES, id)
  redis.call('ZREM', K_EXPIRY, id)
  if was_pending or removed > 0 then
    redis.call('HINCRBY', K_STATS, 'expired', 1)
  end
end

local function purge(r)
  redis.call('DEL', r.key)
  redis.call('ZREM', K_RETAINED, r.id)
end

local function to_terminal(r, status, reason)
  if r.status == 'queued' then
    redis.call('ZREM', K_PENDING, r.id)
    redis.call('ZREM', K_EXPIRY, r.id)
  else
    redis.call('ZREM', K_LEASES, r.id)
  end
  local purge_at = NOW + RETENTION
  -- Only metadata outlives the request; lease_id stays so a repeated complete is recognised.
  redis.call('HDEL', r.key, 'payload', 'lease_expires_at')
  if reason then
    redis.call('HSET', r.key, 'reason', reason)
  else
    redis.call('HDEL', r.key, 'reason')
  end
  redis.call('HSET', r.key, 'status', status, 'updated_at', NOW_S, 'purge_at', fmt(purge_at))
  redis.call('HINCRBY', K_STATS, status, 1)
  redis.call('HINCRBY', K_STATS, 'bytes', -r.size)
  redis.call('ZADD', K_RETAINED, fmt(purge_at), r.id)
  expire_at(r.key, purge_at)
  r.status = status
  r.purge_at = purge_at
end

local function to_expired(r)
  local age = NOW - r.created_at
  local worst = tonumber(redis.call('HGET', K_STATS, 'max_expired_age_s'))
  if not worst or age > worst then
    redis.call('HSET', K_STATS, 'max_expired_age_s', fmt(age))
  end
  to_terminal(r, 'expired', 'ttl_elapsed')
end

-- Back in line with its original seq, ahead of younger requests of the same priority.
local function to_requeued(r, reason)
  redis.call('ZREM', K_LEASES, r.id)
  redis.call('HDEL', r.key, 'lease_id', 'lease_expires_at')
  redis.call('HSET', r.key, 'status', 'queued', 'updated_at', NOW_S, 'reason', reason)
  redis.call('ZADD', K_PENDING, string.format('%d', r.priority * SHIFT + r.seq), r.id)
  redis.call('ZADD', K_EXPIRY, r.expires_s, r.id)
  r.status = 'queued'
end

-- A lease ran out: expired if past its TTL, queued again while attempts remain, else failed.
-- Returns which of the three happened.
local function lapse(r)
  if r.expires_at <= NOW then
    to_expired(r)
    return 'expired'
  elseif r.attempts < r.max_attempts then
    to_requeued(r, 'lease_expired')
    return 'requeued'
  end
  to_terminal(r, 'failed', 'attempts_exhausted: lease_expired')
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
    purge(r)
    return nil
  end
  return r
end

local function load_live(id)
  local r = load(id)
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

-- Reclaim up to `limit` lapsed leases; returns {expired, requeued, failed}.
local function reclaim_leases(limit)
  local counts = {expired = 0, requeued = 0, failed = 0}
  local due = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', NOW_S, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    local r = load(id)
    if not r then
      drop_orphan(id, false)
      counts.expired = counts.expired + 1
    elseif r.status == 'processing' and r.lease_expires_at and r.lease_expires_at <= NOW then
      local what = lapse(r)
      counts[what] = counts[what] + 1
    else
      redis.call('ZREM', K_LEASES, id) -- stale entry: the request moved on
    end
  end
  return counts
end

-- Expire up to `limit` queued requests past their TTL; returns how many.
local function expire_queued(limit)
  local n = 0
  local due = redis.call('ZRANGEBYSCORE', K_EXPIRY, '-inf', NOW_S, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    local r = load(id)
    if not r then
      drop_orphan(id, false)
      n = n + 1
    elseif r.status == 'queued' and r.expires_at <= NOW then
      to_expired(r)
      n = n + 1
    else
      redis.call('ZREM', K_EXPIRY, id)
    end
  end
  return n
end

-- Forget up to `limit` terminal records whose retention ended; returns how many.
local function purge_retained(limit)
  local due = redis.call('ZRANGEBYSCORE', K_RETAINED, '-inf', NOW_S, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    local r = load(id)
    if r and r.purge_at and r.purge_at <= NOW then
      purge(r)
    else
      -- Gone already (Redis's own TTL), or a stale entry: only the index entry remains.
      redis.call('ZREM', K_RETAINED, id)
    end
  end
  return #due
end

-- One full sweep step; returns {expired, requeued, failed, purged}.
local function sweep(limit)
  local expired = expire_queued(limit)
  local leases = reclaim_leases(limit)
  local purged = purge_retained(limit)
  return {expired + leases.expired, leases.requeued, leases.failed, purged}
end
