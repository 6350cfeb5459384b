//! Tenant snapshots: a session's saved state the tenant owns (SnapshotSession, templates)
//! and the short-lived snapshots a fork restores its children from. The files live on the
//! node that ran the session (vm-pool's snapshot store); Redis holds what is known of them.
//!
//! Layout:
//! - `{capsa}:snapshot:<id>`: the record hash ([`SnapshotRecord`]).
//! - `{capsa}:tenant:<t>:snapshots`: zset of the tenant's named snapshots by create time
//!   (its quota count; fork snapshots are not in it).
//! - `{capsa}:tenant:<t>:snapshot_meter`: the tenant's storage meter (`lua/meter.lua`):
//!   bytes held now, GiB-ms held so far, and what its byte quota counts.
//! - `{capsa}:snapshots:pending`: zset of snapshots whose files may need settling, scored
//!   by when: a named one being written (claim deadline of its writer) or being deleted, and
//!   every fork snapshot until it is removed. [`SnapshotStore::claim_pending`] hands the due
//!   ones to a reaper, so a replica dying mid-step leaves no orphan files and no stuck record.
//!
//! Lifecycle: creating → ready → deleting → (gone). A named snapshot's estimate (its VM's
//! memory plus a margin, the snapshot's size not being known before it is written) is
//! reserved against the tenant's byte quota while it is written, then replaced by its real
//! size: the last snapshot admitted may take the tenant past its byte quota by its excess
//! over the estimate, and the next one is refused.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use crate::apikeys::limits_key;
use crate::sessions::tenant_meter_key;
use crate::{Connection, Result, StoreError};

const PENDING: &str = "{capsa}:snapshots:pending";

static SNAPSHOTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../lua/clock_and_reply.lua"),
        include_str!("../lua/meter.lua"),
        include_str!("snapshots.lua")
    ))
});

/// Reads a tenant's meter on Redis' clock: {bytes, gib_ms accrued to now, named_bytes,
/// reserved, count}. KEYS: meter, tenant zset.
static METER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../lua/clock_and_reply.lua"),
        r"
local now = now_ms()
local function get(f) return tonumber(redis.call('HGET', KEYS[1], f) or '0') end
local bytes = get('bytes')
local since = tonumber(redis.call('HGET', KEYS[1], 'since_ms') or now)
local gib_ms = get('gib_ms') + bytes / 1073741824 * math.max(0, now - since)
return { string.format('%.0f', bytes), string.format('%.17g', gib_ms),
  string.format('%.0f', get('named_bytes')), string.format('%.0f', get('reserved')),
  redis.call('ZCARD', KEYS[2]) }"
    ))
});

fn snapshot_key(id: &str) -> String {
    format!("{{capsa}}:snapshot:{id}")
}
fn tenant_snapshots_key(tenant: &str) -> String {
    format!("{{capsa}}:tenant:{tenant}:snapshots")
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Named by the tenant (listed, counted, billed) or made for one fork and removed after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    Named,
    Fork,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Named => "named",
            SnapshotKind::Fork => "fork",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStatus {
    /// Its node is writing it.
    Creating,
    Ready,
    /// Its files are being removed.
    Deleting,
}

/// One snapshot, as read from `{capsa}:snapshot:<id>`; times in ms on Redis' clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub id: String,
    pub tenant_id: String,
    pub kind: SnapshotKind,
    pub name: String,
    pub status: SnapshotStatus,
    /// The session it was taken of.
    pub session_id: String,
    /// The node holding its files.
    pub node_id: String,
    pub template: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub metadata: BTreeMap<String, String>,
    /// The names of the session's env (never the values, which are in the snapshot's
    /// memory); a session made from it lists them.
    pub env_names: Vec<String>,
    pub size_bytes: u64,
    pub create_ms: i64,
}

impl SnapshotRecord {
    fn from_pairs(key: &str, flat: &[String]) -> Result<Self> {
        let fields: BTreeMap<&str, &str> = flat
            .chunks_exact(2)
            .map(|p| (p[0].as_str(), p[1].as_str()))
            .collect();
        let corrupt = |reason: String| StoreError::Corrupt {
            key: key.to_owned(),
            reason,
        };
        let text = |name: &str| fields.get(name).copied().unwrap_or_default().to_owned();
        let int = |name: &str| -> Result<i64> {
            let v = fields.get(name).copied().unwrap_or("0");
            v.parse().map_err(|_| corrupt(format!("{name} is {v:?}")))
        };
        let small = |name: &str| -> Result<u32> {
            let v = int(name)?;
            u32::try_from(v).map_err(|_| corrupt(format!("{name} is {v}")))
        };
        let kind = match fields.get("kind").copied() {
            Some("named") => SnapshotKind::Named,
            Some("fork") => SnapshotKind::Fork,
            other => return Err(corrupt(format!("kind is {other:?}"))),
        };
        let status = match fields.get("status").copied() {
            Some("creating") => SnapshotStatus::Creating,
            Some("ready") => SnapshotStatus::Ready,
            Some("deleting") => SnapshotStatus::Deleting,
            other => return Err(corrupt(format!("status is {other:?}"))),
        };
        Ok(SnapshotRecord {
            id: text("id"),
            tenant_id: text("tenant"),
            kind,
            name: text("name"),
            status,
            session_id: text("session_id"),
            node_id: text("node_id"),
            template: text("template"),
            vcpus: small("vcpus")?,
            memory_mib: small("memory_mib")?,
            metadata: match fields.get("metadata") {
                None | Some(&"") => BTreeMap::new(),
                Some(v) => {
                    serde_json::from_str(v).map_err(|e| corrupt(format!("metadata: {e}")))?
                }
            },
            // Absent from records written before it was kept.
            env_names: match fields.get("env_names") {
                None | Some(&"") => Vec::new(),
                Some(v) => {
                    serde_json::from_str(v).map_err(|e| corrupt(format!("env_names: {e}")))?
                }
            },
            size_bytes: int("size_bytes")?.max(0) as u64,
            create_ms: int("create_ms")?,
        })
    }
}

/// A snapshot about to be written.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub id: String,
    pub tenant_id: String,
    pub kind: SnapshotKind,
    pub name: String,
    pub session_id: String,
    pub node_id: String,
    pub template: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub metadata: BTreeMap<String, String>,
    pub env_names: Vec<String>,
    /// Reserved against the byte quota until the real size is known.
    pub estimate_bytes: u64,
}

/// The tenant's snapshot quota: its limits hash (`max_snapshots`, `max_snapshot_bytes`),
/// else these.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotLimits {
    pub max_snapshots: u32,
    pub max_bytes: u64,
}

#[derive(Debug)]
pub enum Begun {
    Ok(Box<SnapshotRecord>),
    TooMany { limit: u32 },
    TooManyBytes { limit: u64, used: u64 },
}

/// Outcome of a step on an existing snapshot.
#[derive(Debug)]
pub enum Step {
    Won(SnapshotRecord),
    /// Not in the state the step needs: as it is now.
    Conflict(SnapshotRecord),
    Missing,
}

/// A tenant's snapshot storage, read on Redis' clock.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Meter {
    /// Named snapshots now.
    pub count: u32,
    /// Bytes of named snapshots (what the byte quota counts, with `reserved`).
    pub named_bytes: u64,
    pub reserved_bytes: u64,
    /// Bytes held now, suspended sessions' snapshots included.
    pub bytes: u64,
    /// GiB × seconds held so far.
    pub gib_seconds: f64,
}

/// Snapshot records in Redis.
#[derive(Clone)]
pub struct SnapshotStore {
    conn: Connection,
}

/// How often a step is sent again after `stale` (the record's tenant never changes, so once
/// means the caller read a record that was replaced).
const STALE_RETRIES: usize = 3;

impl SnapshotStore {
    pub fn new(conn: Connection) -> Self {
        SnapshotStore { conn }
    }

    /// Records a snapshot as creating, unless the tenant's quota refuses a named one.
    /// Pending (for the reaper) from `claim` on.
    pub async fn begin(
        &self,
        new: &NewSnapshot,
        limits: SnapshotLimits,
        claim: Duration,
    ) -> Result<Begun> {
        let key = snapshot_key(&new.id);
        let raw: Vec<String> = SNAPSHOTS
            .key(&key)
            .key(tenant_snapshots_key(&new.tenant_id))
            .key(tenant_meter_key(&new.tenant_id))
            .key(limits_key(&new.tenant_id))
            .key(PENDING)
            .arg("begin")
            .arg(&new.id)
            .arg(&new.tenant_id)
            .arg(new.kind.as_str())
            .arg(&new.name)
            .arg(&new.session_id)
            .arg(&new.node_id)
            .arg(&new.template)
            .arg(new.vcpus)
            .arg(new.memory_mib)
            .arg(serde_json::to_string(&new.metadata).expect("a map of strings serialises"))
            .arg(new.estimate_bytes)
            .arg(limits.max_snapshots)
            .arg(limits.max_bytes)
            .arg(ms(claim))
            .arg(serde_json::to_string(&new.env_names).expect("a list of strings serialises"))
            .invoke_async(&mut self.conn.clone())
            .await?;
        let num = |i: usize| raw.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match raw.first().map(String::as_str) {
            Some("quota_count") => Ok(Begun::TooMany {
                limit: num(1) as u32,
            }),
            Some("quota_bytes") => Ok(Begun::TooManyBytes {
                limit: num(1),
                used: num(2),
            }),
            Some("ok") => Ok(Begun::Ok(Box::new(SnapshotRecord::from_pairs(
                &key,
                &raw[1..],
            )?))),
            other => Err(StoreError::Corrupt {
                key,
                reason: format!("begin replied {other:?}"),
            }),
        }
    }

    /// creating → ready with its real size.
    pub async fn finish(
        &self,
        rec: &SnapshotRecord,
        size_bytes: u64,
        claim: Duration,
    ) -> Result<Step> {
        self.step(
            rec,
            "finish",
            &[size_bytes.to_string(), ms(claim).to_string()],
        )
        .await
    }

    /// Removes a snapshot that was never written (creating only).
    pub async fn abort(&self, rec: &SnapshotRecord) -> Result<Step> {
        self.step(rec, "abort", &[]).await
    }

    /// Removes the record once its files are gone.
    pub async fn remove(&self, rec: &SnapshotRecord) -> Result<Step> {
        self.step(rec, "remove", &[]).await
    }

    /// ready (or deleting) → deleting, pending from `claim` on; the tenant's own named
    /// snapshots only (another's is Missing). A creating one is a Conflict.
    pub async fn begin_delete(&self, tenant: &str, id: &str, claim: Duration) -> Result<Step> {
        let Some(rec) = self.get(tenant, id).await? else {
            return Ok(Step::Missing);
        };
        self.step(
            &rec,
            "begin_delete",
            &[tenant.to_owned(), ms(claim).to_string()],
        )
        .await
    }

    async fn step(&self, rec: &SnapshotRecord, op: &str, args: &[String]) -> Result<Step> {
        let key = snapshot_key(&rec.id);
        let mut tenant = rec.tenant_id.clone();
        for _ in 0..STALE_RETRIES {
            let mut script = SNAPSHOTS.key(&key);
            script
                .key(tenant_snapshots_key(&tenant))
                .key(tenant_meter_key(&tenant))
                .key(limits_key(&tenant))
                .key(PENDING)
                .arg(op)
                .arg(&rec.id);
            for a in args {
                script.arg(a);
            }
            let raw: Vec<String> = script.invoke_async(&mut self.conn.clone()).await?;
            match raw.first().map(String::as_str) {
                Some("stale") => {
                    let now: Option<String> = redis::cmd("HGET")
                        .arg(&key)
                        .arg("tenant")
                        .query_async(&mut self.conn.clone())
                        .await?;
                    tenant = now.unwrap_or_default();
                }
                Some("missing") | None => return Ok(Step::Missing),
                Some("ok") => return Ok(Step::Won(SnapshotRecord::from_pairs(&key, &raw[1..])?)),
                Some("conflict") => {
                    return Ok(Step::Conflict(SnapshotRecord::from_pairs(&key, &raw[1..])?));
                }
                Some(other) => {
                    return Err(StoreError::Corrupt {
                        key,
                        reason: format!("{op} replied {other}"),
                    });
                }
            }
        }
        Err(StoreError::Corrupt {
            key,
            reason: "its tenant kept changing".into(),
        })
    }

    /// Any snapshot by id, whoever owns it.
    pub async fn get_any(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        let key = snapshot_key(id);
        let flat: Vec<String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut self.conn.clone())
            .await?;
        if flat.is_empty() {
            return Ok(None);
        }
        SnapshotRecord::from_pairs(&key, &flat).map(Some)
    }

    /// The tenant's named snapshot `id`; another tenant's, or a fork's, is `None`.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Option<SnapshotRecord>> {
        Ok(self
            .get_any(id)
            .await?
            .filter(|r| r.tenant_id == tenant && r.kind == SnapshotKind::Named))
    }

    /// The tenant's named snapshots, newest first (at most its quota's count, so read
    /// whole; the caller pages).
    pub async fn list(&self, tenant: &str) -> Result<Vec<SnapshotRecord>> {
        let ids: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(tenant_snapshots_key(tenant))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn.clone())
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(rec) = self.get(tenant, &id).await? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Claims up to `limit` pending snapshots that are due, each for `claim`; returns the
    /// records this caller won (two callers never both get one).
    pub async fn claim_pending(
        &self,
        limit: usize,
        claim: Duration,
    ) -> Result<Vec<SnapshotRecord>> {
        let (now_s, _): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut self.conn.clone())
            .await?;
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(PENDING)
            .arg("-inf")
            .arg((now_s + 1) * 1000)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn.clone())
            .await?;
        let mut won = Vec::new();
        for id in due {
            match self.get_any(&id).await? {
                Some(rec) => {
                    if let Step::Won(rec) =
                        self.step(&rec, "reclaim", &[ms(claim).to_string()]).await?
                    {
                        won.push(rec);
                    }
                }
                None => {
                    let _: i64 = redis::cmd("ZREM")
                        .arg(PENDING)
                        .arg(&id)
                        .query_async(&mut self.conn.clone())
                        .await?;
                }
            }
        }
        Ok(won)
    }

    /// The tenant's snapshot quota: its overrides, else `defaults`.
    pub async fn limits(&self, tenant: &str, defaults: SnapshotLimits) -> Result<SnapshotLimits> {
        let (count, bytes): (Option<u32>, Option<u64>) = redis::cmd("HMGET")
            .arg(limits_key(tenant))
            .arg("max_snapshots")
            .arg("max_snapshot_bytes")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(SnapshotLimits {
            max_snapshots: count.unwrap_or(defaults.max_snapshots),
            max_bytes: bytes.unwrap_or(defaults.max_bytes),
        })
    }

    /// The tenant's snapshot storage now.
    pub async fn meter(&self, tenant: &str) -> Result<Meter> {
        let raw: Vec<String> = METER
            .key(tenant_meter_key(tenant))
            .key(tenant_snapshots_key(tenant))
            .invoke_async(&mut self.conn.clone())
            .await?;
        let num = |i: usize| {
            raw.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok(Meter {
            bytes: num(0) as u64,
            gib_seconds: num(1) / 1000.0,
            named_bytes: num(2) as u64,
            reserved_bytes: num(3) as u64,
            count: num(4) as u32,
        })
    }
}
