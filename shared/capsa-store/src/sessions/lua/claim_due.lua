-- Claims one due session, if it still is due: 'expired' (ACTIVE or SUSPENDED past its
-- deadline), 'suspend' (ACTIVE with auto_suspend past its deadline: now SUSPENDING),
-- 'reclaimed_suspending' / 'reclaimed_resuming' (past the claim deadline of that step),
-- 'creating' (stuck in CREATING past the creation bound) or 'reclaimed' (TERMINATING past its
-- claim deadline: the replica tearing it down died). It moves (or stays) in TERMINATING with
-- a fresh claim deadline, so a concurrent caller sees a future score and gets nothing.
-- KEYS: session hash, expiry zset, the tenant's active set ('{capsa}:tenant::active' for a
-- record that is gone). ARGV: id, claim ms, claim ms of a suspend or resume step. Replies
-- { kind }, { } or { 'stale' }.
local now = now_ms()
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > now then return {} end
local st = redis.call('HGET', KEYS[1], 'status')
if not st or st == 'terminated' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {}
end
if tenant_active_key(KEYS[1]) ~= KEYS[3] then return { 'stale' } end
local claim = now + tonumber(ARGV[2])
local kind = 'reclaimed'
if st == 'creating' then
  kind = 'creating'
  redis.call('HSET', KEYS[1], 'status', 'terminating', 'end_reason', 'create_failed',
    'end_message', 'the session was still being created when its creation deadline passed')
  redis.call('SREM', KEYS[3], ARGV[1])
elseif st == 'active' and redis.call('HGET', KEYS[1], 'auto_suspend') == '1' then
  -- Parked instead of ended: the claimer suspends it (as the suspend op begin_suspend).
  kind = 'suspend'
  local gen = redis.call('HINCRBY', KEYS[1], 'suspend_gen', 1)
  redis.call('HSET', KEYS[1], 'status', 'suspending', 'snapshot_id', 's' .. gen .. '-' .. ARGV[1],
    'suspended_at_deadline', '1')
elseif st == 'active' or st == 'suspended' then
  kind = 'expired'
  redis.call('HSET', KEYS[1], 'status', 'terminating', 'end_reason', 'expired',
    'end_message', st == 'active' and 'the session lifetime ran out'
      or 'the session lifetime ran out while it was suspended')
  redis.call('SREM', KEYS[3], ARGV[1])
elseif st == 'suspending' or st == 'resuming' then
  -- The replica suspending or resuming it died: the claimer redoes that step.
  kind = 'reclaimed_' .. st
end
if kind == 'suspend' or kind == 'reclaimed_suspending' or kind == 'reclaimed_resuming' then
  claim = now + tonumber(ARGV[3])
end
redis.call('HSET', KEYS[1], 'claim_ms', claim)
redis.call('ZADD', KEYS[2], claim, ARGV[1])
return { kind }
