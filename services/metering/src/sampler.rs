//! The sampling loop: every interval, for each live node (from the registry), list its
//! leased VMs, read each one's counters and guest memory, and apply the sample to Redis.
//! Rounds are best effort and independent: a node or VM that fails is logged and counted,
//! and the next round tries again. Several replicas may run this loop at once; the store's
//! scripts make that safe (see `capsa_store::usage`).
//!
//! Each round also finalizes abandoned sessions: usage still open for a session that is
//! terminated (or whose record is gone) means its FinalizeSession never arrived (the
//! caller timed out or died); the last sample becomes its final record.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsa_proto::vmpool::v1::Vm;
use capsa_store::usage::{Applied, UsageStore};
use capsa_store::{NodeRecord, NodeRegistry, SessionStatus, SessionStore};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::clients::{NodeClients, Owner};
use crate::error::Error;
use crate::metrics::Metrics;

/// What one round did (for logs and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    pub nodes: usize,
    pub stored: usize,
    pub failed: usize,
    /// Abandoned sessions this round finalized.
    pub finalized: usize,
}

pub struct Sampler {
    registry: NodeRegistry,
    sessions: SessionStore,
    usage: UsageStore,
    clients: Arc<NodeClients>,
    metrics: Metrics,
    record_interval: Duration,
    concurrency: usize,
    /// Session id → owner: a session's tenant never changes, so it is read once.
    owners: Mutex<HashMap<String, Owner>>,
    guest_pacing: GuestPacing,
}

/// When a VM's guest is asked for its own figures (memory used, processes, terminals).
/// Asking wakes the guest and runs its agent, which on a node of mostly idle sessions is
/// most of what the idle VMs cost (measured under TCG: 1.9 % of a CPU per idle VM sampled
/// every 2 s, 0.65 % unsampled). Those figures change only while the guest runs, so a VM
/// whose VMM used [`GuestPacing::ACTIVE_CPU`] since its guest was last asked is asked at
/// the next round, and any other every `idle_interval`. The host-side counters (cpu,
/// resident memory, disk, network) are read every round regardless.
struct GuestPacing {
    idle_interval: Duration,
    /// VM id → (when its guest was last asked, its VMM's cpu time then).
    last: Mutex<HashMap<String, (Instant, Duration)>>,
}

impl GuestPacing {
    /// A tenth of a CPU over the default 2 s round: a busy VM is asked every round. An idle
    /// one gets there in about half a minute under TCG (an ask costs its guest ~25 ms).
    const ACTIVE_CPU: Duration = Duration::from_millis(200);

    fn new(idle_interval: Duration) -> GuestPacing {
        GuestPacing {
            idle_interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Whether to ask `vm`'s guest now, its VMM having used `cpu` in all; an ask is
    /// remembered.
    fn ask(&self, vm: &str, cpu: Duration, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap();
        let due = match last.get(vm) {
            None => true,
            Some(&(at, cpu_then)) => {
                now.saturating_duration_since(at) >= self.idle_interval
                    || cpu.saturating_sub(cpu_then) >= Self::ACTIVE_CPU
            }
        };
        if due {
            last.insert(vm.to_owned(), (now, cpu));
        }
        due
    }

    /// Forgets VMs not asked for two idle intervals (an idle VM is asked every one): gone.
    fn forget_gone(&self, now: Instant) {
        let keep = self.idle_interval * 2;
        self.last
            .lock()
            .unwrap()
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < keep);
    }
}

impl Sampler {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        registry: NodeRegistry,
        sessions: SessionStore,
        usage: UsageStore,
        clients: Arc<NodeClients>,
        metrics: Metrics,
        record_interval: Duration,
        concurrency: usize,
        guest_idle_interval: Duration,
    ) -> Sampler {
        Sampler {
            registry,
            sessions,
            usage,
            clients,
            metrics,
            record_interval,
            concurrency,
            owners: Mutex::new(HashMap::new()),
            guest_pacing: GuestPacing::new(guest_idle_interval),
        }
    }

    /// Runs a round every `interval` until `token` is cancelled. A round cut short by
    /// cancellation loses nothing: each sample is applied atomically or not at all.
    pub async fn run(self: Arc<Self>, interval: Duration, token: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = token.cancelled() => return,
            }
            let started = Instant::now();
            let span = tracing::info_span!("sample_round");
            let round = tokio::select! {
                round = self.round().instrument(span) => round,
                () = token.cancelled() => return,
            };
            self.metrics.round(started.elapsed().as_secs_f64());
            tracing::debug!(?round, "sampling round done");
        }
    }

    /// One pass over every live node.
    pub async fn round(&self) -> Round {
        let nodes = match self.registry.live_nodes().await {
            Ok(nodes) => nodes,
            Err(e) => {
                self.metrics.error("registry");
                tracing::warn!(error = %capsa_grpc::error::chain(&e), "cannot read the node registry");
                return Round {
                    failed: 1,
                    ..Round::default()
                };
            }
        };
        let urls: HashSet<&str> = nodes
            .iter()
            .flat_map(|n| [n.vmpool_url.as_str(), n.executor_url.as_str()])
            .collect();
        self.clients.retain(&urls);
        let per_node = futures::future::join_all(nodes.iter().map(|n| self.sample_node(n))).await;
        let mut round = Round {
            nodes: nodes.len(),
            ..Round::default()
        };
        let mut seen = HashSet::new();
        for (stored, failed, sessions) in per_node {
            round.stored += stored;
            round.failed += failed;
            seen.extend(sessions);
        }
        self.owners
            .lock()
            .unwrap()
            .retain(|id, _| seen.contains(id));
        self.guest_pacing.forget_gone(Instant::now());
        round.finalized = self.finalize_abandoned(&seen).await;
        round
    }

    /// Finalizes open usage of sessions not leased this round whose record says they
    /// ended (or is gone). Returns how many final records this call appended.
    async fn finalize_abandoned(&self, leased: &HashSet<String>) -> usize {
        let open = match self.usage.open_sessions().await {
            Ok(open) => open,
            Err(e) => {
                self.metrics.error("store");
                tracing::warn!(error = %capsa_grpc::error::chain(&e), "cannot list open usage");
                return 0;
            }
        };
        let mut appended = 0;
        for id in open.iter().filter(|id| !leased.contains(*id)) {
            match self.finalize_if_ended(id).await {
                Ok(true) => {
                    appended += 1;
                    self.metrics.record("final");
                    tracing::info!(session = %id, "finalized usage of an ended session nobody finalized");
                }
                Ok(false) => {}
                Err(e) => {
                    self.metrics.error("store");
                    tracing::warn!(session = %id, error = %capsa_grpc::error::chain(&e), "cannot finalize abandoned usage");
                }
            }
        }
        appended
    }

    async fn finalize_if_ended(&self, session_id: &str) -> Result<bool, Error> {
        let rec = self.sessions.get(session_id).await?;
        // Terminating: its owner finalizes (and the reaper retries a stuck teardown).
        if rec.is_some_and(|r| r.status != SessionStatus::Terminated) {
            return Ok(false);
        }
        let Some(stored) = self.usage.session(session_id).await? else {
            return Ok(false);
        };
        if stored.finalized {
            return Ok(false);
        }
        let done = self
            .usage
            .finalize(session_id, &stored.tenant_id, stored.lease_ms)
            .await?;
        Ok(done.appended)
    }

    /// Samples every leased VM of `node`; returns (stored, failed, session ids seen).
    async fn sample_node(&self, node: &NodeRecord) -> (usize, usize, Vec<String>) {
        let vms = match self.clients.leased_vms(node).await {
            Ok(vms) => vms,
            Err(e) => {
                self.metrics.error("list_vms");
                tracing::warn!(node = %node.node_id, error = %e, "cannot list vms");
                return (0, 1, Vec::new());
            }
        };
        let sessions = vms
            .iter()
            .map(|vm| capsa_store::session_of_lease(&vm.lease_id).to_owned())
            .collect();
        // Futures built up front: a closure inside the stream type trips the compiler's
        // higher-ranked lifetime check for the spawned sampler task.
        let work: Vec<_> = vms.iter().map(|vm| self.sample_vm(node, vm)).collect();
        let results: Vec<bool> = futures::stream::iter(work)
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let stored = results.iter().filter(|ok| **ok).count();
        (stored, results.len() - stored, sessions)
    }

    /// Samples one VM; false if nothing was stored.
    async fn sample_vm(&self, node: &NodeRecord, vm: &Vm) -> bool {
        let owner = match self
            .owner(capsa_store::session_of_lease(&vm.lease_id))
            .await
        {
            Ok(Some(owner)) => owner,
            Ok(None) => {
                // Leased under an id that is no session (yet, or any more): nobody to bill.
                tracing::debug!(vm = %vm.id, lease = %vm.lease_id, "lease without a session");
                return false;
            }
            Err(e) => {
                self.metrics.error("session");
                tracing::warn!(error = %capsa_grpc::error::chain(&e), "cannot read session");
                return false;
            }
        };
        let ask_guest = |cpu| self.guest_pacing.ask(&vm.id, cpu, Instant::now());
        let reading = match self.clients.read(node, vm, &owner, ask_guest).await {
            Ok(reading) => reading,
            // Deleted or stopped since the node listed it: the final sample covers it.
            Err(e) if e.is_vm_gone() => {
                tracing::debug!(vm = %vm.id, error = %e, "vm stopped before its sample");
                return false;
            }
            Err(e) => {
                self.metrics.error("counters");
                tracing::warn!(vm = %vm.id, error = %e, "cannot read vm counters");
                return false;
            }
        };
        if let Some(e) = &reading.guest_error {
            self.metrics.error("guest_stats");
            tracing::debug!(vm = %vm.id, error = %e, "guest stats missing from sample");
        }
        match self
            .usage
            .apply_sample(&reading.sample, Some(self.record_interval))
            .await
        {
            Ok(applied) => {
                self.metrics.sample();
                if applied == Applied::StoredWithRecord {
                    self.metrics.record("interim");
                    tracing::info!(session = %owner.session_id, "interim usage record appended");
                }
                !matches!(applied, Applied::Finalized | Applied::Parked)
            }
            Err(e) => {
                self.metrics.error("store");
                tracing::warn!(error = %capsa_grpc::error::chain(&e), "cannot store sample");
                false
            }
        }
    }

    async fn owner(&self, session_id: &str) -> Result<Option<Owner>, Error> {
        if let Some(owner) = self.owners.lock().unwrap().get(session_id) {
            return Ok(Some(owner.clone()));
        }
        let Some(rec) = self.sessions.get(session_id).await? else {
            return Ok(None);
        };
        let owner = Owner {
            session_id: rec.id,
            tenant_id: rec.tenant_id,
            fallback_lease_ms: rec.create_ms,
        };
        self.owners
            .lock()
            .unwrap()
            .insert(session_id.to_owned(), owner.clone());
        Ok(Some(owner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_guest_is_asked_each_idle_interval_and_a_busy_one_every_time() {
        let pacing = GuestPacing::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let cpu = Duration::from_millis;
        assert!(pacing.ask("vm-1", cpu(0), t0), "never asked yet");
        // Idle: under 200 ms of cpu since the last ask.
        assert!(!pacing.ask("vm-1", cpu(20), at(2)));
        assert!(!pacing.ask("vm-1", cpu(190), at(29)));
        assert!(
            pacing.ask("vm-1", cpu(195), at(30)),
            "the idle interval is up"
        );
        // Busy: a burst, then half a CPU over the next 2 s.
        assert!(pacing.ask("vm-1", cpu(400), at(31)));
        assert!(pacing.ask("vm-1", cpu(1400), at(33)));
        // A VM restored from a suspend starts its cpu time again: asked at its first sight.
        assert!(pacing.ask("vm-2", cpu(0), at(33)));
        pacing.forget_gone(at(64));
        assert!(pacing.ask("vm-1", cpu(1400), at(64)));
        pacing.forget_gone(at(94));
        let known: Vec<String> = pacing.last.lock().unwrap().keys().cloned().collect();
        assert_eq!(known, ["vm-1"], "vm-2 went unasked for two intervals");
    }
}
