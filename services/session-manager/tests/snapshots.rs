//! Named snapshots, templates and forks against the node doubles: the session runs on
//! after a snapshot, a template session starts from it, a fork makes all its children or
//! none and leaves no fork snapshot behind, a failed snapshot leaves no record and no
//! quota used, the quota (count and bytes) refuses with RESOURCE_EXHAUSTED, another tenant
//! gets NOT_FOUND. The real thing (VMs saved and restored) is in tests/tests/snapshots.rs.

mod common;

use capsa_proto::session::v1 as pb;
use common::{Client, Harness, create};
use tonic::Code;

async fn snapshot(c: &mut Client, session_id: &str) -> Result<pb::Snapshot, tonic::Status> {
    c.snapshot_session(pb::SnapshotSessionRequest {
        session_id: session_id.into(),
        name: "base".into(),
        metadata: Default::default(),
    })
    .await
    .map(|r| r.into_inner().snapshot.unwrap())
}

async fn fork(
    c: &mut Client,
    session_id: &str,
    count: u32,
) -> Result<Vec<pb::Session>, tonic::Status> {
    c.fork_session(pb::ForkSessionRequest {
        session_id: session_id.into(),
        count,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().sessions)
}

async fn usage(c: &mut Client) -> pb::GetTenantUsageResponse {
    c.get_tenant_usage(pb::GetTenantUsageRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_snapshot_is_a_template_and_a_fork_makes_all_its_sessions_or_none() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let parent = c
        .create_session(pb::CreateSessionRequest {
            lifetime: Some(capsa_proto::time::duration(std::time::Duration::from_secs(
                600,
            ))),
            env: [("API_TOKEN".to_owned(), "secret".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();

    let snap = snapshot(&mut c, &parent.id).await.unwrap();
    assert_eq!(snap.status(), pb::SnapshotStatus::Ready);
    assert_eq!(
        (snap.size_bytes, snap.node_id.as_str()),
        (4096, common::NODE_ID)
    );
    assert!(snap.id.starts_with("snap-"), "{}", snap.id);
    {
        let st = h.node.state();
        assert!(st.snapshots.contains_key(&snap.id));
        assert!(st.vms.contains_key(&parent.vm_id), "the parent runs on");
    }
    let u = usage(&mut c).await;
    assert_eq!((u.snapshots, u.snapshot_bytes), (1, 4096));
    assert_eq!(u.snapshot_limit, 20);

    let template = c
        .create_session(pb::CreateSessionRequest {
            snapshot_id: snap.id.clone(),
            env: [("REGION".to_owned(), "eu".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(template.status(), pb::SessionStatus::Active);
    assert_eq!(template.source_snapshot_id, snap.id);
    // The snapshot's env names (the values are in its memory) and the request's own.
    assert_eq!(template.env_names, ["API_TOKEN", "REGION"]);
    assert!(template.env.is_empty());
    assert_ne!(template.vm_id, parent.vm_id);
    // The session takes the snapshot's template and shape; another one asked for names the
    // field and what to send instead.
    for (request, message) in [
        (
            pb::CreateSessionRequest {
                template: "python-ml".into(),
                ..Default::default()
            },
            format!(
                "invalid `template`: \"python-ml\" differs from snapshot {}'s \"default\" (leave it empty)",
                snap.id
            ),
        ),
        (
            pb::CreateSessionRequest {
                vcpus: 2,
                ..Default::default()
            },
            format!(
                "invalid `vcpus`: 2 differs from snapshot {}'s 1 (leave it 0)",
                snap.id
            ),
        ),
        (
            pb::CreateSessionRequest {
                memory_mib: 1024,
                ..Default::default()
            },
            format!(
                "invalid `memory_mib`: 1024 differs from snapshot {}'s 512 (leave it 0)",
                snap.id
            ),
        ),
    ] {
        let err = c
            .create_session(pb::CreateSessionRequest {
                snapshot_id: snap.id.clone(),
                ..request
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::InvalidArgument, message.as_str())
        );
    }

    let forks = fork(&mut c, &parent.id, 3).await.unwrap();
    assert_eq!(forks.len(), 3);
    let mut vms: Vec<&str> = forks.iter().map(|f| f.vm_id.as_str()).collect();
    vms.sort();
    vms.dedup();
    assert_eq!(vms.len(), 3, "each fork has its own VM");
    for f in &forks {
        assert_eq!(f.status(), pb::SessionStatus::Active);
        assert_eq!(f.parent_session_id, parent.id);
        // The parent's env went with its kernels' memory: its names are listed, no value.
        assert_eq!(f.env_names, ["API_TOKEN"]);
        assert!(f.env.is_empty());
        assert_eq!(
            f.expire_time.unwrap().seconds - f.create_time.unwrap().seconds,
            600
        );
    }
    {
        // The fork's snapshot was only a means: removed once restored, and never counted.
        let st = h.node.state();
        let fork_snaps: Vec<&String> = st
            .deleted_snapshots
            .iter()
            .filter(|id| id.starts_with("fork-"))
            .collect();
        assert_eq!(fork_snaps.len(), 1, "{:?}", st.deleted_snapshots);
        assert!(!st.snapshots.contains_key(fork_snaps[0]));
    }
    assert_eq!(usage(&mut c).await.snapshots, 1);

    // A node that cannot restore: no fork is left running, and none counts.
    let active_before = usage(&mut c).await.active_sessions;
    h.node.state().fail_resume = Some("restore broke".into());
    let err = fork(&mut c, &parent.id, 2).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("restore broke"), "{err:?}");
    assert_eq!(usage(&mut c).await.active_sessions, active_before);
    h.node.state().fail_resume = None;

    // A node that cannot write it: no record, no quota used, the session runs on.
    h.node.state().fail_suspend = Some("disk full".into());
    let err = snapshot(&mut c, &parent.id).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("disk full"), "{err:?}");
    h.node.state().fail_suspend = None;
    let listed = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.snapshots.len(), 1, "{listed:?}");
    assert_eq!(usage(&mut c).await.snapshots, 1);
    assert_eq!(
        common::get(&mut c, &parent.id).await.status(),
        pb::SessionStatus::Active
    );

    // Deleting it removes its files on the node and its record; sessions made from it stay.
    let deleted = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(deleted.id, snap.id);
    assert!(h.node.state().deleted_snapshots.contains(&snap.id));
    let gone = c
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: snap.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let u = usage(&mut c).await;
    assert_eq!((u.snapshots, u.snapshot_bytes), (0, 0));
    assert_eq!(
        common::get(&mut c, &template.id).await.status(),
        pb::SessionStatus::Active
    );
}

#[tokio::test]
async fn the_snapshot_quota_counts_snapshots_and_bytes() {
    let mut h = Harness::start(0).await;
    h.extra_args = vec!["--max-snapshots-per-tenant".into(), "2".into()];
    h.add_replica().await;
    let mut c = h.client(0).await;
    let s = create(&mut c, Some(600)).await;
    snapshot(&mut c, &s.id).await.unwrap();
    let second = snapshot(&mut c, &s.id).await.unwrap();
    let err = snapshot(&mut c, &s.id).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limit of 2 snapshots"), "{err:?}");
    // Deleting one makes room again.
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: second.id,
    })
    .await
    .unwrap();
    snapshot(&mut c, &s.id).await.unwrap();

    // An operator's limit for one tenant overrides the server's: t1 may now hold 3, while
    // t2 keeps the default of 2.
    let out = h.admin(&[
        "set-tenant-limits",
        "--tenant",
        "t1",
        "--max-snapshots",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "max_snapshots 3\n");
    snapshot(&mut c, &s.id).await.unwrap();
    let err = snapshot(&mut c, &s.id).await.unwrap_err();
    assert!(err.message().contains("limit of 3 snapshots"), "{err:?}");
    let t2 = h.new_key("t2").await;
    let mut other = h.client_with(0, Some(&format!("Bearer {t2}"))).await;
    let s2 = create(&mut other, Some(600)).await;
    for _ in 0..2 {
        snapshot(&mut other, &s2.id).await.unwrap();
    }
    let err = snapshot(&mut other, &s2.id).await.unwrap_err();
    assert!(err.message().contains("limit of 2 snapshots"), "{err:?}");

    // Bytes: a snapshot may take the session's memory, so 256 MiB leave no room for a
    // 512 MiB session's.
    let mut h = Harness::start(0).await;
    h.extra_args = vec![
        "--max-snapshot-bytes-per-tenant".into(),
        (256u64 << 20).to_string(),
    ];
    h.add_replica().await;
    let mut c = h.client(0).await;
    let s = create(&mut c, Some(600)).await;
    let err = snapshot(&mut c, &s.id).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("bytes"), "{err:?}");
    assert!(h.node.state().snapshots.is_empty());
    // Unless the operator gives this tenant more.
    let out = h.admin(&[
        "set-tenant-limits",
        "--tenant",
        "t1",
        "--max-snapshot-bytes",
        &(1u64 << 30).to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    snapshot(&mut c, &s.id).await.unwrap();
}

#[tokio::test]
async fn another_tenant_and_bad_input_get_clear_errors() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, Some(600)).await;
    let snap = snapshot(&mut c, &s.id).await.unwrap();
    let other_key = h.new_key("t2").await;
    let mut other = h.client_with(0, Some(&format!("Bearer {other_key}"))).await;

    let codes = [
        snapshot(&mut other, &s.id).await.unwrap_err().code(),
        fork(&mut other, &s.id, 1).await.unwrap_err().code(),
        other
            .get_snapshot(pb::GetSnapshotRequest {
                snapshot_id: snap.id.clone(),
            })
            .await
            .unwrap_err()
            .code(),
        other
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snap.id.clone(),
            })
            .await
            .unwrap_err()
            .code(),
        other
            .create_session(pb::CreateSessionRequest {
                snapshot_id: snap.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
    ];
    assert_eq!(codes, [Code::NotFound; 5]);
    let theirs = other
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.snapshots.is_empty());
    assert_eq!(usage(&mut other).await.snapshots, 0);
    assert!(
        h.node.state().snapshots.contains_key(&snap.id),
        "still there"
    );

    let invalid = |r: Result<(), tonic::Status>, field: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {e:?}");
    };
    let named = |name: &str| pb::SnapshotSessionRequest {
        session_id: s.id.clone(),
        name: name.into(),
        metadata: Default::default(),
    };
    invalid(c.snapshot_session(named("")).await.map(drop), "name");
    invalid(c.snapshot_session(named("a\u{7}b")).await.map(drop), "name");
    invalid(
        c.snapshot_session(named(&"x".repeat(129))).await.map(drop),
        "name",
    );
    invalid(
        c.snapshot_session(pb::SnapshotSessionRequest {
            metadata: [(String::new(), "v".to_string())].into(),
            ..named("ok")
        })
        .await
        .map(drop),
        "metadata",
    );
    for id in ["", "snap-XYZ", "fork-0123456789abcdef0123456789abcdef"] {
        invalid(
            c.get_snapshot(pb::GetSnapshotRequest {
                snapshot_id: id.into(),
            })
            .await
            .map(drop),
            "snapshot_id",
        );
        invalid(
            c.delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: id.into(),
            })
            .await
            .map(drop),
            "snapshot_id",
        );
    }
    invalid(
        c.create_session(pb::CreateSessionRequest {
            snapshot_id: "nope".into(),
            ..Default::default()
        })
        .await
        .map(drop),
        "snapshot_id",
    );
    invalid(
        c.create_session(pb::CreateSessionRequest {
            snapshot_id: snap.id.clone(),
            memory_mib: 1024,
            ..Default::default()
        })
        .await
        .map(drop),
        "memory_mib",
    );
    invalid(
        c.list_snapshots(pb::ListSnapshotsRequest {
            page_size: 1001,
            ..Default::default()
        })
        .await
        .map(drop),
        "page_size",
    );
    invalid(
        c.list_snapshots(pb::ListSnapshotsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .map(drop),
        "page_token",
    );
    for count in [0, 9] {
        invalid(fork(&mut c, &s.id, count).await.map(drop), "count");
    }
    invalid(
        c.fork_session(pb::ForkSessionRequest {
            session_id: s.id.clone(),
            count: 1,
            lifetime: common::secs(1),
            ..Default::default()
        })
        .await
        .map(drop),
        "lifetime",
    );
    // A snapshot only of a running session.
    c.delete_session(pb::DeleteSessionRequest {
        session_id: s.id.clone(),
    })
    .await
    .unwrap();
    let e = snapshot(&mut c, &s.id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = fork(&mut c, &s.id, 1).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
}
