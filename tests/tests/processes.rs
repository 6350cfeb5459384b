//! Background processes, terminals and guest ports on the real stack (real processes, Redis
//! and VMs), through `capsa-client` and the `capsa` CLI: a process outlives its client and
//! the executes around it, its output is attached to from offsets, its stdin written, its
//! exit waited for and signalled; `capsa shell` is driven in tmux like a person at a
//! keyboard; `capsa port-forward` carries HTTP and WebSocket traffic to servers in the guest.
//! One stack and one session for the whole file, since VM boots are slow under software
//! emulation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsa_client::{
    Client, Error, ExecuteOptions, ProcessEvent, ProcessExit, ProcessInfo, ProcessKind,
    ProcessOptions, ProcessState, Session, SessionOptions, SessionStatus, Signal, UploadOptions,
};
use capsa_e2e::{Stack, StackOptions};
use capsa_proto::vmpool::v1::ListVmsRequest;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use capsa_test_support::eventually;
use futures::StreamExt as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

#[tokio::test]
async fn processes_terminals_and_ports_on_a_real_stack() {
    // Every tunnelled connection is a streaming call: room for the 20 at once below (the
    // default, 16 per tenant, would refuse some with RESOURCE_EXHAUSTED).
    let stack = Stack::start(StackOptions {
        session_manager_args: vec!["--max-streams-per-tenant".into(), "64".into()],
        ..Default::default()
    })
    .await;
    let url = stack.session_managers[0].url();
    let client = Client::connect(&url, &stack.api_key).await.unwrap();
    let session = client
        .create_session(SessionOptions::default().lifetime(Duration::from_secs(1800)))
        .await
        .unwrap();

    let sleeper =
        a_process_outlives_its_client_and_the_executes_around_it(&url, &stack.api_key, &session)
            .await;
    stdin_output_offsets_and_the_exit(&session, &sleeper.process_id).await;
    a_follower_reconnects_where_it_left_off(&session).await;
    output_past_the_ring_is_reported_dropped(&session).await;
    another_tenant_gets_not_found(&stack, &url, session.id(), &sleeper.process_id).await;
    port_forward_carries_http_and_websockets(&url, &stack.api_key, &session).await;
    capsa_shell_in_tmux(&url, &stack.api_key, &session).await;
    usage_counts_processes_and_the_end_of_the_session_ends_them(&stack, &client, session, &sleeper)
        .await;
}

/// Attach output collected whole: the bytes of each stream, the dropped range and the exit.
#[derive(Debug, Default)]
struct Attached {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// `(offset, stream)` of every chunk, in order (`'o'` / `'e'`).
    chunks: Vec<(u64, char)>,
    dropped: Option<(u64, u64)>,
    exit: Option<ProcessExit>,
}

async fn attach_all(session: &Session, id: &str, from: u64, follow: bool) -> Attached {
    let mut events = session.attach_process(id, from, follow).await.unwrap();
    let mut got = Attached::default();
    let read = async {
        while let Some(event) = events.next().await {
            assert!(got.exit.is_none(), "an event after the exit");
            match event.unwrap() {
                ProcessEvent::Stdout { offset, data } => {
                    got.chunks.push((offset, 'o'));
                    got.stdout.extend_from_slice(&data);
                }
                ProcessEvent::Stderr { offset, data } => {
                    got.chunks.push((offset, 'e'));
                    got.stderr.extend_from_slice(&data);
                }
                ProcessEvent::Dropped {
                    from_offset,
                    to_offset,
                } => {
                    assert!(got.chunks.is_empty() && got.dropped.is_none(), "{got:?}");
                    got.dropped = Some((from_offset, to_offset));
                }
                ProcessEvent::Exit(exit) => got.exit = Some(exit),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .unwrap_or_else(|_| panic!("attach to {id} from {from} still streams after 2 minutes"));
    got
}

async fn running(session: &Session, id: &str) -> ProcessInfo {
    let listed = session.list_processes().await.unwrap();
    listed
        .into_iter()
        .find(|p| p.process_id == id)
        .unwrap_or_else(|| panic!("{id} is not listed"))
}

async fn a_process_outlives_its_client_and_the_executes_around_it(
    url: &str,
    key: &str,
    session: &Session,
) -> ProcessInfo {
    // Started over a connection of its own, which then closes.
    let other = Client::connect(url, key).await.unwrap();
    let sleeper = other
        .session(session.id())
        .start_process("sleep", ["1000"], ProcessOptions::default())
        .await
        .unwrap();
    drop(other);
    assert!(sleeper.process_id.starts_with("p-"), "{sleeper:?}");
    assert_eq!(sleeper.kind(), ProcessKind::Background);
    assert_eq!(sleeper.state(), ProcessState::Running);
    assert!(sleeper.pid > 0);
    assert_eq!(
        (sleeper.command.as_str(), sleeper.args.as_slice()),
        ("sleep", &["1000".to_string()][..])
    );

    let out = session.run("x = 6 * 7\nx").await.unwrap();
    assert_eq!(out.result_text().as_deref(), Some("42"));
    let out = session
        .run_with(
            &format!("kill -0 {} && echo alive", sleeper.pid),
            ExecuteOptions::shell(),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, "alive\n", "{out:?}");
    let listed = running(session, &sleeper.process_id).await;
    assert_eq!(listed.state(), ProcessState::Running);
    assert_eq!(listed.pid, sleeper.pid);
    sleeper
}

async fn stdin_output_offsets_and_the_exit(session: &Session, sleeper: &str) {
    let script = "while read l; do echo \"got $l\"; done; echo done >&2; exit 3";
    let options = ProcessOptions {
        stdin: "a\n".into(),
        ..ProcessOptions::default().keep_stdin_open()
    };
    let p = session
        .start_process("sh", ["-c", script], options)
        .await
        .unwrap();
    assert!(p.stdin_open, "{p:?}");
    session.write_stdin(&p.process_id, "b\n").await.unwrap();
    // Without follow an attach ends once caught up; the process is still reading.
    eventually!(
        attach_all(session, &p.process_id, 0, false).await.stdout == b"got a\ngot b\n",
        60
    );
    let so_far = attach_all(session, &p.process_id, 0, false).await;
    assert!(
        so_far.exit.is_none() && so_far.stderr.is_empty(),
        "{so_far:?}"
    );

    session.close_stdin(&p.process_id).await.unwrap();
    let exited = session
        .wait_process(&p.process_id, Some(Duration::from_secs(120)))
        .await
        .unwrap();
    assert_eq!(exited.state(), ProcessState::Exited);
    assert_eq!((exited.exit_code, exited.signal), (3, 0));
    assert_eq!(
        exited.output_offset, 17,
        "12 bytes of stdout and 5 of stderr"
    );
    assert!(!exited.stdin_open);

    let all = attach_all(session, &p.process_id, 0, false).await;
    assert_eq!(all.stdout, b"got a\ngot b\n");
    assert_eq!(all.stderr, b"done\n");
    assert_eq!(all.chunks.last(), Some(&(12, 'e')), "{all:?}");
    assert_eq!(
        all.exit,
        Some(ProcessExit {
            exit_code: 3,
            signal: 0
        })
    );
    assert_eq!(all.dropped, None);
    // From an offset: only what came after it.
    let tail = attach_all(session, &p.process_id, 12, true).await;
    assert!(
        tail.stdout.is_empty() && tail.stderr == b"done\n",
        "{tail:?}"
    );
    assert_eq!(tail.exit.map(|e| e.exit_code), Some(3));
    let err = session
        .attach_process(&p.process_id, 18, false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("from_offset")),
        "{err}"
    );
    let err = session
        .write_stdin(&p.process_id, "late")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");

    // A signal ends a process: its group gets it, the record says which.
    let victim = session
        .start_process("sleep", ["600"], ProcessOptions::default())
        .await
        .unwrap();
    session
        .signal_process(&victim.process_id, Signal::Term)
        .await
        .unwrap();
    let ended = session
        .wait_process(&victim.process_id, Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!((ended.exit_code, ended.signal), (-1, 15), "{ended:?}");
    let err = session
        .signal_process(&victim.process_id, Signal::Kill)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    // A wait that runs out is an answer about the process, named.
    let err = session
        .wait_process(sleeper, Some(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::DeadlineExceeded(m) if m.contains(sleeper)),
        "{err}"
    );
    let err = session.wait_process("p-999", None).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

async fn a_follower_reconnects_where_it_left_off(session: &Session) {
    let script = "echo first; while [ ! -e /tmp/go-on ]; do sleep 0.1; done; echo second";
    let p = session
        .start_process("sh", ["-c", script], ProcessOptions::default())
        .await
        .unwrap();
    let mut events = session
        .attach_process(&p.process_id, 0, true)
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(60), events.next())
        .await
        .expect("the first line within a minute")
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        ProcessEvent::Stdout {
            offset: 0,
            data: "first\n".into()
        }
    );
    let resume = first.end_offset().unwrap();
    // The client goes away mid-stream; the process carries on.
    drop(events);
    session
        .upload_from(&b""[..], "/tmp/go-on", UploadOptions::default())
        .await
        .unwrap();
    let rest = attach_all(session, &p.process_id, resume, true).await;
    assert_eq!(rest.stdout, b"second\n");
    assert_eq!(rest.chunks, [(6, 'o')]);
    assert_eq!(
        rest.exit,
        Some(ProcessExit {
            exit_code: 0,
            signal: 0
        })
    );
}

async fn output_past_the_ring_is_reported_dropped(session: &Session) {
    let p = session
        .start_process(
            "sh",
            ["-c", "head -c 5000 /dev/zero | tr '\\0' x"],
            ProcessOptions::default().output_buffer_bytes(1024),
        )
        .await
        .unwrap();
    let exited = session
        .wait_process(&p.process_id, Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!((exited.exit_code, exited.output_offset), (0, 5000));
    let got = attach_all(session, &p.process_id, 0, false).await;
    assert_eq!(got.dropped, Some((0, 3976)), "{got:?}");
    assert_eq!(got.stdout, vec![b'x'; 1024]);
    assert_eq!(got.chunks.first(), Some(&(3976, 'o')));
    assert!(got.exit.is_some());
}

async fn another_tenant_gets_not_found(stack: &Stack, url: &str, sid: &str, process_id: &str) {
    let other = Client::connect(url, stack.new_tenant_key("t-processes"))
        .await
        .unwrap();
    let theirs = other.session(sid);
    let not_found = |r: Result<(), Error>| matches!(r, Err(Error::NotFound(_)));
    assert!(not_found(theirs.list_processes().await.map(drop)));
    assert!(not_found(
        theirs
            .wait_process(process_id, Some(Duration::from_secs(1)))
            .await
            .map(drop)
    ));
    assert!(not_found(
        theirs
            .signal_process(process_id, Signal::Kill)
            .await
            .map(drop)
    ));
    assert!(not_found(
        theirs.attach_process(process_id, 0, false).await.map(drop)
    ));
    assert!(not_found(theirs.write_stdin(process_id, "x").await));
    assert!(not_found(theirs.connect_port(22).await.map(drop)));
}

/// A WebSocket echo server on the standard library only: the RFC 6455 handshake, then every
/// frame sent back unmasked; a thread per connection.
const WS_ECHO: &str = r#"
import base64, hashlib, socket, sys, threading

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def exact(c, n):
    b = b""
    while len(b) < n:
        d = c.recv(n - len(b))
        if not d:
            raise EOFError
        b += d
    return b

def handle(c):
    with c:
        req = b""
        while b"\r\n\r\n" not in req:
            d = c.recv(4096)
            if not d:
                return
            req += d
        key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n")
               if l.lower().startswith(b"sec-websocket-key:")][0]
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        while True:
            try:
                h = exact(c, 2)
            except EOFError:
                return
            n = h[1] & 0x7F
            if n == 126:
                n = int.from_bytes(exact(c, 2), "big")
            mask = exact(c, 4) if h[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(exact(c, n)))
            if h[0] & 0x0F == 8:
                c.sendall(b"\x88\x00")
                return
            c.sendall(bytes([h[0], len(data)]) + data)

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

/// RFC 6455's own example key and the accept value it gives.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Waits until something listens on guest `port`, through ConnectPort itself.
async fn wait_listening(session: &Session, port: u16) {
    eventually!(
        match session.connect_port(port).await {
            Ok(_) => true,
            Err(Error::FailedPrecondition(_)) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                false
            }
            Err(e) => panic!("connect to guest port {port}: {e}"),
        },
        120
    );
}

async fn http_get(addr: &str, path: &str) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(60), c.read_to_string(&mut response))
        .await
        .expect("the HTTP response within a minute")
        .unwrap();
    response
}

async fn ws_echo(addr: &str, message: &str) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let upgrade = format!(
        "GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    c.write_all(upgrade.as_bytes()).await.unwrap();
    let exchange = async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(c.read_u8().await.unwrap());
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(
            head.contains(&format!("Sec-WebSocket-Accept: {WS_ACCEPT}\r\n")),
            "{head}"
        );
        // A masked text frame, as a client must send.
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        assert!(message.len() < 126);
        let mut frame = vec![0x81, 0x80 | message.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(message.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        c.write_all(&frame).await.unwrap();
        let mut header = [0u8; 2];
        c.read_exact(&mut header).await.unwrap();
        assert_eq!(header[0], 0x81, "a final text frame");
        assert_eq!(header[1] & 0x80, 0, "a server's frame is not masked");
        let mut payload = vec![0u8; usize::from(header[1] & 0x7F)];
        c.read_exact(&mut payload).await.unwrap();
        String::from_utf8(payload).unwrap()
    };
    tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .expect("the WebSocket echo within a minute")
}

/// A `capsa port-forward` child; its stderr is collected as it comes.
struct Forwarder {
    child: tokio::process::Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// The local address of each mapping, in order.
    local: Vec<String>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // What it reported explains a failed exchange through it.
        if std::thread::panicking() {
            eprintln!(
                "capsa port-forward's stderr:\n{}",
                self.stderr.lock().unwrap()
            );
        }
    }
}

async fn port_forward(url: &str, key: &str, sid: &str, mappings: &[&str]) -> Forwarder {
    let mut child = tokio::process::Command::new(capsa_test_support::workspace_binary("capsa"))
        .arg("port-forward")
        .arg(sid)
        .args(mappings)
        .env("CAPSA_ENDPOINT", url)
        .env("CAPSA_API_KEY", key)
        .env_remove("CAPSA_ENV_FILE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut err_lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = stderr.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = err_lines.next_line().await {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut local = Vec::new();
    for mapping in mappings {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "capsa port-forward printed nothing for {mapping}: {}",
                    stderr.lock().unwrap()
                )
            })
            .unwrap()
            .unwrap_or_else(|| panic!("capsa port-forward exited: {}", stderr.lock().unwrap()));
        let (addr, remote) = line
            .strip_prefix("Forwarding from ")
            .and_then(|l| l.split_once(" -> "))
            .unwrap_or_else(|| panic!("{line}"));
        assert_eq!(Some(remote), mapping.rsplit(':').next(), "{line}");
        local.push(addr.to_owned());
    }
    Forwarder {
        child,
        stderr,
        local,
    }
}

async fn port_forward_carries_http_and_websockets(url: &str, key: &str, session: &Session) {
    let page = "hello through the tunnel\n";
    session
        .upload_from(
            page.as_bytes(),
            "/root/www/hello.txt",
            UploadOptions::default(),
        )
        .await
        .unwrap();
    session
        .upload_from(
            WS_ECHO.as_bytes(),
            "/root/ws_echo.py",
            UploadOptions::default(),
        )
        .await
        .unwrap();
    let http = session
        .start_process(
            "python3",
            ["-m", "http.server", "8000", "--bind", "127.0.0.1"],
            ProcessOptions::default().cwd("/root/www"),
        )
        .await
        .unwrap();
    session
        .start_process(
            "python3",
            ["/root/ws_echo.py", "8765"],
            ProcessOptions::default(),
        )
        .await
        .unwrap();
    wait_listening(session, 8000).await;
    wait_listening(session, 8765).await;

    // Nothing listens on guest port 9: a clear answer at call time.
    let err = session.connect_port(9).await.unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("port 9")),
        "{err}"
    );

    let mut forwarder = port_forward(url, key, session.id(), &["0:8000", "0:8765", "0:9"]).await;
    let (web, ws, closed) = (
        forwarder.local[0].clone(),
        forwarder.local[1].clone(),
        forwarder.local[2].clone(),
    );
    let response = http_get(&web, "/hello.txt").await;
    assert!(response.starts_with("HTTP/1.0 200 "), "{response}");
    assert!(response.ends_with(&format!("\r\n\r\n{page}")), "{response}");
    assert_eq!(ws_echo(&ws, "hello websocket").await, "hello websocket");

    // 20 connections at once, each its own tunnel, each with its own answer.
    let gets = (0..10).map(|_| {
        let web = web.clone();
        async move { http_get(&web, "/hello.txt").await.ends_with(page) }
    });
    let echoes = (0..10).map(|i| {
        let ws = ws.clone();
        async move { ws_echo(&ws, &format!("message {i}")).await == format!("message {i}") }
    });
    let (gets, echoes) = tokio::join!(
        futures::future::join_all(gets),
        futures::future::join_all(echoes)
    );
    assert!(gets.iter().all(|ok| *ok), "{gets:?}");
    assert!(echoes.iter().all(|ok| *ok), "{echoes:?}");

    // The refused guest port closes that local connection, and only that one.
    let mut refused = TcpStream::connect(&closed).await.unwrap();
    let mut got = Vec::new();
    let _eof_or_reset =
        tokio::time::timeout(Duration::from_secs(60), refused.read_to_end(&mut got))
            .await
            .expect("the refused connection is closed within a minute");
    assert!(got.is_empty());
    assert!(http_get(&web, "/hello.txt").await.ends_with(page));
    let stderr = forwarder.stderr.clone();
    eventually!(
        stderr
            .lock()
            .unwrap()
            .contains("-> 9: FAILED_PRECONDITION: nothing listens on port 9"),
        30
    );
    assert!(
        forwarder.child.try_wait().unwrap().is_none(),
        "the forwarder keeps running: {}",
        stderr.lock().unwrap()
    );
    forwarder.child.start_kill().unwrap();
    forwarder.child.wait().await.unwrap();

    session
        .signal_process(&http.process_id, Signal::Int)
        .await
        .unwrap();
    let ended = session
        .wait_process(&http.process_id, Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(ended.state(), ProcessState::Exited);
    // Its access log went to stderr, one line per GET.
    let log = attach_all(session, &http.process_id, 0, false).await;
    let gets = String::from_utf8_lossy(&log.stderr)
        .matches("\"GET /hello.txt HTTP/1.0\" 200")
        .count();
    assert_eq!(gets, 12, "{log:?}");
}

/// A tmux server of its own (private socket, no config) with one session, killed on drop
/// however the test ends.
struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend_from_slice(keys);
        self.ok(&args);
    }

    /// Types `line` literally, then Enter.
    fn line(&self, line: &str) {
        self.keys(&["-l", line]);
        self.keys(&["Enter"]);
    }

    fn screen(&self) -> String {
        self.ok(&["capture-pane", "-p", "-t", &self.session])
    }

    /// Waits (2 minutes at most) until the screen has a line equal to `line`.
    async fn wait_line(&self, line: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let screen = self.screen();
            if screen.lines().any(|l| l.trim_end() == line) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no line {line:?} on the screen within 2 minutes:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `rows cols` of the pane as tmux has it.
    fn pane_size(&self) -> (u32, u32) {
        let size = self.ok(&[
            "display",
            "-p",
            "-t",
            &self.session,
            "#{pane_height} #{pane_width}",
        ]);
        let (rows, cols) = size.trim().split_once(' ').unwrap();
        (rows.parse().unwrap(), cols.parse().unwrap())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

async fn capsa_shell_in_tmux(url: &str, key: &str, session: &Session) {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| -> PathBuf { dir.path().join(name) };
    let capsa = capsa_test_support::workspace_binary("capsa");
    // stty -a before and after: the local terminal must come back as it was.
    let script = format!(
        "export CAPSA_ENDPOINT='{url}' CAPSA_API_KEY='{key}'\n\
         unset CAPSA_ENV_FILE\n\
         stty -a > '{before}'\n\
         '{capsa}' shell '{sid}' 2> '{err}'\n\
         echo $? > '{status}.part' && mv '{status}.part' '{status}'\n\
         stty -a > '{after}'\n",
        before = file("stty-before").display(),
        after = file("stty-after").display(),
        capsa = capsa.display(),
        sid = session.id(),
        err = file("stderr").display(),
        status = file("status").display(),
    );
    std::fs::write(file("run.sh"), script).unwrap();
    let unique = format!("capsa-e2e-{}", std::process::id());
    let tmux = Tmux {
        socket: unique.clone(),
        session: unique,
    };
    let run = format!("sh '{}'", file("run.sh").display());
    tmux.ok(&[
        "new-session",
        "-d",
        "-s",
        &tmux.session,
        "-x",
        "120",
        "-y",
        "40",
        &run,
    ]);

    // The remote bash answers, at the local window's size.
    let (rows, cols) = tmux.pane_size();
    tmux.line("echo SIZE-$(stty size | tr ' ' x)");
    tmux.wait_line(&format!("SIZE-{rows}x{cols}")).await;

    tmux.line("python3");
    tmux.wait_line(">>>").await;
    tmux.line("print(6*7)");
    tmux.wait_line("42").await;
    // Ctrl-C reaches the foreground job in the guest (not this side: the local terminal is raw).
    tmux.line("import time; time.sleep(100)");
    tokio::time::sleep(Duration::from_secs(2)).await;
    tmux.keys(&["C-c"]);
    tmux.wait_line("KeyboardInterrupt").await;
    tmux.line("print('still', 6*7)");
    tmux.wait_line("still 42").await;
    tmux.line("exit()");

    // SIGWINCH: the remote terminal follows the local window.
    tmux.ok(&[
        "resize-window",
        "-t",
        &tmux.session,
        "-x",
        "100",
        "-y",
        "30",
    ]);
    let (rows, cols) = tmux.pane_size();
    assert_eq!(cols, 100);
    let resized = format!("SIZE-{rows}x{cols}");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // Asked again until it shows: the resize travels on its own, after the keys.
    while !tmux.screen().lines().any(|l| l.trim_end() == resized) {
        assert!(
            std::time::Instant::now() < deadline,
            "{resized} never shown:\n{}",
            tmux.screen()
        );
        tmux.line("echo SIZE-$(stty size | tr ' ' x)");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    tmux.line("exit");
    eventually!(file("status").exists(), 120);
    let status = std::fs::read_to_string(file("status")).unwrap();
    let stderr = std::fs::read_to_string(file("stderr")).unwrap_or_default();
    assert_eq!(status.trim(), "0", "capsa shell's stderr: {stderr}");
    // The session ends with the script.
    eventually!(
        !tmux
            .run(&["has-session", "-t", &tmux.session])
            .status
            .success(),
        30
    );
    assert_same_terminal(&file("stty-before"), &file("stty-after"));

    // The guest's record of it: a terminal, exited with bash's status.
    let terminals: Vec<ProcessInfo> = session
        .list_processes()
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.kind() == ProcessKind::Terminal)
        .collect();
    assert_eq!(terminals.len(), 1, "{terminals:?}");
    assert!(terminals[0].process_id.starts_with("t-"));
    assert_eq!(terminals[0].state(), ProcessState::Exited);
    assert_eq!(terminals[0].exit_code, 0);
}

/// `stty -a` before and after: the same settings (the first line, with the window size that
/// the test changed, aside); in particular canonical mode and echo are back on.
fn assert_same_terminal(before: &Path, after: &Path) {
    let settings = |p: &Path| {
        let text = std::fs::read_to_string(p).unwrap();
        text.lines().skip(1).collect::<Vec<_>>().join("\n")
    };
    let (before, after) = (settings(before), settings(after));
    assert_eq!(before, after);
    let words: Vec<&str> = after.split_whitespace().collect();
    assert!(
        words.contains(&"icanon") && words.contains(&"echo"),
        "{after}"
    );
}

async fn usage_counts_processes_and_the_end_of_the_session_ends_them(
    stack: &Stack,
    client: &Client,
    session: Session,
    sleeper: &ProcessInfo,
) {
    // The sleeper and the WebSocket server still run; the samples reach metering in time.
    assert_eq!(
        running(&session, &sleeper.process_id).await.state(),
        ProcessState::Running
    );
    eventually!(
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
            session.usage().await.unwrap().processes_running >= 2
        },
        120
    );
    let tenant = client.tenant_usage().await.unwrap();
    assert!(tenant.total.unwrap_or_default().processes_running >= 2);

    let id = session.id().to_owned();
    let vm_id = session.info().await.unwrap().vm_id;
    session.close().await.unwrap();
    let err = client.session(&id).list_processes().await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    eventually!(
        client.session_info(&id).await.unwrap().status() == SessionStatus::Terminated,
        60
    );
    // Its processes went with the VM.
    let mut pool = VmPoolServiceClient::connect(stack.vm_pool.url())
        .await
        .unwrap();
    eventually!(
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
