//! QEMU `-machine microvm` driver (KVM or TCG).
//!
//! Start-up, per VM (everything in the VM's dir):
//! 1. `qemu-img create` the qcow2 overlay over the read-only base;
//! 2. start `vhost-device-vsock --vm guest-cid=3,socket=vhost.sock,uds-path=vsock.sock` and
//!    wait until `vhost.sock` listens (QEMU connects to it at start-up and fails if it can't);
//! 3. bind `qmp.sock`, start QEMU with `-qmp unix:qmp.sock` (QEMU connects to us), and
//!    negotiate QMP. Guest memory is a shared memfd because vhost-user needs to map it.
//!
//! The serial console goes to QEMU's stdout (see `console`). `-no-reboot` turns a guest
//! panic or reboot into a QEMU exit, which is how a dead guest is noticed.
//! Pause, resume, snapshot and restore are not offered for QEMU: QMP `stop`/`cont` stops and
//! restarts the vhost-user vrings, and vhost-device-vsock 0.3.0 then wedges for good (every
//! later host-initiated `CONNECT` hangs; reproduced within 1 to 3 cycles under TCG, with
//! `event_idx` on or off). A paused VM whose agent can never be reached again is worse than
//! a clear `Unsupported`; Cloud Hypervisor, with its native vsock, offers all four.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokio::net::UnixListener;

use crate::console::Console;
use crate::instance::{self, DirGuard, Instance, delegate_to_instance};
use crate::process::{Supervised, find_in_path, wait_listening};
use crate::qmp::{Qmp, blockstats_totals};
use crate::sandbox::{Sandbox, vmm_command};
use crate::{EngineKind, Hypervisor, VirtualMachine, VmCounters, VmExit, VmSpec, VmmError, layout};

/// How long QEMU and its helper get to come up (not the guest: that is the caller's wait).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// TCG's translated-code cache (MiB). QEMU's default (1 GiB) would be charged to the VM's
/// memory limit as it fills; a guest's working set of code fits in far less.
const TCG_TB_SIZE_MIB: u32 = 128;
/// QEMU's own seccomp filter: everything it offers to deny.
const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuAccel {
    Kvm,
    Tcg,
}

#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    pub vhost_device_vsock: PathBuf,
    pub accel: QemuAccel,
    /// Boot this kernel instead of the spec's (a PVM guest kernel on a PVM host).
    pub kernel_override: Option<PathBuf>,
    /// Have the kernel kill the VMM and its helper when this process dies (see
    /// `Supervised::spawn`); off, they outlive a crashed owner until reaped.
    pub die_with_parent: bool,
    /// Confine QEMU and vhost-device-vsock (user, cgroup, mount view, seccomp); QEMU then
    /// also runs with `-sandbox on,...`.
    pub sandbox: Option<Arc<Sandbox>>,
    /// Disk throttling of each VM, in QEMU's block layer (bytes and requests per second,
    /// reads and writes together); `None` is unthrottled.
    pub disk_bytes_per_sec: Option<u64>,
    pub disk_iops: Option<u64>,
}

impl QemuConfig {
    /// Finds the binaries in `PATH` (vhost-device-vsock also in `~/.cargo/bin`, where
    /// `cargo install` puts it).
    pub fn discover(accel: QemuAccel) -> Result<QemuConfig, VmmError> {
        let need = |name: &str| {
            find_in_path(name)
                .ok_or_else(|| VmmError::NoEngine(format!("{name} not found in PATH")))
        };
        let vhost = find_in_path("vhost-device-vsock")
            .or_else(|| {
                let p =
                    PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/vhost-device-vsock");
                crate::process::is_executable(&p).then_some(p)
            })
            .ok_or_else(|| {
                VmmError::NoEngine("vhost-device-vsock not found in PATH or ~/.cargo/bin".into())
            })?;
        Ok(QemuConfig {
            qemu: need("qemu-system-x86_64")?,
            qemu_img: need("qemu-img")?,
            vhost_device_vsock: vhost,
            accel,
            kernel_override: None,
            die_with_parent: true,
            sandbox: None,
            disk_bytes_per_sec: None,
            disk_iops: None,
        })
    }
}

pub struct Qemu {
    config: QemuConfig,
}

impl Qemu {
    pub fn new(config: QemuConfig) -> Qemu {
        Qemu { config }
    }

    fn engine_kind(&self) -> EngineKind {
        match self.config.accel {
            QemuAccel::Kvm => EngineKind::QemuKvm,
            QemuAccel::Tcg => EngineKind::QemuTcg,
        }
    }

    async fn start(&self, spec: &VmSpec) -> Result<QemuVm, VmmError> {
        spec.validate()?;
        let sandbox = self.config.sandbox.as_deref();
        if let Some(sb) = sandbox {
            let kernel = self
                .config
                .kernel_override
                .as_deref()
                .unwrap_or(&spec.kernel);
            sb.check_readable("kernel", kernel)?;
            for (what, file) in [("rootfs_base", &spec.rootfs_base), ("initrd", &spec.initrd)] {
                if let Some(f) = file {
                    sb.check_readable(what, f)?;
                }
            }
        }
        let dir = spec.dir.as_path();
        instance::create_dir(dir)?;
        let mut guard = DirGuard::new(dir);
        let cgroup = match sandbox {
            Some(sb) => {
                let cg = sb.prepare(&spec.id, dir, spec.vcpus, spec.memory_mib)?;
                guard.cgroup(&cg);
                Some(cg)
            }
            None => None,
        };
        let confine = sandbox.zip(cgroup.as_ref());
        let overlay = match &spec.rootfs_base {
            Some(base) => {
                let overlay = instance::create_overlay(&self.config.qemu_img, base, dir).await?;
                if let Some(sb) = sandbox {
                    sb.give(&overlay)?;
                }
                Some(overlay)
            }
            None => None,
        };

        let vhost_log = dir.join("vsock.log");
        // vhost-device-vsock stays in the host's network namespace: it only serves Unix
        // sockets, which are files.
        let (mut cmd, confinement) =
            vmm_command(&self.config.vhost_device_vsock, confine, dir, None)?;
        cmd.arg("--vm").arg(format!(
            "guest-cid=3,socket={},uds-path={}",
            dir.join(layout::VHOST_SOCKET).display(),
            dir.join(layout::VSOCK_SOCKET).display()
        ));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&vhost_log)?);
        let (vhost, _) = Supervised::spawn(
            cmd,
            "vhost-device-vsock",
            Some(&vhost_log),
            self.config.die_with_parent,
            confinement,
        )?;
        instance::write_pid(dir, layout::VSOCK_PID, vhost.pid())?;
        wait_listening(
            &dir.join(layout::VHOST_SOCKET),
            &vhost,
            "vhost-device-vsock",
            STARTUP_TIMEOUT,
        )
        .await?;

        let qmp_path = dir.join(layout::QMP_SOCKET);
        let qmp_listener = UnixListener::bind(&qmp_path)
            .map_err(|e| VmmError::io("bind qmp socket", &qmp_path, e))?;
        if let Some(sb) = sandbox {
            // QEMU connects to it.
            sb.give(&qmp_path)?;
        }
        let vmm_log = dir.join(layout::VMM_LOG);
        let netns = spec.net.as_ref().and_then(|n| n.netns.as_deref());
        let (mut cmd, confinement) = vmm_command(&self.config.qemu, confine, dir, netns)?;
        cmd.args(qemu_args(spec, &self.config, overlay.as_deref()));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(&vmm_log)?);
        let (vmm, stdout) = Supervised::spawn(
            cmd,
            "qemu-system-x86_64",
            Some(&vmm_log),
            self.config.die_with_parent,
            confinement,
        )?;
        instance::write_pid(dir, layout::VMM_PID, vmm.pid())?;
        let console = Console::start(
            stdout.expect("stdout is piped"),
            &dir.join(layout::CONSOLE_LOG),
        )?;

        let stream = tokio::select! {
            accepted = tokio::time::timeout(STARTUP_TIMEOUT, qmp_listener.accept()) => match accepted {
                Ok(Ok((stream, _))) => stream,
                Ok(Err(e)) => return Err(VmmError::io("accept qmp", &qmp_path, e)),
                Err(_) => return Err(VmmError::Timeout("qemu connecting to qmp".into())),
            },
            exit = vmm.wait() => {
                return Err(VmmError::StartupExit { process: "qemu-system-x86_64", detail: exit.description });
            }
        };
        let qmp = Qmp::handshake(stream).await?;
        guard.disarm();
        let instance = Instance::new(
            spec,
            self.engine_kind(),
            vmm,
            vec![("vhost-device-vsock", vhost)],
            console,
            cgroup,
        );
        tracing::debug!(vm = %spec.id, pid = instance.vmm.pid(), "qemu started");
        Ok(QemuVm { instance, qmp })
    }
}

fn log_file(path: &Path) -> Result<std::fs::File, VmmError> {
    std::fs::File::create(path).map_err(|e| VmmError::io("create log", path, e))
}

/// QEMU's command line for `spec`; a pure function so it is tested without QEMU.
pub(crate) fn qemu_args(spec: &VmSpec, config: &QemuConfig, overlay: Option<&Path>) -> Vec<String> {
    let dir = &spec.dir;
    let mem = spec.memory_mib;
    let kernel = config.kernel_override.as_deref().unwrap_or(&spec.kernel);
    let (accel, cpu) = match config.accel {
        QemuAccel::Kvm => ("kvm".to_owned(), "host"),
        QemuAccel::Tcg => (format!("tcg,tb-size={TCG_TB_SIZE_MIB}"), "max"),
    };
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("capsa-{}", spec.id),
        "-machine".into(),
        // rtc=on: the guest's wall clock at boot; options ROMs only slow the start.
        "microvm,memory-backend=mem,x-option-roms=off,rtc=on".into(),
        "-accel".into(),
        accel,
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-m".into(),
        format!("{mem}M"),
        // vhost-user maps guest memory in the backend process: it must be a shared fd.
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-serial".into(),
        "stdio".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-append".into(),
        spec.cmdline.clone(),
    ];
    if config.sandbox.is_some() {
        args.extend(["-sandbox".into(), QEMU_SANDBOX.into()]);
    }
    if let Some(initrd) = &spec.initrd {
        args.extend(["-initrd".into(), initrd.display().to_string()]);
    }
    if let Some(overlay) = overlay {
        let mut throttle = String::new();
        if let Some(bps) = config.disk_bytes_per_sec {
            throttle.push_str(&format!(",throttling.bps-total={bps}"));
        }
        if let Some(iops) = config.disk_iops {
            throttle.push_str(&format!(",throttling.iops-total={iops}"));
        }
        args.extend([
            "-drive".into(),
            // The overlay is thrown away with the VM: no flushes needed.
            format!(
                "id=root,file={},format=qcow2,if=none,cache=unsafe,discard=unmap{throttle}",
                overlay.display()
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
        ]);
    }
    args.extend([
        "-chardev".into(),
        format!(
            "socket,id=vsock,path={}",
            dir.join(layout::VHOST_SOCKET).display()
        ),
        "-device".into(),
        "vhost-user-vsock-device,chardev=vsock".into(),
        // Seeds the guest's CRNG early (about 4 s sooner under TCG).
        "-device".into(),
        "virtio-rng-device".into(),
        // Free page reporting: pages the guest frees go back to the host within seconds
        // (QEMU punches them out of the memfd), so a VM that once filled its memory does not
        // hold it for the rest of its life. The balloon itself is never inflated.
        "-device".into(),
        "virtio-balloon-device,free-page-reporting=on".into(),
        "-qmp".into(),
        format!("unix:{}", dir.join(layout::QMP_SOCKET).display()),
    ]);
    if let Some(net) = &spec.net {
        args.extend([
            "-netdev".into(),
            // The tap exists (made by the caller, owned by the VMM user): QEMU only opens it.
            format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={}", net.mac),
        ]);
    }
    args
}

impl Hypervisor for Qemu {
    fn engine(&self) -> EngineKind {
        self.engine_kind()
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
        _: &'a VmSpec,
        _: &'a Path,
    ) -> BoxFuture<'a, Result<Arc<dyn VirtualMachine>, VmmError>> {
        let engine = self.engine_kind().as_str();
        async move {
            Err(VmmError::Unsupported {
                operation: "restore",
                engine,
            })
        }
        .boxed()
    }
}

/// A running QEMU VM.
pub struct QemuVm {
    instance: Instance,
    qmp: Qmp,
}

impl QemuVm {
    async fn qmp(&self, command: &str) -> Result<serde_json::Value, VmmError> {
        if let Some(exit) = self.instance.vmm.exit() {
            return Err(VmmError::Exited(exit.description));
        }
        self.qmp.execute(command, None).await
    }

    fn unsupported(&self, operation: &'static str) -> BoxFuture<'static, Result<(), VmmError>> {
        let engine = self.instance.engine.as_str();
        async move { Err(VmmError::Unsupported { operation, engine }) }.boxed()
    }
}

impl VirtualMachine for QemuVm {
    delegate_to_instance!();
    fn counters(&self) -> BoxFuture<'_, Result<VmCounters, VmmError>> {
        async move {
            let mut counters = self.instance.process_counters()?;
            let stats = self.qmp("query-blockstats").await?;
            (counters.disk_read_bytes, counters.disk_write_bytes) = blockstats_totals(&stats);
            Ok(counters)
        }
        .boxed()
    }
    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        self.unsupported("pause")
    }
    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        self.unsupported("resume")
    }
    fn snapshot<'a>(&'a self, _: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        self.unsupported("snapshot")
    }
    fn destroy(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        self.instance.destroy().boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_shared_memory_overlay_vsock_and_qmp() {
        let spec = VmSpec {
            id: "vm-abc".into(),
            vcpus: 2,
            memory_mib: 256,
            kernel: "/img/bzImage".into(),
            cmdline: "console=ttyS0 root=/dev/vda".into(),
            rootfs_base: Some("/img/rootfs.ext4".into()),
            initrd: None,
            dir: "/state/vms/vm-abc".into(),
            net: None,
        };
        let config = QemuConfig {
            qemu: "qemu".into(),
            qemu_img: "qemu-img".into(),
            vhost_device_vsock: "vhost-device-vsock".into(),
            accel: QemuAccel::Tcg,
            kernel_override: None,
            die_with_parent: true,
            sandbox: None,
            disk_bytes_per_sec: Some(50 << 20),
            disk_iops: None,
        };
        let args = qemu_args(
            &spec,
            &config,
            Some(Path::new("/state/vms/vm-abc/overlay.qcow2")),
        );
        let line = args.join(" ");
        for want in [
            "-accel tcg,tb-size=128",
            "-smp 2",
            "cache=unsafe,discard=unmap,throttling.bps-total=52428800",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "microvm,memory-backend=mem",
            "-kernel /img/bzImage",
            "file=/state/vms/vm-abc/overlay.qcow2,format=qcow2",
            "socket,id=vsock,path=/state/vms/vm-abc/vhost.sock",
            "-qmp unix:/state/vms/vm-abc/qmp.sock",
            "-no-reboot",
            "-device virtio-balloon-device,free-page-reporting=on",
        ] {
            assert!(line.contains(want), "missing {want:?} in {line}");
        }
        assert!(!line.contains("-initrd"));
        assert!(
            !line.contains("iops") && !line.contains("-sandbox"),
            "{line}"
        );
        let pvm = QemuConfig {
            accel: QemuAccel::Kvm,
            kernel_override: Some("/pvm/bzImage".into()),
            ..config
        };
        let line = qemu_args(&spec, &pvm, None).join(" ");
        assert!(
            line.contains("-accel kvm") && line.contains("-kernel /pvm/bzImage"),
            "{line}"
        );
        assert!(!line.contains("-drive"), "{line}");
        assert!(!line.contains("-netdev"), "{line}");
        let spec = VmSpec {
            net: Some(crate::NetSpec {
                tap: "vmtap7".into(),
                mac: "52:54:00:ca:00:07".into(),
                guest_ip: "100.80.0.30".parse().unwrap(),
                prefix: 30,
                gateway: "100.80.0.29".parse().unwrap(),
                netns: Some("/run/netns/capsa-x".into()),
            }),
            ..spec
        };
        let line = qemu_args(&spec, &pvm, None).join(" ");
        for want in [
            "-netdev tap,id=net0,ifname=vmtap7,script=no,downscript=no",
            "-device virtio-net-device,netdev=net0,mac=52:54:00:ca:00:07",
        ] {
            assert!(line.contains(want), "missing {want:?} in {line}");
        }
    }
}
