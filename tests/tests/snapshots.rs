//! Named snapshots, templates and forks on real VMs through the public API: a snapshot of a
//! running session (which runs on) starts new sessions with its variables, files and a
//! pip-installed package; a fork into 3 gives three independent copies of the live state;
//! another tenant sees none of it; bad input names its field; deleting a snapshot frees its
//! disk and its quota.

use std::time::Duration;

use capsa_e2e::exec::{python_stdout as py, shell_stdout as sh};
use capsa_e2e::{Client, Stack, StackOptions, disk_usage};
use capsa_proto::common::v1::EgressPolicy;
use capsa_proto::session::v1 as pb;

fn assert_invalid(result: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains(field), "{field}: {status:?}");
}

fn assert_not_found(result: Result<impl std::fmt::Debug, tonic::Status>) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}

async fn delete(c: &mut Client, sid: &str) {
    c.delete_session(pb::DeleteSessionRequest {
        session_id: sid.into(),
    })
    .await
    .expect("delete");
}

async fn tenant_snapshots(c: &mut Client) -> (u32, u64) {
    let usage = c
        .get_tenant_usage(pb::GetTenantUsageRequest {})
        .await
        .expect("tenant usage")
        .into_inner();
    (usage.snapshots, usage.snapshot_bytes)
}

#[tokio::test]
async fn snapshots_make_templates_and_forks_diverge_and_other_tenants_see_nothing() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut c = stack.client(0).await;
    let mut hostile = stack
        .client_with_key(0, &stack.new_tenant_key("hostile-tenant"))
        .await;
    let parent = c
        .create_session(pb::CreateSessionRequest {
            lifetime: Some(capsa_proto::time::duration(Duration::from_secs(1800))),
            egress: Some(EgressPolicy {
                allow_package_managers: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .session
        .unwrap();
    let snapshots_dir = stack.vm_state_dir().join("snapshots");
    let disk_before = disk_usage(&snapshots_dir);

    // "Install my packages once".
    sh(
        &mut c,
        &parent.id,
        "pip install --no-cache-dir --disable-pip-version-check tabulate==0.9.0 >/root/pip.log 2>&1 || { cat /root/pip.log; exit 1; }",
    )
    .await;
    py(&mut c, &parent.id, "x = 41\nimport tabulate").await;
    sh(&mut c, &parent.id, "echo template > /root/made.txt").await;

    // Bad input names its field and makes nothing.
    let named = |name: &str| pb::SnapshotSessionRequest {
        session_id: parent.id.clone(),
        name: name.into(),
        metadata: Default::default(),
    };
    assert_invalid(c.snapshot_session(named("")).await, "name");
    assert_invalid(c.snapshot_session(named(&"n".repeat(129))).await, "name");
    assert_invalid(c.snapshot_session(named("a\nb")).await, "name");
    assert_invalid(
        c.get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: "not-a-snapshot".into(),
        })
        .await,
        "snapshot_id",
    );
    for count in [0, 9] {
        assert_invalid(
            c.fork_session(pb::ForkSessionRequest {
                session_id: parent.id.clone(),
                count,
                ..Default::default()
            })
            .await,
            "count",
        );
    }
    assert_eq!(tenant_snapshots(&mut c).await.0, 0);

    let snap = c
        .snapshot_session(pb::SnapshotSessionRequest {
            metadata: [("purpose".to_string(), "e2e".to_string())].into(),
            ..named("with tabulate")
        })
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap.status(), pb::SnapshotStatus::Ready);
    assert_eq!(
        (snap.session_id.as_str(), snap.name.as_str()),
        (parent.id.as_str(), "with tabulate")
    );
    assert!(snap.size_bytes > 1 << 20, "{snap:?}");
    assert!(disk_usage(&snapshots_dir) > disk_before + (1 << 20));
    let (count, bytes) = tenant_snapshots(&mut c).await;
    assert_eq!((count, bytes), (1, snap.size_bytes));
    let listed = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        listed.snapshots.iter().map(|s| &s.id).collect::<Vec<_>>(),
        [&snap.id]
    );
    // The parent ran on and changes after the snapshot stay its own.
    assert_eq!(
        py(&mut c, &parent.id, "x = 100\nprint(x)").await.trim(),
        "100"
    );

    // Another tenant sees none of it, and cannot use or remove it.
    let snap_id = || pb::GetSnapshotRequest {
        snapshot_id: snap.id.clone(),
    };
    assert_not_found(hostile.get_snapshot(snap_id()).await);
    assert_not_found(
        hostile
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snap.id.clone(),
            })
            .await,
    );
    assert_not_found(
        hostile
            .create_session(pb::CreateSessionRequest {
                snapshot_id: snap.id.clone(),
                ..Default::default()
            })
            .await,
    );
    assert_not_found(
        hostile
            .snapshot_session(pb::SnapshotSessionRequest {
                session_id: parent.id.clone(),
                name: "stolen".into(),
                metadata: Default::default(),
            })
            .await,
    );
    assert_not_found(
        hostile
            .fork_session(pb::ForkSessionRequest {
                session_id: parent.id.clone(),
                count: 1,
                ..Default::default()
            })
            .await,
    );
    let theirs = hostile
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(theirs.snapshots.is_empty(), "{theirs:?}");
    assert_eq!(tenant_snapshots(&mut hostile).await, (0, 0));

    // A template: a new session starts from the snapshot, with what it had then.
    assert_invalid(
        c.create_session(pb::CreateSessionRequest {
            snapshot_id: snap.id.clone(),
            vcpus: snap.vcpus + 1,
            ..Default::default()
        })
        .await,
        "vcpus",
    );
    let from_template = c
        .create_session(pb::CreateSessionRequest {
            snapshot_id: snap.id.clone(),
            ..Default::default()
        })
        .await
        .expect("create from the snapshot")
        .into_inner()
        .session
        .unwrap();
    assert_eq!(from_template.status(), pb::SessionStatus::Active);
    assert_eq!(from_template.source_snapshot_id, snap.id);
    assert_ne!(from_template.vm_id, parent.vm_id);
    assert_eq!(
        py(
            &mut c,
            &from_template.id,
            "print(x, tabulate.__version__, open('/root/made.txt').read().strip())"
        )
        .await
        .trim(),
        "41 0.9.0 template"
    );
    // Its own identity, not the parent's.
    assert_ne!(
        sh(&mut c, &from_template.id, "cat /etc/machine-id").await,
        sh(&mut c, &parent.id, "cat /etc/machine-id").await
    );
    delete(&mut c, &from_template.id).await;

    // Fork into 3: each sees the parent's live state, then goes its own way.
    let forks = c
        .fork_session(pb::ForkSessionRequest {
            session_id: parent.id.clone(),
            count: 3,
            ..Default::default()
        })
        .await
        .expect("fork")
        .into_inner()
        .sessions;
    assert_eq!(forks.len(), 3);
    for (i, fork) in forks.iter().enumerate() {
        assert_eq!(fork.status(), pb::SessionStatus::Active);
        assert_eq!(fork.parent_session_id, parent.id);
        assert_eq!(py(&mut c, &fork.id, "print(x)").await.trim(), "100");
        py(&mut c, &fork.id, &format!("x = {i}")).await;
        sh(&mut c, &fork.id, &format!("echo {i} > /root/fork.txt")).await;
    }
    for (i, fork) in forks.iter().enumerate() {
        assert_eq!(
            py(
                &mut c,
                &fork.id,
                "print(x, open('/root/fork.txt').read().strip())"
            )
            .await
            .trim(),
            format!("{i} {i}")
        );
    }
    assert_eq!(
        py(
            &mut c,
            &parent.id,
            "import os\nprint(x, os.path.exists('/root/fork.txt'))"
        )
        .await
        .trim(),
        "100 False"
    );
    // A fork's snapshot is only a means: it is gone once the forks run.
    assert_eq!(tenant_snapshots(&mut c).await.0, 1);
    for fork in &forks {
        delete(&mut c, &fork.id).await;
    }

    // Deleting the snapshot frees its disk and its quota; then it is gone.
    let deleted = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.id.clone(),
        })
        .await
        .expect("delete snapshot")
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(deleted.id, snap.id);
    assert_not_found(c.get_snapshot(snap_id()).await);
    assert_eq!(tenant_snapshots(&mut c).await, (0, 0));
    let disk_after = disk_usage(&snapshots_dir);
    assert!(
        disk_after <= disk_before,
        "the snapshots' space is freed: {disk_before} -> {disk_after}"
    );
    assert_not_found(
        c.create_session(pb::CreateSessionRequest {
            snapshot_id: snap.id.clone(),
            ..Default::default()
        })
        .await,
    );
    delete(&mut c, &parent.id).await;
}
