-- Sliding window (two weighted fixed windows; denials not counted). Same arithmetic as
-- proxy/checks/algorithms.py:sliding_window. KEYS[1]: a hash {w = window index, c = count, p = previous count}.
-- ARGV: limit, window_us, burst (unused), now_us ('' = the server's TIME).
-- Returns {allowed, remaining, reset_us, retry_us, w, c, p}.
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local idx = math.floor(now / window)
local elapsed = now - idx * window
local stored = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
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
if estimate + 1 > limit then
  local retry
  if cur + 1 <= limit then
    retry = math.ceil(window - ((limit - 1 - cur) * window) / prev) - elapsed
  else
    retry = reset + math.max(0, math.ceil(window - ((limit - 1) * window) / cur))
  end
  return {0, 0, reset, math.max(retry, 1), idx, cur, prev}
end
cur = cur + 1
redis.call('HSET', KEYS[1], 'w', string.format('%.0f', idx), 'c', string.format('%.0f', cur),
  'p', string.format('%.0f', prev))
redis.call('PEXPIRE', KEYS[1], math.ceil((reset + window) / 1000))
return {1, math.floor(limit - (estimate + 1)), reset, 0, idx, cur, prev}
