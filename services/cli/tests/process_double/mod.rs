//! The process, terminal and port RPCs of the SessionService double in `cli.rs`, and the
//! tests of `capsa process`, `capsa shell` (piped: a terminal test needs a real one, see
//! tests/tests/processes.rs) and `capsa port-forward` against it.
//!
//! The double's processes: `p-3` exited with 3, `p-9` was killed by SIGKILL, `p-run` is
//! still running (WaitProcess: DEADLINE_EXCEEDED). Its terminal echoes keystrokes as
//! `echo:<bytes>` and exits with 7 once it has received `exit`. Its guest port 9 refuses;
//! any other port echoes in upper case until the client half-closes, then closes.

use std::sync::Mutex;

use bytes::Bytes;
use capsa_proto::common::v1::*;
use capsa_proto::session::v1::*;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status, Streaming};

use super::{Api, BoxStream, text};

/// What the CLI sent to the process RPCs.
#[derive(Default)]
pub struct Recorded {
    pub started: Mutex<Option<ProcessSpec>>,
    pub signals: Mutex<Vec<(String, i32)>>,
    pub attach: Mutex<Option<AttachProcessRequest>>,
    pub wait_timeout: Mutex<Option<prost_types::Duration>>,
    /// Stdin as written, and whether it was closed.
    pub stdin: Mutex<(Vec<u8>, bool)>,
    pub terminal: Mutex<Option<TerminalOpen>>,
}

fn info(id: &str, state: ProcessState, exit_code: i32, signal: i32) -> ProcessInfo {
    ProcessInfo {
        process_id: id.into(),
        kind: ProcessKind::Background as i32,
        pid: 42,
        command: "sleep".into(),
        args: vec!["1000".into()],
        state: state as i32,
        exit_code,
        signal,
        ..Default::default()
    }
}

fn known(id: &str) -> Result<ProcessInfo, Status> {
    match id {
        "p-3" => Ok(info(id, ProcessState::Exited, 3, 0)),
        "p-9" => Ok(info(id, ProcessState::Exited, -1, 9)),
        "p-run" => Ok(info(id, ProcessState::Running, 0, 0)),
        other => Err(Status::not_found(format!("process {other} not found"))),
    }
}

pub fn start_process(
    rec: &Recorded,
    r: StartProcessRequest,
) -> Result<StartProcessResponse, Status> {
    let spec = r.spec.unwrap_or_default();
    if spec.command == "nope" {
        return Err(Status::invalid_argument(
            "invalid `command`: nope: no such file or directory",
        ));
    }
    *rec.started.lock().unwrap() = Some(spec);
    Ok(StartProcessResponse {
        process: Some(info("p-1", ProcessState::Running, 0, 0)),
    })
}

pub fn list_processes() -> ListProcessesResponse {
    ListProcessesResponse {
        processes: ["p-run", "p-3", "p-9"]
            .iter()
            .map(|id| known(id).unwrap())
            .collect(),
    }
}

pub fn wait_process(rec: &Recorded, r: WaitProcessRequest) -> Result<WaitProcessResponse, Status> {
    *rec.wait_timeout.lock().unwrap() = r.timeout;
    let process = known(&r.process_id)?;
    if process.state() == ProcessState::Running {
        return Err(Status::deadline_exceeded(format!(
            "process {} is still running after 60s",
            r.process_id
        )));
    }
    Ok(WaitProcessResponse {
        process: Some(process),
    })
}

pub fn signal_process(
    rec: &Recorded,
    r: SignalProcessRequest,
) -> Result<SignalProcessResponse, Status> {
    let process = known(&r.process_id)?;
    rec.signals
        .lock()
        .unwrap()
        .push((r.process_id.clone(), r.signal));
    Ok(SignalProcessResponse {
        process: Some(process),
    })
}

fn chunk(
    stream: OutputStream,
    offset: u64,
    data: &'static [u8],
) -> Result<AttachProcessResponse, Status> {
    Ok(AttachProcessResponse {
        event: Some(ProcessEvent {
            event: Some(process_event::Event::Output(ProcessOutputChunk {
                stream: stream as i32,
                offset,
                data: Bytes::from_static(data),
            })),
        }),
    })
}

pub fn attach_process(
    rec: &Recorded,
    r: AttachProcessRequest,
) -> Result<BoxStream<AttachProcessResponse>, Status> {
    known(&r.process_id)?;
    *rec.attach.lock().unwrap() = Some(r);
    let event = |e| {
        Ok(AttachProcessResponse {
            event: Some(ProcessEvent { event: Some(e) }),
        })
    };
    let events = vec![
        event(process_event::Event::Dropped(OutputDropped {
            from_offset: 0,
            to_offset: 10,
        })),
        chunk(OutputStream::Stdout, 10, b"out\n"),
        chunk(OutputStream::Stderr, 14, b"err\n"),
        chunk(OutputStream::Stdout, 18, b"more\n"),
        event(process_event::Event::Exit(ProcessExit {
            exit_code: 3,
            signal: 0,
        })),
    ];
    Ok(Box::pin(futures::stream::iter(events)))
}

pub fn write_stdin(rec: &Recorded, r: WriteStdinRequest) -> Result<WriteStdinResponse, Status> {
    known(&r.process_id)?;
    let mut stdin = rec.stdin.lock().unwrap();
    if stdin.1 {
        return Err(Status::failed_precondition(format!(
            "the stdin of process {} is closed",
            r.process_id
        )));
    }
    stdin.0.extend_from_slice(&r.data);
    stdin.1 = r.close;
    Ok(WriteStdinResponse {})
}

fn screen(part: terminal_output::Part) -> Result<OpenTerminalResponse, Status> {
    Ok(OpenTerminalResponse {
        output: Some(TerminalOutput { part: Some(part) }),
    })
}

pub async fn open_terminal(
    rec: &Recorded,
    mut incoming: Streaming<OpenTerminalRequest>,
) -> Result<BoxStream<OpenTerminalResponse>, Status> {
    let Some(OpenTerminalRequest {
        part: Some(open_terminal_request::Part::Open(open)),
    }) = incoming.message().await?
    else {
        return Err(Status::invalid_argument("the first message must be `open`"));
    };
    *rec.terminal.lock().unwrap() = open.terminal;
    let (tx, rx) = mpsc::channel(16);
    let mut opened = info("t-1", ProcessState::Running, 0, 0);
    opened.kind = ProcessKind::Terminal as i32;
    tx.send(screen(terminal_output::Part::Opened(opened)))
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut typed = Vec::new();
        while let Ok(Some(m)) = incoming.message().await {
            let Some(open_terminal_request::Part::Data(data)) = m.part else {
                continue;
            };
            typed.extend_from_slice(&data);
            let echo = [b"echo:".as_slice(), &data].concat();
            let _ = tx
                .send(screen(terminal_output::Part::Data(echo.into())))
                .await;
            if typed.windows(4).any(|w| w == b"exit") {
                let exit = ProcessExit {
                    exit_code: 7,
                    signal: 0,
                };
                let _ = tx.send(screen(terminal_output::Part::Exit(exit))).await;
                return;
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

pub async fn connect_port(
    mut incoming: Streaming<ConnectPortRequest>,
) -> Result<BoxStream<ConnectPortResponse>, Status> {
    let Some(ConnectPortRequest {
        part: Some(connect_port_request::Part::Open(open)),
    }) = incoming.message().await?
    else {
        return Err(Status::invalid_argument("the first message must be `port`"));
    };
    if open.port == 9 {
        return Err(Status::failed_precondition(
            "nothing listens on port 9 in the guest (connection refused)",
        ));
    }
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        // Until the client half-closes: then the guest side closes too.
        while let Ok(Some(m)) = incoming.message().await {
            if let Some(connect_port_request::Part::Data(data)) = m.part {
                let upper = Bytes::from(data.to_ascii_uppercase());
                if tx
                    .send(Ok(ConnectPortResponse { data: upper }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

pub fn response<T>(r: Result<T, Status>) -> Result<Response<T>, Status> {
    r.map(Response::new)
}

#[tokio::test]
async fn process_start_prints_the_id_and_sends_the_spec() {
    let api = Api::start().await;
    let o = api
        .capsa(&[
            "process",
            "start",
            "s-1",
            "--env",
            "A=1",
            "--cwd",
            "/srv",
            "--buffer-bytes",
            "4096",
            "--keep-stdin",
            "--",
            "python3",
            "-m",
            "http.server",
        ])
        .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "p-1\n");
    let spec = api.state.procs.started.lock().unwrap().clone().unwrap();
    assert_eq!(spec.command, "python3");
    assert_eq!(spec.args, ["-m", "http.server"]);
    assert_eq!(spec.env["A"], "1");
    assert_eq!(
        (spec.cwd.as_str(), spec.output_buffer_bytes),
        ("/srv", 4096)
    );
    assert!(spec.keep_stdin_open);

    let o = api.capsa(&["process", "start", "s-1", "--", "nope"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        "capsa: INVALID_ARGUMENT: invalid `command`: nope: no such file or directory\n"
    );
    let o = api
        .capsa(&["--json", "process", "start", "s-1", "--", "sleep", "1000"])
        .await;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["state"].as_str()),
        (Some("p-1"), Some("RUNNING"))
    );
}

#[tokio::test]
async fn process_list_and_kill() {
    let api = Api::start().await;
    let o = api.capsa(&["process", "list", "s-1"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID ") && lines.len() == 4, "{out}");
    assert!(
        lines[1].starts_with("p-run ") && lines[1].contains(" RUNNING  -  "),
        "{out}"
    );
    assert!(
        lines[2].contains(" EXITED   3 ") && lines[3].contains(" sig9 "),
        "{out}"
    );
    assert!(lines[1].ends_with("sleep 1000"), "{out}");
    let o = api.capsa(&["--json", "process", "list", "s-1"]).await;
    let rows: Vec<serde_json::Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[0]["exit_code"], serde_json::Value::Null);
    assert_eq!(
        (rows[1]["exit_code"].as_i64(), rows[2]["signal"].as_i64()),
        (Some(3), Some(9))
    );

    let o = api.capsa(&["process", "kill", "s-1", "p-run"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(o.stdout.is_empty());
    let o = api
        .capsa(&["process", "kill", "s-1", "p-run", "--signal", "kill"])
        .await;
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        *api.state.procs.signals.lock().unwrap(),
        [
            ("p-run".to_string(), Signal::Term as i32),
            ("p-run".to_string(), Signal::Kill as i32)
        ]
    );
    let o = api.capsa(&["process", "kill", "s-1", "p-404"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        "capsa: NOT_FOUND: process p-404 not found\n"
    );
}

#[tokio::test]
async fn process_wait_exits_with_the_process_status() {
    let api = Api::start().await;
    let o = api
        .capsa(&["process", "wait", "s-1", "p-3", "--timeout", "5m"])
        .await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr), "capsa: p-3 exited with status 3\n");
    let timeout = api.state.procs.wait_timeout.lock().unwrap().unwrap();
    assert_eq!(timeout.seconds, 300);
    let o = api.capsa(&["process", "wait", "s-1", "p-9"]).await;
    assert_eq!(o.status.code(), Some(137));
    assert_eq!(text(&o.stderr), "capsa: p-9 was ended by signal 9\n");
    assert_eq!(*api.state.procs.wait_timeout.lock().unwrap(), None);
    let o = api.capsa(&["process", "wait", "s-1", "p-run"]).await;
    assert_eq!(o.status.code(), Some(124));
    assert_eq!(
        text(&o.stderr),
        "capsa: process p-run is still running after 60s\n"
    );
    let o = api.capsa(&["process", "wait", "s-1", "p-404"]).await;
    assert_eq!(o.status.code(), Some(1));
}

#[tokio::test]
async fn process_logs_split_stdout_and_stderr_and_note_what_was_dropped() {
    let api = Api::start().await;
    let o = api
        .capsa(&["process", "logs", "s-1", "p-3", "--from", "2", "--follow"])
        .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "out\nmore\n");
    assert_eq!(
        text(&o.stderr),
        "capsa: [10 bytes of output dropped (offsets 0..10): older than the process's output \
         buffer]\nerr\n"
    );
    let attach = api.state.procs.attach.lock().unwrap().clone().unwrap();
    assert_eq!((attach.from_offset, attach.follow), (2, true));
    let o = api
        .capsa(&["--json", "process", "logs", "s-1", "p-3"])
        .await;
    let events: Vec<serde_json::Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["dropped", "stdout", "stderr", "stdout", "exit"]);
    assert_eq!(
        (events[2]["offset"].as_u64(), events[2]["text"].as_str()),
        (Some(14), Some("err\n"))
    );
}

#[tokio::test]
async fn process_write_sends_stdin_and_closes_it() {
    let api = Api::start().await;
    let all = ["--endpoint", &api.endpoint, "--api-key", super::KEY];
    let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    let mut args = all.to_vec();
    args.extend(["process", "write", "s-1", "p-run", "--close"]);
    let o = api.capsa_raw(&args, Some(&data)).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let (written, closed) = api.state.procs.stdin.lock().unwrap().clone();
    assert!(written == data && closed);
    let o = api.capsa_raw(&args, Some(b"more")).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).starts_with("capsa: FAILED_PRECONDITION: "),
        "{}",
        text(&o.stderr)
    );
}

#[tokio::test]
async fn shell_without_a_terminal_relays_and_exits_with_the_program_status() {
    let api = Api::start().await;
    let all = ["--endpoint", &api.endpoint, "--api-key", super::KEY];
    let mut args = all.to_vec();
    args.extend(["shell", "s-1", "--term", "dumb", "--", "python3", "-q"]);
    let o = api.capsa_raw(&args, Some(b"print(1)\nexit\n")).await;
    assert_eq!(o.status.code(), Some(7), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.starts_with("echo:print(1)\n"), "{out:?}");
    assert_eq!(out.replace("echo:", ""), "print(1)\nexit\n");
    let open = api.state.procs.terminal.lock().unwrap().clone().unwrap();
    assert_eq!(
        (open.command.as_str(), open.args.as_slice()),
        ("python3", &["-q".to_string()][..])
    );
    assert_eq!(open.term, "dumb");
    // No terminal to measure (all three descriptors are pipes): the default size.
    assert_eq!(open.size, Some(TerminalSize { rows: 24, cols: 80 }));
}

#[tokio::test]
async fn port_forward_tunnels_each_connection_and_survives_a_refused_port() {
    let api = Api::start().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_capsa"))
        .args(["--endpoint", &api.endpoint, "--api-key", super::KEY])
        .args(["port-forward", "s-1", "0:8000", "0:9"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut local = Vec::new();
    for remote in ["8000", "9"] {
        let line = lines.next_line().await.unwrap().unwrap();
        let (prefix, tail) = line.split_once(" -> ").unwrap();
        assert_eq!(tail, remote, "{line}");
        let addr = prefix.strip_prefix("Forwarding from 127.0.0.1:").unwrap();
        assert_ne!(addr, "0", "the chosen port is printed");
        local.push(format!("127.0.0.1:{addr}"));
    }
    let echo = |addr: String, message: String| async move {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(message.as_bytes()).await.unwrap();
        // Half-close: the tunnel passes it on, the guest side answers and closes.
        c.shutdown().await.unwrap();
        let mut back = String::new();
        c.read_to_string(&mut back).await.unwrap();
        back
    };
    let answers =
        futures::future::join_all((0..10).map(|i| echo(local[0].clone(), format!("hello {i}"))))
            .await;
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer, &format!("HELLO {i}"));
    }

    let mut refused = tokio::net::TcpStream::connect(&local[1]).await.unwrap();
    let mut got = Vec::new();
    // Closed by the forwarder (EOF, or a reset if it closed before reading what we sent).
    let _eof_or_reset = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        refused.read_to_end(&mut got),
    )
    .await
    .expect("the refused connection is closed within 10s");
    assert!(got.is_empty());
    // And the forwarder keeps serving.
    assert_eq!(echo(local[0].clone(), "again".into()).await, "AGAIN");
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "-> 9: FAILED_PRECONDITION: nothing listens on port 9 in the guest (connection refused)"
        ),
        "{stderr}"
    );

    // A wrong session fails before anything listens.
    let o = api.capsa(&["port-forward", "missing", "8000"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert_eq!(
        text(&o.stderr),
        "capsa: NOT_FOUND: session missing not found\n"
    );
}
