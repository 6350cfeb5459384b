//! 20 acquire/release cycles on real VMs, some concurrent with each other, leave no
//! process, file or socket behind, and no VM is ever handed to two leases.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use capsa_proto::vmpool::v1::{AcquireVmRequest, ReleaseVmRequest, VmState};
use common::{PoolUnderTest, wait_warm};

const CYCLES: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_cycles_leak_nothing() {
    let mut pool = PoolUnderTest::start(&["--warm", "2", "--capacity", "4"]).await;
    let mut c = pool.client().await;
    wait_warm(&mut c, 1).await;

    let mut seen = HashSet::new();
    let mut warm_hits = 0;
    // Pairs of concurrent acquires: the two never get the same VM.
    for round in 0..CYCLES / 2 {
        let (mut c1, mut c2) = (c.clone(), c.clone());
        let lease = |n: usize| AcquireVmRequest {
            lease_id: format!("cycle-{round}-{n}"),
            ..Default::default()
        };
        let (a, b) = tokio::join!(c1.acquire_vm(lease(0)), c2.acquire_vm(lease(1)));
        let (a, b) = (a.unwrap().into_inner(), b.unwrap().into_inner());
        warm_hits += usize::from(a.warm_hit) + usize::from(b.warm_hit);
        let (a, b) = (a.vm.unwrap(), b.vm.unwrap());
        assert_ne!(a.id, b.id, "one VM handed to two leases");
        for vm in [&a, &b] {
            assert_eq!(vm.state, VmState::Leased as i32);
            assert!(
                seen.insert(vm.id.clone()),
                "VM {} leased twice across cycles",
                vm.id
            );
        }
        for vm in [a, b] {
            let r = c
                .release_vm(ReleaseVmRequest { vm_id: vm.id })
                .await
                .unwrap()
                .into_inner();
            assert!(r.released);
        }
    }
    assert_eq!(seen.len(), CYCLES);
    assert!(warm_hits > 0, "the warm pool served at least some acquires");

    // Only the warm pool's VMs remain: two processes and one dir each, nothing else. A boot
    // that failed under load (and was retried) may still be listed FAILED for a while,
    // with nothing of it left on the host.
    wait_warm(&mut c, 2).await;
    let listed = common::list(&mut c).await;
    let (vms, failed): (Vec<_>, Vec<_>) = listed
        .into_iter()
        .partition(|v| v.state == VmState::Warm as i32);
    assert!(
        failed.iter().all(|v| v.state == VmState::Failed as i32),
        "{failed:?}"
    );
    assert_eq!(vms.len(), 2);
    assert_eq!(pool.vm_processes().len(), 2);
    let mut dirs: Vec<String> = std::fs::read_dir(pool.vms_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    let mut ids: Vec<String> = vms.iter().map(|v| v.id.clone()).collect();
    ids.sort();
    assert_eq!(dirs, ids, "a dir for each live VM and nothing else");

    let process = pool.process.take().unwrap();
    let status = process.terminate(Duration::from_secs(60)).await;
    assert!(status.success(), "vm-pool exits 0 on SIGTERM: {status}");
    assert!(pool.vm_processes().is_empty());
    assert_eq!(std::fs::read_dir(pool.vms_dir()).unwrap().count(), 0);
}
