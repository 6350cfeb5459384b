//! The node's entry in the Redis registry: a heartbeat every second with a 3 s TTL
//! carrying this node's URLs, engine and free capacity (memory and vCPUs, as the pool
//! admits VMs), so session-manager places sessions only on live nodes with room, on the
//! one with the most. A change of that capacity (a lease, a release) is announced within
//! [`CHANGE_POLL`] instead of at the next beat, so creates in a row see each other's
//! leases. Removed at graceful shutdown; a crashed node drops out when its TTL passes.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsa_store::{NodeRecord, NodeRegistry, NodeResources, VmSize};
use tokio_util::sync::CancellationToken;

use crate::capacity::Usage;
use crate::error::Error;
use crate::pool::Pool;

pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(3);
/// How often the record is compared with the last one announced.
const CHANGE_POLL: Duration = Duration::from_millis(100);

/// Identity published in the record.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_id: String,
    pub vmpool_url: String,
    pub executor_url: String,
}

/// The record describing `pool` now.
pub fn record(identity: &NodeIdentity, pool: &Pool) -> NodeRecord {
    let counts = pool.counts();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    NodeRecord {
        node_id: identity.node_id.clone(),
        vmpool_url: identity.vmpool_url.clone(),
        executor_url: identity.executor_url.clone(),
        engine: pool.engine().kind.as_str().to_owned(),
        capacity: pool.capacity(),
        leased: counts.leased,
        warm: counts.warm,
        templates: pool.template_names(),
        resources: Some(resources(pool)),
        heartbeat_ms: now_ms,
    }
}

/// The pool's room for sessions: VMs leased (or booting for a lease) count as used; warm
/// VMs and refills booting to become warm count as free, since a lease takes them or a
/// cold boot evicts them. (Near full, a refill still booting can make the pool refuse a
/// cold boot the record said fits: that create fails, and the next beat shows the node full.)
fn resources(pool: &Pool) -> NodeResources {
    let settings = &pool.0.settings;
    let used = {
        let st = pool.0.lock();
        let mut used = Usage::default();
        for e in st.vms.values() {
            let i = e.info.borrow();
            if i.state.is_live() && i.lease_id.is_some() {
                used.vms += 1;
                used.memory_mib += u64::from(i.memory_mib);
                used.vcpus += i.vcpus;
            }
        }
        used
    };
    let used_memory = used.memory_mib + u64::from(used.vms) * u64::from(settings.vm_overhead_mib);
    NodeResources {
        memory_mib: settings.capacity_memory_mib,
        vcpus: settings.capacity_vcpus,
        free_memory_mib: settings.capacity_memory_mib.saturating_sub(used_memory),
        free_vcpus: settings.capacity_vcpus.saturating_sub(used.vcpus),
        free_vms: settings.capacity.saturating_sub(used.vms),
        vm_overhead_mib: settings.vm_overhead_mib,
        shapes: pool
            .0
            .templates
            .values()
            .map(|t| {
                let size = VmSize {
                    vcpus: t.vcpus,
                    memory_mib: t.memory_mib,
                };
                (t.name.clone(), size)
            })
            .collect(),
    }
}

/// Whether two records announce the same thing (they differ in their time anyway).
fn same_announcement(a: &NodeRecord, b: &NodeRecord) -> bool {
    NodeRecord {
        heartbeat_ms: b.heartbeat_ms,
        ..a.clone()
    } == *b
}

/// Connects to Redis and announces the node once, so a bad URL fails start-up.
pub async fn connect(
    redis_url: &str,
    identity: &NodeIdentity,
    pool: &Pool,
) -> Result<NodeRegistry, Error> {
    let registry = NodeRegistry::new(capsa_store::connect(redis_url).await?);
    registry
        .heartbeat(&record(identity, pool), HEARTBEAT_TTL)
        .await?;
    Ok(registry)
}

/// Beats every [`HEARTBEAT_EVERY`], and within [`CHANGE_POLL`] of a change, until `stop`
/// is cancelled; then removes the record.
pub async fn heartbeat_loop(
    registry: NodeRegistry,
    identity: NodeIdentity,
    pool: Pool,
    stop: CancellationToken,
) {
    // `connect` announced the node just before.
    let mut last = record(&identity, &pool);
    let mut last_beat = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHANGE_POLL) => {}
            _ = stop.cancelled() => break,
        }
        let rec = record(&identity, &pool);
        if same_announcement(&last, &rec) && last_beat.elapsed() < HEARTBEAT_EVERY {
            continue;
        }
        // A failure is retried at the next beat, not at every poll.
        last_beat = Instant::now();
        if let Err(e) = registry.heartbeat(&rec, HEARTBEAT_TTL).await {
            tracing::warn!(error = %capsa_grpc::error::chain(&e), "node heartbeat failed; retrying");
        }
        last = rec;
    }
    match registry.remove(&identity.node_id).await {
        Ok(()) => tracing::info!(node = %identity.node_id, "node record removed"),
        Err(e) => {
            tracing::warn!(error = %capsa_grpc::error::chain(&e), "removing the node record failed")
        }
    }
}

/// The hostname, for a default node id.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> NodeRecord {
        NodeRecord {
            node_id: "n".into(),
            vmpool_url: "http://n:1".into(),
            executor_url: "http://n:2".into(),
            engine: "qemu-tcg".into(),
            capacity: 4,
            leased: 0,
            warm: 1,
            templates: vec!["default".into()],
            resources: Some(NodeResources {
                memory_mib: 3328,
                vcpus: 4,
                free_memory_mib: 3328,
                free_vcpus: 4,
                free_vms: 4,
                vm_overhead_mib: 320,
                shapes: Default::default(),
            }),
            heartbeat_ms: 1,
        }
    }

    #[test]
    fn only_a_change_of_what_is_announced_is_a_change() {
        let a = rec();
        let later = NodeRecord {
            heartbeat_ms: 2,
            ..rec()
        };
        assert!(same_announcement(&a, &later));
        let mut leased = later.clone();
        leased.leased = 1;
        assert!(!same_announcement(&a, &leased));
        let mut less_free = later;
        if let Some(r) = less_free.resources.as_mut() {
            r.free_memory_mib -= 832;
        }
        assert!(!same_announcement(&a, &less_free));
    }
}
