//! Cloud Hypervisor driver (KVM only).
//!
//! Start-up: the VMM starts with only `--api-socket path=<dir>/api.sock`; once the socket
//! listens, `PUT vm.create` sends the whole [`vm_config`] and `PUT vm.boot` starts it.
//! Hybrid vsock is native (`vsock.sock`), the disk is the qcow2 overlay with its backing
//! file, the serial console is Cloud Hypervisor's stdout (mode `Tty`).
//!
//! Snapshots: `vm.snapshot` (VM paused) writes `config.json`, `state.json` and memory files
//! into the destination; we add a copy of the overlay (the VM's disk state at that instant).
//! Restore builds a new VM dir: copies the overlay, links the memory files, rewrites
//! `config.json` so the disk and vsock point into the new dir, and `PUT vm.restore`s it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::ch_api::ChApi;
use crate::console::Console;
use crate::instance::{self, DirGuard, Instance, delegate_to_instance};
use crate::process::{Supervised, wait_listening};
use crate::{EngineKind, Hypervisor, VirtualMachine, VmCounters, VmExit, VmSpec, VmmError, layout};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Files of a snapshot dir, besides the memory ranges.
const SNAPSHOT_CONFIG: &str = "config.json";

#[derive(Debug, Clone)]
pub struct CloudHypervisorConfig {
    pub binary: PathBuf,
    /// Creates the per-VM overlay.
    pub qemu_img: PathBuf,
    /// Boot this kernel instead of the spec's (a PVM guest kernel on a PVM host).
    pub kernel_override: Option<PathBuf>,
    /// Have the kernel kill the VMM when this process dies (see `Supervised::spawn`).
    pub die_with_parent: bool,
}

pub struct CloudHypervisor {
    config: CloudHypervisorConfig,
}

impl CloudHypervisor {
    pub fn new(config: CloudHypervisorConfig) -> CloudHypervisor {
        CloudHypervisor { config }
    }

    /// Starts the VMM process with its API socket; the VM is not created yet.
    async fn start_vmm(&self, spec: &VmSpec) -> Result<(Supervised, Console, ChApi), VmmError> {
        let dir = &spec.dir;
        let api_path = dir.join(layout::API_SOCKET);
        let vmm_log = dir.join(layout::VMM_LOG);
        let mut cmd = Command::new(&self.config.binary);
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
        )?;
        instance::write_pid(dir, layout::VMM_PID, vmm.pid())?;
        let console = Console::start(
            stdout.expect("stdout is piped"),
            &dir.join(layout::CONSOLE_LOG),
        )?;
        wait_listening(&api_path, &vmm, "cloud-hypervisor", STARTUP_TIMEOUT).await?;
        Ok((vmm, console, ChApi::new(&api_path)))
    }

    async fn start(&self, spec: &VmSpec) -> Result<ChVm, VmmError> {
        spec.validate()?;
        instance::create_dir(&spec.dir)?;
        let guard = DirGuard::new(&spec.dir);
        let overlay = match &spec.rootfs_base {
            Some(base) => {
                Some(instance::create_overlay(&self.config.qemu_img, base, &spec.dir).await?)
            }
            None => None,
        };
        let (vmm, console, api) = self.start_vmm(spec).await?;
        let kernel = self
            .config
            .kernel_override
            .as_deref()
            .unwrap_or(&spec.kernel);
        api.put(
            "vm.create",
            Some(&vm_config(spec, kernel, overlay.as_deref())),
        )
        .await?;
        api.put("vm.boot", None).await?;
        guard.disarm();
        Ok(ChVm {
            instance: Instance::new(spec, EngineKind::CloudHypervisor, vmm, vec![], console),
            api,
        })
    }

    async fn start_restored(&self, spec: &VmSpec, snapshot: &Path) -> Result<ChVm, VmmError> {
        instance::create_dir(&spec.dir)?;
        let guard = DirGuard::new(&spec.dir);
        let local = spec.dir.join("snapshot");
        prepare_restore(snapshot, &local, &spec.dir).await?;
        let (vmm, console, api) = self.start_vmm(spec).await?;
        let source_url = format!("file://{}", local.display());
        api.put(
            "vm.restore",
            Some(&json!({ "source_url": source_url, "resume": true })),
        )
        .await?;
        guard.disarm();
        Ok(ChVm {
            instance: Instance::new(spec, EngineKind::CloudHypervisor, vmm, vec![], console),
            api,
        })
    }
}

/// The `VmConfig` body of `vm.create`.
pub(crate) fn vm_config(spec: &VmSpec, kernel: &Path, overlay: Option<&Path>) -> Value {
    let mut payload = json!({ "kernel": kernel, "cmdline": spec.cmdline });
    if let Some(initrd) = &spec.initrd {
        payload["initramfs"] = json!(initrd);
    }
    let disks: Vec<Value> = overlay
        .into_iter()
        // image_type explicitly: Cloud Hypervisor (v53) that has to detect a qcow2 itself turns
        // backing_files off in the config it keeps, so a restore of that config would open
        // the overlay without its base (found by running the driver against a real binary).
        .map(|p| json!({ "path": p, "image_type": "Qcow2", "backing_files": true }))
        .collect();
    json!({
        "cpus": { "boot_vcpus": spec.vcpus, "max_vcpus": spec.vcpus },
        "memory": { "size": u64::from(spec.memory_mib) << 20 },
        "payload": payload,
        "disks": disks,
        "vsock": { "cid": 3, "socket": spec.vsock_path() },
        "serial": { "mode": "Tty" },
        "console": { "mode": "Off" },
    })
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
    let mut config: Value = serde_json::from_slice(&text)
        .map_err(|e| VmmError::InvalidSpec(format!("snapshot config.json: {e}")))?;
    retarget_config(&mut config, vm_dir);
    let out = local.join(SNAPSHOT_CONFIG);
    tokio::fs::write(&out, serde_json::to_vec(&config).expect("json serialises"))
        .await
        .map_err(|e| VmmError::io("write snapshot config", &out, e))
}

/// Points a snapshot's disk and vsock socket into `vm_dir`.
fn retarget_config(config: &mut Value, vm_dir: &Path) {
    if let Some(disks) = config.get_mut("disks").and_then(Value::as_array_mut) {
        for disk in disks {
            disk["path"] = json!(vm_dir.join(layout::OVERLAY));
        }
    }
    if let Some(vsock) = config.get_mut("vsock").filter(|v| v.is_object()) {
        vsock["socket"] = json!(vm_dir.join(layout::VSOCK_SOCKET));
    }
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
pub(crate) fn counter_totals(reply: &Value, counters: &mut VmCounters) {
    for dev in reply.as_object().into_iter().flat_map(|m| m.values()) {
        let get = |k: &str| dev.get(k).and_then(Value::as_u64).unwrap_or(0);
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
            counter_totals(&self.api.get("vm.counters").await?, &mut counters);
            Ok(counters)
        }
        .boxed()
    }
    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        async move {
            self.alive()?;
            self.api.put("vm.pause", None).await.map(drop)
        }
        .boxed()
    }
    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        async move {
            self.alive()?;
            self.api.put("vm.resume", None).await.map(drop)
        }
        .boxed()
    }
    fn snapshot<'a>(&'a self, dest: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        async move {
            self.alive()?;
            tokio::fs::create_dir_all(dest)
                .await
                .map_err(|e| VmmError::io("create snapshot dir", dest, e))?;
            let url = format!("file://{}", dest.display());
            self.api
                .put("vm.snapshot", Some(&json!({ "destination_url": url })))
                .await?;
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
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    self.api.put("vmm.shutdown", None),
                )
                .await;
            }
            self.instance.destroy().await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    #[test]
    fn vm_config_matches_the_openapi_shapes() {
        let s = spec(Path::new("/state"));
        let c = vm_config(
            &s,
            Path::new("/img/vmlinux"),
            Some(Path::new("/state/vms/vm-c1/overlay.qcow2")),
        );
        assert_eq!(c["cpus"], json!({"boot_vcpus": 2, "max_vcpus": 2}));
        assert_eq!(c["memory"]["size"], 512u64 << 20);
        assert_eq!(c["payload"]["kernel"], "/img/vmlinux");
        assert_eq!(c["payload"]["cmdline"], "console=ttyS0 root=/dev/vda");
        assert!(c["payload"].get("initramfs").is_none());
        assert_eq!(
            c["disks"][0],
            json!({"path": "/state/vms/vm-c1/overlay.qcow2", "image_type": "Qcow2", "backing_files": true})
        );
        assert_eq!(
            c["vsock"],
            json!({"cid": 3, "socket": "/state/vms/vm-c1/vsock.sock"})
        );
        assert_eq!(c["serial"]["mode"], "Tty");
    }

    #[test]
    fn counters_sum_every_device() {
        let reply = json!({
            "_disk0": {"read_bytes": 10, "write_bytes": 20, "read_ops": 1},
            "_disk1": {"read_bytes": 1, "write_bytes": 2},
            "_net0": {"rx_bytes": 7, "tx_bytes": 9},
        });
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

    /// The whole start-up conversation against a fake API: a shell script stands in for the
    /// VMM binary and serves nothing itself; the test's fake server owns the API socket.
    #[tokio::test]
    async fn boot_creates_then_boots_and_destroy_shuts_down() {
        let root = tempfile::tempdir().unwrap();
        let s = spec(root.path());
        std::fs::write(&s.kernel, b"elf").unwrap();
        // The stand-in "cloud-hypervisor": binds nothing (the fake server below does, at the
        // path it is given) and waits to be killed.
        let bin = root.path().join("fake-ch");
        std::fs::write(
            &bin,
            "#!/bin/sh\necho 'fake serial line'\nexec sleep 1000\n",
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::create_dir_all(root.path().join("vms")).unwrap();
        // The fake API must exist inside the VM dir, which boot() creates: serve it from a
        // task that waits for the dir.
        let api_path = s.dir.join(layout::API_SOCKET);
        let log = {
            let dir = s.dir.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                while !dir.exists() {
                    tokio::task::yield_now().await;
                }
                let _ = tx.send(crate::ch_api::fake::serve(&api_path, |_| {
                    (204, String::new())
                }));
            });
            rx
        };
        let ch = CloudHypervisor::new(CloudHypervisorConfig {
            binary: bin,
            qemu_img: "qemu-img".into(),
            kernel_override: None,
            die_with_parent: true,
        });
        let vm = ch.boot(&s).await.unwrap();
        let log = log.await.unwrap();
        vm.wait_for_console("fake serial line").await.unwrap();
        vm.pause().await.unwrap();
        vm.resume().await.unwrap();
        vm.destroy().await.unwrap();
        assert!(!s.dir.exists());
        let paths: Vec<String> = log.lock().unwrap().iter().map(|r| r.path.clone()).collect();
        assert_eq!(
            paths,
            [
                "/api/v1/vm.create",
                "/api/v1/vm.boot",
                "/api/v1/vm.pause",
                "/api/v1/vm.resume",
                "/api/v1/vmm.shutdown"
            ]
        );
        assert_eq!(log.lock().unwrap()[0].method, "PUT");
    }

    #[test]
    fn restore_config_points_into_the_new_vm_dir() {
        let mut config = json!({
            "disks": [{"path": "/old/vms/vm-a/overlay.qcow2", "backing_files": true}],
            "vsock": {"cid": 3, "socket": "/old/vms/vm-a/vsock.sock"},
        });
        retarget_config(&mut config, Path::new("/new/vms/vm-b"));
        assert_eq!(config["disks"][0]["path"], "/new/vms/vm-b/overlay.qcow2");
        assert_eq!(config["vsock"]["socket"], "/new/vms/vm-b/vsock.sock");
        assert_eq!(config["disks"][0]["backing_files"], true);
    }
}
