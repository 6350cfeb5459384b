//! Resource isolation and privileges of the VMMs, on real VMs: QEMU runs as the
//! unprivileged VMM user under seccomp, in the VM's cgroup with its limits; a
//! guest that fills its disk gets ENOSPC while the overlay on the host stays under the
//! base's size; the cgroup goes with the VM, and a crashed pool's cgroups are reaped by the
//! next one. Needs root, cgroups and the `capsa-vmm` user (deploy/scripts/install-deps.sh).

mod common;

use std::path::{Path, PathBuf};

use capsa_proto::vmpool::v1::{AcquireVmRequest, ReleaseVmRequest, VmState};
use capsa_test_support::eventually;
use common::{PoolUnderTest, pid_alive, shell, wait_warm};

/// This test's own parent cgroup, so nothing else's VMs are looked at.
const CGROUP: &str = "capsa-vmpool-isolation-test";
const OVERHEAD_MIB: u64 = 300;

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

fn vmm_uid() -> String {
    let out = std::process::Command::new("id")
        .args(["-u", "capsa-vmm"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the capsa-vmm user is missing: run deploy/scripts/install-deps.sh"
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The VM's cgroup dir holding `file` (v2: one dir; v1: the controller's hierarchy).
fn cgroup_file(vm_id: &str, controller: &str, file: &str) -> PathBuf {
    let v1 = Path::new("/sys/fs/cgroup").join(controller).join(CGROUP);
    let v2 = Path::new("/sys/fs/cgroup").join(CGROUP);
    let parent = if v1.is_dir() { v1 } else { v2 };
    parent.join(vm_id).join(file)
}

fn vm_cgroups_exist(vm_id: &str) -> bool {
    ["memory", "cpu", "pids"]
        .iter()
        .any(|c| cgroup_file(vm_id, c, "").exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmms_run_confined_a_full_disk_stays_in_the_guest_and_cgroups_are_reaped() {
    let overhead = OVERHEAD_MIB.to_string();
    let args = [
        "--warm",
        "1",
        "--orphan-vms-on-crash",
        "--vm-cgroup",
        CGROUP,
        "--vmm-memory-overhead-mib",
        &overhead,
    ];
    let mut pool = PoolUnderTest::start(&args).await;
    let mut c = pool.client().await;
    wait_warm(&mut c, 1).await;
    let vm = c
        .acquire_vm(AcquireVmRequest {
            lease_id: "isolation".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    // Its own processes: the warm pool is refilling meanwhile.
    let pids = pool.processes_of(&vm.id);
    assert_eq!(pids, [vm.vmm_pid], "one qemu per vm");

    // Unprivileged, under seccomp, in the VM's cgroup.
    let uid = vmm_uid();
    for &pid in &pids {
        assert_eq!(status_field(pid, "Uid:"), vec![uid.clone(); 4], "pid {pid}");
        assert_eq!(status_field(pid, "Seccomp:"), ["2"], "pid {pid}");
        let procs = std::fs::read_to_string(cgroup_file(&vm.id, "memory", "cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "pid {pid} not in the vm's cgroup: {procs}"
        );
    }
    let memory = (u64::from(vm.memory_mib) + OVERHEAD_MIB) << 20;
    let v2 = !Path::new("/sys/fs/cgroup/memory").join(CGROUP).is_dir();
    let read = |controller: &str, file: &str| {
        std::fs::read_to_string(cgroup_file(&vm.id, controller, file))
            .unwrap()
            .trim()
            .to_owned()
    };
    if v2 {
        assert_eq!(read("memory", "memory.max"), memory.to_string());
        assert_eq!(
            read("cpu", "cpu.max"),
            format!("{} 100000", vm.vcpus * 100_000)
        );
    } else {
        assert_eq!(read("memory", "memory.limit_in_bytes"), memory.to_string());
        assert_eq!(
            read("cpu", "cpu.cfs_quota_us"),
            (vm.vcpus * 100_000).to_string()
        );
    }
    assert_eq!(read("pids", "pids.max"), "512");

    // A boot that refills the warm pool runs at a quarter of the normal CPU weight, and is
    // back at the normal one before it can be leased: the leased VM was such a boot, and the
    // refill it started is one now.
    let (weight_file, normal) = if v2 {
        ("cpu.weight", 100)
    } else {
        ("cpu.shares", 1024)
    };
    assert_eq!(read("cpu", weight_file), normal.to_string(), "leased vm");
    let weight = |id: &str| {
        std::fs::read_to_string(cgroup_file(id, "cpu", weight_file))
            .map(|w| w.trim().to_owned())
            .unwrap_or_default()
    };
    let quarter = (normal / 4).to_string();
    let mut refill = String::new();
    eventually!(
        match common::list(&mut c)
            .await
            .into_iter()
            .find(|v| v.state == VmState::Booting as i32 && weight(&v.id) == quarter)
        {
            Some(booting) => {
                refill = booting.id;
                true
            }
            None => false,
        },
        60
    );
    wait_warm(&mut c, 1).await;
    assert_eq!(weight(&refill), normal.to_string(), "the refill, now warm");

    // A guest that writes until its disk is full: ENOSPC in the guest, a bounded overlay on
    // the host.
    let vm_dir = pool.vms_dir().join(&vm.id);
    let (code, out) = shell(
        &vm_dir.join("vsock.sock"),
        "dd if=/dev/zero of=/root/fill bs=1M 2>&1; echo dd=$?; rm -f /root/fill; sync",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("No space left on device") && out.contains("dd=1"),
        "the guest's dd must end with ENOSPC: {out}"
    );
    let base = std::fs::metadata(common::image_dir().join("rootfs.ext4"))
        .unwrap()
        .len();
    let overlay = std::fs::metadata(vm_dir.join("overlay.qcow2")).unwrap();
    let on_disk = std::os::unix::fs::MetadataExt::blocks(&overlay) * 512;
    eprintln!(
        "overlay after a full disk: {} MiB allocated, {} MiB long; base {} MiB",
        on_disk >> 20,
        overlay.len() >> 20,
        base >> 20
    );
    // The virtual size is the base's; qcow2 metadata adds well under 64 MiB to it.
    assert!(
        on_disk < base + (64 << 20) && overlay.len() < base + (64 << 20),
        "overlay {on_disk} / {} bytes vs base {base}",
        overlay.len()
    );
    assert!(
        on_disk > 1 << 30,
        "the guest did write its free space: {on_disk}"
    );

    // The cgroup goes with the VM.
    c.release_vm(ReleaseVmRequest {
        vm_id: vm.id.clone(),
    })
    .await
    .unwrap();
    eventually!(!vm_cgroups_exist(&vm.id), 30);

    // A crashed pool leaves its VMMs and cgroups; the next one reaps both.
    wait_warm(&mut c, 1).await;
    let warm = common::warm_vms(&mut c).await.remove(0);
    assert!(vm_cgroups_exist(&warm.id));
    let orphans = pool.vm_processes();
    pool.crash().await;
    assert!(
        orphans.iter().all(|&p| pid_alive(p)),
        "orphaned, not killed"
    );
    pool.restart(&["--warm", "0", "--vm-cgroup", CGROUP]).await;
    eventually!(orphans.iter().all(|&p| !pid_alive(p)), 30);
    eventually!(!vm_cgroups_exist(&warm.id), 30);
    assert!(pool.vm_processes().is_empty());
}
