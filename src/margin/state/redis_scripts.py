"""Lua for RedisState: one script per State method, each a line-by-line port of MemoryState so the
two backends return the same values (the differential test in tests/test_state_redis.py checks it).

Per counter key K (P = prefix), mirroring memory._Counter:
  P c:K  hash   exp (logical expiry), spent, tot (sum of live reservations), lvl/lat (bucket level, time)
  P r:K  hash   rid -> reserved amount
  P l:K  zset   rid -> lapse time
  P w:K  hash   rolling sub-bucket index -> spent
  P res:<rid>   string, the holds of a live reservation (JSON written by Python, read with cjson)
Holds are JSON arrays [key, kind, limit, amount, expires_at, window_s]. Numbers cross the boundary
as strings formatted %.17g (Python repr on the way in), so doubles round-trip exactly and the Lua
arithmetic, done in the same order as the Python, gives bit-identical bucket levels.
Logical expiry (`exp <= now`, with the caller's clock) decides resets; PEXPIREAT is only garbage
collection, set a little after `exp` so Redis never drops a counter that is still logically alive.
"""

from __future__ import annotations

ROLLING_BUCKETS = 60  # must match margin.state.memory.ROLLING_BUCKETS
EXPIRY_SLACK_S = 60  # physical expiry after logical expiry: tolerates clock skew between replicas

_PRELUDE = """
local P = ARGV[1]
local NOW = tonumber(ARGV[2])
local ROLLING = __ROLLING__
local SLACK = __SLACK__
local touched, order = {}, {}

local function fmt(x) return string.format('%.17g', x) end
local function ifmt(x) return string.format('%d', x) end  -- integers: HINCRBY rejects '-0' and '1e+16'

local function names(k) return P .. 'c:' .. k, P .. 'r:' .. k, P .. 'l:' .. k, P .. 'w:' .. k end

-- memory._Counter.prune for a budget hold: lapse reservations, drop sub-buckets out of the window
local function prune(k, win)
  local c, r, l, w = names(k)
  local gone = redis.call('ZRANGEBYSCORE', l, '-inf', fmt(NOW))
  if #gone > 0 then
    local sum = 0
    for _, rid in ipairs(gone) do
      sum = sum + (tonumber(redis.call('HGET', r, rid)) or 0)
      redis.call('HDEL', r, rid)
    end
    redis.call('ZREMRANGEBYSCORE', l, '-inf', fmt(NOW))
    redis.call('HINCRBY', c, 'tot', ifmt(-sum))
  end
  if win ~= 0 then
    local oldest = math.floor((NOW - win) / (win / ROLLING))
    for _, idx in ipairs(redis.call('HKEYS', w)) do
      if tonumber(idx) <= oldest then redis.call('HDEL', w, idx) end
    end
  end
end

-- MemoryState._get: reset an absent or expired counter, extend its life, prune budget counters
local function get(h)
  local k = h[1]
  local c, r, l, w = names(k)
  local exp = tonumber(redis.call('HGET', c, 'exp'))
  if exp == nil or exp <= NOW then
    redis.call('DEL', c, r, l, w)
    exp = 0
  end
  exp = math.max(exp, h[5])
  redis.call('HSET', c, 'exp', fmt(exp))
  if touched[k] == nil then order[#order + 1] = k end
  touched[k] = exp
  if h[2] == 'budget' then prune(k, h[6]) end
end

-- memory._Counter.state: {spent in the window (or period), reserved}
local function state(k, win)
  local c, r, l, w = names(k)
  local spent = 0
  if win ~= 0 then
    for _, v in ipairs(redis.call('HVALS', w)) do spent = spent + tonumber(v) end
  else
    spent = tonumber(redis.call('HGET', c, 'spent')) or 0
  end
  return spent, tonumber(redis.call('HGET', c, 'tot')) or 0
end

local function level(c)
  local v = redis.call('HMGET', c, 'lvl', 'lat')
  return tonumber(v[1]) or -1, tonumber(v[2]) or 0  -- -1: full, first use (as in memory)
end

-- memory._Counter.refill
local function refill(h)
  local c = P .. 'c:' .. h[1]
  local lvl, lat = level(c)
  if lvl < 0 then lvl, lat = h[3], NOW end
  lvl = math.min(h[3], lvl + (NOW - lat) * h[3] / h[6])
  redis.call('HSET', c, 'lvl', fmt(lvl), 'lat', fmt(NOW))
  return lvl
end

-- garbage collection only: never before the logical expiry, which only grows (math.max above)
local function expire_touched()
  for _, k in ipairs(order) do
    local at = math.ceil((touched[k] + SLACK) * 1000)
    local c, r, l, w = names(k)
    redis.call('PEXPIREAT', c, at)
    redis.call('PEXPIREAT', r, at)
    redis.call('PEXPIREAT', l, at)
    redis.call('PEXPIREAT', w, at)
  end
end

-- {key, 'b', level} for buckets (Python takes int(level)), {key, spent, reserved} for budgets
local function push_state(out, h, lvl)
  out[#out + 1] = h[1]
  if h[2] == 'bucket' then
    out[#out + 1] = 'b'
    out[#out + 1] = fmt(lvl)
  else
    local spent, reserved = state(h[1], h[6])
    out[#out + 1] = ifmt(spent)
    out[#out + 1] = ifmt(reserved)
    return spent, reserved
  end
end
""".replace("__ROLLING__", str(ROLLING_BUCKETS)).replace("__SLACK__", str(EXPIRY_SLACK_S))

# ARGV: prefix, now, rid, ttl_s, holds JSON, record expiry (ms), require ready ('1' or absent).
# Returns {ok, failed_key, retry_after, states...}; ok = -1: the counters are not there (Redis lost
# its data and nobody has rebuilt them from the ledger yet, see gateway/reconcile.py).
RESERVE = _PRELUDE + """
local rid, ttl, raw = ARGV[3], tonumber(ARGV[4]), ARGV[5]
if ARGV[7] == '1' and redis.call('EXISTS', P .. 'ready') == 0 then return {-1, '', '0'} end
local holds = cjson.decode(raw)
local out = {1, '', '0'}
for _, h in ipairs(holds) do  -- check every hold first: all or nothing
  get(h)
  if h[2] == 'bucket' then
    local lvl = refill(h)
    push_state(out, h, lvl)
    if lvl < h[4] then
      out[1], out[2], out[3] = 0, h[1], fmt((h[4] - lvl) * h[6] / h[3])
      expire_touched()
      return out
    end
  else
    local spent, reserved = push_state(out, h)
    if spent + reserved + h[4] > h[3] then
      out[1], out[2] = 0, h[1]
      expire_touched()
      return out
    end
  end
end
for _, h in ipairs(holds) do
  local c, r, l, w = names(h[1])
  if h[2] == 'bucket' then
    local lvl = level(c)
    redis.call('HSET', c, 'lvl', fmt(lvl - h[4]))
  else
    local old = tonumber(redis.call('HGET', r, rid)) or 0  -- a repeated key or rid replaces
    redis.call('HSET', r, rid, ifmt(h[4]))
    redis.call('ZADD', l, fmt(NOW + ttl), rid)
    redis.call('HINCRBY', c, 'tot', ifmt(h[4] - old))
  end
end
redis.call('SET', P .. 'res:' .. rid, raw, 'PXAT', ARGV[6])
expire_touched()
return out
"""

# ARGV: prefix, now, rid, actual JSON object, inline holds JSON ('' = the stored reservation).
# Returns post-settle states of budget keys {key, spent, reserved, ...}.
SETTLE = _PRELUDE + """
local rid, actual = ARGV[3], cjson.decode(ARGV[4])
local rec = P .. 'res:' .. rid
local raw = ARGV[5]
if raw == '' then raw = redis.call('GET', rec) end
redis.call('DEL', rec)
local out = {}
if not raw then return out end
for _, h in ipairs(cjson.decode(raw)) do
  get(h)
  local c, r, l, w = names(h[1])
  local used = tonumber(actual[h[1]]) or 0
  if h[2] == 'bucket' then
    if used < h[4] then  -- give back tokens the call did not use
      local lvl = level(c)
      redis.call('HSET', c, 'lvl', fmt(math.min(h[3], lvl + (h[4] - used))))
    end
  else
    local old = tonumber(redis.call('HGET', r, rid))
    if old then
      redis.call('HDEL', r, rid)
      redis.call('ZREM', l, rid)
      redis.call('HINCRBY', c, 'tot', ifmt(-old))
    end
    if h[6] ~= 0 then
      redis.call('HINCRBY', w, ifmt(math.floor(NOW / (h[6] / ROLLING))), ifmt(used))
    else
      redis.call('HINCRBY', c, 'spent', ifmt(used))
    end
    push_state(out, h)
  end
end
expire_touched()
return out
"""

# ARGV: prefix, now, holds JSON. Returns states as RESERVE does.
SNAPSHOT = _PRELUDE + """
local out = {}
for _, h in ipairs(cjson.decode(ARGV[3])) do
  get(h)
  if h[2] == 'bucket' then push_state(out, h, refill(h)) else push_state(out, h) end
end
expire_touched()
return out
"""

# ARGV: prefix, now, JSON [[rid, lapse_at, holds JSON (budget holds only), record expiry ms], ...].
# Puts back reservations a replica still has in flight after Redis lost its data (a rid already
# present is left alone). Returns how many were restored.
RESTORE = _PRELUDE + """
local n = 0
for _, item in ipairs(cjson.decode(ARGV[3])) do
  local rid, lapse, raw = item[1], tonumber(item[2]), item[3]
  if lapse > NOW and redis.call('EXISTS', P .. 'res:' .. rid) == 0 then
    for _, h in ipairs(cjson.decode(raw)) do
      get(h)
      local c, r, l, w = names(h[1])
      local old = tonumber(redis.call('HGET', r, rid)) or 0
      redis.call('HSET', r, rid, ifmt(h[4]))
      redis.call('ZADD', l, fmt(lapse), rid)
      redis.call('HINCRBY', c, 'tot', ifmt(h[4] - old))
    end
    redis.call('SET', P .. 'res:' .. rid, raw, 'PXAT', item[4])
    n = n + 1
  end
end
expire_touched()
return n
"""

# ARGV: prefix, now, ready token, JSON [[hold, units], ...]. Adds the spend the ledger knows (the
# arithmetic of SETTLE's spend step) and marks the counters ready, all at once, and only if
# nobody has marked them ready yet: replicas racing to rebuild cannot count the ledger twice.
REBUILD = _PRELUDE + """
if redis.call('EXISTS', P .. 'ready') == 1 then return 0 end
for _, item in ipairs(cjson.decode(ARGV[4])) do
  local h, used = item[1], tonumber(item[2])
  get(h)
  local c, r, l, w = names(h[1])
  if h[6] ~= 0 then
    redis.call('HINCRBY', w, ifmt(math.floor(NOW / (h[6] / ROLLING))), ifmt(used))
  else
    redis.call('HINCRBY', c, 'spent', ifmt(used))
  end
end
redis.call('SET', P .. 'ready', ARGV[3])
expire_touched()
return 1
"""
