//! Cold boots on real VMs: a shape other than the template's boots cold; concurrent
//! retries of one lease during that cold boot get the same VM; a full node evicts a warm VM
//! to make room, and refuses with RESOURCE_EXHAUSTED when every VM is leased; a node out of
//! memory refuses naming memory.

mod common;

use capsa_proto::vmpool::v1::{AcquireVmRequest, ReleaseVmRequest, VmState};
use common::{PoolUnderTest, wait_warm};

fn lease(id: &str, memory_mib: u32) -> AcquireVmRequest {
    AcquireVmRequest {
        lease_id: id.into(),
        memory_mib,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_boots_idempotent_leases_eviction_and_capacity() {
    let pool = PoolUnderTest::start(&["--warm", "1", "--capacity", "2"]).await;
    let mut c = pool.client().await;
    wait_warm(&mut c, 1).await;
    let warm = common::warm_vms(&mut c).await.remove(0);

    // Another shape: a cold boot, asked for twice at once under one lease.
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (a, b) = tokio::join!(
        c1.acquire_vm(lease("cold", 256)),
        c2.acquire_vm(lease("cold", 256))
    );
    let (a, b) = (a.unwrap().into_inner(), b.unwrap().into_inner());
    let cold = a.vm.unwrap();
    assert_eq!(cold.id, b.vm.unwrap().id, "one lease, one VM");
    assert!(!a.warm_hit);
    assert_eq!((cold.memory_mib, cold.state), (256, VmState::Leased as i32));
    assert_ne!(cold.id, warm.id);

    // Full (warm + cold): a third shape evicts the warm VM rather than fail.
    let other = c
        .acquire_vm(lease("evicting", 384))
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(other.memory_mib, 384);
    let ids: Vec<String> = common::list(&mut c)
        .await
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert!(!ids.contains(&warm.id), "the warm VM was evicted: {ids:?}");

    // Every VM leased and nothing to evict: refused, not queued.
    let err = c.acquire_vm(lease("no-room", 0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");

    // Room again: the pool refills its warm VM.
    for vm in [cold, other] {
        assert!(
            c.release_vm(ReleaseVmRequest { vm_id: vm.id })
                .await
                .unwrap()
                .into_inner()
                .released
        );
    }
    wait_warm(&mut c, 1).await;
    capsa_test_support::eventually!(pool.vm_processes().len() == 1, 30);
}

/// Capacity is memory (guest RAM + the VMM's overhead each) as well as VM slots: with room
/// for one 512 MiB VM, a second lease is refused naming memory, with slots to spare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_beyond_memory_capacity_are_refused_naming_memory() {
    let pool = PoolUnderTest::start(&[
        "--warm",
        "0",
        "--capacity",
        "16",
        "--capacity-memory-mib",
        "1200",
        "--vmm-memory-overhead-mib",
        "320",
    ])
    .await;
    let mut c = pool.client().await;
    let first = c
        .acquire_vm(lease("first", 512))
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    let err = c.acquire_vm(lease("second", 512)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("memory") && err.message().contains("832 of 1200 MiB"),
        "{}",
        err.message()
    );
    c.release_vm(ReleaseVmRequest { vm_id: first.id })
        .await
        .unwrap();
    capsa_test_support::eventually!(pool.vm_processes().is_empty(), 30);
}
