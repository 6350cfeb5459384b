//! Booting VMs, keeping the warm pools full, and noticing deaths.
//!
//! A boot: take a boot slot (bounded concurrency) → the hypervisor starts the VMM → a
//! watcher task awaits the VMM's exit for the rest of the VM's life → the agent's
//! `grpc.health.v1` Check over hybrid vsock answers SERVING → the VM is `Warm` (queued) or,
//! for a cold boot, `Leased`. A VMM that exits, or an agent silent past the boot timeout,
//! makes the VM `Failed` with the reason; its processes and dir are destroyed at once.
//!
//! A restore ([`Source::Restore`], for ResumeVm) takes the same path with the hypervisor's
//! restore instead of its boot, and between the health check and `Leased` the agent's
//! `Reidentify` gives the guest its new address, MAC, machine-id, RNG seed and clock
//! ([`crate::snapshots::reidentify`]); a failed Reidentify fails the restore.
//!
//! The refill loop wakes on every change (and on backoff deadlines) and starts boots
//! while a template has fewer warm + booting VMs than its target and the node has room.
//! Consecutive failed boots of a template back its refills off exponentially (1 s .. 60 s)
//! so a broken image does not spin. With `warm_from_snapshot`, refills restore the
//! template's base snapshot instead, once it is made ([`crate::warm_base`]). A refill boot
//! runs at a quarter of the normal CPU weight until its VM is warm
//! ([`capsa_vmm::cpu_balance::CpuClass::Refill`]), so sessions' Executes come first, and
//! for at most a quarter of the boot timeout, so a busy host cannot starve it into failing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use capsa_vmm::cpu_balance::CpuClass;
use capsa_vmm::{VirtualMachine, VmSpec};
use tokio::sync::watch;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::error::Error;
use crate::pool::{Entry, Shared, State, Template};
use crate::vm::{VmInfo, VmState, new_vm_id};
use crate::warm_base::Base;

/// Per health-check attempt (the vsock connect is retried with a short backoff).
const HEALTH_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a new VM starts from.
pub(crate) enum Source {
    /// The template's kernel and root fs.
    Boot,
    /// The snapshot in `dir`; `hold` keeps it from being deleted until the VMM has read it.
    Restore {
        dir: PathBuf,
        hold: crate::snapshots::Hold,
    },
}

impl Source {
    /// "boot" or "restore": for logs, errors and the boot-duration metric.
    fn name(&self) -> &'static str {
        match self {
            Source::Boot => "boot",
            Source::Restore { .. } => "restore",
        }
    }
}

/// Records a new `Booting` VM; `lease` is set for a cold boot on behalf of a lease.
pub(crate) fn insert_booting(
    shared: &Shared,
    st: &mut State,
    tpl: &Template,
    vcpus: u32,
    memory_mib: u32,
    lease: Option<&str>,
) -> String {
    let id = new_vm_id();
    let info = VmInfo {
        id: id.clone(),
        template: tpl.name.clone(),
        vcpus,
        memory_mib,
        state: VmState::Booting,
        lease_id: lease.map(str::to_owned),
        engine: shared.engine.kind,
        vmm_pid: 0,
        boot_time: SystemTime::now(),
        boot_duration: None,
        lease_time: lease.map(|_| SystemTime::now()),
        failure: None,
    };
    st.vms.insert(
        id.clone(),
        Entry {
            info: watch::channel(info).0,
            vm: None,
            otlp_relay: None,
            at_lease: Default::default(),
            net: None,
            op: Default::default(),
        },
    );
    id
}

/// Boots (or restores, per `source`) the `Booting` VM `id` and brings it to `Warm` or
/// `Leased`.
#[tracing::instrument(skip(shared, tpl, source), fields(template = %tpl.name, source = source.name()))]
pub(crate) async fn run_boot(
    shared: &Arc<Shared>,
    id: &str,
    tpl: &Template,
    vcpus: u32,
    memory_mib: u32,
    source: Source,
) -> Result<VmInfo, Error> {
    let what = source.name();
    let restoring = matches!(source, Source::Restore { .. });
    let fail = |reason: String| fail(shared, id, what, reason);
    let _slot = tokio::select! {
        slot = shared.boot_slots.acquire() => slot.expect("the boot semaphore is never closed"),
        _ = shared.closing.cancelled() => return Err(fail("vm-pool is shutting down".into())),
    };
    let started = Instant::now();
    // One bound for the whole boot, VMM start-up included: a boot stuck anywhere holds a
    // boot slot, and with it every boot queued behind it.
    let deadline = tokio::time::Instant::now() + shared.settings.boot_timeout;
    let kind = shared.engine.kind;
    let mut cmdline = tpl.image.cmdline_for(kind);
    let net = match &shared.settings.network {
        Some(network) => match network.attach(id).await {
            Ok(net) => {
                let guard = crate::net::VmNetGuard::new(network.clone(), id);
                let mut st = shared.lock();
                let Some(entry) = st.vms.get_mut(id) else {
                    return Err(Error::Unavailable(format!(
                        "vm {id} was released during its boot"
                    )));
                };
                entry.net = Some(guard);
                cmdline = format!("{cmdline} {}", net.kernel_arg());
                Some(net)
            }
            Err(e) => {
                return Err(fail(format!("network: {}", capsa_grpc::error::chain(&e))));
            }
        },
        None => None,
    };
    let spec = VmSpec {
        id: id.to_owned(),
        vcpus,
        memory_mib,
        kernel: tpl.image.kernel_for(kind).to_owned(),
        cmdline,
        rootfs_base: Some(tpl.image.rootfs.clone()),
        initrd: None,
        dir: shared.settings.state_dir.join("vms").join(id),
        net,
    };
    let started_vmm = async {
        match source {
            Source::Boot => shared.hv.boot(&spec).await,
            Source::Restore { dir, hold } => {
                let vm = shared.hv.restore(&spec, &dir).await;
                // The VMM has read the snapshot (or failed): it may be deleted now.
                drop(hold);
                vm
            }
        }
    };
    let vm = match tokio::time::timeout_at(deadline, started_vmm).await {
        Ok(Ok(vm)) => vm,
        Ok(Err(e)) => {
            return Err(fail(format!(
                "vmm start failed: {}",
                capsa_grpc::error::chain(&e)
            )));
        }
        Err(_) => {
            return Err(fail(format!(
                "the vmm did not start within {:?}",
                shared.settings.boot_timeout
            )));
        }
    };
    if !attach(shared, id, &vm) {
        // Released (or the pool shut down) while the VMM was starting.
        let _ = vm.destroy().await;
        return Err(Error::Unavailable(format!(
            "vm {id} was released during its boot"
        )));
    }
    spawn_watcher(shared.clone(), vm.clone());
    let refill = shared
        .lock()
        .vms
        .get(id)
        .is_some_and(|e| e.info.borrow().lease_id.is_none());
    if refill && let Err(e) = set_cpu_class(shared, id, CpuClass::Refill) {
        // Only a boot that competes harder than it needs to.
        tracing::warn!(vm = id, error = %e, "refill boot keeps the normal cpu weight");
    }

    let vsock = vm.vsock_path();
    let ready = async {
        match tokio::time::timeout_at(deadline, wait_healthy(&vsock)).await {
            Ok(()) => {}
            Err(_) => {
                return Err(format!(
                    "agent did not answer its health check within {:?}{}",
                    shared.settings.boot_timeout,
                    console_tail(&vm)
                ));
            }
        }
        if restoring {
            let reidentified =
                crate::snapshots::reidentify(&vsock, spec.net.as_ref(), deadline).await;
            reidentified.map_err(|e| format!("{e}{}", console_tail(&vm)))?;
        }
        Ok(())
    };
    // A refill boot still not healthy after a quarter of the boot timeout goes back to the
    // normal weight: a host busy with other VMs slows refills down, but must not starve
    // them into failing their health check.
    let ready = unless_done_within(ready, shared.settings.boot_timeout / 4, || {
        if refill {
            match set_cpu_class(shared, id, CpuClass::Interactive) {
                Ok(()) => tracing::info!(vm = id, "slow refill boot back at the normal cpu weight"),
                Err(e) => {
                    tracing::warn!(vm = id, error = %e, "cannot restore a slow refill boot's cpu weight")
                }
            }
        }
    });
    let outcome = tokio::select! {
        r = ready => r,
        exit = vm.wait() => Err(format!("vmm {} during {what}{}", exit.description, console_tail(&vm))),
        _ = shared.closing.cancelled() => Err("vm-pool is shutting down".into()),
    };
    // Back to the normal weight before the VM can be leased: a session must never run at a
    // refill boot's weight.
    let outcome = outcome.and_then(|()| {
        if refill {
            set_cpu_class(shared, id, CpuClass::Interactive)
                .map_err(|e| format!("cannot restore the vm's cpu weight: {e}"))?;
        }
        Ok(())
    });
    if let Err(reason) = outcome {
        let err = fail(reason);
        let _ = vm.destroy().await;
        return Err(err);
    }
    let took = started.elapsed();
    shared.metrics.booted(took, what);
    let mut st = shared.lock();
    let st = &mut *st;
    if !restoring {
        st.backoff.remove(&tpl.name);
    }
    let Some(entry) = st.vms.get(id) else {
        drop(vm);
        return Err(Error::Unavailable(format!(
            "vm {id} was released during its boot"
        )));
    };
    if entry.info.borrow().state != VmState::Booting {
        let state = entry.info.borrow().state;
        return Err(Error::Unavailable(format!(
            "vm {id} became {state:?} during its boot"
        )));
    }
    entry.info.send_modify(|i| {
        i.boot_duration = Some(took);
        i.state = if i.lease_id.is_some() {
            VmState::Leased
        } else {
            VmState::Warm
        };
    });
    let info = entry.info.borrow().clone();
    if info.state == VmState::Warm {
        let q = st.warm.entry(tpl.name.clone()).or_default();
        q.push_back(id.to_owned());
        shared.metrics.warm(&tpl.name, q.len());
    }
    tracing::info!(vm = id, source = what, boot_ms = took.as_millis() as u64, state = ?info.state, "vm started");
    shared.changed.notify_one();
    Ok(info)
}

/// Runs `work` to its end, calling `slow` once if it is still running after `after`.
async fn unless_done_within<T>(
    work: impl Future<Output = T>,
    after: Duration,
    slow: impl FnOnce(),
) -> T {
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => return out,
        () = tokio::time::sleep(after) => slow(),
    }
    work.await
}

/// Gives VM `id` the CPU weight of `class`, where the pool manages the VMs' cgroups.
fn set_cpu_class(shared: &Shared, id: &str, class: CpuClass) -> std::io::Result<()> {
    match &shared.settings.vm_cgroups {
        Some(root) => capsa_vmm::cpu_balance::set_class(root, id, class),
        None => Ok(()),
    }
}

/// Stores the VM handle on its entry; false when the entry is gone.
fn attach(shared: &Shared, id: &str, vm: &Arc<dyn VirtualMachine>) -> bool {
    let mut st = shared.lock();
    let Some(entry) = st.vms.get_mut(id) else {
        return false;
    };
    entry.vm = Some(vm.clone());
    entry.info.send_modify(|i| i.vmm_pid = vm.vmm_pid());
    // Listening before the guest agent probes for it (seconds after the VMM starts).
    if let Some(relay) = &shared.settings.guest_otlp {
        match relay.start(&vm.vsock_path(), id) {
            Ok(relay) => entry.otlp_relay = Some(relay),
            Err(e) => tracing::warn!(vm = id, error = %e, "cannot relay guest telemetry"),
        }
    }
    true
}

/// Awaits the VMM's exit for the VM's whole life: an exit while the VM is live is a failure.
fn spawn_watcher(shared: Arc<Shared>, vm: Arc<dyn VirtualMachine>) {
    tokio::spawn(async move {
        let exit = vm.wait().await;
        let failed = mark_failed(&shared, vm.id(), &format!("vmm {}", exit.description));
        if failed {
            tracing::warn!(vm = vm.id(), exit = %exit.description, "vmm exited; vm failed");
        }
        // Whatever the state, nothing of a dead VM stays: helper processes, sockets, dir.
        if let Err(e) = vm.destroy().await {
            tracing::error!(vm = vm.id(), error = %capsa_grpc::error::chain(&e), "cleanup after exit failed");
        }
    });
}

/// Marks a live VM `Failed` (if it still is live) and returns the error for it; a failed
/// boot (`what`) backs its template's refills off, a failed restore does not (the template
/// may boot fine).
fn fail(shared: &Arc<Shared>, id: &str, what: &'static str, reason: String) -> Error {
    mark_failed(shared, id, &reason);
    // Not inside an `if let` on the guard: back_off takes the lock itself.
    let template = shared
        .lock()
        .vms
        .get(id)
        .map(|e| e.info.borrow().template.clone());
    if let Some(template) = &template
        && what == "boot"
    {
        back_off(shared, template);
    }
    if shared.closing.is_cancelled() || template.is_none() {
        // Shutting down, or released mid-boot (its entry is gone): not the boot's fault.
        tracing::debug!(vm = id, %reason, "{what} abandoned");
        Error::Unavailable(format!("{what} of {id} abandoned: {reason}"))
    } else {
        tracing::warn!(vm = id, %reason, "{what} failed");
        Error::BootFailed(format!("{what} of {id} failed: {reason}"))
    }
}

/// Marks `id` failed when it is live; true if it changed.
pub(crate) fn mark_failed(shared: &Arc<Shared>, id: &str, reason: &str) -> bool {
    let mut st = shared.lock();
    let st = &mut *st;
    let Some(entry) = st.vms.get_mut(id) else {
        return false;
    };
    let was = entry.info.borrow().state;
    if !was.is_live() {
        return false;
    }
    entry.info.send_modify(|i| {
        i.state = VmState::Failed;
        i.failure = Some(reason.to_owned());
    });
    // The guest is gone or going: its telemetry connections end now, not with the record.
    entry.otlp_relay = None;
    let info = entry.info.borrow().clone();
    if let Some(q) = st.warm.get_mut(&info.template) {
        q.retain(|v| v != id);
        shared.metrics.warm(&info.template, q.len());
    }
    // Only a lease holder releases a failed VM, and a VM that failed while booting for a
    // lease was never handed out: its acquire got a retry's VM or an error instead.
    if info.lease_id.is_none() || was == VmState::Booting {
        let shared2 = shared.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(shared2.settings.failed_vm_retention).await;
            let mut st = shared2.lock();
            if st
                .vms
                .get(&id)
                .is_some_and(|e| e.info.borrow().state == VmState::Failed)
            {
                st.vms.remove(&id);
            }
        });
    }
    shared.changed.notify_one();
    true
}

fn back_off(shared: &Shared, template: &str) {
    let mut st = shared.lock();
    let (failures, until) = st
        .backoff
        .entry(template.to_owned())
        .or_insert((0, Instant::now()));
    *failures += 1;
    let delay = Duration::from_secs(1u64 << (*failures - 1).min(6)).min(Duration::from_secs(60));
    *until = Instant::now() + delay;
}

/// First pause between health-check attempts; it grows to [`HEALTH_POLL_MAX`].
const HEALTH_POLL_FIRST: Duration = Duration::from_millis(5);
/// Longest pause between health-check attempts, which is how late a boot or restore can
/// see its agent come up. Kept short on purpose: an attempt before the agent is up is a
/// connect refused at once (under QEMU by the agent channel's bridge, without touching the
/// guest; under Cloud Hypervisor by the guest's vsock), at most 50 a second per booting
/// VM, while every millisecond here is on the path of a cold boot, a restore and a fork.
/// (Doubling to 250 ms, as before, cost a TCG cold boot here about 115 ms and a restore
/// about 30 ms: BENCHMARKS.md.)
const HEALTH_POLL_MAX: Duration = Duration::from_millis(20);

/// Polls the agent's health over hybrid vsock until it says SERVING.
pub async fn wait_healthy(vsock: &Path) {
    let mut delay = HEALTH_POLL_FIRST;
    loop {
        let channel = capsa_vsock::channel(vsock.to_owned(), capsa_vsock::AGENT_PORT);
        let mut client = HealthClient::new(channel);
        let check = client.check(HealthCheckRequest {
            service: String::new(),
        });
        if let Ok(Ok(resp)) = tokio::time::timeout(HEALTH_ATTEMPT_TIMEOUT, check).await
            && resp.into_inner().status == ServingStatus::Serving as i32
        {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(HEALTH_POLL_MAX);
    }
}

fn console_tail(vm: &Arc<dyn VirtualMachine>) -> String {
    let text = std::fs::read(vm.console_log()).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[text.len().saturating_sub(2048)..]).into_owned();
    match text.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(line) => format!(" (console: {})", line.trim()),
        None => String::new(),
    }
}

/// Keeps every template's warm + booting count at its target, within capacity (VMs,
/// memory and vCPUs: `Settings::fits`).
pub(crate) async fn refill_loop(shared: Arc<Shared>) {
    loop {
        let next_backoff = start_refills(&shared);
        let backoff_sleep = async {
            match next_backoff {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = backoff_sleep => {}
            _ = shared.closing.cancelled() => return,
        }
    }
}

/// Starts the boots the deficits call for; returns the earliest backoff deadline that
/// held a template back.
fn start_refills(shared: &Arc<Shared>) -> Option<Instant> {
    if shared.closing.is_cancelled() {
        return None;
    }
    let mut st = shared.lock();
    let mut used = crate::capacity::Usage::of(&st);
    let mut next_backoff: Option<Instant> = None;
    let mut names: Vec<&Template> = shared.templates.values().collect();
    names.sort_by(|a, b| a.name.cmp(&b.name));
    for tpl in names {
        if let Some(&(_, until)) = st.backoff.get(&tpl.name)
            && until > Instant::now()
        {
            next_backoff = Some(next_backoff.map_or(until, |n| n.min(until)));
            continue;
        }
        let have = st
            .vms
            .values()
            .filter(|e| {
                let i = e.info.borrow();
                i.template == tpl.name
                    && i.lease_id.is_none()
                    && matches!(i.state, VmState::Warm | VmState::Booting)
            })
            .count() as u32;
        // Only ever set with `warm_from_snapshot` (by `adopt` or `make`).
        let base = st.bases.get(&tpl.name).cloned();
        if base.is_none() && shared.settings.warm_from_snapshot && tpl.warm_target > 0 {
            // The base's VM is leased to the pool itself: it counts against capacity, not
            // as warm. Meanwhile refills cold-boot.
            if shared
                .settings
                .fits(used, tpl.vcpus, tpl.memory_mib)
                .is_err()
            {
                return next_backoff;
            }
            used.add(tpl.vcpus, tpl.memory_mib);
            st.bases.insert(tpl.name.clone(), Base::Making);
            let lease = format!("{}{}", crate::warm_base::BASE_PREFIX, tpl.name);
            let id = insert_booting(
                shared,
                &mut st,
                tpl,
                tpl.vcpus,
                tpl.memory_mib,
                Some(&lease),
            );
            tokio::spawn(crate::warm_base::make(shared.clone(), id, tpl.clone()));
        }
        for _ in have..tpl.warm_target {
            if shared
                .settings
                .fits(used, tpl.vcpus, tpl.memory_mib)
                .is_err()
            {
                return next_backoff;
            }
            used.add(tpl.vcpus, tpl.memory_mib);
            let id = insert_booting(shared, &mut st, tpl, tpl.vcpus, tpl.memory_mib, None);
            let (shared, tpl) = (shared.clone(), tpl.clone());
            match &base {
                Some(Base::Ready(base)) => {
                    tokio::spawn(crate::warm_base::restore_warm(
                        shared,
                        id,
                        tpl,
                        base.clone(),
                    ));
                }
                _ => {
                    tokio::spawn(async move {
                        let _ =
                            run_boot(&shared, &id, &tpl, tpl.vcpus, tpl.memory_mib, Source::Boot)
                                .await;
                    });
                }
            }
        }
    }
    next_backoff
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_done_in_time_is_not_slow() {
        let slow = AtomicU32::new(0);
        let work = async {
            tokio::time::sleep(Duration::from_secs(14)).await;
            7
        };
        let out = unless_done_within(work, Duration::from_secs(15), || {
            slow.fetch_add(1, Ordering::Relaxed);
        })
        .await;
        assert_eq!((out, slow.load(Ordering::Relaxed)), (7, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_work_is_marked_once_and_still_finishes() {
        let slow = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let work = async {
            tokio::time::sleep(Duration::from_secs(50)).await;
            7
        };
        let out = unless_done_within(work, Duration::from_secs(15), || {
            assert_eq!(started.elapsed(), Duration::from_secs(15));
            slow.fetch_add(1, Ordering::Relaxed);
        })
        .await;
        assert_eq!((out, slow.load(Ordering::Relaxed)), (7, 1));
        assert_eq!(started.elapsed(), Duration::from_secs(50));
    }
}
