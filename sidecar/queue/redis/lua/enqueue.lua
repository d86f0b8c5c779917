-- enqueue.lua: store a batch of new requests (status queued); an existing queue_id is returned
-- as it is, never stored twice, so a retried write or a repeated migration is harmless.
-- KEYS: the eleven of common.lua, then 12.. the hash of each request in the batch, in order.
-- ARGV: 1-2 as in common.lua; 3 n (requests in the batch); then seven or eight per request
--   (the same for the whole batch: eight when #ARGV is 3 + 8n), starting at 4 + (i - 1) * per:
--   queue_id, priority, created_at, expires_at, max_attempts, payload (opaque bytes, never
--   decoded here), attempts (0 for a new request; the deliveries a request moved from the
--   local queue already had), and the eighth, not_before: "0" for none, else epoch seconds
--   before which a new request is not handed out (a request moved from the local queue while
--   a `fail` with delay_s holds it back): it waits in the delayed zset, as after fail.lua.
--   Seven per request is the layout before not_before, still accepted.
-- Returns: {0, items}; items[i] = {1, seq} when this call created request i, or {0, record}
--   (HGETALL field/value pairs) when it already existed (a repeat inside the batch included).
--   Run twice (a resent pipeline), the second run stores nothing and answers {0, record}: the
--   caller then reads created = false for a request its own call created. Telling the two
--   apart would need a per-call marker; one copy is what matters, so it is left so.
-- Raises (before any write) when an argument is not what the contract allows.
local n = arg_int(3, 'n', 0, 1000000)
if #KEYS ~= NKEYS + n then
  error({err = 'ERR sidecar: enqueue of ' .. n .. ' requests needs ' .. (NKEYS + n) .. ' keys'})
end
local per = 7
if n > 0 and #ARGV >= 3 + 8 * n then
  per = 8
end
-- Every item is checked before the first write. Its times are kept as parsed (in two flat
-- arrays: a table per item, or a formatted copy of each time, costs Redis more); held[i] is
-- the not_before text of an item held back past NOW.
local created, expires, held = {}, {}, {}
for i = 1, n do
  local base = 4 + (i - 1) * per
  local max_attempts = arg_int(base + 4, 'max_attempts', 1, 2147483647)
  arg_int(base + 1, 'priority', 0, 9)
  arg_int(base + 6, 'attempts', 0, max_attempts)
  created[i] = arg_number(base + 2, 'created_at')
  expires[i] = arg_number(base + 3, 'expires_at')
  arg_text(base, 'queue_id')
  arg_text(base + 5, 'payload')
  if per == 8 and ARGV[base + 7] ~= '0' then
    local t, text = arg_time(base + 7, 'not_before')
    if t > NOW then
      held[i] = text
    end
  end
end
-- A checked time as stored: the caller's own text when it is a plain decimal number (the
-- daemon sends the shortest text that reads back as the same number), else (hex, spaces, a time
-- past MAX_TIME) the number formatted here, as every reader parses it.
local function time_text(text, t)
  if t > MAX_TIME or string.find(text, '[^%d%.%-+eE]') then
    return fmt(clamp_time(t))
  end
  return text
end
-- A checked whole number as stored: the caller's text when it is plain digits, else the number
-- formatted. Never a Lua number handed to redis.call, which Lua formats with '%.14g': float
-- formatting was a twelfth of Redis's work per enqueue (callgrind).
local function int_text(text)
  if string.find(text, '^%d+$') then
    return text
  end
  return string.format('%d', tonumber(text))
end
-- Which items are new (a queue_id already stored, or repeated earlier in the batch, is not),
-- so the whole batch takes its seqs in one INCRBY and its index entries in one ZADD each.
local items, new, repeats = {}, {}, {}
local seen = {}
for i = 1, n do
  local base = 4 + (i - 1) * per
  local id, key = ARGV[base], KEYS[NKEYS + i]
  local r = redis.call('EXISTS', key) == 1 and load_live(id, key)
  if r then
    items[i] = {0, record(r)}
  elseif seen[id] then
    repeats[#repeats + 1] = i -- answered below with the record its first occurrence stores
  else
    seen[id] = true
    new[#new + 1] = i
  end
end
if #new > 0 then
  local seq = redis.call('INCRBY', K_SEQ, #new) - #new
  local pending, expiry, delayed, bytes = {}, {}, {}, 0
  for _, i in ipairs(new) do
    local base = 4 + (i - 1) * per
    local id, key, payload = ARGV[base], KEYS[NKEYS + i], ARGV[base + 5]
    local priority, expires_s = tonumber(ARGV[base + 1]), time_text(ARGV[base + 3], expires[i])
    seq = seq + 1
    -- No native TTL while pending: the sweep, not Redis, moves it to expired (common.lua).
    redis.call('HSET', key, 'queue_id', id, 'priority', int_text(ARGV[base + 1]),
      'seq', string.format('%d', seq),
      'created_at', time_text(ARGV[base + 2], created[i]), 'expires_at', expires_s,
      'status', 'queued',
      'attempts', int_text(ARGV[base + 6]), 'max_attempts', int_text(ARGV[base + 4]),
      'updated_at', NOW_S, 'size_bytes', string.format('%d', #payload))
    redis.call('SET', body_key(key), payload)
    if held[i] then
      -- Held back: delayed until not_before, then promoted into pending with this seq.
      redis.call('HSET', key, 'not_before', held[i])
      delayed[#delayed + 1] = held[i]
      delayed[#delayed + 1] = id
    else
      pending[#pending + 1] = string.format('%d', priority * SHIFT + seq)
      pending[#pending + 1] = id
    end
    expiry[#expiry + 1] = ms_score(expires[i])
    expiry[#expiry + 1] = id
    bytes = bytes + #payload
    items[i] = {1, seq}
  end
  zadd_many(K_PENDING, pending)
  zadd_many(K_DELAYED, delayed)
  zadd_many(K_EXPIRY, expiry)
  redis.call('HINCRBY', K_STATS, 'accepted', #new)
  redis.call('HINCRBY', K_STATS, 'bytes', bytes)
end
for _, i in ipairs(repeats) do
  items[i] = {0, pairs_of(KEYS[NKEYS + i])}
end
return {OK, items}
