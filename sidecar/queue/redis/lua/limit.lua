-- limit.lua: the fleet's limiter, one scope per call (sidecar/queue/limit/gcra.py is the same
-- rules in Python, and protocol.md 8.14-8.17 the normative text).
-- KEYS: the eleven of common.lua (unused here); 12 the scope's hash, `{prefix}:limit:<scope>`.
-- ARGV: 1-2 as in common.lua (unused: the limiter's clock is Redis's TIME, so every host
--   agrees); 3 the op, then its arguments:
--   acquire  4 rpm, 5 tpm, 6 requests, 7 tokens, 8 fresh (0/1), 9 drain_share, 10 ramp_s
--   settle   4 tpm, 5 tokens_delta
--   pause    4 pause_s
--   report   4 ok (0/1), 5 probe (0/1), 6 failures, 7 reset_s
-- Returns: acquire {granted 0/1, wait_us, probe 0/1, reason}; settle {0}; pause {paused_until_us};
--   report {state}.
-- The hash holds integers, times in microseconds since the epoch (fields as gcra.ScopeState):
-- r, t the TATs of the requests and tokens limits; dr, dt the drain's own; f fresh traffic last
-- seen; w a fresh ask refused and not granted since (0: none waits); p paused until; n unavailable outcomes in a row; o open until (0 closed, past:
-- half-open); h the probe's lease; rs the slow start's beginning. The key expires by itself
-- (PEXPIRE) once every time it holds is past, plus IDLE_KEEP. Run twice (a resent pipeline), an
-- acquire takes its costs twice: never more than a resent call would.
local L_US = 1000000
local L_MINUTE = 60 * L_US
local L_BURST = 250000
local L_FRESH_WINDOW = 5 * L_US
local L_FRESH_HEADROOM = 125000
local L_PROBE_LEASE = 30 * L_US
local L_PROBING_RECHECK = 1 * L_US
local L_RAMP_FLOOR = 0.1
local L_MAX_AHEAD = 86400 * L_US
local L_IDLE_KEEP = 300 * L_US
local L_BREAKER_KEEP = 3600 * L_US
local L_MAX_RAMP = 3600 * L_US
local FIELDS = {'r', 't', 'dr', 'dt', 'f', 'w', 'p', 'n', 'o', 'h', 'rs'}

local key = KEYS[NKEYS + 1]
local op = arg_text(3, 'op')
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * L_US + tonumber(clock[2])

local function whole(x)
  return math.floor(x + 0.5)
end

local function fmt_int(x)
  return string.format('%d', x)
end

-- Each op's arguments, checked before anything is read or written.
local a = {}
if op == 'acquire' then
  a.rpm = arg_number(4, 'rpm')
  a.tpm = arg_number(5, 'tpm')
  a.requests = arg_number(6, 'requests')
  a.tokens = arg_number(7, 'tokens')
  a.fresh = arg_int(8, 'fresh', 0, 1) == 1
  a.share = arg_number(9, 'drain_share')
  a.ramp = arg_number(10, 'ramp_s')
  if a.rpm < 0 or a.tpm < 0 or a.requests < 0 or a.tokens < 0 or a.ramp < 0 then
    fail_arg(4, 'acquire arguments')
  end
  if a.share <= 0 or a.share > 1 then
    fail_arg(9, 'drain_share')
  end
elseif op == 'settle' then
  a.tpm = arg_number(4, 'tpm')
  a.delta = arg_number(5, 'tokens_delta')
elseif op == 'pause' then
  a.pause = arg_number(4, 'pause_s')
  if a.pause < 0 or a.pause > 86400 then
    fail_arg(4, 'pause_s')
  end
elseif op == 'report' then
  a.ok = arg_int(4, 'ok', 0, 1) == 1
  a.probe = arg_int(5, 'probe', 0, 1) == 1
  a.failures = arg_int(6, 'failures', 1, 1000)
  a.reset = arg_number(7, 'reset_s')
  if a.reset <= 0 or a.reset > 86400 then
    fail_arg(7, 'reset_s')
  end
else
  fail_arg(3, 'op')
end

local s = {}
local stored = redis.call('HMGET', key, unpack(FIELDS))
for i, name in ipairs(FIELDS) do
  s[name] = tonumber(stored[i]) or 0
end

local function save()
  local flat = {}
  for _, name in ipairs(FIELDS) do
    flat[#flat + 1] = name
    flat[#flat + 1] = fmt_int(s[name])
  end
  redis.call('HSET', key, unpack(flat))
  local latest = math.max(s.r, s.t, s.dr, s.dt, s.p, s.h, math.max(s.f, s.w) + L_FRESH_WINDOW, now)
  if s.o ~= 0 then
    latest = math.max(latest, s.o + L_BREAKER_KEEP)
  end
  if s.rs ~= 0 then
    latest = math.max(latest, s.rs + L_MAX_RAMP)
  end
  redis.call('PEXPIRE', key, fmt_int(math.ceil((latest + L_IDLE_KEEP - now) / 1000)))
end

local function breaker()
  if s.o == 0 then
    return 'closed'
  end
  if s.o > now then
    return 'open'
  end
  return 'half_open'
end

local function advance(tat, cost)
  return math.min(math.max(tat, now) + whole(cost), now + L_MAX_AHEAD)
end

-- A limit under the slow start: its share, at least 1 per minute (never above the limit).
local function limited(per_minute, ramp)
  return math.max(per_minute * ramp, math.min(per_minute, 1))
end

local function acquire()
  local changed = false
  if a.fresh then
    s.f = now
    changed = true
  end
  local blocked = math.max(s.p, s.o)
  if blocked > now then
    if changed then
      save()
    end
    return {0, blocked - now, 0, (s.p >= s.o) and 'paused' or 'breaker_open'}
  end
  local half_open = s.o ~= 0
  if half_open and s.h > now then
    if changed then
      save()
    end
    return {0, math.min(s.h - now, L_PROBING_RECHECK), 0, 'probing'}
  end
  local ramp = 1
  if s.rs ~= 0 then
    local span = a.ramp * L_US
    if span <= 0 or now - s.rs >= span then
      s.rs = 0
      changed = true
    else
      ramp = L_RAMP_FLOOR + (1 - L_RAMP_FLOOR) * math.max(0, now - s.rs) / span
    end
  end
  local dims = {}
  if a.rpm > 0 then
    dims[#dims + 1] = {'requests', 'r', a.requests * L_MINUTE / limited(a.rpm, ramp)}
  end
  if a.tpm > 0 then
    dims[#dims + 1] = {'tokens', 't', a.tokens * L_MINUTE / limited(a.tpm, ramp)}
  end
  local fresh_seen = (not a.fresh) and s.f ~= 0 and now - s.f < L_FRESH_WINDOW
  local held = fresh_seen and s.w ~= 0 and now - s.w < L_FRESH_WINDOW and a.share < 1
  local headroom = (fresh_seen and not held) and L_FRESH_HEADROOM or 0
  if held then
    local n = #dims
    for i = 1, n do
      dims[#dims + 1] = {'drain_share', 'd' .. dims[i][2], dims[i][3] / a.share}
    end
  end
  local wait, why = 0, ''
  for _, d in ipairs(dims) do
    local allowed_at = s[d[2]] - math.max(L_BURST - d[3], 0)
    if d[2] == 'r' or d[2] == 't' then
      allowed_at = allowed_at + headroom
    end
    if allowed_at - now > wait then
      wait, why = math.ceil(allowed_at - now), d[1]
    end
  end
  if wait > 0 then
    if a.fresh then
      s.w = now -- live traffic is waiting for the budget: the drain is held to its share
      changed = true
    end
    if changed then
      save()
    end
    return {0, wait, 0, why}
  end
  for _, d in ipairs(dims) do
    s[d[2]] = advance(s[d[2]], d[3])
  end
  if a.fresh then
    s.w = 0 -- no live traffic waits any more
  end
  if half_open then
    s.h = now + L_PROBE_LEASE
    save()
    return {1, 0, 1, ''}
  end
  save()
  return {1, 0, 0, ''}
end

if op == 'acquire' then
  return acquire()
elseif op == 'settle' then
  if a.tpm > 0 and a.delta ~= 0 then
    s.t = math.max(now, advance(s.t, a.delta * L_MINUTE / a.tpm))
    save()
  end
  return {0}
elseif op == 'pause' then
  s.p = math.max(s.p, now + whole(a.pause * L_US))
  save()
  return {math.max(s.p, now)}
end
-- report
local state = breaker()
if state == 'half_open' and a.probe then
  s.h = 0
  if a.ok then
    s.o, s.n, s.rs = 0, 0, now
  else
    s.o = now + whole(a.reset * L_US)
  end
elseif state == 'closed' then
  if a.ok then
    s.n = 0
  else
    s.n = s.n + 1
  end
  if s.n >= a.failures then
    s.o, s.n, s.h = now + whole(a.reset * L_US), 0, 0
  end
end
save()
return {breaker()}
