//! `--warm-from-snapshot` on real VMs: vm-pool saves one freshly booted VM as the template's
//! base snapshot, then refills the warm pool by restoring it. Restored warm VMs share the
//! base's kernel boot (its boot_id) yet each has an identity of its own (machine-id,
//! address); the base is the node's own (not listed, its id refused to callers), is kept
//! and used again after a restart, and is deleted by a start without the option.
//! Needs root.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use capsa_proto::vmpool::v1::{
    AcquireVmRequest, GetSnapshotRequest, ListSnapshotsRequest, ReleaseVmRequest, Vm,
};
use capsa_test_support::eventually;
use common::{PoolUnderTest, acquire, shell, wait_warm};
use tonic::transport::Channel;

type Client = VmPoolServiceClient<Channel>;

/// Under TCG a cold boot takes tens of seconds and two run at once.
const BASE_WAIT_SECS: u64 = 600;

/// The complete base snapshots in the pool's state dir (a `.tmp-` dir is one being written).
fn bases(pool: &PoolUnderTest) -> Vec<PathBuf> {
    let dir = pool.state.path().join("snapshots");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pool-base-"))
                && p.join("capsa.json").exists()
        })
        .collect();
    found.sort();
    found
}

async fn release(c: &mut Client, vm: &Vm) {
    c.release_vm(ReleaseVmRequest {
        vm_id: vm.id.clone(),
    })
    .await
    .unwrap();
}

/// What tells guests apart: (kernel boot id, machine-id, eth0's address).
async fn identity(pool: &PoolUnderTest, vm: &Vm) -> (String, String, String) {
    let vsock = pool.vms_dir().join(&vm.id).join("vsock.sock");
    let (rc, out) = shell(
        &vsock,
        "cat /proc/sys/kernel/random/boot_id /etc/machine-id; ip -4 -o addr show eth0 | awk '{print $4}'",
    )
    .await;
    assert_eq!(rc, 0, "{out}");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 3, "{out}");
    (lines[0].into(), lines[1].into(), lines[2].into())
}

/// Leases a warm VM; a cold boot fails the test.
async fn warm_hit(c: &mut Client, lease: &str) -> Vm {
    let resp = c
        .acquire_vm(AcquireVmRequest {
            lease_id: lease.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.warm_hit, "{resp:?}");
    resp.vm.unwrap()
}

async fn stop(pool: &mut PoolUnderTest) {
    let process = pool.process.take().expect("running");
    let status = process.terminate(Duration::from_secs(120)).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_vms_are_restored_from_a_kept_base_snapshot_each_with_its_own_identity() {
    let with_option = ["--warm", "2", "--warm-from-snapshot"];
    let mut pool = PoolUnderTest::start(&with_option).await;
    let mut c = pool.client().await;

    // The base is made beside the first warm VMs (which cold-boot meanwhile).
    eventually!(bases(&pool).len() == 1, BASE_WAIT_SECS);
    let base = bases(&pool).remove(0);
    let base_id = base.file_name().unwrap().to_str().unwrap().to_owned();
    wait_warm(&mut c, 2).await;
    // Leasing the cold-booted ones makes the pool refill, by restore now.
    let first = [
        acquire(&mut c, "first-1", None).await,
        acquire(&mut c, "first-2", None).await,
    ];
    let cold_boot_ids = [
        identity(&pool, &first[0]).await.0,
        identity(&pool, &first[1]).await.0,
    ];
    for vm in &first {
        release(&mut c, vm).await;
    }
    wait_warm(&mut c, 2).await;
    let restored = [
        warm_hit(&mut c, "restored-1").await,
        warm_hit(&mut c, "restored-2").await,
    ];
    let a = identity(&pool, &restored[0]).await;
    let b = identity(&pool, &restored[1]).await;
    // One kernel boot (the base's), not a cold boot of their own...
    assert_eq!(a.0, b.0, "{a:?} {b:?}");
    assert!(!cold_boot_ids.contains(&a.0), "{a:?} {cold_boot_ids:?}");
    // ...with identities of their own.
    assert_ne!(a.1, b.1, "machine-id: {a:?} {b:?}");
    assert_eq!(a.1.len(), 32, "{a:?}");
    assert_ne!(a.2, b.2, "address: {a:?} {b:?}");

    // The node's own: not listed, and its id refused to callers.
    let listed = c
        .list_snapshots(ListSnapshotsRequest {})
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert!(
        listed.iter().all(|s| !s.id.starts_with("pool-base-")),
        "{listed:?}"
    );
    let refused = c
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: base_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("reserved"), "{refused:?}");
    for vm in &restored {
        release(&mut c, vm).await;
    }

    // Kept across a restart, and restored at once: the new warm VMs share its boot.
    let saved_at = std::fs::metadata(base.join("capsa.json"))
        .unwrap()
        .modified()
        .unwrap();
    stop(&mut pool).await;
    pool.restart(&with_option).await;
    let mut c = pool.client().await;
    wait_warm(&mut c, 2).await;
    let again = warm_hit(&mut c, "after-restart").await;
    assert_eq!(
        identity(&pool, &again).await.0,
        a.0,
        "restored from the kept base"
    );
    assert_eq!(bases(&pool), vec![base.clone()]);
    assert_eq!(
        std::fs::metadata(base.join("capsa.json"))
            .unwrap()
            .modified()
            .unwrap(),
        saved_at,
        "the same base, not a new one"
    );
    release(&mut c, &again).await;

    // A start without the option deletes it.
    stop(&mut pool).await;
    pool.restart(&["--warm", "0"]).await;
    eventually!(!Path::new(&base).exists(), 60);
    stop(&mut pool).await;
}
