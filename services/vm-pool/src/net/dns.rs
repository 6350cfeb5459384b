//! The node's DNS forwarder: the only resolver a guest can reach, and how domain rules of an
//! egress policy turn into admitted addresses.
//!
//! For a query from guest address `src`:
//! - no VM has that address: REFUSED;
//! - the name is not allowed by that VM's policy: NXDOMAIN at once (the upstream is never
//!   asked), counted and logged through [`Admit::denied_name`];
//! - otherwise the question goes to the upstreams (UDP with a timeout per attempt, retried on
//!   the next upstream, TCP when the answer is truncated or the guest asked over TCP). From
//!   the answer the forwarder keeps the CNAME chain that starts at the asked name (a CNAME
//!   target needs no rule of its own: the asked name was allowed) and the records of its
//!   names; addresses in [`capsa_egress::reserved_ranges`] are removed unless the policy
//!   names them ([`capsa_egress::EgressPolicy::names_reserved`]; DNS rebinding). The remaining addresses are admitted for that VM with
//!   [`Admit::admit`] for the records' TTL clamped to [`DnsConfig::ttl_floor`] and
//!   [`DnsConfig::ttl_ceiling`], and only once that resolves does the guest get its answer,
//!   so its first connect works. The answer's address TTLs are lowered to the admitted TTL
//!   so the guest never caches an address longer than it stays admitted.
//! - the upstreams fail or time out, or admission fails: SERVFAIL.
//!
//! Only standard queries (opcode QUERY) of class IN with one question are served; ANY, AXFR
//! and IXFR are refused. Queries over [`MAX_QUERY`] bytes and messages that do not parse are
//! dropped. In-flight queries are bounded per source and in total (REFUSED past either), TCP
//! connections in number and by an idle timeout.
//!
//! The listening sockets live in the VMs' network namespace; upstream sockets are made by the
//! runtime's threads, so they live in vm-pool's own namespace (a loopback upstream such as
//! 127.0.0.53 from `/etc/resolv.conf` works).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsa_egress::EgressPolicy;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Largest query accepted, in bytes (a query is one question: far smaller in practice).
pub const MAX_QUERY: usize = 1232;
/// The EDNS UDP payload size the forwarder offers (to upstreams and guests): the size that
/// avoids IP fragmentation (DNS flag day 2020).
const UDP_PAYLOAD: u16 = 1232;
/// Longest CNAME chain followed inside one answer.
const MAX_CHAIN: usize = 16;
/// Receive buffer for an upstream's UDP answer (it was told [`UDP_PAYLOAD`]).
const UPSTREAM_UDP_BUFFER: usize = 4096;

/// What the forwarder needs from the node: each VM's policy, and its admitted addresses.
pub trait Admit: Send + Sync + 'static {
    /// The policy of the VM whose guest address is `src` (None: no such VM → REFUSED).
    fn policy_for(&self, src: IpAddr) -> Option<Arc<EgressPolicy>>;
    /// Puts `addrs` into that VM's admitted set for `ttl`; resolves once the rule is in force.
    fn admit(
        &self,
        src: IpAddr,
        addrs: Vec<IpAddr>,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// A refused name, for the per-VM denial count and log.
    fn denied_name(&self, src: IpAddr, name: &str);
}

/// Upstreams, timeouts and limits of the forwarder.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Resolvers asked, in order (default: [`system_upstreams`]).
    pub upstreams: Vec<SocketAddr>,
    /// One attempt at one upstream (a UDP exchange, or a TCP connect and exchange).
    pub upstream_timeout: Duration,
    /// Attempts per query; each goes to the next upstream (round the list).
    pub upstream_attempts: usize,
    /// Longest wait for [`Admit::admit`] (SERVFAIL past it).
    pub admit_timeout: Duration,
    /// Shortest time an answered address stays admitted.
    pub ttl_floor: Duration,
    /// Longest time an answered address stays admitted (and the most the guest may cache it).
    pub ttl_ceiling: Duration,
    /// Queries being forwarded for one source at once.
    pub max_in_flight_per_source: usize,
    /// Queries being forwarded at once, all sources together.
    pub max_in_flight: usize,
    /// Open TCP connections from guests.
    pub max_tcp_connections: usize,
    /// A guest's TCP connection is closed after this long without a query.
    pub tcp_idle_timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> DnsConfig {
        DnsConfig {
            upstreams: system_upstreams(),
            upstream_timeout: Duration::from_secs(2),
            upstream_attempts: 2,
            admit_timeout: Duration::from_secs(5),
            ttl_floor: Duration::from_secs(30),
            ttl_ceiling: Duration::from_secs(3600),
            max_in_flight_per_source: 32,
            max_in_flight: 512,
            max_tcp_connections: 64,
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

/// The nameservers of `/etc/resolv.conf`, port 53 (none if it cannot be read).
pub fn system_upstreams() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| parse_resolv_conf(&text))
        .unwrap_or_default()
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            // A scoped address (fe80::1%eth0) does not parse and is skipped.
            words.next()?.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Serves guests' queries on `udp` and `tcp` until `cancel`; every task it started ends with
/// it.
pub async fn serve<A: Admit>(
    udp: UdpSocket,
    tcp: TcpListener,
    config: DnsConfig,
    admit: Arc<A>,
    cancel: CancellationToken,
) {
    let tcp_slots = Arc::new(Semaphore::new(config.max_tcp_connections));
    let forwarder = Arc::new(Forwarder {
        in_flight: Semaphore::new(config.max_in_flight),
        per_source: Mutex::default(),
        config,
        admit,
    });
    let udp = Arc::new(udp);
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; MAX_QUERY + 1];
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            received = udp.recv_from(&mut buf) => match received {
                Ok((n, peer)) if n <= MAX_QUERY => {
                    let query = buf[..n].to_vec();
                    let (forwarder, udp) = (forwarder.clone(), udp.clone());
                    tasks.spawn(async move {
                        let src = peer.ip().to_canonical();
                        if let Some(reply) = forwarder.answer(src, &query, Transport::Udp).await
                            && let Err(e) = udp.send_to(&reply, peer).await
                        {
                            debug!(%peer, error = %e, "DNS reply not sent");
                        }
                    });
                }
                Ok((_, peer)) => debug!(%peer, "oversized DNS query dropped"),
                Err(e) => warn!(error = %e, "DNS UDP receive failed"),
            },
            accepted = tcp.accept() => match accepted {
                Ok((stream, peer)) => match tcp_slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let src = peer.ip().to_canonical();
                        tasks.spawn(forwarder.clone().tcp_connection(stream, src, slot));
                    }
                    Err(_) => debug!(%peer, "too many DNS TCP connections: closed"),
                },
                Err(e) => {
                    // Out of file descriptors and the like: let it pass rather than spin.
                    warn!(error = %e, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined
                    && e.is_panic()
                {
                    error!(error = %e, "DNS forwarder task panicked");
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("no upstream DNS server configured")]
    NoUpstream,
    #[error("{0}: no answer within {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("{0}: {1}")]
    Io(SocketAddr, io::Error),
    #[error("{0}: answer does not parse or does not match the question")]
    BadAnswer(SocketAddr),
}

struct Forwarder<A> {
    config: DnsConfig,
    admit: Arc<A>,
    in_flight: Semaphore,
    per_source: Mutex<HashMap<IpAddr, usize>>,
}

/// One of a source's in-flight queries; given back on drop.
struct SourceSlot<'a> {
    counts: &'a Mutex<HashMap<IpAddr, usize>>,
    src: IpAddr,
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap();
        if let Some(count) = counts.get_mut(&self.src) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.src);
            }
        }
    }
}

impl<A: Admit> Forwarder<A> {
    async fn tcp_connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        src: IpAddr,
        _slot: OwnedSemaphorePermit,
    ) {
        let idle = self.config.tcp_idle_timeout;
        // Messages framed by a two-byte length (RFC 1035 4.2.2), one at a time.
        loop {
            let read = async {
                let len = usize::from(stream.read_u16().await?);
                if len > MAX_QUERY {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "query too long"));
                }
                let mut query = vec![0u8; len];
                stream.read_exact(&mut query).await?;
                Ok(query)
            };
            let Ok(Ok(query)) = timeout(idle, read).await else {
                return;
            };
            let Some(reply) = self.answer(src, &query, Transport::Tcp).await else {
                return;
            };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
            framed.extend_from_slice(&reply);
            if !matches!(timeout(idle, stream.write_all(&framed)).await, Ok(Ok(()))) {
                return;
            }
        }
    }

    /// The reply to one message from `src`; None for what gets no reply (not a query, does
    /// not parse).
    async fn answer(&self, src: IpAddr, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let query = Message::from_vec(query).ok()?;
        if query.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.queries = query.queries.clone();
        if query.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(UDP_PAYLOAD);
            reply.edns = Some(edns);
        }
        reply.metadata.response_code = self.resolve(src, &query, &mut reply, transport).await;
        let bytes = match reply.to_vec() {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(vm = %src, error = %e, "DNS answer does not encode: SERVFAIL");
                let mut failed = reply.truncate();
                failed.metadata.truncation = false;
                failed.metadata.response_code = ResponseCode::ServFail;
                return failed.to_vec().ok();
            }
        };
        let limit = match transport {
            Transport::Udp => usize::from(query.max_payload().min(UDP_PAYLOAD)),
            Transport::Tcp => usize::from(u16::MAX),
        };
        if bytes.len() > limit {
            // The guest asks again over TCP.
            return reply.truncate().to_vec().ok();
        }
        Some(bytes)
    }

    /// Fills `reply`'s records and returns its response code.
    async fn resolve(
        &self,
        src: IpAddr,
        query: &Message,
        reply: &mut Message,
        transport: Transport,
    ) -> ResponseCode {
        let Some(policy) = self.admit.policy_for(src) else {
            debug!(%src, "DNS query from an address that is no VM's: refused");
            return ResponseCode::Refused;
        };
        if query.metadata.op_code != OpCode::Query {
            return ResponseCode::NotImp;
        }
        let [question] = query.queries.as_slice() else {
            return ResponseCode::FormErr;
        };
        if question.query_class != DNSClass::IN
            || matches!(
                question.query_type,
                RecordType::ANY | RecordType::AXFR | RecordType::IXFR
            )
        {
            return ResponseCode::Refused;
        }
        if !name_allowed(&policy, &question.name) {
            self.deny(src, &question.name);
            return ResponseCode::NXDomain;
        }
        let Some(_slot) = self.source_slot(src) else {
            warn!(vm = %src, "too many DNS queries in flight for one VM: refused");
            return ResponseCode::Refused;
        };
        let Ok(_permit) = self.in_flight.try_acquire() else {
            warn!(vm = %src, "too many DNS queries in flight: refused");
            return ResponseCode::Refused;
        };
        let upstream = match self.forward(question, transport).await {
            Ok(upstream) => upstream,
            Err(e) => {
                warn!(vm = %src, name = %question.name, error = %e, "DNS upstream failed: SERVFAIL");
                return ResponseCode::ServFail;
            }
        };
        // The policy may have changed while the upstream answered.
        let policy = match self.admit.policy_for(src) {
            None => return ResponseCode::Refused,
            Some(policy) if !name_allowed(&policy, &question.name) => {
                self.deny(src, &question.name);
                return ResponseCode::NXDomain;
            }
            Some(policy) => policy,
        };
        let mut kept = keep_chain(&question.name, upstream.answers, &policy);
        if let Some(ttl) = kept.ttl {
            let ttl = Duration::from_secs(ttl.into())
                .max(self.config.ttl_floor)
                .min(self.config.ttl_ceiling);
            match timeout(
                self.config.admit_timeout,
                self.admit.admit(src, kept.addrs, ttl),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(vm = %src, name = %question.name, error = %e, "admitting DNS answer failed: SERVFAIL");
                    return ResponseCode::ServFail;
                }
                Err(_) => {
                    warn!(vm = %src, name = %question.name, "admitting DNS answer timed out: SERVFAIL");
                    return ResponseCode::ServFail;
                }
            }
            let cap = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
            for record in &mut kept.answers {
                if is_address(record) {
                    record.ttl = record.ttl.min(cap);
                }
            }
        }
        reply.answers = kept.answers;
        // SOA records let the guest cache a negative answer; nothing else is passed on.
        reply.authorities = upstream
            .authorities
            .into_iter()
            .filter(|record| record.record_type() == RecordType::SOA)
            .collect();
        upstream.metadata.response_code
    }

    fn deny(&self, src: IpAddr, name: &Name) {
        let name = name.to_ascii();
        info!(vm = %src, name = %name, "DNS name denied by the egress policy");
        self.admit.denied_name(src, &name);
    }

    fn source_slot(&self, src: IpAddr) -> Option<SourceSlot<'_>> {
        let mut counts = self.per_source.lock().unwrap();
        let count = counts.entry(src).or_insert(0);
        if *count >= self.config.max_in_flight_per_source {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            counts: &self.per_source,
            src,
        })
    }

    /// The upstreams' answer to `question`: attempts go round the upstreams; SERVFAIL and
    /// REFUSED answers are given only when no attempt does better.
    async fn forward(
        &self,
        question: &Query,
        transport: Transport,
    ) -> Result<Message, UpstreamError> {
        let upstreams = &self.config.upstreams;
        let mut last = Err(UpstreamError::NoUpstream);
        if upstreams.is_empty() {
            return last;
        }
        for attempt in 0..self.config.upstream_attempts.max(1) {
            let upstream = upstreams[attempt % upstreams.len()];
            let request = upstream_query(question);
            let answer = match transport {
                Transport::Udp => match self.exchange_udp(upstream, &request).await {
                    Ok(answer) if answer.metadata.truncation => {
                        self.exchange_tcp(upstream, &request).await
                    }
                    other => other,
                },
                Transport::Tcp => self.exchange_tcp(upstream, &request).await,
            };
            match answer {
                Ok(answer)
                    if matches!(
                        answer.metadata.response_code,
                        ResponseCode::ServFail | ResponseCode::Refused
                    ) =>
                {
                    debug!(%upstream, code = %answer.metadata.response_code, "DNS upstream declined");
                    last = Ok(answer);
                }
                Ok(answer) => return Ok(answer),
                Err(e) => {
                    debug!(error = %e, "DNS upstream attempt failed");
                    last = Err(e);
                }
            }
        }
        last
    }

    async fn exchange_udp(
        &self,
        upstream: SocketAddr,
        request: &Message,
    ) -> Result<Message, UpstreamError> {
        let limit = self.config.upstream_timeout;
        let io_err = |e| UpstreamError::Io(upstream, e);
        let bytes = request
            .to_vec()
            .map_err(|_| UpstreamError::BadAnswer(upstream))?;
        let exchange = async {
            // A fresh socket per query: a random source port, and only this upstream's
            // datagrams (connected).
            let local: SocketAddr = if upstream.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                ([0u16; 8], 0).into()
            };
            let socket = UdpSocket::bind(local).await.map_err(io_err)?;
            socket.connect(upstream).await.map_err(io_err)?;
            socket.send(&bytes).await.map_err(io_err)?;
            let mut buf = vec![0u8; UPSTREAM_UDP_BUFFER];
            loop {
                let n = socket.recv(&mut buf).await.map_err(io_err)?;
                // Anything else (a late answer, a spoofing attempt) is skipped.
                if let Ok(answer) = Message::from_vec(&buf[..n])
                    && answers(&answer, request)
                {
                    return Ok(answer);
                }
            }
        };
        timeout(limit, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(upstream, limit))?
    }

    async fn exchange_tcp(
        &self,
        upstream: SocketAddr,
        request: &Message,
    ) -> Result<Message, UpstreamError> {
        let limit = self.config.upstream_timeout;
        let io_err = |e| UpstreamError::Io(upstream, e);
        let bytes = request
            .to_vec()
            .map_err(|_| UpstreamError::BadAnswer(upstream))?;
        let exchange = async {
            let mut stream = TcpStream::connect(upstream).await.map_err(io_err)?;
            let mut framed = Vec::with_capacity(bytes.len() + 2);
            framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            framed.extend_from_slice(&bytes);
            stream.write_all(&framed).await.map_err(io_err)?;
            let len = stream.read_u16().await.map_err(io_err)?;
            let mut buf = vec![0u8; usize::from(len)];
            stream.read_exact(&mut buf).await.map_err(io_err)?;
            Message::from_vec(&buf)
                .ok()
                .filter(|answer| answers(answer, request))
                .ok_or(UpstreamError::BadAnswer(upstream))
        };
        timeout(limit, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(upstream, limit))?
    }
}

/// The question as the forwarder asks it: a fresh random ID, recursion desired, EDNS with
/// [`UDP_PAYLOAD`].
fn upstream_query(question: &Query) -> Message {
    let mut request = Message::query();
    request.metadata.recursion_desired = true;
    request.add_query(question.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(UDP_PAYLOAD);
    request.set_edns(edns);
    request
}

/// Whether `answer` is the response to `request` (same ID, same question).
fn answers(answer: &Message, request: &Message) -> bool {
    answer.metadata.message_type == MessageType::Response
        && answer.metadata.id == request.metadata.id
        && answer.queries == request.queries
}

/// Whether `policy` allows `name`. A label with bytes no host name has (a dot inside a
/// label, a control byte) is refused before its escaped text form is matched at all.
fn name_allowed(policy: &EgressPolicy, name: &Name) -> bool {
    name.iter().all(|label| {
        label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    }) && policy.allows_name(&name.to_ascii())
}

fn is_address(record: &Record) -> bool {
    matches!(record.data, RData::A(_) | RData::AAAA(_))
}

/// What the guest gets of an upstream answer, and the addresses to admit.
#[derive(Debug, Default)]
struct Kept {
    answers: Vec<Record>,
    addrs: Vec<IpAddr>,
    /// The smallest TTL of the kept addresses (None: no address kept).
    ttl: Option<u32>,
}

/// The records of the CNAME chain that starts at `qname` (in any order in the answer), less
/// addresses in the reserved ranges that `policy`'s CIDRs do not name.
fn keep_chain(qname: &Name, answers: Vec<Record>, policy: &EgressPolicy) -> Kept {
    let mut chain = vec![qname.clone()];
    while chain.len() <= MAX_CHAIN {
        let current = &chain[chain.len() - 1];
        let target = answers.iter().find_map(|record| match &record.data {
            RData::CNAME(target) if record.name == *current => Some(target.0.clone()),
            _ => None,
        });
        match target {
            Some(target) if !chain.contains(&target) => chain.push(target),
            _ => break,
        }
    }
    let mut kept = Kept::default();
    for record in answers {
        if record.dns_class != DNSClass::IN || !chain.contains(&record.name) {
            continue;
        }
        let addr = match &record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        };
        if let Some(addr) = addr {
            if capsa_egress::Cidr::is_reserved(addr) && !policy.names_reserved(addr) {
                debug!(name = %record.name, %addr, "reserved address dropped from a DNS answer");
                continue;
            }
            kept.ttl = Some(kept.ttl.map_or(record.ttl, |ttl| ttl.min(record.ttl)));
            kept.addrs.push(addr);
        }
        kept.answers.push(record);
    }
    kept
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use capsa_egress::PolicyInput;
    use hickory_proto::rr::rdata::{A, CNAME, SOA};

    use super::*;

    const GUEST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const STRANGER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    const WAIT: Duration = Duration::from_secs(10);

    fn policy(domains: &[&str], cidrs: &[&str]) -> EgressPolicy {
        EgressPolicy::from_input(PolicyInput {
            allowed_domains: domains.iter().map(|s| s.to_string()).collect(),
            allowed_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            ..PolicyInput::default()
        })
        .unwrap()
    }

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn a(owner: &str, ttl: u32, addr: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(addr.parse().unwrap())))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    /// A fake Admit: one policy for GUEST, a record of every call.
    struct FakeAdmit {
        policy: Mutex<Arc<EgressPolicy>>,
        /// Admissions take this long to come into force.
        delay: Duration,
        fail: bool,
        admitted: Mutex<Vec<(IpAddr, Vec<IpAddr>, Duration)>>,
        denied: Mutex<Vec<(IpAddr, String)>>,
    }

    impl FakeAdmit {
        fn new(policy: EgressPolicy) -> FakeAdmit {
            FakeAdmit {
                policy: Mutex::new(Arc::new(policy)),
                delay: Duration::ZERO,
                fail: false,
                admitted: Mutex::default(),
                denied: Mutex::default(),
            }
        }

        fn admitted(&self) -> Vec<(IpAddr, Vec<IpAddr>, Duration)> {
            self.admitted.lock().unwrap().clone()
        }
    }

    impl Admit for FakeAdmit {
        fn policy_for(&self, src: IpAddr) -> Option<Arc<EgressPolicy>> {
            (src == GUEST).then(|| self.policy.lock().unwrap().clone())
        }

        async fn admit(
            &self,
            src: IpAddr,
            addrs: Vec<IpAddr>,
            ttl: Duration,
        ) -> Result<(), String> {
            tokio::time::sleep(self.delay).await;
            if self.fail {
                return Err("nft said no".into());
            }
            self.admitted.lock().unwrap().push((src, addrs, ttl));
            Ok(())
        }

        fn denied_name(&self, src: IpAddr, name: &str) {
            self.denied.lock().unwrap().push((src, name.to_owned()));
        }
    }

    type Zone = fn(&Query, Transport) -> Message;

    /// An upstream on 127.0.0.1 (UDP and TCP, same port) answering from `zone`.
    struct FakeUpstream {
        addr: SocketAddr,
        queries: Arc<AtomicUsize>,
        _tasks: JoinSet<()>,
    }

    impl FakeUpstream {
        async fn start(zone: Zone) -> FakeUpstream {
            let (udp, tcp) = bind_pair().await;
            let addr = udp.local_addr().unwrap();
            let queries = Arc::new(AtomicUsize::new(0));
            let mut tasks = JoinSet::new();
            let count = queries.clone();
            tasks.spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                    count.fetch_add(1, Ordering::SeqCst);
                    let reply = reply_from(zone, &buf[..n], Transport::Udp);
                    let _ = udp.send_to(&reply, peer).await;
                }
            });
            let count = queries.clone();
            tasks.spawn(async move {
                while let Ok((mut stream, _)) = tcp.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    let exchange = async {
                        let len = stream.read_u16().await?;
                        let mut query = vec![0u8; usize::from(len)];
                        stream.read_exact(&mut query).await?;
                        let reply = reply_from(zone, &query, Transport::Tcp);
                        stream.write_u16(reply.len() as u16).await?;
                        stream.write_all(&reply).await
                    };
                    // A client that went away is no failure of the upstream.
                    let _ = exchange.await;
                }
            });
            FakeUpstream {
                addr,
                queries,
                _tasks: tasks,
            }
        }

        fn queries(&self) -> usize {
            self.queries.load(Ordering::SeqCst)
        }
    }

    fn reply_from(zone: Zone, query: &[u8], transport: Transport) -> Vec<u8> {
        let query = Message::from_vec(query).unwrap();
        let mut reply = zone(&query.queries[0], transport);
        reply.metadata.id = query.metadata.id;
        reply.metadata.message_type = MessageType::Response;
        reply.queries = query.queries.clone();
        reply.to_vec().unwrap()
    }

    /// The upstream zone every test uses.
    fn zone(question: &Query, transport: Transport) -> Message {
        let mut reply = Message::response(0, OpCode::Query);
        let records = match question.name.to_lowercase().to_ascii().as_str() {
            "ok.example.com." => vec![a("ok.example.com.", 5, "198.18.0.10")],
            "long.example.com." => vec![a("long.example.com.", 86_400, "198.18.0.11")],
            "mixed.example.com." => vec![
                a("mixed.example.com.", 300, "10.0.0.5"),
                a("mixed.example.com.", 300, "198.18.0.12"),
                a("mixed.example.com.", 300, "169.254.169.254"),
            ],
            // Out of order, with a record off the chain.
            "www.example.com." => vec![
                a("edge.other.net.", 120, "198.18.0.13"),
                a("junk.other.net.", 120, "198.18.0.99"),
                cname("cdn.other.net.", 60, "edge.other.net."),
                cname("www.example.com.", 60, "cdn.other.net."),
            ],
            "big.example.com." if transport == Transport::Udp => {
                reply.metadata.truncation = true;
                vec![]
            }
            "big.example.com." => vec![a("big.example.com.", 300, "198.18.0.14")],
            _ => {
                reply.metadata.response_code = ResponseCode::NXDomain;
                let soa = SOA::new(
                    name("ns.example.com."),
                    name("admin.example.com."),
                    1,
                    60,
                    60,
                    60,
                    60,
                );
                reply.add_authority(Record::from_rdata(
                    name("example.com."),
                    60,
                    RData::SOA(soa),
                ));
                vec![]
            }
        };
        reply.answers = records;
        reply
    }

    /// A UDP socket and a TCP listener on the same 127.0.0.1 port.
    async fn bind_pair() -> (UdpSocket, TcpListener) {
        for _ in 0..20 {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                return (udp, tcp);
            }
        }
        panic!("no port free for both UDP and TCP");
    }

    struct Harness {
        addr: SocketAddr,
        admit: Arc<FakeAdmit>,
        cancel: CancellationToken,
        server: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        async fn start(admit: FakeAdmit, config: DnsConfig) -> Harness {
            let (udp, tcp) = bind_pair().await;
            let addr = udp.local_addr().unwrap();
            let admit = Arc::new(admit);
            let cancel = CancellationToken::new();
            let server = tokio::spawn(serve(udp, tcp, config, admit.clone(), cancel.clone()));
            Harness {
                addr,
                admit,
                cancel,
                server,
            }
        }

        async fn ask(&self, qname: &str, qtype: RecordType) -> Message {
            self.ask_from(GUEST, qname, qtype).await
        }

        async fn ask_from(&self, src: IpAddr, qname: &str, qtype: RecordType) -> Message {
            let socket = UdpSocket::bind((src, 0)).await.unwrap();
            let query = guest_query(qname, qtype);
            socket
                .send_to(&query.to_vec().unwrap(), self.addr)
                .await
                .unwrap();
            let mut buf = [0u8; 4096];
            let (n, _) = timeout(WAIT, socket.recv_from(&mut buf))
                .await
                .expect("no DNS reply within 10 s")
                .unwrap();
            let reply = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(reply.metadata.id, query.metadata.id);
            reply
        }

        async fn ask_tcp(&self, qname: &str) -> Message {
            let mut stream = TcpStream::connect(self.addr).await.unwrap();
            let query = guest_query(qname, RecordType::A).to_vec().unwrap();
            stream.write_u16(query.len() as u16).await.unwrap();
            stream.write_all(&query).await.unwrap();
            let len = timeout(WAIT, stream.read_u16()).await.unwrap().unwrap();
            let mut reply = vec![0u8; usize::from(len)];
            stream.read_exact(&mut reply).await.unwrap();
            Message::from_vec(&reply).unwrap()
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.cancel.cancel();
            self.server.abort();
        }
    }

    fn guest_query(qname: &str, qtype: RecordType) -> Message {
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(name(qname), qtype));
        query
    }

    fn config(upstream: SocketAddr) -> DnsConfig {
        DnsConfig {
            upstreams: vec![upstream],
            ..DnsConfig::default()
        }
    }

    fn addresses(reply: &Message) -> Vec<(IpAddr, u32)> {
        reply
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::A(a) => Some((IpAddr::V4(a.0), record.ttl)),
                _ => None,
            })
            .collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[tokio::test]
    async fn allowed_names_are_answered_once_admitted_for_the_clamped_ttl() {
        let upstream = FakeUpstream::start(zone).await;
        let mut admit = FakeAdmit::new(policy(&["*.example.com"], &[]));
        admit.delay = Duration::from_millis(300);
        let dns = Harness::start(admit, config(upstream.addr)).await;

        let reply = dns.ask("ok.example.com.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        // The record's own TTL (5 s) reaches the guest; it is admitted for the floor.
        assert_eq!(addresses(&reply), vec![(ip("198.18.0.10"), 5)]);
        assert_eq!(
            dns.admit.admitted(),
            vec![(GUEST, vec![ip("198.18.0.10")], Duration::from_secs(30))],
            "admitted (after its 300 ms) before the reply was sent"
        );

        // A day-long TTL is admitted for the ceiling, and the guest told no more.
        let reply = dns.ask("LONG.example.com.", RecordType::A).await;
        assert_eq!(addresses(&reply), vec![(ip("198.18.0.11"), 3600)]);
        assert_eq!(dns.admit.admitted()[1].2, Duration::from_secs(3600));
        assert!(dns.admit.denied.lock().unwrap().is_empty());
        assert_eq!(upstream.queries(), 2);
    }

    #[tokio::test]
    async fn denied_names_get_nxdomain_without_asking_upstream() {
        let upstream = FakeUpstream::start(zone).await;
        let dns = Harness::start(
            FakeAdmit::new(policy(&["ok.example.com"], &[])),
            config(upstream.addr),
        )
        .await;
        let start = Instant::now();
        let reply = dns.ask("evil.example.org.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        let reply = dns.ask("www.example.com.", RecordType::AAAA).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(
            *dns.admit.denied.lock().unwrap(),
            vec![
                (GUEST, "evil.example.org.".to_owned()),
                (GUEST, "www.example.com.".to_owned())
            ]
        );
        assert_eq!(upstream.queries(), 0);
        assert!(dns.admit.admitted().is_empty());

        // deny_all, and a policy changed to it, deny every name.
        *dns.admit.policy.lock().unwrap() = Arc::new(EgressPolicy::none());
        let reply = dns.ask("ok.example.com.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(upstream.queries(), 0);
    }

    #[tokio::test]
    async fn a_source_that_is_no_vm_is_refused() {
        let upstream = FakeUpstream::start(zone).await;
        let dns = Harness::start(
            FakeAdmit::new(policy(&["*.example.com"], &[])),
            config(upstream.addr),
        )
        .await;
        let reply = dns
            .ask_from(STRANGER, "ok.example.com.", RecordType::A)
            .await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert!(reply.answers.is_empty());
        assert_eq!(upstream.queries(), 0);
        assert!(dns.admit.denied.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn reserved_addresses_are_stripped_unless_a_cidr_names_them() {
        let upstream = FakeUpstream::start(zone).await;
        let dns = Harness::start(
            FakeAdmit::new(policy(&["*.example.com"], &[])),
            config(upstream.addr),
        )
        .await;
        let reply = dns.ask("mixed.example.com.", RecordType::A).await;
        assert_eq!(addresses(&reply), vec![(ip("198.18.0.12"), 300)]);
        assert_eq!(dns.admit.admitted()[0].1, vec![ip("198.18.0.12")]);

        // "The internet" names no reserved range.
        *dns.admit.policy.lock().unwrap() = Arc::new(policy(&["*.example.com"], &["0.0.0.0/0"]));
        let reply = dns.ask("mixed.example.com.", RecordType::A).await;
        assert_eq!(addresses(&reply), vec![(ip("198.18.0.12"), 300)]);

        *dns.admit.policy.lock().unwrap() = Arc::new(policy(&["*.example.com"], &["10.0.0.0/8"]));
        let reply = dns.ask("mixed.example.com.", RecordType::A).await;
        let mut got: Vec<IpAddr> = addresses(&reply).into_iter().map(|(a, _)| a).collect();
        got.sort();
        assert_eq!(got, vec![ip("10.0.0.5"), ip("198.18.0.12")]);
        assert_eq!(dns.admit.admitted()[2].1.len(), 2);
    }

    #[tokio::test]
    async fn an_upstream_that_never_answers_gives_servfail_within_the_timeout() {
        // Bound but never read: every query to it times out.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let config = DnsConfig {
            upstreams: vec![silent.local_addr().unwrap()],
            upstream_timeout: Duration::from_millis(300),
            upstream_attempts: 2,
            ..DnsConfig::default()
        };
        let dns = Harness::start(FakeAdmit::new(policy(&["*.example.com"], &[])), config).await;
        let start = Instant::now();
        let reply = dns.ask("ok.example.com.", RecordType::A).await;
        let took = start.elapsed();
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        // Two attempts of 300 ms; the bound is generous for a loaded host.
        assert!(took >= Duration::from_millis(600), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(dns.admit.admitted().is_empty());

        // No upstream at all: SERVFAIL too.
        let none = Harness::start(
            FakeAdmit::new(policy(&["*.example.com"], &[])),
            DnsConfig {
                upstreams: vec![],
                ..DnsConfig::default()
            },
        )
        .await;
        let reply = none.ask("ok.example.com.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn cname_chains_are_followed_and_records_off_the_chain_dropped() {
        let upstream = FakeUpstream::start(zone).await;
        let dns = Harness::start(
            FakeAdmit::new(policy(&["www.example.com"], &[])),
            config(upstream.addr),
        )
        .await;
        let reply = dns.ask("www.example.com.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addresses(&reply), vec![(ip("198.18.0.13"), 120)]);
        let cnames = reply
            .answers
            .iter()
            .filter(|r| r.record_type() == RecordType::CNAME)
            .count();
        assert_eq!(cnames, 2);
        assert_eq!(
            dns.admit.admitted(),
            vec![(GUEST, vec![ip("198.18.0.13")], Duration::from_secs(120))]
        );
    }

    #[tokio::test]
    async fn tcp_queries_and_truncated_upstream_answers_work() {
        let upstream = FakeUpstream::start(zone).await;
        let dns = Harness::start(
            FakeAdmit::new(policy(&["*.example.com"], &[])),
            config(upstream.addr),
        )
        .await;
        let reply = dns.ask_tcp("ok.example.com.").await;
        assert_eq!(addresses(&reply), vec![(ip("198.18.0.10"), 5)]);
        // The upstream truncates this one over UDP; the forwarder asks again over TCP.
        let reply = dns.ask("big.example.com.", RecordType::A).await;
        assert!(!reply.metadata.truncation);
        assert_eq!(addresses(&reply), vec![(ip("198.18.0.14"), 300)]);
        // An unknown name's NXDOMAIN passes through with its SOA.
        let reply = dns.ask("gone.example.com.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(reply.authorities.len(), 1);
    }

    #[tokio::test]
    async fn malformed_and_unsupported_messages_do_no_harm() {
        let upstream = FakeUpstream::start(zone).await;
        let dns = Harness::start(
            FakeAdmit::new(policy(&["*.example.com"], &[])),
            config(upstream.addr),
        )
        .await;
        let socket = UdpSocket::bind((GUEST, 0)).await.unwrap();
        let mut response = guest_query("ok.example.com.", RecordType::A);
        response.metadata.message_type = MessageType::Response;
        for junk in [
            vec![],
            vec![0xff; 7],
            vec![0x12; 300],
            response.to_vec().unwrap(),
        ] {
            socket.send_to(&junk, dns.addr).await.unwrap();
        }
        // A malformed TCP message closes that connection only.
        let mut stream = TcpStream::connect(dns.addr).await.unwrap();
        stream.write_all(&[0, 4, 1, 2, 3, 4]).await.unwrap();
        let mut rest = Vec::new();
        let closed = timeout(WAIT, stream.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");

        for (qtype, code) in [
            (RecordType::ANY, ResponseCode::Refused),
            (RecordType::AXFR, ResponseCode::Refused),
            (RecordType::A, ResponseCode::NoError),
        ] {
            let reply = dns.ask("ok.example.com.", qtype).await;
            assert_eq!(reply.metadata.response_code, code, "{qtype}");
        }
        let mut chaos = guest_query("ok.example.com.", RecordType::A);
        chaos.queries[0].query_class = DNSClass::CH;
        socket
            .send_to(&chaos.to_vec().unwrap(), dns.addr)
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let (n, _) = timeout(WAIT, socket.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let reply = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(reply.metadata.id, chaos.metadata.id, "no reply to the junk");
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        // Only the A query reached the upstream.
        assert_eq!(upstream.queries(), 1);
    }

    #[tokio::test]
    async fn in_flight_queries_are_bounded_per_source_and_admission_failures_fail() {
        let upstream = FakeUpstream::start(zone).await;
        let mut admit = FakeAdmit::new(policy(&["*.example.com"], &[]));
        admit.delay = Duration::from_secs(1);
        let one_each = DnsConfig {
            max_in_flight_per_source: 1,
            ..config(upstream.addr)
        };
        let dns = Harness::start(admit, one_each).await;
        let (first, second) = tokio::join!(dns.ask("ok.example.com.", RecordType::A), async {
            // Sent while the first waits on its (1 s) admission.
            tokio::time::sleep(Duration::from_millis(200)).await;
            dns.ask("long.example.com.", RecordType::A).await
        });
        assert_eq!(first.metadata.response_code, ResponseCode::NoError);
        assert_eq!(second.metadata.response_code, ResponseCode::Refused);
        // The slot is given back.
        let again = dns.ask("long.example.com.", RecordType::A).await;
        assert_eq!(again.metadata.response_code, ResponseCode::NoError);

        let mut failing = FakeAdmit::new(policy(&["*.example.com"], &[]));
        failing.fail = true;
        let dns = Harness::start(failing, config(upstream.addr)).await;
        let reply = dns.ask("ok.example.com.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert!(reply.answers.is_empty());
    }

    #[test]
    fn resolv_conf_nameservers_are_read() {
        let text = "# generated\nsearch example.com\nnameserver 10.255.255.53\n\
                    nameserver  2001:db8::53\nnameserver fe80::1%eth0\n;nameserver 9.9.9.9\n\
                    options ndots:2\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.255.255.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn labels_with_dots_or_control_bytes_are_refused() {
        let policy = policy(&["*.example.com"], &[]);
        assert!(name_allowed(&policy, &name("a.example.com.")));
        let single_label = Name::from_labels(vec![b"x.example.com".as_slice()]).unwrap();
        assert!(!name_allowed(&policy, &single_label));
        let control = Name::from_labels(vec![b"a\x00b".as_slice(), b"example", b"com"]).unwrap();
        assert!(!name_allowed(&policy, &control));
    }
}
