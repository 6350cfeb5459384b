//! The Cloud Hypervisor driver against a real `cloud-hypervisor` binary. Runs only when
//! `CAPSA_CLOUD_HYPERVISOR` names one (and KVM works); otherwise each test says so and
//! returns: this is the one skip the suite allows. The REST conversation itself is tested
//! without the binary in the crate's unit tests.
//!
//! Three tests, so a host that runs some of it shows which part works: the first needs only
//! the VMM (version check, create, config read-back, boot, counters, pause, resume,
//! shutdown); the second the VMM's snapshot and restore, whatever the guest does; the third
//! a guest that boots (agent on vsock, disk reads, snapshot, restore, agent again). On a PVM
//! host (`kvm_pvm`) set `CAPSA_PVM_GUEST_KERNEL` to a PVM guest kernel, as vm-pool's
//! `--pvm-guest-kernel`; without one the guest does not start there.

use std::path::PathBuf;
use std::time::Duration;

use capsa_vmm::{
    CloudHypervisor, CloudHypervisorConfig, EngineKind, GuestImage, Hypervisor, VmSpec, layout,
};
use serde_json::{Value, json};

/// The driver and a spec for the built guest image, or `None` (printed) without a binary.
fn setup(id: &str, state: &std::path::Path) -> Option<(CloudHypervisor, VmSpec)> {
    let Some(binary) = std::env::var_os("CAPSA_CLOUD_HYPERVISOR").map(PathBuf::from) else {
        println!("skipped: CAPSA_CLOUD_HYPERVISOR not set");
        return None;
    };
    let image_dir = std::env::var_os("CAPSA_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache =
                std::env::var_os("CAPSA_CACHE_DIR").unwrap_or_else(|| "/var/cache/capsa".into());
            PathBuf::from(cache).join("images/current")
        });
    let image = GuestImage::load(&image_dir).expect("guest image (CAPSA_IMAGE_DIR)");
    let ch = CloudHypervisor::new(CloudHypervisorConfig {
        binary,
        qemu_img: "qemu-img".into(),
        kernel_override: std::env::var_os("CAPSA_PVM_GUEST_KERNEL").map(PathBuf::from),
        die_with_parent: true,
        sandbox: None,
        merge_pages: false,
    });
    let kind = EngineKind::CloudHypervisor;
    let spec = VmSpec {
        id: id.into(),
        vcpus: 1,
        memory_mib: 512,
        kernel: image.kernel_for(kind).to_owned(),
        cmdline: image.cmdline_for(kind),
        rootfs_base: Some(image.rootfs.clone()),
        initrd: None,
        dir: state.join("vms").join(id),
        net: None,
    };
    Some((ch, spec))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vmm_is_checked_created_booted_paused_resumed_and_shut_down() {
    let state = tempfile::tempdir().unwrap();
    let Some((ch, spec)) = setup("vm-chapi", state.path()) else {
        return;
    };
    // vmm.ping (version check), vm.create, vm.info (config kept), vm.boot.
    let vm = ch.boot(&spec).await.unwrap();
    println!("booted: vmm pid {}", vm.vmm_pid());
    let c = vm.counters().await.unwrap();
    println!("counters: {c:?}");
    assert!(
        c.cpu_time > Duration::ZERO && c.vmm_resident_bytes > 0,
        "{c:?}"
    );
    vm.pause().await.unwrap();
    vm.resume().await.unwrap();
    println!("paused and resumed");
    assert_eq!(vm.exit(), None, "the vmm still runs");
    vm.destroy().await.unwrap();
    assert!(!spec.dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vmm_snapshots_and_restores_keeping_its_config() {
    let state = tempfile::tempdir().unwrap();
    let Some((ch, spec)) = setup("vm-chsnap", state.path()) else {
        return;
    };
    let vm = ch.boot(&spec).await.unwrap();
    vm.pause().await.unwrap();
    let snap = state.path().join("snap");
    vm.snapshot(&snap).await.unwrap();
    println!("snapshotted");
    vm.destroy().await.unwrap();
    let read =
        |p: PathBuf| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let written = read(snap.join("config.json"));
    assert_eq!(written["disks"][0]["image_type"], "Qcow2", "{written}");
    assert_eq!(written["disks"][0]["backing_files"], true, "{written}");

    let restored_spec = VmSpec {
        id: "vm-chsnaprestored".into(),
        dir: state.path().join("vms/vm-chsnaprestored"),
        net: None,
        ..spec
    };
    let restored = ch.restore(&restored_spec, &snap).await.unwrap();
    println!("restored");
    // Everything the VMM wrote went back to it; only the disk and vsock paths moved.
    let mut expected = written;
    expected["disks"][0]["path"] = json!(restored_spec.dir.join("overlay.qcow2"));
    expected["vsock"]["socket"] = json!(restored_spec.vsock_path());
    assert_eq!(
        read(restored_spec.dir.join("snapshot/config.json")),
        expected
    );
    restored.counters().await.unwrap();
    assert_eq!(restored.exit(), None, "the restored vmm runs");
    restored.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_boots_is_snapshotted_and_restored() {
    let state = tempfile::tempdir().unwrap();
    let Some((ch, spec)) = setup("vm-chtest", state.path()) else {
        return;
    };
    let vm = ch.boot(&spec).await.unwrap();
    // The agent answers, or the VMM's exit says at once why it never will.
    let vsock = vm.vsock_path();
    let up = tokio::select! {
        up = capsa_vsock::wait_for_port(
            &vsock,
            capsa_vsock::AGENT_PORT,
            Duration::from_secs(60),
        ) => up.map(drop).map_err(|e| e.to_string()),
        exit = vm.wait() => Err(format!("the vmm exited: {}", exit.description)),
    };
    if let Err(why) = up {
        let console = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
        let vmm_log = std::fs::read_to_string(vm.dir().join(layout::VMM_LOG)).unwrap_or_default();
        let vmm_log: Vec<&str> = vmm_log.lines().take(8).collect();
        panic!(
            "the guest agent never answered ({why})\nvmm log:\n{}\nguest console:\n{console}",
            vmm_log.join("\n")
        );
    }
    let c = vm.counters().await.unwrap();
    assert!(
        c.cpu_time > Duration::ZERO && c.disk_read_bytes > 0,
        "{c:?}"
    );
    vm.pause().await.unwrap();
    let snap = state.path().join("snap");
    vm.snapshot(&snap).await.unwrap();
    assert!(snap.join("config.json").is_file());
    vm.resume().await.unwrap();
    vm.destroy().await.unwrap();
    assert!(!spec.dir.exists());

    let restored_spec = VmSpec {
        id: "vm-chrestored".into(),
        dir: state.path().join("vms/vm-chrestored"),
        net: None,
        ..spec
    };
    let restored = ch.restore(&restored_spec, &snap).await.unwrap();
    capsa_vsock::wait_for_port(
        &restored.vsock_path(),
        capsa_vsock::AGENT_PORT,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    restored.destroy().await.unwrap();
}
