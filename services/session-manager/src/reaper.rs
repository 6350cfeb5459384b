//! Background loops every replica runs.
//!
//! - The **reaper** claims due sessions (see `capsa_store::sessions`: expired ACTIVE ones,
//!   CREATING ones past their creation bound, TERMINATING ones whose teardown claim ran
//!   out) and tears each down. It sleeps until the next deadline, at most the configured
//!   interval (250 ms), so a session ends within a second of its deadline. Claims are
//!   atomic, so replicas share the work and never both end one session.
//! - The **reconciler** compares each live node's VMs with the sessions: it releases
//!   leased VMs that no session owns (the session is gone, ended without knowing this VM,
//!   e.g. a create that died after AcquireVm, or ended while the node was not heartbeating
//!   so its teardown could not release the VM), and ends ACTIVE sessions whose VM failed
//!   or disappeared (VM_FAILED). It also ends the ACTIVE sessions of nodes whose heartbeat
//!   lapsed, so they do not stay ACTIVE until a call or their deadline finds out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use capsa_proto::vmpool::v1::{ListVmsRequest, VmState};
use capsa_store::{NodeRecord, SessionStatus};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::clients::with_timeout;
use crate::teardown::vm_failure;

const CLAIM_BATCH: usize = 100;
const MAX_CONCURRENT_TEARDOWNS: usize = 64;
const LIST_VMS_TIMEOUT: Duration = Duration::from_secs(5);

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
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(sleep) => {}
        }
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
                for id in lapsed {
                    sweep_lapsed_node(&app, &id).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing nodes failed"),
        }
    }
}

/// Ends every ACTIVE session on a node that stopped heartbeating: its VMs are presumed
/// dead with it. Their teardown finds the node gone and finishes without a release; if
/// the node comes back, its still-leased VMs are released as orphans.
#[tracing::instrument(skip_all, fields(node = %node_id))]
async fn sweep_lapsed_node(app: &Arc<App>, node_id: &str) {
    let session_ids = match app.sessions.node_sessions(node_id).await {
        Ok(ids) => ids,
        Err(e) => return tracing::warn!(error = %e, "reading node sessions failed"),
    };
    let failure = format!("node {node_id} stopped heartbeating");
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
    let Ok(mut client) = app.clients.vmpool(&node.vmpool_url) else {
        return;
    };
    // On Redis' clock, like the sessions' end times.
    let Ok(listed_after_ms) = app.sessions.now_ms().await else {
        return;
    };
    let vms = match tokio::time::timeout(
        LIST_VMS_TIMEOUT,
        client.list_vms(with_timeout(ListVmsRequest {}, LIST_VMS_TIMEOUT)),
    )
    .await
    {
        Ok(Ok(resp)) => resp.into_inner().vms,
        Ok(Err(status)) => return tracing::warn!(error = %status.message(), "ListVms failed"),
        Err(_) => return tracing::warn!("ListVms timed out"),
    };
    let by_id: HashMap<&str, _> = vms.iter().map(|vm| (vm.id.as_str(), vm)).collect();

    for vm in vms
        .iter()
        .filter(|vm| vm.state == VmState::Leased as i32 && !vm.lease_id.is_empty())
    {
        let orphan = match app.sessions.get(&vm.lease_id).await {
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
