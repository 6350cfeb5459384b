//! The executor as a real process in front of the real guest agent (`capsa-agent` running
//! as a plain process on a Unix socket, behind a hybrid-vsock proxy), with the host's
//! python3 and bash as kernels. Build the agent first: run these with
//! `cargo nextest run -p capsa-executor -p capsa-guest-agent`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use capsa_proto::common::v1::{CompletionStatus, UploadHeader, execute_event::Event};
use capsa_proto::executor::v1::*;
use common::{Node, RealAgent, collect, python, run, shell, start_execute, with_timeout};
use futures::StreamExt as _;
use sha2::Digest as _;
use tonic::Code;

const VM: &str = "vm-real";

/// A generous bound for things that must end but whose speed is not under test.
const ENDS_WITHIN: Duration = Duration::from_secs(60);

async fn setup() -> (Node, RealAgent, capsa_test_support::HybridVsockProxy) {
    let node = Node::start(&[]).await;
    let agent = RealAgent::start().await;
    let proxy = node.add_vm(VM, &agent.socket);
    (node, agent, proxy)
}

#[tokio::test]
async fn python_and_shell_state_persists_through_the_executor() {
    let (node, _agent, _vm) = setup().await;
    let mut client = node.client().await;
    let r = run(&mut client, VM, python("x = 42")).await;
    assert_eq!(r.completion().status(), CompletionStatus::Ok);
    assert_eq!(
        run(&mut client, VM, python("x"))
            .await
            .result_text()
            .as_deref(),
        Some("42")
    );
    let r = run(&mut client, VM, python("print(x)")).await;
    assert_eq!(r.stdout, b"42\n");
    // The guest's own measurements arrive with the completion.
    assert!(r.completion().wall_time.is_some(), "{:?}", r.completion());

    run(&mut client, VM, shell("export GREETING=hello; cd /tmp")).await;
    let r = run(&mut client, VM, shell("echo $GREETING from $(pwd)")).await;
    assert_eq!(r.stdout, b"hello from /tmp\n");
    let r = run(&mut client, VM, shell("(exit 3)")).await;
    assert_eq!(
        (r.completion().status(), r.completion().exit_code),
        (CompletionStatus::Error, 3)
    );
}

#[tokio::test]
async fn output_is_relayed_while_the_code_still_runs() {
    let (node, _agent, _vm) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let mut client = node.client().await;
    // The code cannot finish until the test has seen its first output: an executor that
    // held output back until the end would deadlock here and the code would time out.
    let code = format!(
        "import os, time\nprint('waiting', flush=True)\nwhile not os.path.exists({go:?}):\n    time.sleep(0.01)\nprint('done')",
        go = go.display().to_string()
    );
    let mut stream = start_execute(
        &mut client,
        VM,
        with_timeout(python(&code), Duration::from_secs(30)),
    )
    .await;
    // print() may write its text and its newline separately: gather until the line is in.
    let mut seen = Vec::new();
    while !seen.ends_with(b"\n") {
        match stream
            .message()
            .await
            .unwrap()
            .unwrap()
            .event
            .unwrap()
            .event
            .unwrap()
        {
            Event::Stdout(c) => seen.extend_from_slice(&c.data),
            other => panic!("expected output before anything else: {other:?}"),
        }
    }
    assert_eq!(seen, b"waiting\n");
    std::fs::write(&go, b"").unwrap();
    let rest = collect(stream).await;
    assert_eq!(rest.stdout, b"done\n");
    assert_eq!(rest.completion().status(), CompletionStatus::Ok);
    assert!(matches!(rest.events.last(), Some(Event::Completion(_))));
}

#[tokio::test]
async fn a_user_timeout_is_data_in_the_completion_not_a_stream_error() {
    let (node, _agent, _vm) = setup().await;
    let mut client = node.client().await;
    run(&mut client, VM, python("y = 'kept'")).await;
    let spec = with_timeout(python("while True: pass"), Duration::from_secs(1));
    let r = run(&mut client, VM, spec).await;
    assert_eq!(r.completion().status(), CompletionStatus::Timeout);
    assert_eq!(
        run(&mut client, VM, python("print(y)")).await.stdout,
        b"kept\n"
    );
}

#[tokio::test]
async fn a_client_that_goes_away_interrupts_the_guest_code() {
    let (node, _agent, _vm) = setup().await;
    let mut client = node.client().await;
    let code = "x = 7\nprint('started', flush=True)\nimport time\ntime.sleep(100)";
    let mut stream = start_execute(&mut client, VM, python(code)).await;
    let first = stream.message().await.unwrap().unwrap();
    assert!(format!("{first:?}").contains("started"));
    drop(stream);
    // Were the sleep not interrupted, this would queue behind it for 100 s.
    let next = tokio::time::timeout(ENDS_WITHIN, run(&mut client, VM, python("print(x)")))
        .await
        .expect("the kernel was freed by the interrupt");
    assert_eq!(next.completion().status(), CompletionStatus::Ok);
    assert_eq!(next.stdout, b"7\n");
}

#[tokio::test]
async fn an_agent_killed_mid_execute_ends_the_stream_with_unavailable() {
    let (node, agent, _vm) = setup().await;
    let mut client = node.client().await;
    let code = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(100)";
    let mut stream = start_execute(&mut client, VM, python(code)).await;
    let first = stream
        .message()
        .await
        .unwrap()
        .unwrap()
        .event
        .unwrap()
        .event
        .unwrap();
    let Event::Stdout(chunk) = first else {
        panic!("{first:?}")
    };
    let kernel_pid: i32 = String::from_utf8_lossy(&chunk.data).trim().parse().unwrap();

    // SAFETY: kill(2) on processes this test started.
    unsafe { libc::kill(agent.process.pid() as i32, libc::SIGKILL) };
    let ended = tokio::time::timeout(ENDS_WITHIN, collect(stream))
        .await
        .expect("stream ends");
    // SAFETY: as above; the kernel has its own process group and would outlive the agent.
    unsafe {
        libc::kill(-kernel_pid, libc::SIGKILL);
        libc::kill(kernel_pid, libc::SIGKILL);
    }
    let err = ended
        .error
        .expect("an infrastructure failure, not a completion");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(VM), "{}", err.message());
}

#[tokio::test]
async fn a_slow_client_does_not_grow_the_executors_memory() {
    let (node, _agent, _vm) = setup().await;
    let mut client = node.client().await;
    run(&mut client, VM, python("print('warm')")).await;
    let before = node.executor_rss();
    let code =
        "import sys\nb = b'x' * 65536\nfor _ in range(4096):\n    sys.stdout.buffer.write(b)";
    let mut spec = with_timeout(python(code), Duration::from_secs(600));
    spec.max_output_bytes = 512 << 20;
    let mut stream = start_execute(&mut client, VM, spec).await;
    let (mut received, mut next_pause, mut peak) = (0usize, 0usize, before);
    let mut completion = None;
    while let Some(message) = stream.message().await.unwrap() {
        match message.event.unwrap().event.unwrap() {
            Event::Stdout(c) => received += c.data.len(),
            Event::Completion(c) => completion = Some(c),
            other => panic!("{other:?}"),
        }
        if received >= next_pause {
            next_pause += 8 << 20;
            tokio::time::sleep(Duration::from_millis(50)).await;
            peak = peak.max(node.executor_rss());
        }
    }
    assert_eq!(received, 256 << 20);
    assert_eq!(completion.unwrap().status(), CompletionStatus::Ok);
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 48 << 20,
        "executor RSS grew by {} MiB relaying 256 MiB",
        growth >> 20
    );
}

#[tokio::test]
async fn a_50_mib_file_round_trips_intact() {
    let (node, _agent, _vm) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("nested/dir/blob.bin").display().to_string();
    let mut client = node.client().await;

    // 50 chunks of distinct pseudo-random bytes, hashed as they are generated.
    let chunk = |i: u64| -> Bytes {
        let mut state = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..1 << 20)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect::<Vec<u8>>()
            .into()
    };
    let mut sha = sha2::Sha256::new();
    for i in 0..50 {
        sha.update(chunk(i));
    }
    let expected = hex::encode(sha.finalize());
    let header = UploadFileRequest {
        part: Some(upload_file_request::Part::Header(UploadFileHeader {
            vm_id: VM.into(),
            file: Some(UploadHeader {
                path: remote.clone(),
                mode: 0o600,
                size: Some(50 << 20),
                ..Default::default()
            }),
        })),
    };
    let data = futures::stream::iter(0..50).map(move |i| UploadFileRequest {
        part: Some(upload_file_request::Part::Data(chunk(i))),
    });
    let result = client
        .upload_file(futures::stream::iter([header]).chain(data))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(result.sha256, expected);
    assert_eq!(
        result.info.as_ref().map(|i| (i.size, i.mode)),
        Some((50 << 20, 0o600))
    );

    let mut stream = client
        .download_file(DownloadFileRequest {
            vm_id: VM.into(),
            path: remote.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(download_file_response::Part::Info(info)) = stream.next().await.unwrap().unwrap().part
    else {
        panic!("the download starts with the file's info");
    };
    assert_eq!(info.size, 50 << 20);
    let mut sha = sha2::Sha256::new();
    let mut size = 0;
    while let Some(message) = stream.next().await {
        let Some(download_file_response::Part::Data(d)) = message.unwrap().part else {
            panic!("only data after the info");
        };
        assert!(d.len() <= 1 << 20);
        size += d.len();
        sha.update(&d);
    }
    assert_eq!(size, 50 << 20);
    assert_eq!(hex::encode(sha.finalize()), expected);

    let info = client
        .get_file_info(GetFileInfoRequest {
            vm_id: VM.into(),
            path: remote.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.size, 50 << 20);
    let err = client
        .get_file_info(GetFileInfoRequest {
            vm_id: VM.into(),
            path: "relative/path".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("path"), "{}", err.message());
    let stats = client
        .get_guest_stats(GetGuestStatsRequest { vm_id: VM.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        stats.memory_total_bytes > 0 && stats.process_count > 0,
        "{stats:?}"
    );
}

#[tokio::test]
async fn configured_env_reaches_the_kernels() {
    let (node, _agent, _vm) = setup().await;
    let mut client = node.client().await;
    let env = [("CAPSA_TEST_COLOR".to_string(), "teal".to_string())].into();
    client
        .configure_vm(ConfigureVmRequest {
            vm_id: VM.into(),
            env,
        })
        .await
        .unwrap();
    let r = run(
        &mut client,
        VM,
        python("import os; print(os.environ['CAPSA_TEST_COLOR'])"),
    )
    .await;
    assert_eq!(r.stdout, b"teal\n");
    let r = run(&mut client, VM, shell("echo $CAPSA_TEST_COLOR")).await;
    assert_eq!(r.stdout, b"teal\n");
}

#[tokio::test]
async fn an_upload_that_ends_short_leaves_nothing_behind_in_the_guest() {
    let (node, _agent, _vm) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("short.bin").display().to_string();
    let mut client = node.client().await;
    let header = UploadFileRequest {
        part: Some(upload_file_request::Part::Header(UploadFileHeader {
            vm_id: VM.into(),
            file: Some(UploadHeader {
                path: remote.clone(),
                size: Some(2 << 20),
                ..Default::default()
            }),
        })),
    };
    let data = UploadFileRequest {
        part: Some(upload_file_request::Part::Data(Bytes::from(vec![
            7u8;
            1 << 20
        ]))),
    };
    let err = client
        .upload_file(futures::stream::iter([header, data]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The agent rejected the abort marker and dropped its temp file: nothing at all remains.
    capsa_test_support::eventually!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    let err = client
        .get_file_info(GetFileInfoRequest {
            vm_id: VM.into(),
            path: remote,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A missing file in a live VM is not a gone VM.
    assert!(!err.metadata().contains_key(capsa_grpc::VM_GONE_METADATA));
}

#[tokio::test]
async fn a_value_and_a_figure_over_4_mib_pass_through_the_executor() {
    // tonic's default decode limit is 4 MiB; every hop uses the contract's limit instead,
    // so neither event fails the stream ("decoded message length too large").
    let (node, _agent, _vm) = setup().await;
    let mut client = node.client().await;
    // matplotlib is not installed on the test host: a stand-in pyplot whose figures save
    // as PNGs of 5 MB.
    let fake = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(fake.path().join("matplotlib")).unwrap();
    std::fs::write(fake.path().join("matplotlib/__init__.py"), "").unwrap();
    std::fs::write(
        fake.path().join("matplotlib/pyplot.py"),
        "_figs = {}\n\
class _Fig:\n    def savefig(self, buf, format):\n        buf.write(b'\\x89PNG' + b'p' * 4_999_996)\n\
def figure(num=None):\n    num = num or len(_figs) + 1\n    return _figs.setdefault(num, _Fig())\n\
def get_fignums(): return sorted(_figs)\n\
def close(which): _figs.clear()\n",
    )
    .unwrap();
    let code = format!(
        "import sys\nsys.path.insert(0, {:?})\nimport matplotlib.pyplot as plt\nplt.figure()\n'v' * 5_000_000",
        fake.path().display().to_string()
    );
    let r = run(&mut client, VM, python(&code)).await;
    assert_eq!(
        r.completion().status(),
        CompletionStatus::Ok,
        "{:?}",
        r.stderr
    );
    assert_eq!(r.result_text().map(|t| t.len()), Some(5_000_002));
    let pngs: Vec<usize> = r
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Display(d) => d.data.get("image/png").map(|p| p.len()),
            _ => None,
        })
        .collect();
    assert_eq!(pngs, [5_000_000]);
    assert_eq!(r.completion().output_bytes, 10_000_002);
}

#[tokio::test]
async fn result_bytes_count_against_max_output_bytes() {
    let (node, _agent, _vm) = setup().await;
    let mut client = node.client().await;
    let mut spec = python("print('x' * 99)\n'y' * 5_000_000");
    spec.max_output_bytes = 1000;
    let r = run(&mut client, VM, spec).await;
    assert_eq!(r.completion().status(), CompletionStatus::Ok);
    assert_eq!(r.stdout.len(), 100);
    let result = r.result_text().unwrap();
    assert_eq!(result.len(), 900);
    assert!(result.starts_with("'yyy"));
    assert_eq!(r.stderr, b"\n[capsa: output truncated after 1000 bytes]\n");
    assert!(r.completion().output_truncated);
    assert_eq!(r.completion().output_bytes, 100 + 5_000_002);
}
