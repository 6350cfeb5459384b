//! `capsa-client` against the real stack (real processes, Redis and VMs): the crate's
//! quickstart example, then the handle's promises one by one on one session, then the `capsa`
//! CLI (built on the crate) through the demo `deploy/scripts/up.sh` runs. One stack for the
//! whole file, since VM boots are slow under software emulation.

use std::time::Duration;

use capsa_client::{
    Client, Error, Event, ExecuteOptions, FileType, Session, SessionOptions, SessionStatus, Status,
    UploadOptions,
};
use capsa_e2e::{Stack, StackOptions};
use capsa_proto::vmpool::v1::ListVmsRequest;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use futures::StreamExt as _;
use sha2::Digest as _;

// The example file itself, so the test runs exactly what users read.
#[allow(dead_code)] // its `main` is the example's entry point; the test calls `quickstart`
#[path = "../../shared/capsa-client/examples/quickstart.rs"]
mod quickstart;

#[tokio::test]
async fn the_rust_client_on_a_real_stack() {
    // Two warm VMs: the example's session and the one below.
    let stack = Stack::start(StackOptions {
        warm: 2,
        ..Default::default()
    })
    .await;
    let url = stack.session_managers[0].url();
    let client = Client::connect(&url, &stack.api_key).await.unwrap();

    quickstart::quickstart(&client)
        .await
        .expect("the quickstart example");

    let session = client
        .create_session(SessionOptions::default().lifetime(Duration::from_secs(900)))
        .await
        .unwrap();
    state_persists_across_executes(&session).await;
    events_stream_in_order_while_the_code_runs(&session).await;
    a_timeout_stops_the_code_and_keeps_the_state(&session).await;
    a_mib_goes_up_and_comes_back_through_async_io(&session).await;
    directories_stat_and_remove(&session).await;
    another_tenant_gets_not_found(&stack, &url, session.id()).await;
    a_bad_key_is_unauthenticated(&url).await;
    close_ends_the_session(&stack, &client, session).await;
    the_cli_runs_the_demo_of_up_sh(&url, &stack.api_key).await;
}

async fn state_persists_across_executes(session: &Session) {
    session.run("x = 41").await.unwrap();
    let out = session.run("x += 1\nx").await.unwrap();
    assert!(out.is_ok(), "{out:?}");
    assert_eq!(out.result_text().as_deref(), Some("42"));
    let out = session.run("print(x)").await.unwrap();
    assert_eq!((out.stdout.as_str(), out.exit_code), ("42\n", 0));
    assert!(out.wall_time.is_some() && out.cpu_time.is_some(), "{out:?}");

    // An exception is data, and the state survives it.
    let out = session.run("1 / 0").await.unwrap();
    assert_eq!(out.status, Status::Error);
    assert_eq!(out.error.as_ref().unwrap().name, "ZeroDivisionError");
    // The shell kernel persists too, and shares the VM's files with Python.
    let sh = ExecuteOptions::shell();
    session
        .run_with(
            "cd /tmp && GREETING=hi && echo shell > from-shell",
            sh.clone(),
        )
        .await
        .unwrap();
    let out = session.run_with("echo $GREETING $PWD", sh).await.unwrap();
    assert_eq!(out.stdout, "hi /tmp\n");
    let out = session
        .run("print(open('/tmp/from-shell').read().strip(), x)")
        .await
        .unwrap();
    assert_eq!(out.stdout, "shell 42\n");
}

async fn events_stream_in_order_while_the_code_runs(session: &Session) {
    // The code prints, then waits for a file that the test only creates once it has
    // received that output: the stream cannot finish unless the output arrived early.
    let code = "import os, sys, time\n\
                for i in range(5): print(i)\n\
                print('warn', file=sys.stderr)\n\
                while not os.path.exists('/tmp/go'): time.sleep(0.05)\n\
                print('finished')\n\
                raise ValueError('last')";
    let mut events = session.execute(code).await.unwrap();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while !(stdout.ends_with(b"4\n") && stderr.ends_with(b"warn\n")) {
        match events
            .next()
            .await
            .expect("the stream ended early")
            .unwrap()
        {
            Event::Stdout(b) => stdout.extend_from_slice(&b),
            Event::Stderr(b) => stderr.extend_from_slice(&b),
            other => panic!("expected output while the code waits, got {other:?}"),
        }
    }
    assert_eq!(stdout, b"0\n1\n2\n3\n4\n");
    session
        .upload_from(&b"go"[..], "/tmp/go", UploadOptions::default())
        .await
        .unwrap();
    let rest: Vec<Event> = events.map(|e| e.unwrap()).collect().await;
    // Output comes before the event that follows it; the completion is last.
    let kinds: Vec<&str> = rest
        .iter()
        .map(|e| match e {
            Event::Stdout(_) => "stdout",
            Event::Error(_) => "error",
            Event::Completion(_) => "completion",
            _ => "other",
        })
        .collect();
    let first_error = kinds.iter().position(|k| *k == "error").unwrap();
    assert!(
        kinds[..first_error].iter().all(|k| *k == "stdout")
            && kinds[first_error..] == ["error", "completion"],
        "{kinds:?}"
    );
    let finished: Vec<u8> = rest
        .iter()
        .filter_map(|e| match e {
            Event::Stdout(b) => Some(b.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(finished, b"finished\n");
    let Some(Event::Completion(c)) = rest.last() else {
        unreachable!()
    };
    assert_eq!((c.status, c.exit_code), (Status::Error, 1));
}

async fn a_timeout_stops_the_code_and_keeps_the_state(session: &Session) {
    let options = ExecuteOptions::default().timeout(Duration::from_secs(2));
    let out = session
        .run_with("import time\ntime.sleep(600)", options)
        .await
        .unwrap();
    assert_eq!(out.status, Status::Timeout, "{out:?}");
    assert!(!out.completion.message.is_empty(), "{out:?}");
    assert!(!out.completion.state_lost, "{out:?}");
    let out = session.run("print(x)").await.unwrap();
    assert_eq!(out.stdout, "42\n");
}

async fn a_mib_goes_up_and_comes_back_through_async_io(session: &Session) {
    // Not a multiple of the chunk size, so the last chunk is a short one.
    let data: Vec<u8> = (0..(1 << 20) + 4321)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let sha = hex::encode(sha2::Sha256::digest(&data));
    let options = UploadOptions {
        mode: Some(0o600),
        size: Some(data.len() as u64),
        ..Default::default()
    };
    let up = session
        .upload_from(&data[..], "/root/in/data.bin", options)
        .await
        .unwrap();
    assert_eq!(up.sha256, sha);
    assert_eq!((up.info.size, up.info.mode), (data.len() as u64, 0o600));
    // The VM sees the same bytes.
    let out = session
        .run_with(
            "sha256sum /root/in/data.bin | cut -d' ' -f1",
            ExecuteOptions::shell(),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout.trim(), sha);

    let mut back = Vec::new();
    let down = session
        .download_to("/root/in/data.bin", &mut back)
        .await
        .unwrap();
    assert_eq!(
        (down.bytes, down.sha256.as_str()),
        (data.len() as u64, sha.as_str())
    );
    assert!(back == data, "the downloaded bytes differ");

    // And through local paths.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("copy.bin");
    session
        .download_file("/root/in/data.bin", &local)
        .await
        .unwrap();
    assert!(std::fs::read(&local).unwrap() == data);
    let up = session
        .upload_file(&local, "/root/in/again.bin", UploadOptions::default())
        .await
        .unwrap();
    assert_eq!(up.sha256, sha);
    // A missing remote file is NOT_FOUND, and no local file is left behind.
    let missing = dir.path().join("missing.bin");
    let err = session
        .download_file("/root/in/nope.bin", &missing)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // no_overwrite refuses to replace.
    let options = UploadOptions {
        no_overwrite: true,
        ..Default::default()
    };
    let err = session
        .upload_from(&b"x"[..], "/root/in/again.bin", options)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
}

async fn directories_stat_and_remove(session: &Session) {
    let dir = session.mkdir("/root/work/results").await.unwrap();
    assert_eq!(dir.r#type(), FileType::Directory);
    assert_eq!(dir.mode, 0o755);
    session
        .upload_from(
            &b"a,b\n"[..],
            "/root/work/results/t.csv",
            UploadOptions::default(),
        )
        .await
        .unwrap();
    let file = session.stat("/root/work/results/t.csv").await.unwrap();
    assert_eq!((file.r#type(), file.size), (FileType::Regular, 4));
    let names: Vec<String> = session
        .list_files("/root/work/results")
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, ["t.csv"]);

    let err = session.remove("/root/work").await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    session.remove("/root/work/results/t.csv").await.unwrap();
    session.remove_all("/root/work").await.unwrap();
    let err = session.stat("/root/work").await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

async fn another_tenant_gets_not_found(stack: &Stack, url: &str, id: &str) {
    let other = Client::connect(url, stack.new_tenant_key("t2"))
        .await
        .unwrap();
    let theirs = other.session(id);
    assert!(matches!(theirs.info().await, Err(Error::NotFound(_))));
    assert!(matches!(theirs.run("x").await, Err(Error::NotFound(_))));
    assert!(matches!(
        theirs.download_to("/root/in/data.bin", Vec::new()).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        theirs.stat("/root").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(theirs.close().await, Err(Error::NotFound(_))));
    // Their session list does not show it either.
    let listed = other.list_sessions(Default::default()).await.unwrap();
    assert!(listed.iter().all(|s| s.id != id));
}

async fn a_bad_key_is_unauthenticated(url: &str) {
    let client = Client::connect(url, "not-a-key").await.unwrap();
    let err = client
        .create_session(SessionOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated(_)), "{err}");
}

async fn close_ends_the_session(stack: &Stack, client: &Client, session: Session) {
    let id = session.id().to_owned();
    let vm_id = session.info().await.unwrap().vm_id;
    assert!(!vm_id.is_empty());
    let listed = client.list_sessions(Default::default()).await.unwrap();
    assert!(listed.iter().any(|s| s.id == id));

    let ended = session.close().await.unwrap();
    assert_eq!(ended.id, id);
    assert_eq!(
        ended.end_reason(),
        capsa_client::proto::session::v1::EndReason::Deleted
    );
    let info = client.session_info(&id).await.unwrap();
    assert!(
        matches!(
            info.status(),
            SessionStatus::Terminating | SessionStatus::Terminated
        ),
        "{info:?}"
    );
    // It takes no more code.
    let err = client.session(&id).run("1").await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    // And its VM is destroyed: the pool no longer lists it.
    capsa_test_support::eventually!(
        client.session_info(&id).await.unwrap().status() == SessionStatus::Terminated,
        60
    );
    let mut pool = VmPoolServiceClient::connect(stack.vm_pool.url())
        .await
        .unwrap();
    capsa_test_support::eventually!(
        pool.list_vms(ListVmsRequest {})
            .await
            .unwrap()
            .into_inner()
            .vms
            .iter()
            .all(|vm| vm.id != vm_id),
        60
    );
}

/// Runs the `capsa` binary with the endpoint and key in its environment; panics (with its
/// output) if it fails or is still running after 5 minutes.
async fn capsa(url: &str, key: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(capsa_test_support::workspace_binary("capsa"))
        .args(args)
        .current_dir(dir.path())
        .env("CAPSA_ENDPOINT", url)
        .env("CAPSA_API_KEY", key)
        .env_remove("CAPSA_ENV_FILE")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .unwrap_or_else(|_| panic!("capsa {args:?} still runs after 5 minutes"))
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "capsa {args:?}: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    stdout
}

async fn the_cli_runs_the_demo_of_up_sh(url: &str, key: &str) {
    let created = capsa(
        url,
        key,
        &[
            "create",
            "--lifetime",
            "10m",
            "--label",
            "demo=readme",
            "--json",
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(created.trim()).unwrap();
    let sid = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["status"], "ACTIVE");
    capsa(url, key, &["exec", &sid, "x = 42"]).await;
    assert_eq!(capsa(url, key, &["exec", &sid, "print(x)"]).await, "42\n");
    assert_eq!(capsa(url, key, &["exec", &sid, "x * 2"]).await, "84\n");
    let sh = "echo hello > /tmp/f; cat /tmp/f";
    assert_eq!(
        capsa(url, key, &["exec", &sid, "--lang", "shell", sh]).await,
        "hello\n"
    );
    assert!(
        capsa(url, key, &["egress", &sid])
            .await
            .starts_with("summary ")
    );
    assert!(capsa(url, key, &["info", &sid]).await.contains("ACTIVE"));
    assert!(
        capsa(url, key, &["usage", &sid])
            .await
            .contains("memory_used")
    );
    assert!(
        capsa(url, key, &["stat", &sid, "/tmp/f"])
            .await
            .contains("size         6\n")
    );
    // The demo's background server (its tunnel is tested in processes.rs).
    let server = capsa(
        url,
        key,
        &[
            "process",
            "start",
            &sid,
            "--",
            "python3",
            "-m",
            "http.server",
            "8000",
            "--directory",
            "/tmp",
        ],
    )
    .await;
    let server = server.trim();
    assert!(server.starts_with("p-"), "{server}");
    let listed = capsa(url, key, &["process", "list", &sid]).await;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(server) && l.contains("RUNNING")),
        "{listed}"
    );
    capsa(url, key, &["process", "kill", &sid, server]).await;
    let killed = capsa(url, key, &["kill", &sid]).await;
    assert!(
        killed.starts_with(&format!("{sid} TERMINAT")) && killed.ends_with(" (DELETED)\n"),
        "{killed}"
    );
}
