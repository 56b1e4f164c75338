-- GCRA: one request every window/limit µs with ARGV[3] (burst) in hand. Same arithmetic as
-- proxy/checks/algorithms.py:gcra. KEYS[1]: a string, the theoretical arrival time (µs).
-- ARGV: limit, window_us, burst, now_us ('' = the server's TIME).
-- Returns {allowed, remaining, reset_us, retry_us, tat}.
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local interval = math.floor(window / limit)
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  tat = math.max(tonumber(stored), now)
end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, 0, tat - now, allow_at - now, tat}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
return {1, math.floor((now - allow_at) / interval), new_tat - now, 0, new_tat}
