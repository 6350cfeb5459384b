-- The suspend loop: active -> suspending -> suspended -> resuming -> active. The session
-- moves into suspending or resuming with a claim deadline as its due score (like
-- terminating), so if the replica doing the work dies, the reaper re-claims it and redoes
-- the step (each step is idempotent on the node). Out of suspending or resuming it moves to
-- its next state on success, or back a step on failure, with its deadline as the score.
-- A written snapshot is put on the tenant's storage meter (../../lua/meter.lua) until the
-- resume or the session's end (finish_end.lua) takes it off.
-- KEYS: session hash, expiry zset, the tenant's snapshot meter. ARGV: id, op, claim ms,
-- then per op:
--   begin_suspend: at_deadline ('1' when the deadline asked for it)
--   finish_suspend: snapshot bytes, suspended retention ms (for a suspend at the deadline)
--   abort_suspend, begin_resume, abort_resume: nothing
--   finish_resume: vm id
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return { 'missing' } end
if tenant_meter_key(KEYS[1]) ~= KEYS[3] then return { 'stale' } end
local op = ARGV[2]
local from = ({ begin_suspend = 'active', finish_suspend = 'suspending',
  abort_suspend = 'suspending', begin_resume = 'suspended', finish_resume = 'resuming',
  abort_resume = 'resuming' })[op]
if not from then return { 'bad_op' } end
if st ~= from then return reply('conflict', KEYS[1]) end
local now = now_ms()
local function due(at)
  redis.call('ZADD', KEYS[2], at, ARGV[1])
end
local function claim(status)
  local at = now + tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'status', status, 'claim_ms', at)
  due(at)
end
local function deadline()
  return tonumber(redis.call('HGET', KEYS[1], 'expire_ms'))
end
if op == 'begin_suspend' then
  local gen = redis.call('HINCRBY', KEYS[1], 'suspend_gen', 1)
  redis.call('HSET', KEYS[1], 'snapshot_id', 's' .. gen .. '-' .. ARGV[1],
    'suspended_at_deadline', ARGV[4])
  claim('suspending')
elseif op == 'finish_suspend' then
  redis.call('HSET', KEYS[1], 'status', 'suspended', 'vm_id', '', 'snapshot_bytes', ARGV[4],
    'suspend_ms', now, 'metered_bytes', ARGV[4])
  meter_add(KEYS[3], tonumber(ARGV[4]), now)
  if redis.call('HGET', KEYS[1], 'suspended_at_deadline') == '1' then
    redis.call('HSET', KEYS[1], 'expire_ms', now + tonumber(ARGV[5]))
  end
  due(deadline())
elseif op == 'abort_suspend' then
  -- The VM still runs: the session is active as before (its generation stays used).
  redis.call('HSET', KEYS[1], 'status', 'active', 'snapshot_id', '', 'suspended_at_deadline', '0')
  due(deadline())
elseif op == 'begin_resume' then
  claim('resuming')
elseif op == 'finish_resume' then
  meter_add(KEYS[3], -tonumber(redis.call('HGET', KEYS[1], 'metered_bytes') or '0'), now)
  redis.call('HSET', KEYS[1], 'status', 'active', 'vm_id', ARGV[4], 'last_active_ms', now,
    'resume_ms', now, 'snapshot_id', '', 'snapshot_bytes', '0', 'metered_bytes', '0')
  if redis.call('HGET', KEYS[1], 'suspended_at_deadline') == '1' then
    -- Parked at its deadline: the resume starts a new lifetime of the same length.
    local lifetime = tonumber(redis.call('HGET', KEYS[1], 'lifetime_ms'))
    redis.call('HSET', KEYS[1], 'expire_ms', now + lifetime, 'suspended_at_deadline', '0')
  end
  due(deadline())
elseif op == 'abort_resume' then
  redis.call('HSET', KEYS[1], 'status', 'suspended')
  due(deadline())
end
return reply('ok', KEYS[1])
