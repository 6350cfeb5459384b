//! What a tenant may store and how fast: an unknown template is refused before anything is
//! recorded, and an operator's per-tenant limits (`set-tenant-limits`) override the server's
//! create rate and session cap for that tenant alone.

mod common;

use capsa_proto::session::v1 as pb;
use common::{Harness, create};
use tonic::Code;

#[tokio::test]
async fn an_unknown_template_is_refused_naming_the_offered_ones_and_leaves_no_record() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let err = c
        .create_session(pb::CreateSessionRequest {
            template: "no-such-image".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("`template`")
            && err.message().contains("no-such-image")
            && err.message().contains("offered: default"),
        "{}",
        err.message()
    );
    // Nothing stored, nothing leased, the quota untouched.
    let listed = h
        .store()
        .await
        .list("t1", &Default::default(), 100, None)
        .await
        .unwrap();
    assert!(listed.sessions.is_empty(), "{:?}", listed.sessions);
    assert!(h.node.state().acquires.is_empty());
    let s = create(&mut c, None).await;
    assert_eq!(s.status, pb::SessionStatus::Active as i32);
}

#[tokio::test]
async fn set_tenant_limits_overrides_the_create_rate_and_cap_for_that_tenant_only() {
    let mut h = Harness::start(0).await;
    // Server default: 1 create per second, bursts of 2. t1 refills once per 100 s: no token
    // comes back during the test.
    h.create_limit = (1.0, 2);
    h.add_replica().await;
    let mut generous = h.client(0).await;
    let other_key = h.new_key("t2").await;
    let mut default_tenant = h.client_with(0, Some(&format!("Bearer {other_key}"))).await;

    let out = h.admin(&[
        "set-tenant-limits",
        "--tenant",
        "t1",
        "--create-rate",
        "0.01",
        "--create-burst",
        "5",
        "--max-sessions",
        "4",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "create_burst 5\ncreate_rate 0.01\nmax_sessions 4\n"
    );

    // t1 gets its own burst of 5 but its own cap of 4 sessions stops the fifth.
    for _ in 0..4 {
        create(&mut generous, None).await;
    }
    let err = generous
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limit of 4"), "{}", err.message());
    // The sixth create (the bucket is empty now) is rate limited at t1's own rate.
    let err = generous
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("0.01 per second, bursts of 5"),
        "{}",
        err.message()
    );

    // t2 still has the server default: a burst of 2, then refused at 1 per second.
    for _ in 0..2 {
        create(&mut default_tenant, None).await;
    }
    let err = default_tenant
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert!(
        err.message().contains("1 per second, bursts of 2"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn set_tenant_limits_refuses_half_a_rate_and_nonsense() {
    let h = Harness::start(0).await;
    for args in [
        &["--create-rate", "2"][..],
        &["--create-burst", "2"],
        &["--create-rate", "0", "--create-burst", "2"],
        &["--create-rate", "fast", "--create-burst", "2"],
        &["--create-rate", "1", "--create-burst", "0"],
    ] {
        let mut all = vec!["set-tenant-limits", "--tenant", "t1"];
        all.extend_from_slice(args);
        let out = h.admin(&all);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--create-"),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let limits = h.keys().await.tenant_limits("t1").await.unwrap();
    assert!(limits.is_empty(), "{limits:?}");
}
