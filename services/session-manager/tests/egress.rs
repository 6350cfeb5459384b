//! Egress policies through the public API: the policy a create gives (or the tenant's,
//! else the deployment's default, else none) reaches the node's AcquireVm and the record;
//! bad policies are refused naming the field and store nothing; UpdateEgressPolicy applies
//! on the node before it is stored, keeps the old policy when the node fails, needs an
//! ACTIVE session, is serialized per session, and is tenant-scoped.

mod common;

use std::time::Duration;

use capsa_egress::proto::from_proto;
use capsa_proto::common::v1::EgressPolicy;
use capsa_proto::session::v1 as pb;
use capsa_test_support::eventually;
use common::{Client, Harness, create};
use tonic::Code;

fn policy(domains: &[&str], cidrs: &[&str]) -> EgressPolicy {
    EgressPolicy {
        allowed_domains: domains.iter().map(|d| d.to_string()).collect(),
        allowed_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    }
}

/// The policy as the server normalizes it (defaults filled in, names lowercased).
fn normalized(p: &EgressPolicy) -> EgressPolicy {
    capsa_egress::proto::to_proto(&from_proto(p.clone()).unwrap())
}

async fn create_with(c: &mut Client, egress: Option<EgressPolicy>) -> pb::Session {
    c.create_session(pb::CreateSessionRequest {
        egress,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .session
    .unwrap()
}

async fn get_egress(c: &mut Client, id: &str) -> EgressPolicy {
    c.get_egress_policy(pb::GetEgressPolicyRequest {
        session_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .egress
    .unwrap()
}

async fn update(
    c: &mut Client,
    id: &str,
    egress: Option<EgressPolicy>,
) -> Result<EgressPolicy, tonic::Status> {
    c.update_egress_policy(pb::UpdateEgressPolicyRequest {
        session_id: id.into(),
        egress,
    })
    .await
    .map(|r| r.into_inner().egress.unwrap())
}

#[tokio::test]
async fn a_policy_given_at_create_reaches_the_node_and_is_returned() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let mut given = policy(&["PyPI.org", "*.example.com"], &["198.51.100.0/24"]);
    given.allow_http = Some(false);
    let s = create_with(&mut c, Some(given.clone())).await;
    let want = normalized(&given);
    assert_eq!(want.allowed_domains, ["pypi.org", "*.example.com"]);
    assert_eq!(s.egress.as_ref(), Some(&want));
    // Sent with the lease, so it was in force before CreateSession returned.
    assert_eq!(
        h.node.state().acquire_egress[&s.id].as_ref(),
        Some(&want),
        "AcquireVm carried the policy"
    );
    assert_eq!(get_egress(&mut c, &s.id).await, want);
    assert_eq!(common::get(&mut c, &s.id).await.egress, Some(want.clone()));
    let listed = c
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(listed[0].egress, Some(want));
}

#[tokio::test]
async fn without_a_policy_a_session_gets_the_tenant_default_else_the_deployment_default_else_none()
{
    let mut h = Harness::start(1).await;
    // Replica 1 has a deployment default; replica 0 has none.
    h.extra_args = vec![
        "--default-egress".into(),
        r#"{"allow_package_managers": true}"#.into(),
    ];
    h.add_replica().await;
    let mut plain = h.client(0).await;
    let mut with_default = h.client(1).await;

    let s = create(&mut plain, None).await;
    let none = capsa_egress::proto::to_proto(&capsa_egress::EgressPolicy::none());
    assert!(none.deny_all);
    assert_eq!(s.egress.as_ref(), Some(&none));
    assert_eq!(h.node.state().acquire_egress[&s.id].as_ref(), Some(&none));

    let s = create(&mut with_default, None).await;
    let deployment = normalized(&EgressPolicy {
        allow_package_managers: true,
        ..Default::default()
    });
    assert_eq!(get_egress(&mut with_default, &s.id).await, deployment);
    assert_eq!(
        h.node.state().acquire_egress[&s.id].as_ref(),
        Some(&deployment)
    );

    let out = h.admin(&[
        "set-tenant-egress",
        "--tenant",
        "t1",
        "--allow-domain",
        "data.example.org",
        "--no-https",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: capsa_egress::EgressPolicy =
        serde_json::from_slice(&out.stdout).expect("prints the policy as JSON");
    let tenant = capsa_egress::proto::to_proto(&printed);
    assert_eq!(tenant.allowed_domains, ["data.example.org"]);
    assert_eq!(tenant.allow_https, Some(false));
    // The tenant's default wins over the deployment's, on every replica.
    for c in [&mut plain, &mut with_default] {
        let s = create(c, None).await;
        assert_eq!(s.egress.as_ref(), Some(&tenant));
        assert_eq!(h.node.state().acquire_egress[&s.id].as_ref(), Some(&tenant));
    }
    // A policy given at create still wins over both.
    let s = create_with(&mut with_default, Some(policy(&[], &["203.0.113.0/24"]))).await;
    assert_eq!(s.egress.unwrap().allowed_cidrs, ["203.0.113.0/24"]);
    // Another tenant is not affected by t1's default.
    let k2 = h.new_key("t2").await;
    let mut t2 = h.client_with(1, Some(&format!("Bearer {k2}"))).await;
    assert_eq!(create(&mut t2, None).await.egress, Some(deployment.clone()));

    let out = h.admin(&["set-tenant-egress", "--tenant", "t1", "--clear"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no default egress policy"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        create(&mut with_default, None).await.egress,
        Some(deployment)
    );
    assert_eq!(create(&mut plain, None).await.egress, Some(none));

    // A bad flag value is refused (exit 1) naming the entry, and changes nothing.
    let out = h.admin(&[
        "set-tenant-egress",
        "--tenant",
        "t1",
        "--allow-cidr",
        "10.0.0.1/8",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("allowed_cidrs[0]") && err.contains("10.0.0.0/8"),
        "{err}"
    );
    assert_eq!(h.keys().await.tenant_egress("t1").await.unwrap(), None);
}

#[tokio::test]
async fn a_bad_policy_is_refused_naming_the_field_and_stores_nothing() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let too_many: Vec<String> = (0..=capsa_egress::MAX_DOMAINS)
        .map(|i| format!("h{i}.example.com"))
        .collect();
    let cases = [
        (
            policy(&[], &["198.51.100.0/24", "198.51.100.7/24"]),
            "`egress.allowed_cidrs[1]`",
        ),
        (
            policy(&["ok.example", "bad_*.example"], &[]),
            "`egress.allowed_domains[1]`",
        ),
        (policy(&["localhost"], &[]), "`egress.allowed_domains[0]`"),
        (
            EgressPolicy {
                allowed_domains: too_many,
                ..Default::default()
            },
            "`egress.allowed_domains`",
        ),
    ];
    for (bad, field) in cases {
        let err = c
            .create_session(pb::CreateSessionRequest {
                egress: Some(bad),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let listed = h
        .store()
        .await
        .list("t1", &Default::default(), 100, None)
        .await
        .unwrap();
    assert!(listed.sessions.is_empty(), "{:?}", listed.sessions);
    assert!(h.node.state().acquires.is_empty());
}

#[tokio::test]
async fn an_update_is_applied_on_the_node_then_stored() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let new = policy(&["*.pythonhosted.org"], &["198.18.0.0/15"]);
    let returned = update(&mut c, &s.id, Some(new.clone())).await.unwrap();
    let want = normalized(&new);
    assert_eq!(returned, want);
    {
        let st = h.node.state();
        assert_eq!(st.egress_sets, [(s.vm_id.clone(), Some(want.clone()))]);
        assert_eq!(st.egress_applied[&s.vm_id], want);
    }
    assert_eq!(get_egress(&mut c, &s.id).await, want);
    assert_eq!(common::get(&mut c, &s.id).await.egress, Some(want.clone()));

    // Unset egress and invalid ones are refused before the node hears of them.
    let err = update(&mut c, &s.id, None).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("invalid `egress`"),
        "{}",
        err.message()
    );
    let err = update(&mut c, &s.id, Some(policy(&[], &["300.0.0.0/8"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("`egress.allowed_cidrs[0]`"),
        "{}",
        err.message()
    );
    assert_eq!(h.node.state().egress_sets.len(), 1);
    assert_eq!(get_egress(&mut c, &s.id).await, want);

    // Narrowing to nothing works the same way.
    let deny = EgressPolicy {
        deny_all: true,
        ..Default::default()
    };
    assert!(update(&mut c, &s.id, Some(deny)).await.unwrap().deny_all);
    assert!(get_egress(&mut c, &s.id).await.deny_all);
    assert!(h.node.state().egress_applied[&s.vm_id].deny_all);
}

#[tokio::test]
async fn an_update_of_an_ended_session_is_a_failed_precondition() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    c.delete_session(pb::DeleteSessionRequest {
        session_id: s.id.clone(),
    })
    .await
    .unwrap();
    let err = update(&mut c, &s.id, Some(policy(&["pypi.org"], &[])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("TERMINATED"), "{}", err.message());
    assert!(h.node.state().egress_sets.is_empty());
    // The ended session's policy is still readable, unchanged.
    assert!(get_egress(&mut c, &s.id).await.deny_all);
}

#[tokio::test]
async fn a_node_that_fails_the_update_leaves_the_old_policy_stored() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let old = policy(&["pypi.org"], &[]);
    let s = create_with(&mut c, Some(old.clone())).await;
    h.node.state().fail_set_egress = Some("nft failed".into());
    let err = update(&mut c, &s.id, Some(policy(&["evil.example"], &[])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("nft failed") && err.message().contains("node-a"),
        "{}",
        err.message()
    );
    assert_eq!(get_egress(&mut c, &s.id).await, normalized(&old));
    {
        // The new policy was tried, then the stored one put back (a node that timed out may
        // have applied the new one).
        let st = h.node.state();
        let sent: Vec<_> = st
            .egress_sets
            .iter()
            .map(|(_, p)| p.clone().unwrap().allowed_domains)
            .collect();
        assert_eq!(
            sent,
            [vec!["evil.example".to_string()], vec!["pypi.org".into()]]
        );
    }
    // The failed update released its lock: the next one goes through.
    h.node.state().fail_set_egress = None;
    let newer = policy(&["files.pythonhosted.org"], &[]);
    update(&mut c, &s.id, Some(newer.clone())).await.unwrap();
    assert_eq!(get_egress(&mut c, &s.id).await, normalized(&newer));
}

#[tokio::test]
async fn concurrent_updates_of_one_session_are_serialized() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    // The node takes 5 s: the second update comes while the first is surely still there.
    h.node.state().set_egress_delay = Some(Duration::from_secs(5));
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (id1, id2) = (s.id.clone(), s.id.clone());
    let first =
        tokio::spawn(
            async move { update(&mut c1, &id1, Some(policy(&["one.example"], &[]))).await },
        );
    eventually!(h.node.state().egress_arrivals == 1);
    let second = update(&mut c2, &id2, Some(policy(&["two.example"], &[]))).await;
    let first = first.await.unwrap();
    assert_eq!(first.unwrap().allowed_domains, ["one.example"]);
    let err = second.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("in progress"), "{}", err.message());
    // What is stored is what the node applied last.
    let applied = h.node.state().egress_applied[&s.vm_id].clone();
    assert_eq!(get_egress(&mut c, &s.id).await, applied);
    assert_eq!(applied.allowed_domains, ["one.example"]);
    // One after the other, both apply and the later one stays.
    h.node.state().set_egress_delay = None;
    update(&mut c, &s.id, Some(policy(&["two.example"], &[])))
        .await
        .unwrap();
    update(&mut c, &s.id, Some(policy(&["three.example"], &[])))
        .await
        .unwrap();
    let applied = h.node.state().egress_applied[&s.vm_id].clone();
    assert_eq!(applied.allowed_domains, ["three.example"]);
    assert_eq!(get_egress(&mut c, &s.id).await, applied);
}

#[tokio::test]
async fn another_tenant_can_neither_read_nor_change_a_sessions_policy() {
    let h = Harness::start(1).await;
    let mut mine = h.client(0).await;
    let s = create_with(&mut mine, Some(policy(&["pypi.org"], &[]))).await;
    let k2 = h.new_key("t2").await;
    let mut hostile = h.client_with(0, Some(&format!("Bearer {k2}"))).await;
    let err = hostile
        .get_egress_policy(pb::GetEgressPolicyRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let wide_open = policy(&[], &["0.0.0.0/0"]);
    let err = update(&mut hostile, &s.id, Some(wide_open))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Same answer as for an id that does not exist.
    let err = update(&mut hostile, "no-such-session", Some(policy(&[], &[])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(h.node.state().egress_sets.is_empty());
    assert_eq!(
        get_egress(&mut mine, &s.id).await.allowed_domains,
        ["pypi.org"]
    );
}
