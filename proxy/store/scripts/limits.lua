-- Rate limits on one subject, decided together. Same arithmetic as proxy/checks/algorithms.py.
-- Every limit is evaluated first, without writing; the new states are written only when every limit that is not
-- a shadow admits the request (a shadow limit's own state only when it admits too). So a request denied by one
-- limit consumes nothing from the others, and a shadow limit never denies.
-- KEYS: one per limit.
-- ARGV: now_us ('' = the server's TIME), then per limit: algorithm (f, s or g), limit, window_us, burst, shadow (0/1).
-- Returns per limit: allowed, remaining, reset_us, retry_us, committed (0/1), then 3 state numbers
--   fixed (w, c, 0) | sliding (w, c, p) | gcra (tat, 0, 0)  — the state stored after this call.
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function fmt(n) return string.format('%.0f', n) end

-- Each returns the outcome {allowed, remaining, reset, retry, state1, state2, state3}, the state before, and the
-- write that stores the new state (nil on a denial).
local function fixed(key, limit, window)
  local idx = math.floor(now / window)
  local stored = redis.call('HMGET', key, 'w', 'c')
  local count = 0
  if stored[1] and tonumber(stored[1]) == idx then count = tonumber(stored[2]) end
  local reset = window - (now - idx * window)
  local before = {idx, count, 0}
  if count >= limit then return {0, 0, reset, reset, idx, count, 0}, before, nil end
  return {1, limit - count - 1, reset, 0, idx, count + 1, 0}, before, function()
    redis.call('HSET', key, 'w', fmt(idx), 'c', fmt(count + 1))
    redis.call('PEXPIRE', key, math.ceil(reset / 1000))
  end
end

local function sliding(key, limit, window)
  local idx = math.floor(now / window)
  local elapsed = now - idx * window
  local stored = redis.call('HMGET', key, 'w', 'c', 'p')
  local cur, prev = 0, 0
  if stored[1] then
    local w = tonumber(stored[1])
    if w == idx then
      cur, prev = tonumber(stored[2]), tonumber(stored[3])
    elseif w == idx - 1 then
      prev = tonumber(stored[2])
    end
  end
  local estimate = (prev * (window - elapsed)) / window + cur
  local reset = window - elapsed
  local before = {idx, cur, prev}
  if estimate + 1 > limit then
    local retry
    if cur + 1 <= limit then
      retry = math.ceil(window - ((limit - 1 - cur) * window) / prev) - elapsed
    else
      retry = reset + math.max(0, math.ceil(window - ((limit - 1) * window) / cur))
    end
    return {0, 0, reset, math.max(retry, 1), idx, cur, prev}, before, nil
  end
  return {1, math.floor(limit - (estimate + 1)), reset, 0, idx, cur + 1, prev}, before, function()
    redis.call('HSET', key, 'w', fmt(idx), 'c', fmt(cur + 1), 'p', fmt(prev))
    redis.call('PEXPIRE', key, math.ceil((reset + window) / 1000))
  end
end

local function gcra(key, limit, window, burst)
  local interval = math.floor(window / limit)
  local tat = now
  local stored = redis.call('GET', key)
  if stored then tat = math.max(tonumber(stored), now) end
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  local before = {tat, 0, 0}
  if now < allow_at then return {0, 0, tat - now, allow_at - now, tat, 0, 0}, before, nil end
  return {1, math.floor((now - allow_at) / interval), new_tat - now, 0, new_tat, 0, 0}, before, function()
    redis.call('SET', key, fmt(new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
  end
end

local n = #KEYS
local outs, befores, writes = {}, {}, {}
local admitted = true
for i = 1, n do
  local a = 1 + (i - 1) * 5
  local algorithm, limit, window, burst = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4])
  local out, before, write
  if algorithm == 'f' then
    out, before, write = fixed(KEYS[i], limit, window)
  elseif algorithm == 's' then
    out, before, write = sliding(KEYS[i], limit, window)
  else
    out, before, write = gcra(KEYS[i], limit, window, burst)
  end
  outs[i], befores[i], writes[i] = out, before, write
  if out[1] == 0 and ARGV[a + 5] == '0' then admitted = false end
end
local reply = {}
for i = 1, n do
  local out = outs[i]
  local committed = 0
  if admitted and writes[i] then
    writes[i]()
    committed = 1
  elseif out[1] == 1 then
    -- admitted by this limit but not written (another limit denied): it consumed nothing
    out[2] = out[2] + 1
    out[5], out[6], out[7] = befores[i][1], befores[i][2], befores[i][3]
  end
  for _, v in ipairs({out[1], out[2], out[3], out[4], committed, out[5], out[6], out[7]}) do
    reply[#reply + 1] = v
  end
end
return reply
