-- Prepended to every session and usage script. Time comes from Redis (TIME), the one
-- clock all replicas share.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- A tag followed by the hash at `key`, flattened: the scripts' common answer.
local function reply(tag, key)
  local out = { tag }
  local all = redis.call('HGETALL', key)
  for i = 1, #all do out[#out + 1] = all[i] end
  return out
end
