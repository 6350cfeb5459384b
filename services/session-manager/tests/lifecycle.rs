//! Sessions end on their own: expiry across two replicas (each VM released exactly once),
//! a restart that loses nothing, and the reconciler (failed VMs, orphan VMs, nodes that
//! stop heartbeating).

mod common;

use std::time::{Duration, Instant};

use capsa_proto::session::v1 as pb;
use capsa_proto::vmpool::v1::VmState;
use capsa_store::NodeRegistry;
use capsa_test_support::eventually;
use common::{Harness, NODE_GRACE, NODE_ID, create, doubles, get, register, register_for};

#[tokio::test]
async fn two_replicas_reap_a_hundred_sessions_releasing_each_vm_once() {
    let h = Harness::start(2).await;
    h.keys().await.set_max_sessions("t1", 200).await.unwrap();
    let (mut a, mut b) = (h.client(0).await, h.client(1).await);
    let mut sessions = Vec::new();
    for i in 0..100 {
        let c = if i % 2 == 0 { &mut a } else { &mut b };
        sessions.push(create(c, Some(10)).await);
    }
    eventually!(
        {
            let req = pb::ListSessionsRequest {
                status: pb::SessionStatus::Terminated as i32,
                page_size: 1000,
                ..Default::default()
            };
            a.list_sessions(req)
                .await
                .unwrap()
                .into_inner()
                .sessions
                .len()
                == 100
        },
        40
    );
    for s in &sessions {
        let ended = get(&mut b, &s.id).await;
        assert_eq!(ended.end_reason, pb::EndReason::Expired as i32, "{}", s.id);
        // Ended within a second (plus the claim round trip) of its deadline.
        let late = ended.end_time.unwrap().seconds - ended.expire_time.unwrap().seconds;
        assert!(late <= 2, "{} ended {late}s after its deadline", s.id);
    }
    // Let both reconcilers make full passes over the ended sessions, then count: a
    // reconciler that took an ended session's VM for an orphan would release it again.
    let passes = h.node.state().list_calls;
    eventually!(h.node.state().list_calls >= passes + 4);
    let state = h.node.state();
    assert_eq!(state.releases.len(), 100);
    assert!(
        state.releases.values().all(|&n| n == 1),
        "{:?}",
        state.releases
    );
    assert!(state.vms.is_empty());
}

#[tokio::test]
async fn a_restart_loses_nothing_and_sessions_still_expire() {
    let mut h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, Some(10)).await;
    let old = h.replicas.pop().unwrap();
    let status = old.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "graceful exit 0 on SIGTERM: {status}");
    h.add_replica().await;
    let mut c = h.client(0).await;
    let again = get(&mut c, &s.id).await;
    assert_eq!(again.status, pb::SessionStatus::Active as i32);
    assert_eq!(again.vm_id, s.vm_id);
    eventually!(
        get(&mut c, &s.id).await.status == pb::SessionStatus::Terminated as i32,
        20
    );
    assert_eq!(
        get(&mut c, &s.id).await.end_reason,
        pb::EndReason::Expired as i32
    );
    assert_eq!(h.node.state().releases[&s.vm_id], 1);
}

#[tokio::test]
async fn the_reconciler_ends_sessions_whose_vm_failed_and_releases_orphans() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let gone = create(&mut c, None).await;
    {
        let mut st = h.node.state();
        let vm = st.vms.get_mut(&s.vm_id).unwrap();
        vm.state = VmState::Failed as i32;
        vm.failure = "kernel panic".into();
        st.vms.remove(&gone.vm_id);
        // A VM leased to a session nobody recorded (a create that died mid-way).
        st.vms.insert(
            "vm-orphan".into(),
            doubles::vm("vm-orphan", "no-such-session", VmState::Leased),
        );
        // A cold boot that failed for a lease: its create ended without it.
        st.vms.insert(
            "vm-failed-boot".into(),
            doubles::vm("vm-failed-boot", "no-such-create", VmState::Failed),
        );
    }
    eventually!(get(&mut c, &s.id).await.status == pb::SessionStatus::Terminated as i32);
    let ended = get(&mut c, &s.id).await;
    assert_eq!(ended.end_reason, pb::EndReason::VmFailed as i32);
    assert!(
        ended.end_message.contains("kernel panic"),
        "{}",
        ended.end_message
    );
    eventually!(get(&mut c, &gone.id).await.status == pb::SessionStatus::Terminated as i32);
    assert_eq!(
        get(&mut c, &gone.id).await.end_reason,
        pb::EndReason::VmFailed as i32
    );
    eventually!(h.node.state().releases.get("vm-orphan") == Some(&1));
    eventually!(h.node.state().releases.get("vm-failed-boot") == Some(&1));
}

#[tokio::test]
async fn a_node_that_stops_heartbeating_has_its_sessions_ended_and_its_vms_released_on_return() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let registry = NodeRegistry::new(capsa_store::connect(&h.redis.url()).await.unwrap());
    // The node shuts down: it says so (no grace is due) and no longer answers; nobody
    // calls the session.
    h.node.state().silent = true;
    registry.remove(NODE_ID).await.unwrap();

    eventually!(get(&mut c, &s.id).await.status == pb::SessionStatus::Terminated as i32);
    let ended = get(&mut c, &s.id).await;
    assert_eq!(ended.end_reason, pb::EndReason::VmFailed as i32);
    assert!(
        ended.end_message.contains("node-a shut down"),
        "{}",
        ended.end_message
    );
    eventually!(registry.lapsed_nodes().await.unwrap().is_empty());
    h.node.state().silent = false;
    assert_eq!(h.node.state().releases.get(&s.vm_id), None, "node was gone");

    // The node was alive after all: its VM is still leased to the ended session, and the
    // reconciler releases it once the node heartbeats again.
    assert!(h.node.state().vms.contains_key(&s.vm_id));
    register(&h.redis, &h.node, 1000, 0).await;
    eventually!(h.node.state().releases.get(&s.vm_id) == Some(&1));
}

/// A node that misses heartbeats (stopped, CPU-starved, cut off from Redis) but still
/// answers is not declared lost: its sessions stay ACTIVE however long the lapse.
#[tokio::test]
async fn a_node_that_misses_heartbeats_but_answers_keeps_its_sessions() {
    let h = Harness::start_with(1, false).await;
    register_for(&h.redis, &h.node, 1000, 0, Duration::from_secs(2)).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let registry = NodeRegistry::new(capsa_store::connect(&h.redis.url()).await.unwrap());
    eventually!(registry.live_nodes().await.unwrap().is_empty());
    // Watched for three grace periods past the lapse.
    let watch_until = Instant::now() + 3 * NODE_GRACE;
    while Instant::now() < watch_until {
        assert_eq!(
            get(&mut c, &s.id).await.status,
            pb::SessionStatus::Active as i32
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(h.node.state().releases.is_empty());
    // Heartbeating again, it is live and the session carries on.
    register(&h.redis, &h.node, 1000, 1).await;
    assert_eq!(registry.lapsed_nodes().await.unwrap(), Vec::<String>::new());
    assert_eq!(
        get(&mut c, &s.id).await.status,
        pb::SessionStatus::Active as i32
    );
}

/// A node that misses heartbeats and does not answer gets the grace period, then its
/// sessions end VM_FAILED; one back within the grace keeps them.
#[tokio::test]
async fn a_silent_node_gets_a_grace_period_then_its_sessions_end() {
    let h = Harness::start_with(1, false).await;
    register_for(&h.redis, &h.node, 1000, 0, Duration::from_secs(2)).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let registry = NodeRegistry::new(capsa_store::connect(&h.redis.url()).await.unwrap());

    // A stall shorter than the grace: silent and lapsed, then back.
    h.node.state().silent = true;
    eventually!(registry.live_nodes().await.unwrap().is_empty());
    tokio::time::sleep(NODE_GRACE / 2).await;
    register_for(&h.redis, &h.node, 1000, 1, Duration::from_secs(2)).await;
    h.node.state().silent = false;
    assert_eq!(
        get(&mut c, &s.id).await.status,
        pb::SessionStatus::Active as i32
    );

    // A node that is gone: silent past the grace.
    h.node.state().silent = true;
    eventually!(registry.live_nodes().await.unwrap().is_empty());
    let lapsed_at_again = Instant::now();
    eventually!(get(&mut c, &s.id).await.status == pb::SessionStatus::Terminated as i32);
    // Not before the grace ran out (timed from when the reconciler first saw the lapse,
    // which is at or after `lapsed_at_again`).
    assert!(
        lapsed_at_again.elapsed() >= NODE_GRACE,
        "{:?}",
        lapsed_at_again.elapsed()
    );
    let ended = get(&mut c, &s.id).await;
    assert_eq!(ended.end_reason, pb::EndReason::VmFailed as i32);
    assert!(
        ended
            .end_message
            .contains("stopped heartbeating and has not answered"),
        "{}",
        ended.end_message
    );
}
