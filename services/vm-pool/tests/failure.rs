//! A VMM killed from outside (`kill -9`) is noticed within 2 s: WatchVm streams FAILED
//! with the reason, GetVm shows it, and the pool boots a replacement warm VM. A cold boot
//! whose VMM dies is retried once with a fresh VM; a second death fails the AcquireVm.

mod common;

use std::time::Duration;

use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use capsa_proto::vmpool::v1::{
    AcquireVmRequest, GetVmRequest, ReleaseVmRequest, Vm, VmState, WatchVmRequest,
};
use common::{PoolUnderTest, pid_alive, wait_warm};
use tonic::transport::Channel;

/// Kills `vm`'s VMM and returns the FAILED state WatchVm streamed within 2 s.
async fn kill_and_watch(c: &mut VmPoolServiceClient<Channel>, vm: &Vm) -> Vm {
    let mut watch = c
        .watch_vm(WatchVmRequest {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let now = watch.message().await.unwrap().unwrap().vm.unwrap();
    assert_ne!(now.state, VmState::Failed as i32);
    // SAFETY: kill(2) on a VMM of the pool this test started.
    unsafe { libc::kill(vm.vmm_pid as i32, libc::SIGKILL) };
    tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let next = watch
                .message()
                .await
                .unwrap()
                .expect("stream open until FAILED")
                .vm
                .unwrap();
            if next.state == VmState::Failed as i32 {
                return next;
            }
        }
    })
    .await
    .expect("FAILED must be streamed within 2 s of the kill")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vmm_fails_the_vm_at_once_and_the_pool_refills() {
    let pool = PoolUnderTest::start(&["--warm", "1", "--capacity", "3"]).await;
    let mut c = pool.client().await;

    // A warm VM dies: FAILED with the reason, and a new warm VM replaces it.
    wait_warm(&mut c, 1).await;
    let a = common::warm_vms(&mut c).await.remove(0);
    let failed = kill_and_watch(&mut c, &a).await;
    assert!(failed.failure.contains("signal 9"), "{}", failed.failure);
    let shown = c
        .get_vm(GetVmRequest {
            vm_id: a.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(shown.state, VmState::Failed as i32);
    capsa_test_support::eventually!(!pool.vms_dir().join(&a.id).exists(), 10);
    wait_warm(&mut c, 1).await;
    let b = common::warm_vms(&mut c).await.remove(0);
    assert_ne!(a.id, b.id);
    // Nothing of A is left; only B's VMM runs.
    assert!(!pid_alive(a.vmm_pid));
    capsa_test_support::eventually!(pool.vm_processes().len() == 1, 10);

    // A leased VM dies: its lease sees FAILED until it releases it.
    let leased = c
        .acquire_vm(AcquireVmRequest {
            lease_id: "doomed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(leased.id, b.id);
    let failed = kill_and_watch(&mut c, &leased).await;
    assert_eq!(failed.lease_id, "doomed");
    let retry = c
        .acquire_vm(AcquireVmRequest {
            lease_id: "doomed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(
        (retry.id.as_str(), retry.state),
        (b.id.as_str(), VmState::Failed as i32)
    );
    assert!(
        c.release_vm(ReleaseVmRequest {
            vm_id: b.id.clone()
        })
        .await
        .unwrap()
        .into_inner()
        .released
    );
    wait_warm(&mut c, 1).await;
}

/// Waits for the VMM of the cold boot for `lease_id` that is not in `seen`, then kills it.
async fn kill_booting_vmm(
    c: &mut VmPoolServiceClient<Channel>,
    lease_id: &str,
    seen: &[String],
) -> String {
    let mut booting;
    capsa_test_support::eventually!(
        {
            booting = common::list(c).await.into_iter().find(|vm| {
                vm.lease_id == lease_id
                    && vm.state == VmState::Booting as i32
                    && vm.vmm_pid != 0
                    && !seen.contains(&vm.id)
            });
            booting.is_some()
        },
        60
    );
    let vm = booting.expect("found above");
    // SAFETY: kill(2) on a VMM of the pool this test started.
    unsafe { libc::kill(vm.vmm_pid as i32, libc::SIGKILL) };
    vm.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_boot_that_dies_is_retried_once_then_reported() {
    // Failed records outlive the checks below (a boot or two) by far, and still go away
    // within the test.
    let pool = PoolUnderTest::start(&[
        "--warm",
        "0",
        "--capacity",
        "3",
        "--failed-vm-retention-secs",
        "30",
    ])
    .await;
    let mut c = pool.client().await;
    let acquirer = c.clone();
    let acquire = |lease_id: &'static str| {
        let mut c = acquirer.clone();
        tokio::spawn(async move {
            c.acquire_vm(AcquireVmRequest {
                lease_id: lease_id.into(),
                ..Default::default()
            })
            .await
        })
    };

    // One death: the lease gets a second, healthy VM; the first is listed FAILED.
    let pending = acquire("retried");
    let first = kill_booting_vmm(&mut c, "retried", &[]).await;
    let vm = pending
        .await
        .unwrap()
        .expect("the retry boots")
        .into_inner()
        .vm
        .unwrap();
    assert_ne!(vm.id, first);
    assert_eq!(
        (vm.state, vm.lease_id.as_str()),
        (VmState::Leased as i32, "retried")
    );
    let dead = c
        .get_vm(GetVmRequest {
            vm_id: first.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(dead.state, VmState::Failed as i32);
    assert!(dead.failure.contains("signal 9"), "{}", dead.failure);

    // Two deaths in a row: UNAVAILABLE naming both, and nothing is left running for it.
    let pending = acquire("doomed");
    let a = kill_booting_vmm(&mut c, "doomed", &[]).await;
    let b = kill_booting_vmm(&mut c, "doomed", std::slice::from_ref(&a)).await;
    let err = pending
        .await
        .unwrap()
        .expect_err("two failed boots fail the acquire");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("two boots failed")
            && err.message().contains(&a)
            && err.message().contains(&b),
        "{}",
        err.message()
    );
    // Only the retried lease's VM is running.
    capsa_test_support::eventually!(pool.vm_processes().len() == 1, 10);
    assert!(
        c.release_vm(ReleaseVmRequest { vm_id: vm.id })
            .await
            .unwrap()
            .into_inner()
            .released
    );
    // Nobody holds the failed boots' ids, so nobody releases them: the pool forgets them.
    for dead in [&first, &a, &b] {
        capsa_test_support::eventually!(
            c.get_vm(GetVmRequest {
                vm_id: dead.clone()
            })
            .await
            .is_err_and(|e| e.code() == tonic::Code::NotFound),
            120
        );
    }
}
