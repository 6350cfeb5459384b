//! Background processes, terminals and port connections through the real gRPC API, with
//! the agent as a plain process (its programs run on this machine).

mod common;

use std::time::Duration;

use bytes::Bytes;
use capsa_proto::agent::v1 as pb;
use capsa_proto::agent::v1::agent_service_client::AgentServiceClient;
use capsa_proto::common::v1 as cm;
use capsa_test_support::eventually;
use cm::process_event::Event as Ev;
use cm::terminal_output::Part as Out;
use common::{Agent, secs};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

type Client = AgentServiceClient<Channel>;

/// A hang guard for whole streams and calls, not a timing assertion.
const HANG: Duration = Duration::from_secs(60);

fn spec(command: &str, args: &[&str]) -> cm::ProcessSpec {
    cm::ProcessSpec {
        command: command.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

fn sh(script: &str) -> cm::ProcessSpec {
    spec("sh", &["-c", script])
}

async fn try_start(c: &mut Client, spec: cm::ProcessSpec) -> Result<cm::ProcessInfo, Status> {
    Ok(
        c.start_process(pb::StartProcessRequest { spec: Some(spec) })
            .await?
            .into_inner()
            .process
            .unwrap(),
    )
}

async fn start(c: &mut Client, spec: cm::ProcessSpec) -> cm::ProcessInfo {
    try_start(c, spec).await.unwrap()
}

async fn wait(c: &mut Client, id: &str) -> cm::ProcessInfo {
    c.wait_process(pb::WaitProcessRequest {
        process_id: id.into(),
        timeout: secs(60),
    })
    .await
    .unwrap()
    .into_inner()
    .process
    .unwrap()
}

async fn signal(c: &mut Client, id: &str, s: cm::Signal) -> Result<cm::ProcessInfo, Status> {
    Ok(c.signal_process(pb::SignalProcessRequest {
        process_id: id.into(),
        signal: s as i32,
    })
    .await?
    .into_inner()
    .process
    .unwrap())
}

async fn list(c: &mut Client) -> Vec<cm::ProcessInfo> {
    c.list_processes(pb::ListProcessesRequest {})
        .await
        .unwrap()
        .into_inner()
        .processes
}

async fn write_stdin(c: &mut Client, id: &str, data: &[u8], close: bool) -> Result<(), Status> {
    c.write_stdin(pb::WriteStdinRequest {
        process_id: id.into(),
        data: Bytes::copy_from_slice(data),
        close,
    })
    .await
    .map(|_| ())
}

async fn try_attach(
    c: &mut Client,
    id: &str,
    from: u64,
    follow: bool,
) -> Result<tonic::Streaming<pb::AttachProcessResponse>, Status> {
    Ok(c.attach_process(pb::AttachProcessRequest {
        process_id: id.into(),
        from_offset: from,
        follow,
    })
    .await?
    .into_inner())
}

/// Every event of an attach stream, which must end cleanly.
async fn attach(c: &mut Client, id: &str, from: u64, follow: bool) -> Vec<Ev> {
    let mut stream = try_attach(c, id, from, follow).await.unwrap();
    tokio::time::timeout(HANG, async {
        let mut events = Vec::new();
        while let Some(msg) = stream.message().await.unwrap() {
            events.push(msg.event.unwrap().event.unwrap());
        }
        events
    })
    .await
    .expect("attach stream hung")
}

/// Stdout and stderr of `events`, checking that chunk offsets are contiguous from `from`
/// (after any drop marker).
fn output(events: &[Ev], mut from: u64) -> (String, String) {
    let (mut out, mut err) = (String::new(), String::new());
    for e in events {
        match e {
            Ev::Output(c) => {
                assert_eq!(c.offset, from, "{events:?}");
                from += c.data.len() as u64;
                let text = String::from_utf8_lossy(&c.data);
                match cm::OutputStream::try_from(c.stream).unwrap() {
                    cm::OutputStream::Stdout => out.push_str(&text),
                    cm::OutputStream::Stderr => err.push_str(&text),
                    cm::OutputStream::Unspecified => panic!("no stream"),
                }
            }
            Ev::Dropped(d) => {
                assert_eq!(d.from_offset, from);
                from = d.to_offset;
            }
            Ev::Exit(_) => {}
        }
    }
    (out, err)
}

fn last_exit(events: &[Ev]) -> Option<cm::ProcessExit> {
    match events.last() {
        Some(Ev::Exit(e)) => Some(*e),
        _ => None,
    }
}

fn assert_invalid(r: Result<impl std::fmt::Debug, Status>, field: &str) {
    let s = r.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains(&format!("`{field}`")), "{s:?}");
}

fn code_of<T: std::fmt::Debug>(r: Result<T, Status>) -> Code {
    r.unwrap_err().code()
}

#[tokio::test]
async fn start_list_wait_with_env_and_cwd() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let env = [("SESSION_VAR".to_string(), "from-session".to_string())].into();
    c.configure(pb::ConfigureRequest { env }).await.unwrap();
    let mut s = sh("echo $SESSION_VAR $OWN $(pwd); echo oops >&2; exit 3");
    s.env.insert("OWN".into(), "own".into());
    s.cwd = "/".into();
    let p = start(&mut c, s).await;
    assert_eq!(p.process_id, "p-1");
    assert_eq!(p.kind, cm::ProcessKind::Background as i32);
    assert!(p.pid > 0 && p.start_time.is_some());
    let done = wait(&mut c, "p-1").await;
    assert_eq!(done.state, cm::ProcessState::Exited as i32);
    assert_eq!((done.exit_code, done.signal), (3, 0));
    assert!(done.end_time.is_some());
    let events = attach(&mut c, "p-1", 0, false).await;
    let (out, err) = output(&events, 0);
    assert_eq!(
        (out.as_str(), err.as_str()),
        ("from-session own /\n", "oops\n")
    );
    assert_eq!(last_exit(&events).unwrap().exit_code, 3);
    // Without a cwd it starts in the agent's workdir; ids count up.
    let p = start(&mut c, spec("pwd", &[])).await;
    assert_eq!(p.process_id, "p-2");
    wait(&mut c, "p-2").await;
    let (out, _) = output(&attach(&mut c, "p-2", 0, false).await, 0);
    assert_eq!(out, format!("{}\n", agent.workdir().display()));
    let all = list(&mut c).await;
    let ids: Vec<_> = all.iter().map(|p| p.process_id.as_str()).collect();
    assert_eq!(ids, ["p-1", "p-2"]);
    assert_eq!(all[0].output_offset, 24, "19 bytes of stdout, 5 of stderr");
}

#[tokio::test]
async fn a_background_process_survives_its_client_and_counts_in_stats() {
    let agent = Agent::start().await;
    let p = {
        let mut c = agent.client();
        start(&mut c, spec("sleep", &["100"])).await
    }; // that client and its connection are gone
    let mut c = agent.client();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = list(&mut c).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state, cm::ProcessState::Running as i32);
    assert_eq!(all[0].pid, p.pid);
    let stats = c
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.processes_running, stats.terminals_open), (1, 0));
    // A short wait times out naming the process.
    let s = c
        .wait_process(pb::WaitProcessRequest {
            process_id: p.process_id.clone(),
            timeout: secs(1),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded);
    assert!(
        s.message().contains("p-1 is still running after 1s"),
        "{s:?}"
    );
    signal(&mut c, "p-1", cm::Signal::Kill).await.unwrap();
    let done = wait(&mut c, "p-1").await;
    assert_eq!((done.exit_code, done.signal), (-1, libc::SIGKILL));
    let stats = c
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.processes_running, 0);
}

#[tokio::test]
async fn attach_follows_stdout_and_stderr_to_the_exit() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    start(
        &mut c,
        sh("echo out; echo err >&2; sleep 0.5; echo more; echo late >&2; exit 4"),
    )
    .await;
    let events = attach(&mut c, "p-1", 0, true).await;
    let (out, err) = output(&events, 0);
    assert_eq!((out.as_str(), err.as_str()), ("out\nmore\n", "err\nlate\n"));
    assert_eq!(
        last_exit(&events).unwrap(),
        cm::ProcessExit {
            exit_code: 4,
            signal: 0
        }
    );
    // Exactly one exit, last.
    let exits = events.iter().filter(|e| matches!(e, Ev::Exit(_))).count();
    assert_eq!(exits, 1);
}

#[tokio::test]
async fn a_small_ring_drops_old_output_with_a_marker() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let mut s = sh("head -c 20000 /dev/zero | tr '\\0' a; printf END");
    s.output_buffer_bytes = 4096;
    start(&mut c, s).await;
    let done = wait(&mut c, "p-1").await;
    assert_eq!(done.exit_code, 0);
    let total = 20003u64;
    eventually!(list(&mut c).await[0].output_offset == total);
    let events = attach(&mut c, "p-1", 0, false).await;
    assert_eq!(
        events[0],
        Ev::Dropped(cm::OutputDropped {
            from_offset: 0,
            to_offset: total - 4096
        })
    );
    let (out, _) = output(&events, 0);
    assert_eq!(out.len(), 4096);
    assert!(out.ends_with("aaaEND"));
    assert!(last_exit(&events).is_some());
    // From inside the ring: no marker.
    let events = attach(&mut c, "p-1", total - 3, true).await;
    assert_eq!(output(&events, total - 3).0, "END");
    assert!(last_exit(&events).is_some());
    // Past the end is a bad offset.
    assert_invalid(
        try_attach(&mut c, "p-1", total + 1, false).await,
        "from_offset",
    );
}

#[tokio::test]
async fn stdin_writes_close_and_reconnects_catch_up() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let mut s = spec("cat", &[]);
    s.keep_stdin_open = true;
    s.stdin = Bytes::from_static(b"one\n");
    let p = start(&mut c, s).await;
    assert!(p.stdin_open);
    // Follow from 0, take the first line, then go away.
    let mut stream = try_attach(&mut c, "p-1", 0, true).await.unwrap();
    let first = tokio::time::timeout(HANG, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first.event.unwrap().event.unwrap(),
        Ev::Output(cm::ProcessOutputChunk {
            stream: cm::OutputStream::Stdout as i32,
            offset: 0,
            data: Bytes::from_static(b"one\n"),
        })
    );
    drop(stream);
    write_stdin(&mut c, "p-1", b"two\n", false).await.unwrap();
    eventually!(list(&mut c).await[0].output_offset == 8);
    // Catch up from where the last reader stopped; it is still running, so no exit.
    let events = attach(&mut c, "p-1", 4, false).await;
    assert_eq!(output(&events, 4).0, "two\n");
    assert!(last_exit(&events).is_none());
    write_stdin(&mut c, "p-1", b"three\n", true).await.unwrap();
    let done = wait(&mut c, "p-1").await;
    assert_eq!(done.exit_code, 0);
    assert!(!done.stdin_open);
    let events = attach(&mut c, "p-1", 8, true).await;
    assert_eq!(output(&events, 8).0, "three\n");
    assert_eq!(last_exit(&events).unwrap().exit_code, 0);
    let s = write_stdin(&mut c, "p-1", b"x", false).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");

    // Stdin given without keep_stdin_open: written, then EOF.
    let mut s = spec(
        "python3",
        &["-c", "import sys; print(sum(int(l) for l in sys.stdin))"],
    );
    s.stdin = Bytes::from_static(b"1\n2\n39\n");
    start(&mut c, s).await;
    wait(&mut c, "p-2").await;
    assert_eq!(output(&attach(&mut c, "p-2", 0, false).await, 0).0, "42\n");
    // No stdin at all: FAILED_PRECONDITION, not a hang.
    start(&mut c, spec("sleep", &["100"])).await;
    let s = write_stdin(&mut c, "p-3", b"x", false).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("keep_stdin_open"), "{s:?}");
    signal(&mut c, "p-3", cm::Signal::Kill).await.unwrap();
}

#[tokio::test]
async fn a_process_that_does_not_read_stdin_times_out_the_write() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let mut s = spec("sleep", &["100"]);
    s.keep_stdin_open = true;
    start(&mut c, s).await;
    // More than a pipe holds (1 MiB max per write; a pipe takes 64 KiB by default).
    let s = write_stdin(&mut c, "p-1", &vec![b'x'; 1 << 20], false)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert!(s.message().contains("p-1"), "{s:?}");
    signal(&mut c, "p-1", cm::Signal::Kill).await.unwrap();
}

#[tokio::test]
async fn signals_reach_the_group_and_show_in_the_exit() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    for (sig, num) in [
        (cm::Signal::Term, libc::SIGTERM),
        (cm::Signal::Int, libc::SIGINT),
        (cm::Signal::Hup, libc::SIGHUP),
    ] {
        let p = start(&mut c, spec("sleep", &["100"])).await;
        signal(&mut c, &p.process_id, sig).await.unwrap();
        let done = wait(&mut c, &p.process_id).await;
        assert_eq!((done.exit_code, done.signal), (-1, num), "{sig:?}");
        let events = attach(&mut c, &p.process_id, 0, true).await;
        assert_eq!(
            last_exit(&events).unwrap(),
            cm::ProcessExit {
                exit_code: -1,
                signal: num
            }
        );
        // Signalling an exited process is a precondition failure.
        assert_eq!(
            code_of(signal(&mut c, &p.process_id, sig).await),
            Code::FailedPrecondition
        );
    }
    // The whole group: a shell that ignores TERM (and so does its child) needs KILL;
    // the child goes with it, so its output pipe closes and attach ends.
    let p = start(&mut c, sh("trap '' TERM; sleep 100; echo not-reached")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&mut c, &p.process_id, cm::Signal::Term)
        .await
        .unwrap();
    let s = c
        .wait_process(pb::WaitProcessRequest {
            process_id: p.process_id.clone(),
            timeout: secs(1),
        })
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::DeadlineExceeded,
        "ignored TERM, watched 1 s"
    );
    signal(&mut c, &p.process_id, cm::Signal::Kill)
        .await
        .unwrap();
    let done = wait(&mut c, &p.process_id).await;
    assert_eq!(done.signal, libc::SIGKILL);
    let events = attach(&mut c, &p.process_id, 0, true).await;
    assert_eq!(output(&events, 0).0, "");
}

#[tokio::test]
async fn limits_and_bad_requests_are_reported_with_their_codes() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    for _ in 0..capsa_proto::limits::MAX_RUNNING_PROCESSES {
        start(&mut c, spec("sleep", &["100"])).await;
    }
    let s = try_start(&mut c, spec("sleep", &["100"]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("MAX_RUNNING_PROCESSES"), "{s:?}");
    // One ends: room for one more.
    signal(&mut c, "p-1", cm::Signal::Kill).await.unwrap();
    wait(&mut c, "p-1").await;
    let p = start(&mut c, spec("sleep", &["100"])).await;
    assert_eq!(p.process_id, "p-33");
    let stats = c
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.processes_running, 32);
    // Room for the checks below, which would otherwise hit the limit first.
    signal(&mut c, "p-2", cm::Signal::Kill).await.unwrap();
    wait(&mut c, "p-2").await;

    assert_invalid(try_start(&mut c, spec("", &[])).await, "command");
    assert_invalid(
        try_start(&mut c, spec("/no/such/program", &[])).await,
        "command",
    );
    let dir = agent.workdir().display().to_string();
    assert_invalid(try_start(&mut c, spec(&dir, &[])).await, "command");
    let mut s = spec("true", &[]);
    s.cwd = "relative".into();
    assert_invalid(try_start(&mut c, s).await, "cwd");
    let mut s = spec("true", &[]);
    s.output_buffer_bytes = capsa_proto::limits::MAX_PROCESS_OUTPUT_BUFFER_BYTES + 1;
    assert_invalid(try_start(&mut c, s).await, "output_buffer_bytes");
    let mut s = spec("true", &[]);
    s.args = vec!["x".into(); capsa_proto::limits::MAX_PROCESS_ARGS + 1];
    assert_invalid(try_start(&mut c, s).await, "args");
    assert_invalid(
        c.start_process(pb::StartProcessRequest { spec: None })
            .await,
        "spec",
    );
    assert_invalid(
        c.signal_process(pb::SignalProcessRequest {
            process_id: "p-2".into(),
            signal: 0,
        })
        .await,
        "signal",
    );
    assert_invalid(
        c.wait_process(pb::WaitProcessRequest {
            process_id: "p-2".into(),
            timeout: secs(301),
        })
        .await,
        "timeout",
    );
    let mut keep = spec("cat", &[]);
    keep.keep_stdin_open = true;
    let cat = start(&mut c, keep).await;
    assert_invalid(
        write_stdin(
            &mut c,
            &cat.process_id,
            &vec![0u8; capsa_proto::limits::MAX_STREAM_DATA_BYTES + 1],
            false,
        )
        .await,
        "data",
    );

    // Unknown ids.
    for id in ["p-999", "t-1", ""] {
        assert_eq!(
            code_of(
                c.wait_process(pb::WaitProcessRequest {
                    process_id: id.into(),
                    timeout: secs(1),
                })
                .await
            ),
            Code::NotFound
        );
        assert_eq!(
            code_of(signal(&mut c, id, cm::Signal::Term).await),
            Code::NotFound
        );
        assert_eq!(
            code_of(try_attach(&mut c, id, 0, false).await),
            Code::NotFound
        );
        assert_eq!(
            code_of(write_stdin(&mut c, id, b"x", false).await),
            Code::NotFound
        );
    }
}

#[tokio::test]
async fn the_agent_kills_its_processes_when_it_shuts_down() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    // A grandchild in the group: only killing the group reaches it (the shell's own
    // parent-death signal does not pass to its children).
    let p = start(&mut c, sh("sleep 100 & echo $!; wait")).await;
    eventually!(list(&mut c).await[0].output_offset > 0);
    let (out, _) = output(&attach(&mut c, "p-1", 0, false).await, 0);
    let grandchild: u32 = out.trim().parse().unwrap();
    let mut keep = spec("cat", &[]);
    keep.keep_stdin_open = true;
    let cat = start(&mut c, keep).await;
    let mut follow = try_attach(&mut c, &cat.process_id, 0, true).await.unwrap();
    let common::Agent { process, .. } = agent;
    let status = process.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    // Connections drain after the kill, so the follower got cat's exit.
    let mut last = None;
    while let Some(m) = follow.message().await.unwrap() {
        last = m.event.unwrap().event;
    }
    assert_eq!(
        last,
        Some(Ev::Exit(cm::ProcessExit {
            exit_code: -1,
            signal: libc::SIGKILL
        }))
    );
    let gone = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().unwrap().trim_start().starts_with('Z'))
            .unwrap_or(true)
    };
    eventually!(gone(p.pid) && gone(cat.pid) && gone(grandchild), 10);
}

// ---- terminals ----

struct Term {
    tx: Option<mpsc::Sender<pb::OpenTerminalRequest>>,
    rx: tonic::Streaming<pb::OpenTerminalResponse>,
    info: cm::ProcessInfo,
    screen: String,
    /// How much of `screen` earlier `expect`s consumed.
    seen: usize,
    exit: Option<cm::ProcessExit>,
    ended: bool,
}

fn size(rows: u32, cols: u32) -> Option<cm::TerminalSize> {
    Some(cm::TerminalSize { rows, cols })
}

fn open_msg(open: cm::TerminalOpen) -> pb::OpenTerminalRequest {
    pb::OpenTerminalRequest {
        part: Some(pb::open_terminal_request::Part::Open(open)),
    }
}

async fn try_open(c: &mut Client, first: pb::OpenTerminalRequest) -> Result<Term, Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let mut rx = c.open_terminal(ReceiverStream::new(rx)).await?.into_inner();
    let info = match rx.message().await?.and_then(|m| m.output?.part) {
        Some(Out::Opened(info)) => info,
        other => panic!("expected `opened` first, got {other:?}"),
    };
    Ok(Term {
        tx: Some(tx),
        rx,
        info,
        screen: String::new(),
        seen: 0,
        exit: None,
        ended: false,
    })
}

async fn open_bash(c: &mut Client, rows: u32, cols: u32) -> Term {
    let open = cm::TerminalOpen {
        size: size(rows, cols),
        ..Default::default()
    };
    try_open(c, open_msg(open)).await.unwrap()
}

impl Term {
    async fn send(&self, data: &[u8]) {
        let msg = pb::OpenTerminalRequest {
            part: Some(pb::open_terminal_request::Part::Data(
                Bytes::copy_from_slice(data),
            )),
        };
        self.tx.as_ref().unwrap().send(msg).await.unwrap();
    }

    async fn resize(&self, rows: u32, cols: u32) {
        let msg = pb::OpenTerminalRequest {
            part: Some(pb::open_terminal_request::Part::Resize(cm::TerminalSize {
                rows,
                cols,
            })),
        };
        self.tx.as_ref().unwrap().send(msg).await.unwrap();
    }

    /// Reads one message; false at the end of the stream.
    async fn read_one(&mut self) -> Result<bool, Status> {
        match self.rx.message().await? {
            None => {
                self.ended = true;
                Ok(false)
            }
            Some(m) => {
                match m.output.and_then(|o| o.part) {
                    Some(Out::Data(d)) => self.screen.push_str(&String::from_utf8_lossy(&d)),
                    Some(Out::Exit(e)) => self.exit = Some(e),
                    other => panic!("unexpected {other:?}"),
                }
                Ok(true)
            }
        }
    }

    /// Reads until the screen, past what earlier calls consumed, contains `needle`.
    async fn expect(&mut self, needle: &str) {
        let found = tokio::time::timeout(HANG, async {
            loop {
                if let Some(i) = self.screen[self.seen..].find(needle) {
                    self.seen += i + needle.len();
                    return;
                }
                assert!(self.read_one().await.unwrap(), "stream ended");
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "{needle:?} not on the screen: {:?}",
            &self.screen[self.seen..]
        );
    }

    /// Reads to the end of the stream; returns the exit it reported.
    async fn finish(&mut self) -> Result<cm::ProcessExit, Status> {
        tokio::time::timeout(HANG, async {
            while self.read_one().await? {}
            Ok::<_, Status>(())
        })
        .await
        .expect("terminal stream hung")?;
        Ok(self.exit.expect("no exit before the end"))
    }
}

/// The pids of `pid`'s children whose command is `comm` (this machine's /proc).
fn children_named(pid: u32, comm: &str) -> Vec<u32> {
    let kids =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    kids.split_whitespace()
        .filter_map(|k| k.parse().ok())
        .filter(|k| {
            std::fs::read_to_string(format!("/proc/{k}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

#[tokio::test]
async fn a_terminal_runs_bash_with_its_size_and_ctrl_c() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let mut t = open_bash(&mut c, 24, 80).await;
    assert_eq!(t.info.process_id, "t-1");
    assert_eq!(t.info.kind, cm::ProcessKind::Terminal as i32);
    assert_eq!(t.info.command, "bash");
    t.send(b"echo $((6*7))\r").await;
    t.expect("42").await;
    t.send(b"stty size; tput cols; echo $TERM\r").await;
    t.expect("24 80").await;
    t.expect("80").await;
    t.expect("xterm-256color").await;
    t.resize(30, 100).await;
    t.send(b"stty size\r").await;
    t.expect("30 100").await;
    // Ctrl-C reaches the foreground sleep, and bash carries on.
    t.send(b"sleep 100\r").await;
    eventually!(!children_named(t.info.pid, "sleep").is_empty(), 30);
    let sleep = children_named(t.info.pid, "sleep")[0];
    t.send(b"\x03").await;
    eventually!(
        !std::path::Path::new(&format!("/proc/{sleep}")).exists(),
        30
    );
    t.send(b"echo alive$((1+1))\r").await;
    t.expect("alive2").await;
    let stats = c
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.processes_running, stats.terminals_open), (0, 1));
    let listed = list(&mut c).await;
    assert_eq!(listed[0].state, cm::ProcessState::Running as i32);
    // Terminals' I/O goes through their stream only.
    let s = try_attach(&mut c, "t-1", 0, false).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("OpenTerminal"), "{s:?}");
    assert_eq!(
        code_of(write_stdin(&mut c, "t-1", b"x", false).await),
        Code::FailedPrecondition
    );
    t.send(b"exit 5\r").await;
    let exit = t.finish().await.unwrap();
    assert_eq!((exit.exit_code, exit.signal), (5, 0));
    let done = wait(&mut c, "t-1").await;
    assert_eq!(done.exit_code, 5);
}

#[tokio::test]
async fn python_runs_interactively_in_a_terminal() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let open = cm::TerminalOpen {
        command: "python3".into(),
        args: vec!["-q".into()],
        size: size(24, 80),
        env: [("GREETING".to_string(), "hello".to_string())].into(),
        ..Default::default()
    };
    let mut t = try_open(&mut c, open_msg(open)).await.unwrap();
    t.expect(">>> ").await;
    t.send(b"print(6*7+1)\r").await;
    t.expect("43").await;
    t.send(b"import os; os.environ['GREETING'].upper()\r").await;
    t.expect("'HELLO'").await;
    // A KeyboardInterrupt, not the end of Python.
    t.send(b"while True: pass\r\r").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    t.send(b"\x03").await;
    t.expect("KeyboardInterrupt").await;
    t.send(b"exit()\r").await;
    assert_eq!(t.finish().await.unwrap().exit_code, 0);
}

#[tokio::test]
async fn ending_the_request_stream_hangs_the_terminal_up() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let mut t = open_bash(&mut c, 24, 80).await;
    t.send(b"echo ready$((2+3))\r").await;
    t.expect("ready5").await;
    t.tx = None;
    let exit = t.finish().await.unwrap();
    assert_eq!(
        (exit.exit_code, exit.signal),
        (-1, libc::SIGHUP),
        "{exit:?}"
    );
    assert_eq!(list(&mut c).await[0].state, cm::ProcessState::Exited as i32);

    // A client that cancels the call: the terminal ends too.
    let t = open_bash(&mut c, 24, 80).await;
    drop(t);
    eventually!(
        list(&mut c).await[1].state == cm::ProcessState::Exited as i32,
        30
    );
    // A program that ignores SIGHUP is killed 2 s later.
    let open = cm::TerminalOpen {
        command: "sh".into(),
        args: vec!["-c".into(), "trap '' HUP; echo armed; sleep 100".into()],
        size: size(24, 80),
        ..Default::default()
    };
    let mut t = try_open(&mut c, open_msg(open)).await.unwrap();
    t.expect("armed").await;
    t.tx = None;
    assert_eq!(t.finish().await.unwrap().signal, libc::SIGKILL);
}

#[tokio::test]
async fn terminal_limits_and_bad_messages() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let mut open = Vec::new();
    for _ in 0..capsa_proto::limits::MAX_TERMINALS {
        open.push(open_bash(&mut c, 24, 80).await);
    }
    let first = open_msg(cm::TerminalOpen {
        size: size(24, 80),
        ..Default::default()
    });
    let s = try_open(&mut c, first.clone()).await.err().unwrap();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("MAX_TERMINALS"), "{s:?}");
    let stats = c
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.terminals_open, 8);
    for t in &mut open {
        t.tx = None;
    }
    for t in &mut open {
        t.finish().await.unwrap();
    }
    // Room again.
    let mut t = try_open(&mut c, first).await.unwrap();

    // A later `open`, or a bad resize, fails the stream naming the field.
    t.tx.as_ref()
        .unwrap()
        .send(open_msg(cm::TerminalOpen::default()))
        .await
        .unwrap();
    let s = t.finish().await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("`open`"), "{s:?}");
    let t = open_bash(&mut c, 24, 80).await;
    let mut t = t;
    t.resize(0, 80).await;
    let s = t.finish().await.unwrap_err();
    assert!(s.message().contains("`resize`"), "{s:?}");

    let data_first = pb::OpenTerminalRequest {
        part: Some(pb::open_terminal_request::Part::Data(Bytes::from_static(
            b"x",
        ))),
    };
    assert_invalid(try_open(&mut c, data_first).await.map(|_| ()), "open");
    assert_invalid(
        try_open(&mut c, open_msg(cm::TerminalOpen::default()))
            .await
            .map(|_| ()),
        "size",
    );
    let bad = cm::TerminalOpen {
        size: size(24, 1001),
        ..Default::default()
    };
    assert_invalid(try_open(&mut c, open_msg(bad)).await.map(|_| ()), "size");
    let bad = cm::TerminalOpen {
        command: "/no/such/shell".into(),
        size: size(24, 80),
        ..Default::default()
    };
    assert_invalid(try_open(&mut c, open_msg(bad)).await.map(|_| ()), "command");
}

// ---- ports ----

fn port_msg(port: u32) -> pb::ConnectPortRequest {
    pb::ConnectPortRequest {
        part: Some(pb::connect_port_request::Part::Port(port)),
    }
}

fn data_msg(data: &[u8]) -> pb::ConnectPortRequest {
    pb::ConnectPortRequest {
        part: Some(pb::connect_port_request::Part::Data(
            Bytes::copy_from_slice(data),
        )),
    }
}

/// Connects, sends `chunks`, ends the request stream and reads the reply to its end.
async fn through_port(c: &mut Client, port: u16, chunks: &[&[u8]]) -> Result<Vec<u8>, Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(port_msg(port.into())).await.unwrap();
    let mut replies = c.connect_port(ReceiverStream::new(rx)).await?.into_inner();
    for chunk in chunks {
        tx.send(data_msg(chunk)).await.unwrap();
    }
    drop(tx);
    tokio::time::timeout(HANG, async {
        let mut got = Vec::new();
        while let Some(m) = replies.message().await? {
            got.extend_from_slice(&m.data);
        }
        Ok(got)
    })
    .await
    .expect("port stream hung")
}

/// A server on this machine (the agent's loopback) that reads to EOF and then answers
/// with what it read, reversed: an answer proves the half-close went through.
async fn reverse_server() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                buf.reverse();
                s.write_all(&buf).await.unwrap();
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn ports_carry_http_and_half_closes_and_many_connections() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    // An HTTP server started through the agent itself, on a free port.
    let site = agent.dir.path().join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("hello.txt"), "hello through the tunnel\n").unwrap();
    let port = capsa_test_support::free_port();
    let mut s = spec(
        "python3",
        &[
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ],
    );
    s.cwd = site.display().to_string();
    let server = start(&mut c, s).await;
    let mut ok = false;
    for _ in 0..300 {
        match through_port(&mut c, port, &[b"GET /hello.txt HTTP/1.0\r\n\r\n"]).await {
            Ok(reply) => {
                let reply = String::from_utf8_lossy(&reply).into_owned();
                assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
                assert!(reply.ends_with("hello through the tunnel\n"), "{reply}");
                ok = true;
                break;
            }
            Err(s) if s.code() == Code::FailedPrecondition => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    assert!(ok, "the HTTP server never listened");
    signal(&mut c, &server.process_id, cm::Signal::Term)
        .await
        .unwrap();

    // Half-close: the server answers only after our EOF.
    let (port, task) = reverse_server().await;
    let reply = through_port(&mut c, port, &[b"abc", b"def"]).await.unwrap();
    assert_eq!(reply, b"fedcba");
    // Large data both ways.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<&[u8]> = big.chunks(1 << 20).collect();
    let reply = through_port(&mut c, port, &chunks).await.unwrap();
    let mut expected = big.clone();
    expected.reverse();
    assert!(reply == expected, "3 MB round trip differs");
    // Many at once.
    let runs = (0..20).map(|i| {
        let mut c = c.clone();
        async move {
            let msg = format!("connection number {i}");
            let reply = through_port(&mut c, port, &[msg.as_bytes()]).await.unwrap();
            assert_eq!(reply, msg.bytes().rev().collect::<Vec<_>>());
        }
    });
    futures::future::join_all(runs).await;
    task.abort();
}

#[tokio::test]
async fn a_closed_port_or_a_bad_first_message_fails_the_call() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let port = capsa_test_support::free_port();
    let s = through_port(&mut c, port, &[]).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message()
            .contains(&format!("nothing listens on port {port} in the guest")),
        "{s:?}"
    );
    assert_invalid(through_port(&mut c, 0, &[]).await, "port");
    let first_is_data = futures::stream::iter([data_msg(b"x")]);
    assert_invalid(c.connect_port(first_is_data).await.map(|_| ()), "port");
    // A second port message fails the stream.
    let (port, task) = reverse_server().await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(port_msg(port.into())).await.unwrap();
    let mut replies = c
        .connect_port(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(port_msg(port.into())).await.unwrap();
    let s = tokio::time::timeout(HANG, async {
        loop {
            match replies.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("ended without an error"),
                Err(s) => return s,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("`port`"), "{s:?}");
    task.abort();
}
