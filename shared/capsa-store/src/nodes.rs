//! The node registry: each KVM host's vm-pool announces itself with a heartbeat.
//!
//! Layout: `{capsa}:node:<id>` holds the [`NodeRecord`] as JSON with a millisecond TTL, and
//! the set `{capsa}:nodes` lists every id announced and not yet forgotten. A node is live
//! while its key exists. A node whose key is gone (it died without saying goodbye, shut
//! down, or only stalled: a stopped or CPU-starved process misses beats too) is *lapsed*:
//! it stays in `{capsa}:nodes` while sessions still name it, so the reconciler can judge it
//! ([`NodeRegistry::live_and_lapsed`]), and is forgotten once it has none. For that
//! judgement the last record stays in `{capsa}:node:<id>:last` (no TTL: the URLs to ask the
//! node directly) and `{capsa}:nodes:lapsed_since` holds, per lapsed node, when a reconciler
//! first saw it lapsed (Redis clock; 0 for a graceful remove, which is not a stall).
//! Only the reconciler's view, heartbeats and a graceful remove write: placement and
//! sampling read [`NodeRegistry::live_nodes`] on their hot paths.

use std::sync::LazyLock;
use std::time::Duration;

use crate::Connection;
use redis::AsyncCommands as _;
use redis::Script;
use serde::{Deserialize, Serialize};

use crate::sessions::node_sessions_key;
use crate::{Result, StoreError};

pub(crate) const NODES_SET: &str = "{capsa}:nodes";
const LAPSED_SINCE: &str = "{capsa}:nodes:lapsed_since";

/// Forgets a node, atomically, only if its record is gone and no session names it.
/// KEYS: node key, its sessions set, `{capsa}:nodes`, its last record, lapsed-since hash;
/// ARGV: node id.
static FORGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[4])
  redis.call('HDEL', KEYS[5], ARGV[1])
  return redis.call('SREM', KEYS[3], ARGV[1])
end
return 0",
    )
});

/// Marks a lapsed node (first sighting wins) and returns how long it has been lapsed, in ms
/// on Redis' clock, or -1 after a graceful remove (marked since 0: no grace is due).
/// KEYS: lapsed-since hash; ARGV: node id.
static MARK_LAPSED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        &[
            crate::CLOCK_AND_REPLY_LUA,
            r"
local now = now_ms()
redis.call('HSETNX', KEYS[1], ARGV[1], now)
local since = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if since == 0 then return -1 end
return now - since",
        ]
        .concat(),
    )
});

fn node_key(node_id: &str) -> String {
    format!("{{capsa}}:node:{node_id}")
}

fn last_record_key(node_id: &str) -> String {
    format!("{{capsa}}:node:{node_id}:last")
}

/// A node whose heartbeat lapsed while sessions still name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LapsedNode {
    pub node_id: String,
    /// Its last heartbeat's record (how to reach it), if one was kept.
    pub last: Option<NodeRecord>,
    /// Since the first reconciler pass that saw it lapsed; `Duration::MAX` after a
    /// graceful remove (the node said it is going).
    pub lapsed_for: Duration,
}
/// What a node announces about itself on every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Stable id of the KVM host.
    pub node_id: String,
    /// gRPC URL of the node's vm-pool (`http://host:port`).
    pub vmpool_url: String,
    /// gRPC URL of the node's executor.
    pub executor_url: String,
    /// The VM engine in use: "cloud-hypervisor", "qemu-kvm" or "qemu-tcg".
    pub engine: String,
    /// How many VMs the node may lease at once.
    pub capacity: u32,
    /// VMs leased right now.
    pub leased: u32,
    /// Warm VMs waiting in the pool.
    pub warm: u32,
    /// Templates the node can boot, sorted. Session-manager places a create only on a node
    /// that offers its template, and refuses an unknown template before storing anything.
    /// (Absent in records of older nodes: read as none.)
    #[serde(default)]
    pub templates: Vec<String>,
    /// Room for VMs in memory and vCPUs, what placement weighs. (Absent in records of
    /// older nodes: placement then counts VM slots only.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<NodeResources>,
    /// When the node wrote this record (its own clock, ms since the Unix epoch).
    pub heartbeat_ms: i64,
}

/// A node's room for VMs, counted as its vm-pool admits them: each VM takes its guest RAM
/// plus the VMM's overhead, and its vCPUs. VMs leased (or booting for a lease) count as
/// used; warm VMs and refills count as free (a lease takes them, a cold boot evicts them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResources {
    /// Memory (MiB) the node's VMs may take together.
    pub memory_mib: u64,
    /// vCPUs the node's VMs may have together.
    pub vcpus: u32,
    pub free_memory_mib: u64,
    pub free_vcpus: u32,
    /// VMs the node may still start (its cap on VMs, whatever their size).
    pub free_vms: u32,
    /// Memory (MiB) a VM takes beyond its guest RAM.
    pub vm_overhead_mib: u32,
    /// Each template's VM shape: what a create that leaves vcpus or memory at 0 gets.
    pub shapes: std::collections::BTreeMap<String, VmSize>,
}

/// vCPUs and guest memory of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

impl NodeRecord {
    /// Leases the node can still hand out (`capacity - leased`, never negative).
    pub fn free(&self) -> u32 {
        self.capacity.saturating_sub(self.leased)
    }
}

/// Reads and writes node records. Cheap to clone.
#[derive(Clone)]
pub struct NodeRegistry {
    conn: Connection,
}

impl NodeRegistry {
    /// A registry over an open connection (see [`crate::connect`]).
    pub fn new(conn: Connection) -> Self {
        Self { conn }
    }

    /// Stores `rec` under `{capsa}:node:<id>` for `ttl` and adds the id to `{capsa}:nodes`, in
    /// one MULTI so a reader never sees the id without its record's first version.
    /// Call it well within `ttl` (e.g. every ttl/3) to stay live.
    pub async fn heartbeat(&self, rec: &NodeRecord, ttl: Duration) -> Result<()> {
        let json = serde_json::to_string(rec).map_err(|e| StoreError::Corrupt {
            key: node_key(&rec.node_id),
            reason: e.to_string(),
        })?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(node_key(&rec.node_id))
            .arg(&json)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .set(last_record_key(&rec.node_id), &json)
            .ignore()
            .sadd(NODES_SET, &rec.node_id)
            .ignore()
            // Beating again ends a lapse: the next one is timed from its own start.
            .hdel(LAPSED_SINCE, &rec.node_id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Takes a node out of service at once (graceful shutdown), instead of waiting for its
    /// TTL: it counts as lapsed for ever (no grace), and is forgotten as soon as no session
    /// names it.
    pub async fn remove(&self, node_id: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .del(node_key(node_id))
            .ignore()
            .hset(LAPSED_SINCE, node_id, 0)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        self.forget(node_id).await.map(drop)
    }

    /// Whether the node was forgotten (see [`FORGET`]).
    async fn forget(&self, node_id: &str) -> Result<bool> {
        let removed: i64 = FORGET
            .key(node_key(node_id))
            .key(node_sessions_key(node_id))
            .key(NODES_SET)
            .key(last_record_key(node_id))
            .key(LAPSED_SINCE)
            .arg(node_id)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(removed == 1)
    }

    /// One live node's record, if its heartbeat has not expired.
    pub async fn get(&self, node_id: &str) -> Result<Option<NodeRecord>> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn.get(node_key(node_id)).await?;
        raw.map(|json| parse(node_id, &json)).transpose()
    }

    /// Every node whose heartbeat has not expired, sorted by id. Read-only.
    pub async fn live_nodes(&self) -> Result<Vec<NodeRecord>> {
        Ok(self.scan().await?.0)
    }

    /// The reconciler's view, from one read: the live nodes, and the lapsed nodes that
    /// sessions still name (marking when each was first seen lapsed), both sorted by id.
    /// Lapsed nodes no session names are forgotten on the way.
    pub async fn live_and_lapsed(&self) -> Result<(Vec<NodeRecord>, Vec<LapsedNode>)> {
        let (live, lapsed) = self.scan().await?;
        let mut named = Vec::with_capacity(lapsed.len());
        for node_id in lapsed {
            // A heartbeat racing this re-adds its id on the next beat (SADD is in every
            // heartbeat), so forgetting never loses a live node for longer than a beat.
            if self.forget(&node_id).await? {
                continue;
            }
            let mut conn = self.conn.clone();
            let last: Option<String> = conn.get(last_record_key(&node_id)).await?;
            let last = last.map(|json| parse(&node_id, &json)).transpose()?;
            let lapsed_ms: i64 = MARK_LAPSED
                .key(LAPSED_SINCE)
                .arg(&node_id)
                .invoke_async(&mut conn)
                .await?;
            let lapsed_for = u64::try_from(lapsed_ms).map_or(Duration::MAX, Duration::from_millis);
            named.push(LapsedNode {
                node_id,
                last,
                lapsed_for,
            });
        }
        Ok((live, named))
    }

    /// The ids of the lapsed half of [`NodeRegistry::live_and_lapsed`].
    pub async fn lapsed_nodes(&self) -> Result<Vec<String>> {
        Ok(self
            .live_and_lapsed()
            .await?
            .1
            .into_iter()
            .map(|n| n.node_id)
            .collect())
    }

    /// Splits `{capsa}:nodes` into live records and lapsed ids, both sorted.
    async fn scan(&self) -> Result<(Vec<NodeRecord>, Vec<String>)> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn.smembers(NODES_SET).await?;
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let keys: Vec<String> = ids.iter().map(|id| node_key(id)).collect();
        let values: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut live = Vec::with_capacity(ids.len());
        let mut lapsed = Vec::new();
        for (id, value) in ids.into_iter().zip(values) {
            match value {
                Some(json) => live.push(parse(&id, &json)?),
                None => lapsed.push(id),
            }
        }
        live.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        lapsed.sort();
        Ok((live, lapsed))
    }
}

fn parse(node_id: &str, json: &str) -> Result<NodeRecord> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        key: node_key(node_id),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_never_goes_negative() {
        let mut rec = NodeRecord {
            node_id: "n".into(),
            vmpool_url: String::new(),
            executor_url: String::new(),
            engine: "qemu-tcg".into(),
            capacity: 4,
            leased: 1,
            warm: 0,
            templates: vec!["default".into()],
            resources: None,
            heartbeat_ms: 0,
        };
        assert_eq!(rec.free(), 3);
        rec.leased = 9;
        assert_eq!(rec.free(), 0);
    }
}
