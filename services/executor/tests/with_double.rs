//! The executor as a real process in front of an in-test agent double: limits, cancellation,
//! backpressure and error mapping, where the agent's behaviour must be scripted.

mod common;

use std::time::Duration;

use bytes::Bytes;
use capsa_proto::common::v1::UploadHeader;
use capsa_proto::executor::v1::*;
use capsa_test_support::eventually;
use common::fake_agent::{FakeAgent, UploadOutcome};
use common::{Node, collect, python, run, start_execute, with_timeout};
use futures::StreamExt as _;
use sha2::Digest as _;
use tonic::Code;

const VM: &str = "vm-double";

#[tokio::test]
async fn events_arrive_in_order_with_the_completion_last() {
    let node = Node::start(&[]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    let run = run(&mut client, VM, python("lines:200")).await;
    let expected: String = (0..200).map(|i| format!("{i}\n")).collect();
    assert_eq!(String::from_utf8(run.stdout.clone()).unwrap(), expected);
    assert_eq!(run.events.len(), 201);
    let completion = run.completion();
    // The guest's own measurements pass through unchanged.
    assert_eq!(
        completion.wall_time,
        Some(prost_types::Duration {
            seconds: 0,
            nanos: 1_000_000
        })
    );
    assert_eq!(
        completion.cpu_time,
        Some(prost_types::Duration {
            seconds: 0,
            nanos: 500_000
        })
    );
}

#[tokio::test]
async fn bad_and_unknown_vm_ids() {
    let node = Node::start(&[]).await;
    let mut client = node.client().await;
    let err = client
        .execute(ExecuteRequest {
            vm_id: "../../etc".into(),
            spec: Some(python("1")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("vm_id"), "{}", err.message());

    let err = client
        .list_files(ListFilesRequest {
            vm_id: "vm-elsewhere".into(),
            path: "/".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("not on this node"),
        "{}",
        err.message()
    );
    // Marked, so session-manager can tell a gone VM from a missing file in a live one.
    assert!(err.metadata().contains_key(capsa_grpc::VM_GONE_METADATA));

    let err = client
        .execute(ExecuteRequest {
            vm_id: "vm-elsewhere".into(),
            spec: Some(python("1")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let err = client
        .execute(ExecuteRequest {
            vm_id: VM.into(),
            spec: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("`spec`"), "{}", err.message());
}

#[tokio::test]
async fn an_agent_that_never_answers_hits_the_first_event_limit() {
    let node = Node::start(&["--first-event-timeout-ms", "300"]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    let run = collect(start_execute(&mut client, VM, python("hang")).await).await;
    let err = run.error.expect("the stream fails");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("time-to-first-event"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_silent_stream_hits_the_total_limit_and_the_agent_call_is_dropped() {
    let node = Node::start(&["--stream-grace-ms", "300", "--idle-timeout-ms", "100"]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    let spec = with_timeout(python("silent"), Duration::from_millis(200));
    let run = collect(start_execute(&mut client, VM, spec).await).await;
    let err = run.error.expect("the stream fails");
    // idle = max(100 ms, 200 ms + 300 ms) never undercuts the total: the total limit fires.
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(
        err.message().contains("total stream time"),
        "{}",
        err.message()
    );
    eventually!(agent.cancelled() == 1);
}

#[tokio::test]
async fn a_stream_that_ends_without_completion_is_unavailable() {
    let node = Node::start(&[]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    let run = collect(start_execute(&mut client, VM, python("nocompletion")).await).await;
    assert_eq!(run.stdout, b"partial\n");
    let err = run.error.expect("the stream fails");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("without a completion"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_agent_call() {
    let node = Node::start(&[]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    let mut stream = start_execute(&mut client, VM, python("park")).await;
    let first = stream.message().await.unwrap().unwrap();
    assert!(format!("{first:?}").contains("parked"));
    assert_eq!(agent.cancelled(), 0);
    drop(stream);
    eventually!(agent.cancelled() == 1);
    // The kernel gate was released: the next execute runs.
    let run = run(&mut client, VM, python("after")).await;
    assert_eq!(run.stdout, b"after");
}

#[tokio::test]
async fn a_slow_client_does_not_grow_the_executors_memory() {
    let node = Node::start(&[]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    // Warm up the channel and the allocator so the baseline is a steady state.
    run(&mut client, VM, python("flood:4")).await;
    let before = node.executor_rss();

    let mut stream = start_execute(&mut client, VM, python("flood:256")).await;
    let mut received = 0usize;
    let mut peak = before;
    while let Some(message) = stream.message().await.unwrap() {
        if let Some(capsa_proto::common::v1::ExecuteEvent {
            event: Some(capsa_proto::common::v1::execute_event::Event::Stdout(c)),
        }) = message.event
        {
            received += c.data.len();
        }
        // A slow reader: the agent could produce 256 MiB far faster than this drains it.
        if received.is_multiple_of(4 << 20) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            peak = peak.max(node.executor_rss());
        }
    }
    assert_eq!(received, 256 << 20);
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 48 << 20,
        "executor RSS grew by {} MiB relaying 256 MiB",
        growth >> 20
    );
}

fn header(path: &str, size: Option<u64>) -> UploadFileRequest {
    UploadFileRequest {
        part: Some(upload_file_request::Part::Header(UploadFileHeader {
            vm_id: VM.into(),
            file: Some(UploadHeader {
                path: path.into(),
                size,
                ..Default::default()
            }),
        })),
    }
}

fn data(bytes: impl Into<Bytes>) -> UploadFileRequest {
    UploadFileRequest {
        part: Some(upload_file_request::Part::Data(bytes.into())),
    }
}

#[tokio::test]
async fn uploads_are_forwarded_whole() {
    let node = Node::start(&[]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    let chunks: Vec<Bytes> = (0..8u8).map(|i| Bytes::from(vec![i; 1 << 20])).collect();
    let mut sha = sha2::Sha256::new();
    chunks.iter().for_each(|c| sha.update(c));
    let requests =
        std::iter::once(header("/data/a.bin", Some(8 << 20))).chain(chunks.into_iter().map(data));
    let result = client
        .upload_file(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(result.result.unwrap().sha256, hex::encode(sha.finalize()));
    assert_eq!(
        agent.uploads(),
        [UploadOutcome {
            path: "/data/a.bin".into(),
            bytes: 8 << 20,
            clean_end: true
        }]
    );
}

#[tokio::test]
async fn an_upload_whose_client_breaks_off_is_never_committed() {
    let node = Node::start(&[]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header("/data/partial.bin", Some(2000)))
        .await
        .unwrap();
    tx.send(data(vec![1u8; 1000])).await.unwrap();
    let call = tokio::spawn(async move {
        client
            .upload_file(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    eventually!(tx.capacity() == 4); // the executor took both messages
    // The client goes away mid-upload. Its cancel reads as a clean end of stream on the
    // executor's side; the declared size is what gives it away.
    call.abort();
    eventually!(!agent.uploads().is_empty());
    let outcome = &agent.uploads()[0];
    assert!(
        !outcome.clean_end,
        "a broken upload must not look finished: {outcome:?}"
    );
}

#[tokio::test]
async fn an_upload_shorter_than_declared_is_rejected_and_not_committed() {
    let node = Node::start(&[]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    let requests = vec![header("/x", Some(100)), data(vec![0u8; 10])];
    let err = client
        .upload_file(futures::stream::iter(requests))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("`size`"), "{}", err.message());
    eventually!(!agent.uploads().is_empty());
    assert!(!agent.uploads()[0].clean_end);

    let requests = vec![header("/y", Some(5)), data(vec![0u8; 10])];
    let err = client
        .upload_file(futures::stream::iter(requests))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("`data`"), "{}", err.message());
}

#[tokio::test]
async fn an_upload_with_a_second_header_is_rejected_and_not_committed() {
    let node = Node::start(&[]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    let requests = vec![header("/x", None), data(vec![0u8; 10]), header("/y", None)];
    let err = client
        .upload_file(futures::stream::iter(requests))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("header"), "{}", err.message());
    eventually!(!agent.uploads().is_empty());
    assert!(!agent.uploads()[0].clean_end);

    let err = client
        .upload_file(futures::stream::iter(vec![data(vec![0u8; 1])]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn downloads_are_relayed_in_order() {
    let node = Node::start(&[]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    let mut stream = client
        .download_file(DownloadFileRequest {
            vm_id: VM.into(),
            path: "/gen/20".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(
        matches!(first.part, Some(download_file_response::Part::Info(ref i)) if i.size == 20 << 20)
    );
    let mut chunks = 0u64;
    while let Some(message) = stream.next().await {
        let Some(download_file_response::Part::Data(d)) = message.unwrap().part else {
            panic!("info after data");
        };
        assert!(d.iter().all(|b| *b == (chunks % 251) as u8));
        chunks += 1;
    }
    assert_eq!(chunks, 20);

    let err = client
        .download_file(DownloadFileRequest {
            vm_id: VM.into(),
            path: "/missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn unary_calls_reach_the_agent_and_its_verdicts_pass_through() {
    let node = Node::start(&[]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    let env = [("GREETING".to_string(), "hi".to_string())].into();
    client
        .configure_vm(ConfigureVmRequest {
            vm_id: VM.into(),
            env,
        })
        .await
        .unwrap();
    assert_eq!(
        agent
            .state
            .env
            .lock()
            .unwrap()
            .get("GREETING")
            .map(String::as_str),
        Some("hi")
    );

    let stats = client
        .get_guest_stats(GetGuestStatsRequest { vm_id: VM.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.process_count, stats.uptime_ms), (7, 1234));

    let files = client
        .list_files(ListFilesRequest {
            vm_id: VM.into(),
            path: "/srv".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(files.files[0].path, "/srv/a.txt");
    let err = client
        .list_files(ListFilesRequest {
            vm_id: VM.into(),
            path: "srv".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "field `path` must be absolute");
    let err = client
        .remove_file(RemoveFileRequest {
            vm_id: VM.into(),
            path: "/d".into(),
            recursive: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let bad_env = [("A=B".to_string(), "x".to_string())].into();
    let err = client
        .configure_vm(ConfigureVmRequest {
            vm_id: VM.into(),
            env: bad_env,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_vm_whose_agent_is_not_listening_is_unavailable() {
    let node = Node::start(&["--call-timeout-ms", "20000"]).await;
    let dir = tempfile::tempdir().unwrap();
    // The socket exists (the VM is on this node) but nothing in the guest listens yet.
    let _vm = node.add_vm(VM, &dir.path().join("nobody.sock"));
    let mut client = node.client().await;
    let err = client
        .get_guest_stats(GetGuestStatsRequest { vm_id: VM.into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(VM), "{}", err.message());
}
