//! Suspending and resuming sessions: the suspend loop of `capsa_store::sessions`
//! (active → suspending → suspended → resuming → active), driven against the session's node.
//!
//! Suspend: move to SUSPENDING (the store names the snapshot `s<n>-<session>`), have
//! metering take the VM's last sample and stop counting it, then SuspendVm (the node writes
//! the snapshot atomically and destroys the VM), then SUSPENDED. Resume: move to RESUMING,
//! ResumeVm under the lease `<session>/<n>` with the session's egress policy (the node
//! restores the VM into a fresh network slot and gives the guest its new identity), then
//! ACTIVE on the new VM, and the snapshot is deleted.
//!
//! Every node call is idempotent (SuspendVm per snapshot id, ResumeVm per lease id), so a
//! step is simply redone: by the caller's retry, or by the reaper of any replica when the
//! replica doing it died (its claim ran out). A step whose node call failed is settled by
//! asking the node what is true: the snapshot exists (suspended after all), the VM still
//! runs (back to ACTIVE), or neither (the VM is lost: VM_FAILED). A session ended while a
//! step was in flight gets that step's leftovers (a snapshot, a restored VM) removed by the
//! step itself, since the teardown may have run before they existed.
//!
//! Each step runs in a task of its own, so a caller that goes away does not leave it half
//! done; the caller waits for it.

use std::sync::Arc;
use std::time::Duration;

use capsa_proto::metering::v1::ParkSessionRequest;
use capsa_proto::vmpool::v1::{
    DeleteSnapshotRequest, GetSnapshotRequest, GetVmRequest, ResumeVmRequest, SuspendVmRequest,
    VmState,
};
use capsa_store::{EndReason, NodeRecord, SessionRecord, SessionStatus, SuspendOp, Transition};
use tracing::Instrument as _;

use crate::app::App;
use crate::clients::with_timeout;
use crate::error::Error;
use crate::sessions::{describe_end, node_not_heartbeating};

/// Bound of the node questions that settle a failed step.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two looks at a session another caller is suspending or resuming.
const SETTLE_POLL: Duration = Duration::from_millis(200);

impl App {
    /// SuspendSession: see the proto. Idempotent for a SUSPENDED session; waits for one
    /// being suspended.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %id))]
    pub async fn suspend_session(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
    ) -> Result<SessionRecord, Error> {
        let rec = self.session(tenant, id).await?;
        let rec = match rec.status {
            SessionStatus::Suspended => return Ok(rec),
            SessionStatus::Suspending => {
                self.wait_while(tenant, id, SessionStatus::Suspending)
                    .await?
            }
            SessionStatus::Active => {
                match self
                    .sessions
                    .suspend_step(id, SuspendOp::Begin { at_deadline: false })
                    .await?
                {
                    Transition::Won(rec) => self.spawn_step(rec, Step::Suspend).await?,
                    // Another caller moved it first: wait for that step.
                    Transition::Conflict(rec) if rec.status == SessionStatus::Suspending => {
                        self.wait_while(tenant, id, SessionStatus::Suspending)
                            .await?
                    }
                    Transition::Conflict(rec) => rec,
                    Transition::Missing => {
                        return Err(crate::app::session_not_found(id));
                    }
                }
            }
            _ => rec,
        };
        match rec.status {
            SessionStatus::Suspended => Ok(rec),
            _ => Err(cannot("suspend", &rec)),
        }
    }

    /// ResumeSession: see the proto. Idempotent for an ACTIVE session; waits for one being
    /// suspended (then resumes it) or resumed.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %id))]
    pub async fn resume_session(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
    ) -> Result<SessionRecord, Error> {
        let mut rec = self.session(tenant, id).await?;
        if rec.status == SessionStatus::Suspending {
            rec = self
                .wait_while(tenant, id, SessionStatus::Suspending)
                .await?;
        }
        let rec = match rec.status {
            SessionStatus::Active => return Ok(rec),
            SessionStatus::Resuming => self.wait_while(tenant, id, SessionStatus::Resuming).await?,
            SessionStatus::Suspended => {
                match self
                    .sessions
                    .suspend_step(id, SuspendOp::BeginResume)
                    .await?
                {
                    Transition::Won(rec) => self.spawn_step(rec, Step::Resume).await?,
                    Transition::Conflict(rec) if rec.status == SessionStatus::Resuming => {
                        self.wait_while(tenant, id, SessionStatus::Resuming).await?
                    }
                    Transition::Conflict(rec) => rec,
                    Transition::Missing => {
                        return Err(crate::app::session_not_found(id));
                    }
                }
            }
            _ => rec,
        };
        match rec.status {
            SessionStatus::Active => Ok(rec),
            _ => Err(cannot("resume", &rec)),
        }
    }

    /// Runs a step this caller claimed (or the reaper re-claimed) in its own task and
    /// waits for it.
    pub(crate) async fn spawn_step(
        self: &Arc<Self>,
        rec: SessionRecord,
        step: Step,
    ) -> Result<SessionRecord, Error> {
        let app = self.clone();
        tokio::spawn(
            async move {
                match step {
                    Step::Suspend => app.run_suspend(rec).await,
                    Step::Resume => app.run_resume(rec).await,
                }
            }
            .in_current_span(),
        )
        .await
        .map_err(|e| Error::Internal(format!("the {step:?} task failed: {e}")))?
    }

    /// Polls while the session is in `state` (another caller's step), bounded by the
    /// longest such step.
    async fn wait_while(
        &self,
        tenant: &str,
        id: &str,
        state: SessionStatus,
    ) -> Result<SessionRecord, Error> {
        let bound = self.config.suspend_timeout() + SETTLE_TIMEOUT * 2;
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let rec = self.session(tenant, id).await?;
            if rec.status != state {
                return Ok(rec);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "session {id} is still {} after {bound:?}; try again",
                    state.as_str().to_uppercase()
                )));
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// The SUSPENDING session's step; returns the record it leaves.
    async fn run_suspend(self: &Arc<Self>, rec: SessionRecord) -> Result<SessionRecord, Error> {
        let Some(node) = self.nodes.get(&rec.node_id).await? else {
            // Its VM is out of reach; the reconciler judges the node.
            self.step(&rec.id, SuspendOp::Abort).await?;
            return Err(node_not_heartbeating(&rec));
        };
        self.park_usage(&rec).await;
        let timeout = self.config.suspend_timeout();
        let req = SuspendVmRequest {
            vm_id: rec.vm_id.clone(),
            snapshot_id: rec.snapshot_id.clone(),
        };
        let mut client = self.clients.vmpool(&node.vmpool_url)?;
        let answer = tokio::time::timeout(timeout, client.suspend_vm(with_timeout(req, timeout)))
            .instrument(tracing::info_span!("suspend_vm", node = %node.node_id))
            .await;
        let failure = match answer {
            Ok(Ok(resp)) => {
                let bytes = resp.into_inner().snapshot.map_or(0, |s| s.size_bytes);
                return self.suspended(&rec, &node, bytes).await;
            }
            Ok(Err(status)) => status.message().to_string(),
            Err(_) => format!("no answer within {timeout:?}"),
        };
        tracing::warn!(error = %failure, "suspend failed; asking the node what is true");
        // The snapshot may exist (the answer was lost), else the VM may still run.
        if let Some(bytes) = self.snapshot_bytes(&node, &rec.snapshot_id).await? {
            return self.suspended(&rec, &node, bytes).await;
        }
        if self.vm_alive(&node, &rec.vm_id).await? {
            self.step(&rec.id, SuspendOp::Abort).await?;
            return Err(Error::Unavailable(format!(
                "node {} could not suspend session {}: {failure}; it is still ACTIVE",
                node.node_id, rec.id
            )));
        }
        let why = format!("its vm was lost while being suspended: {failure}");
        self.end_lost(&rec, &why).await;
        Err(Error::Unavailable(format!(
            "session {} could not be suspended and has ended with VM_FAILED ({why})",
            rec.id
        )))
    }

    /// The snapshot is written: SUSPENDED, unless the session ended meanwhile (then its
    /// snapshot goes).
    async fn suspended(
        &self,
        rec: &SessionRecord,
        node: &NodeRecord,
        snapshot_bytes: u64,
    ) -> Result<SessionRecord, Error> {
        let op = SuspendOp::Finish {
            snapshot_bytes,
            retention: self.config.suspended_retention(),
        };
        match self.sessions.suspend_step(&rec.id, op).await? {
            Transition::Won(rec) => {
                tracing::info!(snapshot = %rec.snapshot_id, snapshot_bytes, "session suspended");
                Ok(rec)
            }
            Transition::Conflict(now) => {
                if now.status.is_ended() {
                    self.discard_snapshot(node, &rec.snapshot_id).await;
                }
                Ok(now)
            }
            Transition::Missing => Err(crate::app::session_not_found(&rec.id)),
        }
    }

    /// The RESUMING session's step; returns the record it leaves.
    async fn run_resume(self: &Arc<Self>, rec: SessionRecord) -> Result<SessionRecord, Error> {
        let Some(node) = self.nodes.get(&rec.node_id).await? else {
            self.step(&rec.id, SuspendOp::AbortResume).await?;
            return Err(Error::Unavailable(format!(
                "node {} holding the snapshot of session {} is not heartbeating; try again",
                rec.node_id, rec.id
            )));
        };
        let timeout = self.config.suspend_timeout();
        let req = ResumeVmRequest {
            snapshot_id: rec.snapshot_id.clone(),
            lease_id: rec.resume_lease_id(),
            egress: Some(capsa_egress::proto::to_proto(&rec.egress)),
        };
        let mut client = self.clients.vmpool(&node.vmpool_url)?;
        let answer = tokio::time::timeout(timeout, client.resume_vm(with_timeout(req, timeout)))
            .instrument(tracing::info_span!("resume_vm", node = %node.node_id))
            .await;
        let status = match answer {
            Ok(Ok(resp)) => {
                let vm = resp
                    .into_inner()
                    .vm
                    .ok_or_else(|| Error::Unavailable("vm-pool returned no vm".into()))?;
                let op = SuspendOp::FinishResume {
                    vm_id: vm.id.clone(),
                };
                return match self.sessions.suspend_step(&rec.id, op).await? {
                    Transition::Won(now) => {
                        tracing::info!(vm = %vm.id, "session resumed");
                        self.discard_snapshot(&node, &rec.snapshot_id).await;
                        Ok(now)
                    }
                    // Ended meanwhile: the restored VM is this step's alone to give back.
                    Transition::Conflict(now) => {
                        self.release_vm(&node.node_id, &vm.id).await;
                        Ok(now)
                    }
                    Transition::Missing => {
                        self.release_vm(&node.node_id, &vm.id).await;
                        Err(crate::app::session_not_found(&rec.id))
                    }
                };
            }
            Ok(Err(status)) => status,
            Err(_) => tonic::Status::deadline_exceeded(format!("no answer within {timeout:?}")),
        };
        if status.code() == tonic::Code::NotFound {
            // The snapshot is gone (its node lost its disk, or was replaced): nothing to
            // resume from.
            let why = format!("its snapshot is gone: {}", status.message());
            self.end_lost(&rec, &why).await;
            return Err(Error::Unavailable(format!(
                "session {} cannot be resumed and has ended with VM_FAILED ({why})",
                rec.id
            )));
        }
        // Anything else (a full node, a slow restore) leaves it SUSPENDED for a retry, which
        // gets the same VM if this one was made after all (ResumeVm is idempotent per lease).
        self.step(&rec.id, SuspendOp::AbortResume).await?;
        Err(Error::Unavailable(format!(
            "node {} could not resume session {}: {}; it is still SUSPENDED",
            node.node_id,
            rec.id,
            status.message()
        )))
    }

    /// A step back (abort) or forward that must not be lost; a conflict means another path
    /// (an end) moved the session, which is fine.
    async fn step(&self, id: &str, op: SuspendOp) -> Result<(), Error> {
        self.sessions.suspend_step(id, op).await?;
        Ok(())
    }

    /// Ends a session whose VM and snapshot are both gone; the teardown runs inline.
    async fn end_lost(&self, rec: &SessionRecord, why: &str) {
        match self
            .sessions
            .begin_end(&rec.id, EndReason::VmFailed, why, None)
            .await
        {
            Ok(Transition::Won(rec)) => {
                let _ = self.teardown(rec).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot end a session whose vm was lost"),
        }
    }

    /// Metering takes the VM's last sample and stops counting it. Best effort and bounded:
    /// metering never keeps a session from suspending.
    async fn park_usage(&self, rec: &SessionRecord) {
        let Ok(mut client) = self.clients.metering() else {
            return;
        };
        let timeout = Duration::from_millis(self.config.finalize_timeout_ms);
        let req = ParkSessionRequest {
            session_id: rec.id.clone(),
            vm_id: rec.vm_id.clone(),
        };
        match tokio::time::timeout(timeout, client.park_session(with_timeout(req, timeout))).await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => tracing::warn!(error = %status.message(), "parking usage failed"),
            Err(_) => tracing::warn!("parking usage timed out"),
        }
    }

    /// The snapshot's size if the node has it.
    async fn snapshot_bytes(
        &self,
        node: &NodeRecord,
        snapshot_id: &str,
    ) -> Result<Option<u64>, Error> {
        let mut client = self.clients.vmpool(&node.vmpool_url)?;
        let req = GetSnapshotRequest {
            snapshot_id: snapshot_id.to_owned(),
        };
        let what = format!("say whether snapshot {snapshot_id} exists");
        let found = ask(
            node,
            &what,
            client.get_snapshot(with_timeout(req, SETTLE_TIMEOUT)),
        )
        .await?;
        Ok(found.map(|resp| resp.snapshot.map_or(0, |s| s.size_bytes)))
    }

    /// Whether the node still runs the VM, leased.
    async fn vm_alive(&self, node: &NodeRecord, vm_id: &str) -> Result<bool, Error> {
        let mut client = self.clients.vmpool(&node.vmpool_url)?;
        let req = GetVmRequest {
            vm_id: vm_id.to_owned(),
        };
        let what = format!("say whether vm {vm_id} runs");
        let found = ask(
            node,
            &what,
            client.get_vm(with_timeout(req, SETTLE_TIMEOUT)),
        )
        .await?;
        Ok(found
            .and_then(|resp| resp.vm)
            .is_some_and(|vm| vm.state == VmState::Leased as i32))
    }

    /// Deletes a snapshot (one already gone counts as deleted).
    pub(crate) async fn delete_snapshot(
        &self,
        node: &NodeRecord,
        snapshot_id: &str,
    ) -> Result<(), Error> {
        let mut client = self.clients.vmpool(&node.vmpool_url)?;
        let req = DeleteSnapshotRequest {
            snapshot_id: snapshot_id.to_owned(),
        };
        let what = format!("delete snapshot {snapshot_id}");
        ask(
            node,
            &what,
            client.delete_snapshot(with_timeout(req, SETTLE_TIMEOUT)),
        )
        .await?;
        tracing::info!(snapshot_id, "snapshot deleted");
        Ok(())
    }

    /// [`App::delete_snapshot`] of a snapshot the session no longer needs, where a failure
    /// only costs disk: logged, and the node keeps the files.
    async fn discard_snapshot(&self, node: &NodeRecord, snapshot_id: &str) {
        if let Err(e) = self.delete_snapshot(node, snapshot_id).await {
            tracing::warn!(snapshot_id, error = %e, "snapshot delete failed");
        }
    }
}

/// One call to `node` within [`SETTLE_TIMEOUT`]: its answer, `None` for NOT_FOUND, else
/// UNAVAILABLE saying the node did not `what`.
async fn ask<T>(
    node: &NodeRecord,
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<Option<T>, Error> {
    match tokio::time::timeout(SETTLE_TIMEOUT, call).await {
        Ok(Ok(resp)) => Ok(Some(resp.into_inner())),
        Ok(Err(status)) if status.code() == tonic::Code::NotFound => Ok(None),
        Ok(Err(status)) => Err(Error::Unavailable(format!(
            "node {} did not {what}: {}",
            node.node_id,
            status.message()
        ))),
        Err(_) => Err(Error::Unavailable(format!(
            "node {} did not {what} within {SETTLE_TIMEOUT:?}",
            node.node_id
        ))),
    }
}

/// A suspend or resume step.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Step {
    Suspend,
    Resume,
}

/// FAILED_PRECONDITION for a session a suspend or resume does not apply to.
fn cannot(what: &str, rec: &SessionRecord) -> Error {
    let status = rec.status.as_str().to_uppercase();
    if rec.status.is_ended() {
        Error::FailedPrecondition(format!(
            "session {} is {status}, so it cannot {what}: {}",
            rec.id,
            describe_end(rec)
        ))
    } else {
        Error::FailedPrecondition(format!(
            "session {} is {status}; only an ACTIVE session can suspend and only a SUSPENDED one can resume",
            rec.id
        ))
    }
}
