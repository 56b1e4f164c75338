-- Fixed window: at most ARGV[1] admitted per aligned window of ARGV[2] µs. Same arithmetic as
-- proxy/checks/algorithms.py:fixed_window. KEYS[1]: a hash {w = window index, c = count}.
-- ARGV: limit, window_us, burst (unused), now_us ('' = the server's TIME).
-- Returns {allowed, remaining, reset_us, retry_us, w, c}.
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
local stored = redis.call('HMGET', KEYS[1], 'w', 'c')
local count = 0
if stored[1] and tonumber(stored[1]) == idx then
  count = tonumber(stored[2])
end
local reset = window - (now - idx * window)
if count >= limit then
  return {0, 0, reset, reset, idx, count}
end
count = count + 1
redis.call('HSET', KEYS[1], 'w', string.format('%.0f', idx), 'c', string.format('%.0f', count))
redis.call('PEXPIRE', KEYS[1], math.ceil(reset / 1000))
return {1, limit - count, reset, 0, idx, count}
