//! Metering as a real process against a real Redis, with fake nodes (vm-pool and executor
//! doubles answering scripted counters): deltas into tenant totals, peak memory, two
//! replicas sampling concurrently, interim records, usage counted from the lease, and the
//! errors callers see.

mod common;

use std::time::Duration;

use capsa_proto::metering::v1::{
    FinalizeSessionRequest, GetSessionUsageRequest, GetTenantUsageRequest,
};
use capsa_test_support::eventually;
use common::{FakeNode, MIB, World, client, cpu_us, secs, session_cpu_us, tenant, vm};
use tonic::Code;

#[tokio::test]
async fn totals_grow_by_deltas_and_peak_memory_is_kept() {
    let world = World::start().await;
    let node = FakeNode::start("n1").await;
    world.register(&node).await;
    node.set_vm("vm-1", vm("s1", 1000, Some(100 * MIB)));
    node.set_vm("vm-2", vm("s2", 2000, Some(50 * MIB)));
    node.set_vm("vm-3", vm("s3", 7000, Some(10 * MIB)));
    node.update("vm-1", |v| {
        v.disk_write_bytes = 1000;
        v.network_rx_bytes = 10;
    });
    world.session("s1", "t1", Some((&node, "vm-1"))).await;
    world.session("s2", "t1", Some((&node, "vm-2"))).await;
    world.session("s3", "t2", Some((&node, "vm-3"))).await;
    let metering = world.metering(&["--sample-interval", "50ms"]).await;
    let mut c = client(&metering).await;

    eventually!(cpu_us(&tenant(&mut c, "t1").await.cpu_time) == 3_000_000);
    let s1 = c
        .get_session_usage(GetSessionUsageRequest {
            session_id: "s1".into(),
        })
        .await
        .unwrap();
    let s1 = s1.into_inner();
    assert_eq!(s1.tenant_id, "t1");
    let u = s1.usage.unwrap();
    assert_eq!(cpu_us(&u.cpu_time), 1_000_000);
    assert_eq!(u.disk_write_bytes, 1000);
    assert_eq!(u.network_rx_bytes, 10);
    assert_eq!(u.memory_used_bytes, 100 * MIB);
    assert_eq!(u.vmm_resident_bytes, 512 * MIB);
    assert!(
        secs(&u.uptime) >= 10.0,
        "uptime counts from the lease: {:?}",
        u.uptime
    );
    assert!(u.sample_time.is_some());

    // Counters grow: the tenant grows by exactly the difference.
    node.update("vm-1", |v| {
        v.cpu = Duration::from_millis(4000);
        v.memory_used_bytes = Some(300 * MIB);
        v.disk_write_bytes = 5000;
    });
    eventually!(cpu_us(&tenant(&mut c, "t1").await.cpu_time) == 6_000_000);
    eventually!(tenant(&mut c, "t1").await.memory_used_bytes == 350 * MIB);
    let t1 = tenant(&mut c, "t1").await;
    assert_eq!(t1.disk_write_bytes, 5000);
    assert_eq!(t1.vmm_resident_bytes, 1024 * MIB);
    assert_eq!(t1.memory_peak_bytes, 350 * MIB);

    // Memory falls: used follows, peaks stay.
    node.update("vm-1", |v| v.memory_used_bytes = Some(20 * MIB));
    eventually!(tenant(&mut c, "t1").await.memory_used_bytes == 70 * MIB);
    let u = c
        .get_session_usage(GetSessionUsageRequest {
            session_id: "s1".into(),
        })
        .await
        .unwrap();
    let u = u.into_inner().usage.unwrap();
    assert_eq!(
        (u.memory_used_bytes, u.memory_peak_bytes),
        (20 * MIB, 300 * MIB)
    );
    assert_eq!(tenant(&mut c, "t1").await.memory_peak_bytes, 350 * MIB);

    // A guest that does not answer keeps its last memory; host counters still move.
    node.update("vm-1", |v| {
        v.memory_used_bytes = None;
        v.cpu = Duration::from_millis(4500);
    });
    eventually!(session_cpu_us(&mut c, "s1").await == 4_500_000);
    let u = c
        .get_session_usage(GetSessionUsageRequest {
            session_id: "s1".into(),
        })
        .await
        .unwrap();
    assert_eq!(u.into_inner().usage.unwrap().memory_used_bytes, 20 * MIB);

    // Counters never move backwards (a stale read is ignored).
    node.update("vm-1", |v| v.cpu = Duration::from_millis(100));
    node.wait_for_samples(6).await;
    assert_eq!(session_cpu_us(&mut c, "s1").await, 4_500_000);
    assert_eq!(cpu_us(&tenant(&mut c, "t1").await.cpu_time), 6_500_000);

    // The other tenant saw only its own session.
    let t2 = tenant(&mut c, "t2").await;
    assert_eq!(
        (cpu_us(&t2.cpu_time), t2.memory_used_bytes),
        (7_000_000, 10 * MIB)
    );
    // A tenant with no usage is all zero, not an error.
    assert_eq!(cpu_us(&tenant(&mut c, "nobody").await.cpu_time), 0);
}

#[tokio::test]
async fn processes_and_terminals_are_the_latest_guest_figures_summed_per_tenant() {
    let world = World::start().await;
    let node = FakeNode::start("n1").await;
    world.register(&node).await;
    node.set_vm("vm-1", vm("s1", 1000, Some(MIB)));
    node.set_vm("vm-2", vm("s2", 1000, Some(MIB)));
    node.update("vm-1", |v| {
        v.processes_running = 3;
        v.terminals_open = 1;
    });
    node.update("vm-2", |v| v.processes_running = 2);
    world.session("s1", "t1", Some((&node, "vm-1"))).await;
    world.session("s2", "t1", Some((&node, "vm-2"))).await;
    let metering = world.metering(&["--sample-interval", "50ms"]).await;
    let mut c = client(&metering).await;
    let session = |mut c: common::Client, id: &'static str| async move {
        let req = GetSessionUsageRequest {
            session_id: id.into(),
        };
        let u = c.get_session_usage(req).await.unwrap().into_inner().usage;
        let u = u.unwrap();
        (u.processes_running, u.terminals_open)
    };

    eventually!(session(c.clone(), "s1").await == (3, 1));
    eventually!(tenant(&mut c, "t1").await.processes_running == 5);
    assert_eq!(tenant(&mut c, "t1").await.terminals_open, 1);

    // A gauge, not a counter: it follows the guest down.
    node.update("vm-1", |v| {
        v.processes_running = 0;
        v.terminals_open = 0;
    });
    eventually!(session(c.clone(), "s1").await == (0, 0));
    eventually!(tenant(&mut c, "t1").await.processes_running == 2);
    // A guest that does not answer keeps its last figures.
    node.update("vm-2", |v| v.memory_used_bytes = None);
    node.wait_for_samples(4).await;
    assert_eq!(session(c.clone(), "s2").await, (2, 0));
}

#[tokio::test]
async fn two_replicas_sampling_concurrently_never_double_count() {
    let world = World::start().await;
    let node = FakeNode::start("n1").await;
    world.register(&node).await;
    for (vm_id, s) in [("vm-a", "sa"), ("vm-b", "sb")] {
        node.set_vm(vm_id, vm(s, 0, Some(MIB)));
        world.session(s, "t", Some((&node, vm_id))).await;
    }
    let a = world.metering(&["--sample-interval", "10ms"]).await;
    let b = world.metering(&["--sample-interval", "10ms"]).await;
    let (mut ca, mut cb) = (client(&a).await, client(&b).await);

    for step in 1..=15u64 {
        for vm_id in ["vm-a", "vm-b"] {
            node.update(vm_id, |v| {
                v.cpu = Duration::from_millis(step * 100);
                v.network_tx_bytes = step * 1000;
            });
        }
        // Several reads per step, from both replicas, interleaved.
        node.wait_for_samples(6).await;
    }
    eventually!(cpu_us(&tenant(&mut ca, "t").await.cpu_time) == 3_000_000);
    // More rounds by both replicas change nothing.
    node.wait_for_samples(20).await;
    for c in [&mut ca, &mut cb] {
        let t = tenant(c, "t").await;
        assert_eq!(cpu_us(&t.cpu_time), 3_000_000);
        assert_eq!(t.network_tx_bytes, 30_000);
        assert_eq!(t.memory_used_bytes, 2 * MIB);
        assert_eq!(session_cpu_us(c, "sa").await, 1_500_000);
    }
}

#[tokio::test]
async fn interim_records_come_every_interval_and_stop_at_finalize() {
    let world = World::start().await;
    let node = FakeNode::start("n1").await;
    world.register(&node).await;
    node.set_vm("vm-1", vm("s1", 1000, Some(MIB)));
    world.session("s1", "t", Some((&node, "vm-1"))).await;
    let args = ["--sample-interval", "20ms", "--record-interval", "300ms"];
    let a = world.metering(&args).await;
    let _b = world.metering(&args).await;
    let mut c = client(&a).await;
    eventually!(world.records_of("s1", "interim").await.len() >= 3);

    let interims = world.records_of("s1", "interim").await;
    let times: Vec<i64> = interims
        .iter()
        .map(|f| f["record_ms"].parse().unwrap())
        .collect();
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= 300,
            "two replicas, still one record per interval: {times:?}"
        );
    }
    assert_eq!(interims[0]["cpu_time_us"], "1000000");

    c.finalize_session(FinalizeSessionRequest {
        session_id: "s1".into(),
    })
    .await
    .unwrap();
    let after = world.records_of("s1", "interim").await.len();
    node.wait_for_samples(40).await;
    assert_eq!(world.records_of("s1", "interim").await.len(), after);
    assert_eq!(world.records_of("s1", "final").await.len(), 1);
}

#[tokio::test]
async fn unknown_sessions_are_not_found_and_bad_input_names_the_field() {
    let world = World::start().await;
    let m = world.metering(&[]).await;
    let mut c = client(&m).await;

    let e = c
        .get_session_usage(GetSessionUsageRequest {
            session_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .finalize_session(FinalizeSessionRequest {
            session_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(world.records().await.is_empty());

    for bad in ["", "has space", &"x".repeat(300)] {
        let e = c
            .get_session_usage(GetSessionUsageRequest {
                session_id: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("session_id"), "{}", e.message());
        let e = c
            .finalize_session(FinalizeSessionRequest {
                session_id: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("session_id"), "{}", e.message());
        let e = c
            .get_tenant_usage(GetTenantUsageRequest {
                tenant_id: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("tenant_id"), "{}", e.message());
    }
}

#[tokio::test]
async fn bad_config_exits_64_and_sigterm_exits_cleanly() {
    let bin = capsa_test_support::workspace_binary("capsa-metering");
    let status = tokio::process::Command::new(&bin)
        .args(["--sample-interval", "0s"])
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert_eq!(status.code(), Some(64));

    let world = World::start().await;
    let m = world.metering(&["--sample-interval", "20ms"]).await;
    let status = m.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "metering exits 0 on SIGTERM: {status}");
}

#[tokio::test]
async fn usage_counts_from_the_lease_not_from_the_boot() {
    let world = World::start().await;
    let node = FakeNode::start("n1").await;
    world.register(&node).await;
    node.set_vm("vm-1", vm("s1", 5000, Some(MIB)));
    node.update("vm-1", |v| {
        v.disk_read_bytes = 900;
        v.network_tx_bytes = 70;
        // Booting and waiting warm took 3 s of cpu and read 600 bytes.
        v.at_lease = Some(capsa_proto::vmpool::v1::CountersAtLease {
            cpu_time: Some(capsa_proto::time::duration(Duration::from_millis(3000))),
            disk_read_bytes: 600,
            network_tx_bytes: 20,
            ..Default::default()
        });
    });
    world.session("s1", "t", Some((&node, "vm-1"))).await;
    let metering = world.metering(&["--sample-interval", "50ms"]).await;
    let mut c = client(&metering).await;
    eventually!(session_cpu_us(&mut c, "s1").await == 2_000_000);
    let u = c
        .get_session_usage(GetSessionUsageRequest {
            session_id: "s1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .usage
        .unwrap();
    assert_eq!((u.disk_read_bytes, u.network_tx_bytes), (300, 50));
    assert_eq!(cpu_us(&tenant(&mut c, "t").await.cpu_time), 2_000_000);
}

/// Root in the guest can report any memory figure: metering bounds it by what the host
/// holds for the VM (and the VM's size), and keeps the host-measured peak that memory is
/// billed from, which the guest cannot touch.
#[tokio::test]
async fn a_guest_lying_about_its_memory_is_bounded_by_the_host_figures() {
    let world = World::start().await;
    let node = FakeNode::start("n1").await;
    world.register(&node).await;
    let mut liar = vm("s1", 1000, Some(64 * 1024 * MIB));
    liar.vmm_resident_bytes = 300 * MIB;
    node.set_vm("vm-1", liar);
    world.session("s1", "t1", Some((&node, "vm-1"))).await;
    let metering = world.metering(&["--sample-interval", "50ms"]).await;
    let mut c = client(&metering).await;
    let usage = |c: &mut common::Client| {
        let mut c = c.clone();
        async move {
            c.get_session_usage(GetSessionUsageRequest {
                session_id: "s1".into(),
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().usage)
        }
    };
    eventually!(
        usage(&mut c)
            .await
            .is_some_and(|u| u.vmm_resident_peak_bytes == 300 * MIB)
    );
    let u = usage(&mut c).await.unwrap();
    assert_eq!(
        (u.memory_used_bytes, u.memory_peak_bytes),
        (300 * MIB, 300 * MIB),
        "bounded by the host's resident figure, not 64 GiB"
    );
    // The host's figure falls: the billed peak stays, the bound follows.
    node.update("vm-1", |v| v.vmm_resident_bytes = 200 * MIB);
    eventually!(
        usage(&mut c)
            .await
            .is_some_and(|u| u.vmm_resident_bytes == 200 * MIB)
    );
    let u = usage(&mut c).await.unwrap();
    assert_eq!(
        (u.memory_used_bytes, u.vmm_resident_peak_bytes),
        (200 * MIB, 300 * MIB)
    );
    assert_eq!(
        tenant(&mut c, "t1").await.vmm_resident_peak_bytes,
        300 * MIB
    );
}
