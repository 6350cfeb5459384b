//! Background loops every replica runs.
//!
//! - The **reaper** claims due sessions (see `capsa_store::sessions`: expired ACTIVE or
//!   SUSPENDED ones, CREATING ones past their creation bound, TERMINATING ones whose
//!   teardown claim ran out) and tears each down; an ACTIVE one with auto_suspend is
//!   suspended instead, and a suspend or resume whose replica died is redone. It sleeps until the next deadline, at most the configured
//!   interval (250 ms), so a session ends within a second of its deadline. Claims are
//!   atomic, so replicas share the work and never both end one session.
//! - It also settles snapshot steps whose replica died (`crate::snapshots`).
//! - The **reconciler** compares each live node's VMs with the sessions: it releases
//!   leased (or failed) VMs that no session owns (the session is gone, ended without
//!   knowing this VM, e.g. a create that died after AcquireVm or whose cold boots failed,
//!   or ended while the node was not heartbeating so its teardown could not release the
//!   VM), and ends ACTIVE sessions whose VM failed or disappeared (VM_FAILED). It also
//!   judges nodes whose heartbeat lapsed: one that still answers ListVms is reconciled like
//!   a live one (a missed beat is not a lost VM); one that does not answer for the grace
//!   period (`--node-grace-secs`) has its ACTIVE sessions ended, so they do not stay
//!   ACTIVE until their deadline finds out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use capsa_proto::vmpool::v1::{ListVmsRequest, VmState};
use capsa_store::{LapsedNode, NodeRecord, SessionStatus};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::clients::with_timeout;
use crate::suspend::Step;
use crate::teardown::vm_failure;

const CLAIM_BATCH: usize = 100;
const MAX_CONCURRENT_TEARDOWNS: usize = 64;
const LIST_VMS_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of the direct question to a lapsed node: one that is stopped accepts the
/// connection and never answers, and the reconciler's other nodes wait meanwhile.
const LAPSED_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the reaper until `stop` is cancelled.
pub async fn reaper(app: Arc<App>, stop: CancellationToken) {
    let interval = Duration::from_millis(app.config.reaper_interval_ms);
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_TEARDOWNS));
    loop {
        let mut sleep = interval;
        match app.sessions.claim_due(CLAIM_BATCH).await {
            Ok(claimed) => {
                if claimed.len() == CLAIM_BATCH {
                    sleep = Duration::ZERO; // more are due right now
                }
                for c in claimed {
                    let app = app.clone();
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    tokio::spawn(async move {
                        let _permit = permit;
                        tracing::info!(session_id = %c.id, kind = %c.kind, "claimed for teardown");
                        match app.sessions.get(&c.id).await {
                            // At its deadline with auto_suspend, or a step whose replica
                            // died: suspend or resume it (each step is idempotent).
                            Ok(Some(rec)) if rec.status == SessionStatus::Suspending => {
                                let _ = app.spawn_step(rec, Step::Suspend).await;
                            }
                            Ok(Some(rec)) if rec.status == SessionStatus::Resuming => {
                                let _ = app.spawn_step(rec, Step::Resume).await;
                            }
                            Ok(Some(rec)) => {
                                let _ = app.teardown(rec).await;
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(session_id = %c.id, error = %e, "cannot read claimed session")
                            }
                        }
                    });
                }
                if !sleep.is_zero()
                    && let Ok(Some(next)) = app.sessions.next_due_in().await
                {
                    sleep = sleep.min(next);
                }
            }
            Err(e) => tracing::warn!(error = %e, "claiming due sessions failed"),
        }
        settle_snapshots(&app, &permits).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// Finishes the snapshot steps whose replica died (`App::settle_snapshot`), each in its
/// own task; claimed for a teardown's claim time, so a slow node is not asked twice at once.
async fn settle_snapshots(app: &Arc<App>, permits: &Arc<Semaphore>) {
    let claim = app.config.claim_ttl() + app.config.suspend_timeout();
    let pending = match app.snapshots.claim_pending(CLAIM_BATCH, claim).await {
        Ok(pending) => pending,
        Err(e) => {
            tracing::warn!(error = %e, "claiming pending snapshots failed");
            return;
        }
    };
    for snap in pending {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let id = snap.id.clone();
            if let Err(e) = app.settle_snapshot(snap).await {
                tracing::warn!(snapshot_id = %id, error = %e, "snapshot not settled; tried again later");
            }
        });
    }
}

/// Runs the reconciler until `stop` is cancelled.
pub async fn reconciler(app: Arc<App>, stop: CancellationToken) {
    let interval = Duration::from_millis(app.config.reconcile_interval_ms);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if let Ok(open) = app.sessions.open_count().await {
            app.open_sessions
                .store(open, std::sync::atomic::Ordering::Relaxed);
        }
        match app.nodes.live_and_lapsed().await {
            Ok((live, lapsed)) => {
                for node in live {
                    reconcile_node(&app, &node).await;
                }
                for node in lapsed {
                    judge_lapsed_node(&app, &node).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing nodes failed"),
        }
    }
}

/// A node that stopped heartbeating: asked directly first. If it answers, it is reconciled
/// like a live node. If it does not, and has been lapsed for the grace period, every ACTIVE
/// session on it ends: its VMs are presumed dead with it. Their teardown finds the node gone
/// and finishes without a release; if the node comes back, its still-leased VMs are
/// released as orphans.
#[tracing::instrument(skip_all, fields(node = %lapsed.node_id))]
async fn judge_lapsed_node(app: &Arc<App>, lapsed: &LapsedNode) {
    if let Some(last) = &lapsed.last
        && list_vms(app, last, LAPSED_PROBE_TIMEOUT).await.is_ok()
    {
        tracing::warn!(
            lapsed_for = ?lapsed.lapsed_for,
            "node answers but its heartbeat lapsed (is its Redis link down?)"
        );
        return reconcile_node(app, last).await;
    }
    let grace = Duration::from_secs(app.config.node_grace_secs);
    if lapsed.lapsed_for < grace {
        tracing::info!(lapsed_for = ?lapsed.lapsed_for, ?grace, "node silent, within its grace");
        return;
    }
    let node_id = lapsed.node_id.as_str();
    let session_ids = match app.sessions.node_sessions(node_id).await {
        Ok(ids) => ids,
        Err(e) => return tracing::warn!(error = %e, "reading node sessions failed"),
    };
    let failure = if lapsed.lapsed_for == Duration::MAX {
        format!("node {node_id} shut down")
    } else {
        format!(
            "node {node_id} stopped heartbeating and has not answered for {}s",
            lapsed.lapsed_for.as_secs()
        )
    };
    for id in session_ids {
        let Ok(Some(rec)) = app.sessions.get(&id).await else {
            continue;
        };
        if rec.status == SessionStatus::Active && rec.node_id == node_id {
            let _ = app.end_vm_failed(&id, &failure).await;
        }
    }
}

#[tracing::instrument(skip_all, fields(node = %node.node_id))]
async fn reconcile_node(app: &Arc<App>, node: &NodeRecord) {
    // Read the node's sessions before its VMs: a session activated after this read is not
    // judged against a VM list that may predate its lease.
    let session_ids = match app.sessions.node_sessions(&node.node_id).await {
        Ok(ids) => ids,
        Err(e) => return tracing::warn!(error = %e, "reading node sessions failed"),
    };
    // On Redis' clock, like the sessions' end times.
    let Ok(listed_after_ms) = app.sessions.now_ms().await else {
        return;
    };
    let vms = match list_vms(app, node, LIST_VMS_TIMEOUT).await {
        Ok(vms) => vms,
        Err(e) => return tracing::warn!(error = %e, "ListVms failed"),
    };
    let by_id: HashMap<&str, _> = vms.iter().map(|vm| (vm.id.as_str(), vm)).collect();

    // Failed VMs too: a cold boot that failed for a lease was never handed out, so its
    // session (ended CREATE_FAILED, without a vm) will never release it.
    let leased_or_failed = |vm: &&capsa_proto::vmpool::v1::Vm| {
        (vm.state == VmState::Leased as i32 || vm.state == VmState::Failed as i32)
            && !vm.lease_id.is_empty()
    };
    for vm in vms.iter().filter(leased_or_failed) {
        let orphan = match app
            .sessions
            .get(capsa_store::session_of_lease(&vm.lease_id))
            .await
        {
            Ok(None) => true,
            // A teardown releases the VM before it marks the session TERMINATED, so a VM
            // still leased to a session that terminated before this listing began was not
            // released (the node was not heartbeating then). One that terminated later
            // may be this listing's staleness: its teardown released it.
            Ok(Some(rec)) => {
                rec.status == SessionStatus::Terminated
                    && (rec.vm_id != vm.id || rec.end_ms.is_some_and(|t| t < listed_after_ms))
            }
            Err(_) => false,
        };
        if orphan {
            tracing::info!(vm = %vm.id, lease = %vm.lease_id, "releasing a vm no session owns");
            app.release_vm(&node.node_id, &vm.id).await;
        }
    }

    for id in session_ids {
        let Ok(Some(rec)) = app.sessions.get(&id).await else {
            continue;
        };
        if rec.status != SessionStatus::Active || rec.node_id != node.node_id {
            continue;
        }
        // Resumed after this listing began: its new VM may be missing from it.
        if rec.resume_ms.is_some_and(|t| t >= listed_after_ms) {
            continue;
        }
        let failure = match by_id.get(rec.vm_id.as_str()) {
            None => format!("vm {} is gone from node {}", rec.vm_id, node.node_id),
            Some(vm) => match vm_failure(vm) {
                Some(failure) => failure,
                None => continue,
            },
        };
        let _ = app.end_vm_failed(&id, &failure).await;
    }
}

/// The node's VMs, asked of its vm-pool within `timeout`.
async fn list_vms(
    app: &Arc<App>,
    node: &NodeRecord,
    timeout: Duration,
) -> Result<Vec<capsa_proto::vmpool::v1::Vm>, String> {
    let mut client = app
        .clients
        .vmpool(&node.vmpool_url)
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(
        timeout,
        client.list_vms(with_timeout(ListVmsRequest {}, timeout)),
    )
    .await
    {
        Ok(Ok(resp)) => Ok(resp.into_inner().vms),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
