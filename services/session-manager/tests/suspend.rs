//! Suspend and resume against the node doubles: the state machine, its failures (each
//! leaves the session ACTIVE, SUSPENDED or ended, never in between), auto_resume,
//! auto_suspend at the deadline, expiry and deletion of a suspended session (its snapshot
//! goes), another tenant, and bad input. The real thing (a VM saved and restored) is in
//! tests/tests/suspend.rs.

mod common;

use std::time::Duration;

use capsa_proto::session::v1 as pb;
use capsa_test_support::eventually;
use common::{Client, Harness, create, get, secs};
use tonic::Code;

async fn suspend(c: &mut Client, id: &str) -> Result<pb::Session, tonic::Status> {
    c.suspend_session(pb::SuspendSessionRequest {
        session_id: id.into(),
    })
    .await
    .map(|r| r.into_inner().session.unwrap())
}

async fn resume(c: &mut Client, id: &str) -> Result<pb::Session, tonic::Status> {
    c.resume_session(pb::ResumeSessionRequest {
        session_id: id.into(),
    })
    .await
    .map(|r| r.into_inner().session.unwrap())
}

async fn run(c: &mut Client, id: &str) -> Result<(), tonic::Status> {
    let req = pb::ExecuteRequest {
        session_id: id.into(),
        code: "print(1)".into(),
        ..Default::default()
    };
    let mut stream = c.execute(req).await?.into_inner();
    while stream.message().await?.is_some() {}
    Ok(())
}

async fn create_with(
    c: &mut Client,
    lifetime: i64,
    auto_suspend: bool,
    auto_resume: bool,
) -> pb::Session {
    let req = pb::CreateSessionRequest {
        lifetime: secs(lifetime),
        auto_suspend,
        auto_resume,
        ..Default::default()
    };
    c.create_session(req)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
}

#[tokio::test]
async fn suspend_and_resume_move_the_session_to_a_new_vm_and_bill_nothing_between() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, Some(600)).await;

    let suspended = suspend(&mut c, &s.id).await.unwrap();
    assert_eq!(suspended.status, pb::SessionStatus::Suspended as i32);
    assert_eq!(suspended.vm_id, "", "a suspended session has no vm");
    assert_eq!(suspended.snapshot_bytes, 4096);
    assert!(suspended.suspend_time.is_some());
    assert_eq!(suspended.expire_time, s.expire_time, "the deadline stays");
    {
        let st = h.node.state();
        assert!(st.vms.is_empty(), "the vm is gone: {:?}", st.vms);
        assert_eq!(st.snapshots.len(), 1);
        assert_eq!(
            st.parked,
            std::slice::from_ref(&s.vm_id),
            "metering parked the vm before the suspend"
        );
    }
    // Idempotent, and calls that need the VM say what to do.
    assert_eq!(
        suspend(&mut c, &s.id).await.unwrap().status,
        pb::SessionStatus::Suspended as i32
    );
    let err = run(&mut c, &s.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("SUSPENDED") && err.message().contains("ResumeSession"),
        "{}",
        err.message()
    );
    // Extending a suspended session is allowed: it keeps it longer.
    let extended = c
        .extend_session(pb::ExtendSessionRequest {
            session_id: s.id.clone(),
            extend_by: secs(60),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(
        extended.expire_time.unwrap().seconds,
        s.expire_time.unwrap().seconds + 60
    );

    let resumed = resume(&mut c, &s.id).await.unwrap();
    assert_eq!(resumed.status, pb::SessionStatus::Active as i32);
    assert!(
        !resumed.vm_id.is_empty() && resumed.vm_id != s.vm_id,
        "{} -> {}",
        s.vm_id,
        resumed.vm_id
    );
    assert_eq!(resumed.snapshot_bytes, 0);
    {
        let st = h.node.state();
        let vm = &st.vms[&resumed.vm_id];
        assert_eq!(
            vm.lease_id,
            format!("{}/1", s.id),
            "a new lease id per resume"
        );
        assert!(
            st.acquire_egress[&vm.lease_id].is_some(),
            "the session's egress policy goes along"
        );
        assert!(
            st.snapshots.is_empty(),
            "the snapshot is deleted once resumed"
        );
    }
    assert_eq!(
        resume(&mut c, &s.id).await.unwrap().vm_id,
        resumed.vm_id,
        "idempotent"
    );
    run(&mut c, &s.id).await.unwrap();

    // A second round uses the next generation.
    suspend(&mut c, &s.id).await.unwrap();
    assert!(
        h.node
            .state()
            .snapshots
            .contains_key(&format!("s2-{}", s.id))
    );
    let again = resume(&mut c, &s.id).await.unwrap();
    assert_eq!(
        h.node.state().vms[&again.vm_id].lease_id,
        format!("{}/2", s.id)
    );
}

#[tokio::test]
async fn auto_resume_brings_a_suspended_session_back_on_execute_and_file_calls() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create_with(&mut c, 600, false, true).await;
    assert!(s.auto_resume && !s.auto_suspend);
    suspend(&mut c, &s.id).await.unwrap();
    run(&mut c, &s.id).await.unwrap();
    let now = get(&mut c, &s.id).await;
    assert_eq!(now.status, pb::SessionStatus::Active as i32);
    assert_ne!(now.vm_id, s.vm_id);
    suspend(&mut c, &s.id).await.unwrap();
    let listed = c
        .list_files(pb::ListFilesRequest {
            session_id: s.id.clone(),
            path: "/root".into(),
        })
        .await;
    assert!(listed.is_ok(), "{listed:?}");
    assert_eq!(
        get(&mut c, &s.id).await.status,
        pb::SessionStatus::Active as i32
    );
}

#[tokio::test]
async fn a_failed_suspend_leaves_the_session_active_and_a_failed_resume_leaves_it_suspended() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, Some(600)).await;

    h.node.state().fail_suspend = Some("disk full".into());
    let err = suspend(&mut c, &s.id).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("disk full") && err.message().contains("still ACTIVE"),
        "{}",
        err.message()
    );
    let now = get(&mut c, &s.id).await;
    assert_eq!(now.status, pb::SessionStatus::Active as i32);
    assert_eq!(now.vm_id, s.vm_id);
    run(&mut c, &s.id).await.unwrap();

    h.node.state().fail_suspend = None;
    suspend(&mut c, &s.id).await.unwrap();
    h.node.state().fail_resume = Some("node is full".into());
    let err = resume(&mut c, &s.id).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("node is full") && err.message().contains("still SUSPENDED"),
        "{}",
        err.message()
    );
    assert_eq!(
        get(&mut c, &s.id).await.status,
        pb::SessionStatus::Suspended as i32
    );
    assert_eq!(
        h.node.state().snapshots.len(),
        1,
        "the snapshot is kept for a retry"
    );

    h.node.state().fail_resume = None;
    assert_eq!(
        resume(&mut c, &s.id).await.unwrap().status,
        pb::SessionStatus::Active as i32
    );

    // A snapshot the node lost: nothing to resume from, so the session ends.
    suspend(&mut c, &s.id).await.unwrap();
    h.node.state().snapshots.clear();
    let err = resume(&mut c, &s.id).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let ended = get(&mut c, &s.id).await;
    assert_eq!(ended.status, pb::SessionStatus::Terminated as i32);
    assert_eq!(ended.end_reason, pb::EndReason::VmFailed as i32);
    assert!(
        ended.end_message.contains("snapshot"),
        "{}",
        ended.end_message
    );
}

#[tokio::test]
async fn deleting_or_expiring_a_suspended_session_deletes_its_snapshot() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let deleted = create(&mut c, Some(600)).await;
    suspend(&mut c, &deleted.id).await.unwrap();
    let ended = c
        .delete_session(pb::DeleteSessionRequest {
            session_id: deleted.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(ended.status, pb::SessionStatus::Terminated as i32);
    assert_eq!(
        h.node.state().deleted_snapshots,
        [format!("s1-{}", deleted.id)]
    );
    assert!(h.node.state().snapshots.is_empty());
    assert!(
        h.node.state().finalized.contains(&deleted.id),
        "usage finalized"
    );

    let expiring = create(&mut c, Some(10)).await;
    suspend(&mut c, &expiring.id).await.unwrap();
    eventually!(
        get(&mut c, &expiring.id).await.status == pb::SessionStatus::Terminated as i32,
        30
    );
    let ended = get(&mut c, &expiring.id).await;
    assert_eq!(ended.end_reason, pb::EndReason::Expired as i32);
    assert!(
        ended.end_message.contains("suspended"),
        "{}",
        ended.end_message
    );
    assert!(h.node.state().snapshots.is_empty());
}

#[tokio::test]
async fn auto_suspend_parks_a_session_at_its_deadline_and_the_resume_gives_it_a_new_lifetime() {
    let mut h = Harness::start(0).await;
    h.extra_args = vec!["--suspended-retention-secs".into(), "3600".into()];
    h.add_replica().await;
    let mut c = h.client(0).await;
    let s = create_with(&mut c, 10, true, true).await;
    eventually!(
        get(&mut c, &s.id).await.status == pb::SessionStatus::Suspended as i32,
        30
    );
    let parked = get(&mut c, &s.id).await;
    let kept_for = parked.expire_time.unwrap().seconds - parked.suspend_time.unwrap().seconds;
    assert!(
        (3590..=3610).contains(&kept_for),
        "kept {kept_for}s, the retention"
    );
    assert!(h.node.state().vms.is_empty());
    // Not ended at its old deadline: watched for 3 s past it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        get(&mut c, &s.id).await.status,
        pb::SessionStatus::Suspended as i32
    );
    run(&mut c, &s.id).await.unwrap();
    let back = get(&mut c, &s.id).await;
    assert_eq!(back.status, pb::SessionStatus::Active as i32);
    let lifetime = back.expire_time.unwrap().seconds - back.last_active_time.unwrap().seconds;
    assert!(
        (8..=12).contains(&lifetime),
        "a new 10 s lifetime, got {lifetime}s"
    );
}

#[tokio::test]
async fn another_tenant_and_bad_input_get_clear_errors() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, Some(600)).await;
    let other_key = h.new_key("t2").await;
    let mut other = h.client_with(0, Some(&format!("Bearer {other_key}"))).await;
    for err in [
        suspend(&mut other, &s.id).await.unwrap_err(),
        resume(&mut other, &s.id).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }
    assert_eq!(
        get(&mut c, &s.id).await.status,
        pb::SessionStatus::Active as i32
    );
    for bad in ["", "no such/id"] {
        let err = suspend(&mut c, bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("session_id"), "{}", err.message());
    }
    let err = resume(&mut c, &s.id).await;
    assert_eq!(
        err.unwrap().status,
        pb::SessionStatus::Active as i32,
        "resuming an active session is a no-op"
    );
    c.delete_session(pb::DeleteSessionRequest {
        session_id: s.id.clone(),
    })
    .await
    .unwrap();
    let err = suspend(&mut c, &s.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("TERMINATED"), "{}", err.message());
    let mut anonymous = h.client_with(0, None).await;
    assert_eq!(
        suspend(&mut anonymous, &s.id).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}
