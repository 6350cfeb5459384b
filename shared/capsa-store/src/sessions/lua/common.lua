-- Prepended to every session script (after ../../lua/clock_and_reply.lua). A script touches
-- only the keys its caller declares. Keys named by a session's stored fields (its tenant's
-- active set, its node's session set) are declared too: the caller reads those fields first,
-- and the script checks the declared key against the field and replies { 'stale' } (before
-- writing anything) when they differ, so the caller reads again. A tenant never changes; a
-- node is set once, at activation.
local function tenant_active_key(key)
  return '{capsa}:tenant:' .. redis.call('HGET', key, 'tenant') .. ':active'
end
local function node_sessions_key(node)
  return '{capsa}:nodesessions:' .. node
end
