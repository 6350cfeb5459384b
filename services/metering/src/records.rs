//! Keeps the usage-record stream bounded: every interval, the entries every consumer group
//! has acknowledged are dropped (`capsa_store::usage::UsageStore::trim_acknowledged`).
//! Replicas may all run it; trimming is idempotent.

use std::time::Duration;

use capsa_store::usage::{Trimmed, UsageStore};
use tokio_util::sync::CancellationToken;

/// Trims every `interval` until `stop` is cancelled.
pub async fn trim_loop(usage: UsageStore, interval: Duration, stop: CancellationToken) {
    let mut warned_no_group = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match usage.trim_acknowledged().await {
            Ok(Trimmed::Entries(0)) => {}
            Ok(Trimmed::Entries(n)) => tracing::debug!(trimmed = n, "usage records trimmed"),
            Ok(Trimmed::NoConsumerGroup) if !warned_no_group => {
                warned_no_group = true;
                tracing::info!(
                    stream = capsa_store::usage::RECORDS_STREAM,
                    "no consumer group reads the usage records yet; keeping every record"
                );
            }
            Ok(Trimmed::NoConsumerGroup) => {}
            Err(e) => tracing::warn!(error = %e, "trimming usage records failed"),
        }
    }
}
