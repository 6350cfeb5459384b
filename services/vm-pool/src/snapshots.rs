//! Snapshots: a leased VM saved to this node's disk and destroyed (SuspendVm) or left
//! running (SnapshotVm), started later as new VMs under new leases (ResumeVm, any number of
//! times: each restore copies the disk layer and reads the state).
//!
//! On disk, `<state_dir>/snapshots/<snapshot_id>/` holds what the engine wrote
//! ([`capsa_vmm::VirtualMachine::snapshot`]; for QEMU `vmstate`, `overlay.qcow2` and
//! `manifest.json`) and vm-pool's sidecar `capsa.json` ([`Sidecar`]). A suspend writes into
//! `.tmp-<id>-<random>/`, syncs the sidecar and the dir, renames the dir to `<id>` and syncs
//! the parent; a delete renames `<id>` to a `.tmp-` name before removing it. So a dir named
//! like an id is always complete, a crash at any point leaves only complete snapshots and
//! `.tmp-*` dirs, and start-up ([`prepare`]) removes the latter. Nothing else under the
//! state dir's handling (the orphan reaper works on `<state_dir>/vms` alone) touches them.
//!
//! The VM is paused for the snapshot (Cloud Hypervisor needs it; QEMU keeps a paused VM
//! paused after its migration, so the guest does nothing the snapshot misses before it is
//! destroyed), resumed if the snapshot fails, and released like ReleaseVm once the snapshot
//! is in place; or, for SnapshotVm, resumed once it is in place.
//!
//! Concurrency: per snapshot id, a suspend and a delete hold the id's lock exclusively, a
//! restore shares it until its VMM has read the files ([`Hold`]); per VM, a suspend and a
//! release serialise on the VM's `op` lock (a release that waited for a suspend finds the VM
//! gone; a second suspend into the same id finds the snapshot and returns it).

use std::collections::HashMap;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsa_egress::EgressPolicy;
use capsa_proto::agent::v1::ReidentifyRequest;
use capsa_proto::agent::v1::agent_service_client::AgentServiceClient;
use capsa_vmm::{NetSpec, VirtualMachine};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tracing::Instrument as _;

use crate::error::Error;
use crate::pool::{Obtain, Pool};
use crate::vm::{VmInfo, VmState};

/// vm-pool's file in a snapshot dir; the engine's files sit beside it.
const SIDECAR: &str = "capsa.json";
/// The sidecar's layout; another is refused.
const SIDECAR_FORMAT: u32 = 1;
/// Dirs being written or deleted (removed at start-up).
const TMP_PREFIX: &str = ".tmp-";
const MAX_SNAPSHOT_ID: usize = 64;
/// Mixed into a restored guest's RNG (the agent takes 32 to 512).
const ENTROPY_BYTES: usize = 64;

/// What becomes of the VM once its snapshot is in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Afterwards {
    /// SuspendVm: released like ReleaseVm.
    Release,
    /// SnapshotVm: runs on under its lease.
    KeepRunning,
}

/// A complete snapshot, as GetSnapshot and ListSnapshots show it.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
    pub id: String,
    pub template: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub engine: String,
    /// Allocated bytes of its files.
    pub size_bytes: u64,
    pub create_time: SystemTime,
}

/// `capsa.json`: what vm-pool needs to restore a snapshot and to answer a retried suspend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Sidecar {
    format: u32,
    /// The VM it was taken of: a retried SuspendVm of that VM returns it.
    vm_id: String,
    template: String,
    /// The template's image: the snapshot's disk layer sits on its root fs.
    image_hash: String,
    vcpus: u32,
    memory_mib: u32,
    engine: String,
    create_time_ms: u64,
}

/// `<state_dir>/snapshots` and the per-id locks.
pub(crate) struct Store {
    dir: PathBuf,
    locks: Arc<Mutex<HashMap<String, Arc<RwLock<()>>>>>,
}

/// A hold on one snapshot id; the id's lock is forgotten when its last holder goes.
pub(crate) struct Hold {
    locks: Arc<Mutex<HashMap<String, Arc<RwLock<()>>>>>,
    id: String,
    shared: Option<OwnedRwLockReadGuard<()>>,
    exclusive: Option<OwnedRwLockWriteGuard<()>>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        drop((self.shared.take(), self.exclusive.take()));
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Every clone is made under this mutex: one reference left is the map's own, so
        // nobody holds or waits for it.
        if locks
            .get(&self.id)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.id);
        }
    }
}

/// Makes `<state_dir>/snapshots` and removes every `.tmp-*` dir in it (a suspend or delete
/// a crash cut short); complete snapshots stay. Returns how many were removed.
pub fn prepare(state_dir: &Path) -> Result<usize, Error> {
    let dir = state_dir.join("snapshots");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create snapshots dir", &dir, e))?;
    let mut removed = 0;
    for entry in std::fs::read_dir(&dir).map_err(|e| Error::io("read snapshots dir", &dir, e))? {
        let entry = entry.map_err(|e| Error::io("read snapshots dir", &dir, e))?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            std::fs::remove_dir_all(&path)
                .map_err(|e| Error::io("remove unfinished snapshot", &path, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// 1 to 64 of `[a-z0-9-]`; the message names the field.
/// Shaped like a snapshot id: what the snapshots dir holds besides `.tmp-` dirs.
fn id_shaped(id: &str) -> bool {
    (1..=MAX_SNAPSHOT_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Checks a snapshot id from a caller of the API: shaped like one, and not one of the
/// node's own base snapshots ([`crate::warm_base`]).
pub(crate) fn validate_id(id: &str) -> Result<(), Error> {
    if !id_shaped(id) {
        return Err(Error::InvalidArgument(format!(
            "snapshot_id {id:?} must be 1 to {MAX_SNAPSHOT_ID} of a-z, 0-9 and '-'"
        )));
    }
    if id.starts_with(crate::warm_base::BASE_PREFIX) {
        return Err(Error::InvalidArgument(format!(
            "snapshot_id {id:?}: the prefix {:?} is reserved for vm-pool's own snapshots",
            crate::warm_base::BASE_PREFIX
        )));
    }
    Ok(())
}

impl Store {
    pub(crate) fn new(state_dir: &Path) -> Store {
        Store {
            dir: state_dir.join("snapshots"),
            locks: Default::default(),
        }
    }

    pub(crate) fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// A fresh `.tmp-` name for `id`.
    fn tmp_path(&self, id: &str) -> PathBuf {
        let random = uuid::Uuid::new_v4().simple().to_string();
        self.dir.join(format!("{TMP_PREFIX}{id}-{}", &random[..12]))
    }

    fn lock_of(&self, id: &str) -> Arc<RwLock<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_owned()).or_default().clone()
    }

    async fn exclusive(&self, id: &str) -> Hold {
        let lock = self.lock_of(id);
        Hold {
            locks: self.locks.clone(),
            id: id.to_owned(),
            shared: None,
            exclusive: Some(lock.write_owned().await),
        }
    }

    pub(crate) async fn shared(&self, id: &str) -> Hold {
        let lock = self.lock_of(id);
        Hold {
            locks: self.locks.clone(),
            id: id.to_owned(),
            shared: Some(lock.read_owned().await),
            exclusive: None,
        }
    }

    /// The complete snapshot `id`, or `None`.
    fn read(&self, id: &str) -> Result<Option<(Sidecar, SnapshotInfo)>, Error> {
        let dir = self.path(id);
        let path = dir.join(SIDECAR);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read snapshot sidecar", &path, e)),
        };
        let sidecar: Sidecar = serde_json::from_slice(&text)
            .map_err(|e| Error::io("parse snapshot sidecar", &path, std::io::Error::other(e)))?;
        if sidecar.format != SIDECAR_FORMAT {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {id} has sidecar format {}; this vm-pool reads {SIDECAR_FORMAT}",
                sidecar.format
            )));
        }
        let info = SnapshotInfo {
            id: id.to_owned(),
            template: sidecar.template.clone(),
            vcpus: sidecar.vcpus,
            memory_mib: sidecar.memory_mib,
            engine: sidecar.engine.clone(),
            size_bytes: allocated_bytes(&dir)?,
            create_time: UNIX_EPOCH + Duration::from_millis(sidecar.create_time_ms),
        };
        Ok(Some((sidecar, info)))
    }

    /// Every complete snapshot, the node's own bases too, in id order.
    pub(crate) fn list(&self) -> Result<Vec<SnapshotInfo>, Error> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::io("read snapshots dir", &self.dir, e))?;
        let mut all = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read snapshots dir", &self.dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !id_shaped(&name) {
                // `.tmp-*`: being written or deleted.
                continue;
            }
            match self.read(&name) {
                Ok(Some((_, info))) => all.push(info),
                // Deleted meanwhile.
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(snapshot = %name, error = %capsa_grpc::error::chain(&e), "snapshot not listed")
                }
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }
}

/// Bytes the files in `dir` take on disk (st_blocks × 512: sparse files count what they use).
fn allocated_bytes(dir: &Path) -> Result<u64, Error> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("read snapshot dir", dir, e))? {
        let entry = entry.map_err(|e| Error::io("read snapshot dir", dir, e))?;
        let meta = entry
            .metadata()
            .map_err(|e| Error::io("stat snapshot file", &entry.path(), e))?;
        total += meta.blocks() * 512;
    }
    Ok(total)
}

/// Writes and syncs the sidecar into `tmp`, syncs `tmp`, renames it to `dest` and syncs
/// the parent: after this returns, the snapshot survives a crash.
fn commit(tmp: &Path, dest: &Path, sidecar: &Sidecar) -> Result<(), Error> {
    use std::io::Write as _;
    let path = tmp.join(SIDECAR);
    let mut file =
        std::fs::File::create(&path).map_err(|e| Error::io("create snapshot sidecar", &path, e))?;
    let text = serde_json::to_vec_pretty(sidecar).expect("a sidecar serialises");
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write snapshot sidecar", &path, e))?;
    sync_dir(tmp)?;
    std::fs::rename(tmp, dest).map_err(|e| Error::io("rename snapshot into place", dest, e))?;
    sync_dir(dest.parent().expect("a snapshot dir has a parent"))
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync dir", dir, e))
}

impl Pool {
    /// Snapshots the leased VM `vm_id` as `snapshot_id`, then releases it. Idempotent: a
    /// retry after success returns the snapshot.
    pub async fn suspend(&self, vm_id: &str, snapshot_id: &str) -> Result<SnapshotInfo, Error> {
        self.take_snapshot(vm_id, snapshot_id, Afterwards::Release)
            .await
    }

    /// Snapshots the leased VM `vm_id` as `snapshot_id`; the VM runs on under its lease.
    /// Idempotent: a retry after success returns the snapshot.
    pub async fn snapshot_running(
        &self,
        vm_id: &str,
        snapshot_id: &str,
    ) -> Result<SnapshotInfo, Error> {
        self.take_snapshot(vm_id, snapshot_id, Afterwards::KeepRunning)
            .await
    }

    /// Saves the pool's own VM `vm_id` as the base snapshot `base_id`
    /// ([`crate::warm_base`]), then releases it.
    pub(crate) async fn save_base(
        &self,
        vm_id: &str,
        base_id: &str,
    ) -> Result<SnapshotInfo, Error> {
        self.snapshot_now(vm_id, base_id, Afterwards::Release).await
    }

    #[tracing::instrument(skip(self))]
    async fn take_snapshot(
        &self,
        vm_id: &str,
        snapshot_id: &str,
        afterwards: Afterwards,
    ) -> Result<SnapshotInfo, Error> {
        if !capsa_vmm::is_vm_id(vm_id) {
            return Err(Error::InvalidArgument(format!(
                "vm_id {vm_id:?} is not a vm id"
            )));
        }
        validate_id(snapshot_id)?;
        if self.0.closing.is_cancelled() {
            return Err(Error::Unavailable("vm-pool is shutting down".into()));
        }
        // In its own task: a caller that goes away mid-snapshot must not leave the VM
        // paused or a temporary dir behind.
        let (pool, vm_id, snapshot_id) = (self.clone(), vm_id.to_owned(), snapshot_id.to_owned());
        let span = tracing::Span::current();
        tokio::spawn(
            async move { pool.snapshot_now(&vm_id, &snapshot_id, afterwards).await }
                .instrument(span),
        )
        .await
        .map_err(|e| Error::Unavailable(format!("snapshot task failed: {e}")))?
    }

    async fn snapshot_now(
        &self,
        vm_id: &str,
        snapshot_id: &str,
        afterwards: Afterwards,
    ) -> Result<SnapshotInfo, Error> {
        let op = self.0.lock().vms.get(vm_id).map(|e| e.op.clone());
        let _op = match &op {
            Some(op) => Some(op.lock().await),
            None => None,
        };
        let store = &self.0.snapshots;
        let _hold = store.exclusive(snapshot_id).await;
        if let Some((sidecar, info)) = store.read(snapshot_id)? {
            if sidecar.vm_id == vm_id {
                // A retry. A suspended VM is gone, unless a failure after the rename
                // (syncing the parent dir) kept it: the snapshot is in place, so it goes now.
                // (A VM that runs on is running: a failed write resumes it.)
                if op.is_some() && afterwards == Afterwards::Release {
                    self.release_now(vm_id).await?;
                }
                return Ok(info);
            }
            return Err(Error::AlreadyExists(format!(
                "snapshot_id {snapshot_id:?} already holds a snapshot of another vm"
            )));
        }
        let (vm, info) = {
            let st = self.0.lock();
            let entry = st
                .vms
                .get(vm_id)
                .filter(|e| op.as_ref().is_some_and(|op| Arc::ptr_eq(op, &e.op)));
            match entry.map(|e| (e.vm.clone(), e.info.borrow().clone())) {
                Some((Some(vm), info)) if info.state == VmState::Leased => (vm, info),
                _ => {
                    return Err(Error::NotFound(format!(
                        "vm_id {vm_id:?} is not a leased vm of this node"
                    )));
                }
            }
        };
        let tpl = self.0.templates.get(&info.template).ok_or_else(|| {
            Error::FailedPrecondition(format!("template {:?} is gone", info.template))
        })?;
        let sidecar = Sidecar {
            format: SIDECAR_FORMAT,
            vm_id: vm_id.to_owned(),
            template: info.template.clone(),
            image_hash: tpl.image.hash.clone(),
            vcpus: info.vcpus,
            memory_mib: info.memory_mib,
            engine: info.engine.as_str().to_owned(),
            create_time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
        };
        let started = Instant::now();
        let tmp = store.tmp_path(snapshot_id);
        let dest = store.path(snapshot_id);
        if let Err(e) = self.write_snapshot(&vm, &tmp, &dest, sidecar).await {
            if let Err(rm) = std::fs::remove_dir_all(&tmp)
                && rm.kind() != std::io::ErrorKind::NotFound
            {
                tracing::error!(dir = %tmp.display(), error = %rm, "unfinished snapshot not removed (it goes at the next start)");
            }
            tracing::warn!(vm = vm_id, error = %capsa_grpc::error::chain(&e), "snapshot failed; the vm stays leased");
            return Err(e);
        }
        tracing::info!(
            vm = vm_id,
            snapshot = snapshot_id,
            took_ms = started.elapsed().as_millis() as u64,
            "vm snapshotted"
        );
        match afterwards {
            Afterwards::Release => {
                self.release_now(vm_id).await?;
            }
            Afterwards::KeepRunning => self.run_on(vm_id).await?,
        }
        let (_, info) = store.read(snapshot_id)?.ok_or_else(|| {
            Error::Unavailable(format!(
                "snapshot {snapshot_id} vanished after it was taken"
            ))
        })?;
        Ok(info)
    }

    /// Lets a VM paused for its snapshot run again. A VM that cannot is
    /// marked failed, like one whose failed snapshot left it paused.
    async fn run_on(&self, vm_id: &str) -> Result<(), Error> {
        let vm = self.0.lock().vms.get(vm_id).and_then(|e| e.vm.clone());
        let Some(vm) = vm else {
            return Err(Error::NotFound(format!(
                "vm_id {vm_id:?} is not a leased vm of this node"
            )));
        };
        if let Err(e) = vm.resume().await {
            crate::boot::mark_failed(
                &self.0,
                vm_id,
                &format!("not resumed after its snapshot: {e}"),
            );
            return Err(Error::Unavailable(format!(
                "vm {vm_id} was snapshotted but did not run again: {}",
                capsa_grpc::error::chain(&e)
            )));
        }
        Ok(())
    }

    /// Pauses `vm`, writes its snapshot into `tmp` and puts it in place as `dest`; on
    /// failure the VM runs again (the caller removes `tmp`).
    async fn write_snapshot(
        &self,
        vm: &Arc<dyn VirtualMachine>,
        tmp: &Path,
        dest: &Path,
        sidecar: Sidecar,
    ) -> Result<(), Error> {
        let exited = |e: capsa_vmm::VmmError| match e {
            capsa_vmm::VmmError::Exited(why) => {
                Error::FailedPrecondition(format!("vm {} has exited: {why}", vm.id()))
            }
            other => Error::Vmm(other),
        };
        std::fs::create_dir(tmp).map_err(|e| Error::io("create snapshot dir", tmp, e))?;
        vm.pause().await.map_err(exited)?;
        let written = async {
            vm.snapshot(tmp).await.map_err(exited)?;
            let (tmp, dest) = (tmp.to_owned(), dest.to_owned());
            tokio::task::spawn_blocking(move || commit(&tmp, &dest, &sidecar))
                .await
                .map_err(|e| Error::Unavailable(format!("snapshot commit task failed: {e}")))?
        }
        .await;
        if written.is_err()
            && let Err(e) = vm.resume().await
        {
            tracing::error!(vm = vm.id(), error = %capsa_grpc::error::chain(&e), "vm not resumed after a failed snapshot");
            crate::boot::mark_failed(
                &self.0,
                vm.id(),
                &format!("not resumed after a failed snapshot: {e}"),
            );
        }
        written
    }

    /// Starts a VM from snapshot `snapshot_id` for `lease_id` (idempotent per lease id),
    /// with `egress` in force.
    #[tracing::instrument(skip(self, egress), fields(vm_id))]
    pub async fn resume(
        &self,
        snapshot_id: &str,
        lease_id: &str,
        egress: EgressPolicy,
    ) -> Result<VmInfo, Error> {
        let started = Instant::now();
        validate_id(snapshot_id)?;
        self.validate_lease_id(lease_id)?;
        let pool = self.clone();
        let (obtain, lease_id) = (
            Obtain::Snapshot(snapshot_id.to_owned()),
            lease_id.to_owned(),
        );
        let span = tracing::Span::current();
        tokio::spawn(
            async move { pool.lease(obtain, &lease_id, egress, started).await }.instrument(span),
        )
        .await
        .map_err(|e| Error::Unavailable(format!("resume task failed: {e}")))?
        .map(|(info, _)| info)
    }

    /// Restores snapshot `snapshot_id` as a new VM leased to `lease_id` (the caller holds
    /// the lease's lock), making room like a cold boot.
    pub(crate) async fn restore(&self, snapshot_id: &str, lease_id: &str) -> Result<VmInfo, Error> {
        let store = &self.0.snapshots;
        let hold = store.shared(snapshot_id).await;
        let Some((sidecar, _)) = store.read(snapshot_id)? else {
            return Err(Error::NotFound(format!(
                "snapshot_id {snapshot_id:?} is not a snapshot of this node"
            )));
        };
        let engine = self.0.engine.kind.as_str();
        if sidecar.engine != engine {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {snapshot_id} was taken by {}; this node runs {engine}",
                sidecar.engine
            )));
        }
        let Some(tpl) = self.0.templates.get(&sidecar.template) else {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {snapshot_id} is of template {:?}, which is not configured on this node",
                sidecar.template
            )));
        };
        if tpl.image.hash != sidecar.image_hash {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {snapshot_id} was taken on another image of template {:?} ({}; now {})",
                sidecar.template, sidecar.image_hash, tpl.image.hash
            )));
        }
        let id = self.reserve(tpl, sidecar.vcpus, sidecar.memory_mib, lease_id)?;
        tracing::Span::current().record("vm_id", id.as_str());
        let source = crate::boot::Source::Restore {
            dir: store.path(snapshot_id),
            hold,
        };
        crate::boot::run_boot(&self.0, &id, tpl, sidecar.vcpus, sidecar.memory_mib, source).await
    }

    pub fn snapshot(&self, snapshot_id: &str) -> Result<SnapshotInfo, Error> {
        validate_id(snapshot_id)?;
        match self.0.snapshots.read(snapshot_id)? {
            Some((_, info)) => Ok(info),
            None => Err(Error::NotFound(format!(
                "snapshot_id {snapshot_id:?} is not a snapshot of this node"
            ))),
        }
    }

    /// Every complete snapshot on this node, in id order, but for the node's own bases.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, Error> {
        let mut all = self.0.snapshots.list()?;
        all.retain(|s| !s.id.starts_with(crate::warm_base::BASE_PREFIX));
        Ok(all)
    }

    /// Removes snapshot `snapshot_id` (after any restore reading it); false when absent.
    #[tracing::instrument(skip(self))]
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<bool, Error> {
        validate_id(snapshot_id)?;
        // In its own task: a caller that goes away must not cut the removal short.
        let (pool, snapshot_id) = (self.clone(), snapshot_id.to_owned());
        let span = tracing::Span::current();
        tokio::spawn(async move { pool.delete_now(&snapshot_id).await }.instrument(span))
            .await
            .map_err(|e| Error::Unavailable(format!("delete task failed: {e}")))?
    }

    pub(crate) async fn delete_now(&self, snapshot_id: &str) -> Result<bool, Error> {
        let store = &self.0.snapshots;
        let _hold = store.exclusive(snapshot_id).await;
        let dir = store.path(snapshot_id);
        let doomed = store.tmp_path(snapshot_id);
        // Renamed first: a crash during the removal leaves a `.tmp-` dir, never a
        // snapshot missing some of its files.
        match std::fs::rename(&dir, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io("rename snapshot for removal", &dir, e)),
        }
        tokio::fs::remove_dir_all(&doomed)
            .await
            .map_err(|e| Error::io("remove snapshot", &doomed, e))?;
        tracing::info!(snapshot = snapshot_id, "snapshot deleted");
        Ok(true)
    }
}

/// Gives a restored guest its own identity through the agent's Reidentify: the address,
/// gateway and MAC of `net` (empty without a network), host entropy and the host's clock.
pub(crate) async fn reidentify(
    vsock: &Path,
    net: Option<&NetSpec>,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    let mut entropy = vec![0; ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut entropy))
        .map_err(|e| format!("read host entropy: {e}"))?;
    let request = ReidentifyRequest {
        address: net.map_or_else(String::new, |n| format!("{}/{}", n.guest_ip, n.prefix)),
        gateway: net.map_or_else(String::new, |n| n.gateway.to_string()),
        mac: net.map_or_else(String::new, |n| n.mac.clone()),
        entropy: entropy.into(),
        host_time: Some(capsa_proto::time::timestamp(SystemTime::now())),
    };
    let mut agent = AgentServiceClient::new(capsa_vsock::channel(
        vsock.to_owned(),
        capsa_vsock::AGENT_PORT,
    ));
    let reply = tokio::time::timeout_at(deadline, agent.reidentify(request))
        .await
        .map_err(|_| "the agent's Reidentify did not answer in time".to_owned())?
        .map_err(|s| {
            format!(
                "the agent's Reidentify failed: {}: {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    let step = reply
        .clock_step
        .as_ref()
        .and_then(capsa_proto::time::from_duration);
    tracing::info!(machine_id = %reply.machine_id, clock_step = ?step, "guest reidentified");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_ids_are_checked_and_name_the_field() {
        for good in ["a", "snap-1", &"a".repeat(64)] {
            validate_id(good).unwrap();
        }
        for bad in ["", "A", "a_b", ".tmp-x", "a/b", "..", &"a".repeat(65)] {
            let err = validate_id(bad).unwrap_err().to_string();
            assert!(err.contains("snapshot_id"), "{bad}: {err}");
        }
    }

    fn sidecar() -> Sidecar {
        Sidecar {
            format: SIDECAR_FORMAT,
            vm_id: "vm-1".into(),
            template: "default".into(),
            image_hash: "abc".into(),
            vcpus: 1,
            memory_mib: 512,
            engine: "qemu-tcg".into(),
            create_time_ms: 1_700_000_000_123,
        }
    }

    #[tokio::test]
    async fn only_committed_snapshots_exist_and_tmp_dirs_go_at_start_up() {
        let state = tempfile::tempdir().unwrap();
        assert_eq!(prepare(state.path()).unwrap(), 0);
        let store = Store::new(state.path());
        // A suspend cut short: files, no rename.
        let cut = store.tmp_path("s1");
        std::fs::create_dir(&cut).unwrap();
        std::fs::write(cut.join("vmstate"), vec![1u8; 10_000]).unwrap();
        assert!(store.read("s1").unwrap().is_none());
        assert!(store.list().unwrap().is_empty());

        let tmp = store.tmp_path("s2");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("vmstate"), vec![1u8; 10_000]).unwrap();
        commit(&tmp, &store.path("s2"), &sidecar()).unwrap();
        assert!(!tmp.exists());
        let (read, info) = store.read("s2").unwrap().unwrap();
        assert_eq!(read, sidecar());
        assert!(info.size_bytes >= 10_000, "{info:?}");
        assert_eq!(
            info.create_time,
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
        );
        assert_eq!(
            store
                .list()
                .unwrap()
                .iter()
                .map(|s| &s.id)
                .collect::<Vec<_>>(),
            ["s2"]
        );

        // A restart: the cut one goes, the complete one stays.
        assert_eq!(prepare(state.path()).unwrap(), 1);
        assert!(!cut.exists());
        assert!(store.read("s2").unwrap().is_some());
    }

    #[tokio::test]
    async fn a_restore_holds_off_a_delete_and_locks_are_forgotten() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::new(state.path());
        let shared = store.shared("s1").await;
        let second = store.shared("s1").await;
        let lock = store.lock_of("s1");
        assert!(lock.clone().try_write_owned().is_err(), "readers hold it");
        drop(lock);
        drop((shared, second));
        assert!(store.locks.lock().unwrap().is_empty());
        let exclusive = store.exclusive("s1").await;
        assert!(store.lock_of("s1").try_read_owned().is_err());
        drop(exclusive);
        assert!(store.locks.lock().unwrap().is_empty());
    }
}
