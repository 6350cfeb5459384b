//! Tenant snapshots and forks: SnapshotSession (a named snapshot of a running session, the
//! tenant's template), Get/List/DeleteSnapshot, CreateSession from a snapshot
//! ([`App::template_snapshot`]) and ForkSession.
//!
//! A snapshot is written by the session's node (vm-pool SnapshotVm: the VM is paused while
//! its state is saved, then runs on) and restored there (ResumeVm, any number of times,
//! each restore a new VM with its own address, MAC, machine-id and RNG seed). Its record
//! in Redis (`capsa_store::snapshots`) goes creating → ready → deleting; each of those steps
//! is pending in the store until done, so a replica that dies midway leaves work the reaper
//! finishes ([`App::settle_snapshot`]): a written snapshot is kept (named) or removed (a
//! fork's), an unwritten one forgotten, a deleted one's files removed.
//!
//! A fork is a snapshot of kind fork, restored into `count` new sessions at once and
//! removed after; all children are made or none is.
//!
//! Files are node-local: a node that is lost takes its snapshots with it (a shared store
//! would let any node restore them: the record would name the store's path instead of a
//! node, and placement would choose among nodes again).

use std::sync::Arc;
use std::time::Duration;

use capsa_proto::vmpool::v1::{GetSnapshotRequest, SnapshotVmRequest};
use capsa_store::snapshots::Step as SnapStep;
use capsa_store::{
    Begun, EndReason, NewSnapshot, NodeRecord, SessionRecord, SessionStatus, SnapshotKind,
    SnapshotLimits, SnapshotRecord, SnapshotStatus, Transition,
};
use tracing::Instrument as _;

use crate::app::App;
use crate::clients::with_timeout;
use crate::error::Error;
use crate::sessions::Origin;
use crate::validate::{CreateSpec, ForkSpec, SnapshotSpec};

const MIB: u64 = 1 << 20;
/// Bound of the node questions that settle a failed snapshot.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

impl App {
    pub(crate) fn snapshot_limits(&self) -> SnapshotLimits {
        SnapshotLimits {
            max_snapshots: self.config.max_snapshots_per_tenant,
            max_bytes: self.config.max_snapshot_bytes_per_tenant,
        }
    }

    /// How long a writer holds a snapshot step before the reaper may redo it.
    fn snapshot_claim(&self, restores: u32) -> Duration {
        self.config.suspend_timeout() * (1 + restores) + self.config.claim_ttl()
    }

    /// The node holding `snap`'s files; UNAVAILABLE when it is not heartbeating.
    pub(crate) async fn snapshot_node(&self, snap: &SnapshotRecord) -> Result<NodeRecord, Error> {
        self.nodes.get(&snap.node_id).await?.ok_or_else(|| {
            Error::Unavailable(format!(
                "node {} holding snapshot {} is not heartbeating; try again",
                snap.node_id, snap.id
            ))
        })
    }

    /// The tenant's READY snapshot a CreateSession starts from; the session takes its
    /// template and shape (a different one asked for is INVALID_ARGUMENT).
    pub(crate) async fn template_snapshot(
        &self,
        tenant: &str,
        id: &str,
        spec: &mut CreateSpec,
    ) -> Result<SnapshotRecord, Error> {
        let snap = self.tenant_snapshot(tenant, id).await?;
        if snap.status != SnapshotStatus::Ready {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {id} is {}, not READY",
                status_name(snap.status)
            )));
        }
        // (field, asked, the snapshot's, left unset, how to leave it unset)
        let shape = [
            (
                "template",
                format!("{:?}", spec.template),
                format!("{:?}", snap.template),
                spec.template == "default",
                "leave it empty",
            ),
            (
                "vcpus",
                spec.vcpus.to_string(),
                snap.vcpus.to_string(),
                spec.vcpus == 0,
                "leave it 0",
            ),
            (
                "memory_mib",
                spec.memory_mib.to_string(),
                snap.memory_mib.to_string(),
                spec.memory_mib == 0,
                "leave it 0",
            ),
        ];
        let clash = shape
            .into_iter()
            .find(|(_, asked, taken, unset, _)| !unset && asked != taken);
        if let Some((field, asked, taken, _, hint)) = clash {
            return Err(Error::field(
                field,
                format!("{asked} differs from snapshot {id}'s {taken} ({hint})"),
            ));
        }
        spec.template = snap.template.clone();
        spec.vcpus = snap.vcpus;
        spec.memory_mib = snap.memory_mib;
        Ok(snap)
    }

    async fn tenant_snapshot(&self, tenant: &str, id: &str) -> Result<SnapshotRecord, Error> {
        self.snapshots
            .get(tenant, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("snapshot {id} not found")))
    }

    /// An ACTIVE session of the tenant and its live node, for a snapshot or fork.
    async fn running_session(
        &self,
        tenant: &str,
        id: &str,
        what: &str,
    ) -> Result<(SessionRecord, NodeRecord), Error> {
        let rec = self.session(tenant, id).await?;
        if rec.status != SessionStatus::Active {
            return Err(Error::FailedPrecondition(format!(
                "session {id} is {}; only an ACTIVE session can {what}",
                rec.status.as_str().to_uppercase()
            )));
        }
        let node = self.session_node(&rec).await?;
        Ok((rec, node))
    }

    /// SnapshotSession: see the proto.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session_id))]
    pub async fn snapshot_session(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        spec: SnapshotSpec,
    ) -> Result<SnapshotRecord, Error> {
        let (rec, node) = self
            .running_session(tenant, session_id, "be snapshotted")
            .await?;
        let new = NewSnapshot {
            id: format!("snap-{}", uuid::Uuid::new_v4().simple()),
            tenant_id: tenant.to_owned(),
            kind: SnapshotKind::Named,
            name: spec.name,
            session_id: rec.id.clone(),
            node_id: node.node_id.clone(),
            template: rec.template.clone(),
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            metadata: spec.metadata,
            env_names: rec.env_names.clone(),
            // Its memory, most of which a busy guest has touched; the disk layer is seen
            // only once written.
            estimate_bytes: u64::from(rec.memory_mib) * MIB,
        };
        let snap = match self
            .snapshots
            .begin(&new, self.snapshot_limits(), self.snapshot_claim(0))
            .await?
        {
            Begun::Ok(snap) => *snap,
            Begun::TooMany { limit } => {
                return Err(Error::ResourceExhausted(format!(
                    "tenant {tenant} already has its limit of {limit} snapshots; delete one first"
                )));
            }
            Begun::TooManyBytes { limit, used } => {
                return Err(Error::ResourceExhausted(format!(
                    "tenant {tenant}'s snapshots use {used} of its {limit} bytes, and this one may take {} more; delete one first",
                    new.estimate_bytes
                )));
            }
        };
        // In its own task: a caller that goes away does not leave it half made.
        let app = self.clone();
        tokio::spawn(async move { app.write_snapshot(snap, rec, node).await }.in_current_span())
            .await
            .map_err(|e| Error::Internal(format!("the snapshot task failed: {e}")))?
    }

    /// Has the node write `snap` of the session's VM (which runs on) and records the
    /// outcome: READY, or forgotten with the node's reason.
    async fn write_snapshot(
        &self,
        snap: SnapshotRecord,
        rec: SessionRecord,
        node: NodeRecord,
    ) -> Result<SnapshotRecord, Error> {
        let timeout = self.config.suspend_timeout();
        let req = SnapshotVmRequest {
            vm_id: rec.vm_id.clone(),
            snapshot_id: snap.id.clone(),
        };
        let mut client = self.clients.vmpool(&node.vmpool_url)?;
        let answer = tokio::time::timeout(timeout, client.snapshot_vm(with_timeout(req, timeout)))
            .instrument(tracing::info_span!("snapshot_vm", node = %node.node_id))
            .await;
        let failure = match answer {
            Ok(Ok(resp)) => {
                let bytes = resp.into_inner().snapshot.map_or(0, |s| s.size_bytes);
                return self.snapshot_written(&snap, bytes).await;
            }
            Ok(Err(status)) => status.message().to_owned(),
            Err(_) => format!("no answer within {timeout:?}"),
        };
        // The answer may have been lost after the snapshot was made.
        if let Ok(Some(bytes)) = self.node_snapshot_bytes(&node, &snap.id).await {
            return self.snapshot_written(&snap, bytes).await;
        }
        self.snapshots.abort(&snap).await?;
        Err(Error::Unavailable(format!(
            "node {} could not snapshot session {}: {failure}",
            node.node_id, rec.id
        )))
    }

    async fn snapshot_written(
        &self,
        snap: &SnapshotRecord,
        bytes: u64,
    ) -> Result<SnapshotRecord, Error> {
        match self
            .snapshots
            .finish(snap, bytes, self.snapshot_claim(0))
            .await?
        {
            SnapStep::Won(done) => {
                tracing::info!(snapshot_id = %done.id, bytes, "snapshot ready");
                Ok(done)
            }
            SnapStep::Conflict(now) => Ok(now),
            SnapStep::Missing => Err(Error::NotFound(format!("snapshot {} not found", snap.id))),
        }
    }

    /// The size of snapshot `id` on `node`, `None` when it has none.
    async fn node_snapshot_bytes(&self, node: &NodeRecord, id: &str) -> Result<Option<u64>, Error> {
        let mut client = self.clients.vmpool(&node.vmpool_url)?;
        let req = GetSnapshotRequest {
            snapshot_id: id.to_owned(),
        };
        match tokio::time::timeout(
            SETTLE_TIMEOUT,
            client.get_snapshot(with_timeout(req, SETTLE_TIMEOUT)),
        )
        .await
        {
            Ok(Ok(resp)) => Ok(Some(resp.into_inner().snapshot.map_or(0, |s| s.size_bytes))),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => Ok(None),
            Ok(Err(status)) => Err(Error::Unavailable(format!(
                "node {} did not say whether snapshot {id} exists: {}",
                node.node_id,
                status.message()
            ))),
            Err(_) => Err(Error::Unavailable(format!(
                "node {} did not say whether snapshot {id} exists within {SETTLE_TIMEOUT:?}",
                node.node_id
            ))),
        }
    }

    pub async fn get_snapshot(&self, tenant: &str, id: &str) -> Result<SnapshotRecord, Error> {
        self.tenant_snapshot(tenant, id).await
    }

    /// A page of the tenant's snapshots, newest first, after snapshot `after`; the next
    /// page's token when there is more.
    pub async fn list_snapshots(
        &self,
        tenant: &str,
        page_size: usize,
        after: Option<&str>,
    ) -> Result<(Vec<SnapshotRecord>, Option<String>), Error> {
        let all = self.snapshots.list(tenant).await?;
        let start = match after {
            None => 0,
            Some(id) => match all.iter().position(|s| s.id == id) {
                Some(i) => i + 1,
                // Deleted since: the tenant's snapshots are few (its quota), so the page
                // starts where that one would sort.
                None => all.len(),
            },
        };
        let page: Vec<SnapshotRecord> = all.iter().skip(start).take(page_size).cloned().collect();
        let next = (start + page.len() < all.len())
            .then(|| page.last().map(|s| s.id.clone()))
            .flatten();
        Ok((page, next))
    }

    /// DeleteSnapshot: see the proto.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, snapshot_id = %id))]
    pub async fn delete_snapshot_of_tenant(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
    ) -> Result<SnapshotRecord, Error> {
        let snap = match self
            .snapshots
            .begin_delete(tenant, id, self.snapshot_claim(0))
            .await?
        {
            SnapStep::Won(snap) => snap,
            SnapStep::Conflict(snap) => {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {} is {}; delete it once READY",
                    snap.id,
                    status_name(snap.status)
                )));
            }
            SnapStep::Missing => return Err(Error::NotFound(format!("snapshot {id} not found"))),
        };
        let app = self.clone();
        let deleted = snap.clone();
        tokio::spawn(async move { app.remove_snapshot_files(&deleted).await }.in_current_span())
            .await
            .map_err(|e| Error::Internal(format!("the delete task failed: {e}")))??;
        Ok(snap)
    }

    /// Deletes the files of `snap` on its node, then its record. A node that is not
    /// heartbeating keeps the record pending (the reaper tries again after the claim).
    async fn remove_snapshot_files(&self, snap: &SnapshotRecord) -> Result<(), Error> {
        let node = self.snapshot_node(snap).await?;
        self.delete_snapshot(&node, &snap.id).await?;
        self.snapshots.remove(snap).await?;
        Ok(())
    }

    /// The reaper's part: finishes a snapshot step whose replica died (see the module
    /// docs).
    pub(crate) async fn settle_snapshot(&self, snap: SnapshotRecord) -> Result<(), Error> {
        tracing::info!(snapshot_id = %snap.id, status = ?snap.status, kind = ?snap.kind, "settling snapshot");
        match (snap.status, snap.kind) {
            (SnapshotStatus::Creating, kind) => {
                let node = self.snapshot_node(&snap).await?;
                match self.node_snapshot_bytes(&node, &snap.id).await? {
                    Some(bytes) if kind == SnapshotKind::Named => {
                        self.snapshot_written(&snap, bytes).await?;
                    }
                    Some(_) => self.remove_snapshot_files(&snap).await?,
                    None => {
                        self.snapshots.abort(&snap).await?;
                    }
                }
            }
            (SnapshotStatus::Deleting, _) | (SnapshotStatus::Ready, SnapshotKind::Fork) => {
                self.remove_snapshot_files(&snap).await?
            }
            (SnapshotStatus::Ready, SnapshotKind::Named) => {}
        }
        Ok(())
    }

    /// ForkSession: see the proto.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session_id, count = spec.count))]
    pub async fn fork_session(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        spec: ForkSpec,
    ) -> Result<Vec<SessionRecord>, Error> {
        let (parent, node) = self
            .running_session(tenant, session_id, "be forked")
            .await?;
        for _ in 0..spec.count {
            self.take_create_token(tenant).await?;
        }
        let new = NewSnapshot {
            id: format!("fork-{}", uuid::Uuid::new_v4().simple()),
            tenant_id: tenant.to_owned(),
            kind: SnapshotKind::Fork,
            name: String::new(),
            session_id: parent.id.clone(),
            node_id: node.node_id.clone(),
            template: parent.template.clone(),
            vcpus: parent.vcpus,
            memory_mib: parent.memory_mib,
            metadata: Default::default(),
            env_names: parent.env_names.clone(),
            estimate_bytes: 0,
        };
        let claim = self.snapshot_claim(spec.count);
        let Begun::Ok(snap) = self
            .snapshots
            .begin(&new, self.snapshot_limits(), claim)
            .await?
        else {
            return Err(Error::Internal("a fork snapshot met a quota".into()));
        };
        let snap = *snap;
        let app = self.clone();
        let tenant = tenant.to_owned();
        tokio::spawn(
            async move {
                let snap = app.write_snapshot(snap, parent.clone(), node).await?;
                let forks = app.restore_forks(&tenant, &parent, &snap, &spec).await;
                if let Err(e) = app.remove_snapshot_files(&snap).await {
                    // Pending in the store: the reaper removes it.
                    tracing::warn!(snapshot_id = %snap.id, error = %e, "fork snapshot not removed yet");
                }
                forks
            }
            .in_current_span(),
        )
        .await
        .map_err(|e| Error::Internal(format!("the fork task failed: {e}")))?
    }

    /// `spec.count` sessions restored from the fork snapshot `snap`, all or none.
    async fn restore_forks(
        self: &Arc<Self>,
        tenant: &str,
        parent: &SessionRecord,
        snap: &SnapshotRecord,
        spec: &ForkSpec,
    ) -> Result<Vec<SessionRecord>, Error> {
        let child = CreateSpec {
            template: parent.template.clone(),
            vcpus: parent.vcpus,
            memory_mib: parent.memory_mib,
            lifetime: spec
                .lifetime
                .unwrap_or(Duration::from_millis(parent.lifetime_ms.max(0) as u64)),
            // The values live in the kernels' memory, which the fork copies (the names go
            // with the origin).
            env: Default::default(),
            metadata: spec
                .metadata
                .clone()
                .unwrap_or_else(|| parent.metadata.clone()),
            egress: Some(parent.egress.clone()),
            auto_suspend: parent.auto_suspend,
            auto_resume: parent.auto_resume,
            snapshot_id: None,
        };
        let creates = (0..spec.count).map(|_| {
            let app = self.clone();
            let (tenant, child, snap, parent_id) = (
                tenant.to_owned(),
                child.clone(),
                snap.clone(),
                parent.id.clone(),
            );
            tokio::spawn(
                async move {
                    let origin = Origin::Fork {
                        snap,
                        parent: parent_id,
                    };
                    app.create_from(&tenant, child, origin).await
                }
                .in_current_span(),
            )
        });
        let mut made = Vec::new();
        let mut failure = None;
        for joined in futures::future::join_all(creates).await {
            match joined {
                Ok(Ok(rec)) => made.push(rec),
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(e) => {
                    failure = failure.or(Some(Error::Internal(format!("a fork task failed: {e}"))))
                }
            }
        }
        let Some(err) = failure else {
            tracing::info!(forks = made.len(), "session forked");
            return Ok(made);
        };
        // All or none: the ones made go again.
        for rec in made {
            let why = format!("a sibling fork failed: {err}");
            if let Ok(Transition::Won(rec)) = self
                .sessions
                .begin_end(&rec.id, EndReason::CreateFailed, &why, None)
                .await
            {
                let _ = self.teardown(rec).await;
            }
        }
        Err(err)
    }
}

/// A snapshot status for messages.
fn status_name(status: SnapshotStatus) -> &'static str {
    match status {
        SnapshotStatus::Creating => "CREATING",
        SnapshotStatus::Ready => "READY",
        SnapshotStatus::Deleting => "DELETING",
    }
}
