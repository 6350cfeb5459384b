//! A fake internet for network tests: a network namespace joined to the host by a veth, on a
//! /24 of the benchmarking range 198.18.0.0/15, with plain-HTTP hosts and an authoritative DNS
//! zone for their names. No test traffic leaves this machine.
//!
//! Subnets are `198.18.<k>.0/24` with `k` in 1..=254, one per live fixture on this machine:
//! `k` is held by an `flock` on `/run/capsa-inet/<k>.lock` (released by the kernel even when
//! the test process is killed), so the namespace is `capsa-inet-<k>` and the veth `cinet-<k>`
//! (`cinet-<k>-ns` inside); a fixture that takes `k` first removes what a killed predecessor
//! left under those names. A `k` whose /24 overlaps a route already on the host is skipped.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType, rdata};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// TTL of the A records [`FakeInternet::add_host`] publishes.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Largest body `GET /bytes/N` serves.
pub const MAX_BYTES: u64 = 64 << 20;
/// `GET /stream` writes one line per tick for this long.
const STREAM_FOR: Duration = Duration::from_secs(600);
const STREAM_TICK: Duration = Duration::from_millis(100);
const LOCK_DIR: &str = "/run/capsa-inet";

type Zone = Arc<Mutex<HashMap<String, (Ipv4Addr, u32)>>>;

/// See the module docs. Everything it created is removed on drop.
pub struct FakeInternet {
    // Field order is drop order: servers stop before the namespace and veth go.
    servers: Servers,
    plumbing: Plumbing,
    zone: Zone,
    queries: Arc<AtomicU64>,
    next_host: u8,
}

impl FakeInternet {
    /// A fresh namespace and veth on a free `198.18.<k>.0/24`: host side `.1`, namespace side
    /// `.2` (the DNS server), default route in the namespace back via `.1`.
    pub fn start() -> io::Result<FakeInternet> {
        let plumbing = Plumbing::create()?;
        let servers = Servers::start(plumbing.k)?;
        let zone: Zone = Arc::default();
        let queries = Arc::new(AtomicU64::new(0));
        let dns = SocketAddr::new(plumbing.addr(2).into(), 53);
        let (udp, tcp) = capsa_vmm::netns::run_in(&plumbing.namespace(), || {
            let udp = std::net::UdpSocket::bind(dns)?;
            udp.set_nonblocking(true)?;
            let tcp = std::net::TcpListener::bind(dns)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })?;
        servers.spawn(serve_dns_udp(udp, zone.clone(), queries.clone()));
        servers.spawn(serve_dns_tcp(tcp, zone.clone(), queries.clone()));
        Ok(FakeInternet {
            servers,
            plumbing,
            zone,
            queries,
            next_host: 10,
        })
    }

    /// A new address in the namespace (`.10`, `.11`, ...) serving plain HTTP on ports 80 and
    /// 443, and an A record `name` → that address with TTL [`DEFAULT_TTL`].
    pub fn add_host(&mut self, name: &str) -> io::Result<IpAddr> {
        self.add_host_with_ttl(name, DEFAULT_TTL)
    }

    /// [`FakeInternet::add_host`] with the record's TTL (whole seconds).
    ///
    /// HTTP: `GET /` → 200 with body `name`; `GET /stream` → 200 and one line every 100 ms
    /// for 10 minutes; `GET /bytes/N` → N zero bytes (N ≤ [`MAX_BYTES`]); anything else 404.
    /// Every response closes the connection.
    pub fn add_host_with_ttl(&mut self, name: &str, ttl: Duration) -> io::Result<IpAddr> {
        let name = zone_key(name);
        if self.zone.lock().unwrap().contains_key(&name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("fake host {name} already added"),
            ));
        }
        if self.next_host == u8::MAX {
            return Err(io::Error::other(
                "no free address left in the fake internet",
            ));
        }
        let addr = self.plumbing.addr(self.next_host);
        ip(&[
            "-n",
            &self.plumbing.ns,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            &self.plumbing.ns_veth,
        ])?;
        self.next_host += 1;
        let listeners = capsa_vmm::netns::run_in(&self.plumbing.namespace(), || {
            [80, 443]
                .into_iter()
                .map(|port| {
                    let listener = std::net::TcpListener::bind((addr, port))?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })
                .collect::<io::Result<Vec<_>>>()
        })?;
        let body: Arc<str> = name.as_str().into();
        for listener in listeners {
            self.servers.spawn(serve_http(listener, body.clone()));
        }
        let ttl = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
        self.zone.lock().unwrap().insert(name, (addr, ttl));
        Ok(addr.into())
    }

    /// The zone's authoritative DNS server (UDP and TCP): the A records of the hosts added,
    /// NXDOMAIN for any other name.
    pub fn dns_server(&self) -> SocketAddr {
        SocketAddr::new(self.plumbing.addr(2).into(), 53)
    }

    /// `198.18.<k>.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}/24", self.plumbing.addr(0))
    }

    /// The host side of the veth (`198.18.<k>.1`): the namespace's gateway.
    pub fn gateway(&self) -> IpAddr {
        self.plumbing.addr(1).into()
    }

    /// `/run/netns/capsa-inet-<k>`.
    pub fn namespace(&self) -> PathBuf {
        self.plumbing.namespace()
    }

    /// How many DNS messages the server has received (UDP and TCP, well-formed or not).
    pub fn dns_queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }
}

/// The namespace, veth and addresses, and the lock on `k`; removed on drop.
struct Plumbing {
    k: u8,
    ns: String,
    host_veth: String,
    ns_veth: String,
    _lock: File,
}

impl Plumbing {
    fn create() -> io::Result<Plumbing> {
        std::fs::create_dir_all(LOCK_DIR)?;
        let start = std::process::id() as usize;
        for i in 0..254 {
            let k = ((start + i) % 254 + 1) as u8;
            let lock = File::create(Path::new(LOCK_DIR).join(format!("{k}.lock")))?;
            // SAFETY: flock on a file we own; the lock lives as long as the File.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                continue;
            }
            let plumbing = Plumbing {
                k,
                ns: format!("capsa-inet-{k}"),
                host_veth: format!("cinet-{k}"),
                ns_veth: format!("cinet-{k}-ns"),
                _lock: lock,
            };
            // Leftovers of a fixture that was killed while holding `k`.
            plumbing.remove();
            if host_routes_overlap(k)? {
                continue;
            }
            plumbing.build()?;
            return Ok(plumbing);
        }
        Err(io::Error::other(
            "no free 198.18.<k>.0/24 for a fake internet (all 254 in use)",
        ))
    }

    fn build(&self) -> io::Result<()> {
        let ns = self.ns.as_str();
        ip(&["netns", "add", ns])?;
        ip(&[
            "link",
            "add",
            &self.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &self.ns_veth,
            "netns",
            ns,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.addr(1)),
            "dev",
            &self.host_veth,
        ])?;
        ip(&["link", "set", &self.host_veth, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", self.addr(2)),
            "dev",
            &self.ns_veth,
        ])?;
        ip(&["-n", ns, "link", "set", &self.ns_veth, "up"])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &self.addr(1).to_string(),
        ])
    }

    fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.k, host)
    }

    fn namespace(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.ns)
    }

    /// Deleting the host end of a veth deletes both ends; errors mean "was not there".
    fn remove(&self) {
        let _ = ip_quiet(&["link", "del", &self.host_veth]);
        let _ = ip_quiet(&["netns", "del", &self.ns]);
    }
}

impl Drop for Plumbing {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Whether a route on the host (main table, default route aside) overlaps `198.18.<k>.0/24`.
fn host_routes_overlap(k: u8) -> io::Result<bool> {
    let ours = u32::from(Ipv4Addr::new(198, 18, k, 0));
    let routes = ip_output(&["-4", "route", "show"])?;
    Ok(routes.lines().any(|line| {
        let Some(dst) = line.split_whitespace().next() else {
            return false;
        };
        let (addr, prefix) = dst.split_once('/').unwrap_or((dst, "32"));
        let (Ok(addr), Ok(prefix)) = (addr.parse::<Ipv4Addr>(), prefix.parse::<u32>()) else {
            return false; // "default", "broadcast", ...
        };
        let prefix = prefix.min(24);
        let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
        u32::from(addr) & mask == ours & mask
    }))
}

fn ip(args: &[&str]) -> io::Result<()> {
    ip_output(args).map(drop)
}

fn ip_output(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("run `ip`: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_quiet(args: &[&str]) -> io::Result<()> {
    Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(drop)
}

/// A thread running a current-thread runtime that serves every listener of one fixture; on
/// drop the runtime (and with it every task and socket) is dropped before the thread ends.
struct Servers {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Servers {
    fn start(k: u8) -> io::Result<Servers> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("capsa-inet-{k}"))
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Servers {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.handle.spawn(task);
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve_http(listener: std::net::TcpListener, body: Arc<str>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(http_connection(stream, body.clone()));
    }
}

async fn http_connection(mut stream: tokio::net::TcpStream, body: Arc<str>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 && request.len() < 16 << 10 => request.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let _ = match (method, path) {
        ("GET", "/") => respond(&mut stream, "200 OK", body.as_bytes()).await,
        ("GET", "/stream") => stream_lines(&mut stream).await,
        ("GET", _) => match path.strip_prefix("/bytes/").map(str::parse::<u64>) {
            Some(Ok(n)) if n <= MAX_BYTES => send_bytes(&mut stream, n).await,
            Some(_) => respond(&mut stream, "400 Bad Request", b"N must be 0..=67108864\n").await,
            None => respond(&mut stream, "404 Not Found", b"not found\n").await,
        },
        _ => respond(&mut stream, "405 Method Not Allowed", b"GET only\n").await,
    };
    let _ = stream.shutdown().await;
}

async fn respond(stream: &mut tokio::net::TcpStream, status: &str, body: &[u8]) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await
}

async fn stream_lines(stream: &mut tokio::net::TcpStream) -> io::Result<()> {
    // No Content-Length: the body ends when the connection does.
    stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        .await?;
    let ticks = STREAM_FOR.as_millis() / STREAM_TICK.as_millis();
    for i in 0..ticks {
        stream.write_all(format!("line {i}\n").as_bytes()).await?;
        tokio::time::sleep(STREAM_TICK).await;
    }
    Ok(())
}

async fn send_bytes(stream: &mut tokio::net::TcpStream, n: u64) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let chunk = [0u8; 64 << 10];
    let mut left = n;
    while left > 0 {
        let len = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..len]).await?;
        left -= len as u64;
    }
    Ok(())
}

async fn serve_dns_udp(socket: std::net::UdpSocket, zone: Zone, queries: Arc<AtomicU64>) {
    let Ok(socket) = tokio::net::UdpSocket::from_std(socket) else {
        return;
    };
    let mut buf = [0u8; 4096];
    while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
        queries.fetch_add(1, Ordering::SeqCst);
        if let Some(reply) = answer(&buf[..n], &zone) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

async fn serve_dns_tcp(listener: std::net::TcpListener, zone: Zone, queries: Arc<AtomicU64>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    while let Ok((mut stream, _)) = listener.accept().await {
        let (zone, queries) = (zone.clone(), queries.clone());
        tokio::spawn(async move {
            // Messages framed by a two-byte length (RFC 1035 4.2.2), until the client closes.
            loop {
                let read = async {
                    let len = stream.read_u16().await?;
                    let mut message = vec![0u8; usize::from(len)];
                    stream.read_exact(&mut message).await?;
                    io::Result::Ok(message)
                };
                let Ok(Ok(message)) = tokio::time::timeout(Duration::from_secs(30), read).await
                else {
                    return;
                };
                queries.fetch_add(1, Ordering::SeqCst);
                let Some(reply) = answer(&message, &zone) else {
                    return;
                };
                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                if stream.write_all(&framed).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The authoritative answer to one query; None for what is not a query at all.
fn answer(query: &[u8], zone: &Zone) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.authoritative = true;
    reply.queries = query.queries.clone();
    reply.metadata.response_code = match (query.metadata.op_code, query.queries.as_slice()) {
        (OpCode::Query, [question]) if question.query_class == DNSClass::IN => {
            match zone
                .lock()
                .unwrap()
                .get(&zone_key(&question.name.to_ascii()))
            {
                None => ResponseCode::NXDomain,
                Some(&(addr, ttl)) => {
                    if matches!(question.query_type, RecordType::A | RecordType::ANY) {
                        reply.answers.push(Record::from_rdata(
                            question.name.clone(),
                            ttl,
                            RData::A(rdata::A(addr)),
                        ));
                    }
                    ResponseCode::NoError
                }
            }
        }
        (OpCode::Query, _) => ResponseCode::FormErr,
        _ => ResponseCode::NotImp,
    };
    reply.to_vec().ok()
}

fn zone_key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}
