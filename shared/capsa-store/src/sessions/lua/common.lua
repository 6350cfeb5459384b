-- Prepended to every session script (after ../../lua/clock_and_reply.lua). Keys derived
-- from stored fields (tenant, node) share the declared keys' `{capsa}` hash tag, so on a
-- Redis Cluster they are in the same slot, on the shard the script runs on.
local function tenant_active_key(key)
  return '{capsa}:tenant:' .. redis.call('HGET', key, 'tenant') .. ':active'
end
local function node_sessions_key(node)
  return '{capsa}:nodesessions:' .. node
end
