//! Ending a session, after the caller won its move to TERMINATING: finalize its usage
//! (best effort, bounded), release its VM (retried; exactly one replica does this per
//! session, because only the winner of the transition gets here), delete its snapshot if
//! it was suspended, then mark it TERMINATED.
//! A teardown that cannot release the VM leaves the session TERMINATING; when its claim
//! runs out the reaper of any replica takes it over.

use std::time::Duration;

use std::sync::Arc;

use capsa_proto::metering::v1::FinalizeSessionRequest;
use capsa_proto::vmpool::v1::{ReleaseVmRequest, Vm, VmState};
use capsa_store::{EndReason, SessionRecord, SessionStatus, Transition};

use crate::app::App;
use crate::clients::with_timeout;
use crate::error::Error;

const RELEASE_ATTEMPTS: u32 = 4;
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a release went.
enum Released {
    Done,
    /// The node stopped heartbeating: its VMs died with it.
    NodeGone,
}

/// Why a VM its node still lists can no longer serve its session, if it cannot.
pub fn vm_failure(vm: &Vm) -> Option<String> {
    if vm.state == VmState::Failed as i32 {
        Some(format!("vm {} failed: {}", vm.id, vm.failure))
    } else if vm.state == VmState::Destroyed as i32 {
        Some(format!("vm {} was destroyed", vm.id))
    } else {
        None
    }
}

impl App {
    /// Ends an ACTIVE session as VM_FAILED; the winner's teardown runs in the background.
    /// The transition tells a caller that lost why (another path ended the session first).
    pub async fn end_vm_failed(
        self: &Arc<Self>,
        session_id: &str,
        why: &str,
    ) -> Result<Transition, capsa_store::StoreError> {
        let transition = self
            .sessions
            .begin_end(
                session_id,
                EndReason::VmFailed,
                why,
                Some(SessionStatus::Active),
            )
            .await?;
        if let Transition::Won(rec) = &transition {
            tracing::warn!(%session_id, %why, "ending session whose vm failed");
            let (app, rec) = (self.clone(), rec.clone());
            tokio::spawn(async move {
                let _ = app.teardown(rec).await;
            });
        }
        Ok(transition)
    }

    /// Finalize, release, mark terminated. See the module docs.
    #[tracing::instrument(skip_all, fields(session_id = %rec.id, vm = %rec.vm_id))]
    pub async fn teardown(&self, rec: SessionRecord) -> Result<(), Error> {
        self.finalize_usage(&rec.id).await;
        let mut note = String::new();
        if !rec.vm_id.is_empty() {
            match self.release(&rec.node_id, &rec.vm_id).await {
                Ok(Released::Done) => {}
                Ok(Released::NodeGone) => {
                    note = format!("node {} is gone and its vm with it", rec.node_id);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "vm release failed; the reaper will retry");
                    return Err(e);
                }
            }
        }
        if !rec.snapshot_id.is_empty()
            && let Err(e) = self.drop_snapshot(&rec.node_id, &rec.snapshot_id).await
        {
            tracing::warn!(error = %e, "snapshot delete failed; the reaper will retry");
            return Err(e);
        }
        self.sessions.finish_end(&rec.id, &note).await?;
        tracing::info!(reason = ?rec.end_reason, "session terminated");
        Ok(())
    }

    /// Best effort: usage is finalized before the VM goes away, but an unreachable
    /// metering service never keeps a VM alive.
    async fn finalize_usage(&self, session_id: &str) {
        let Ok(mut client) = self.clients.metering() else {
            return;
        };
        let timeout = Duration::from_millis(self.config.finalize_timeout_ms);
        let req = FinalizeSessionRequest {
            session_id: session_id.to_string(),
        };
        match tokio::time::timeout(timeout, client.finalize_session(with_timeout(req, timeout)))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                tracing::warn!(%session_id, error = %status.message(), "finalize failed")
            }
            Err(_) => tracing::warn!(%session_id, "finalize timed out"),
        }
    }

    /// Releases a VM outside a teardown (a create that lost its session); failures are
    /// logged and left to the reconciler, which releases leased VMs nobody owns.
    pub async fn release_vm(&self, node_id: &str, vm_id: &str) {
        if let Err(e) = self.release(node_id, vm_id).await {
            tracing::warn!(node_id, vm_id, error = %e, "vm release failed");
        }
    }

    /// Deletes an ended session's snapshot (a node that is gone took it along).
    async fn drop_snapshot(&self, node_id: &str, snapshot_id: &str) -> Result<(), Error> {
        match self.nodes.get(node_id).await? {
            Some(node) => self.delete_snapshot(&node, snapshot_id).await,
            None => Ok(()),
        }
    }

    async fn release(&self, node_id: &str, vm_id: &str) -> Result<Released, Error> {
        let Some(node) = self.nodes.get(node_id).await? else {
            return Ok(Released::NodeGone);
        };
        let mut client = self.clients.vmpool(&node.vmpool_url)?;
        let mut last = String::new();
        for attempt in 0..RELEASE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let req = ReleaseVmRequest {
                vm_id: vm_id.to_string(),
            };
            match tokio::time::timeout(
                RELEASE_TIMEOUT,
                client.release_vm(with_timeout(req, RELEASE_TIMEOUT)),
            )
            .await
            {
                Ok(Ok(_)) => return Ok(Released::Done),
                // Already destroyed: that is what we wanted.
                Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                    return Ok(Released::Done);
                }
                Ok(Err(status)) => last = status.message().to_string(),
                Err(_) => last = format!("no answer within {RELEASE_TIMEOUT:?}"),
            }
        }
        Err(Error::Unavailable(format!(
            "node {node_id} did not release vm {vm_id}: {last}"
        )))
    }
}
