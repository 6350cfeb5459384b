//! Usage per session and per tenant, and the usage-record stream billing reads.
//!
//! Layout (every key under `{capsa}:usage:`):
//! - `{capsa}:usage:session:<id>`: hash with the session's latest sample: the cumulative
//!   counters (`cpu_time_us`, `disk_*_bytes`, `network_*_bytes`, `uptime_ms`), the gauges
//!   (`memory_used_bytes`, `vmm_resident_bytes`, with `sample_ms` the time they were taken),
//!   `memory_peak_bytes`, `vmm_resident_peak_bytes` (host-measured: what memory is billed
//!   from; the guest's own figure is information), the guest's activity gauges
//!   (`processes_running`, `terminals_open`: latest value, zeroed when finalized, not part
//!   of the records), and bookkeeping (`tenant_id`, `node_id`, `vm_id`, `lease_ms`,
//!   `last_record_ms`, `finalized`, `final_ms`). It gets a TTL of the retention period once
//!   finalized.
//! - `{capsa}:usage:tenant:<t>`: hash of the tenant's totals under the same field names:
//!   counters are sums over all its sessions ever; `memory_used_bytes`,
//!   `vmm_resident_bytes`, `processes_running` and `terminals_open` are sums over its
//!   sessions not yet finalized (what it holds now);
//!   `memory_peak_bytes` and `vmm_resident_peak_bytes` are the highest those sums reached.
//! - `{capsa}:usage:open`: set of sessions sampled but not yet finalized, so a session whose
//!   FinalizeSession never came (its caller died) is found and finalized later.
//! - `{capsa}:usage:records` ([`RECORDS_STREAM`]): one entry per usage record, fields
//!   `session_id`, `tenant_id`, `kind` (`interim` or `final`), every field of
//!   [`RECORD_FIELDS`], and `record_ms`. Values are cumulative since the session started,
//!   so a later record supersedes an earlier one of the same session; the `final` record is
//!   the bill.
//!
//! Exactly-once without coordination between metering replicas: every write is one Lua
//! script. A sample raises each stored counter only to a higher value and adds just that
//! difference to the tenant, so two replicas applying the same (or older) numbers add
//! nothing twice. Gauges move only for a sample at least as new as the stored one
//! (`sample_ms`, taken from the vm-pool that owns the VM, so both replicas compare times of
//! one clock). [`UsageStore::finalize`] flips `finalized` and appends the `final` record in
//! the same script, so it is appended once however many callers race; samples arriving
//! after it are ignored, so a tenant's totals always equal the sum of its sessions' final
//! and running numbers. Interim records are guarded by `last_record_ms` on Redis' clock.
//! The scripts touch a session's and its tenant's keys together, so like the session
//! scripts they assume one Redis (or Sentinel), not Cluster.
//!
//! The counters count from the lease: metering subtracts the VMM's counters at lease time
//! (reported by vm-pool), so a session is not billed for its VM's boot and warm-pool wait.
//!
//! How a billing job consumes the stream (a consumer group delivers each entry to one
//! consumer, and keeps it pending until acknowledged):
//! ```text
//! XGROUP CREATE {capsa}:usage:records billing 0 MKSTREAM        # once
//! XREADGROUP GROUP billing <worker> COUNT 100 BLOCK 5000 STREAMS {capsa}:usage:records >
//!   ... bill the `final` entries (interim ones show running cost), then, once stored:
//! XACK {capsa}:usage:records billing <entry id> ...
//! ```
//! A worker that restarts first re-reads its own pending entries (`... STREAMS
//! {capsa}:usage:records 0`); entries of a worker that died are taken over with `XAUTOCLAIM`.
//! Billing must be idempotent per entry id (an entry may be redelivered before its XACK).
//! [`UsageStore::trim_acknowledged`] (run periodically by metering) drops the entries every
//! consumer group has acknowledged; with no group at all it keeps everything, so records
//! are never lost before billing is set up.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use crate::Connection;
use redis::AsyncCommands as _;
use redis::Script;

use crate::{CLOCK_AND_REPLY_LUA, Result, StoreError};

/// The stream of usage records.
pub const RECORDS_STREAM: &str = "{capsa}:usage:records";

const OPEN_SET: &str = "{capsa}:usage:open";

/// The usage fields of a record and of the session and tenant hashes, in this order.
pub const RECORD_FIELDS: [&str; 11] = [
    "cpu_time_us",
    "memory_used_bytes",
    "memory_peak_bytes",
    "vmm_resident_bytes",
    "vmm_resident_peak_bytes",
    "network_rx_bytes",
    "network_tx_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
    "uptime_ms",
    "sample_ms",
];

fn session_key(id: &str) -> String {
    format!("{{capsa}}:usage:session:{id}")
}
fn tenant_key(tenant: &str) -> String {
    format!("{{capsa}}:usage:tenant:{tenant}")
}

/// Prepended to the usage scripts, after the shared clock and reply helpers.
const COMMON_LUA: &str = r#"
-- Numbers are written with %d: Lua's default formatting turns large ones into 1e+15.
local function int(x) return string.format('%d', x) end
local function num(key, field) return tonumber(redis.call('HGET', key, field) or '0') end
local function raise(key, field, value)
  if value > num(key, field) then redis.call('HSET', key, field, int(value)) end
end
local FIELDS = { 'cpu_time_us', 'memory_used_bytes', 'memory_peak_bytes',
  'vmm_resident_bytes', 'vmm_resident_peak_bytes', 'network_rx_bytes', 'network_tx_bytes', 'disk_read_bytes',
  'disk_write_bytes', 'uptime_ms', 'sample_ms' }
-- Counters a session's VMs add up (a resumed session's next VM starts from zero).
local SEGMENT_COUNTERS = { 'cpu_time_us', 'disk_read_bytes', 'disk_write_bytes',
  'network_rx_bytes', 'network_tx_bytes', 'uptime_ms' }
-- Takes a session's gauges out of its tenant's current sums and zeroes its activity
-- gauges; its memory gauges too when `memory` (a final record keeps the last figures).
local function drop_gauges(s, t, memory)
  for _, f in ipairs({ 'memory_used_bytes', 'vmm_resident_bytes', 'processes_running',
      'terminals_open' }) do
    redis.call('HINCRBY', t, f, int(-num(s, f)))
    if memory or (f ~= 'memory_used_bytes' and f ~= 'vmm_resident_bytes') then
      redis.call('HSET', s, f, '0')
    end
  end
end
local function append(stream, s, kind, now)
  local args = { 'XADD', stream, '*', 'session_id', redis.call('HGET', s, 'session_id'),
    'tenant_id', redis.call('HGET', s, 'tenant_id'), 'kind', kind }
  for _, f in ipairs(FIELDS) do
    args[#args + 1] = f
    args[#args + 1] = redis.call('HGET', s, f) or '0'
  end
  args[#args + 1] = 'record_ms'
  args[#args + 1] = int(now)
  redis.call(unpack(args))
end
"#;

const SAMPLE_LUA: &str = r#"
-- KEYS: session usage, tenant usage, records stream, open set.
-- ARGV: session id, tenant id, node id, vm id, sample ms, lease ms, cpu us, vmm resident,
-- disk read, disk write, net rx, net tx, memory used (-1: unknown), interim interval ms
-- (0: none), processes running (-1: unknown), terminals open (-1: unknown).
local s, t = KEYS[1], KEYS[2]
if redis.call('HGET', s, 'finalized') == '1' then return { 'finalized' } end
local now = now_ms()
if redis.call('EXISTS', s) == 0 then
  -- The first interim record comes one interval after the first sample.
  redis.call('HSET', s, 'session_id', ARGV[1], 'tenant_id', ARGV[2], 'lease_ms', ARGV[6],
    'last_record_ms', int(now), 'finalized', '0')
  redis.call('SADD', KEYS[4], ARGV[1])
end
local vm = ARGV[4]
local current = redis.call('HGET', s, 'vm_id')
if current and current ~= vm then
  -- A VM of a suspended session's past (parked) is never counted again.
  local past = redis.call('HGET', s, 'past_vms') or ''
  if string.find(',' .. past .. ',', ',' .. vm .. ',', 1, true) then return { 'parked' } end
  -- The session's next VM (after a resume): what it used so far is the base the new VM's
  -- counters, which start from zero, add to; its uptime counts from the new lease.
  if current ~= '' then past = past .. ',' .. current end
  for _, f in ipairs(SEGMENT_COUNTERS) do
    redis.call('HSET', s, 'base_' .. f, int(num(s, f)))
  end
  redis.call('HSET', s, 'past_vms', past, 'lease_ms', ARGV[6])
end
redis.call('HSET', s, 'node_id', ARGV[3], 'vm_id', vm)
local sample = tonumber(ARGV[5])
local function counter(field, value)
  value = value + num(s, 'base_' .. field)
  local old = num(s, field)
  if value > old then
    redis.call('HSET', s, field, int(value))
    redis.call('HINCRBY', t, field, int(value - old))
  end
end
counter('cpu_time_us', tonumber(ARGV[7]))
counter('disk_read_bytes', tonumber(ARGV[9]))
counter('disk_write_bytes', tonumber(ARGV[10]))
counter('network_rx_bytes', tonumber(ARGV[11]))
counter('network_tx_bytes', tonumber(ARGV[12]))
counter('uptime_ms', math.max(0, sample - num(s, 'lease_ms')))
local mem = tonumber(ARGV[13])
-- A gauge moves the tenant's current sum with it; only the newest sample sets gauges.
local function gauge(field, value)
  local old = num(s, field)
  redis.call('HSET', s, field, int(value))
  redis.call('HINCRBY', t, field, int(value - old))
end
if sample >= num(s, 'sample_ms') then
  redis.call('HSET', s, 'sample_ms', int(sample))
  gauge('vmm_resident_bytes', tonumber(ARGV[8]))
  if mem >= 0 then gauge('memory_used_bytes', mem) end
  local processes, terminals = tonumber(ARGV[15]), tonumber(ARGV[16])
  if processes >= 0 then gauge('processes_running', processes) end
  if terminals >= 0 then gauge('terminals_open', terminals) end
  raise(t, 'memory_peak_bytes', num(t, 'memory_used_bytes'))
  raise(t, 'vmm_resident_peak_bytes', num(t, 'vmm_resident_bytes'))
  raise(t, 'sample_ms', sample)
end
if mem >= 0 then raise(s, 'memory_peak_bytes', mem) end
raise(s, 'vmm_resident_peak_bytes', tonumber(ARGV[8]))
local interval = tonumber(ARGV[14])
if interval > 0 and now - num(s, 'last_record_ms') >= interval then
  redis.call('HSET', s, 'last_record_ms', int(now))
  append(KEYS[3], s, 'interim', now)
  return { 'interim' }
end
return { 'applied' }
"#;

const FINALIZE_LUA: &str = r#"
-- KEYS: session usage, tenant usage, records stream, open set.
-- ARGV: session id, tenant id, lease ms (used only if never sampled), retention ms.
local s, t = KEYS[1], KEYS[2]
if redis.call('HGET', s, 'finalized') == '1' then return reply('already', s) end
local now = now_ms()
if redis.call('EXISTS', s) == 0 then
  -- Never sampled (a short session): all it has is its time.
  local uptime = math.max(0, now - tonumber(ARGV[3]))
  redis.call('HSET', s, 'session_id', ARGV[1], 'tenant_id', ARGV[2], 'lease_ms', ARGV[3],
    'sample_ms', int(now), 'uptime_ms', int(uptime), 'last_record_ms', int(now))
  redis.call('HINCRBY', t, 'uptime_ms', int(uptime))
  raise(t, 'sample_ms', now)
end
-- An ended session no longer holds memory, and runs nothing.
drop_gauges(s, t, false)
redis.call('HSET', s, 'finalized', '1', 'final_ms', int(now))
append(KEYS[3], s, 'final', now)
redis.call('PEXPIRE', s, ARGV[4])
redis.call('SREM', KEYS[4], ARGV[1])
return reply('appended', s)
"#;

const PARK_LUA: &str = r#"
-- KEYS: session usage, tenant usage. ARGV: vm id.
-- The session's VM is being suspended (its final sample is in): from here that VM is never
-- counted again, and the session holds no memory and runs nothing until its next VM.
local s, t = KEYS[1], KEYS[2]
if redis.call('EXISTS', s) == 0 then return 'unsampled' end
if redis.call('HGET', s, 'finalized') == '1' then return 'finalized' end
if redis.call('HGET', s, 'vm_id') ~= ARGV[1] then return 'other_vm' end
local past = redis.call('HGET', s, 'past_vms') or ''
redis.call('HSET', s, 'past_vms', past .. ',' .. ARGV[1], 'vm_id', '')
for _, f in ipairs(SEGMENT_COUNTERS) do
  redis.call('HSET', s, 'base_' .. f, int(num(s, f)))
end
drop_gauges(s, t, true)
return 'parked'
"#;

static PARK: LazyLock<Script> =
    LazyLock::new(|| Script::new(&[CLOCK_AND_REPLY_LUA, COMMON_LUA, PARK_LUA].concat()));
static SAMPLE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&[CLOCK_AND_REPLY_LUA, COMMON_LUA, SAMPLE_LUA].concat()));
static FINALIZE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&[CLOCK_AND_REPLY_LUA, COMMON_LUA, FINALIZE_LUA].concat()));

/// One reading of a leased VM, as metering takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub session_id: String,
    pub tenant_id: String,
    pub node_id: String,
    pub vm_id: String,
    /// When vm-pool read the counters (its clock, ms since the Unix epoch).
    pub sample_ms: i64,
    /// When the VM was leased to the session (same clock); uptime counts from here.
    pub lease_ms: i64,
    /// Cumulative since the VMM started.
    pub cpu_time_us: u64,
    pub vmm_resident_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    /// As the guest reports it; `None` when the guest did not answer.
    pub memory_used_bytes: Option<u64>,
    /// Background processes running, as the guest reports them; `None`: no answer.
    pub processes_running: Option<u32>,
    /// Terminals open, as the guest reports them; `None`: no answer.
    pub terminals_open: Option<u32>,
}

/// What [`UsageStore::apply_sample`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Stored (parts older than what was stored are ignored).
    Stored,
    /// Stored, and an interim record was appended.
    StoredWithRecord,
    /// The session is finalized; the sample was ignored.
    Finalized,
    /// The sample's VM was parked when its session was suspended; it was ignored.
    Parked,
}

/// Usage numbers, of one session or summed over a tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_time_us: u64,
    pub memory_used_bytes: u64,
    pub memory_peak_bytes: u64,
    pub vmm_resident_bytes: u64,
    /// Highest `vmm_resident_bytes` seen; host-measured, what memory is billed from.
    pub vmm_resident_peak_bytes: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub uptime_ms: u64,
    /// When the numbers were sampled (ms since the Unix epoch); 0 if never.
    pub sample_ms: i64,
    /// Background processes running at `sample_ms` (0 once finalized).
    pub processes_running: u32,
    /// Terminals open at `sample_ms` (0 once finalized).
    pub terminals_open: u32,
}

impl Usage {
    /// Reads the [`RECORD_FIELDS`] and the activity gauges out of a field map (a hash or
    /// a stream entry).
    /// Missing fields are 0; a field that is not a number is corrupt.
    pub fn from_fields(key: &str, fields: &BTreeMap<String, String>) -> Result<Usage> {
        let get = |name: &str| -> Result<i64> {
            match fields.get(name).map(String::as_str) {
                None | Some("") => Ok(0),
                Some(v) => v.parse().map_err(|_| StoreError::Corrupt {
                    key: key.to_string(),
                    reason: format!("{name} is {v:?}"),
                }),
            }
        };
        // Gauge sums can only dip below zero through a bug; clamp rather than wrap.
        let unsigned = |name: &str| get(name).map(|v| v.max(0) as u64);
        let count = |name: &str| get(name).map(|v| v.clamp(0, i64::from(u32::MAX)) as u32);
        Ok(Usage {
            cpu_time_us: unsigned("cpu_time_us")?,
            memory_used_bytes: unsigned("memory_used_bytes")?,
            memory_peak_bytes: unsigned("memory_peak_bytes")?,
            vmm_resident_peak_bytes: unsigned("vmm_resident_peak_bytes")?,
            vmm_resident_bytes: unsigned("vmm_resident_bytes")?,
            network_rx_bytes: unsigned("network_rx_bytes")?,
            network_tx_bytes: unsigned("network_tx_bytes")?,
            disk_read_bytes: unsigned("disk_read_bytes")?,
            disk_write_bytes: unsigned("disk_write_bytes")?,
            uptime_ms: unsigned("uptime_ms")?,
            sample_ms: get("sample_ms")?,
            processes_running: count("processes_running")?,
            terminals_open: count("terminals_open")?,
        })
    }
}

/// One session's stored usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionUsage {
    pub session_id: String,
    pub tenant_id: String,
    pub node_id: String,
    pub vm_id: String,
    pub lease_ms: i64,
    /// `uptime_ms` is as of the last sample (or of finalizing).
    pub usage: Usage,
    pub finalized: bool,
    /// The uptime of the session's earlier VMs (it was suspended and resumed).
    pub base_uptime_ms: u64,
}

impl SessionUsage {
    /// The uptime at `now_ms` (Redis' clock): while a VM runs, its earlier VMs' plus this
    /// one's since its lease; while suspended (no VM) or finalized, as stored.
    pub fn uptime_at(&self, now_ms: i64) -> u64 {
        if self.finalized || self.vm_id.is_empty() {
            return self.usage.uptime_ms;
        }
        let live = u64::try_from(now_ms - self.lease_ms).unwrap_or(0);
        self.usage.uptime_ms.max(self.base_uptime_ms + live)
    }
}

impl SessionUsage {
    fn from_flat(key: &str, flat: &[String]) -> Result<SessionUsage> {
        let fields: BTreeMap<String, String> = flat
            .chunks_exact(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        let text = |name: &str| fields.get(name).cloned().unwrap_or_default();
        Ok(SessionUsage {
            session_id: text("session_id"),
            tenant_id: text("tenant_id"),
            node_id: text("node_id"),
            vm_id: text("vm_id"),
            lease_ms: text("lease_ms").parse().unwrap_or(0),
            usage: Usage::from_fields(key, &fields)?,
            finalized: text("finalized") == "1",
            base_uptime_ms: text("base_uptime_ms").parse().unwrap_or(0),
        })
    }
}

/// Outcome of [`UsageStore::trim_acknowledged`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trimmed {
    /// This many entries were acknowledged by every consumer group and are gone.
    Entries(u64),
    /// No consumer group reads the stream; every entry was kept.
    NoConsumerGroup,
}

/// Trims the records stream below the oldest entry some consumer group still needs: its
/// oldest pending (delivered, unacknowledged) entry, or, with nothing pending, the entry
/// after its last delivered one. KEYS: the stream. Returns the count trimmed, or -1 when
/// the stream has no consumer group.
const TRIM_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return -1 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function older(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local keep
for _, group in ipairs(groups) do
  local name, last
  for i = 1, #group, 2 do
    if group[i] == 'name' then name = group[i + 1] end
    if group[i] == 'last-delivered-id' then last = group[i + 1] end
  end
  local pending = redis.call('XPENDING', KEYS[1], name)
  local needs
  if tonumber(pending[1]) > 0 then
    needs = pending[2]
  else
    local ms, seq = parse(last)
    needs = string.format('%d-%d', ms, seq + 1)
  end
  if keep == nil or older(needs, keep) then keep = needs end
end
return redis.call('XTRIM', KEYS[1], 'MINID', keep)
"#;

static TRIM: LazyLock<Script> = LazyLock::new(|| Script::new(TRIM_LUA));

/// Outcome of [`UsageStore::finalize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalized {
    pub usage: SessionUsage,
    /// False when an earlier call already appended the final record.
    pub appended: bool,
}

/// Usage storage. Cheap to clone.
#[derive(Clone)]
pub struct UsageStore {
    conn: Connection,
    retention: Duration,
}

impl UsageStore {
    /// `retention`: how long a finalized session's usage stays readable. Keep it above the
    /// session retention, so a late FinalizeSession still finds the finalized flag.
    pub fn new(conn: Connection, retention: Duration) -> Self {
        Self { conn, retention }
    }

    /// Applies one sample atomically (see the module docs); appends an interim record when
    /// `record_interval` has passed since the session's last record.
    pub async fn apply_sample(
        &self,
        sample: &Sample,
        record_interval: Option<Duration>,
    ) -> Result<Applied> {
        let key = session_key(&sample.session_id);
        let memory = sample
            .memory_used_bytes
            .map_or(-1, |m| i64::try_from(m).unwrap_or(i64::MAX));
        let raw: Vec<String> = SAMPLE
            .key(&key)
            .key(tenant_key(&sample.tenant_id))
            .key(RECORDS_STREAM)
            .key(OPEN_SET)
            .arg(&sample.session_id)
            .arg(&sample.tenant_id)
            .arg(&sample.node_id)
            .arg(&sample.vm_id)
            .arg(sample.sample_ms)
            .arg(sample.lease_ms)
            .arg(sample.cpu_time_us)
            .arg(sample.vmm_resident_bytes)
            .arg(sample.disk_read_bytes)
            .arg(sample.disk_write_bytes)
            .arg(sample.network_rx_bytes)
            .arg(sample.network_tx_bytes)
            .arg(memory)
            .arg(record_interval.map_or(0, ms))
            .arg(sample.processes_running.map_or(-1, i64::from))
            .arg(sample.terminals_open.map_or(-1, i64::from))
            .invoke_async(&mut self.conn.clone())
            .await?;
        match raw.first().map(String::as_str) {
            Some("applied") => Ok(Applied::Stored),
            Some("interim") => Ok(Applied::StoredWithRecord),
            Some("finalized") => Ok(Applied::Finalized),
            Some("parked") => Ok(Applied::Parked),
            other => Err(StoreError::Corrupt {
                key,
                reason: format!("sample script replied {other:?}"),
            }),
        }
    }

    /// Drops the records every consumer group has acknowledged (see [`Trimmed`]). A group
    /// created later starts after them; create groups before trimming matters to them.
    pub async fn trim_acknowledged(&self) -> Result<Trimmed> {
        let n: i64 = TRIM
            .key(RECORDS_STREAM)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(u64::try_from(n).map_or(Trimmed::NoConsumerGroup, Trimmed::Entries))
    }

    /// Stops counting the session's VM `vm_id` (being suspended; take its final sample
    /// first): later samples of it are ignored, the session's gauges leave its tenant's
    /// sums, and its next VM's counters add to what it used so far. False when there was
    /// nothing to park (never sampled, finalized, or another VM is current).
    pub async fn park(&self, session_id: &str, tenant_id: &str, vm_id: &str) -> Result<bool> {
        let reply: String = PARK
            .key(session_key(session_id))
            .key(tenant_key(tenant_id))
            .arg(vm_id)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(reply == "parked")
    }

    /// Marks the session finalized and appends its `final` record, once: a second call
    /// (from any replica) returns the stored usage with `appended: false`. A session never
    /// sampled gets a record with only its uptime, counted from `lease_ms` (Redis' clock).
    pub async fn finalize(
        &self,
        session_id: &str,
        tenant_id: &str,
        lease_ms: i64,
    ) -> Result<Finalized> {
        let key = session_key(session_id);
        let raw: Vec<String> = FINALIZE
            .key(&key)
            .key(tenant_key(tenant_id))
            .key(RECORDS_STREAM)
            .key(OPEN_SET)
            .arg(session_id)
            .arg(tenant_id)
            .arg(lease_ms)
            .arg(ms(self.retention).max(1))
            .invoke_async(&mut self.conn.clone())
            .await?;
        let Some((tag, flat)) = raw.split_first() else {
            return Err(StoreError::Corrupt {
                key,
                reason: "empty finalize reply".into(),
            });
        };
        let usage = SessionUsage::from_flat(&key, flat)?;
        match tag.as_str() {
            "appended" => Ok(Finalized {
                usage,
                appended: true,
            }),
            "already" => Ok(Finalized {
                usage,
                appended: false,
            }),
            other => Err(StoreError::Corrupt {
                key,
                reason: format!("finalize replied {other}"),
            }),
        }
    }

    /// The session's stored usage, if it was ever sampled or finalized (and, once
    /// finalized, until the retention ends).
    pub async fn session(&self, session_id: &str) -> Result<Option<SessionUsage>> {
        let key = session_key(session_id);
        let flat: Vec<String> = self.conn.clone().hgetall(&key).await?;
        if flat.is_empty() {
            return Ok(None);
        }
        SessionUsage::from_flat(&key, &flat).map(Some)
    }

    /// The tenant's totals; all zero for a tenant never sampled.
    pub async fn tenant(&self, tenant_id: &str) -> Result<Usage> {
        let key = tenant_key(tenant_id);
        let fields: BTreeMap<String, String> = self.conn.clone().hgetall(&key).await?;
        Usage::from_fields(&key, &fields)
    }

    /// Sessions sampled but not finalized yet.
    pub async fn open_sessions(&self) -> Result<Vec<String>> {
        Ok(self.conn.clone().smembers(OPEN_SET).await?)
    }

    /// Redis' clock, ms since the Unix epoch.
    pub async fn now_ms(&self) -> Result<i64> {
        let (secs, micros): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_reads_fields_and_rejects_garbage() {
        let mut fields = BTreeMap::from([
            ("cpu_time_us".to_string(), "1500000".to_string()),
            ("memory_used_bytes".to_string(), "-5".to_string()),
            ("sample_ms".to_string(), "1700000000000".to_string()),
        ]);
        let u = Usage::from_fields("k", &fields).unwrap();
        assert_eq!(u.cpu_time_us, 1_500_000);
        assert_eq!(u.memory_used_bytes, 0, "a negative gauge sum is clamped");
        assert_eq!(u.sample_ms, 1_700_000_000_000);
        assert_eq!(u.disk_write_bytes, 0);
        fields.insert("uptime_ms".into(), "1e+15".into());
        let err = Usage::from_fields("k", &fields).unwrap_err();
        assert!(err.to_string().contains("uptime_ms"), "{err}");
    }

    #[test]
    fn scripts_name_every_record_field() {
        for f in RECORD_FIELDS {
            assert!(
                COMMON_LUA.contains(&format!("'{f}'")),
                "{f} missing from FIELDS"
            );
        }
    }
}
