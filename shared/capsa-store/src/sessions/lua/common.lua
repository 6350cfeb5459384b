-- Prepended to every session script. Time comes from Redis (TIME), the one clock all
-- replicas share; keys derived from stored fields (tenant, node) assume one Redis (or
-- Sentinel), not Cluster.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function reply(tag, key)
  local out = { tag }
  local all = redis.call('HGETALL', key)
  for i = 1, #all do out[#out + 1] = all[i] end
  return out
end
local function tenant_active_key(key)
  return 'capsa:tenant:' .. redis.call('HGET', key, 'tenant') .. ':active'
end
local function node_sessions_key(node)
  return 'capsa:nodesessions:' .. node
end
