//! QEMU `-machine microvm` driver (KVM or TCG).
//!
//! Start-up, per VM (everything in the VM's dir):
//! 1. the qcow2 overlay: `qemu-img create` over the read-only base, or a snapshot's copy;
//! 2. bind `qmp.sock`, start QEMU with `-qmp unix:qmp.sock` (QEMU connects to us), and
//!    negotiate QMP;
//! 3. start the agent channel's [`SerialBridge`], in this process: the guest agent serves on
//!    the virtio-serial port `org.capsa.agent`, whose host end QEMU listens on as
//!    `agent-port.sock`; the bridge connects there (again whenever the link ends) and
//!    serves the VM's hybrid vsock socket `vsock.sock`, which is what the rest of the host
//!    speaks. A virtio-serial port migrates with the machine; QEMU's vhost-user vsock device
//!    does not (QEMU refuses to migrate it), hence no vsock device at all.
//!
//! The serial console goes to QEMU's stdout (see `console`). `-no-reboot` turns a guest
//! panic or reboot into a QEMU exit, which is how a dead guest is noticed.
//!
//! Pause and resume are QMP `stop` and `cont`. A snapshot is a migration of the stopped VM
//! into a file. QEMU's own seccomp filter denies it `exec:` migration, so QEMU connects to a
//! Unix socket we listen on in its VM dir (`migrate-out.sock`) and we write the stream to
//! `<dest>/vmstate`; then the overlay is copied (the migration's end flushed the block layer
//! and handed the disk over), and `manifest.json` goes last: a dir without it is no
//! snapshot. Each file is written under a temporary name, synced and renamed. A VM that ran
//! before the snapshot runs again after it (`cont` also takes the disk back); a paused one
//! stays paused (QEMU's `postmigrate`).
//!
//! A restore is a new VM (its own id, dir and sockets): the snapshot's overlay is copied
//! into the new dir (its backing file, an absolute path, must still be there), QEMU starts
//! with `-incoming defer`, `migrate-incoming` makes it listen on `incoming.sock`, we stream
//! `vmstate` in, wait for the migration to complete, and `cont`. The guest agent sees its
//! port's host end go away and come back (the new bridge). The manifest makes a restore
//! into another shape (memory, vCPUs, disk, network, engine) a clear error before anything
//! starts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsa_vsock::serial::SerialBridge;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::console::Console;
use crate::instance::{self, DirGuard, Instance, delegate_to_instance};
use crate::process::{Supervised, find_in_path};
use crate::qmp::{Qmp, blockstats_totals};
use crate::sandbox::{Sandbox, vmm_command};
use crate::{EngineKind, Hypervisor, VirtualMachine, VmCounters, VmExit, VmSpec, VmmError, layout};

/// How long QEMU gets to come up (not the guest: that is the caller's wait).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// TCG's translated-code cache (MiB) unless configured. QEMU's default (1 GiB) would be
/// charged to the VM's memory limit as it fills. A cache, once filled, stays resident: a
/// booted, idle agent VM holds about 100 MiB of it. A smaller one holds less (32 MiB: 153
/// instead of 236 MiB per idle VM) but has dropped the kernel's and the agent's translated
/// code by the time a session's first Execute runs, which then pays to translate it again
/// (create + `print(1)` p50 136 -> 428 ms under TCG; see BENCHMARKS.md).
pub const DEFAULT_TCG_TB_MIB: u32 = 128;
/// QEMU's own seccomp filter: everything it offers to deny.
const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The virtio-serial port the guest agent looks for by name.
const AGENT_PORT_NAME: &str = "org.capsa.agent";
/// Longest a migration may take, the snapshot's stream out or the restore's stream in (a
/// 1 GiB guest takes about 10 s under TCG; a loaded host, far longer). A hung QEMU fails
/// the call after this.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// Between two looks at a migration's progress.
const MIGRATION_POLL: Duration = Duration::from_millis(20);
/// The guest is stopped while it migrates, so QEMU's default cap (128 MiB/s) only slows the
/// snapshot down (measured: 0.21 s down to 0.07 s for a 28 MB state).
const MIGRATION_MAX_BANDWIDTH: u64 = 1 << 40;
/// How long a QEMU that failed a restore gets to exit with its reason.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Reads and writes of the migration stream.
const STREAM_BUFFER: usize = 1 << 20;

/// Files of a snapshot dir, besides the overlay (`layout::OVERLAY`).
const SNAPSHOT_STATE: &str = "vmstate";
const SNAPSHOT_MANIFEST: &str = "manifest.json";
/// The layout of a snapshot dir; a restore refuses any other.
const SNAPSHOT_FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuAccel {
    Kvm,
    Tcg,
}

#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    pub accel: QemuAccel,
    /// Boot this kernel instead of the spec's (a PVM guest kernel on a PVM host).
    pub kernel_override: Option<PathBuf>,
    /// Have the kernel kill QEMU when this process dies (see `Supervised::spawn`); off, it
    /// outlives a crashed owner until reaped.
    pub die_with_parent: bool,
    /// Confine QEMU (user, cgroup, mount view, seccomp); it then also runs with
    /// `-sandbox on,...`.
    pub sandbox: Option<Arc<Sandbox>>,
    /// Disk throttling of each VM, in QEMU's block layer (bytes and requests per second,
    /// reads and writes together); `None` is unthrottled.
    pub disk_bytes_per_sec: Option<u64>,
    pub disk_iops: Option<u64>,
    /// Offer guest RAM to the kernel's KSM (`merge=on`), which then shares identical pages
    /// between VMs; off, QEMU's default of offering it is turned off.
    pub merge_pages: bool,
    /// TCG's translated-code cache (MiB); unused under KVM.
    pub tcg_tb_mib: u32,
}

impl QemuConfig {
    /// Finds the binaries in `PATH`.
    pub fn discover(accel: QemuAccel) -> Result<QemuConfig, VmmError> {
        let need = |name: &str| {
            find_in_path(name)
                .ok_or_else(|| VmmError::NoEngine(format!("{name} not found in PATH")))
        };
        Ok(QemuConfig {
            qemu: need("qemu-system-x86_64")?,
            qemu_img: need("qemu-img")?,
            accel,
            kernel_override: None,
            die_with_parent: true,
            sandbox: None,
            disk_bytes_per_sec: None,
            disk_iops: None,
            merge_pages: false,
            tcg_tb_mib: DEFAULT_TCG_TB_MIB,
        })
    }
}

/// What a snapshot was taken of: a restore must ask for the same, or QEMU would load the
/// state into a machine of another shape (and fail, or worse, not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    /// [`SNAPSHOT_FORMAT`] of the writer.
    format: u32,
    engine: String,
    vcpus: u32,
    memory_mib: u32,
    /// The base image under the overlay (canonical path), when the VM has a disk.
    rootfs_base: Option<PathBuf>,
    /// Whether the VM has a network device.
    net: bool,
}

impl Manifest {
    fn of(spec: &VmSpec, engine: EngineKind) -> Result<Manifest, VmmError> {
        let rootfs_base = spec
            .rootfs_base
            .as_deref()
            .map(|b| {
                std::fs::canonicalize(b).map_err(|e| VmmError::io("resolve rootfs_base", b, e))
            })
            .transpose()?;
        Ok(Manifest {
            format: SNAPSHOT_FORMAT,
            engine: engine.as_str().to_owned(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            rootfs_base,
            net: spec.net.is_some(),
        })
    }

    async fn read(snapshot: &Path) -> Result<Manifest, VmmError> {
        let path = snapshot.join(SNAPSHOT_MANIFEST);
        let text = tokio::fs::read(&path).await.map_err(|e| {
            VmmError::io(
                "read the snapshot manifest (a dir without one is no finished snapshot)",
                &path,
                e,
            )
        })?;
        serde_json::from_slice(&text).map_err(|e| {
            VmmError::InvalidSpec(format!("snapshot manifest {}: {e}", path.display()))
        })
    }

    /// Fails, naming the first field that differs, unless a VM of `wanted`'s shape can take
    /// this snapshot.
    fn check_restores_into(&self, wanted: &Manifest, snapshot: &Path) -> Result<(), VmmError> {
        let show_base = |b: &Option<PathBuf>| {
            b.as_deref()
                .map_or_else(|| "none".to_owned(), |p| p.display().to_string())
        };
        let differs = [
            ("format", self.format.to_string(), wanted.format.to_string()),
            ("engine", self.engine.clone(), wanted.engine.clone()),
            ("vcpus", self.vcpus.to_string(), wanted.vcpus.to_string()),
            (
                "memory_mib",
                self.memory_mib.to_string(),
                wanted.memory_mib.to_string(),
            ),
            (
                "rootfs_base",
                show_base(&self.rootfs_base),
                show_base(&wanted.rootfs_base),
            ),
            ("net", self.net.to_string(), wanted.net.to_string()),
        ]
        .into_iter()
        .find(|(_, taken, asked)| taken != asked);
        match differs {
            None => Ok(()),
            Some((field, taken, asked)) => Err(VmmError::InvalidSpec(format!(
                "{field} {asked} does not match the snapshot's {taken} ({}): a snapshot \
                 restores only into a VM of the shape it was taken from",
                snapshot.display()
            ))),
        }
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

    /// Boots `spec`, or with `snapshot` restores that snapshot as the VM `spec`.
    async fn start(&self, spec: &VmSpec, snapshot: Option<&Path>) -> Result<QemuVm, VmmError> {
        // Phases of the start, for the debug log (where a restore's time goes).
        let begun = std::time::Instant::now();
        spec.validate()?;
        let manifest = Manifest::of(spec, self.engine_kind())?;
        if let Some(snapshot) = snapshot {
            Manifest::read(snapshot)
                .await?
                .check_restores_into(&manifest, snapshot)?;
        }
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
        // The base by its real path: the overlay records it as its backing file, and a
        // restore of its snapshot must find that same file even after a symlink such as
        // `images/current` has moved on.
        let overlay = match &manifest.rootfs_base {
            Some(base) => {
                let overlay = match snapshot {
                    Some(snapshot) => {
                        let (from, to) =
                            (snapshot.join(layout::OVERLAY), dir.join(layout::OVERLAY));
                        tokio::fs::copy(&from, &to)
                            .await
                            .map_err(|e| VmmError::io("copy the snapshot's overlay", &from, e))?;
                        to
                    }
                    None => instance::create_overlay(&self.config.qemu_img, base, dir).await?,
                };
                if let Some(sb) = sandbox {
                    sb.give(&overlay)?;
                }
                Some(overlay)
            }
            None => None,
        };

        let prepared = begun.elapsed();
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
        cmd.args(qemu_args(
            spec,
            &self.config,
            overlay.as_deref(),
            snapshot.is_some(),
        ));
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
            exit = vmm.wait() => return Err(startup_exit(exit)),
        };
        let qmp = Qmp::handshake(stream).await?;
        let qmp_up = begun.elapsed();
        if let Some(snapshot) = snapshot {
            migrate_in(&qmp, &vmm, dir, &snapshot.join(SNAPSHOT_STATE)).await?;
        }
        let vsock = dir.join(layout::VSOCK_SOCKET);
        let bridge = SerialBridge::start(&vsock, &dir.join(layout::AGENT_PORT_SOCKET))
            .map_err(|e| VmmError::io("start the agent bridge", &vsock, e))?;
        if let Some(sb) = sandbox {
            // vm-pool (root) binds it, but it is the VMM user's like everything in the VM dir:
            // the executor's container runs as that user, and connecting needs write access.
            sb.give(&vsock)?;
        }
        guard.disarm();
        let instance = Instance::new(spec, self.engine_kind(), vmm, console, cgroup);
        tracing::debug!(
            vm = %spec.id,
            pid = instance.vmm.pid(),
            restored = snapshot.is_some(),
            prepared_ms = prepared.as_millis() as u64,
            qmp_up_ms = qmp_up.as_millis() as u64,
            started_ms = begun.elapsed().as_millis() as u64,
            "qemu started"
        );
        Ok(QemuVm {
            instance,
            qmp,
            bridge: Mutex::new(Some(bridge)),
            sandbox: self.config.sandbox.clone(),
            manifest,
            control: tokio::sync::Mutex::new(()),
        })
    }
}

fn startup_exit(exit: VmExit) -> VmmError {
    VmmError::StartupExit {
        process: "qemu-system-x86_64",
        detail: exit.description,
    }
}

fn log_file(path: &Path) -> Result<std::fs::File, VmmError> {
    std::fs::File::create(path).map_err(|e| VmmError::io("create log", path, e))
}

fn unix_uri(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// Polls `query-migrate` until the migration (outgoing, or incoming on a QEMU started with
/// `-incoming`) completed; its error when it failed. Callers bound the wait.
async fn wait_migration(qmp: &Qmp) -> Result<(), VmmError> {
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some(status @ ("failed" | "cancelled")) => {
                return Err(VmmError::Qmp {
                    command: "migrate".into(),
                    message: format!(
                        "{status}: {}",
                        info.get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("no reason given")
                    ),
                });
            }
            _ => tokio::time::sleep(MIGRATION_POLL).await,
        }
    }
}

/// Streams a snapshot's state into a QEMU started with `-incoming defer`, waits until it
/// has loaded it, and runs the VM.
async fn migrate_in(qmp: &Qmp, vmm: &Supervised, dir: &Path, state: &Path) -> Result<(), VmmError> {
    let socket = dir.join(layout::MIGRATION_IN_SOCKET);
    let load = async {
        let file = tokio::fs::File::open(state)
            .await
            .map_err(|e| VmmError::io("open the snapshot's state", state, e))?;
        qmp.execute(
            "migrate-incoming",
            Some(json!({ "uri": unix_uri(&socket) })),
        )
        .await?;
        // QEMU listens from the moment migrate-incoming returns.
        let mut conn = UnixStream::connect(&socket)
            .await
            .map_err(|e| VmmError::io("connect to qemu's incoming migration", &socket, e))?;
        let mut file = BufReader::with_capacity(STREAM_BUFFER, file);
        tokio::io::copy_buf(&mut file, &mut conn)
            .await
            .map_err(|e| VmmError::io("stream the snapshot's state into qemu", &socket, e))?;
        // The end of the stream: a state cut short fails the load instead of leaving QEMU
        // waiting for the rest.
        conn.shutdown()
            .await
            .map_err(|e| VmmError::io("end the stream into qemu", &socket, e))?;
        wait_migration(qmp).await
    };
    let loaded = tokio::select! {
        loaded = tokio::time::timeout(MIGRATION_TIMEOUT, load) => loaded
            .unwrap_or_else(|_| Err(VmmError::Timeout("qemu loading the snapshot".into()))),
        exit = vmm.wait() => Err(startup_exit(exit)),
    };
    if loaded.is_err() {
        // A QEMU that cannot load the stream exits saying why, which beats our broken pipe.
        if let Ok(exit) = tokio::time::timeout(EXIT_GRACE, vmm.wait()).await {
            return Err(startup_exit(exit));
        }
    }
    loaded?;
    let _ = std::fs::remove_file(&socket); // QEMU is done listening there
    let status = qmp.execute("query-status", None).await?;
    if status.get("status").and_then(Value::as_str) != Some("running") {
        qmp.execute("cont", None).await?;
    }
    Ok(())
}

/// A file of a snapshot dir written under a temporary name: [`Staged::commit`] syncs it and
/// renames it into place; dropped uncommitted, it is removed. A half-written file never
/// carries a final name.
struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl Staged {
    fn new(dir: &Path, name: &str) -> Staged {
        Staged {
            tmp: dir.join(format!(".{name}.partial")),
            path: dir.join(name),
            committed: false,
        }
    }

    async fn commit(mut self) -> Result<(), VmmError> {
        let file = tokio::fs::File::open(&self.tmp)
            .await
            .map_err(|e| VmmError::io("open snapshot file", &self.tmp, e))?;
        file.sync_all()
            .await
            .map_err(|e| VmmError::io("sync snapshot file", &self.tmp, e))?;
        tokio::fs::rename(&self.tmp, &self.path)
            .await
            .map_err(|e| VmmError::io("rename snapshot file", &self.path, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A socket file removed when dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Makes the renames inside `dir` durable.
async fn sync_dir(dir: &Path) -> Result<(), VmmError> {
    let d = tokio::fs::File::open(dir)
        .await
        .map_err(|e| VmmError::io("open snapshot dir", dir, e))?;
    d.sync_all()
        .await
        .map_err(|e| VmmError::io("sync snapshot dir", dir, e))
}

/// QEMU's command line for `spec` (`incoming`: to be restored from a snapshot); a pure
/// function so it is tested without QEMU. Boot and restore must build the same machine.
pub(crate) fn qemu_args(
    spec: &VmSpec,
    config: &QemuConfig,
    overlay: Option<&Path>,
    incoming: bool,
) -> Vec<String> {
    let dir = &spec.dir;
    let mem = spec.memory_mib;
    let merge = if config.merge_pages { "on" } else { "off" };
    let kernel = config.kernel_override.as_deref().unwrap_or(&spec.kernel);
    let (accel, cpu) = match config.accel {
        QemuAccel::Kvm => ("kvm".to_owned(), "host"),
        QemuAccel::Tcg => (format!("tcg,tb-size={}", config.tcg_tb_mib), "max"),
    };
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("capsa-{}", spec.id),
        "-machine".into(),
        // rtc=on: the guest's wall clock at boot; options ROMs only slow the start.
        // mem-merge as well as the backend's merge: QEMU 7.2 madvises guest RAM by the
        // machine's setting, whatever the backend says (measured: `mg` in smaps VmFlags).
        format!("microvm,memory-backend=mem,x-option-roms=off,rtc=on,mem-merge={merge}"),
        "-accel".into(),
        accel,
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-m".into(),
        format!("{mem}M"),
        // Private anonymous memory, not a shared memfd (nothing maps it from outside QEMU):
        // a migration reads every guest page, and a read fault on a memfd hole allocates
        // the page where an anonymous one maps the zero page. Measured on a 512 MiB guest:
        // with a memfd, a snapshot took QEMU's RSS from 89 MB to 573 MB and a restored VM
        // started at 566 MB; anonymous, 92 MB and 85 MB.
        "-object".into(),
        format!("memory-backend-ram,id=mem,size={mem}M,merge={merge}"),
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
            // No flushes to the host's disk: the overlay lives and dies with the VM (a
            // snapshot syncs its own copy).
            format!(
                "id=root,file={},format=qcow2,if=none,cache=unsafe,discard=unmap{throttle}",
                overlay.display()
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
        ]);
    }
    args.extend([
        // The agent's channel. Port 0 of a virtio-serial device is kept for a console, so
        // one port of our own takes max_ports=2. QEMU listens; the bridge connects (and
        // the guest reads EOF while nothing is connected).
        "-device".into(),
        "virtio-serial-device,max_ports=2".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            dir.join(layout::AGENT_PORT_SOCKET).display()
        ),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
        // Seeds the guest's CRNG early (about 4 s sooner under TCG).
        "-device".into(),
        "virtio-rng-device".into(),
        // Free page reporting: pages the guest frees go back to the host within seconds
        // (QEMU discards them), so a VM that once filled its memory does not hold it for
        // the rest of its life. The balloon itself is never inflated.
        "-device".into(),
        "virtio-balloon-device,free-page-reporting=on".into(),
        "-qmp".into(),
        unix_uri(&dir.join(layout::QMP_SOCKET)),
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
    if incoming {
        // The state comes later, over QMP `migrate-incoming`.
        args.extend(["-incoming".into(), "defer".into()]);
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
            self.start(spec, None)
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
            self.start(spec, Some(snapshot))
                .await
                .map(|vm| Arc::new(vm) as Arc<dyn VirtualMachine>)
        }
        .boxed()
    }
}

/// A running QEMU VM.
pub struct QemuVm {
    instance: Instance,
    qmp: Qmp,
    /// The agent channel; destroy drops it (its tasks stop, `vsock.sock` goes).
    bridge: Mutex<Option<SerialBridge>>,
    sandbox: Option<Arc<Sandbox>>,
    /// What a snapshot of this VM records.
    manifest: Manifest,
    /// Held by pause, resume and snapshot: a snapshot is several QMP commands that another
    /// `stop` or `cont` must not come between.
    control: tokio::sync::Mutex<()>,
}

impl QemuVm {
    async fn qmp(&self, command: &str, arguments: Option<Value>) -> Result<Value, VmmError> {
        if let Some(exit) = self.instance.vmm.exit() {
            return Err(VmmError::Exited(exit.description));
        }
        self.qmp.execute(command, arguments).await
    }

    async fn run_state(&self) -> Result<String, VmmError> {
        let status = self.qmp("query-status", None).await?;
        Ok(status
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }

    async fn snapshot_into(&self, dest: &Path) -> Result<(), VmmError> {
        let _control = self.control.lock().await;
        let mut state = self.run_state().await?;
        if state == "postmigrate" {
            // Paused by this VM's last snapshot: QEMU (7.2) refuses to migrate it again
            // until `cont` has taken its disk back. The guest runs for the instant between
            // the two commands.
            self.qmp("cont", None).await?;
            self.qmp("stop", None).await?;
            state = "paused".into();
        }
        let was_running = state == "running";
        if was_running {
            self.qmp("stop", None).await?;
        }
        let saved = self.save(dest).await;
        if was_running {
            // After a failure too: the VM goes back to running.
            let resumed = self.qmp("cont", None).await;
            saved?;
            resumed?;
            return Ok(());
        }
        saved
    }

    /// Migrates the stopped VM into `dest` and copies its disk there.
    async fn save(&self, dest: &Path) -> Result<(), VmmError> {
        tokio::fs::create_dir_all(dest)
            .await
            .map_err(|e| VmmError::io("create snapshot dir", dest, e))?;
        // Until the new manifest is in place the dir is no snapshot: an old manifest must
        // never vouch for new files.
        let old = dest.join(SNAPSHOT_MANIFEST);
        match tokio::fs::remove_file(&old).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(VmmError::io("remove the old snapshot manifest", &old, e));
            }
            _ => {}
        }
        let state = Staged::new(dest, SNAPSHOT_STATE);
        let path = self.instance.dir.join(layout::MIGRATION_OUT_SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| VmmError::io("bind the migration socket", &path, e))?;
        let _socket = SocketFile(path.clone());
        if let Some(sb) = &self.sandbox {
            // QEMU connects to it.
            sb.give(&path)?;
        }
        self.qmp(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": MIGRATION_MAX_BANDWIDTH })),
        )
        .await?;
        self.qmp("migrate", Some(json!({ "uri": unix_uri(&path) })))
            .await?;
        let streamed = tokio::time::timeout(
            MIGRATION_TIMEOUT,
            self.stream_out(&listener, &path, &state.tmp),
        )
        .await
        .unwrap_or_else(|_| Err(VmmError::Timeout("qemu writing the snapshot".into())));
        if let Err(e) = streamed {
            // Leaves QEMU not migrating (and a stopped VM restartable).
            let _ = self.qmp("migrate_cancel", None).await;
            return Err(e);
        }
        state.commit().await?;
        if self.manifest.rootfs_base.is_some() {
            let overlay = self.instance.dir.join(layout::OVERLAY);
            let copy = Staged::new(dest, layout::OVERLAY);
            tokio::fs::copy(&overlay, &copy.tmp)
                .await
                .map_err(|e| VmmError::io("copy the overlay into the snapshot", &overlay, e))?;
            copy.commit().await?;
        }
        let manifest = Staged::new(dest, SNAPSHOT_MANIFEST);
        let text = serde_json::to_vec_pretty(&self.manifest).expect("a manifest serialises");
        tokio::fs::write(&manifest.tmp, text)
            .await
            .map_err(|e| VmmError::io("write the snapshot manifest", &manifest.tmp, e))?;
        manifest.commit().await?;
        sync_dir(dest).await
    }

    /// Takes QEMU's connection on `listener` and writes the stream to `to` until QEMU ends
    /// it, then waits for QEMU to call the migration completed.
    async fn stream_out(
        &self,
        listener: &UnixListener,
        path: &Path,
        to: &Path,
    ) -> Result<(), VmmError> {
        let conn = tokio::select! {
            accepted = listener.accept() => accepted
                .map_err(|e| VmmError::io("accept qemu's migration", path, e))?
                .0,
            // A QEMU that cannot connect fails the migration instead.
            ended = wait_migration(&self.qmp) => return Err(ended.err().unwrap_or_else(|| VmmError::Qmp {
                command: "migrate".into(),
                message: format!("completed without connecting to {}", path.display()),
            })),
        };
        let mut file = tokio::fs::File::create(to)
            .await
            .map_err(|e| VmmError::io("create snapshot file", to, e))?;
        let mut conn = BufReader::with_capacity(STREAM_BUFFER, conn);
        tokio::io::copy_buf(&mut conn, &mut file)
            .await
            .map_err(|e| VmmError::io("write the snapshot's state", to, e))?;
        file.flush()
            .await
            .map_err(|e| VmmError::io("write the snapshot's state", to, e))?;
        wait_migration(&self.qmp).await
    }
}

impl VirtualMachine for QemuVm {
    delegate_to_instance!();
    fn counters(&self) -> BoxFuture<'_, Result<VmCounters, VmmError>> {
        async move {
            let mut counters = self.instance.process_counters()?;
            let stats = self.qmp("query-blockstats", None).await?;
            (counters.disk_read_bytes, counters.disk_write_bytes) = blockstats_totals(&stats);
            Ok(counters)
        }
        .boxed()
    }
    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        async move {
            let _control = self.control.lock().await;
            self.qmp("stop", None).await.map(drop)
        }
        .boxed()
    }
    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        async move {
            let _control = self.control.lock().await;
            self.qmp("cont", None).await.map(drop)
        }
        .boxed()
    }
    fn snapshot<'a>(&'a self, dest: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        self.snapshot_into(dest).boxed()
    }
    fn destroy(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        async move {
            drop(self.bridge.lock().expect("bridge lock").take());
            self.instance.destroy().await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            id: "vm-abc".into(),
            vcpus: 2,
            memory_mib: 256,
            kernel: "/img/bzImage".into(),
            cmdline: "console=ttyS0 root=/dev/vda".into(),
            rootfs_base: Some("/img/rootfs.ext4".into()),
            initrd: None,
            dir: "/state/vms/vm-abc".into(),
            net: None,
        }
    }

    #[test]
    fn command_line_has_memory_overlay_agent_port_and_qmp() {
        let spec = spec();
        let config = QemuConfig {
            qemu: "qemu".into(),
            qemu_img: "qemu-img".into(),
            accel: QemuAccel::Tcg,
            kernel_override: None,
            die_with_parent: true,
            sandbox: None,
            disk_bytes_per_sec: Some(50 << 20),
            disk_iops: None,
            merge_pages: false,
            tcg_tb_mib: 48,
        };
        let overlay = Path::new("/state/vms/vm-abc/overlay.qcow2");
        let args = qemu_args(&spec, &config, Some(overlay), false);
        let line = args.join(" ");
        for want in [
            "-accel tcg,tb-size=48",
            "-smp 2",
            "cache=unsafe,discard=unmap,throttling.bps-total=52428800",
            "-object memory-backend-ram,id=mem,size=256M,merge=off",
            "microvm,memory-backend=mem,x-option-roms=off,rtc=on,mem-merge=off",
            "-kernel /img/bzImage",
            "file=/state/vms/vm-abc/overlay.qcow2,format=qcow2",
            "-device virtio-serial-device,max_ports=2",
            "-chardev socket,id=agent,path=/state/vms/vm-abc/agent-port.sock,server=on,wait=off",
            "-device virtserialport,chardev=agent,name=org.capsa.agent",
            "-qmp unix:/state/vms/vm-abc/qmp.sock",
            "-no-reboot",
            "-device virtio-balloon-device,free-page-reporting=on",
        ] {
            assert!(line.contains(want), "missing {want:?} in {line}");
        }
        for unwanted in ["-initrd", "iops", "-sandbox", "vsock", "-incoming", "memfd"] {
            assert!(!line.contains(unwanted), "{unwanted:?} in {line}");
        }
        // A restore builds the same machine, and takes its state over QMP.
        let restore = qemu_args(&spec, &config, Some(overlay), true);
        assert_eq!(restore[..args.len()], args[..]);
        assert_eq!(restore[args.len()..], ["-incoming", "defer"]);

        let pvm = QemuConfig {
            accel: QemuAccel::Kvm,
            kernel_override: Some("/pvm/bzImage".into()),
            ..config
        };
        let line = qemu_args(&spec, &pvm, None, false).join(" ");
        assert!(
            line.contains("-accel kvm") && line.contains("-kernel /pvm/bzImage"),
            "{line}"
        );
        assert!(!line.contains("-drive"), "{line}");
        let merged = QemuConfig {
            merge_pages: true,
            ..pvm.clone()
        };
        let line = qemu_args(&spec, &merged, None, false).join(" ");
        assert!(
            line.contains("size=256M,merge=on") && line.contains("mem-merge=on"),
            "{line}"
        );
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
        let line = qemu_args(&spec, &pvm, None, false).join(" ");
        for want in [
            "-netdev tap,id=net0,ifname=vmtap7,script=no,downscript=no",
            "-device virtio-net-device,netdev=net0,mac=52:54:00:ca:00:07",
        ] {
            assert!(line.contains(want), "missing {want:?} in {line}");
        }
    }

    #[test]
    fn a_snapshot_restores_only_into_its_own_shape() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("rootfs.ext4");
        std::fs::write(&base, b"fs").unwrap();
        // The base is recorded by its real path: another way to name it is the same base.
        std::os::unix::fs::symlink(dir.path(), dir.path().join("current")).unwrap();
        let spec = VmSpec {
            rootfs_base: Some(dir.path().join("current/rootfs.ext4")),
            ..spec()
        };
        let taken = Manifest::of(&spec, EngineKind::QemuTcg).unwrap();
        assert_eq!(
            taken.rootfs_base.as_deref(),
            Some(base.canonicalize().unwrap().as_path())
        );
        let snap = Path::new("/snaps/s1");
        let same = Manifest::of(
            &VmSpec {
                rootfs_base: Some(base.clone()),
                ..spec.clone()
            },
            EngineKind::QemuTcg,
        )
        .unwrap();
        taken.check_restores_into(&same, snap).unwrap();

        let other = |f: &dyn Fn(&mut Manifest)| {
            let mut m = same.clone();
            f(&mut m);
            taken.check_restores_into(&m, snap).unwrap_err().to_string()
        };
        let err = other(&|m| m.memory_mib = 512);
        assert!(
            err.contains("memory_mib 512 does not match the snapshot's 256 (/snaps/s1)"),
            "{err}"
        );
        assert!(other(&|m| m.vcpus = 1).contains("vcpus 1 "));
        assert!(other(&|m| m.engine = "qemu-kvm".into()).contains("engine qemu-kvm "));
        assert!(other(&|m| m.net = true).contains("net true "));
        assert!(other(&|m| m.rootfs_base = None).contains("rootfs_base none "));
        assert!(other(&|m| m.format = 2).contains("format 2 "));
        // What a snapshot dir holds reads back as written.
        let text = serde_json::to_vec(&taken).unwrap();
        assert_eq!(serde_json::from_slice::<Manifest>(&text).unwrap(), taken);
    }

    #[tokio::test]
    async fn a_staged_file_has_its_final_name_only_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let names = || {
            let mut n: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            n.sort();
            n
        };
        let dropped = Staged::new(dir.path(), "vmstate");
        std::fs::write(&dropped.tmp, b"half").unwrap();
        assert_eq!(names(), [".vmstate.partial"]);
        drop(dropped);
        assert!(names().is_empty(), "an abandoned file is removed");

        std::fs::write(dir.path().join("vmstate"), b"old").unwrap();
        let staged = Staged::new(dir.path(), "vmstate");
        std::fs::write(&staged.tmp, b"new").unwrap();
        assert_eq!(std::fs::read(dir.path().join("vmstate")).unwrap(), b"old");
        staged.commit().await.unwrap();
        assert_eq!(names(), ["vmstate"]);
        assert_eq!(std::fs::read(dir.path().join("vmstate")).unwrap(), b"new");
        sync_dir(dir.path()).await.unwrap();
    }
}
