//! Cloud Hypervisor driver (KVM only).
//!
//! Start-up: the VMM starts with only `--api-socket path=<dir>/api.sock`; once the socket
//! listens, `GET vmm.ping` must report a release we can drive ([`ch_model::check_ping`]),
//! `PUT vm.create` sends the whole [`ch_model::vm_config`], `GET vm.info` must show the VMM
//! kept every field of it ([`ch_model::check_kept`]), and `PUT vm.boot` starts it.
//! Hybrid vsock is native (`vsock.sock`), the disk is the qcow2 overlay with its backing
//! file, the serial console is Cloud Hypervisor's stdout (mode `Tty`).
//!
//! Snapshots: `vm.snapshot` (VM paused) writes `config.json`, `state.json` and memory files
//! into the destination; we add a copy of the overlay (the VM's disk state at that instant).
//! Restore builds a new VM dir: copies the overlay, links the memory files, rewrites
//! `config.json` so the disk and vsock point into the new dir (every other field, known to
//! the API model or not, as the VMM wrote it: [`ch_model::Preserved`]), and
//! `PUT vm.restore`s it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use cloud_hypervisor_client::models::{VmConfig, VmInfo, VmmPingResponse};
use futures::FutureExt as _;
use futures::future::BoxFuture;

use crate::cgroup::VmCgroup;
use crate::ch_api::ChApi;
use crate::ch_model::{self, Counters, Preserved};
use crate::console::Console;
use crate::instance::{self, DirGuard, Instance, delegate_to_instance};
use crate::process::{Supervised, wait_listening};
use crate::sandbox::{Sandbox, vmm_command};
use crate::{EngineKind, Hypervisor, VirtualMachine, VmCounters, VmExit, VmSpec, VmmError, layout};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Files of a snapshot dir, besides the memory ranges.
const SNAPSHOT_CONFIG: &str = "config.json";
/// Where in its VM dir the VMM writes a snapshot (the only place it can write), before it
/// is moved to the caller's destination.
const SNAPSHOT_STAGING: &str = "snapshot-out";

#[derive(Debug, Clone)]
pub struct CloudHypervisorConfig {
    pub binary: PathBuf,
    /// Creates the per-VM overlay.
    pub qemu_img: PathBuf,
    /// Boot this kernel instead of the spec's (a PVM guest kernel on a PVM host).
    pub kernel_override: Option<PathBuf>,
    /// Have the kernel kill the VMM when this process dies (see `Supervised::spawn`).
    pub die_with_parent: bool,
    /// Confine the VMM (user, cgroup, mount view, our seccomp filter on top of its own,
    /// which stays on: no `--seccomp false` is ever passed).
    pub sandbox: Option<Arc<Sandbox>>,
    /// Guest RAM `mergeable` (KSM may share identical pages between VMs).
    pub merge_pages: bool,
}

pub struct CloudHypervisor {
    config: CloudHypervisorConfig,
}

impl CloudHypervisor {
    pub fn new(config: CloudHypervisorConfig) -> CloudHypervisor {
        CloudHypervisor { config }
    }

    /// Starts the VMM process with its API socket and checks its version; the VM is not
    /// created yet.
    async fn start_vmm(
        &self,
        spec: &VmSpec,
        cgroup: Option<&VmCgroup>,
    ) -> Result<(Supervised, Console, ChApi), VmmError> {
        let dir = &spec.dir;
        let api_path = dir.join(layout::API_SOCKET);
        let vmm_log = dir.join(layout::VMM_LOG);
        let confine = self.config.sandbox.as_deref().zip(cgroup);
        let netns = spec.net.as_ref().and_then(|n| n.netns.as_deref());
        let (mut cmd, confinement) = vmm_command(&self.config.binary, confine, dir, netns)?;
        cmd.arg("--api-socket")
            .arg(format!("path={}", api_path.display()));
        let log =
            std::fs::File::create(&vmm_log).map_err(|e| VmmError::io("create log", &vmm_log, e))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        let (vmm, stdout) = Supervised::spawn(
            cmd,
            "cloud-hypervisor",
            Some(&vmm_log),
            self.config.die_with_parent,
            confinement,
        )?;
        instance::write_pid(dir, layout::VMM_PID, vmm.pid())?;
        let console = Console::start(
            stdout.expect("stdout is piped"),
            &dir.join(layout::CONSOLE_LOG),
        )?;
        wait_listening(&api_path, &vmm, "cloud-hypervisor", STARTUP_TIMEOUT).await?;
        let api = ChApi::new(&api_path);
        let ping: VmmPingResponse = api.get("vmm.ping").await?;
        let version = ch_model::check_ping(&ping)?;
        tracing::debug!(%version, build = ?ping.build_version, "cloud-hypervisor answers");
        Ok((vmm, console, api))
    }

    /// The VM's dir, its cgroup when confined, and the guard that removes both on failure.
    fn create_dir<'a>(
        &self,
        spec: &'a VmSpec,
    ) -> Result<(DirGuard<'a>, Option<VmCgroup>), VmmError> {
        instance::create_dir(&spec.dir)?;
        let mut guard = DirGuard::new(&spec.dir);
        let cgroup = match &self.config.sandbox {
            Some(sb) => {
                let cg = sb.prepare(&spec.id, &spec.dir, spec.vcpus, spec.memory_mib)?;
                guard.cgroup(&cg);
                Some(cg)
            }
            None => None,
        };
        Ok((guard, cgroup))
    }

    async fn start(&self, spec: &VmSpec) -> Result<ChVm, VmmError> {
        spec.validate()?;
        let kernel = self
            .config
            .kernel_override
            .as_deref()
            .unwrap_or(&spec.kernel);
        if let Some(sb) = &self.config.sandbox {
            sb.check_readable("kernel", kernel)?;
            if let Some(base) = &spec.rootfs_base {
                sb.check_readable("rootfs_base", base)?;
            }
        }
        let (guard, cgroup) = self.create_dir(spec)?;
        let overlay = match &spec.rootfs_base {
            Some(base) => {
                let overlay =
                    instance::create_overlay(&self.config.qemu_img, base, &spec.dir).await?;
                if let Some(sb) = &self.config.sandbox {
                    sb.give(&overlay)?;
                }
                Some(overlay)
            }
            None => None,
        };
        let (vmm, console, api) = self.start_vmm(spec, cgroup.as_ref()).await?;
        let mut config = ch_model::vm_config(spec, kernel, overlay.as_deref())?;
        if let Some(memory) = config.memory.as_mut() {
            memory.mergeable = Some(self.config.merge_pages);
        }
        api.put_json("vm.create", &config).await?;
        let info: Preserved<VmInfo> = api.get("vm.info").await?;
        let sent = serde_json::to_value(&config).expect("a model serialises");
        ch_model::check_kept(&sent, &info.to_json()["config"]).map_err(|e| VmmError::Api {
            endpoint: "vm.info".into(),
            message: format!("the vmm did not keep the vm.create config: {e}"),
        })?;
        api.put("vm.boot").await?;
        guard.disarm();
        Ok(self.running_vm(spec, vmm, console, cgroup, api))
    }

    /// The handle of a VM whose VMM runs (booted or restored).
    fn running_vm(
        &self,
        spec: &VmSpec,
        vmm: Supervised,
        console: Console,
        cgroup: Option<VmCgroup>,
        api: ChApi,
    ) -> ChVm {
        ChVm {
            instance: Instance::new(spec, EngineKind::CloudHypervisor, vmm, console, cgroup),
            api,
            sandbox: self.config.sandbox.clone(),
        }
    }

    async fn start_restored(&self, spec: &VmSpec, snapshot: &Path) -> Result<ChVm, VmmError> {
        let (guard, cgroup) = self.create_dir(spec)?;
        let local = spec.dir.join("snapshot");
        prepare_restore(snapshot, &local, &spec.dir).await?;
        if let Some(sb) = &self.config.sandbox {
            // The restored VM writes its disk and reads its state as the VMM user.
            sb.give(&spec.dir.join(layout::OVERLAY))?;
        }
        let (vmm, console, api) = self.start_vmm(spec, cgroup.as_ref()).await?;
        api.put_json("vm.restore", &ch_model::restore_config(&local)?)
            .await?;
        guard.disarm();
        Ok(self.running_vm(spec, vmm, console, cgroup, api))
    }
}

/// Lays out a restorable copy of `snapshot` in `local`: memory and state files hard-linked
/// (copied across filesystems), the overlay copied into `vm_dir`, and `config.json`
/// rewritten so the disk and the vsock socket are the new VM's.
async fn prepare_restore(snapshot: &Path, local: &Path, vm_dir: &Path) -> Result<(), VmmError> {
    tokio::fs::create_dir(local)
        .await
        .map_err(|e| VmmError::io("create snapshot copy", local, e))?;
    let mut entries = tokio::fs::read_dir(snapshot)
        .await
        .map_err(|e| VmmError::io("read snapshot", snapshot, e))?;
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| VmmError::io("read snapshot", snapshot, e))?
    {
        let name = entry.file_name();
        let src = entry.path();
        if name == SNAPSHOT_CONFIG {
            continue;
        }
        let dest = if name == layout::OVERLAY {
            vm_dir.join(&name)
        } else {
            local.join(&name)
        };
        if name == layout::OVERLAY || tokio::fs::hard_link(&src, &dest).await.is_err() {
            tokio::fs::copy(&src, &dest)
                .await
                .map_err(|e| VmmError::io("copy snapshot file", &src, e))?;
        }
    }
    let config_path = snapshot.join(SNAPSHOT_CONFIG);
    let text = tokio::fs::read(&config_path)
        .await
        .map_err(|e| VmmError::io("read snapshot config", &config_path, e))?;
    let mut config: Preserved<VmConfig> = serde_json::from_slice(&text)
        .map_err(|e| VmmError::InvalidSpec(format!("snapshot config.json: {e}")))?;
    retarget_config(&mut config.typed, vm_dir)?;
    let out = local.join(SNAPSHOT_CONFIG);
    tokio::fs::write(&out, serde_json::to_vec(&config).expect("json serialises"))
        .await
        .map_err(|e| VmmError::io("write snapshot config", &out, e))
}

/// Moves every file of `from` into `to` (copying across file systems), then removes `from`.
async fn move_dir_contents(from: &Path, to: &Path) -> Result<(), VmmError> {
    let mut entries = tokio::fs::read_dir(from)
        .await
        .map_err(|e| VmmError::io("read snapshot staging dir", from, e))?;
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| VmmError::io("read snapshot staging dir", from, e))?
    {
        let dest = to.join(entry.file_name());
        if tokio::fs::rename(entry.path(), &dest).await.is_err() {
            tokio::fs::copy(entry.path(), &dest)
                .await
                .map_err(|e| VmmError::io("move snapshot file", entry.path(), e))?;
        }
    }
    instance::remove_dir(from).await
}

/// Points a snapshot's disk and vsock socket into `vm_dir`.
fn retarget_config(config: &mut VmConfig, vm_dir: &Path) -> Result<(), VmmError> {
    let text = |name: &str| {
        let path = vm_dir.join(name);
        path.to_str().map(str::to_owned).ok_or_else(|| {
            VmmError::InvalidSpec(format!("vm dir {} is not UTF-8", vm_dir.display()))
        })
    };
    for disk in config.disks.iter_mut().flatten() {
        disk.path = Some(text(layout::OVERLAY)?);
    }
    if let Some(vsock) = &mut config.vsock {
        vsock.socket = text(layout::VSOCK_SOCKET)?;
    }
    Ok(())
}

impl Hypervisor for CloudHypervisor {
    fn engine(&self) -> EngineKind {
        EngineKind::CloudHypervisor
    }

    fn boot<'a>(
        &'a self,
        spec: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Arc<dyn VirtualMachine>, VmmError>> {
        async move {
            self.start(spec)
                .await
                .map(|vm| Arc::new(vm) as Arc<dyn VirtualMachine>)
        }
        .boxed()
    }

    fn restore<'a>(
        &'a self,
        spec: &'a VmSpec,
        snapshot: &'a Path,
    ) -> BoxFuture<'a, Result<Arc<dyn VirtualMachine>, VmmError>> {
        async move {
            self.start_restored(spec, snapshot)
                .await
                .map(|vm| Arc::new(vm) as Arc<dyn VirtualMachine>)
        }
        .boxed()
    }
}

/// A running Cloud Hypervisor VM.
pub struct ChVm {
    instance: Instance,
    api: ChApi,
    sandbox: Option<Arc<Sandbox>>,
}

impl ChVm {
    fn alive(&self) -> Result<(), VmmError> {
        match self.instance.vmm.exit() {
            Some(exit) => Err(VmmError::Exited(exit.description)),
            None => Ok(()),
        }
    }
}

/// Sums every device's byte counters in a `vm.counters` reply
/// (`{"_disk0": {"read_bytes": .., "write_bytes": ..}, "_net0": {"rx_bytes": ..}}`).
pub(crate) fn counter_totals(reply: &Counters, counters: &mut VmCounters) {
    for dev in reply.values() {
        let get = |k: &str| dev.get(k).copied().unwrap_or(0);
        counters.disk_read_bytes += get("read_bytes");
        counters.disk_write_bytes += get("write_bytes");
        counters.network_rx_bytes += get("rx_bytes");
        counters.network_tx_bytes += get("tx_bytes");
    }
}

impl VirtualMachine for ChVm {
    delegate_to_instance!();
    fn counters(&self) -> BoxFuture<'_, Result<VmCounters, VmmError>> {
        async move {
            let mut counters = self.instance.process_counters()?;
            let reply: Counters = self.api.get("vm.counters").await?;
            counter_totals(&reply, &mut counters);
            Ok(counters)
        }
        .boxed()
    }
    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        async move {
            self.alive()?;
            self.api.put("vm.pause").await
        }
        .boxed()
    }
    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        async move {
            self.alive()?;
            self.api.put("vm.resume").await
        }
        .boxed()
    }
    fn snapshot<'a>(&'a self, dest: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        async move {
            self.alive()?;
            tokio::fs::create_dir_all(dest)
                .await
                .map_err(|e| VmmError::io("create snapshot dir", dest, e))?;
            let staging = self.instance.dir.join(SNAPSHOT_STAGING);
            instance::remove_dir(&staging).await?;
            tokio::fs::create_dir(&staging)
                .await
                .map_err(|e| VmmError::io("create snapshot staging dir", &staging, e))?;
            if let Some(sb) = &self.sandbox {
                sb.give(&staging)?;
            }
            self.api
                .put_json("vm.snapshot", &ch_model::snapshot_config(&staging)?)
                .await?;
            move_dir_contents(&staging, dest).await?;
            let overlay = self.instance.dir.join(layout::OVERLAY);
            if tokio::fs::try_exists(&overlay).await.unwrap_or(false) {
                tokio::fs::copy(&overlay, dest.join(layout::OVERLAY))
                    .await
                    .map_err(|e| VmmError::io("copy overlay into snapshot", &overlay, e))?;
            }
            Ok(())
        }
        .boxed()
    }
    fn destroy(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        async move {
            if self.instance.vmm.exit().is_none() {
                // Polite first, briefly: the VM is thrown away, so a kill is just as correct.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.api.put("vmm.shutdown"))
                    .await;
            }
            self.instance.destroy().await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use cloud_hypervisor_client::models::{RestoreConfig, VmSnapshotConfig};
    use serde_json::{Value, json};

    use super::*;
    use crate::ch_api::fake::{self, Recorded, Reply};
    use crate::ch_model::tests::assert_is_model;

    /// [`spec`] with its kernel and a 1 MiB base image on disk, and the VMs' dir made.
    fn bootable_spec(dir: &Path) -> VmSpec {
        let mut s = spec(dir);
        std::fs::write(&s.kernel, b"elf").unwrap();
        let base = dir.join("rootfs.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        s.rootfs_base = Some(base);
        std::fs::create_dir_all(dir.join("vms")).unwrap();
        s
    }

    fn spec(dir: &Path) -> VmSpec {
        VmSpec {
            id: "vm-c1".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: dir.join("vmlinux"),
            cmdline: "console=ttyS0 root=/dev/vda".into(),
            rootfs_base: None,
            initrd: None,
            dir: dir.join("vms/vm-c1"),
            net: None,
        }
    }

    #[test]
    fn counters_sum_every_device() {
        let reply: Counters = serde_json::from_value(json!({
            "_disk0": {"read_bytes": 10, "write_bytes": 20, "read_ops": 1},
            "_disk1": {"read_bytes": 1, "write_bytes": 2},
            "_net0": {"rx_bytes": 7, "tx_bytes": 9},
        }))
        .unwrap();
        let mut c = VmCounters::default();
        counter_totals(&reply, &mut c);
        assert_eq!(
            (
                c.disk_read_bytes,
                c.disk_write_bytes,
                c.network_rx_bytes,
                c.network_tx_bytes
            ),
            (11, 22, 7, 9)
        );
    }

    /// A stand-in "cloud-hypervisor" that binds nothing (the test's fake server owns the
    /// API socket at the path it is given), prints a serial line and waits to be killed.
    fn fake_binary(root: &Path) -> CloudHypervisor {
        let bin = root.join("fake-ch");
        std::fs::write(
            &bin,
            "#!/bin/sh\necho 'fake serial line'\nexec sleep 1000\n",
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        CloudHypervisor::new(CloudHypervisorConfig {
            binary: bin,
            qemu_img: "qemu-img".into(),
            kernel_override: None,
            die_with_parent: true,
            sandbox: None,
            merge_pages: false,
        })
    }

    /// Serves the fake API inside `vm_dir` once the driver has created that dir.
    fn serve_when_created(
        vm_dir: &Path,
        answer: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> tokio::sync::oneshot::Receiver<Arc<Mutex<Vec<Recorded>>>> {
        let dir = vm_dir.to_owned();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            while !dir.exists() {
                tokio::task::yield_now().await;
            }
            let _ = tx.send(fake::serve(&dir.join(layout::API_SOCKET), answer));
        });
        rx
    }

    /// A VMM of `version` that keeps the vm.create config, minus `drop_disk_field`.
    fn vmm(
        version: &'static str,
        drop_disk_field: Option<&'static str>,
    ) -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
        let created = Mutex::new(Value::Null);
        move |r| match r.path.as_str() {
            "/api/v1/vmm.ping" => (
                200,
                json!({"build_version": format!("v{version}"), "version": version, "pid": 1,
                       "features": ["kvm"]})
                .to_string(),
            ),
            "/api/v1/vm.create" => {
                let mut config: Value = serde_json::from_str(&r.body).unwrap();
                // What a real VMM adds: ids and defaults.
                config["disks"][0]["id"] = json!("_disk0");
                config["disks"][0]["readonly"] = json!(false);
                config["rng"] = json!({"src": "/dev/urandom", "iommu": false});
                if let Some(field) = drop_disk_field {
                    config["disks"][0].as_object_mut().unwrap().remove(field);
                }
                *created.lock().unwrap() = config;
                (204, String::new())
            }
            "/api/v1/vm.info" => {
                let config = created.lock().unwrap().clone();
                (
                    200,
                    json!({"config": config, "state": "Created"}).to_string(),
                )
            }
            _ => (204, String::new()),
        }
    }

    fn paths(log: &Mutex<Vec<Recorded>>) -> Vec<String> {
        log.lock().unwrap().iter().map(|r| r.path.clone()).collect()
    }

    /// The whole start-up conversation against a fake API, every body checked against the
    /// API models.
    #[tokio::test]
    async fn boot_checks_the_vmm_then_creates_and_boots_and_destroy_shuts_down() {
        let root = tempfile::tempdir().unwrap();
        let mut s = bootable_spec(root.path());
        s.net = Some(crate::NetSpec {
            tap: "vmtap0".into(),
            mac: "52:54:00:ca:00:00".into(),
            guest_ip: "100.80.0.2".parse().unwrap(),
            prefix: 30,
            gateway: "100.80.0.1".parse().unwrap(),
            netns: None,
        });
        let log = serve_when_created(&s.dir, vmm("53.0.0", None));
        let ch = fake_binary(root.path());
        let vm = ch.boot(&s).await.unwrap();
        let log = log.await.unwrap();
        vm.wait_for_console("fake serial line").await.unwrap();
        vm.pause().await.unwrap();
        vm.resume().await.unwrap();
        let snap = root.path().join("snap");
        vm.snapshot(&snap).await.unwrap();
        assert!(snap.join(layout::OVERLAY).is_file());
        vm.destroy().await.unwrap();
        assert!(!s.dir.exists());
        assert_eq!(
            paths(&log),
            [
                "/api/v1/vmm.ping",
                "/api/v1/vm.create",
                "/api/v1/vm.info",
                "/api/v1/vm.boot",
                "/api/v1/vm.pause",
                "/api/v1/vm.resume",
                "/api/v1/vm.snapshot",
                "/api/v1/vmm.shutdown"
            ]
        );
        let log = log.lock().unwrap();
        let methods: Vec<&str> = log.iter().map(|r| r.method.as_str()).collect();
        assert_eq!(
            methods,
            ["GET", "PUT", "GET", "PUT", "PUT", "PUT", "PUT", "PUT"]
        );
        let body = |i: usize| serde_json::from_str::<Value>(&log[i].body).unwrap();
        let create = body(1);
        assert_is_model::<VmConfig>(&create);
        assert_eq!(create["disks"][0]["image_type"], "Qcow2");
        // Free page reporting on, the balloon itself empty.
        assert_eq!(
            create["balloon"],
            json!({"size": 0, "free_page_reporting": true})
        );
        // The tap and MAC alone: no ip/mask, which would need CAP_NET_ADMIN.
        assert_eq!(
            create["net"],
            json!([{"tap": "vmtap0", "mac": "52:54:00:ca:00:00"}])
        );
        assert_eq!(
            create["disks"][0]["path"],
            s.dir.join(layout::OVERLAY).to_str().unwrap()
        );
        let snapshot = body(6);
        assert_is_model::<VmSnapshotConfig>(&snapshot);
        // Written inside the VM dir (the VMM can write nowhere else), then moved.
        assert_eq!(
            snapshot["destination_url"],
            format!("file://{}", s.dir.join(SNAPSHOT_STAGING).display())
        );
        for bodiless in [0, 2, 3, 4, 5, 7] {
            assert_eq!(log[bodiless].body, "", "{}", log[bodiless].path);
        }
    }

    /// Confined like QEMU: the VMM user, our seccomp filter (its own comes on top in a real
    /// binary, which is never told `--seccomp false`), the VM's cgroup, removed on destroy.
    #[tokio::test]
    async fn the_vmm_runs_confined_and_its_cgroup_goes_with_it() {
        let root = tempfile::tempdir().unwrap();
        let s = bootable_spec(root.path());
        let _log = serve_when_created(&s.dir, vmm("53.0.0", None));
        let sandbox = Arc::new(
            Sandbox::new(
                crate::SandboxConfig {
                    user: "capsa-vmm".into(),
                    cgroup_parent: "capsa-vmm-test-ch".into(),
                    memory_overhead_mib: 64,
                    pids_max: 64,
                },
                false,
            )
            .expect("root, cgroups and the capsa-vmm user (install-deps.sh)"),
        );
        let mut ch = fake_binary(root.path());
        ch.config.sandbox = Some(sandbox.clone());
        let vm = ch.boot(&s).await.unwrap();
        vm.wait_for_console("fake serial line").await.unwrap();
        let pid = vm.vmm_pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(field("Uid:"), sandbox.user.uid.to_string());
        assert_eq!(field("Seccomp:"), "2");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(!String::from_utf8_lossy(&cmdline).contains("seccomp"));
        let dirs: Vec<PathBuf> = sandbox
            .cgroups
            .dirs()
            .iter()
            .map(|d| d.join("vm-c1"))
            .collect();
        for d in &dirs {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
        }
        vm.destroy().await.unwrap();
        assert!(dirs.iter().all(|d| !d.exists()), "cgroup removed");
    }

    #[tokio::test]
    async fn a_vmm_too_old_for_our_fields_is_refused_before_vm_create() {
        let root = tempfile::tempdir().unwrap();
        let s = spec(root.path());
        std::fs::write(&s.kernel, b"elf").unwrap();
        std::fs::create_dir_all(root.path().join("vms")).unwrap();
        let log = serve_when_created(&s.dir, vmm("50.0.0", None));
        let err = fake_binary(root.path())
            .boot(&s)
            .await
            .err()
            .expect("an old vmm is refused");
        assert!(matches!(err, VmmError::UnsupportedVmm { .. }), "{err}");
        let err = err.to_string();
        assert!(err.contains("50.0.0") && err.contains("v51.0"), "{err}");
        assert_eq!(paths(&log.await.unwrap()), ["/api/v1/vmm.ping"]);
        assert!(!s.dir.exists(), "the failed boot cleans up its dir");
    }

    #[tokio::test]
    async fn a_vmm_that_drops_a_field_we_sent_is_refused_before_vm_boot() {
        let root = tempfile::tempdir().unwrap();
        let s = bootable_spec(root.path());
        let log = serve_when_created(&s.dir, vmm("53.0.0", Some("backing_files")));
        let err = fake_binary(root.path()).boot(&s).await.err().unwrap();
        let err = err.to_string();
        assert!(
            err.contains("vm.info") && err.contains("disks[0].backing_files"),
            "{err}"
        );
        assert!(!paths(&log.await.unwrap()).contains(&"/api/v1/vm.boot".to_owned()));
    }

    /// Restore rewrites only the disk and vsock paths of the snapshot's config.json; every
    /// other field, including those the API model does not know, reaches the VMM as written.
    #[tokio::test]
    async fn restore_keeps_every_field_of_the_snapshot_config() {
        let root = tempfile::tempdir().unwrap();
        let snap = root.path().join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        let written = json!({
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "future_cpu_knob": 3},
            "memory": {"size": 536870912, "hotplug_method": "Acpi"},
            "payload": {"kernel": "/img/vmlinux", "cmdline": "console=ttyS0"},
            "disks": [{"path": "/old/vms/vm-a/overlay.qcow2", "backing_files": true,
                       "image_type": "Qcow2", "future_disk_knob": "x"}],
            "vsock": {"cid": 3, "socket": "/old/vms/vm-a/vsock.sock", "iommu": false},
            "serial": {"mode": "Tty"},
            "future_section": {"enabled": true},
        });
        std::fs::write(snap.join(SNAPSHOT_CONFIG), written.to_string()).unwrap();
        std::fs::write(snap.join("state.json"), b"{}").unwrap();
        std::fs::write(snap.join("memory-ranges"), b"mem").unwrap();
        std::fs::write(snap.join(layout::OVERLAY), b"qcow").unwrap();
        let s = spec(root.path());
        std::fs::create_dir_all(root.path().join("vms")).unwrap();
        let log = serve_when_created(&s.dir, vmm("53.0.0", None));
        let vm = fake_binary(root.path()).restore(&s, &snap).await.unwrap();
        let log = log.await.unwrap();
        assert_eq!(paths(&log), ["/api/v1/vmm.ping", "/api/v1/vm.restore"]);
        let restore: Value = serde_json::from_str(&log.lock().unwrap()[1].body).unwrap();
        assert_is_model::<RestoreConfig>(&restore);
        let local = s.dir.join("snapshot");
        assert_eq!(
            restore,
            json!({"source_url": format!("file://{}", local.display()), "resume": true})
        );
        let rewritten: Value =
            serde_json::from_slice(&std::fs::read(local.join(SNAPSHOT_CONFIG)).unwrap()).unwrap();
        let mut expected = written;
        expected["disks"][0]["path"] = json!(s.dir.join(layout::OVERLAY));
        expected["vsock"]["socket"] = json!(s.vsock_path());
        assert_eq!(rewritten, expected);
        assert_eq!(std::fs::read(s.dir.join(layout::OVERLAY)).unwrap(), b"qcow");
        assert_eq!(std::fs::read(local.join("memory-ranges")).unwrap(), b"mem");
        vm.destroy().await.unwrap();
    }
}
