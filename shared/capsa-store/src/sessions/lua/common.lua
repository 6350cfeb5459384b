-- Prepended to every session script (after ../../lua/clock_and_reply.lua). Keys derived
-- from stored fields (tenant, node) assume one Redis (or Sentinel), not Cluster.
local function tenant_active_key(key)
  return 'capsa:tenant:' .. redis.call('HGET', key, 'tenant') .. ':active'
end
local function node_sessions_key(node)
  return 'capsa:nodesessions:' .. node
end
