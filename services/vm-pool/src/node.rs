//! The node's entry in the Redis registry: a heartbeat every second with a 3 s TTL
//! carrying this node's URLs, engine and free capacity, so session-manager places sessions
//! only on live nodes with room. Removed at graceful shutdown; a crashed node drops out
//! when its TTL passes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsa_store::{NodeRecord, NodeRegistry};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::pool::Pool;

pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(3);

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
        heartbeat_ms: now_ms,
    }
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

/// Beats until `stop` is cancelled, then removes the record.
pub async fn heartbeat_loop(
    registry: NodeRegistry,
    identity: NodeIdentity,
    pool: Pool,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        if let Err(e) = registry
            .heartbeat(&record(&identity, &pool), HEARTBEAT_TTL)
            .await
        {
            tracing::warn!(error = %capsa_grpc::error::chain(&e), "node heartbeat failed; retrying");
        }
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
