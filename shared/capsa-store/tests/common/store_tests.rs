// The store's tests, included by store.rs (one redis-server) and store_cluster.rs (a Redis
// Cluster), each defining `Redis` as its fixture: `Redis::start()` and `redis.url()`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use capsa_egress::{EgressPolicy, PolicyInput};
use capsa_store::EgressStored;
use capsa_store::{
    ApiKeyStore, Created, Cursor, EndReason, Extended, ListFilter, NewSession, NodeRecord,
    NodeRegistry, SessionStatus, SessionStore, StoreConfig, SuspendOp, Transition, VmShape,
};
use capsa_test_support::eventually;

async fn store(redis: &Redis, config: StoreConfig) -> SessionStore {
    SessionStore::new(capsa_store::connect(&redis.url()).await.unwrap(), config)
}

fn new_session(id: &str, tenant: &str, lifetime: Duration) -> NewSession {
    NewSession {
        id: id.into(),
        tenant_id: tenant.into(),
        template: "default".into(),
        vcpus: 1,
        memory_mib: 512,
        env_names: vec!["A".into()],
        metadata: BTreeMap::new(),
        lifetime,
        egress: EgressPolicy::none(),
        auto_suspend: false,
        auto_resume: false,
        source_snapshot_id: String::new(),
        parent_session_id: String::new(),
    }
}

fn policy(domains: &[&str], cidrs: &[&str]) -> EgressPolicy {
    EgressPolicy::from_input(PolicyInput {
        allowed_domains: domains.iter().map(|d| d.to_string()).collect(),
        allowed_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        ..PolicyInput::default()
    })
    .unwrap()
}

fn node(id: &str, capacity: u32) -> NodeRecord {
    NodeRecord {
        node_id: id.into(),
        vmpool_url: format!("http://{id}:1"),
        executor_url: format!("http://{id}:2"),
        engine: "qemu-tcg".into(),
        capacity,
        leased: 0,
        warm: 1,
        templates: vec!["default".into()],
        resources: None,
        heartbeat_ms: 1,
    }
}

#[tokio::test]
async fn nodes_live_while_heartbeating_and_drop_out_after_ttl() {
    let redis = Redis::start();
    let reg = NodeRegistry::new(capsa_store::connect(&redis.url()).await.unwrap());
    reg.heartbeat(&node("b", 4), Duration::from_secs(60))
        .await
        .unwrap();
    reg.heartbeat(&node("a", 2), Duration::from_millis(200))
        .await
        .unwrap();
    let live = reg.live_nodes().await.unwrap();
    assert_eq!(
        live.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(reg.get("b").await.unwrap(), Some(node("b", 4)));
    eventually!(reg.live_nodes().await.unwrap().len() == 1);
    reg.remove("b").await.unwrap();
    assert!(reg.live_nodes().await.unwrap().is_empty());
    assert_eq!(reg.get("b").await.unwrap(), None);
}

#[tokio::test]
async fn a_lapsed_node_is_kept_while_sessions_name_it_then_forgotten() {
    let redis = Redis::start();
    let conn = capsa_store::connect(&redis.url()).await.unwrap();
    let reg = NodeRegistry::new(conn.clone());
    let s = store(&redis, StoreConfig::default()).await;
    reg.heartbeat(&node("n", 4), Duration::from_millis(300))
        .await
        .unwrap();
    reg.heartbeat(&node("idle", 4), Duration::from_millis(300))
        .await
        .unwrap();
    s.create(&new_session("s1", "t", Duration::from_secs(60)), 5)
        .await
        .unwrap();
    let shape = VmShape {
        id: "vm1",
        vcpus: 1,
        memory_mib: 512,
    };
    assert!(matches!(
        s.activate("s1", "n", &shape).await.unwrap(),
        Transition::Won(_)
    ));

    // Both heartbeats lapse: the idle node is forgotten, the one with a session is not.
    eventually!(reg.live_nodes().await.unwrap().is_empty());
    assert_eq!(reg.lapsed_nodes().await.unwrap(), ["n"]);
    assert_eq!(s.node_sessions("n").await.unwrap(), ["s1"]);
    // It keeps its last record (how to ask it directly), and how long it has been lapsed
    // is timed from the first pass that saw it, on Redis' clock.
    let (_, lapsed) = reg.live_and_lapsed().await.unwrap();
    assert_eq!(lapsed[0].last, Some(node("n", 4)));
    let first = lapsed[0].lapsed_for;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, lapsed) = reg.live_and_lapsed().await.unwrap();
    assert!(
        lapsed[0].lapsed_for >= first + Duration::from_millis(250),
        "{lapsed:?}"
    );
    // A node that beats again is not lapsed, and its next lapse is timed afresh.
    reg.heartbeat(&node("n", 4), Duration::from_millis(300))
        .await
        .unwrap();
    assert!(reg.lapsed_nodes().await.unwrap().is_empty());
    eventually!(reg.live_nodes().await.unwrap().is_empty());
    let (_, lapsed) = reg.live_and_lapsed().await.unwrap();
    assert!(
        lapsed[0].lapsed_for < Duration::from_millis(250),
        "{lapsed:?}"
    );

    // A graceful remove of a node that still has sessions keeps it findable too.
    reg.heartbeat(&node("m", 4), Duration::from_secs(60))
        .await
        .unwrap();
    s.create(&new_session("s2", "t", Duration::from_secs(60)), 5)
        .await
        .unwrap();
    s.activate("s2", "m", &VmShape { id: "vm2", ..shape })
        .await
        .unwrap();
    reg.remove("m").await.unwrap();
    assert_eq!(reg.lapsed_nodes().await.unwrap(), ["m", "n"]);
    // A graceful remove is no stall: no grace is due.
    let (_, lapsed) = reg.live_and_lapsed().await.unwrap();
    assert_eq!(lapsed[0].lapsed_for, Duration::MAX);

    // Once their sessions end, the next listing forgets them.
    for id in ["s1", "s2"] {
        s.begin_end(id, EndReason::VmFailed, "node gone", None)
            .await
            .unwrap();
        s.finish_end(id, "").await.unwrap();
    }
    assert!(reg.live_nodes().await.unwrap().is_empty());
    assert!(reg.lapsed_nodes().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_session_walks_every_state_and_each_transition_has_one_winner() {
    let redis = Redis::start();
    let s = store(&redis, StoreConfig::default()).await;
    let Created::Ok(rec) = s
        .create(&new_session("s1", "t", Duration::from_secs(60)), 5)
        .await
        .unwrap()
    else {
        panic!("create")
    };
    assert_eq!(rec.status, SessionStatus::Creating);
    assert_eq!(rec.env_names, ["A"]);
    assert!(matches!(
        s.create(&new_session("s1", "t", Duration::from_secs(60)), 5)
            .await
            .unwrap(),
        Created::IdTaken
    ));

    // The request left the shape to the node (0 = template default); the VM's is recorded.
    let shape = VmShape {
        id: "vm1",
        vcpus: 2,
        memory_mib: 1024,
    };
    let Transition::Won(active) = s.activate("s1", "n1", &shape).await.unwrap() else {
        panic!()
    };
    assert_eq!(active.status, SessionStatus::Active);
    assert_eq!(
        (active.node_id.as_str(), active.vm_id.as_str()),
        ("n1", "vm1")
    );
    assert_eq!(
        (active.vcpus, active.memory_mib),
        (2, 1024),
        "the vm's shape is recorded"
    );
    let expire = active.expire_ms.unwrap();
    assert!(expire >= active.create_ms + 60_000 && expire <= active.create_ms + 70_000);
    assert!(matches!(
        s.activate(
            "s1",
            "n1",
            &VmShape {
                id: "vm1",
                vcpus: 1,
                memory_mib: 512
            }
        )
        .await
        .unwrap(),
        Transition::Conflict(_)
    ));
    assert_eq!(s.node_sessions("n1").await.unwrap(), ["s1"]);
    assert_eq!(s.counts("t").await.unwrap(), (1, 1));
    assert_eq!(s.open_count().await.unwrap(), 1);

    // Two concurrent enders: exactly one wins.
    let (a, b) = tokio::join!(
        s.begin_end("s1", EndReason::Deleted, "deleted by the client", None),
        s.begin_end("s1", EndReason::Expired, "", None)
    );
    let wins = [a.unwrap(), b.unwrap()]
        .into_iter()
        .filter(|t| matches!(t, Transition::Won(_)))
        .count();
    assert_eq!(wins, 1);
    let ending = s.get("s1").await.unwrap().unwrap();
    assert_eq!(ending.status, SessionStatus::Terminating);
    assert!(ending.end_reason.is_some());
    assert_eq!(s.counts("t").await.unwrap(), (0, 1));

    let Transition::Won(done) = s.finish_end("s1", "vm released").await.unwrap() else {
        panic!()
    };
    assert_eq!(done.status, SessionStatus::Terminated);
    assert!(done.end_ms.is_some());
    assert!(
        done.end_message.ends_with("vm released"),
        "{}",
        done.end_message
    );
    assert!(matches!(
        s.finish_end("s1", "").await.unwrap(),
        Transition::Conflict(_)
    ));
    assert!(s.node_sessions("n1").await.unwrap().is_empty());
    assert_eq!(s.open_count().await.unwrap(), 0);
    assert!(matches!(
        s.begin_end("nope", EndReason::Deleted, "", None)
            .await
            .unwrap(),
        Transition::Missing
    ));
}

#[tokio::test]
async fn terminated_sessions_expire_after_retention() {
    let redis = Redis::start();
    let config = StoreConfig {
        retention: Duration::from_millis(300),
        ..StoreConfig::default()
    };
    let s = store(&redis, config).await;
    s.create(&new_session("s1", "t", Duration::from_secs(60)), 5)
        .await
        .unwrap();
    s.begin_end("s1", EndReason::CreateFailed, "no node", None)
        .await
        .unwrap();
    s.finish_end("s1", "").await.unwrap();
    assert!(s.get("s1").await.unwrap().is_some());
    eventually!(s.get("s1").await.unwrap().is_none());
    // The tenant index forgets it when listing meets it.
    let page = s.list("t", &ListFilter::default(), 10, None).await.unwrap();
    assert!(page.sessions.is_empty());
}

/// A tenant that never lists does not grow its index without bound: each create drops the
/// index entries older than the horizon past which their records have surely expired.
#[tokio::test]
async fn creates_trim_index_entries_past_the_horizon() {
    let redis = Redis::start();
    let config = StoreConfig {
        retention: Duration::from_millis(500),
        claim_ttl: Duration::from_millis(10),
        creating_bound: Duration::from_millis(500),
        max_total_lifetime: Duration::from_millis(500),
        step_claim_ttl: Duration::from_millis(10),
    };
    assert_eq!(config.index_horizon(), Duration::from_millis(1600));
    let s = store(&redis, config).await;
    let mut conn = capsa_store::connect(&redis.url()).await.unwrap();
    let index_len = async |conn: &mut capsa_store::Connection| -> usize {
        redis::cmd("ZCARD")
            .arg("{capsa}:tenant:t:sessions")
            .query_async(conn)
            .await
            .unwrap()
    };
    for id in ["old1", "old2"] {
        s.create(&new_session(id, "t", Duration::from_secs(60)), 5)
            .await
            .unwrap();
    }
    s.create(&new_session("u1", "u", Duration::from_secs(60)), 5)
        .await
        .unwrap();
    assert_eq!(index_len(&mut conn).await, 2);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    s.create(&new_session("new", "t", Duration::from_secs(60)), 5)
        .await
        .unwrap();
    assert_eq!(index_len(&mut conn).await, 1, "only `new` is left");
    // Another tenant's index is its own business.
    let u: usize = redis::cmd("ZCARD")
        .arg("{capsa}:tenant:u:sessions")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(u, 1);
}

/// The operator's per-tenant create rate replaces the server default for that tenant only,
/// and a refusal says which limit applied.
#[tokio::test]
async fn a_tenant_create_rate_override_applies_to_that_tenant_only() {
    let redis = Redis::start();
    let keys = ApiKeyStore::new(capsa_store::connect(&redis.url()).await.unwrap());
    keys.set_create_rate("slow", 0.01, 1).await.unwrap();
    assert!(
        keys.take_create_token("slow", 5.0, 10)
            .await
            .unwrap()
            .is_none()
    );
    let refused = keys
        .take_create_token("slow", 5.0, 10)
        .await
        .unwrap()
        .expect("the override's burst of 1 is spent");
    assert_eq!((refused.per_sec, refused.burst), (0.01, 1));
    assert!(
        refused.retry_after > Duration::from_secs(90),
        "{:?}",
        refused.retry_after
    );
    for _ in 0..10 {
        assert!(
            keys.take_create_token("fast", 5.0, 10)
                .await
                .unwrap()
                .is_none()
        );
    }
    let refused = keys
        .take_create_token("fast", 5.0, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((refused.per_sec, refused.burst), (5.0, 10));
    assert_eq!(
        keys.tenant_limits("slow").await.unwrap(),
        vec![
            ("create_burst".to_string(), "1".to_string()),
            ("create_rate".to_string(), "0.01".to_string())
        ]
    );
}

#[tokio::test]
async fn quota_counts_creating_and_active_and_honours_the_tenant_override() {
    let redis = Redis::start();
    let conn = capsa_store::connect(&redis.url()).await.unwrap();
    let s = SessionStore::new(conn.clone(), StoreConfig::default());
    let keys = ApiKeyStore::new(conn);
    for i in 0..2 {
        let r = s
            .create(
                &new_session(&format!("q{i}"), "t", Duration::from_secs(60)),
                2,
            )
            .await;
        assert!(matches!(r.unwrap(), Created::Ok(_)));
    }
    let r = s
        .create(&new_session("q2", "t", Duration::from_secs(60)), 2)
        .await
        .unwrap();
    assert!(matches!(r, Created::QuotaExceeded { limit: 2 }), "{r:?}");
    keys.set_max_sessions("t", 3).await.unwrap();
    assert_eq!(keys.max_sessions("t").await.unwrap(), Some(3));
    assert!(matches!(
        s.create(&new_session("q2", "t", Duration::from_secs(60)), 2)
            .await
            .unwrap(),
        Created::Ok(_)
    ));
    // Ending one frees a slot.
    s.begin_end("q0", EndReason::Deleted, "", None)
        .await
        .unwrap();
    assert!(matches!(
        s.create(&new_session("q3", "t", Duration::from_secs(60)), 2)
            .await
            .unwrap(),
        Created::Ok(_)
    ));
    // Another tenant is unaffected.
    assert!(matches!(
        s.create(&new_session("o1", "other", Duration::from_secs(60)), 2)
            .await
            .unwrap(),
        Created::Ok(_)
    ));
}

#[tokio::test]
async fn concurrent_claimers_split_due_sessions_without_overlap() {
    let redis = Redis::start();
    let s = store(&redis, StoreConfig::default()).await;
    for i in 0..100 {
        let id = format!("e{i:03}");
        // 10 s is the smallest lifetime the API allows; the store takes any.
        s.create(&new_session(&id, "t", Duration::from_millis(200)), 1000)
            .await
            .unwrap();
        s.activate(
            &id,
            "n1",
            &VmShape {
                id: &format!("vm-{id}"),
                vcpus: 1,
                memory_mib: 512,
            },
        )
        .await
        .unwrap();
    }
    let s2 = store(&redis, StoreConfig::default()).await;
    let mut won = Vec::new();
    eventually!({
        let (a, b) = tokio::join!(s.claim_due(7), s2.claim_due(7));
        won.extend(a.unwrap());
        won.extend(b.unwrap());
        won.len() >= 100
    });
    let ids: HashSet<_> = won.iter().map(|c| c.id.clone()).collect();
    assert_eq!(ids.len(), 100, "an id was claimed twice");
    assert_eq!(won.len(), 100);
    assert!(won.iter().all(|c| c.kind == "expired"));
    let rec = s.get("e000").await.unwrap().unwrap();
    assert_eq!(
        (rec.status, rec.end_reason),
        (SessionStatus::Terminating, Some(EndReason::Expired))
    );
    // Nothing more is due until the claims run out.
    assert!(s.claim_due(1000).await.unwrap().is_empty());
}

#[tokio::test]
async fn stale_claims_are_reclaimed_and_stuck_creates_are_ended() {
    let redis = Redis::start();
    let config = StoreConfig {
        claim_ttl: Duration::from_millis(200),
        creating_bound: Duration::from_millis(200),
        ..StoreConfig::default()
    };
    let s = store(&redis, config).await;
    s.create(&new_session("stuck", "t", Duration::from_secs(60)), 5)
        .await
        .unwrap();
    s.create(&new_session("dying", "t", Duration::from_secs(60)), 5)
        .await
        .unwrap();
    s.activate(
        "dying",
        "n1",
        &VmShape {
            id: "vm1",
            vcpus: 1,
            memory_mib: 512,
        },
    )
    .await
    .unwrap();
    s.begin_end("dying", EndReason::Deleted, "", None)
        .await
        .unwrap();
    let mut kinds = BTreeMap::new();
    eventually!({
        for c in s.claim_due(10).await.unwrap() {
            kinds.insert(c.id, c.kind);
        }
        kinds.len() == 2
    });
    assert_eq!(kinds["stuck"], "creating");
    assert_eq!(kinds["dying"], "reclaimed");
    let stuck = s.get("stuck").await.unwrap().unwrap();
    assert_eq!(stuck.end_reason, Some(EndReason::CreateFailed));
    // A reclaimed teardown keeps its original reason.
    assert_eq!(
        s.get("dying").await.unwrap().unwrap().end_reason,
        Some(EndReason::Deleted)
    );
    assert_eq!(
        s.next_due_in()
            .await
            .unwrap()
            .map(|d| d <= Duration::from_millis(200)),
        Some(true)
    );
}

#[tokio::test]
async fn extend_respects_the_total_bound_and_needs_an_active_session() {
    let redis = Redis::start();
    let config = StoreConfig {
        max_total_lifetime: Duration::from_secs(3600),
        ..StoreConfig::default()
    };
    let s = store(&redis, config).await;
    s.create(&new_session("x", "t", Duration::from_secs(600)), 5)
        .await
        .unwrap();
    assert!(matches!(
        s.extend("x", Duration::from_secs(1)).await.unwrap(),
        Extended::NotActive(_)
    ));
    let Transition::Won(a) = s
        .activate(
            "x",
            "n",
            &VmShape {
                id: "v",
                vcpus: 1,
                memory_mib: 512,
            },
        )
        .await
        .unwrap()
    else {
        panic!()
    };
    let Extended::Ok(b) = s.extend("x", Duration::from_secs(60)).await.unwrap() else {
        panic!()
    };
    assert_eq!(b.expire_ms.unwrap(), a.expire_ms.unwrap() + 60_000);
    match s.extend("x", Duration::from_secs(3600)).await.unwrap() {
        Extended::TooLong { max_extend_ms } => {
            assert!(
                max_extend_ms > 0 && max_extend_ms < 3_600_000 - 600_000,
                "{max_extend_ms}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.extend("nope", Duration::from_secs(1)).await.unwrap(),
        Extended::Missing
    ));
    s.touch("x").await.unwrap();
    s.touch("nope").await.unwrap();
    assert!(
        s.get("nope").await.unwrap().is_none(),
        "touch must not create a hash"
    );
}

#[tokio::test]
async fn listing_pages_newest_first_with_filters() {
    let redis = Redis::start();
    let s = store(&redis, StoreConfig::default()).await;
    let mut created = Vec::new();
    for i in 0..25 {
        let id = format!("l{i:02}");
        let mut new = new_session(&id, "t", Duration::from_secs(60));
        new.metadata
            .insert("team".into(), if i % 2 == 0 { "x" } else { "y" }.into());
        s.create(&new, 1000).await.unwrap();
        if i % 3 == 0 {
            s.activate(
                &id,
                "n",
                &VmShape {
                    id: "v",
                    vcpus: 1,
                    memory_mib: 512,
                },
            )
            .await
            .unwrap();
        }
        created.push(id);
    }
    s.create(&new_session("other", "u", Duration::from_secs(60)), 1000)
        .await
        .unwrap();
    // Pages of 10 cover all 25 exactly once, newest first (ties broken by id).
    let mut seen = Vec::new();
    let mut cursor: Option<Cursor> = None;
    loop {
        let page = s
            .list("t", &ListFilter::default(), 10, cursor.as_ref())
            .await
            .unwrap();
        assert!(page.sessions.len() <= 10);
        seen.extend(page.sessions.iter().map(|r| (r.create_ms, r.id.clone())));
        match page.next {
            Some(c) => cursor = Some(Cursor::from_token(&c.to_token()).unwrap()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 25);
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted);

    let active = ListFilter {
        status: Some(SessionStatus::Active),
        ..Default::default()
    };
    let page = s.list("t", &active, 100, None).await.unwrap();
    assert_eq!(page.sessions.len(), 9);
    assert!(page.next.is_none());

    let meta = ListFilter {
        status: None,
        metadata: BTreeMap::from([("team".to_string(), "x".to_string())]),
    };
    let page = s.list("t", &meta, 100, None).await.unwrap();
    assert_eq!(page.sessions.len(), 13);
    assert!(page.sessions.iter().all(|r| r.metadata["team"] == "x"));
}

#[tokio::test]
async fn api_keys_are_stored_hashed_and_looked_up() {
    let redis = Redis::start();
    let keys = ApiKeyStore::new(capsa_store::connect(&redis.url()).await.unwrap());
    let k = keys.create("tenant-a", "ci").await.unwrap();
    assert!(
        k.plaintext.starts_with("capsa_") && k.plaintext.len() == 38,
        "{}",
        k.plaintext
    );
    assert!(k.plaintext[6..].chars().all(|c| c.is_ascii_alphanumeric()));
    assert!(!format!("{k:?}").contains(&k.plaintext));
    let rec = keys.lookup(&k.plaintext).await.unwrap().unwrap();
    assert_eq!(
        (rec.tenant_id.as_str(), rec.name.as_str()),
        ("tenant-a", "ci")
    );
    assert!(keys.lookup("capsa_wrong").await.unwrap().is_none());

    // The key and a session in one round trip: each read as if alone.
    let sessions = store(&redis, StoreConfig::default()).await;
    let Created::Ok(_) = sessions
        .create(&new_session("s1", "tenant-b", Duration::from_secs(60)), 5)
        .await
        .unwrap()
    else {
        panic!("create")
    };
    let (key, session) = keys.lookup_with_session(&k.plaintext, "s1").await.unwrap();
    assert_eq!(key.unwrap().tenant_id, "tenant-a");
    let session = session.unwrap();
    assert_eq!((session.id.as_str(), session.tenant_id.as_str()), ("s1", "tenant-b"));
    let (key, session) = keys.lookup_with_session(&k.plaintext, "s2").await.unwrap();
    assert!(key.is_some() && session.is_none());
    let (key, session) = keys.lookup_with_session("capsa_wrong", "s1").await.unwrap();
    assert!(key.is_none() && session.is_some());

    // Only the hash is in Redis.
    let conn = capsa_store::connect(&redis.url()).await.unwrap();
    let all = conn.scan_keys("*").await.unwrap();
    assert!(!all.is_empty());
    assert!(all.iter().all(|key| !key.contains(&k.plaintext)));
    assert!(keys.revoke_hash(&k.hash).await.unwrap());
    assert!(keys.lookup(&k.plaintext).await.unwrap().is_none());
}

/// Sessions with large metadata make shorter pages, never a reply of any size: a page
/// holds at most MAX_PAGE_BYTES of records, and walking the pages still finds every one.
#[tokio::test]
async fn list_pages_are_bounded_in_bytes() {
    let redis = Redis::start();
    let s = store(&redis, StoreConfig::default()).await;
    let big = "x".repeat(100 * 1024);
    for i in 0..60 {
        let mut new = new_session(&format!("s{i:02}"), "t", Duration::from_secs(60));
        new.metadata = BTreeMap::from([("blob".into(), big.clone())]);
        assert!(matches!(s.create(&new, 100).await.unwrap(), Created::Ok(_)));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = s
            .list("t", &ListFilter::default(), 1000, after.as_ref())
            .await
            .unwrap();
        pages += 1;
        let bytes: usize = page.sessions.iter().map(|r| r.metadata["blob"].len()).sum();
        assert!(
            bytes <= capsa_store::MAX_PAGE_BYTES,
            "page of {bytes} bytes"
        );
        assert!(!page.sessions.is_empty());
        seen.extend(page.sessions.into_iter().map(|r| r.id));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), 60);
    assert!(pages >= 2, "6 MiB of records cannot fit one page");
}

#[tokio::test]
async fn the_egress_policy_is_stored_at_create_and_replaced_only_under_the_lock() {
    let redis = Redis::start();
    let s = store(&redis, StoreConfig::default()).await;
    let first = policy(&["*.example.com"], &["198.51.100.0/24"]);
    let mut new = new_session("s1", "t", Duration::from_secs(60));
    new.egress = first.clone();
    let Created::Ok(rec) = s.create(&new, 5).await.unwrap() else {
        panic!()
    };
    assert_eq!(rec.egress, first);
    assert_eq!(s.get("s1").await.unwrap().unwrap().egress, first);

    // One update at a time: a second lock waits for the first to finish.
    let ttl = Duration::from_secs(30);
    let token = s.lock_egress("s1", ttl).await.unwrap().unwrap();
    assert_eq!(s.lock_egress("s1", ttl).await.unwrap(), None);
    // A token that does not hold the lock stores nothing and releases nothing.
    let second = policy(&["pypi.org"], &[]);
    assert!(matches!(
        s.set_egress("s1", "not-the-token", &second).await.unwrap(),
        EgressStored::LockLost
    ));
    s.unlock_egress("s1", "not-the-token").await.unwrap();
    assert_eq!(s.lock_egress("s1", ttl).await.unwrap(), None);
    let EgressStored::Ok(rec) = s.set_egress("s1", &token, &second).await.unwrap() else {
        panic!()
    };
    assert_eq!(rec.egress, second);
    assert_eq!(s.get("s1").await.unwrap().unwrap().egress, second);
    // Storing released the lock; using the same token again finds it gone.
    assert!(matches!(
        s.set_egress("s1", &token, &first).await.unwrap(),
        EgressStored::LockLost
    ));
    assert_eq!(s.get("s1").await.unwrap().unwrap().egress, second);

    // An update that failed on the node unlocks and leaves the stored policy as it was.
    let token = s.lock_egress("s1", ttl).await.unwrap().unwrap();
    s.unlock_egress("s1", &token).await.unwrap();
    assert_eq!(s.get("s1").await.unwrap().unwrap().egress, second);

    // A lock outlived by its holder's call expires, and that holder then stores nothing.
    let stale = s
        .lock_egress("s1", Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    eventually!(s.lock_egress("s1", ttl).await.unwrap().is_some());
    assert!(matches!(
        s.set_egress("s1", &stale, &first).await.unwrap(),
        EgressStored::LockLost
    ));
    assert_eq!(s.get("s1").await.unwrap().unwrap().egress, second);

    // A session whose record is gone is not recreated.
    let token = s.lock_egress("gone", ttl).await.unwrap().unwrap();
    assert!(matches!(
        s.set_egress("gone", &token, &first).await.unwrap(),
        EgressStored::Missing
    ));
    assert!(s.get("gone").await.unwrap().is_none());
}

#[tokio::test]
async fn a_tenant_default_egress_policy_is_set_read_and_cleared() {
    let redis = Redis::start();
    let keys = ApiKeyStore::new(capsa_store::connect(&redis.url()).await.unwrap());
    assert_eq!(keys.tenant_egress("t").await.unwrap(), None);
    let p = policy(&["pypi.org"], &["2001:db8::/32"]);
    keys.set_tenant_egress("t", Some(&p)).await.unwrap();
    assert_eq!(keys.tenant_egress("t").await.unwrap(), Some(p.clone()));
    assert_eq!(keys.tenant_egress("other").await.unwrap(), None);
    let replaced = EgressPolicy::none();
    keys.set_tenant_egress("t", Some(&replaced)).await.unwrap();
    assert_eq!(keys.tenant_egress("t").await.unwrap(), Some(replaced));
    keys.set_tenant_egress("t", None).await.unwrap();
    assert_eq!(keys.tenant_egress("t").await.unwrap(), None);
}

fn won(t: Transition) -> capsa_store::SessionRecord {
    match t {
        Transition::Won(rec) => rec,
        other => panic!("expected a win, got {other:?}"),
    }
}

/// The suspend loop: each step applies to one state only, the snapshot and lease ids follow
/// the generation, a suspended session keeps its deadline and quota place and expires, and
/// an auto_suspend session is parked at its deadline instead of ended.
#[tokio::test]
async fn the_suspend_loop_moves_one_step_at_a_time_and_expiry_parks_or_ends() {
    let redis = Redis::start();
    let config = StoreConfig {
        step_claim_ttl: Duration::from_millis(300),
        ..StoreConfig::default()
    };
    let s = store(&redis, config).await;
    let shape = VmShape {
        id: "vm1",
        vcpus: 1,
        memory_mib: 512,
    };
    s.create(&new_session("a", "t", Duration::from_secs(60)), 5)
        .await
        .unwrap();
    let active = won(s.activate("a", "n", &shape).await.unwrap());
    // Only an active session begins a suspend; only a suspending one finishes or aborts.
    assert!(matches!(
        s.suspend_step("a", SuspendOp::BeginResume).await.unwrap(),
        Transition::Conflict(_)
    ));
    let suspending = won(s
        .suspend_step("a", SuspendOp::Begin { at_deadline: false })
        .await
        .unwrap());
    assert_eq!(suspending.status, SessionStatus::Suspending);
    assert_eq!(suspending.snapshot_id, "s1-a");
    assert_eq!(suspending.suspend_gen, 1);
    let back = won(s.suspend_step("a", SuspendOp::Abort).await.unwrap());
    assert_eq!(
        (back.status, back.vm_id.as_str()),
        (SessionStatus::Active, "vm1")
    );
    assert_eq!(back.snapshot_id, "");
    won(s
        .suspend_step("a", SuspendOp::Begin { at_deadline: false })
        .await
        .unwrap());
    let finish = SuspendOp::Finish {
        snapshot_bytes: 1234,
        retention: Duration::from_secs(3600),
    };
    let suspended = won(s.suspend_step("a", finish.clone()).await.unwrap());
    assert_eq!(suspended.status, SessionStatus::Suspended);
    assert_eq!(
        (suspended.snapshot_id.as_str(), suspended.snapshot_bytes),
        ("s2-a", 1234)
    );
    assert_eq!(suspended.vm_id, "");
    assert_eq!(
        suspended.expire_ms, active.expire_ms,
        "an explicit suspend keeps the deadline"
    );
    assert!(suspended.suspend_ms.is_some());
    assert_eq!(suspended.resume_lease_id(), "a/2");
    assert!(matches!(
        s.suspend_step("a", finish).await.unwrap(),
        Transition::Conflict(_)
    ));
    assert_eq!(
        s.counts("t").await.unwrap().0,
        1,
        "still counts against the quota"
    );
    won(s.suspend_step("a", SuspendOp::BeginResume).await.unwrap());
    let again = won(s.suspend_step("a", SuspendOp::AbortResume).await.unwrap());
    assert_eq!(again.status, SessionStatus::Suspended);
    won(s.suspend_step("a", SuspendOp::BeginResume).await.unwrap());
    let resumed = won(s
        .suspend_step(
            "a",
            SuspendOp::FinishResume {
                vm_id: "vm2".into(),
            },
        )
        .await
        .unwrap());
    assert_eq!(
        (resumed.status, resumed.vm_id.as_str()),
        (SessionStatus::Active, "vm2")
    );
    assert_eq!(resumed.expire_ms, active.expire_ms);
    assert!(resumed.resume_ms.is_some());
    assert!(matches!(
        s.suspend_step("missing", SuspendOp::Abort).await.unwrap(),
        Transition::Missing
    ));

    // A suspending step whose owner died is due again after the step claim.
    won(s
        .suspend_step("a", SuspendOp::Begin { at_deadline: false })
        .await
        .unwrap());
    eventually!(
        s.claim_due(10)
            .await
            .unwrap()
            .iter()
            .any(|c| c.id == "a" && c.kind == "reclaimed_suspending")
    );

    // A suspended session still ends at its deadline; any state but ended may end.
    let mut short = new_session("b", "t", Duration::from_millis(300));
    short.lifetime = Duration::from_millis(300);
    s.create(&short, 5).await.unwrap();
    won(s
        .activate("b", "n", &VmShape { id: "vm3", ..shape })
        .await
        .unwrap());
    won(s
        .suspend_step("b", SuspendOp::Begin { at_deadline: false })
        .await
        .unwrap());
    won(s
        .suspend_step(
            "b",
            SuspendOp::Finish {
                snapshot_bytes: 1,
                retention: Duration::from_secs(3600),
            },
        )
        .await
        .unwrap());
    eventually!(
        s.claim_due(10)
            .await
            .unwrap()
            .iter()
            .any(|c| c.id == "b" && c.kind == "expired")
    );
    let ended = s.get("b").await.unwrap().unwrap();
    assert_eq!(ended.status, SessionStatus::Terminating);
    assert_eq!(
        ended.snapshot_id, "s1-b",
        "the teardown finds the snapshot to delete"
    );
    assert!(
        ended.end_message.contains("suspended"),
        "{}",
        ended.end_message
    );

    // auto_suspend: parked at the deadline, then kept for the retention.
    let mut parked = new_session("c", "t", Duration::from_millis(300));
    parked.auto_suspend = true;
    parked.auto_resume = true;
    s.create(&parked, 5).await.unwrap();
    let rec = won(s
        .activate("c", "n", &VmShape { id: "vm4", ..shape })
        .await
        .unwrap());
    assert!(rec.auto_suspend && rec.auto_resume);
    eventually!(
        s.claim_due(10)
            .await
            .unwrap()
            .iter()
            .any(|c| c.id == "c" && c.kind == "suspend")
    );
    let claimed = s.get("c").await.unwrap().unwrap();
    assert_eq!(claimed.status, SessionStatus::Suspending);
    assert!(claimed.suspended_at_deadline);
    let kept = won(s
        .suspend_step(
            "c",
            SuspendOp::Finish {
                snapshot_bytes: 1,
                retention: Duration::from_secs(3600),
            },
        )
        .await
        .unwrap());
    let kept_for = kept.expire_ms.unwrap() - kept.suspend_ms.unwrap();
    assert!((3_599_000..=3_601_000).contains(&kept_for), "{kept_for}");
    won(s.suspend_step("c", SuspendOp::BeginResume).await.unwrap());
    let back = won(s
        .suspend_step(
            "c",
            SuspendOp::FinishResume {
                vm_id: "vm5".into(),
            },
        )
        .await
        .unwrap());
    let lifetime = back.expire_ms.unwrap() - back.resume_ms.unwrap();
    assert_eq!(
        lifetime, 300,
        "a resume after a parking starts a new lifetime"
    );
    assert!(!back.suspended_at_deadline);
    // Ending from the middle of a step is allowed (the step undoes its own work).
    won(s
        .suspend_step("c", SuspendOp::Begin { at_deadline: false })
        .await
        .unwrap());
    won(s
        .begin_end("c", EndReason::Deleted, "bye", None)
        .await
        .unwrap());
    assert!(matches!(
        s.suspend_step("c", SuspendOp::Finish { snapshot_bytes: 1, retention: Duration::from_secs(1) }).await.unwrap(),
        Transition::Conflict(rec) if rec.status == SessionStatus::Terminating
    ));
}

fn new_snapshot(id: &str, tenant: &str, kind: capsa_store::SnapshotKind) -> capsa_store::NewSnapshot {
    capsa_store::NewSnapshot {
        id: id.into(),
        tenant_id: tenant.into(),
        kind,
        name: format!("name of {id}"),
        session_id: "sess".into(),
        node_id: "n".into(),
        template: "default".into(),
        vcpus: 1,
        memory_mib: 512,
        metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
        env_names: vec!["API_KEY".into(), "REGION".into()],
        estimate_bytes: 1000,
    }
}

/// Named snapshots: quota by count and by bytes (estimates reserved while written), tenant
/// scoping, delete, the pending set a reaper settles, and the storage meter (GiB-seconds)
/// fed by named snapshots and suspended sessions alike.
#[tokio::test]
async fn snapshots_are_scoped_counted_metered_and_settled() {
    use capsa_store::snapshots::Step;
    use capsa_store::{Begun, SnapshotKind, SnapshotLimits, SnapshotStatus, SnapshotStore};
    let redis = Redis::start();
    let conn = capsa_store::connect(&redis.url()).await.unwrap();
    let snaps = SnapshotStore::new(conn.clone());
    let limits = SnapshotLimits {
        max_snapshots: 2,
        max_bytes: 2500,
    };
    let claim = Duration::from_secs(60);
    let Begun::Ok(a) = snaps
        .begin(&new_snapshot("snap-a", "t1", SnapshotKind::Named), limits, claim)
        .await
        .unwrap()
    else {
        panic!("first snapshot refused")
    };
    assert_eq!(a.status, SnapshotStatus::Creating);
    assert_eq!(a.metadata.get("k").map(String::as_str), Some("v"));
    assert_eq!(a.env_names, ["API_KEY", "REGION"]);
    // A second estimate of 1000 fits 2500; a third would pass the count.
    let Begun::Ok(b) = snaps
        .begin(&new_snapshot("snap-b", "t1", SnapshotKind::Named), limits, claim)
        .await
        .unwrap()
    else {
        panic!("second snapshot refused")
    };
    assert!(matches!(
        snaps
            .begin(&new_snapshot("snap-c", "t1", SnapshotKind::Named), limits, claim)
            .await
            .unwrap(),
        Begun::TooMany { limit: 2 }
    ));
    // Finished with its real size (1600): the bytes now count 1600 + 1000 reserved.
    let Step::Won(a) = snaps.finish(&a, 1600, claim).await.unwrap() else {
        panic!()
    };
    assert_eq!((a.status, a.size_bytes), (SnapshotStatus::Ready, 1600));
    let Step::Won(_) = snaps.abort(&b).await.unwrap() else {
        panic!()
    };
    // 1600 + an estimate of 1000 passes 2500.
    assert!(matches!(
        snaps
            .begin(&new_snapshot("snap-d", "t1", SnapshotKind::Named), limits, claim)
            .await
            .unwrap(),
        Begun::TooManyBytes { limit: 2500, used: 1600 }
    ));
    let meter = snaps.meter("t1").await.unwrap();
    assert_eq!(
        (meter.count, meter.named_bytes, meter.reserved_bytes, meter.bytes),
        (1, 1600, 0, 1600)
    );
    // Another tenant sees none of it and cannot delete it.
    assert!(snaps.get("t2", "snap-a").await.unwrap().is_none());
    assert!(snaps.list("t2").await.unwrap().is_empty());
    assert!(matches!(
        snaps.begin_delete("t2", "snap-a", claim).await.unwrap(),
        Step::Missing
    ));
    assert_eq!(snaps.list("t1").await.unwrap(), vec![a.clone()]);
    // GiB-seconds accrue while it is held.
    let held = snaps.meter("t1").await.unwrap().gib_seconds;
    eventually!(snaps.meter("t1").await.unwrap().gib_seconds > held);

    // Fork snapshots are neither listed nor counted, and stay pending until removed: the
    // reaper claims them once due (here at once), one caller at a time.
    let Begun::Ok(f) = snaps
        .begin(&new_snapshot("fork-f", "t1", SnapshotKind::Fork), limits, claim)
        .await
        .unwrap()
    else {
        panic!()
    };
    let Step::Won(f) = snaps.finish(&f, 5000, Duration::ZERO).await.unwrap() else {
        panic!()
    };
    assert!(snaps.get("t1", "fork-f").await.unwrap().is_none());
    assert_eq!(snaps.meter("t1").await.unwrap().count, 1);
    eventually!(!snaps.claim_pending(10, claim).await.unwrap().is_empty());
    assert!(snaps.claim_pending(10, claim).await.unwrap().is_empty(), "claimed once");
    let Step::Won(_) = snaps.remove(&f).await.unwrap() else {
        panic!()
    };
    assert!(snaps.get_any("fork-f").await.unwrap().is_none());

    // Delete: deleting (pending, so a dead replica's delete is redone), then removed.
    let Step::Won(d) = snaps.begin_delete("t1", "snap-a", Duration::ZERO).await.unwrap() else {
        panic!()
    };
    assert_eq!(d.status, SnapshotStatus::Deleting);
    eventually!(snaps.claim_pending(10, claim).await.unwrap().len() == 1);
    let Step::Won(_) = snaps.remove(&d).await.unwrap() else {
        panic!()
    };
    let meter = snaps.meter("t1").await.unwrap();
    assert_eq!((meter.count, meter.named_bytes, meter.bytes), (0, 0, 0));
    let billed = meter.gib_seconds;
    assert!(billed > 0.0);

    // A suspended session's snapshot is on the meter from its suspend to its resume.
    let s = store(&redis, StoreConfig::default()).await;
    s.create(&new_session("ss", "t1", Duration::from_secs(60)), 10)
        .await
        .unwrap();
    let shape = VmShape {
        id: "vm1",
        vcpus: 1,
        memory_mib: 512,
    };
    s.activate("ss", "n", &shape).await.unwrap();
    s.suspend_step("ss", SuspendOp::Begin { at_deadline: false })
        .await
        .unwrap();
    s.suspend_step(
        "ss",
        SuspendOp::Finish {
            snapshot_bytes: 1 << 30,
            retention: Duration::from_secs(60),
        },
    )
    .await
    .unwrap();
    let meter = snaps.meter("t1").await.unwrap();
    assert_eq!((meter.count, meter.bytes), (0, 1 << 30), "not a named snapshot");
    eventually!(snaps.meter("t1").await.unwrap().gib_seconds > billed);
    s.suspend_step("ss", SuspendOp::BeginResume).await.unwrap();
    s.suspend_step(
        "ss",
        SuspendOp::FinishResume {
            vm_id: "vm2".into(),
        },
    )
    .await
    .unwrap();
    let meter = snaps.meter("t1").await.unwrap();
    assert_eq!(meter.bytes, 0);
    // Suspended again and ended: the end takes it off the meter.
    s.suspend_step("ss", SuspendOp::Begin { at_deadline: false })
        .await
        .unwrap();
    s.suspend_step(
        "ss",
        SuspendOp::Finish {
            snapshot_bytes: 4096,
            retention: Duration::from_secs(60),
        },
    )
    .await
    .unwrap();
    assert_eq!(snaps.meter("t1").await.unwrap().bytes, 4096);
    s.begin_end("ss", EndReason::Deleted, "", None).await.unwrap();
    assert_eq!(snaps.meter("t1").await.unwrap().bytes, 4096, "until the teardown");
    s.finish_end("ss", "").await.unwrap();
    assert_eq!(snaps.meter("t1").await.unwrap().bytes, 0);
}
