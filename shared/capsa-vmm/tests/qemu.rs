//! Real VMs under QEMU on this host (TCG unless KVM is usable for the image's kernel):
//! the guest image boots and its agent answers over hybrid vsock; the floor initramfs
//! boots; a VMM killed from outside is noticed at once; destroy leaves nothing behind. The
//! image test runs confined (root is needed; so is the `capsa-vmm` user of
//! `deploy/scripts/install-deps.sh`): QEMU and vhost-device-vsock as that user, under
//! seccomp, in the VM's cgroup with its limits.
//!
//! The image comes from `CAPSA_IMAGE_DIR` (default
//! `${CAPSA_CACHE_DIR:-/var/cache/capsa}/images/current`); a missing image fails the test
//! with instructions, it never skips.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use capsa_vmm::{
    EngineKind, EnginePreference, GuestImage, HostFacts, Hypervisor, Qemu, QemuAccel, QemuConfig,
    Sandbox, SandboxConfig, VirtualMachine, VmSpec, engine,
};

/// Under TCG a boot takes a few seconds; on a loaded 2-core machine, many more.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn image_dir() -> PathBuf {
    std::env::var_os("CAPSA_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache =
                std::env::var_os("CAPSA_CACHE_DIR").unwrap_or_else(|| "/var/cache/capsa".into());
            PathBuf::from(cache).join("images/current")
        })
}

fn image() -> GuestImage {
    let dir = image_dir();
    GuestImage::load(&dir).unwrap_or_else(|e| {
        panic!(
            "guest image not usable at {} ({e}); build it first: \
             cargo build --release -p capsa-guest-agent && \
             deploy/guest/build-image.sh --agent target/release/capsa-agent \
             (or set CAPSA_IMAGE_DIR)",
            dir.display()
        )
    })
}

fn floor_initramfs() -> PathBuf {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/guest/build-floor-initramfs.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .expect("run build-floor-initramfs.sh");
    assert!(
        out.status.success(),
        "build-floor-initramfs.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    PathBuf::from(path)
}

/// The engine this host gets under `auto`, restricted to QEMU (Cloud Hypervisor has its
/// own test).
fn qemu() -> (Qemu, EngineKind) {
    let (config, kind) = qemu_config();
    (Qemu::new(config), kind)
}

const OVERHEAD_MIB: u32 = 320;

/// [`qemu`] confined, its VM cgroups under `capsa-vmm-test`.
fn confined_qemu() -> (Qemu, EngineKind, Arc<Sandbox>) {
    let (mut config, kind) = qemu_config();
    let sandbox = Arc::new(
        Sandbox::new(
            SandboxConfig {
                user: "capsa-vmm".into(),
                cgroup_parent: "capsa-vmm-test".into(),
                memory_overhead_mib: OVERHEAD_MIB,
                pids_max: 200,
            },
            kind != EngineKind::QemuTcg,
        )
        .expect("confinement needs root, cgroups and the capsa-vmm user (install-deps.sh)"),
    );
    config.sandbox = Some(sandbox.clone());
    (Qemu::new(config), kind, sandbox)
}

/// A line of /proc/<pid>/status, e.g. `Uid:` -> its fields.
fn status_field(pid: u32, key: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn qemu_config() -> (QemuConfig, EngineKind) {
    let facts = HostFacts {
        cloud_hypervisor: None,
        ..HostFacts::probe(None, None, None)
    };
    let choice = engine::choose(EnginePreference::Auto, &facts).expect("qemu is installed");
    let accel = if choice.kind == EngineKind::QemuKvm {
        QemuAccel::Kvm
    } else {
        QemuAccel::Tcg
    };
    let mut config = QemuConfig::discover(accel)
        .expect("qemu-system-x86_64, qemu-img and vhost-device-vsock installed");
    config.kernel_override = choice.kernel_override;
    eprintln!("engine: {} ({})", choice.kind, choice.reason);
    (config, choice.kind)
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

async fn fail_with_console(vm: &Arc<dyn VirtualMachine>, what: &str) -> ! {
    let console = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
    let vmm_log = std::fs::read_to_string(vm.dir().join("vmm.log")).unwrap_or_default();
    panic!("{what}\n--- console ---\n{console}\n--- vmm.log ---\n{vmm_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_boots_confined_and_its_agent_answers_over_vsock() {
    let image = image();
    let (qemu, kind, sandbox) = confined_qemu();
    let state = tempfile::tempdir().unwrap();
    let spec = VmSpec {
        id: "vm-imagetest".into(),
        vcpus: 1,
        memory_mib: 512,
        kernel: image.kernel_for(kind).to_owned(),
        cmdline: image.cmdline_for(kind),
        rootfs_base: Some(image.rootfs.clone()),
        initrd: None,
        dir: state.path().join("vms/vm-imagetest"),
        net: None,
    };
    let vm = qemu.boot(&spec).await.unwrap();
    assert_eq!(vm.engine(), kind);
    assert_eq!(
        vm.vsock_path(),
        capsa_vsock::vm_socket_path(state.path(), "vm-imagetest").unwrap()
    );
    assert!(vm.dir().join("overlay.qcow2").is_file());
    let pids = vm.pids();
    assert_eq!(pids.len(), 2, "qemu and vhost-device-vsock");

    let vsock = vm.vsock_path();
    let ready = tokio::select! {
        r = capsa_vsock::wait_for_port(&vsock, capsa_vsock::AGENT_PORT, BOOT_TIMEOUT) => r,
        exit = vm.wait() => fail_with_console(&vm, &format!("vmm exited during boot: {}", exit.description)).await,
    };
    if let Err(e) = ready {
        fail_with_console(&vm, &format!("agent never listened on vsock 1024: {e}")).await;
    }

    // Confined: the VMM user, seccomp filter mode, and the VM's cgroup with its limits.
    let user = &sandbox.user;
    for &pid in &pids {
        assert_eq!(
            status_field(pid, "Uid:"),
            vec![user.uid.to_string(); 4],
            "pid {pid}"
        );
        assert_eq!(
            status_field(pid, "Gid:"),
            vec![user.gid.to_string(); 4],
            "pid {pid}"
        );
        assert_eq!(status_field(pid, "Seccomp:"), ["2"], "pid {pid}");
        assert_eq!(status_field(pid, "NoNewPrivs:"), ["1"], "pid {pid}");
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        for controller in ["memory", "cpu", "pids"] {
            assert!(
                cgroups.lines().any(|l| {
                    let f: Vec<&str> = l.splitn(3, ':').collect();
                    (f[1].split(',').any(|c| c == controller) || f[1].is_empty())
                        && f[2] == "/capsa-vmm-test/vm-imagetest"
                }),
                "pid {pid} not in the vm's {controller} cgroup: {cgroups}"
            );
        }
        // The mount view: other VMs' dirs are hidden, everything but the VM dir read-only.
        let root = format!("/proc/{pid}/root");
        let vms = std::fs::read_dir(format!("{root}{}", state.path().join("vms").display()))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>();
        assert_eq!(vms, ["vm-imagetest"], "pid {pid} sees {vms:?}");
        let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let root_mount = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .unwrap();
        assert!(
            root_mount
                .split(' ')
                .nth(5)
                .unwrap()
                .split(',')
                .any(|o| o == "ro"),
            "{root_mount}"
        );
    }
    let expected_memory = (512 + u64::from(OVERHEAD_MIB)) << 20;
    let cg_file = |c: &str, f: &str| {
        let dir = sandbox
            .cgroups
            .dirs()
            .into_iter()
            .find(|d| {
                sandbox.cgroups.version() == 2 || d.starts_with(format!("/sys/fs/cgroup/{c}"))
            })
            .unwrap()
            .join("vm-imagetest");
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .trim()
            .to_owned()
    };
    if sandbox.cgroups.version() == 2 {
        assert_eq!(cg_file("memory", "memory.max"), expected_memory.to_string());
        assert_eq!(cg_file("cpu", "cpu.max"), "100000 100000");
        assert_eq!(cg_file("pids", "pids.max"), "200");
    } else {
        assert_eq!(
            cg_file("memory", "memory.limit_in_bytes"),
            expected_memory.to_string()
        );
        assert_eq!(cg_file("cpu", "cpu.cfs_quota_us"), "100000");
        assert_eq!(cg_file("pids", "pids.max"), "200");
    }
    let cg_dirs: Vec<PathBuf> = sandbox
        .cgroups
        .dirs()
        .into_iter()
        .map(|d| d.join("vm-imagetest"))
        .collect();
    eprintln!(
        "idle VmRSS of qemu (512 MiB guest, tcg): {:?} kB",
        status_field(pids[0], "VmRSS:")
    );

    let c = vm.counters().await.unwrap();
    assert!(c.cpu_time > Duration::ZERO, "{c:?}");
    assert!(c.vmm_resident_bytes > 16 << 20, "{c:?}");
    assert!(c.disk_read_bytes > 0, "the guest read its root fs: {c:?}");
    assert_eq!((c.network_rx_bytes, c.network_tx_bytes), (0, 0));

    // QEMU refuses what its vsock backend cannot survive (see the qemu module), and the
    // refusal leaves the VM untouched: the agent still answers.
    let snap = state.path().join("snap");
    for (operation, result) in [
        ("pause", vm.pause().await),
        ("resume", vm.resume().await),
        ("snapshot", vm.snapshot(&snap).await),
    ] {
        let err = result.expect_err(operation);
        assert!(
            matches!(err, capsa_vmm::VmmError::Unsupported { operation: o, .. } if o == operation),
            "{operation}: {err}"
        );
    }
    capsa_vsock::wait_for_port(&vm.vsock_path(), capsa_vsock::AGENT_PORT, BOOT_TIMEOUT)
        .await
        .unwrap();

    vm.destroy().await.unwrap();
    vm.destroy().await.unwrap(); // idempotent
    assert!(!spec.dir.exists(), "vm dir removed");
    for d in cg_dirs {
        assert!(!d.exists(), "cgroup {} removed", d.display());
    }
    for pid in pids {
        assert!(!pid_alive(pid), "pid {pid} survived destroy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_boots_and_a_killed_vmm_is_noticed_at_once() {
    let image = image();
    let initrd = floor_initramfs();
    let (qemu, kind) = qemu();
    let state = tempfile::tempdir().unwrap();
    let spec = VmSpec {
        id: "vm-floortest".into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: image.kernel_for(kind).to_owned(),
        cmdline: capsa_vmm::image::tcg_cmdline(
            "console=ttyS0 panic=-1 quiet",
            image.tcg_append.as_deref(),
            kind,
        ),
        rootfs_base: None,
        initrd: Some(initrd),
        dir: state.path().join("vms/vm-floortest"),
        net: None,
    };
    let vm = qemu.boot(&spec).await.unwrap();
    let ready = tokio::time::timeout(BOOT_TIMEOUT, vm.wait_for_console("capsa-floor-ready")).await;
    if !matches!(ready, Ok(Ok(()))) {
        fail_with_console(&vm, &format!("floor not ready: {ready:?}")).await;
    }
    assert!(vm.exit().is_none());

    // SAFETY: kill(2) on the VMM pid this test owns.
    unsafe { libc::kill(vm.vmm_pid() as i32, libc::SIGKILL) };
    let exit = tokio::time::timeout(Duration::from_secs(2), vm.wait())
        .await
        .expect("exit noticed within 2 s");
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit:?}");
    assert!(vm.exit().is_some());
    assert!(
        vm.counters().await.is_err(),
        "counters of a dead vm are an error"
    );

    let pids = vm.pids();
    vm.destroy().await.unwrap();
    assert!(!spec.dir.exists());
    for pid in pids {
        assert!(!pid_alive(pid), "pid {pid} survived destroy");
    }
}

#[tokio::test]
async fn a_bad_spec_leaves_nothing_behind() {
    let (qemu, _) = qemu();
    let state = tempfile::tempdir().unwrap();
    let spec = VmSpec {
        id: "vm-bad".into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: state.path().join("no-such-kernel"),
        cmdline: String::new(),
        rootfs_base: None,
        initrd: None,
        dir: state.path().join("vms/vm-bad"),
        net: None,
    };
    let err = qemu.boot(&spec).await.err().expect("boot must fail");
    assert!(err.to_string().contains("kernel"), "{err}");
    assert!(!spec.dir.exists());
}
