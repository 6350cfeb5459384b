//! Real VMs under QEMU on this host (TCG unless KVM is usable for the image's kernel):
//! the guest image boots and its agent answers over hybrid vsock (the bridge to its
//! virtio-serial port); a VM pauses, resumes, is snapshotted and restored into a new VM
//! with its agent's state; the floor initramfs boots; a VMM killed from outside is noticed
//! at once; destroy leaves nothing behind. The image tests run confined (root is needed; so
//! is the `capsa-vmm` user of `deploy/scripts/install-deps.sh`): QEMU as that user, under
//! seccomp, in the VM's cgroup with its limits.
//!
//! The image comes from `CAPSA_IMAGE_DIR` (default
//! `${CAPSA_CACHE_DIR:-/var/cache/capsa}/images/current`); a missing image fails the test
//! with instructions, it never skips.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsa_proto::agent::v1::ExecuteRequest;
use capsa_proto::agent::v1::agent_service_client::AgentServiceClient;
use capsa_proto::common::v1::execute_event::Event;
use capsa_proto::common::v1::{CompletionStatus, ExecuteSpec, Language};
use capsa_vmm::{
    EngineKind, EnginePreference, GuestImage, HostFacts, Hypervisor, Qemu, QemuAccel, QemuConfig,
    Sandbox, SandboxConfig, VirtualMachine, VmSpec, VmmError, engine,
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
    confined_qemu_merging(false)
}

/// [`confined_qemu`], offering guest RAM to KSM or not.
fn confined_qemu_merging(merge_pages: bool) -> (Qemu, EngineKind, Arc<Sandbox>) {
    let (mut config, kind) = qemu_config();
    config.merge_pages = merge_pages;
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
    let mut config =
        QemuConfig::discover(accel).expect("qemu-system-x86_64 and qemu-img installed");
    config.kernel_override = choice.kernel_override;
    eprintln!("engine: {} ({})", choice.kind, choice.reason);
    (config, choice.kind)
}

/// Whether the VMM `pid` offers its guest RAM (the one mapping of at least `memory_mib`)
/// to KSM: `mg` among the mapping's VmFlags.
fn guest_ram_mergeable(pid: u32, memory_mib: u32) -> bool {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut ram = false;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Size:") {
            let kib: u64 = kib.trim().trim_end_matches("kB").trim().parse().unwrap();
            ram = kib >= u64::from(memory_mib) * 1024;
        } else if let Some(flags) = line.strip_prefix("VmFlags:")
            && ram
        {
            return flags.split_whitespace().any(|f| f == "mg");
        }
    }
    panic!("no mapping of {memory_mib} MiB in /proc/{pid}/smaps")
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

/// A 512 MiB, one-vCPU VM of the agent image, in `<state>/vms/<id>`.
fn image_spec(image: &GuestImage, kind: EngineKind, state: &Path, id: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        vcpus: 1,
        memory_mib: 512,
        kernel: image.kernel_for(kind).to_owned(),
        cmdline: image.cmdline_for(kind),
        rootfs_base: Some(image.rootfs.clone()),
        initrd: None,
        dir: state.join("vms").join(id),
        net: None,
    }
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
    let spec = image_spec(&image, kind, state.path(), "vm-imagetest");
    let vm = qemu.boot(&spec).await.unwrap();
    assert_eq!(vm.engine(), kind);
    assert_eq!(
        vm.vsock_path(),
        capsa_vsock::vm_socket_path(state.path(), "vm-imagetest").unwrap()
    );
    assert!(vm.dir().join("overlay.qcow2").is_file());
    let pids = vm.pids();
    assert_eq!(pids, [vm.vmm_pid()], "one process per vm: qemu");

    wait_for_agent(&vm).await;

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

    // Memory the guest frees goes back to the host (free page reporting on private guest
    // memory): QEMU's resident size falls again.
    let rss = || async { vm.counters().await.unwrap().vmm_resident_bytes };
    assert_eq!(python(&vm, "blob = b'x' * (200 << 20)").await, "");
    let filled = rss().await;
    assert_eq!(python(&vm, "del blob").await, "");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = rss().await;
        if now + (120 << 20) <= filled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "qemu's rss stayed at {now} after the guest freed 200 MiB (filled: {filled})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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

/// Waits until the agent accepts a connection on its port (through the bridge), failing
/// with the console when it never does.
async fn wait_for_agent(vm: &Arc<dyn VirtualMachine>) {
    let vsock = vm.vsock_path();
    let ready = tokio::select! {
        r = capsa_vsock::wait_for_port(&vsock, capsa_vsock::AGENT_PORT, BOOT_TIMEOUT) => r,
        exit = vm.wait() => fail_with_console(vm, &format!("vmm exited: {}", exit.description)).await,
    };
    if let Err(e) = ready {
        fail_with_console(vm, &format!("agent never answered on vsock 1024: {e}")).await;
    }
}

/// Runs `code` in the agent's Python kernel; returns its stdout and the trailing
/// expression's value, and fails on anything but a clean completion.
async fn python(vm: &Arc<dyn VirtualMachine>, code: &str) -> String {
    let mut client = AgentServiceClient::new(capsa_vsock::channel(
        vm.vsock_path(),
        capsa_vsock::AGENT_PORT,
    ));
    let run = async {
        let mut events = client
            .execute(ExecuteRequest {
                spec: Some(ExecuteSpec {
                    language: Language::Python.into(),
                    code: code.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_or_else(|e| panic!("execute {code:?}: {e}"))
            .into_inner();
        let mut out = String::new();
        let mut completed = false;
        while let Some(response) = events.message().await.unwrap() {
            match response.event.and_then(|e| e.event) {
                Some(Event::Stdout(chunk)) => out.push_str(&String::from_utf8_lossy(&chunk.data)),
                Some(Event::Result(result)) => {
                    out.push_str(&String::from_utf8_lossy(&result.data["text/plain"]));
                }
                Some(Event::Completion(c)) => {
                    assert_eq!(c.status(), CompletionStatus::Ok, "{code:?}: {c:?} {out}");
                    assert!(!c.state_lost, "{code:?}: the kernel restarted");
                    completed = true;
                }
                Some(Event::Error(e)) => panic!("{code:?} raised {}: {}", e.name, e.value),
                _ => {}
            }
        }
        assert!(completed, "{code:?}: no completion");
        out
    };
    tokio::time::timeout(BOOT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("{code:?} did not complete in {BOOT_TIMEOUT:?}"))
}

/// Live processes with an argument pointing into `dir`.
fn processes_in(dir: &Path) -> Vec<u32> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                raw.split(|b| *b == 0)
                    .any(|a| String::from_utf8_lossy(a).contains(&dir))
            }) && pid_alive(pid)
        })
        .collect()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// The whole life of a snapshot, confined: the agent's Python state survives pause and
/// resume, a snapshot of the running VM (which runs on after it), two snapshots of a paused
/// one, and a restore into a new VM. Restores that cannot work fail cleanly and leave
/// nothing behind. Prints the figures (boot and restore to agent-ready, snapshot time and
/// size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_state_survives_pause_snapshot_and_restore() {
    let image = image();
    let (qemu, kind, sandbox) = confined_qemu();
    let state = tempfile::tempdir().unwrap();
    let spec = image_spec(&image, kind, state.path(), "vm-snaptest");
    let started = Instant::now();
    let vm = qemu.boot(&spec).await.unwrap();
    wait_for_agent(&vm).await;
    let cold_boot = started.elapsed();
    let pid = vm.vmm_pid();
    assert!(
        !guest_ram_mergeable(pid, spec.memory_mib),
        "guest RAM goes to KSM only when asked (merge_pages)"
    );
    assert_eq!(python(&vm, "x = 41").await, "");

    vm.pause().await.unwrap();
    vm.resume().await.unwrap();
    assert_eq!(python(&vm, "print(x)").await, "41\n");

    // A running VM is stopped for the snapshot and runs on after it.
    let snap = state.path().join("snap");
    let started = Instant::now();
    vm.snapshot(&snap).await.unwrap();
    let snapshot_time = started.elapsed();
    assert_eq!(
        file_names(&snap),
        ["manifest.json", "overlay.qcow2", "vmstate"]
    );
    assert!(
        !vm.dir().join("migrate-out.sock").exists(),
        "the migration socket is removed"
    );
    assert_eq!(python(&vm, "x += 1; x").await, "42");
    // Its disk is its own again (the migration had handed it over): a synced write lands.
    let written = vm.counters().await.unwrap().disk_write_bytes;
    let write = "import os\nwith open('/var/tmp/after-snapshot', 'w') as f:\n    \
                 f.write('y' * 65536)\n    f.flush()\n    os.fsync(f.fileno())";
    assert_eq!(python(&vm, write).await, "");
    let now = vm.counters().await.unwrap().disk_write_bytes;
    assert!(now > written, "disk writes {written} -> {now}");
    let state_bytes = std::fs::metadata(snap.join("vmstate")).unwrap().len();
    let overlay_bytes = std::fs::metadata(snap.join("overlay.qcow2")).unwrap().len();

    // A paused VM stays paused through a snapshot (its agent cannot answer), also through a
    // second one into the same dir, which replaces the first.
    vm.pause().await.unwrap();
    let paused = state.path().join("snap-paused");
    vm.snapshot(&paused).await.unwrap();
    vm.snapshot(&paused).await.unwrap();
    assert_eq!(
        file_names(&paused),
        ["manifest.json", "overlay.qcow2", "vmstate"]
    );
    let watched = Duration::from_secs(3);
    let answered = tokio::time::timeout(watched, python(&vm, "x")).await;
    assert!(
        answered.is_err(),
        "a paused vm's agent answered within {watched:?}: {answered:?}"
    );
    vm.resume().await.unwrap();
    assert_eq!(python(&vm, "x").await, "42");

    vm.destroy().await.unwrap();
    assert!(!spec.dir.exists());
    assert!(!pid_alive(pid), "qemu {pid} survived destroy");

    // A restore into another shape is refused before anything starts.
    let restored_spec = |id: &str| VmSpec {
        id: id.into(),
        dir: state.path().join("vms").join(id),
        ..spec.clone()
    };
    let bigger = VmSpec {
        memory_mib: 768,
        ..restored_spec("vm-snapbigger")
    };
    let err = qemu
        .restore(&bigger, &snap)
        .await
        .err()
        .expect("a restore with more memory must fail");
    assert!(
        matches!(err, VmmError::InvalidSpec(_)) && err.to_string().contains("memory_mib 768"),
        "{err}"
    );
    assert!(!bigger.dir.exists());
    // A state QEMU cannot load (cut short) fails the restore with QEMU's reason, and the
    // started QEMU and its dir go.
    let broken = state.path().join("snap-broken");
    std::fs::create_dir(&broken).unwrap();
    for name in ["manifest.json", "overlay.qcow2"] {
        std::fs::copy(snap.join(name), broken.join(name)).unwrap();
    }
    let full = std::fs::read(snap.join("vmstate")).unwrap();
    std::fs::write(broken.join("vmstate"), &full[..full.len() / 2]).unwrap();
    let cut = restored_spec("vm-snapbroken");
    let err = qemu
        .restore(&cut, &broken)
        .await
        .err()
        .expect("a restore of half a state must fail");
    assert!(matches!(err, VmmError::StartupExit { .. }), "{err:?}");
    assert!(!cut.dir.exists());
    assert!(processes_in(&cut.dir).is_empty());

    // The restore: a new VM with the agent's state of the snapshot's instant.
    let new = restored_spec("vm-snaprestored");
    let started = Instant::now();
    let restored = qemu.restore(&new, &snap).await.unwrap();
    wait_for_agent(&restored).await;
    let restore_time = started.elapsed();
    assert_eq!(restored.id(), "vm-snaprestored");
    assert_eq!(python(&restored, "x + 1").await, "42");
    let pids = restored.pids();
    assert_eq!(pids, [restored.vmm_pid()]);
    assert_eq!(
        status_field(pids[0], "Uid:"),
        vec![sandbox.user.uid.to_string(); 4]
    );
    let c = restored.counters().await.unwrap();
    eprintln!(
        "figures ({kind}, 512 MiB, 1 vcpu): cold boot to agent {:.2} s; snapshot of the \
         running vm {:.2} s, vmstate {:.1} MB, overlay {:.1} MB; restore to agent {:.2} s; \
         restored qemu rss {:.0} MB",
        cold_boot.as_secs_f64(),
        snapshot_time.as_secs_f64(),
        state_bytes as f64 / 1e6,
        overlay_bytes as f64 / 1e6,
        restore_time.as_secs_f64(),
        c.vmm_resident_bytes as f64 / 1e6,
    );

    // The paused snapshot restores as well.
    let from_paused = restored_spec("vm-snaprestoredpaused");
    let second = qemu.restore(&from_paused, &paused).await.unwrap();
    wait_for_agent(&second).await;
    assert_eq!(python(&second, "x").await, "42");

    for vm in [restored, second] {
        let pid = vm.vmm_pid();
        let dir = vm.dir().to_owned();
        vm.destroy().await.unwrap();
        assert!(!dir.exists());
        assert!(!pid_alive(pid), "qemu {pid} survived destroy");
    }
    assert!(
        processes_in(&state.path().join("vms")).is_empty(),
        "no process of any vm is left"
    );
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
