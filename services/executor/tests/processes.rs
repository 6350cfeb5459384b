//! Processes, terminals and port tunnels through the executor as a real process: against
//! the agent double for what the real agent cannot be made to do on demand (no idle limit
//! on silent streams, a client that goes away, WaitProcess's own deadline), and against
//! the real agent (`capsa-agent` as a plain process; build it first: run these with
//! `cargo nextest run -p capsa-executor -p capsa-guest-agent`) end to end.

mod common;

use std::time::Duration;

use bytes::Bytes;
use capsa_proto::common::v1::{
    ProcessSpec, ProcessState, Signal, TerminalOpen, TerminalSize, process_event, terminal_output,
};
use capsa_proto::executor::v1::executor_service_client::ExecutorServiceClient;
use capsa_proto::executor::v1::*;
use capsa_test_support::eventually;
use common::fake_agent::FakeAgent;
use common::{Node, RealAgent};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const VM: &str = "vm-proc";

/// A generous bound for things that must happen but whose speed is not under test.
const WITHIN: Duration = Duration::from_secs(60);

type Client = ExecutorServiceClient<Channel>;

fn terminal_open(vm_id: &str, command: &str) -> OpenTerminalRequest {
    OpenTerminalRequest {
        part: Some(open_terminal_request::Part::Open(OpenTerminalHeader {
            vm_id: vm_id.into(),
            terminal: Some(TerminalOpen {
                command: command.into(),
                size: Some(TerminalSize { rows: 24, cols: 80 }),
                ..Default::default()
            }),
        })),
    }
}

fn keys(data: &str) -> OpenTerminalRequest {
    OpenTerminalRequest {
        part: Some(open_terminal_request::Part::Data(Bytes::from(
            data.to_string(),
        ))),
    }
}

fn port_open(vm_id: &str, port: u32) -> ConnectPortRequest {
    ConnectPortRequest {
        part: Some(connect_port_request::Part::Open(ConnectPortHeader {
            vm_id: vm_id.into(),
            port,
        })),
    }
}

fn port_data(data: &[u8]) -> ConnectPortRequest {
    ConnectPortRequest {
        part: Some(connect_port_request::Part::Data(Bytes::copy_from_slice(
            data,
        ))),
    }
}

/// Opens a terminal whose later input the test sends through the returned sender.
async fn terminal(
    client: &mut Client,
    first: OpenTerminalRequest,
) -> (
    mpsc::Sender<OpenTerminalRequest>,
    tonic::Streaming<OpenTerminalResponse>,
) {
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let screen = client
        .open_terminal(ReceiverStream::new(rx))
        .await
        .expect("terminal opened")
        .into_inner();
    (tx, screen)
}

/// Reads terminal output until the screen bytes contain `needle`; returns them all.
async fn screen_until(screen: &mut tonic::Streaming<OpenTerminalResponse>, needle: &str) -> String {
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
    seen
}

#[tokio::test]
async fn terminals_and_ports_have_no_idle_limit_and_end_with_their_client() {
    // An idle limit far below the silence the streams sit through.
    let node = Node::start(&["--idle-timeout-ms", "300"]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;

    let (keys_tx, mut screen) = terminal(&mut client, terminal_open(VM, "")).await;
    let first = screen.message().await.unwrap().unwrap().output.unwrap();
    assert!(matches!(first.part, Some(terminal_output::Part::Opened(_))));
    // Silent for five idle limits, then still alive.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    keys_tx.send(keys("ls\r")).await.unwrap();
    screen_until(&mut screen, "ls\r").await;
    let resize = OpenTerminalRequest {
        part: Some(open_terminal_request::Part::Resize(TerminalSize {
            rows: 50,
            cols: 132,
        })),
    };
    keys_tx.send(resize).await.unwrap();
    screen_until(&mut screen, "50x132").await;
    // The client ends its input: the agent's input ends, its `exit` comes back, then OK.
    drop(keys_tx);
    let last = tokio::time::timeout(WITHIN, screen.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        last.output.unwrap().part,
        Some(terminal_output::Part::Exit(_))
    ));
    assert!(screen.message().await.unwrap().is_none());
    assert_eq!(agent.inputs_ended(), 1);

    // A client that goes away: the agent's call ends too.
    let (keys_tx, screen) = terminal(&mut client, terminal_open(VM, "")).await;
    drop(screen);
    drop(keys_tx);
    eventually!(agent.inputs_ended() == 2, 30);

    // A port connection: silent past the idle limit, then echoing, ended by its client.
    let (tx, rx) = mpsc::channel(8);
    tx.send(port_open(VM, 8000)).await.unwrap();
    let mut back = client
        .connect_port(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tx.send(port_data(b"ping")).await.unwrap();
    let echoed = tokio::time::timeout(WITHIN, back.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.data, "ping");
    drop(back);
    drop(tx);
    eventually!(agent.inputs_ended() == 3, 30);
}

#[tokio::test]
async fn wait_process_gets_its_own_timeout_not_the_call_limit() {
    let node = Node::start(&["--call-timeout-ms", "500"]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;
    let err = client
        .wait_process(WaitProcessRequest {
            vm_id: VM.into(),
            process_id: "p-1".into(),
            timeout: Some(capsa_proto::time::duration(Duration::from_secs(2))),
        })
        .await
        .unwrap_err();
    // The agent's own verdict, four call limits later, not the executor's.
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("still running"), "{}", err.message());

    let err = client
        .wait_process(WaitProcessRequest {
            vm_id: VM.into(),
            process_id: "p-1".into(),
            timeout: Some(capsa_proto::time::duration(Duration::from_secs(301))),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("`timeout`"), "{}", err.message());
}

#[tokio::test]
async fn first_messages_are_checked_and_the_agents_verdicts_pass_through() {
    let node = Node::start(&[]).await;
    let agent = FakeAgent::start();
    let _vm = node.add_vm(VM, agent.socket());
    let mut client = node.client().await;

    let err = client
        .open_terminal(futures::stream::iter([keys("ls\n")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("`open`"), "{}", err.message());
    let err = client
        .connect_port(futures::stream::iter([port_data(b"x")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("`open`"), "{}", err.message());
    let err = client
        .connect_port(futures::stream::iter([port_open(VM, 70000)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("`port`"), "{}", err.message());
    // A second `open` mid-stream ends the terminal with INVALID_ARGUMENT.
    let (keys_tx, mut screen) = terminal(&mut client, terminal_open(VM, "")).await;
    screen.message().await.unwrap().unwrap();
    keys_tx.send(terminal_open(VM, "")).await.unwrap();
    let err = loop {
        match tokio::time::timeout(WITHIN, screen.message())
            .await
            .unwrap()
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the terminal ended OK after a second `open`"),
            Err(status) => break status,
        }
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("`open`"), "{}", err.message());

    // Nothing listening: the agent's FAILED_PRECONDITION, at call time, as it is.
    let err = client
        .connect_port(futures::stream::iter([port_open(VM, 1)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("nothing listens"),
        "{}",
        err.message()
    );
    // An unknown VM is NOT_FOUND before anything is relayed.
    let err = client
        .connect_port(futures::stream::iter([port_open("vm-other", 8000)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let stats = client
        .get_guest_stats(GetGuestStatsRequest { vm_id: VM.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.processes_running, stats.terminals_open), (2, 1));
}

fn spec(command: &str, args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        command: command.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

async fn start(client: &mut Client, spec: ProcessSpec) -> capsa_proto::common::v1::ProcessInfo {
    client
        .start_process(StartProcessRequest {
            vm_id: VM.into(),
            spec: Some(spec),
        })
        .await
        .expect("process started")
        .into_inner()
        .process
        .unwrap()
}

#[tokio::test]
async fn processes_terminals_and_ports_through_the_real_agent() {
    let node = Node::start(&[]).await;
    let agent = RealAgent::start().await;
    let _vm = node.add_vm(VM, &agent.socket);
    let mut client = node.client().await;

    // A process that reads its stdin, written through WriteStdin.
    let mut s = spec(
        "sh",
        &["-c", "echo hello; echo oops >&2; read line; echo got $line"],
    );
    s.keep_stdin_open = true;
    let p = start(&mut client, s).await;
    assert!(p.process_id.starts_with("p-"), "{p:?}");
    client
        .write_stdin(WriteStdinRequest {
            vm_id: VM.into(),
            process_id: p.process_id.clone(),
            data: Bytes::from_static(b"world\n"),
            close: true,
        })
        .await
        .unwrap();
    let done = client
        .wait_process(WaitProcessRequest {
            vm_id: VM.into(),
            process_id: p.process_id.clone(),
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner()
        .process
        .unwrap();
    assert_eq!(
        (done.state(), done.exit_code),
        (ProcessState::Exited, 0),
        "{done:?}"
    );
    // Its output from offset 0, stdout and stderr together, then its exit.
    let mut events = client
        .attach_process(AttachProcessRequest {
            vm_id: VM.into(),
            process_id: p.process_id.clone(),
            from_offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut output = Vec::new();
    let mut exit = None;
    while let Some(message) = tokio::time::timeout(WITHIN, events.message())
        .await
        .unwrap()
        .unwrap()
    {
        match message.event.and_then(|e| e.event) {
            Some(process_event::Event::Output(chunk)) => {
                assert_eq!(chunk.offset, output.len() as u64);
                output.extend_from_slice(&chunk.data);
            }
            Some(process_event::Event::Exit(e)) => exit = Some(e),
            other => panic!("unexpected event {other:?}"),
        }
    }
    let text = String::from_utf8_lossy(&output);
    for line in ["hello\n", "oops\n", "got world\n"] {
        assert!(text.contains(line), "{text:?}");
    }
    assert_eq!(exit.map(|e| e.exit_code), Some(0));

    // A long one: counted in the guest's stats, listed, ended by a signal.
    let sleeper = start(&mut client, spec("sleep", &["120"])).await;
    let stats = client
        .get_guest_stats(GetGuestStatsRequest { vm_id: VM.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.processes_running, 1, "{stats:?}");
    let listed = client
        .list_processes(ListProcessesRequest { vm_id: VM.into() })
        .await
        .unwrap()
        .into_inner()
        .processes;
    assert!(
        listed.iter().any(|l| l.process_id == sleeper.process_id),
        "{listed:?}"
    );
    client
        .signal_process(SignalProcessRequest {
            vm_id: VM.into(),
            process_id: sleeper.process_id.clone(),
            signal: Signal::Kill as i32,
        })
        .await
        .unwrap();
    let ended = client
        .wait_process(WaitProcessRequest {
            vm_id: VM.into(),
            process_id: sleeper.process_id.clone(),
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner()
        .process
        .unwrap();
    assert_eq!((ended.state(), ended.signal), (ProcessState::Exited, 9));
    let err = client
        .wait_process(WaitProcessRequest {
            vm_id: VM.into(),
            process_id: "p-999".into(),
            timeout: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // A terminal running sh: a command line in, its output on the screen, exit ends it.
    let (keys_tx, mut screen) = terminal(&mut client, terminal_open(VM, "sh")).await;
    keys_tx.send(keys("echo $((6 * 7))\r")).await.unwrap();
    screen_until(&mut screen, "42").await;
    keys_tx.send(keys("exit\r")).await.unwrap();
    let mut exit = None;
    while let Some(message) = tokio::time::timeout(WITHIN, screen.message())
        .await
        .unwrap()
        .unwrap()
    {
        if let Some(terminal_output::Part::Exit(e)) = message.output.and_then(|o| o.part) {
            exit = Some(e);
        }
    }
    assert_eq!(exit.map(|e| e.exit_code), Some(0));

    // A port: the agent runs on this host, so its 127.0.0.1 is ours.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        socket.read_to_end(&mut got).await.unwrap();
        socket.write_all(&got).await.unwrap();
        socket.write_all(b" back").await.unwrap();
    });
    let (tx, rx) = mpsc::channel(8);
    tx.send(port_open(VM, u32::from(port))).await.unwrap();
    let mut back = client
        .connect_port(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(port_data(b"there")).await.unwrap();
    // Ending our input half-closes the guest socket; the server answers and closes.
    drop(tx);
    let mut received = Vec::new();
    while let Some(message) = tokio::time::timeout(WITHIN, back.message())
        .await
        .unwrap()
        .unwrap()
    {
        received.extend_from_slice(&message.data);
    }
    assert_eq!(received, b"there back");
    server.await.unwrap();

    // A port nobody listens on: FAILED_PRECONDITION when the call is made.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let err = client
        .connect_port(futures::stream::iter([port_open(
            VM,
            u32::from(closed_port),
        )]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}
