//! The lease life cycle on real VMs: the pool warms up (agent healthy over vsock), hands a
//! warm VM to a lease, answers retries of that lease with the same VM, reports counters
//! (and the counters at lease time, which metering leaves out of the lease's usage)
//! and node info, streams state changes, destroys on release; bad requests are refused
//! with the field named; the node registers in Redis and a graceful shutdown removes the
//! record and every VM.

mod common;

use std::time::Duration;

use capsa_proto::vmpool::v1::{
    AcquireVmRequest, GetNodeInfoRequest, GetVmCountersRequest, GetVmRequest, ReleaseVmRequest,
    VmState, WatchVmRequest,
};
use capsa_store::NodeRegistry;
use capsa_test_support::{RedisServer, eventually};
use common::{PoolUnderTest, pid_alive, wait_warm};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn acquire(lease: &str) -> AcquireVmRequest {
    AcquireVmRequest {
        lease_id: lease.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_lease_retry_counters_watch_release_and_graceful_shutdown() {
    let redis = RedisServer::start();
    let mut pool = PoolUnderTest::start(&[
        "--warm",
        "1",
        "--capacity",
        "3",
        "--redis-url",
        &redis.url(),
        "--node-id",
        "node-a",
        "--executor-url",
        "http://127.0.0.1:1",
    ])
    .await;
    let mut c = pool.client().await;

    // Registered at once, with its engine and URLs.
    let registry = NodeRegistry::new(capsa_store::connect(&redis.url()).await.unwrap());
    // vm-pool prints its address before it finishes starting: the record follows shortly.
    eventually!(registry.get("node-a").await.unwrap().is_some(), 30);
    let rec = registry.get("node-a").await.unwrap().expect("node record");
    assert_eq!(rec.vmpool_url, pool.process().url());
    assert_eq!(rec.executor_url, "http://127.0.0.1:1");
    assert_eq!(rec.capacity, 3);

    wait_warm(&mut c, 1).await;
    let info = c
        .get_node_info(GetNodeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-a");
    assert!(
        !info.engine.is_empty() && !info.engine_reason.is_empty(),
        "{info:?}"
    );
    assert_eq!(
        (info.pools[0].template.as_str(), info.pools[0].target),
        ("default", 1)
    );
    eventually!(
        registry
            .get("node-a")
            .await
            .unwrap()
            .is_some_and(|r| r.warm == 1),
        10
    );

    // Warm means the agent answers its health check over the VM's hybrid vsock socket.
    let warm = common::warm_vms(&mut c).await;
    assert_eq!(warm.len(), 1);
    let vsock = capsa_vsock::vm_socket_path(pool.state.path(), &warm[0].id).unwrap();
    let mut health = HealthClient::new(capsa_vsock::channel(vsock, capsa_vsock::AGENT_PORT));
    let h = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, ServingStatus::Serving as i32);

    // The warm VM goes to the lease; a retry of the same lease gets the same VM.
    let got = c.acquire_vm(acquire("lease-1")).await.unwrap().into_inner();
    let vm = got.vm.unwrap();
    assert!(got.warm_hit);
    assert_eq!(vm.id, warm[0].id);
    assert_eq!(vm.state, VmState::Leased as i32);
    assert_eq!(vm.lease_id, "lease-1");
    assert!(vm.vmm_pid > 0 && pid_alive(vm.vmm_pid));
    assert!(vm.boot_duration.is_some() && vm.lease_time.is_some());
    let again = c.acquire_vm(acquire("lease-1")).await.unwrap().into_inner();
    assert_eq!(again.vm.unwrap().id, vm.id);
    eventually!(
        registry
            .get("node-a")
            .await
            .unwrap()
            .is_some_and(|r| r.leased == 1),
        10
    );

    let counters = c
        .get_vm_counters(GetVmCountersRequest {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let cpu = capsa_proto::time::from_duration(&counters.cpu_time.unwrap()).unwrap();
    assert!(
        cpu > Duration::ZERO && counters.vmm_resident_bytes > 0 && counters.disk_read_bytes > 0,
        "{counters:?}"
    );
    // What booting and waiting warm cost, for metering to leave out of the lease's usage.
    let at_lease = counters
        .at_lease
        .expect("a leased vm reports counters at lease");
    let boot_cpu = capsa_proto::time::from_duration(&at_lease.cpu_time.unwrap()).unwrap();
    assert!(boot_cpu > Duration::ZERO && boot_cpu <= cpu, "{counters:?}");
    assert!(
        at_lease.disk_read_bytes > 0 && at_lease.disk_read_bytes <= counters.disk_read_bytes,
        "the guest read its root fs while booting: {counters:?}"
    );

    // Bad requests name the field.
    for (req, field) in [
        (acquire(""), "lease_id"),
        (
            AcquireVmRequest {
                template: "nope".into(),
                ..acquire("l2")
            },
            "template",
        ),
        (
            AcquireVmRequest {
                vcpus: 1000,
                ..acquire("l2")
            },
            "vcpus",
        ),
        (
            AcquireVmRequest {
                memory_mib: 1,
                ..acquire("l2")
            },
            "memory_mib",
        ),
    ] {
        let err = c.acquire_vm(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let err = c
        .release_vm(ReleaseVmRequest {
            vm_id: "../etc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("vm_id"));
    let err = c
        .get_vm(GetVmRequest {
            vm_id: "vm-0000000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // WatchVm: the current state, then DESTROYED on release, then the end.
    let mut watch = c
        .watch_vm(WatchVmRequest {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().vm.unwrap();
    assert_eq!(first.state, VmState::Leased as i32);
    // Metering reads counters while VMs go: a read that meets the release (the VMM's
    // control socket closing under it) is the VM's state, never an INTERNAL of the node.
    let reader = tokio::spawn({
        let (mut c, vm_id) = (c.clone(), vm.id.clone());
        async move {
            loop {
                let read = c.get_vm_counters(GetVmCountersRequest {
                    vm_id: vm_id.clone(),
                });
                if let Err(status) = read.await {
                    return status;
                }
            }
        }
    });
    let released = c
        .release_vm(ReleaseVmRequest {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    let after_release = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("counters of a released vm still read after 30 s")
        .unwrap();
    assert!(
        matches!(
            after_release.code(),
            tonic::Code::NotFound | tonic::Code::FailedPrecondition
        ),
        "{after_release:?}"
    );
    let last = watch.message().await.unwrap().unwrap().vm.unwrap();
    assert_eq!(last.state, VmState::Destroyed as i32);
    assert!(
        watch.message().await.unwrap().is_none(),
        "stream ends after DESTROYED"
    );
    assert!(!pid_alive(vm.vmm_pid));
    assert!(
        !pool.vms_dir().join(&vm.id).exists(),
        "overlay, sockets and logs removed"
    );
    // Release is idempotent; the released lease cannot lease again.
    assert!(
        !c.release_vm(ReleaseVmRequest {
            vm_id: vm.id.clone()
        })
        .await
        .unwrap()
        .into_inner()
        .released
    );
    let err = c.acquire_vm(acquire("lease-1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // The pool refills; then a graceful shutdown destroys everything and deregisters.
    wait_warm(&mut c, 1).await;
    let refill = common::warm_vms(&mut c).await.remove(0);
    let unleased = c
        .get_vm_counters(GetVmCountersRequest { vm_id: refill.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unleased.at_lease, None, "a warm vm has no lease yet");
    let before = pool.vm_processes();
    assert!(!before.is_empty());
    let process = pool.process.take().unwrap();
    let status = process.terminate(Duration::from_secs(60)).await;
    assert!(status.success(), "vm-pool exits 0 on SIGTERM: {status}");
    assert!(
        pool.vm_processes().is_empty(),
        "every vm process is gone after shutdown"
    );
    assert_eq!(
        std::fs::read_dir(pool.vms_dir()).unwrap().count(),
        0,
        "every vm dir is gone"
    );
    assert!(
        registry.get("node-a").await.unwrap().is_none(),
        "node record removed"
    );
}
