//! FinalizeSession against metering as a real process, a real Redis and fake nodes: one
//! final record however many replicas race, a fresh sample while the VM exists, the last
//! sample when it is gone or its node hangs, callers that leave, sessions nobody
//! finalized, and records trimmed once billing acknowledged them.

mod common;

use std::time::Duration;

use capsa_proto::metering::v1::{FinalizeSessionRequest, GetSessionUsageRequest};
use capsa_test_support::eventually;
use common::{FakeNode, MIB, World, client, cpu_us, session_cpu_us, tenant, vm};
use tonic::Code;

#[tokio::test]
async fn finalize_appends_one_record_with_two_replicas_racing() {
    let world = World::start().await;
    let node = FakeNode::start("n1").await;
    world.register(&node).await;
    node.set_vm("vm-1", vm("s1", 2000, Some(80 * MIB)));
    world.session("s1", "t", Some((&node, "vm-1"))).await;
    let a = world.metering(&["--sample-interval", "20ms"]).await;
    let b = world.metering(&["--sample-interval", "20ms"]).await;
    let (ca, cb) = (client(&a).await, client(&b).await);
    eventually!(session_cpu_us(&mut ca.clone(), "s1").await == 2_000_000);

    let calls = (0..12).map(|i| {
        let mut c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        tokio::spawn(async move {
            c.finalize_session(FinalizeSessionRequest {
                session_id: "s1".into(),
            })
            .await
            .unwrap()
            .into_inner()
        })
    });
    let results = futures::future::join_all(calls).await;
    let results: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(results.iter().filter(|r| r.record_appended).count(), 1);
    for r in &results {
        assert_eq!(cpu_us(&r.usage.as_ref().unwrap().cpu_time), 2_000_000);
    }
    let finals = world.records_of("s1", "final").await;
    assert_eq!(finals.len(), 1, "{finals:?}");
    let f = &finals[0];
    assert_eq!(
        (f["tenant_id"].as_str(), f["cpu_time_us"].as_str()),
        ("t", "2000000")
    );
    assert_eq!(f["memory_used_bytes"], (80 * MIB).to_string());
    assert!(f["record_ms"].parse::<i64>().unwrap() > 0);

    // Billing reads it through a consumer group exactly once.
    let mut conn = world.conn.clone();
    let stream = capsa_store::usage::RECORDS_STREAM;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("billing")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    type Reply = Option<Vec<(String, Vec<(String, Vec<String>)>)>>;
    let reader = conn.clone();
    let read = |consumer: &'static str| {
        let mut conn = reader.clone();
        async move {
            let r: Reply = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("billing")
                .arg(consumer)
                .arg("COUNT")
                .arg(100)
                .arg("STREAMS")
                .arg(stream)
                .arg(">")
                .query_async(&mut conn)
                .await
                .unwrap();
            r.unwrap_or_default()
                .into_iter()
                .flat_map(|(_, entries)| entries)
                .collect::<Vec<_>>()
        }
    };
    let (first, second) = tokio::join!(read("w1"), read("w2"));
    let delivered: Vec<_> = first.iter().chain(second.iter()).collect();
    let finals: Vec<_> = delivered
        .iter()
        .filter(|(_, f)| {
            let f = common::pairs(f);
            f["session_id"] == "s1" && f["kind"] == "final"
        })
        .collect();
    assert_eq!(finals.len(), 1);
    let ids: Vec<&String> = delivered.iter().map(|(id, _)| id).collect();
    let acked: i64 = redis::cmd("XACK")
        .arg(stream)
        .arg("billing")
        .arg(&ids)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(acked as usize, ids.len());
    assert!(read("w1").await.is_empty(), "nothing is delivered twice");

    // After finalizing, samples of the still-running VM are ignored: totals stay.
    node.update("vm-1", |v| v.cpu = Duration::from_millis(9000));
    node.wait_for_samples(6).await;
    let mut ca = ca;
    assert_eq!(cpu_us(&tenant(&mut ca, "t").await.cpu_time), 2_000_000);
    assert_eq!(
        tenant(&mut ca, "t").await.memory_used_bytes,
        0,
        "an ended session holds no memory"
    );
    assert_eq!(world.records_of("s1", "final").await.len(), 1);
}

#[tokio::test]
async fn finalize_takes_a_fresh_sample_while_the_vm_exists() {
    let world = World::start().await;
    let node = FakeNode::start("n1").await;
    world.register(&node).await;
    node.set_vm("vm-1", vm("s1", 1000, Some(MIB)));
    world.session("s1", "t", Some((&node, "vm-1"))).await;
    // One round at start, then none for an hour: only FinalizeSession can see the change.
    let m = world.metering(&["--sample-interval", "1h"]).await;
    let mut c = client(&m).await;
    eventually!(session_cpu_us(&mut c, "s1").await == 1_000_000);
    node.update("vm-1", |v| {
        v.cpu = Duration::from_millis(5000);
        v.network_rx_bytes = 123_456;
        v.network_tx_bytes = 789;
    });
    let r = c
        .finalize_session(FinalizeSessionRequest {
            session_id: "s1".into(),
        })
        .await
        .unwrap();
    let r = r.into_inner();
    assert!(r.record_appended);
    let usage = r.usage.unwrap();
    assert_eq!(cpu_us(&usage.cpu_time), 5_000_000);
    assert_eq!(
        (usage.network_rx_bytes, usage.network_tx_bytes),
        (123_456, 789)
    );
    let record = &world.records_of("s1", "final").await[0];
    assert_eq!(record["cpu_time_us"], "5000000");
    assert_eq!(
        (
            record["network_rx_bytes"].as_str(),
            record["network_tx_bytes"].as_str()
        ),
        ("123456", "789")
    );
    // GetSessionUsage after the end answers from the same final numbers.
    let after = c
        .get_session_usage(GetSessionUsageRequest {
            session_id: "s1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .usage
        .unwrap();
    assert_eq!(
        (after.network_rx_bytes, after.network_tx_bytes),
        (123_456, 789)
    );
}

#[tokio::test]
async fn vm_or_node_gone_at_finalize_uses_the_last_sample() {
    let world = World::start().await;
    let node = FakeNode::start("n1").await;
    world.register(&node).await;
    node.set_vm("vm-1", vm("s1", 2000, Some(MIB)));
    node.set_vm("vm-2", vm("s2", 3000, Some(MIB)));
    world.session("s1", "t", Some((&node, "vm-1"))).await;
    world.session("s2", "t", Some((&node, "vm-2"))).await;
    let m = world.metering(&["--sample-interval", "30ms"]).await;
    let mut c = client(&m).await;
    eventually!(cpu_us(&tenant(&mut c, "t").await.cpu_time) == 5_000_000);

    node.remove_vm("vm-1");
    let r = c
        .finalize_session(FinalizeSessionRequest {
            session_id: "s1".into(),
        })
        .await
        .unwrap();
    let r = r.into_inner();
    assert!(r.record_appended);
    assert_eq!(cpu_us(&r.usage.unwrap().cpu_time), 2_000_000);

    // The whole node leaves the registry (and stops answering).
    world.registry.remove("n1").await.unwrap();
    drop(node);
    let r = c
        .finalize_session(FinalizeSessionRequest {
            session_id: "s2".into(),
        })
        .await
        .unwrap();
    let r = r.into_inner();
    assert!(r.record_appended);
    assert_eq!(cpu_us(&r.usage.unwrap().cpu_time), 3_000_000);
    assert_eq!(cpu_us(&tenant(&mut c, "t").await.cpu_time), 5_000_000);
    // Finalized usage stays readable; the uptime is frozen at the end.
    let u = c
        .get_session_usage(GetSessionUsageRequest {
            session_id: "s2".into(),
        })
        .await
        .unwrap();
    assert_eq!(cpu_us(&u.into_inner().usage.unwrap().cpu_time), 3_000_000);
}

#[tokio::test]
async fn a_session_never_sampled_has_its_uptime_and_a_final_record() {
    let world = World::start().await;
    world.session("s1", "t", None).await;
    let m = world.metering(&["--sample-interval", "1h"]).await;
    let mut c = client(&m).await;
    let u = c
        .get_session_usage(GetSessionUsageRequest {
            session_id: "s1".into(),
        })
        .await
        .unwrap();
    let u = u.into_inner();
    assert_eq!(u.tenant_id, "t");
    assert_eq!(cpu_us(&u.usage.unwrap().cpu_time), 0);

    let r = c
        .finalize_session(FinalizeSessionRequest {
            session_id: "s1".into(),
        })
        .await
        .unwrap();
    assert!(r.into_inner().record_appended);
    let again = c
        .finalize_session(FinalizeSessionRequest {
            session_id: "s1".into(),
        })
        .await
        .unwrap();
    assert!(!again.into_inner().record_appended);
    let finals = world.records_of("s1", "final").await;
    assert_eq!(finals.len(), 1);
    assert_eq!(
        (
            finals[0]["tenant_id"].as_str(),
            finals[0]["cpu_time_us"].as_str()
        ),
        ("t", "0")
    );
}

#[tokio::test]
async fn an_ended_session_nobody_finalized_is_finalized_by_the_sampler() {
    let world = World::start().await;
    let node = FakeNode::start("n1").await;
    world.register(&node).await;
    node.set_vm("vm-1", vm("s1", 2000, Some(MIB)));
    node.set_vm("vm-2", vm("s2", 1000, Some(MIB)));
    world.session("s1", "t", Some((&node, "vm-1"))).await;
    world.session("s2", "t", Some((&node, "vm-2"))).await;
    let m = world.metering(&["--sample-interval", "20ms"]).await;
    let mut c = client(&m).await;
    eventually!(cpu_us(&tenant(&mut c, "t").await.cpu_time) == 3_000_000);

    // The VM vanished but the session has not ended: not finalized behind its owner's back.
    node.remove_vm("vm-1");
    node.wait_for_samples(10).await;
    assert!(world.records_of("s1", "final").await.is_empty());

    // Its teardown ran but FinalizeSession never arrived (metering was unreachable).
    world.end_session("s1").await;
    eventually!(world.records_of("s1", "final").await.len() == 1);
    assert_eq!(
        world.records_of("s1", "final").await[0]["cpu_time_us"],
        "2000000"
    );
    assert!(
        world.records_of("s2", "final").await.is_empty(),
        "s2 is still active"
    );
    let r = c
        .finalize_session(FinalizeSessionRequest {
            session_id: "s1".into(),
        })
        .await
        .unwrap();
    assert!(!r.into_inner().record_appended);
}

#[tokio::test]
async fn a_hung_node_delays_finalize_only_by_its_budget_and_a_leaving_caller_changes_nothing() {
    let world = World::start().await;
    let node = FakeNode::start("n1").await;
    world.register(&node).await;
    node.set_vm("vm-1", vm("s1", 2000, Some(MIB)));
    node.set_vm("vm-2", vm("s2", 3000, Some(MIB)));
    world.session("s1", "t", Some((&node, "vm-1"))).await;
    world.session("s2", "t", Some((&node, "vm-2"))).await;
    // Node calls would wait an hour: only the final-sample budget can end the wait.
    let m = world
        .metering(&[
            "--sample-interval",
            "30ms",
            "--rpc-timeout",
            "1h",
            "--final-sample-timeout",
            "500ms",
        ])
        .await;
    let mut c = client(&m).await;
    eventually!(cpu_us(&tenant(&mut c, "t").await.cpu_time) == 5_000_000);
    node.hang();

    let call = c.finalize_session(FinalizeSessionRequest {
        session_id: "s1".into(),
    });
    let r = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("finalize hung");
    let r = r.unwrap().into_inner();
    assert!(r.record_appended);
    assert_eq!(cpu_us(&r.usage.unwrap().cpu_time), 2_000_000);

    // A caller that gives up mid-way (deadline far below the budget) still gets its record.
    let mut req = tonic::Request::new(FinalizeSessionRequest {
        session_id: "s2".into(),
    });
    req.set_timeout(Duration::from_millis(50));
    let e = c.finalize_session(req).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    eventually!(world.records_of("s2", "final").await.len() == 1);
    assert_eq!(
        world.records_of("s2", "final").await[0]["cpu_time_us"],
        "3000000"
    );
}

#[tokio::test]
async fn records_billing_acknowledged_are_trimmed_and_the_rest_kept() {
    let world = World::start().await;
    let m = world.metering(&["--records-trim-interval", "100ms"]).await;
    let mut c = client(&m).await;
    for id in ["s1", "s2"] {
        world.session(id, "t", None).await;
        c.finalize_session(FinalizeSessionRequest {
            session_id: id.into(),
        })
        .await
        .unwrap();
    }
    // Without a consumer group every record stays, however many trims run.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(world.records().await.len(), 2);

    let mut conn = world.conn.clone();
    let stream = capsa_store::usage::RECORDS_STREAM;
    redis::cmd("XGROUP")
        .arg(&["CREATE", stream, "billing", "0"][..])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    type Reply = Vec<(String, Vec<(String, Vec<String>)>)>;
    let read: Reply = redis::cmd("XREADGROUP")
        .arg(
            &[
                "GROUP", "billing", "w1", "COUNT", "1", "STREAMS", stream, ">",
            ][..],
        )
        .query_async(&mut conn)
        .await
        .unwrap();
    let first = read[0].1[0].0.clone();
    redis::cmd("XACK")
        .arg(&[stream, "billing", &first][..])
        .query_async::<u64>(&mut conn)
        .await
        .unwrap();
    // The acknowledged record goes; the one billing has not read stays.
    eventually!(world.records().await.len() == 1);
    let left = world.records().await;
    assert_ne!(left[0].0, first);
    assert_eq!(left[0].1["session_id"], "s2");
}
