//! VMM drivers: one [`Hypervisor`] trait over the engines Capsa runs microVMs with.
//!
//! - [`CloudHypervisor`]: the production engine, driven through its REST API on the API
//!   Unix socket; hybrid vsock is native (`vsock.sock` in the VM's dir).
//! - [`Qemu`]: `-machine microvm` with KVM or TCG (software emulation, what a host without
//!   usable KVM can run), driven through QMP; the agent's channel is a virtio-serial port,
//!   served as the same hybrid vsock socket by a bridge in this process
//!   (`capsa_vsock::serial`).
//!
//! [`engine::choose`] picks one from the host's facts and says why. Every VM lives in its
//! own directory ([`VmSpec::dir`]): pid files, sockets, the qcow2 overlay over the shared
//! read-only base image, and the console log. [`VirtualMachine::destroy`] kills the VMM and
//! removes that directory; every child process also runs in its own process
//! group and is killed when its handle is dropped, as a safety net. [`orphans::reap`] finds
//! the VMMs a previous, crashed owner of a state dir left behind. With a [`Sandbox`], every
//! VMM process runs as an unprivileged user, in its VM's cgroup, in a private mount view and
//! under seccomp (see `sandbox`).
//!
//! The trait is object-safe (methods return boxed futures) so a service holds an
//! `Arc<dyn Hypervisor>` chosen at start-up, and tests can put a fake behind it.

pub mod cgroup;
mod ch_api;
mod ch_model;
mod cloud_hypervisor;
mod console;
pub mod cpu_balance;
pub mod engine;
mod error;
pub mod image;
mod instance;
pub mod netns;
pub mod orphans;
mod process;
mod qemu;
mod qmp;
pub mod sandbox;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

pub use ch_model::{API_SPEC_VERSION, MIN_VMM_VERSION, VmmVersion};
pub use cloud_hypervisor::{CloudHypervisor, CloudHypervisorConfig};
pub use engine::{EngineChoice, EngineKind, EnginePreference, HostFacts};
pub use error::VmmError;
pub use image::GuestImage;
/// Readers of `/proc` that vm-pool and the benches share.
pub use process::{cpu_time, host_memory_mib, process_group, proportional_bytes, resident_bytes};
pub use qemu::{DEFAULT_TCG_TB_MIB, Qemu, QemuAccel, QemuConfig};
pub use sandbox::{Sandbox, SandboxConfig, VmmUser};

/// File names inside a VM's directory; [`orphans`] and operators rely on them.
pub mod layout {
    /// Hybrid vsock socket the host connects to (`CONNECT <port>\n`).
    pub const VSOCK_SOCKET: &str = "vsock.sock";
    /// Writable layer over the template's read-only base image.
    pub const OVERLAY: &str = "overlay.qcow2";
    /// The guest's serial console (capped; see `console`).
    pub const CONSOLE_LOG: &str = "console.log";
    /// The VMM's own stderr.
    pub const VMM_LOG: &str = "vmm.log";
    /// Pid of the VMM process.
    pub const VMM_PID: &str = "vmm.pid";
    /// QMP (QEMU) control socket.
    pub const QMP_SOCKET: &str = "qmp.sock";
    /// QEMU's end of the agent's virtio-serial port (QEMU listens, the bridge connects).
    pub const AGENT_PORT_SOCKET: &str = "agent-port.sock";
    /// Where a snapshotting QEMU sends its migration stream (the driver listens).
    pub const MIGRATION_OUT_SOCKET: &str = "migrate-out.sock";
    /// Where a restoring QEMU takes its migration stream (QEMU listens).
    pub const MIGRATION_IN_SOCKET: &str = "incoming.sock";
    /// Cloud Hypervisor's REST API socket.
    pub const API_SOCKET: &str = "api.sock";
    /// The VM's cgroup dirs, one per line (see `cgroup`), for [`crate::orphans::reap`].
    pub const CGROUP: &str = "cgroup";
}

/// What to boot. The driver creates `dir` (it must not exist yet) and owns it until
/// [`VirtualMachine::destroy`].
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// `vm-` and lowercase letters/digits; also the last component of `dir`.
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The kernel image: bzImage for QEMU, ELF vmlinux for Cloud Hypervisor.
    pub kernel: PathBuf,
    pub cmdline: String,
    /// Read-only raw base image; the VM writes to a qcow2 overlay in `dir`. `None` boots
    /// without a disk (an initramfs-only guest such as the benchmark floor).
    pub rootfs_base: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The VM's own directory: `<state_dir>/vms/<id>`.
    pub dir: PathBuf,
    /// A virtio-net device on a tap; `None`: no network device.
    pub net: Option<NetSpec>,
}

/// The VM's network device: a tap the caller created (owned by the VMM user, so the
/// unprivileged VMM may open it), in the network namespace `netns` when set (the VMM
/// process joins it before dropping privileges; that needs a [`Sandbox`]). The guest's own
/// address is for its kernel command line ([`NetSpec::kernel_arg`]); the VMM never
/// configures IP itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    /// `52:54:00:..`, lowercase hex.
    pub mac: String,
    pub guest_ip: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
    /// `/run/netns/<name>`.
    pub netns: Option<PathBuf>,
}

impl NetSpec {
    /// `capsa.net=<guest ip>/<prefix>,<gateway>`, which the guest's init reads (the
    /// kernel has no IP autoconfiguration).
    pub fn kernel_arg(&self) -> String {
        format!(
            "capsa.net={}/{},{}",
            self.guest_ip, self.prefix, self.gateway
        )
    }

    fn validate(&self) -> Result<(), VmmError> {
        let bad = |m: String| Err(VmmError::InvalidSpec(m));
        let tap_ok = (1..=15).contains(&self.tap.len())
            && self
                .tap
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !tap_ok {
            return bad(format!(
                "net.tap {:?} is not 1 to 15 letters, digits, '-' or '_'",
                self.tap
            ));
        }
        let parts: Vec<&str> = self.mac.split(':').collect();
        let mac_ok = parts.len() == 6
            && parts.iter().all(|p| {
                p.len() == 2
                    && p.bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            });
        if !mac_ok {
            return bad(format!(
                "net.mac {:?} is not six lowercase hex pairs",
                self.mac
            ));
        }
        if !(1..=31).contains(&self.prefix) {
            return bad(format!("net.prefix {} is outside 1..=31", self.prefix));
        }
        Ok(())
    }
}

impl VmSpec {
    /// Checks the fields a driver relies on; the message names the field.
    pub fn validate(&self) -> Result<(), VmmError> {
        let bad = |m: String| Err(VmmError::InvalidSpec(m));
        if !is_vm_id(&self.id) {
            return bad(format!(
                "id {:?} is not `vm-` followed by lowercase alphanumerics",
                self.id
            ));
        }
        if self.dir.file_name().and_then(|n| n.to_str()) != Some(self.id.as_str()) {
            return bad(format!(
                "dir {} does not end in the vm id",
                self.dir.display()
            ));
        }
        if !(1..=64).contains(&self.vcpus) {
            return bad(format!("vcpus {} is outside 1..=64", self.vcpus));
        }
        if !(64..=262_144).contains(&self.memory_mib) {
            return bad(format!(
                "memory_mib {} is outside 64..=262144",
                self.memory_mib
            ));
        }
        for (field, path) in [
            ("kernel", Some(&self.kernel)),
            ("rootfs_base", self.rootfs_base.as_ref()),
        ]
        .into_iter()
        .chain([("initrd", self.initrd.as_ref())])
        {
            if let Some(p) = path
                && !p.is_file()
            {
                return bad(format!("{field} {} is not a file", p.display()));
            }
        }
        if let Some(net) = &self.net {
            net.validate()?;
        }
        Ok(())
    }

    pub fn vsock_path(&self) -> PathBuf {
        self.dir.join(layout::VSOCK_SOCKET)
    }
}

/// `vm-` followed by 1 to 61 lowercase ASCII letters or digits: a valid
/// `capsa_vsock::vm_socket_path` id that is also safe as a directory name.
pub fn is_vm_id(id: &str) -> bool {
    id.strip_prefix("vm-").is_some_and(|rest| {
        !rest.is_empty()
            && id.len() <= 64
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

/// How a VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Human-readable: "exited with code 1", "killed by signal 9", plus the VMM's last
    /// stderr line when there is one.
    pub description: String,
}

/// Host-side counters of one VM's VMM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmCounters {
    /// utime + stime of every thread of the VMM process (vCPU threads included).
    pub cpu_time: Duration,
    pub vmm_resident_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    /// Bytes the guest received and sent on its network device (its tap's counters, read
    /// the other way round); 0 where the VM has none.
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub sample_time: Option<SystemTime>,
}

/// An engine that boots VMs.
pub trait Hypervisor: Send + Sync {
    fn engine(&self) -> EngineKind;

    /// Boots `spec`; returns once the VMM runs and its control channel answers (not once
    /// the guest is up: callers wait for the agent on [`VirtualMachine::vsock_path`]).
    fn boot<'a>(
        &'a self,
        spec: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Arc<dyn VirtualMachine>, VmmError>>;

    /// Starts a VM from a snapshot taken by [`VirtualMachine::snapshot`], as the new VM
    /// `spec` (its own id and dir). QEMU refuses a spec of another shape (memory, vCPUs,
    /// disk, network) before starting anything, and runs the restored VM at once.
    fn restore<'a>(
        &'a self,
        spec: &'a VmSpec,
        snapshot: &'a Path,
    ) -> BoxFuture<'a, Result<Arc<dyn VirtualMachine>, VmmError>>;
}

/// A running VM. Cheap to share; [`VirtualMachine::destroy`] is idempotent, and dropping
/// the last handle kills the processes without removing the directory.
pub trait VirtualMachine: Send + Sync {
    fn id(&self) -> &str;
    fn engine(&self) -> EngineKind;
    /// The VMM process.
    fn vmm_pid(&self) -> u32;
    /// Every host process of this VM (each engine runs one: the VMM).
    fn pids(&self) -> Vec<u32>;
    fn dir(&self) -> &Path;
    fn vsock_path(&self) -> PathBuf {
        self.dir().join(layout::VSOCK_SOCKET)
    }
    fn console_log(&self) -> PathBuf {
        self.dir().join(layout::CONSOLE_LOG)
    }
    /// Resolves when the VMM process exits, at once (the exit is awaited, not polled).
    fn wait(&self) -> BoxFuture<'_, VmExit>;
    /// The exit, when it already happened.
    fn exit(&self) -> Option<VmExit>;
    /// Resolves when `marker` has appeared on the guest's serial console (or errors when
    /// the VMM exits first).
    fn wait_for_console<'a>(&'a self, marker: &'a str) -> BoxFuture<'a, Result<(), VmmError>>;
    fn counters(&self) -> BoxFuture<'_, Result<VmCounters, VmmError>>;
    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>>;
    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>>;
    /// Writes a snapshot of the VM into `dest`, a directory. Cloud Hypervisor needs the VM
    /// paused; QEMU stops a running VM for the snapshot and runs it again after.
    fn snapshot<'a>(&'a self, dest: &'a Path) -> BoxFuture<'a, Result<(), VmmError>>;
    /// Kills the VMM, waits for it to exit and removes the VM's dir.
    fn destroy(&self) -> BoxFuture<'_, Result<(), VmmError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_are_checked_and_fit_the_vsock_rule() {
        for good in ["vm-1", "vm-0a1b2c3d4e5f6a7b"] {
            assert!(is_vm_id(good), "{good}");
        }
        for bad in [
            "",
            "vm-",
            "vm-ABC",
            "vm-a/b",
            "x-123",
            "vm-a.b",
            &format!("vm-{}", "a".repeat(62)),
        ] {
            assert!(!is_vm_id(bad), "{bad}");
        }
    }

    #[test]
    fn spec_validation_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, b"k").unwrap();
        let mut spec = VmSpec {
            id: "vm-1".into(),
            vcpus: 1,
            memory_mib: 512,
            kernel,
            cmdline: String::new(),
            rootfs_base: None,
            initrd: None,
            dir: dir.path().join("vms/vm-1"),
            net: None,
        };
        spec.validate().unwrap();
        spec.vcpus = 0;
        assert!(spec.validate().unwrap_err().to_string().contains("vcpus"));
        spec.vcpus = 1;
        spec.rootfs_base = Some(dir.path().join("missing.ext4"));
        assert!(
            spec.validate()
                .unwrap_err()
                .to_string()
                .contains("rootfs_base")
        );
        spec.rootfs_base = None;
        spec.dir = dir.path().join("vms/vm-2");
        assert!(spec.validate().unwrap_err().to_string().contains("dir"));
        spec.dir = dir.path().join("vms/vm-1");
        let net = NetSpec {
            tap: "vmtap3".into(),
            mac: "52:54:00:ca:00:03".into(),
            guest_ip: "100.80.0.14".parse().unwrap(),
            prefix: 30,
            gateway: "100.80.0.13".parse().unwrap(),
            netns: None,
        };
        assert_eq!(net.kernel_arg(), "capsa.net=100.80.0.14/30,100.80.0.13");
        spec.net = Some(net.clone());
        spec.validate().unwrap();
        for (bad, field) in [
            (
                NetSpec {
                    tap: "a-name-longer-than-15".into(),
                    ..net.clone()
                },
                "net.tap",
            ),
            (
                NetSpec {
                    tap: "tap 0".into(),
                    ..net.clone()
                },
                "net.tap",
            ),
            (
                NetSpec {
                    mac: "52:54:00:CA:00:03".into(),
                    ..net.clone()
                },
                "net.mac",
            ),
            (
                NetSpec {
                    mac: "52:54:00:ca:00".into(),
                    ..net.clone()
                },
                "net.mac",
            ),
            (
                NetSpec {
                    prefix: 32,
                    ..net.clone()
                },
                "net.prefix",
            ),
        ] {
            spec.net = Some(bad);
            let err = spec.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
