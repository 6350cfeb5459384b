//! Execute and file calls relayed to the node: event order, ended sessions, a VM that
//! fails mid-stream, client disconnects, and the file calls.

mod common;

use bytes::Bytes;
use capsa_proto::common::v1::{UploadHeader, execute_event::Event};
use capsa_proto::session::v1 as pb;
use capsa_test_support::eventually;
use common::{Harness, create, get};
use sha2::{Digest as _, Sha256};
use tonic::Code;

fn exec(id: &str, code: &str) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        session_id: id.into(),
        code: code.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn execute_streams_the_nodes_events_in_order() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let mut stream = c
        .execute(exec(&s.id, "print(1)"))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        events.push(msg.event.unwrap().event.unwrap());
    }
    let names: Vec<String> = events
        .iter()
        .map(|e| match e {
            Event::Stdout(o) => format!("out:{}", String::from_utf8_lossy(&o.data)),
            Event::Stderr(o) => format!("err:{}", String::from_utf8_lossy(&o.data)),
            Event::Completion(_) => "done".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        [
            "out:line 0\n",
            "out:line 1\n",
            "out:line 2\n",
            "err:warn\n",
            "done"
        ]
    );
    // The node got the vm id and the spec with defaults filled in.
    let sent = h.node.state().executes[0].clone();
    assert_eq!(sent.vm_id, s.vm_id);
    let spec = sent.spec.unwrap();
    assert_eq!(spec.code, "print(1)");
    assert_eq!(spec.timeout.unwrap().seconds, 60);
    // Activity was recorded.
    let ms = |t: Option<prost_types::Timestamp>| {
        t.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
    };
    eventually!(ms(get(&mut c, &s.id).await.last_active_time) > ms(s.last_active_time));
}

#[tokio::test]
async fn execute_on_an_ended_session_names_the_end() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    c.delete_session(pb::DeleteSessionRequest {
        session_id: s.id.clone(),
    })
    .await
    .unwrap();
    let err = c.execute(exec(&s.id, "1")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("TERMINATED") && err.message().contains("DELETED"),
        "{}",
        err.message()
    );
    let err = c
        .list_files(pb::ListFilesRequest {
            session_id: s.id.clone(),
            path: "/".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(h.node.state().executes.is_empty());
}

#[tokio::test]
async fn a_vm_that_fails_mid_execute_ends_the_session_vm_failed() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let mut stream = c
        .execute(exec(&s.id, "fail-vm"))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(
        first.event.unwrap().event.unwrap(),
        Event::Stdout(_)
    ));
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("VM_FAILED") && err.message().contains("vmm exited"),
        "{}",
        err.message()
    );
    eventually!(get(&mut c, &s.id).await.status == pb::SessionStatus::Terminated as i32);
    let ended = get(&mut c, &s.id).await;
    assert_eq!(ended.end_reason, pb::EndReason::VmFailed as i32);
    assert_eq!(h.node.state().releases[&s.vm_id], 1);
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_upstream_execute() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let held = h.node.doubles.held.clone();
    let mut stream = c.execute(exec(&s.id, "hold")).await.unwrap().into_inner();
    held.notified().await;
    assert!(stream.message().await.unwrap().is_some());
    drop(stream);
    eventually!(h.node.state().cancelled_executes == 1);
    // The session is fine and serves the next call.
    let mut next = c.execute(exec(&s.id, "x")).await.unwrap().into_inner();
    while next.message().await.unwrap().is_some() {}
}

#[tokio::test]
async fn files_upload_download_and_the_unary_calls() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let data: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 251) as u8).collect();
    let header = pb::UploadFileHeader {
        session_id: s.id.clone(),
        file: Some(UploadHeader {
            path: "/work/data.bin".into(),
            mode: 0o600,
            ..Default::default()
        }),
    };
    let mut msgs = vec![pb::UploadFileRequest {
        part: Some(pb::upload_file_request::Part::Header(header.clone())),
    }];
    for chunk in data.chunks(1 << 20) {
        msgs.push(pb::UploadFileRequest {
            part: Some(pb::upload_file_request::Part::Data(Bytes::copy_from_slice(
                chunk,
            ))),
        });
    }
    let up = c
        .upload_file(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(up.sha256, hex::encode(Sha256::digest(&data)));
    assert_eq!(up.info.unwrap().mode, 0o600);

    let mut down = c
        .download_file(pb::DownloadFileRequest {
            session_id: s.id.clone(),
            path: "/work/data.bin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::download_file_response::Part::Info(info)) =
        down.message().await.unwrap().unwrap().part
    else {
        panic!("info first")
    };
    assert_eq!(info.size, data.len() as u64);
    let mut got = Vec::new();
    while let Some(m) = down.message().await.unwrap() {
        let Some(pb::download_file_response::Part::Data(d)) = m.part else {
            panic!("data after info")
        };
        assert!(d.len() <= 1 << 20);
        got.extend_from_slice(&d);
    }
    assert_eq!(got, data);

    let files = c
        .list_files(pb::ListFilesRequest {
            session_id: s.id.clone(),
            path: "/work".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .files;
    assert_eq!(files.len(), 1);
    let info = c
        .get_file_info(pb::GetFileInfoRequest {
            session_id: s.id.clone(),
            path: "/work/data.bin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.info.unwrap().size, data.len() as u64);
    let dir = c
        .make_directory(pb::MakeDirectoryRequest {
            session_id: s.id.clone(),
            path: "/work/sub".into(),
            mode: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dir.info.unwrap().mode, 0o755);
    c.remove_file(pb::RemoveFileRequest {
        session_id: s.id.clone(),
        path: "/work/data.bin".into(),
        recursive: false,
    })
    .await
    .unwrap();
    // The node's NOT_FOUND reaches the client as NOT_FOUND.
    let err = c
        .get_file_info(pb::GetFileInfoRequest {
            session_id: s.id.clone(),
            path: "/work/data.bin".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Upload framing: header first, only once, chunks of at most 1 MiB.
    let data_msg = |n: usize| pb::UploadFileRequest {
        part: Some(pb::upload_file_request::Part::Data(Bytes::from(vec![
            0u8;
            n
        ]))),
    };
    let head = || pb::UploadFileRequest {
        part: Some(pb::upload_file_request::Part::Header(header.clone())),
    };
    for (msgs, field) in [
        (vec![data_msg(1)], "header"),
        (vec![head(), data_msg(1), head()], "header"),
        (vec![head(), data_msg((1 << 20) + 1)], "data"),
    ] {
        let err = c.upload_file(tokio_stream::iter(msgs)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(field), "{}", err.message());
    }
}

/// A VMM that just died: the executor no longer finds the VM's socket (NOT_FOUND, marked)
/// while vm-pool still reports it running. The client must never get that NOT_FOUND: the
/// call waits for vm-pool to confirm the failure (then UNAVAILABLE and VM_FAILED), and a VM
/// that still looks alive after the confirmation window is UNAVAILABLE, session untouched.
#[tokio::test]
async fn a_vm_whose_socket_vanished_is_confirmed_with_vm_pool_never_not_found() {
    use capsa_proto::vmpool::v1::VmState;
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let list = |id: &str| pb::ListFilesRequest {
        session_id: id.to_owned(),
        path: "/".into(),
    };

    // vm-pool still says running and never changes: UNAVAILABLE, the session stays ACTIVE.
    let alive = create(&mut c, None).await;
    h.node.state().sockets_gone.insert(alive.vm_id.clone());
    let err = c.list_files(list(&alive.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains("not reachable"), "{}", err.message());
    assert_eq!(
        get(&mut c, &alive.id).await.status,
        pb::SessionStatus::Active as i32
    );

    // vm-pool notices the dead VMM a second later: the call ends the session VM_FAILED.
    let dying = create(&mut c, None).await;
    h.node.state().sockets_gone.insert(dying.vm_id.clone());
    let state = h.node.doubles.state.clone();
    let vm_id = dying.vm_id.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let mut st = state.lock().unwrap();
        let vm = st.vms.get_mut(&vm_id).unwrap();
        vm.state = VmState::Failed as i32;
        vm.failure = "vmm killed by signal 9".into();
    });
    let err = c.list_files(list(&dying.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    eventually!(get(&mut c, &dying.id).await.status == pb::SessionStatus::Terminated as i32);
    assert_eq!(
        get(&mut c, &dying.id).await.end_reason,
        pb::EndReason::VmFailed as i32
    );
}
