//! The pool: every VM this node holds, the warm queue per template, and leases.
//!
//! Invariants, all kept under the one `state` mutex (never held across an await):
//! - a VM id is in at most one warm queue, and only while its state is `Warm`;
//! - taking a VM from a warm queue and marking it `Leased` is one critical section, so a
//!   VM is never handed out twice;
//! - a lease id maps to at most one VM: concurrent AcquireVm calls with the same lease id
//!   serialise on that lease's async lock, and the second sees the first's VM;
//! - live VMs (booting + warm + leased) never exceed the node's capacity: at most
//!   `capacity` VMs, and their memory (guest RAM + the VMM's overhead, what each VM's cgroup
//!   allows) and vCPUs within `capacity_memory_mib` and `capacity_vcpus`
//!   ([`crate::capacity`]);
//! - a release and a suspend of one VM serialise on its `op` lock: whichever comes second
//!   sees what the first left.
//!
//! Booting, refilling and death handling live in [`crate::boot`]; snapshots (suspend,
//! resume) in [`crate::snapshots`].

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use capsa_egress::EgressPolicy;
use capsa_vmm::{EngineChoice, GuestImage, Hypervisor, VirtualMachine, VmCounters};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::capacity::Usage;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::vm::{VmInfo, VmState};

/// How long a released lease id is remembered, so a late retry of its AcquireVm cannot
/// lease (and leak) a second VM.
const RELEASED_LEASE_MEMORY: Duration = Duration::from_secs(3600);
/// Longest lease id accepted.
const MAX_LEASE_ID: usize = 256;

/// One template: the image its VMs boot and the shape of its warm VMs.
#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub image: GuestImage,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub warm_target: u32,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub state_dir: PathBuf,
    /// Most VMs at once.
    pub capacity: u32,
    /// Memory the VMs may take together: guest RAM + `vm_overhead_mib` each.
    pub capacity_memory_mib: u64,
    /// vCPUs the VMs may have together.
    pub capacity_vcpus: u32,
    /// What a VM takes beyond its guest RAM (its cgroup's margin for the VMM).
    pub vm_overhead_mib: u32,
    pub max_concurrent_boots: u32,
    pub boot_timeout: Duration,
    /// How long an unreleasable failed VM stays listed.
    pub failed_vm_retention: Duration,
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// Serves each VM's guest telemetry port, if a collector is configured.
    pub guest_otlp: Option<Arc<crate::otlp_relay::Relay>>,
    /// Every VM's tap and egress rules (`None` boots VMs without a network device).
    pub network: Option<Arc<crate::net::Network>>,
    /// Refill warm pools by restoring each template's base snapshot ([`crate::warm_base`]).
    pub warm_from_snapshot: bool,
    /// The VMs' cgroups, where a refill boot gets the lower [`capsa_vmm::cpu_balance::CpuClass::Refill`]
    /// CPU weight (`None`: every VM keeps the weight it was created with).
    pub vm_cgroups: Option<capsa_vmm::cgroup::CgroupRoot>,
}

/// Counts for GetNodeInfo and the node record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolCounts {
    pub leased: u32,
    pub warm: u32,
    /// (template, warm, booting, target), in template-name order.
    pub templates: Vec<(String, u32, u32, u32)>,
}

/// A cheap handle on the pool.
#[derive(Clone)]
pub struct Pool(pub(crate) Arc<Shared>);

pub(crate) struct Shared {
    pub hv: Arc<dyn Hypervisor>,
    pub engine: EngineChoice,
    pub templates: HashMap<String, Template>,
    pub settings: Settings,
    pub boot_slots: Semaphore,
    pub state: Mutex<State>,
    /// Wakes the refill loop after anything that may change a deficit.
    pub changed: Notify,
    /// Cancelled when the pool starts shutting down.
    pub closing: CancellationToken,
    pub metrics: Metrics,
    pub snapshots: crate::snapshots::Store,
}

#[derive(Default)]
pub(crate) struct State {
    pub vms: HashMap<String, Entry>,
    pub warm: HashMap<String, VecDeque<String>>,
    pub leases: HashMap<String, Arc<tokio::sync::Mutex<Lease>>>,
    /// Per template: consecutive failed boots and when the next refill may start.
    pub backoff: HashMap<String, (u32, Instant)>,
    /// Per template: its base snapshot, with `warm_from_snapshot`.
    pub bases: HashMap<String, crate::warm_base::Base>,
}

pub(crate) struct Entry {
    pub info: watch::Sender<VmInfo>,
    /// Set once the VMM runs.
    pub vm: Option<Arc<dyn VirtualMachine>>,
    /// Relays the guest's telemetry while the VM lives; dropped with the entry or when the
    /// VM fails.
    pub otlp_relay: Option<crate::otlp_relay::VmRelay>,
    /// The VMM's counters when the VM was leased: its boot and warm wait, which are the
    /// node's cost, not the lease's. Taken right after the lease (or by the first
    /// GetVmCounters, if that comes first).
    pub at_lease: Arc<tokio::sync::OnceCell<VmCounters>>,
    /// The VM's tap and rules, removed when the entry goes.
    pub net: Option<crate::net::VmNetGuard>,
    /// Held by a release and by a suspend of this VM.
    pub op: Arc<tokio::sync::Mutex<()>>,
}

/// Where a lease's VM comes from.
pub(crate) enum Obtain {
    /// A warm VM of the template when the shape is its own, else a cold boot.
    Template {
        tpl: Template,
        vcpus: u32,
        memory_mib: u32,
    },
    /// A restore of this node's snapshot with this id.
    Snapshot(String),
}

#[derive(Debug, Clone)]
pub(crate) enum Lease {
    Empty,
    Held { vm_id: String, warm_hit: bool },
    Released { at: Instant },
}

impl Pool {
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        engine: EngineChoice,
        templates: Vec<Template>,
        settings: Settings,
    ) -> Pool {
        let boots = settings.max_concurrent_boots.max(1) as usize;
        let snapshots = crate::snapshots::Store::new(&settings.state_dir);
        Pool(Arc::new(Shared {
            hv,
            engine,
            templates: templates.into_iter().map(|t| (t.name.clone(), t)).collect(),
            boot_slots: Semaphore::new(boots),
            settings,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            closing: CancellationToken::new(),
            metrics: Metrics::new(),
            snapshots,
        }))
    }

    pub fn engine(&self) -> &EngineChoice {
        &self.0.engine
    }

    /// Names of the templates this node can boot, sorted (announced in the node record).
    pub fn template_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.0.templates.keys().cloned().collect();
        names.sort();
        names
    }

    /// VMs of the default template's shape (of the smallest template without one) this
    /// node holds: what the node record announces for placement.
    pub fn capacity(&self) -> u32 {
        let tpl = self.0.templates.get("default").or_else(|| {
            self.0
                .templates
                .values()
                .min_by_key(|t| (t.memory_mib, t.vcpus))
        });
        tpl.map_or(0, |t| self.0.settings.fits_count(t.vcpus, t.memory_mib))
    }

    /// Leases a VM for `lease_id`: warm when the shape matches the template's, else a cold
    /// boot. Idempotent per lease id. `egress` is in force before this returns. Returns
    /// the VM and whether it was a warm hit.
    #[tracing::instrument(skip(self, egress), fields(vm_id))]
    pub async fn acquire(
        &self,
        template: &str,
        vcpus: u32,
        memory_mib: u32,
        lease_id: &str,
        egress: EgressPolicy,
    ) -> Result<(VmInfo, bool), Error> {
        let started = Instant::now();
        let (tpl, vcpus, memory_mib) =
            self.validate_acquire(template, vcpus, memory_mib, lease_id)?;
        // In its own task: a caller that goes away mid cold boot must not strand a
        // half-booted VM or a lease without its VM; a retry then finds the lease held.
        let pool = self.clone();
        let lease_id = lease_id.to_owned();
        let span = tracing::Span::current();
        let obtain = Obtain::Template {
            tpl,
            vcpus,
            memory_mib,
        };
        tokio::spawn(
            async move { pool.lease(obtain, &lease_id, egress, started).await }.instrument(span),
        )
        .await
        .map_err(|e| Error::Unavailable(format!("acquire task failed: {e}")))?
    }

    /// Leases the VM `obtain` brings for `lease_id` (idempotent per lease id), with `egress`
    /// in force. Returns the VM and whether it was a warm hit.
    pub(crate) async fn lease(
        &self,
        obtain: Obtain,
        lease_id: &str,
        egress: EgressPolicy,
        started: Instant,
    ) -> Result<(VmInfo, bool), Error> {
        let slot = {
            let mut st = self.0.lock();
            st.leases
                .entry(lease_id.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Lease::Empty)))
                .clone()
        };
        let mut lease = slot.lock().await;
        match &*lease {
            Lease::Held { vm_id, warm_hit } => {
                let info = self.get(vm_id)?;
                return Ok((info, *warm_hit));
            }
            Lease::Released { .. } => {
                return Err(Error::FailedPrecondition(format!(
                    "lease_id {lease_id:?} was already released"
                )));
            }
            Lease::Empty => {}
        }
        let from_template = matches!(obtain, Obtain::Template { .. });
        let mut result = match obtain {
            Obtain::Template {
                tpl,
                vcpus,
                memory_mib,
            } => match self.take_warm(&tpl, vcpus, memory_mib, lease_id) {
                Some(info) => Ok((info, true)),
                None => self
                    .cold_boot_with_one_retry(&tpl, vcpus, memory_mib, lease_id)
                    .await
                    .map(|info| (info, false)),
            },
            Obtain::Snapshot(id) => self.restore(&id, lease_id).await.map(|info| (info, false)),
        };
        if let Ok((info, _)) = &result
            && let Some(network) = &self.0.settings.network
            && let Err(e) = network.set_policy(&info.id, egress, Some(lease_id)).await
        {
            // A VM whose policy is not in force is never handed out.
            tracing::error!(vm = %info.id, error = %e, "egress policy not applied; discarding the vm");
            self.discard(&info.id);
            result = Err(e);
        }
        match &result {
            Ok((info, warm_hit)) => {
                tracing::Span::current().record("vm_id", info.id.as_str());
                self.record_counters_at_lease(&info.id);
                *lease = Lease::Held {
                    vm_id: info.id.clone(),
                    warm_hit: *warm_hit,
                };
                if from_template {
                    self.0.metrics.acquired(started.elapsed(), *warm_hit);
                }
                tracing::info!(vm = %info.id, warm_hit, from_template, took_ms = started.elapsed().as_millis() as u64, "vm leased");
            }
            Err(_) => {
                // Forget the lease so a retry starts afresh (unless another caller holds it).
                drop(lease);
                let mut st = self.0.lock();
                if st
                    .leases
                    .get(lease_id)
                    .is_some_and(|s| Arc::ptr_eq(s, &slot) && Arc::strong_count(s) == 2)
                {
                    st.leases.remove(lease_id);
                }
            }
        }
        result
    }

    fn validate_acquire(
        &self,
        template: &str,
        vcpus: u32,
        memory_mib: u32,
        lease_id: &str,
    ) -> Result<(Template, u32, u32), Error> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        self.validate_lease_id(lease_id)?;
        let name = if template.is_empty() {
            "default"
        } else {
            template
        };
        let Some(tpl) = self.0.templates.get(name) else {
            let mut known: Vec<&str> = self.0.templates.keys().map(String::as_str).collect();
            known.sort_unstable();
            return bad(format!(
                "template {name:?} is not configured on this node (known: {})",
                known.join(", ")
            ));
        };
        let vcpus = if vcpus == 0 { tpl.vcpus } else { vcpus };
        let memory_mib = if memory_mib == 0 {
            tpl.memory_mib
        } else {
            memory_mib
        };
        let s = &self.0.settings;
        if vcpus > s.max_vcpus {
            return bad(format!(
                "vcpus {vcpus} exceeds this node's limit of {}",
                s.max_vcpus
            ));
        }
        if !(128..=s.max_memory_mib).contains(&memory_mib) {
            return bad(format!(
                "memory_mib {memory_mib} is outside 128..={}",
                s.max_memory_mib
            ));
        }
        Ok((tpl.clone(), vcpus, memory_mib))
    }

    /// Checks a lease id (the message names the field), and that the pool still leases.
    pub(crate) fn validate_lease_id(&self, lease_id: &str) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if lease_id.is_empty() {
            return bad("lease_id is required".into());
        }
        if lease_id.len() > MAX_LEASE_ID || lease_id.chars().any(char::is_control) {
            return bad(format!(
                "lease_id must be 1 to {MAX_LEASE_ID} bytes without control characters"
            ));
        }
        if self.0.closing.is_cancelled() {
            return Err(Error::Unavailable("vm-pool is shutting down".into()));
        }
        Ok(())
    }

    /// Takes a warm VM of `tpl` when the requested shape is the template's.
    fn take_warm(
        &self,
        tpl: &Template,
        vcpus: u32,
        memory_mib: u32,
        lease_id: &str,
    ) -> Option<VmInfo> {
        if (vcpus, memory_mib) != (tpl.vcpus, tpl.memory_mib) {
            return None;
        }
        let mut st = self.0.lock();
        let st = &mut *st;
        let queue = st.warm.get_mut(&tpl.name)?;
        while let Some(id) = queue.pop_front() {
            let Some(entry) = st.vms.get(&id) else {
                continue;
            };
            if entry.info.borrow().state != VmState::Warm {
                continue;
            }
            entry.info.send_modify(|i| {
                i.state = VmState::Leased;
                i.lease_id = Some(lease_id.to_owned());
                i.lease_time = Some(SystemTime::now());
            });
            let left = queue.len();
            self.0.metrics.warm(&tpl.name, left);
            self.0.changed.notify_one();
            return Some(entry.info.borrow().clone());
        }
        None
    }

    /// A cold boot that fails (its VMM exited, its agent stayed silent) is tried once more
    /// with a fresh VM: one bad boot should not fail the caller's session, while a second
    /// failure in a row says the node or image is broken, which the caller must hear.
    async fn cold_boot_with_one_retry(
        &self,
        tpl: &Template,
        vcpus: u32,
        memory_mib: u32,
        lease_id: &str,
    ) -> Result<VmInfo, Error> {
        match self.cold_boot(tpl, vcpus, memory_mib, lease_id).await {
            Err(Error::BootFailed(first)) => {
                tracing::warn!(error = %first, "cold boot failed; booting another vm for the lease");
                self.cold_boot(tpl, vcpus, memory_mib, lease_id)
                    .await
                    .map_err(|e| match e {
                        Error::BootFailed(second) => Error::BootFailed(format!(
                            "two boots failed in a row: {first}; then {second}"
                        )),
                        other => other,
                    })
            }
            other => other,
        }
    }

    /// Boots a VM for a lease (a warm miss).
    async fn cold_boot(
        &self,
        tpl: &Template,
        vcpus: u32,
        memory_mib: u32,
        lease_id: &str,
    ) -> Result<VmInfo, Error> {
        let id = self.reserve(tpl, vcpus, memory_mib, lease_id)?;
        crate::boot::run_boot(
            &self.0,
            &id,
            tpl,
            vcpus,
            memory_mib,
            crate::boot::Source::Boot,
        )
        .await
    }

    /// Records a `Booting` VM of this shape for `lease_id` and returns its id, making room
    /// by evicting warm VMs when the node is full (ResourceExhausted when even that would
    /// not be enough).
    pub(crate) fn reserve(
        &self,
        tpl: &Template,
        vcpus: u32,
        memory_mib: u32,
        lease_id: &str,
    ) -> Result<String, Error> {
        let (id, evicted) = {
            let mut st = self.0.lock();
            // Warm VMs (newest first) make room until the new VM fits, if evicting them
            // all would be enough.
            let mut evicted = Vec::new();
            if self.0.settings.room_for(&st, vcpus, memory_mib).is_err() {
                let unwarm = Usage::of_where(&st, |s| s != VmState::Warm);
                if let Err(short) = self.0.settings.fits(unwarm, vcpus, memory_mib) {
                    return Err(Error::ResourceExhausted(format!(
                        "node is out of {short}, even without its warm VMs"
                    )));
                }
            }
            while let Err(short) = self.0.settings.room_for(&st, vcpus, memory_mib) {
                let Some(victim) = st.warm.values_mut().find_map(|q| q.pop_back()) else {
                    // Unreachable while every warm VM is queued (checked above); refused
                    // rather than trusted.
                    for (_, e) in evicted {
                        self.finish_destroy(e);
                    }
                    return Err(Error::ResourceExhausted(format!("node is out of {short}")));
                };
                if st
                    .vms
                    .get(&victim)
                    .is_some_and(|e| e.info.borrow().state == VmState::Warm)
                    && let Some(e) = st.vms.remove(&victim)
                {
                    // No longer live: its resources count as free from here on.
                    e.info.send_modify(|i| i.state = VmState::Destroyed);
                    evicted.push((victim, e));
                }
            }
            let id = crate::boot::insert_booting(
                &self.0,
                &mut st,
                tpl,
                vcpus,
                memory_mib,
                Some(lease_id),
            );
            (id, evicted)
        };
        for (victim, entry) in evicted {
            tracing::info!(vm = %victim, "evicting a warm vm to make room for a leased vm");
            self.finish_destroy(entry);
        }
        Ok(id)
    }

    /// Destroys a VM (leased or not). `Ok(false)` when no such VM is held (a suspend of
    /// it may have just ended).
    #[tracing::instrument(skip(self))]
    pub async fn release(&self, vm_id: &str) -> Result<bool, Error> {
        if !capsa_vmm::is_vm_id(vm_id) {
            return Err(Error::InvalidArgument(format!(
                "vm_id {vm_id:?} is not a vm id"
            )));
        }
        let Some(op) = self.0.lock().vms.get(vm_id).map(|e| e.op.clone()) else {
            return Ok(false);
        };
        let _op = op.lock().await;
        self.release_now(vm_id).await
    }

    /// Release's work, for a caller holding the VM's `op` lock: the VM goes, its lease is
    /// remembered as released, its capacity and network slot are freed.
    pub(crate) async fn release_now(&self, vm_id: &str) -> Result<bool, Error> {
        let entry = {
            let mut st = self.0.lock();
            let Some(entry) = st.vms.remove(vm_id) else {
                return Ok(false);
            };
            let info = entry.info.borrow().clone();
            if let Some(q) = st.warm.get_mut(&info.template) {
                q.retain(|id| id != vm_id);
                self.0.metrics.warm(&info.template, q.len());
            }
            if let Some(lease) = &info.lease_id {
                st.leases.insert(
                    lease.clone(),
                    Arc::new(tokio::sync::Mutex::new(Lease::Released {
                        at: Instant::now(),
                    })),
                );
            }
            prune_released(&mut st);
            entry
        };
        let vm = entry.vm.clone();
        entry.info.send_modify(|i| i.state = VmState::Destroyed);
        drop(entry);
        self.0.changed.notify_one();
        if let Some(vm) = vm {
            vm.destroy().await?;
        }
        tracing::info!(vm = vm_id, "vm released and destroyed");
        Ok(true)
    }

    /// Destroys a VM without marking its lease released (a retry may lease another).
    fn discard(&self, vm_id: &str) {
        let entry = {
            let mut st = self.0.lock();
            let Some(entry) = st.vms.remove(vm_id) else {
                return;
            };
            let template = entry.info.borrow().template.clone();
            if let Some(q) = st.warm.get_mut(&template) {
                q.retain(|id| id != vm_id);
            }
            entry
        };
        self.finish_destroy(entry);
        self.0.changed.notify_one();
    }

    /// Replaces the egress policy of the leased VM `vm_id`; returns once it is in force
    /// (open connections it forbids are cut at their next packet).
    #[tracing::instrument(skip(self, egress))]
    pub async fn set_egress(&self, vm_id: &str, egress: EgressPolicy) -> Result<(), Error> {
        if !capsa_vmm::is_vm_id(vm_id) {
            return Err(Error::InvalidArgument(format!(
                "vm_id {vm_id:?} is not a vm id"
            )));
        }
        let lease = {
            let st = self.0.lock();
            let info = st.vms.get(vm_id).map(|e| e.info.borrow().clone());
            match info {
                Some(i) if i.state == VmState::Leased => i.lease_id,
                _ => {
                    return Err(Error::NotFound(format!(
                        "vm_id {vm_id:?} is not a leased vm of this node"
                    )));
                }
            }
        };
        let network = self.0.settings.network.as_ref().ok_or_else(|| {
            Error::FailedPrecondition("this node runs its vms without a network".into())
        })?;
        network.set_policy(vm_id, egress, lease.as_deref()).await?;
        tracing::info!(vm = vm_id, "egress policy replaced");
        Ok(())
    }

    /// Publishes DESTROYED for a removed entry and destroys its VM in the background.
    fn finish_destroy(&self, entry: Entry) {
        entry.info.send_modify(|i| i.state = VmState::Destroyed);
        if let Some(vm) = entry.vm {
            tokio::spawn(async move {
                if let Err(e) = vm.destroy().await {
                    tracing::error!(vm = vm.id(), error = %capsa_grpc::error::chain(&e), "destroy failed");
                }
            });
        }
    }

    pub fn get(&self, vm_id: &str) -> Result<VmInfo, Error> {
        let st = self.0.lock();
        st.vms
            .get(vm_id)
            .map(|e| e.info.borrow().clone())
            .ok_or_else(|| Error::NotFound(format!("vm_id {vm_id:?} is not held by this node")))
    }

    /// Every VM held, in id order.
    pub fn list(&self) -> Vec<VmInfo> {
        let st = self.0.lock();
        let mut all: Vec<VmInfo> = st.vms.values().map(|e| e.info.borrow().clone()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The VM's state now and on every change; ends after DESTROYED, when the record is
    /// dropped, or when the pool shuts down.
    pub fn watch(&self, vm_id: &str) -> Result<watch::Receiver<VmInfo>, Error> {
        let st = self.0.lock();
        st.vms
            .get(vm_id)
            .map(|e| e.info.subscribe())
            .ok_or_else(|| Error::NotFound(format!("vm_id {vm_id:?} is not held by this node")))
    }

    /// Cancelled when the pool shuts down (watch streams end on it).
    pub fn closing(&self) -> CancellationToken {
        self.0.closing.clone()
    }

    pub fn counts(&self) -> PoolCounts {
        let st = self.0.lock();
        let mut names: Vec<&Template> = self.0.templates.values().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        let mut counts = PoolCounts::default();
        for tpl in names {
            let (mut warm, mut booting) = (0, 0);
            for e in st.vms.values() {
                let i = e.info.borrow();
                if i.template == tpl.name && i.lease_id.is_none() {
                    match i.state {
                        VmState::Warm => warm += 1,
                        VmState::Booting => booting += 1,
                        _ => {}
                    }
                }
            }
            counts.warm += warm;
            counts
                .templates
                .push((tpl.name.clone(), warm, booting, tpl.warm_target));
        }
        counts.leased = st
            .vms
            .values()
            .filter(|e| e.info.borrow().state == VmState::Leased)
            .count() as u32;
        counts
    }

    /// Stops refilling and cold boots, and ends watch streams; VMs keep running until
    /// [`Pool::destroy_all`].
    pub fn close(&self) {
        self.0.closing.cancel();
        self.0.changed.notify_one();
    }

    /// Destroys every VM (graceful shutdown).
    pub async fn destroy_all(&self) {
        self.close();
        let entries: Vec<Entry> = {
            let mut st = self.0.lock();
            st.warm.clear();
            st.vms.drain().map(|(_, e)| e).collect()
        };
        let vms: Vec<Arc<dyn VirtualMachine>> = entries
            .into_iter()
            .filter_map(|e| {
                e.info.send_modify(|i| i.state = VmState::Destroyed);
                e.vm
            })
            .collect();
        tracing::info!(count = vms.len(), "destroying every vm");
        futures::future::join_all(vms.iter().map(|vm| async move {
            if let Err(e) = vm.destroy().await {
                tracing::error!(vm = vm.id(), error = %capsa_grpc::error::chain(&e), "destroy failed");
            }
        }))
        .await;
    }
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every critical section
        // completes its writes before anything can panic), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn prune_released(st: &mut State) {
    st.leases.retain(|_, slot| match slot.try_lock() {
        Ok(l) => !matches!(&*l, Lease::Released { at } if at.elapsed() > RELEASED_LEASE_MEMORY),
        Err(_) => true,
    });
}
