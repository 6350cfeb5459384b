//! Processes, terminals and port tunnels through session-manager.
//!
//! Against the node doubles (which keep processes per VM, echo terminals and ports, and
//! refuse port 1): every call reaches the session's VM, bad input is INVALID_ARGUMENT
//! naming the field, another tenant gets NOT_FOUND for everything, and terminals and ports
//! count against the tenant's stream cap. Against a real stack (a real executor in front of
//! the real guest agent as a plain process, a real metering; only vm-pool is the double):
//! the calls end to end, and GetUsage counting a running process. Build the agent, the
//! executor and metering first (`cargo nextest run --workspace`, or build those binaries).

mod common;

use std::time::Duration;

use bytes::Bytes;
use capsa_proto::common::v1::{
    ProcessSpec, ProcessState, Signal, TerminalOpen, TerminalSize, process_event, terminal_output,
};
use capsa_proto::session::v1 as pb;
use capsa_store::NodeRegistry;
use capsa_test_support::{HybridVsockProxy, ServiceProcess, eventually};
use common::{Client, Harness, NODE_ID, create};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

/// A generous bound for things that must happen but whose speed is not under test.
const WITHIN: Duration = Duration::from_secs(60);

fn spec(command: &str, args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        command: command.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

fn start_req(session: &str, spec: ProcessSpec) -> pb::StartProcessRequest {
    pb::StartProcessRequest {
        session_id: session.into(),
        spec: Some(spec),
    }
}

fn wait_req(session: &str, process: &str) -> pb::WaitProcessRequest {
    pb::WaitProcessRequest {
        session_id: session.into(),
        process_id: process.into(),
        timeout: None,
    }
}

fn signal_req(session: &str, process: &str, signal: Signal) -> pb::SignalProcessRequest {
    pb::SignalProcessRequest {
        session_id: session.into(),
        process_id: process.into(),
        signal: signal as i32,
    }
}

fn stdin_req(session: &str, process: &str, data: &'static [u8]) -> pb::WriteStdinRequest {
    pb::WriteStdinRequest {
        session_id: session.into(),
        process_id: process.into(),
        data: Bytes::from_static(data),
        close: true,
    }
}

fn attach_req(session: &str, process: &str) -> pb::AttachProcessRequest {
    pb::AttachProcessRequest {
        session_id: session.into(),
        process_id: process.into(),
        from_offset: 0,
        follow: true,
    }
}

fn list_req(session: &str) -> pb::ListProcessesRequest {
    pb::ListProcessesRequest {
        session_id: session.into(),
    }
}

fn terminal_open(session: &str, command: &str) -> pb::OpenTerminalRequest {
    pb::OpenTerminalRequest {
        part: Some(pb::open_terminal_request::Part::Open(
            pb::OpenTerminalHeader {
                session_id: session.into(),
                terminal: Some(TerminalOpen {
                    command: command.into(),
                    size: Some(TerminalSize { rows: 24, cols: 80 }),
                    ..Default::default()
                }),
            },
        )),
    }
}

fn keys(data: &str) -> pb::OpenTerminalRequest {
    pb::OpenTerminalRequest {
        part: Some(pb::open_terminal_request::Part::Data(Bytes::from(
            data.to_string(),
        ))),
    }
}

fn port_open(session: &str, port: u32) -> pb::ConnectPortRequest {
    pb::ConnectPortRequest {
        part: Some(pb::connect_port_request::Part::Open(
            pb::ConnectPortHeader {
                session_id: session.into(),
                port,
            },
        )),
    }
}

fn port_data(data: &[u8]) -> pb::ConnectPortRequest {
    pb::ConnectPortRequest {
        part: Some(pb::connect_port_request::Part::Data(
            Bytes::copy_from_slice(data),
        )),
    }
}

/// Opens a terminal; the test sends its later input through the returned sender.
async fn terminal(
    c: &mut Client,
    first: pb::OpenTerminalRequest,
) -> Result<
    (
        mpsc::Sender<pb::OpenTerminalRequest>,
        tonic::Streaming<pb::OpenTerminalResponse>,
    ),
    Status,
> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let screen = c.open_terminal(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, screen))
}

/// Opens a port connection; the test sends its data through the returned sender.
async fn port(
    c: &mut Client,
    first: pb::ConnectPortRequest,
) -> Result<
    (
        mpsc::Sender<pb::ConnectPortRequest>,
        tonic::Streaming<pb::ConnectPortResponse>,
    ),
    Status,
> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let back = c.connect_port(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, back))
}

/// Reads terminal output until the screen bytes contain `needle`.
async fn screen_until(screen: &mut tonic::Streaming<pb::OpenTerminalResponse>, needle: &str) {
    let mut seen = String::new();
    let read = async {
        while !seen.contains(needle) {
            let message = screen
                .message()
                .await
                .unwrap()
                .expect("terminal still open");
            if let Some(terminal_output::Part::Data(d)) = message.output.and_then(|o| o.part) {
                seen.push_str(&String::from_utf8_lossy(&d));
            }
        }
    };
    tokio::time::timeout(WITHIN, read)
        .await
        .unwrap_or_else(|_| panic!("{needle:?} not on the screen within {WITHIN:?}: {seen:?}"));
}

/// The rest of a terminal stream: its exit code, once it ended OK.
async fn terminal_exit(screen: &mut tonic::Streaming<pb::OpenTerminalResponse>) -> Option<i32> {
    let mut exit = None;
    while let Some(message) = tokio::time::timeout(WITHIN, screen.message())
        .await
        .expect("the terminal ends")
        .unwrap()
    {
        if let Some(terminal_output::Part::Exit(e)) = message.output.and_then(|o| o.part) {
            exit = Some(e.exit_code);
        }
    }
    exit
}

/// All of an attach stream: the output bytes and the exit code.
async fn attach_all(c: &mut Client, session: &str, process: &str) -> (String, Option<i32>) {
    let mut events = c
        .attach_process(attach_req(session, process))
        .await
        .unwrap()
        .into_inner();
    let mut output = Vec::new();
    let mut exit = None;
    while let Some(message) = tokio::time::timeout(WITHIN, events.message())
        .await
        .expect("the attach stream ends")
        .unwrap()
    {
        match message.event.and_then(|e| e.event) {
            Some(process_event::Event::Output(chunk)) => output.extend_from_slice(&chunk.data),
            Some(process_event::Event::Exit(e)) => exit = Some(e.exit_code),
            other => panic!("unexpected event {other:?}"),
        }
    }
    (String::from_utf8_lossy(&output).into_owned(), exit)
}

fn assert_invalid<T: std::fmt::Debug>(r: Result<T, Status>, field: &str) {
    let err = r.expect_err("must be refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains(&format!("`{field}")),
        "{} should name {field}",
        err.message()
    );
}

fn assert_not_found<T: std::fmt::Debug>(r: Result<T, Status>) {
    let err = r.expect_err("must be refused");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn every_call_reaches_the_sessions_vm() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;

    let mut started = spec("python3", &["-m", "http.server"]);
    started.keep_stdin_open = true;
    let p = c
        .start_process(start_req(&s.id, started))
        .await
        .unwrap()
        .into_inner()
        .process
        .unwrap();
    assert_eq!(
        (p.process_id.as_str(), p.state()),
        ("p-1", ProcessState::Running)
    );
    assert!(
        h.node
            .state()
            .processes
            .contains_key(&(s.vm_id.clone(), "p-1".into()))
    );

    let listed = c
        .list_processes(list_req(&s.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.processes, std::slice::from_ref(&p));
    c.write_stdin(stdin_req(&s.id, "p-1", b"GET /\n"))
        .await
        .unwrap();
    assert_eq!(h.node.state().stdin[&s.vm_id], b"GET /\n");
    let (output, exit) = attach_all(&mut c, &s.id, "p-1").await;
    assert_eq!(
        (output.as_str(), exit),
        ("python3 -m http.server\n", Some(0))
    );
    let signalled = c
        .signal_process(signal_req(&s.id, "p-1", Signal::Term))
        .await
        .unwrap()
        .into_inner()
        .process
        .unwrap();
    assert_eq!(signalled.state(), ProcessState::Exited);
    let waited = c
        .wait_process(wait_req(&s.id, "p-1"))
        .await
        .unwrap()
        .into_inner()
        .process
        .unwrap();
    assert_eq!(waited.signal, 15);

    // A terminal: opened, keystrokes and resizes echoed, exit when our input ends.
    let (keys_tx, mut screen) = terminal(&mut c, terminal_open(&s.id, "")).await.unwrap();
    let first = screen.message().await.unwrap().unwrap().output.unwrap();
    assert!(matches!(first.part, Some(terminal_output::Part::Opened(_))));
    keys_tx.send(keys("ls\r")).await.unwrap();
    screen_until(&mut screen, "ls\r").await;
    let resize = pb::OpenTerminalRequest {
        part: Some(pb::open_terminal_request::Part::Resize(TerminalSize {
            rows: 40,
            cols: 100,
        })),
    };
    keys_tx.send(resize).await.unwrap();
    screen_until(&mut screen, "40x100").await;
    drop(keys_tx);
    assert_eq!(terminal_exit(&mut screen).await, Some(0));

    // A port: bytes both ways; a port nobody listens on fails at call time.
    let (tx, mut back) = port(&mut c, port_open(&s.id, 8000)).await.unwrap();
    tx.send(port_data(b"hello")).await.unwrap();
    let echoed = back.message().await.unwrap().unwrap();
    assert_eq!(echoed.data, "hello");
    drop(tx);
    assert!(back.message().await.unwrap().is_none());
    let err = port(&mut c, port_open(&s.id, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("nothing listens"),
        "{}",
        err.message()
    );
    // Every stream is over: the node holds nothing open.
    eventually!(h.node.state().open_streams == 0);
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let id = s.id.as_str();

    assert_invalid(
        c.start_process(start_req("", spec("sleep", &[]))).await,
        "session_id",
    );
    assert_invalid(
        c.start_process(pb::StartProcessRequest {
            session_id: id.into(),
            spec: None,
        })
        .await,
        "spec",
    );
    assert_invalid(
        c.start_process(start_req(id, spec("", &[]))).await,
        "spec.command",
    );
    let mut many = spec("echo", &[]);
    many.args = vec!["x".into(); capsa_proto::limits::MAX_PROCESS_ARGS + 1];
    assert_invalid(c.start_process(start_req(id, many)).await, "spec.args");
    let mut env = spec("env", &[]);
    env.env.insert("NOT-A-NAME".into(), "1".into());
    assert_invalid(c.start_process(start_req(id, env)).await, "spec.env");
    let mut cwd = spec("pwd", &[]);
    cwd.cwd = "relative".into();
    assert_invalid(c.start_process(start_req(id, cwd)).await, "spec.cwd");
    let mut ring = spec("yes", &[]);
    ring.output_buffer_bytes = capsa_proto::limits::MAX_PROCESS_OUTPUT_BUFFER_BYTES + 1;
    assert_invalid(
        c.start_process(start_req(id, ring)).await,
        "spec.output_buffer_bytes",
    );

    assert_invalid(c.list_processes(list_req("")).await, "session_id");
    assert_invalid(c.wait_process(wait_req(id, "")).await, "process_id");
    let mut long = wait_req(id, "p-1");
    long.timeout = Some(prost_types::Duration {
        seconds: 301,
        nanos: 0,
    });
    assert_invalid(c.wait_process(long).await, "timeout");
    assert_invalid(
        c.signal_process(signal_req(id, "p-1", Signal::Unspecified))
            .await,
        "signal",
    );
    let mut unknown = signal_req(id, "p-1", Signal::Kill);
    unknown.signal = 42;
    assert_invalid(c.signal_process(unknown).await, "signal");
    assert_invalid(
        c.signal_process(signal_req(id, "p 1", Signal::Kill)).await,
        "process_id",
    );
    let big = pb::WriteStdinRequest {
        session_id: id.into(),
        process_id: "p-1".into(),
        data: Bytes::from(vec![0; capsa_proto::limits::MAX_STREAM_DATA_BYTES + 1]),
        close: false,
    };
    assert_invalid(c.write_stdin(big).await, "data");
    assert_invalid(c.attach_process(attach_req(id, "")).await, "process_id");

    // Terminals: the first message must be `open`, with a sane size; later ones checked too.
    assert_invalid(terminal(&mut c, keys("ls\n")).await, "open");
    let mut no_size = terminal_open(id, "");
    if let Some(pb::open_terminal_request::Part::Open(h)) = &mut no_size.part {
        h.terminal.as_mut().unwrap().size = None;
    }
    assert_invalid(terminal(&mut c, no_size).await, "size");
    let mut huge = terminal_open(id, "");
    if let Some(pb::open_terminal_request::Part::Open(h)) = &mut huge.part {
        h.terminal.as_mut().unwrap().size = Some(TerminalSize {
            rows: 24,
            cols: 1001,
        });
    }
    assert_invalid(terminal(&mut c, huge).await, "size");
    assert_invalid(terminal(&mut c, terminal_open("", "")).await, "session_id");
    let (keys_tx, mut screen) = terminal(&mut c, terminal_open(id, "")).await.unwrap();
    keys_tx
        .send(pb::OpenTerminalRequest {
            part: Some(pb::open_terminal_request::Part::Resize(TerminalSize {
                rows: 0,
                cols: 80,
            })),
        })
        .await
        .unwrap();
    let err = loop {
        match tokio::time::timeout(WITHIN, screen.message())
            .await
            .unwrap()
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the terminal ended OK after a bad resize"),
            Err(status) => break status,
        }
    };
    assert_invalid::<()>(Err(err), "resize");

    // Ports: `open` first, a port in range.
    assert_invalid(port(&mut c, port_data(b"x")).await, "open");
    assert_invalid(port(&mut c, port_open(id, 0)).await, "port");
    assert_invalid(port(&mut c, port_open(id, 65536)).await, "port");
    eventually!(h.node.state().open_streams == 0);
}

#[tokio::test]
async fn another_tenant_gets_not_found_for_every_process_call() {
    let h = Harness::start(1).await;
    let mut owner = h.client(0).await;
    let mine = create(&mut owner, None).await;
    owner
        .start_process(start_req(&mine.id, spec("sleep", &["120"])))
        .await
        .unwrap();
    let key = h.new_key("t2").await;
    let mut other = h.client_with(0, Some(&format!("Bearer {key}"))).await;
    let theirs = create(&mut other, None).await;
    let id = mine.id.as_str();

    assert_not_found(
        other
            .start_process(start_req(id, spec("sleep", &["1"])))
            .await,
    );
    assert_not_found(other.list_processes(list_req(id)).await);
    assert_not_found(other.wait_process(wait_req(id, "p-1")).await);
    assert_not_found(
        other
            .signal_process(signal_req(id, "p-1", Signal::Kill))
            .await,
    );
    assert_not_found(other.write_stdin(stdin_req(id, "p-1", b"x")).await);
    assert_not_found(other.attach_process(attach_req(id, "p-1")).await);
    assert_not_found(terminal(&mut other, terminal_open(id, "")).await);
    assert_not_found(port(&mut other, port_open(id, 8000)).await);
    // The owner's process id means nothing in the other tenant's own session either.
    let t = theirs.id.as_str();
    assert_not_found(other.wait_process(wait_req(t, "p-1")).await);
    assert_not_found(
        other
            .signal_process(signal_req(t, "p-1", Signal::Kill))
            .await,
    );
    assert_not_found(other.write_stdin(stdin_req(t, "p-1", b"x")).await);
    assert_not_found(other.attach_process(attach_req(t, "p-1")).await);
    // Nothing reached the owner's process.
    let p = owner
        .wait_process(wait_req(id, "p-1"))
        .await
        .unwrap()
        .into_inner()
        .process
        .unwrap();
    assert_eq!(p.state(), ProcessState::Running);
    assert!(!h.node.state().stdin.contains_key(&mine.vm_id));
}

#[tokio::test]
async fn terminals_and_ports_take_the_tenants_stream_slots() {
    let mut h = Harness::start_with(0, true).await;
    h.extra_args = vec!["--max-streams-per-tenant".into(), "2".into()];
    h.add_replica().await;
    let mut a = h.client(0).await;
    let s = create(&mut a, None).await;
    let key = h.new_key("t2").await;
    let mut b = h.client_with(0, Some(&format!("Bearer {key}"))).await;
    let other = create(&mut b, None).await;

    let (keys_tx, screen) = terminal(&mut a, terminal_open(&s.id, "")).await.unwrap();
    let (port_tx, back) = port(&mut a, port_open(&s.id, 8000)).await.unwrap();
    // A third stream of any kind is refused naming the limit.
    let err = terminal(&mut a, terminal_open(&s.id, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--max-streams-per-tenant"),
        "{}",
        err.message()
    );
    let err = port(&mut a, port_open(&s.id, 8000)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let err = a
        .attach_process(attach_req(&s.id, "p-1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Another tenant is not affected.
    let (other_tx, _other_screen) = terminal(&mut b, terminal_open(&other.id, ""))
        .await
        .unwrap();
    drop(other_tx);

    // A slot is free again once its stream ended.
    drop(port_tx);
    drop(back);
    let (again_tx, _again) = eventually_open(&mut a, &s.id).await;
    drop(again_tx);
    drop((keys_tx, screen));
}

/// Opens a port connection, retrying while the tenant's slots are still taken.
async fn eventually_open(
    c: &mut Client,
    session: &str,
) -> (
    mpsc::Sender<pb::ConnectPortRequest>,
    tonic::Streaming<pb::ConnectPortResponse>,
) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        match port(c, port_open(session, 8000)).await {
            Ok(opened) => return opened,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "slot never freed: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

/// A node whose executor is real, in front of one real guest agent per VM (plain
/// processes); vm-pool is the harness's double, metering a real process.
struct RealNode {
    h: Harness,
    state_dir: tempfile::TempDir,
    _executor: ServiceProcess,
    _metering: ServiceProcess,
    agents: Vec<(ServiceProcess, HybridVsockProxy, tempfile::TempDir)>,
}

impl RealNode {
    async fn start() -> RealNode {
        let mut h = Harness::start_with(0, true).await;
        let state_dir = tempfile::tempdir().unwrap();
        let executor = ServiceProcess::start(
            "capsa-executor",
            &[
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--vm-state-dir".into(),
                state_dir.path().display().to_string(),
            ],
        )
        .await;
        let metering = ServiceProcess::start(
            "capsa-metering",
            &[
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--redis-url".into(),
                h.redis.url(),
                "--sample-interval".into(),
                "200ms".into(),
                // The double's VMs use no cpu: ask their guests every round.
                "--guest-idle-interval".into(),
                "1ms".into(),
            ],
        )
        .await;
        let nodes = NodeRegistry::new(capsa_store::connect(&h.redis.url()).await.unwrap());
        let mut node = nodes.get(NODE_ID).await.unwrap().unwrap();
        node.executor_url = executor.url();
        nodes
            .heartbeat(&node, Duration::from_secs(3600))
            .await
            .unwrap();
        let args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--redis-url".into(),
            h.redis.url(),
            "--metering-url".into(),
            metering.url(),
        ];
        h.replicas
            .push(ServiceProcess::start("capsa-session-manager", &args).await);
        RealNode {
            h,
            state_dir,
            _executor: executor,
            _metering: metering,
            agents: Vec::new(),
        }
    }

    /// A session of `c`'s tenant whose VM is a fresh real agent.
    async fn session(&mut self, c: &mut Client) -> pb::Session {
        let s = create(c, None).await;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        // The agent's scratch dir goes inside the test's dir: a killed agent cannot remove it.
        let tmp = dir.path().display().to_string();
        let agent = ServiceProcess::start_with_env(
            "capsa-agent",
            &["--listen-unix".into(), socket.display().to_string()],
            &[("TMPDIR", tmp.as_str())],
        )
        .await;
        let vm_socket = capsa_vsock::vm_socket_path(self.state_dir.path(), &s.vm_id).unwrap();
        std::fs::create_dir_all(vm_socket.parent().unwrap()).unwrap();
        let proxy = HybridVsockProxy::start(&vm_socket, capsa_vsock::AGENT_PORT, &socket);
        self.agents.push((agent, proxy, dir));
        s
    }
}

async fn processes_running(c: &mut Client, session: &str) -> u32 {
    let req = pb::GetUsageRequest {
        session_id: session.into(),
    };
    match c.get_usage(req).await {
        Ok(r) => r.into_inner().usage.map_or(0, |u| u.processes_running),
        Err(_) => 0,
    }
}

#[tokio::test]
async fn processes_terminals_and_ports_end_to_end_with_usage() {
    let mut node = RealNode::start().await;
    let mut c = node.h.client(0).await;
    let s = node.session(&mut c).await;
    let id = s.id.as_str();

    // A process reading its stdin; its output from offset 0 once it exited.
    let mut reader = spec("sh", &["-c", "read line; echo got $line; echo oops >&2"]);
    reader.keep_stdin_open = true;
    let p = c
        .start_process(start_req(id, reader))
        .await
        .unwrap()
        .into_inner()
        .process
        .unwrap();
    c.write_stdin(stdin_req(id, &p.process_id, b"milk\n"))
        .await
        .unwrap();
    let done = c
        .wait_process(wait_req(id, &p.process_id))
        .await
        .unwrap()
        .into_inner()
        .process
        .unwrap();
    assert_eq!((done.state(), done.exit_code), (ProcessState::Exited, 0));
    let (output, exit) = attach_all(&mut c, id, &p.process_id).await;
    assert!(
        output.contains("got milk\n") && output.contains("oops\n"),
        "{output:?}"
    );
    assert_eq!(exit, Some(0));

    // A long-running one shows in GetUsage (metering samples the guest), then a signal ends it.
    let sleeper = c
        .start_process(start_req(id, spec("sleep", &["120"])))
        .await
        .unwrap()
        .into_inner()
        .process
        .unwrap();
    eventually!(processes_running(&mut c, id).await == 1, 30);
    let listed = c.list_processes(list_req(id)).await.unwrap().into_inner();
    assert_eq!(listed.processes.len(), 2, "{listed:?}");
    c.signal_process(signal_req(id, &sleeper.process_id, Signal::Kill))
        .await
        .unwrap();
    let ended = c
        .wait_process(wait_req(id, &sleeper.process_id))
        .await
        .unwrap()
        .into_inner()
        .process
        .unwrap();
    assert_eq!((ended.state(), ended.signal), (ProcessState::Exited, 9));
    eventually!(processes_running(&mut c, id).await == 0, 30);
    assert_not_found(c.wait_process(wait_req(id, "p-999")).await);

    // A terminal running sh.
    let (keys_tx, mut screen) = terminal(&mut c, terminal_open(id, "sh")).await.unwrap();
    keys_tx.send(keys("echo $((6 * 7))\r")).await.unwrap();
    screen_until(&mut screen, "42").await;
    keys_tx.send(keys("exit 3\r")).await.unwrap();
    assert_eq!(terminal_exit(&mut screen).await, Some(3));

    // A port: the agent runs on this host, so its 127.0.0.1 is ours.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let guest_port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        socket.read_to_end(&mut got).await.unwrap();
        socket.write_all(&got).await.unwrap();
        socket.write_all(b" back").await.unwrap();
    });
    let (tx, mut back) = port(&mut c, port_open(id, u32::from(guest_port)))
        .await
        .unwrap();
    tx.send(port_data(b"there")).await.unwrap();
    drop(tx); // half-closes the guest socket; the server answers and closes
    let mut received = Vec::new();
    while let Some(m) = tokio::time::timeout(WITHIN, back.message())
        .await
        .unwrap()
        .unwrap()
    {
        received.extend_from_slice(&m.data);
    }
    assert_eq!(received, b"there back");
    server.await.unwrap();

    // Another tenant's session has its own agent: this session's ids are unknown there.
    let key = node.h.new_key("t2").await;
    let mut other = node.h.client_with(0, Some(&format!("Bearer {key}"))).await;
    let theirs = node.session(&mut other).await;
    assert_not_found(
        other
            .wait_process(wait_req(&theirs.id, &p.process_id))
            .await,
    );
    assert_not_found(other.list_processes(list_req(id)).await);
}
