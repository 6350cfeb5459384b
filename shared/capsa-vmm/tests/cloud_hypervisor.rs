//! The Cloud Hypervisor driver against a real `cloud-hypervisor` binary. Runs only when
//! `CAPSA_CLOUD_HYPERVISOR` names one (and KVM works); otherwise it says so and returns:
//! this is the one skip the suite allows. The REST conversation itself is tested without
//! the binary in the crate's unit tests.

use std::path::PathBuf;
use std::time::Duration;

use capsa_vmm::{
    CloudHypervisor, CloudHypervisorConfig, EngineKind, GuestImage, Hypervisor, VmSpec,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_pauses_snapshots_and_destroys() {
    let Some(binary) = std::env::var_os("CAPSA_CLOUD_HYPERVISOR").map(PathBuf::from) else {
        println!("skipped: CAPSA_CLOUD_HYPERVISOR not set");
        return;
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
        kernel_override: None,
        die_with_parent: true,
    });
    let state = tempfile::tempdir().unwrap();
    let kind = EngineKind::CloudHypervisor;
    let spec = VmSpec {
        id: "vm-chtest".into(),
        vcpus: 1,
        memory_mib: 512,
        kernel: image.kernel_for(kind).to_owned(),
        cmdline: image.cmdline_for(kind),
        rootfs_base: Some(image.rootfs.clone()),
        initrd: None,
        dir: state.path().join("vms/vm-chtest"),
    };
    let vm = ch.boot(&spec).await.unwrap();
    capsa_vsock::wait_for_port(
        &vm.vsock_path(),
        capsa_vsock::AGENT_PORT,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
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
