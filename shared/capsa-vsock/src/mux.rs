//! Many vsock-style connections over one byte stream: how QEMU VMs reach their agent.
//!
//! QEMU's `vhost-user-vsock` device cannot be migrated (QEMU 7.2 and 10.0 both refuse with
//! "non-migratable device"), so a QEMU VM that must be suspended, snapshotted or forked
//! carries its agent channel on a virtio-serial port instead: one ordered byte stream,
//! which QEMU migrates with the rest of the machine. This module multiplexes connections
//! over such a stream with the semantics of vsock: either side opens a connection to a
//! port of the other, the other accepts or refuses, and bytes flow both ways with
//! half-close. The host end ([`crate::serial`]'s bridge) turns it back into the hybrid
//! vsock socket every host component already speaks.
//!
//! Wire format: each frame is `kind u8 | stream id u32 LE | payload length u32 LE |
//! CRC-32 of those 9 bytes, u32 LE | payload`, COBS-encoded and ended by a zero byte. The
//! zero can occur nowhere else, so a reader that starts mid-stream, or reads the tail of a
//! frame from a link that is long gone (a VM restored from a snapshot holds whatever it had
//! half-read when it was saved), loses at most one frame, which fails its header check or
//! its length, and is in step again at the next zero. Nothing on the wire is a length that
//! could make a reader wait for bytes that never come. The CRC covers the header only: the
//! check is against bytes of another link, not against a hostile peer (who can compute any
//! CRC), and per-byte work is what limits the channel under emulation.
//!
//! A link is in step once each side has the other's greeting (HELLO); see [`read_loop`]
//! for how both sides start over, without closing the carrier, when one loses its place.
//! Each side opens streams with ids of its own parity (host odd, guest even), so ids never
//! collide.
//!
//! Flow control is per stream and per direction: a sender may have at most the window
//! ([`Limits::window`]) unacknowledged; the receiver returns CREDIT as its reader consumes.
//! A peer that overruns the window gets its stream reset, so a hostile guest cannot make
//! the host buffer more than `window × max_peer_streams` bytes, and one stalled reader
//! never blocks the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio::io::{
    AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader, BufWriter,
    DuplexStream, ReadHalf, WriteHalf,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Size of the DATA frames a sender cuts its bytes into.
const CHUNK: usize = 32 * 1024;
/// Kind, stream id, payload length, and the CRC of those.
const HEADER: usize = 13;
/// Longest frame before encoding, and after (COBS adds a byte per 254, plus the zero).
const MAX_FRAME: usize = HEADER + MAX_PAYLOAD;
const MAX_ENCODED: usize = MAX_FRAME + MAX_FRAME / 254 + 2;
/// How often a side whose greeting is unanswered greets again.
const REGREET: std::time::Duration = std::time::Duration::from_millis(500);
/// Buffer between a stream's user and its pumps.
const DUPLEX_BUFFER: usize = 64 * 1024;
/// DATA frames waiting for the carrier, across all streams.
const DATA_QUEUE: usize = 64;
/// Connections the peer opened that the local side has not yet accepted or refused.
const ACCEPT_QUEUE: usize = 64;

/// A connection over the multiplexer, as a plain byte stream.
pub type MuxStream = DuplexStream;

/// Which end of the link this is; decides the parity of the stream ids it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Host,
    Guest,
}

/// What the peer may cost this side.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Unacknowledged bytes per stream and direction.
    pub window: u32,
    /// Streams opened by the peer that may be open at once; more are refused.
    pub max_peer_streams: usize,
}

impl Limits {
    /// The host's limits on a guest: the guest only ever opens a few telemetry streams.
    pub const HOST: Limits = Limits {
        window: 256 * 1024,
        max_peer_streams: 64,
    };
    /// The guest's limits on the host, which is trusted.
    pub const GUEST: Limits = Limits {
        window: 256 * 1024,
        max_peer_streams: 4096,
    };
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MuxError {
    #[error("the link is closed")]
    Closed,
    #[error("nothing accepts connections on port {0}")]
    Refused(u32),
    #[error("mux protocol violation: {0}")]
    Protocol(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Hello = 1,
    Connect = 2,
    Accept = 3,
    Refuse = 4,
    Data = 5,
    Credit = 6,
    Shutdown = 7,
    Reset = 8,
    Clock = 9,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Connect,
            3 => Kind::Accept,
            4 => Kind::Refuse,
            5 => Kind::Data,
            6 => Kind::Credit,
            7 => Kind::Shutdown,
            8 => Kind::Reset,
            9 => Kind::Clock,
            _ => return None,
        })
    }
}

struct Frame {
    kind: Kind,
    stream: u32,
    payload: Bytes,
    /// The link generation the frame belongs to: the writer drops frames of a generation
    /// that a restart of the link has ended, so they never reach the new link's streams.
    epoch: u32,
}

impl Frame {
    fn new(kind: Kind, stream: u32, payload: Bytes) -> Frame {
        Frame {
            kind,
            stream,
            payload,
            epoch: 0,
        }
    }
    fn control(kind: Kind, stream: u32, value: u32) -> Frame {
        Frame::new(kind, stream, Bytes::copy_from_slice(&value.to_le_bytes()))
    }
    fn empty(kind: Kind, stream: u32) -> Frame {
        Frame::new(kind, stream, Bytes::new())
    }
    fn at(mut self, epoch: u32) -> Frame {
        self.epoch = epoch;
        self
    }
    /// A greeting ([`Greeting`]); `reply` says it answers the peer's.
    fn hello(reply: bool, generation: u64) -> Frame {
        let mut payload = BytesMut::with_capacity(9);
        payload.put_u8(u8::from(reply));
        payload.put_u64_le(generation);
        Frame::new(Kind::Hello, 0, payload.freeze())
    }
}

/// What the dispatcher hands a stream's downlink pump.
enum Inbound {
    Data(Bytes),
    Eof,
}

struct StreamEntry {
    /// To the downlink pump (bytes that arrive before it runs wait here, within the window).
    inbound: mpsc::UnboundedSender<Inbound>,
    /// Taken by the downlink pump when the stream opens.
    inbound_rx: Option<mpsc::UnboundedReceiver<Inbound>>,
    /// Bytes received and not yet credited back.
    outstanding: Arc<AtomicUsize>,
    /// Bytes this side may still send.
    credit: Arc<Credit>,
    /// Set while this side waits for the peer to accept a connection it opened.
    pending: Option<oneshot::Sender<Result<(), MuxError>>>,
    opened_by_peer: bool,
    /// Ends both pumps.
    cancel: CancellationToken,
    /// Pumps still running; the entry goes when both are done.
    halves: u8,
    epoch: u32,
}

impl StreamEntry {
    fn new(
        window: u32,
        opened_by_peer: bool,
        cancel: CancellationToken,
        epoch: u32,
    ) -> StreamEntry {
        let (inbound, inbound_rx) = mpsc::unbounded_channel();
        StreamEntry {
            inbound,
            inbound_rx: Some(inbound_rx),
            outstanding: Arc::new(AtomicUsize::new(0)),
            credit: Arc::new(Credit {
                bytes: AtomicU32::new(window),
                more: Notify::new(),
            }),
            pending: None,
            opened_by_peer,
            cancel,
            halves: 2,
            epoch,
        }
    }
}

/// A stream in one generation of the link.
#[derive(Debug, Clone, Copy)]
struct StreamRef {
    id: u32,
    epoch: u32,
}

struct Credit {
    bytes: AtomicU32,
    more: Notify,
}

struct Shared {
    side: Side,
    limits: Limits,
    control: mpsc::UnboundedSender<Frame>,
    data: mpsc::Sender<Frame>,
    streams: Mutex<HashMap<u32, StreamEntry>>,
    next_id: AtomicU32,
    /// Bumped each time the link starts over (see [`read_loop`]).
    epoch: AtomicU32,
    /// Tells this multiplexer's greetings from those of an earlier one on the same carrier
    /// (a restarted agent): its start time.
    instance: u64,
    in_step: watch::Sender<bool>,
    peer_clock: watch::Sender<Option<u64>>,
    /// Cancelled when the link is down; every stream's token is a child of it.
    link: CancellationToken,
    closed_reason: Mutex<Option<MuxError>>,
}

/// One link: a multiplexer over one carrier stream. Dropping it closes the link and every
/// stream on it.
pub struct Mux {
    shared: Arc<Shared>,
}

/// A connection the peer opened, waiting for [`IncomingStream::accept`]. Dropping it refuses.
pub struct IncomingStream {
    pub port: u32,
    id: u32,
    epoch: u32,
    shared: Option<Arc<Shared>>,
}

impl Mux {
    /// Starts a link over `reader`/`writer`. `prefix` is bytes already read from the carrier
    /// (the guest reads to learn that a host is there). Connections the peer opens arrive on
    /// the returned receiver.
    pub fn start<R, W>(
        side: Side,
        limits: Limits,
        prefix: Bytes,
        reader: R,
        writer: W,
    ) -> (Mux, mpsc::Receiver<IncomingStream>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
        let (incoming_tx, incoming_rx) = mpsc::channel(ACCEPT_QUEUE);
        let shared = Arc::new(Shared {
            side,
            limits,
            control: control_tx,
            data: data_tx,
            streams: Mutex::new(HashMap::new()),
            epoch: AtomicU32::new(0),
            instance: now_unix_nanos(),
            next_id: AtomicU32::new(match side {
                Side::Host => 1,
                Side::Guest => 2,
            }),
            in_step: watch::channel(false).0,
            peer_clock: watch::channel(None).0,
            link: CancellationToken::new(),
            closed_reason: Mutex::new(None),
        });
        shared.greet(false);
        tokio::spawn(write_loop(shared.clone(), writer, control_rx, data_rx));
        tokio::spawn(read_loop(shared.clone(), prefix, reader, incoming_tx));
        (Mux { shared }, incoming_rx)
    }

    /// Waits until the link is in step (each side has the other's greeting).
    pub async fn hello(&self) -> Result<(), MuxError> {
        let mut rx = self.shared.in_step.subscribe();
        tokio::select! {
            seen = rx.wait_for(|up| *up) => seen.map(drop).map_err(|_| self.shared.closed_error()),
            _ = self.shared.link.cancelled() => Err(self.shared.closed_error()),
        }
    }

    /// Opens a connection to the peer's `port`; waits for the link to come up first.
    pub async fn connect(&self, port: u32) -> Result<MuxStream, MuxError> {
        self.hello().await?;
        let shared = &self.shared;
        let id = shared.next_id.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let epoch = shared.epoch.load(Ordering::SeqCst);
        let mut entry = StreamEntry::new(
            shared.limits.window,
            false,
            shared.link.child_token(),
            epoch,
        );
        entry.pending = Some(tx);
        shared.streams.lock().unwrap().insert(id, entry);
        shared.send_control(Frame::control(Kind::Connect, id, port).at(epoch));
        let answer = tokio::select! {
            answer = rx => answer.unwrap_or(Err(MuxError::Closed)),
            _ = shared.link.cancelled() => Err(shared.closed_error()),
        };
        match answer {
            Ok(()) => Ok(shared.open_stream(StreamRef { id, epoch })),
            Err(e) => {
                shared.streams.lock().unwrap().remove(&id);
                Err(match e {
                    MuxError::Refused(_) => MuxError::Refused(port),
                    other => other,
                })
            }
        }
    }

    /// The peer's wall clock (Unix nanoseconds) as it sent it each time it got in step with
    /// this side: after a restore, how the guest learns the host's time, fresh.
    pub fn peer_clock(&self) -> watch::Receiver<Option<u64>> {
        self.shared.peer_clock.subscribe()
    }

    /// Whether the peer's greeting has arrived and the link is still up.
    pub fn is_up(&self) -> bool {
        *self.shared.in_step.borrow() && !self.shared.link.is_cancelled()
    }

    /// Resolves when the link is down (the carrier ended, failed or broke the protocol).
    pub async fn closed(&self) -> MuxError {
        self.shared.link.cancelled().await;
        self.shared.closed_error()
    }

    /// Streams open now (both directions).
    pub fn open_streams(&self) -> usize {
        self.shared.streams.lock().unwrap().len()
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        self.shared.close(MuxError::Closed);
    }
}

impl IncomingStream {
    /// Accepts the connection.
    pub fn accept(mut self) -> MuxStream {
        let shared = self.shared.take().expect("accepted once");
        shared.send_control(Frame::empty(Kind::Accept, self.id).at(self.epoch));
        shared.open_stream(StreamRef {
            id: self.id,
            epoch: self.epoch,
        })
    }
}

impl Drop for IncomingStream {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let mut streams = shared.streams.lock().unwrap();
        // Only this generation's stream: after a restart the id may name a new one.
        if streams.get(&self.id).is_some_and(|e| e.epoch == self.epoch) {
            streams.remove(&self.id);
            drop(streams);
            shared.send_control(Frame::empty(Kind::Refuse, self.id).at(self.epoch));
        }
    }
}

impl Shared {
    fn send_control(&self, frame: Frame) {
        // Fails only when the link is down, and then nobody reads the frame anyway.
        let _ = self.control.send(frame);
    }

    /// The link starts over: every stream ends, frames queued for them are dropped, and the
    /// link is down until the next greeting.
    fn restart(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.in_step.send_replace(false);
        let entries: Vec<_> = self.streams.lock().unwrap().drain().collect();
        for (_, entry) in &entries {
            entry.cancel.cancel();
        }
        drop(entries);
    }

    /// The link is in step: say so, and send the peer our clock, which is fresh now (a
    /// greeting may have waited in a saved VM).
    fn now_in_step(&self) {
        self.in_step.send_replace(true);
        let mut payload = BytesMut::with_capacity(8);
        payload.put_u64_le(now_unix_nanos());
        self.send_control(
            Frame::new(Kind::Clock, 0, payload.freeze()).at(self.epoch.load(Ordering::SeqCst)),
        );
    }

    /// Queues our greeting, in the current generation.
    fn greet(&self, reply: bool) {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let generation = self.instance.wrapping_add(u64::from(epoch));
        self.send_control(Frame::hello(reply, generation).at(epoch));
    }

    fn close(&self, reason: MuxError) {
        self.closed_reason.lock().unwrap().get_or_insert(reason);
        self.link.cancel();
        // Dropping the entries ends every downlink (its user reads EOF) and fails every
        // pending connect.
        let entries: Vec<_> = self.streams.lock().unwrap().drain().collect();
        drop(entries);
    }

    fn closed_error(&self) -> MuxError {
        self.closed_reason
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(MuxError::Closed)
    }

    /// Wires up an accepted stream: spawns its pumps and returns the user's end.
    fn open_stream(self: &Arc<Self>, at: StreamRef) -> MuxStream {
        let (user, engine) = tokio::io::duplex(DUPLEX_BUFFER);
        let (engine_read, engine_write) = tokio::io::split(engine);
        let mut streams = self.streams.lock().unwrap();
        let Some((entry, Some(inbound_rx))) = streams
            .get_mut(&at.id)
            .filter(|entry| entry.epoch == at.epoch)
            .map(|entry| {
                let rx = entry.inbound_rx.take();
                (entry, rx)
            })
        else {
            // Reset or the link went down meanwhile: the user's end reads EOF at once.
            return user;
        };
        let (credit, outstanding, cancel) = (
            entry.credit.clone(),
            entry.outstanding.clone(),
            entry.cancel.clone(),
        );
        drop(streams);
        tokio::spawn(uplink(
            self.clone(),
            at,
            engine_read,
            credit,
            cancel.clone(),
        ));
        tokio::spawn(downlink(
            self.clone(),
            at,
            engine_write,
            inbound_rx,
            outstanding,
            cancel,
        ));
        user
    }

    /// One pump of stream `at` is done; the entry goes with the second.
    fn finish_half(&self, at: StreamRef) {
        let id = at.id;
        let mut streams = self.streams.lock().unwrap();
        if let Some(entry) = streams.get_mut(&id).filter(|e| e.epoch == at.epoch) {
            entry.halves -= 1;
            if entry.halves == 0 {
                streams.remove(&id);
            }
        }
    }

    /// Ends stream `at` at once, on both sides.
    fn reset(&self, at: StreamRef) {
        let mut streams = self.streams.lock().unwrap();
        if streams.get(&at.id).is_some_and(|e| e.epoch == at.epoch) {
            let entry = streams.remove(&at.id).expect("present");
            drop(streams);
            entry.cancel.cancel();
            self.send_control(Frame::empty(Kind::Reset, at.id).at(at.epoch));
        }
    }

    fn is_ours(&self, id: u32) -> bool {
        (id % 2 == 1) == (self.side == Side::Host)
    }

    /// Handles one frame from the peer. An error closes the link.
    fn dispatch(
        self: &Arc<Self>,
        frame: Frame,
        incoming: &mpsc::Sender<IncomingStream>,
    ) -> Result<(), MuxError> {
        let id = frame.stream;
        let epoch = self.epoch.load(Ordering::SeqCst);
        let value = || -> Result<u32, MuxError> {
            let bytes: [u8; 4] = frame.payload[..].try_into().map_err(|_| {
                MuxError::Protocol(format!(
                    "{:?} frame with a {}-byte payload",
                    frame.kind,
                    frame.payload.len()
                ))
            })?;
            Ok(u32::from_le_bytes(bytes))
        };
        match frame.kind {
            Kind::Hello => return Err(MuxError::Protocol("HELLO without the magic".into())),
            Kind::Connect => {
                let port = value()?;
                if self.is_ours(id) {
                    return Err(MuxError::Protocol(format!(
                        "CONNECT with our stream id {id}"
                    )));
                }
                let mut streams = self.streams.lock().unwrap();
                if streams.contains_key(&id) {
                    return Err(MuxError::Protocol(format!("CONNECT reuses stream id {id}")));
                }
                let peer_streams = streams.values().filter(|e| e.opened_by_peer).count();
                if peer_streams >= self.limits.max_peer_streams {
                    drop(streams);
                    tracing::warn!(port, "mux: peer has too many streams open; refused");
                    self.send_control(Frame::empty(Kind::Refuse, id).at(epoch));
                    return Ok(());
                }
                streams.insert(
                    id,
                    StreamEntry::new(self.limits.window, true, self.link.child_token(), epoch),
                );
                drop(streams);
                let request = IncomingStream {
                    port,
                    id,
                    epoch,
                    shared: Some(self.clone()),
                };
                // Full (nobody accepts fast enough) or closed: dropping it refuses.
                let _ = incoming.try_send(request);
            }
            Kind::Accept | Kind::Refuse => {
                let pending = self
                    .streams
                    .lock()
                    .unwrap()
                    .get_mut(&id)
                    .and_then(|e| e.pending.take());
                if let Some(tx) = pending {
                    let _ = tx.send(if frame.kind == Kind::Accept {
                        Ok(())
                    } else {
                        Err(MuxError::Refused(0))
                    });
                }
            }
            Kind::Data => {
                let len = frame.payload.len();
                let streams = self.streams.lock().unwrap();
                let Some(entry) = streams.get(&id) else {
                    return Ok(()); // reset by us while the peer was still sending
                };
                let outstanding = entry.outstanding.fetch_add(len, Ordering::Relaxed) + len;
                if outstanding > self.limits.window as usize {
                    drop(streams);
                    tracing::warn!(
                        stream = id,
                        outstanding,
                        "mux: peer overran its window; stream reset"
                    );
                    self.reset(StreamRef { id, epoch });
                    return Ok(());
                }
                let _ = entry.inbound.send(Inbound::Data(frame.payload));
            }
            Kind::Credit => {
                let n = value()?;
                if let Some(entry) = self.streams.lock().unwrap().get(&id) {
                    // One atomic update: the uplink takes credit concurrently, and a load and a
                    // store around it would lose its subtraction, letting it overrun the peer's
                    // window (which the peer answers by resetting the stream).
                    let _ = entry.credit.bytes.fetch_update(
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                        |c| Some(c.saturating_add(n)),
                    );
                    entry.credit.more.notify_one();
                }
            }
            Kind::Shutdown => {
                if let Some(entry) = self.streams.lock().unwrap().get(&id) {
                    let _ = entry.inbound.send(Inbound::Eof);
                }
            }
            Kind::Clock => {
                let nanos = u64::from_le_bytes(frame.payload[..].try_into().map_err(|_| {
                    MuxError::Protocol(format!("a {}-byte CLOCK", frame.payload.len()))
                })?);
                self.peer_clock.send_replace(Some(nanos));
            }
            Kind::Reset => {
                if let Some(entry) = self.streams.lock().unwrap().remove(&id) {
                    entry.cancel.cancel();
                    if let Some(tx) = entry.pending {
                        let _ = tx.send(Err(MuxError::Refused(0)));
                    }
                }
            }
        }
        Ok(())
    }
}

fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// CRC-32 (IEEE), table-driven: guards every frame's header against bytes of another link.
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// A frame on the wire: COBS-encoded header and payload, then a zero.
fn encode(frame: &Frame, out: &mut BytesMut) {
    encode_raw(frame.kind as u8, frame.stream, &frame.payload, out);
}

fn encode_raw(kind: u8, stream: u32, payload: &[u8], out: &mut BytesMut) {
    let mut raw = BytesMut::with_capacity(HEADER + payload.len());
    raw.put_u8(kind);
    raw.put_u32_le(stream);
    raw.put_u32_le(payload.len() as u32);
    let crc = crc32(&raw);
    raw.put_u32_le(crc);
    raw.extend_from_slice(payload);
    cobs_encode(&raw, out);
    out.put_u8(0);
}

/// Appends to `out` one frame as it goes on the wire, with any kind byte, known or not: for
/// the fuzz target, which plays a hostile guest.
pub fn encode_frame(kind: u8, stream: u32, payload: &[u8], out: &mut Vec<u8>) {
    let mut buf = BytesMut::new();
    encode_raw(kind, stream, payload, &mut buf);
    out.extend_from_slice(&buf);
}

/// Consistent Overhead Byte Stuffing: `data` without zeros, one byte longer per 254. Each
/// block is a length byte and up to 254 non-zero bytes, found with `memchr` and copied whole.
fn cobs_encode(data: &[u8], out: &mut BytesMut) {
    out.reserve(data.len() + data.len() / 254 + 2);
    let mut rest = data;
    loop {
        let window = &rest[..rest.len().min(254)];
        match memchr::memchr(0, window) {
            // A block ended by a zero, which the length byte stands for.
            Some(zero) => {
                out.put_u8(zero as u8 + 1);
                out.extend_from_slice(&window[..zero]);
                rest = &rest[zero + 1..];
            }
            // A full block: no zero follows it.
            None if window.len() == 254 => {
                out.put_u8(0xff);
                out.extend_from_slice(window);
                rest = &rest[254..];
            }
            // The last block.
            None => {
                out.put_u8(window.len() as u8 + 1);
                out.extend_from_slice(window);
                return;
            }
        }
    }
}

fn cobs_decode(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        // A block: its length byte, then that many bytes less one; a zero follows the block
        // unless it is full (0xff) or the last.
        let code = data[i] as usize;
        let end = i + code;
        if code == 0 || end > data.len() {
            return None;
        }
        out.extend_from_slice(&data[i + 1..end]);
        i = end;
        if code < 0xff && i < data.len() {
            out.push(0);
        }
    }
    Some(out)
}

/// One frame read off the carrier, or why the bytes up to the next zero were not one.
enum Step {
    Frame(Frame),
    Garbage(String),
}

/// Reads up to the next zero and decodes; never buffers more than [`MAX_ENCODED`] bytes.
async fn read_step<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    encoded: &mut Vec<u8>,
) -> Result<Step, MuxError> {
    use tokio::io::AsyncBufReadExt as _;
    encoded.clear();
    let mut oversized = false;
    loop {
        let available = reader.fill_buf().await.map_err(|_| MuxError::Closed)?;
        if available.is_empty() {
            return Err(MuxError::Closed);
        }
        let (taken, done) = match memchr::memchr(0, available) {
            Some(at) => (at + 1, true),
            None => (available.len(), false),
        };
        let body = &available[..if done { taken - 1 } else { taken }];
        if !oversized && encoded.len() + body.len() <= MAX_ENCODED {
            encoded.extend_from_slice(body);
        } else {
            oversized = true;
            encoded.clear();
        }
        reader.consume(taken);
        if done {
            break;
        }
    }
    if oversized {
        return Ok(Step::Garbage("a frame longer than the largest".into()));
    }
    Ok(parse(encoded))
}

fn parse(encoded: &[u8]) -> Step {
    let Some(raw) = cobs_decode(encoded) else {
        return Step::Garbage("bad COBS encoding".into());
    };
    if raw.len() < HEADER || raw.len() > MAX_FRAME {
        return Step::Garbage(format!("a {}-byte frame", raw.len()));
    }
    let (header, payload) = raw.split_at(HEADER);
    let mut h = header;
    let kind_byte = h.get_u8();
    let stream = h.get_u32_le();
    let len = h.get_u32_le() as usize;
    let crc = h.get_u32_le();
    if crc32(&header[..HEADER - 4]) != crc {
        return Step::Garbage("header CRC mismatch".into());
    }
    if len != payload.len() {
        return Step::Garbage(format!(
            "{} payload bytes where the header says {len}",
            payload.len()
        ));
    }
    match Kind::from_u8(kind_byte) {
        // The decoded buffer becomes the payload: no second copy.
        Some(kind) => Step::Frame(Frame::new(kind, stream, Bytes::from(raw).slice(HEADER..))),
        None => Step::Garbage(format!("unknown frame kind {kind_byte:#x}")),
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    writer: W,
    mut control: mpsc::UnboundedReceiver<Frame>,
    mut data: mpsc::Receiver<Frame>,
) {
    let mut writer = BufWriter::with_capacity(128 * 1024, writer);
    let mut buf = BytesMut::with_capacity(MAX_ENCODED);
    let result: std::io::Result<()> = async {
        loop {
            // Control frames first: they free the peer's senders.
            let frame = tokio::select! {
                biased;
                _ = shared.link.cancelled() => return Ok(()),
                Some(f) = control.recv() => f,
                Some(f) = data.recv() => f,
                else => return Ok(()),
            };
            if frame.epoch == shared.epoch.load(Ordering::SeqCst) {
                buf.clear();
                encode(&frame, &mut buf);
                writer.write_all(&buf).await?;
            }
            if control.is_empty() && data.is_empty() {
                writer.flush().await?;
            }
        }
    }
    .await;
    if let Err(e) = result {
        shared.close(MuxError::Protocol(format!("writing the carrier: {e}")));
    }
}

/// A greeting's payload: whether it answers one, and the sender's link generation (which
/// changes each time the sender starts over).
struct Greeting {
    reply: bool,
    generation: u64,
}

impl Greeting {
    fn parse(payload: &[u8]) -> Option<Greeting> {
        let mut p = payload;
        (p.len() == 9).then(|| Greeting {
            reply: p.get_u8() & 1 == 1,
            generation: p.get_u64_le(),
        })
    }
}

/// Reads the carrier and dispatches its frames until it ends.
///
/// The link is in step once this side has the peer's greeting. Either side may lose its
/// place without the carrier closing: a VM restored from a snapshot still holds the old
/// link when the new host greets it; a restarted peer greets a side that is mid-link. So:
/// - until in step, only greetings count: other frames are leftovers of an older link, and
///   the greeting is repeated every [`REGREET`] in case the peer lost it;
/// - a greeting that is not a reply is answered with one; if it comes from a peer
///   generation other than the one this side is in step with, this side starts over first
///   (every stream ends);
/// - bytes that are not a frame, once in step, mean the peer's bytes were cut: this side
///   starts over and greets.
async fn read_loop<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    prefix: Bytes,
    reader: R,
    incoming: mpsc::Sender<IncomingStream>,
) {
    let mut reader = BufReader::with_capacity(
        128 * 1024,
        tokio::io::AsyncReadExt::chain(std::io::Cursor::new(prefix), reader),
    );
    let mut encoded = Vec::with_capacity(MAX_ENCODED);
    let result: Result<(), MuxError> = async {
        // The peer generation this side is in step with.
        let mut in_step: Option<u64> = None;
        loop {
            let step = tokio::select! {
                _ = shared.link.cancelled() => return Ok(()),
                step = read_step(&mut reader, &mut encoded) => step?,
                _ = tokio::time::sleep(REGREET), if in_step.is_none() => {
                    shared.greet(false);
                    continue;
                }
            };
            let frame = match step {
                Step::Frame(frame) => frame,
                Step::Garbage(why) => {
                    if in_step.is_some() {
                        tracing::warn!(error = %why, "mux: the peer's bytes were cut; the link starts over");
                        shared.restart();
                        shared.greet(false);
                        in_step = None;
                    }
                    continue;
                }
            };
            if frame.kind != Kind::Hello {
                if in_step.is_some()
                    && let Err(why) = shared.dispatch(frame, &incoming)
                {
                    tracing::warn!(error = %why, "mux: the link starts over");
                    shared.restart();
                    shared.greet(false);
                    in_step = None;
                }
                continue;
            }
            let Some(greeting) = Greeting::parse(&frame.payload) else {
                continue;
            };
            if greeting.reply {
                if in_step.is_none() {
                    in_step = Some(greeting.generation);
                    shared.now_in_step();
                }
                continue;
            }
            if in_step.is_some_and(|g| g != greeting.generation) {
                shared.restart();
            }
            shared.greet(true);
            in_step = Some(greeting.generation);
            shared.now_in_step();
        }
    }
    .await;
    shared.close(result.err().unwrap_or(MuxError::Closed));
}

/// Carries what the stream's user writes to the peer, within the peer's credit.
async fn uplink(
    shared: Arc<Shared>,
    at: StreamRef,
    mut from_user: ReadHalf<DuplexStream>,
    credit: Arc<Credit>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let available = loop {
            let more = credit.more.notified();
            let available = credit.bytes.load(Ordering::Relaxed);
            if available > 0 {
                break available;
            }
            tokio::select! {
                _ = more => {}
                _ = cancel.cancelled() => return shared.finish_half(at),
            }
        };
        let want = (available as usize).min(CHUNK);
        let n = tokio::select! {
            n = from_user.read(&mut buf[..want]) => n,
            _ = cancel.cancelled() => return shared.finish_half(at),
        };
        let frame = match n {
            Ok(0) => Frame::empty(Kind::Shutdown, at.id).at(at.epoch),
            Ok(n) => {
                credit.bytes.fetch_sub(n as u32, Ordering::Relaxed);
                Frame::new(Kind::Data, at.id, Bytes::copy_from_slice(&buf[..n])).at(at.epoch)
            }
            Err(_) => {
                shared.reset(at);
                return;
            }
        };
        let last = frame.kind == Kind::Shutdown;
        let sent = tokio::select! {
            sent = shared.data.send(frame) => sent.is_ok(),
            _ = cancel.cancelled() => false,
        };
        if !sent || last {
            return shared.finish_half(at);
        }
    }
}

/// Hands the peer's bytes to the stream's user and credits them back as they are taken.
async fn downlink(
    shared: Arc<Shared>,
    at: StreamRef,
    mut to_user: WriteHalf<DuplexStream>,
    mut inbound: mpsc::UnboundedReceiver<Inbound>,
    outstanding: Arc<AtomicUsize>,
    cancel: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            m = inbound.recv() => m,
            _ = cancel.cancelled() => None,
        };
        match message {
            Some(Inbound::Data(bytes)) => {
                let n = bytes.len();
                let written = tokio::select! {
                    w = to_user.write_all(&bytes) => w.is_ok(),
                    _ = cancel.cancelled() => false,
                };
                if !written {
                    // The user is gone: nobody will read the rest.
                    shared.reset(at);
                    return;
                }
                outstanding.fetch_sub(n, Ordering::Relaxed);
                shared.send_control(Frame::control(Kind::Credit, at.id, n as u32).at(at.epoch));
            }
            Some(Inbound::Eof) => {
                let _ = to_user.shutdown().await;
                return shared.finish_half(at);
            }
            // Reset, or the link is down: the user reads EOF.
            None => {
                let _ = to_user.shutdown().await;
                return shared.finish_half(at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Two ends of one link over an in-memory carrier of `capacity` bytes.
    fn link(
        capacity: usize,
    ) -> (
        (Mux, mpsc::Receiver<IncomingStream>),
        (Mux, mpsc::Receiver<IncomingStream>),
    ) {
        let (a, b) = tokio::io::duplex(capacity);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        (
            Mux::start(Side::Host, Limits::HOST, Bytes::new(), ar, aw),
            Mux::start(Side::Guest, Limits::GUEST, Bytes::new(), br, bw),
        )
    }

    /// Accepts everything on `port` and echoes it back.
    fn echo_server(mut incoming: mpsc::Receiver<IncomingStream>, port: u32) {
        tokio::spawn(async move {
            while let Some(request) = incoming.recv().await {
                if request.port != port {
                    continue; // dropped: refused
                }
                let stream = request.accept();
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(stream);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
    }

    #[tokio::test]
    async fn hello_carries_the_peers_clock_and_connections_echo_both_ways() {
        let ((host, host_incoming), (guest, guest_incoming)) = link(4096);
        let before = now_unix_nanos();
        guest.hello().await.unwrap();
        let mut clock = guest.peer_clock();
        let host_clock = clock.wait_for(Option::is_some).await.unwrap().unwrap();
        assert!(host_clock >= before && host_clock <= now_unix_nanos());
        echo_server(guest_incoming, 1024);
        echo_server(host_incoming, 4317);
        for (mux, port) in [(&host, 1024), (&guest, 4317)] {
            let mut s = mux.connect(port).await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
        }
    }

    #[tokio::test]
    async fn a_port_nobody_serves_is_refused_and_the_link_stays_up() {
        let ((host, _host_incoming), (_guest, guest_incoming)) = link(4096);
        echo_server(guest_incoming, 1024);
        assert_eq!(host.connect(7).await.unwrap_err(), MuxError::Refused(7));
        assert!(host.connect(1024).await.is_ok());
    }

    #[tokio::test]
    async fn many_megabytes_through_many_streams_arrive_intact_through_a_small_carrier() {
        let ((host, _hi), (_guest, guest_incoming)) = link(1024);
        echo_server(guest_incoming, 1024);
        let host = Arc::new(host);
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let host = host.clone();
            tasks.push(tokio::spawn(async move {
                let s = host.connect(1024).await.unwrap();
                let (mut r, mut w) = tokio::io::split(s);
                let data: Vec<u8> = (0..3 * 1024 * 1024)
                    .map(|j| (j as u8).wrapping_mul(i))
                    .collect();
                let expected = data.clone();
                let writer = tokio::spawn(async move {
                    w.write_all(&data).await.unwrap();
                    w.shutdown().await.unwrap();
                });
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                writer.await.unwrap();
                assert!(got == expected, "stream {i} corrupted");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        eventually_zero(&host).await;
    }

    async fn eventually_zero(mux: &Mux) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while mux.open_streams() != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} streams left",
                mux.open_streams()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_reader_that_stalls_does_not_stop_the_other_streams() {
        let ((host, _hi), (_guest, mut guest_incoming)) = link(4096);
        let host = Arc::new(host);
        // The guest accepts two streams and never reads the first.
        let server = tokio::spawn(async move {
            let stalled = guest_incoming.recv().await.unwrap().accept();
            let live = guest_incoming.recv().await.unwrap().accept();
            let (mut r, mut w) = tokio::io::split(live);
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            stalled
        });
        let mut stalled = host.connect(1).await.unwrap();
        let filler = tokio::spawn(async move {
            // Blocks once the window and the buffers are full.
            let _ = stalled.write_all(&vec![7u8; 4 * 1024 * 1024]).await;
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut live = host.connect(2).await.unwrap();
        for _ in 0..100 {
            live.write_all(b"hello").await.unwrap();
            let mut buf = [0u8; 5];
            live.read_exact(&mut buf).await.unwrap();
        }
        filler.abort();
        drop(live);
        server.abort();
    }

    #[tokio::test]
    async fn closing_the_carrier_ends_every_stream_and_fails_new_connects() {
        let (a, b) = tokio::io::duplex(4096);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let (host, _hi) = Mux::start(Side::Host, Limits::HOST, Bytes::new(), ar, aw);
        let (guest, guest_incoming) = Mux::start(Side::Guest, Limits::GUEST, Bytes::new(), br, bw);
        echo_server(guest_incoming, 1024);
        let mut s = host.connect(1024).await.unwrap();
        drop(guest); // the VM went away
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        assert_eq!(host.closed().await, MuxError::Closed);
        assert!(host.connect(1024).await.is_err());
    }

    #[test]
    fn frames_survive_encoding_and_contain_no_zero_but_the_last() {
        for len in [
            0usize,
            1,
            240,
            244,
            245,
            246,
            253,
            254,
            255,
            500,
            509,
            4096,
            MAX_PAYLOAD,
        ] {
            for fill in [0u8, 1, 0xff] {
                let payload: Vec<u8> = (0..len)
                    .map(|i| if fill == 1 { (i % 251) as u8 } else { fill })
                    .collect();
                let frame = Frame::new(Kind::Data, 0x0100_00ff, Bytes::from(payload.clone()));
                let mut wire = BytesMut::new();
                encode(&frame, &mut wire);
                assert_eq!(
                    wire.iter().position(|&b| b == 0),
                    Some(wire.len() - 1),
                    "{len}/{fill}"
                );
                assert!(wire.len() <= MAX_ENCODED + 1, "{len}/{fill}");
                let Step::Frame(back) = parse(&wire[..wire.len() - 1]) else {
                    panic!("{len}/{fill} does not decode");
                };
                assert_eq!((back.kind, back.stream), (Kind::Data, 0x0100_00ff));
                assert!(back.payload[..] == payload[..], "{len}/{fill}");
                // A flipped bit in the header is caught, and so is a frame cut short and
                // joined to the next (as a restored guest may read).
                for at in 1..8 {
                    let mut bad = wire[..wire.len() - 1].to_vec();
                    bad[at] ^= if bad[at] == 1 { 2 } else { 1 };
                    assert!(matches!(parse(&bad), Step::Garbage(_)), "{len}/{fill}/{at}");
                }
                let mut next = BytesMut::new();
                encode(&Frame::control(Kind::Credit, 3, 9), &mut next);
                let mut joined = wire[..wire.len() / 2].to_vec();
                joined.extend_from_slice(&next[..next.len() - 1]);
                assert!(
                    matches!(parse(&joined), Step::Garbage(_)),
                    "{len}/{fill} joined"
                );
            }
        }
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[tokio::test]
    async fn bytes_before_the_first_greeting_are_skipped() {
        let (a, b) = tokio::io::duplex(1 << 18);
        let (ar, aw) = tokio::io::split(a);
        let (br, mut bw) = tokio::io::split(b);
        // Before the guest's first bytes the host reads the tail of a frame of an old link and
        // an oversized run; the guest reads two stray bytes before the host's.
        bw.write_all(&[5, 1, 7, 7, 0]).await.unwrap();
        bw.write_all(&vec![9u8; MAX_ENCODED + 10]).await.unwrap();
        bw.write_all(&[0]).await.unwrap();
        let (guest, guest_incoming) = Mux::start(
            Side::Guest,
            Limits::GUEST,
            Bytes::from_static(&[3, 3]),
            br,
            bw,
        );
        let (host, _hi) = Mux::start(Side::Host, Limits::HOST, Bytes::new(), ar, aw);
        echo_server(guest_incoming, 1024);
        guest.hello().await.unwrap();
        let mut s = host.connect(1024).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
    }

    type Shared<T> = Arc<tokio::sync::Mutex<T>>;

    /// Forwards bytes from `from` to `to` in small pieces (so that stopping it can cut a
    /// frame) until aborted.
    fn relay<R, W>(from: Shared<R>, to: Shared<W>) -> tokio::task::JoinHandle<()>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(async move {
            let (mut from, mut to) = (from.lock().await, to.lock().await);
            let mut buf = [0u8; 7];
            while let Ok(n) = from.read(&mut buf).await {
                if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        })
    }

    /// A host mux whose carrier is relayed to the guest's ends.
    fn relayed_host(
        to_guest: &Shared<WriteHalf<DuplexStream>>,
        from_guest: &Shared<ReadHalf<DuplexStream>>,
    ) -> (Mux, [tokio::task::JoinHandle<()>; 2]) {
        let (near, far) = tokio::io::duplex(1 << 16);
        let (r, w) = tokio::io::split(near);
        let (host, _incoming) = Mux::start(Side::Host, Limits::HOST, Bytes::new(), r, w);
        let (far_r, far_w) = tokio::io::split(far);
        let relays = [
            relay(Arc::new(far_r.into()), to_guest.clone()),
            relay(from_guest.clone(), Arc::new(far_w.into())),
        ];
        (host, relays)
    }

    /// A guest that kept its link while the host was replaced (a VM restored from a snapshot
    /// into a new QEMU, holding half a frame) is back in step with the new host: its old
    /// connections end and new ones work.
    #[tokio::test]
    async fn a_guest_restored_mid_frame_is_back_in_step_with_a_new_host() {
        let (guest_in, feed) = tokio::io::duplex(1 << 16);
        let (guest_out, drain) = tokio::io::duplex(1 << 16);
        let (guest_r, _) = tokio::io::split(guest_in);
        let (_, guest_w) = tokio::io::split(guest_out);
        let (guest, guest_incoming) =
            Mux::start(Side::Guest, Limits::GUEST, Bytes::new(), guest_r, guest_w);
        echo_server(guest_incoming, 1024);
        let to_guest: Shared<_> = Arc::new(tokio::io::split(feed).1.into());
        let from_guest: Shared<_> = Arc::new(tokio::io::split(drain).0.into());

        let (first, relays) = relayed_host(&to_guest, &from_guest);
        let mut old = first.connect(1024).await.unwrap();
        old.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        old.read_exact(&mut buf).await.unwrap();
        // Bytes in flight both ways when the VM is saved.
        let writer = tokio::spawn(async move {
            let _ = old.write_all(&vec![1u8; 200_000]).await;
            old
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        relays.iter().for_each(|r| r.abort());
        drop(first);
        // The guest holds the start of a frame that will never be finished.
        let mut wire = BytesMut::new();
        encode(
            &Frame::new(Kind::Data, 1, Bytes::from(vec![5u8; 300])),
            &mut wire,
        );
        to_guest.lock().await.write_all(&wire[..100]).await.unwrap();
        assert!(guest.open_streams() >= 1);

        let (second, _relays) = relayed_host(&to_guest, &from_guest);
        tokio::time::timeout(Duration::from_secs(10), second.hello())
            .await
            .expect("the new host is in step")
            .unwrap();
        let mut new = tokio::time::timeout(Duration::from_secs(10), second.connect(1024))
            .await
            .expect("connect answered")
            .unwrap();
        new.write_all(b"after").await.unwrap();
        let mut buf = [0u8; 5];
        new.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"after");
        drop(new);
        eventually_zero(&guest).await; // the old stream went with the old link
        writer.abort();
    }

    /// Writes raw frames to a host mux, as a hostile guest would.
    async fn raw_guest() -> (
        Mux,
        mpsc::Receiver<IncomingStream>,
        WriteHalf<DuplexStream>,
        BufReader<ReadHalf<DuplexStream>>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let (br, mut bw) = tokio::io::split(b);
        let (host, incoming) = Mux::start(Side::Host, Limits::HOST, Bytes::new(), ar, aw);
        let mut hello = BytesMut::new();
        encode(&Frame::hello(false, 7), &mut hello);
        bw.write_all(&hello).await.unwrap();
        host.hello().await.unwrap();
        (host, incoming, bw, BufReader::new(br))
    }

    async fn send(w: &mut WriteHalf<DuplexStream>, frame: Frame) {
        let mut buf = BytesMut::new();
        encode(&frame, &mut buf);
        w.write_all(&buf).await.unwrap();
    }

    async fn next_frame(r: &mut BufReader<ReadHalf<DuplexStream>>) -> Frame {
        let mut scratch = Vec::new();
        match read_step(r, &mut scratch).await.unwrap() {
            Step::Frame(f) => f,
            Step::Garbage(why) => panic!("the host sent garbage: {why}"),
        }
    }

    #[tokio::test]
    async fn a_guest_that_overruns_its_window_loses_the_stream_not_the_link() {
        let (host, mut incoming, mut w, _r) = raw_guest().await;
        send(&mut w, Frame::control(Kind::Connect, 2, 4317)).await;
        let accepted = incoming.recv().await.unwrap();
        assert_eq!(accepted.port, 4317);
        let mut stream = accepted.accept();
        // Never read by the host: the guest may send one window, and sends more.
        let chunk = Bytes::from(vec![1u8; 60 * 1024]);
        for _ in 0..6 {
            send(&mut w, Frame::new(Kind::Data, 2, chunk.clone())).await;
        }
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got))
            .await
            .expect("the stream ends")
            .unwrap();
        assert!(got.len() <= Limits::HOST.window as usize, "{}", got.len());
        eventually_zero(&host).await;
        // The link is still up for the next connection.
        send(&mut w, Frame::control(Kind::Connect, 4, 4317)).await;
        assert_eq!(incoming.recv().await.unwrap().port, 4317);
    }

    #[tokio::test]
    async fn a_guest_cannot_open_more_than_its_stream_limit() {
        let (host, mut incoming, mut w, mut r) = raw_guest().await;
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(s) = incoming.recv().await {
                held.push(s.accept());
            }
            held
        });
        let limit = Limits::HOST.max_peer_streams;
        for i in 0..(limit as u32 + 10) {
            send(&mut w, Frame::control(Kind::Connect, 2 + 2 * i, 1)).await;
        }
        // The host answers each CONNECT: count them.
        let (mut refused, mut accepted) = (0, 0);
        while refused + accepted < limit + 10 {
            match next_frame(&mut r).await.kind {
                Kind::Refuse => refused += 1,
                Kind::Accept => accepted += 1,
                _ => {}
            }
        }
        assert_eq!((accepted, refused), (limit, 10));
        assert_eq!(host.open_streams(), limit);
        held.abort();
    }

    /// Bytes that are not a frame, or a frame that breaks the protocol, end every stream and
    /// start the link over: the host greets again, and once answered serves new streams.
    #[tokio::test]
    async fn a_guest_that_breaks_the_protocol_starts_the_link_over() {
        let cut: Vec<u8> = {
            let mut wire = BytesMut::new();
            encode(&Frame::control(Kind::Connect, 6, 1), &mut wire);
            wire[..wire.len() - 4].to_vec() // a frame cut short, then the next one's zero
        };
        type Breaker = Box<dyn Fn(&mut BytesMut)>;
        let breakers: Vec<Breaker> = vec![
            Box::new(move |b| {
                b.extend_from_slice(&cut);
                b.put_u8(0);
            }),
            Box::new(|b| encode(&Frame::control(Kind::Connect, 3, 1), b)), // a host id
            Box::new(|b| encode(&Frame::new(Kind::Credit, 2, Bytes::from_static(&[1])), b)),
            Box::new(|b| b.extend_from_slice(&[0xEE, 0x01, 0x00])),
        ];
        for (n, breaker) in breakers.iter().enumerate() {
            let (host, mut incoming, mut w, mut r) = raw_guest().await;
            send(&mut w, Frame::control(Kind::Connect, 2, 4317)).await;
            let mut stream = incoming.recv().await.unwrap().accept();
            let mut wire = BytesMut::new();
            breaker(&mut wire);
            w.write_all(&wire).await.unwrap();
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
                .await
                .unwrap_or_else(|_| panic!("breaker {n}: the stream did not end"))
                .unwrap();
            assert!(!host.is_up(), "breaker {n}");
            // The host greets again (not a reply); the guest answers and the link is back.
            loop {
                let f = next_frame(&mut r).await;
                if f.kind == Kind::Hello && !Greeting::parse(&f.payload).unwrap().reply {
                    break;
                }
            }
            send(&mut w, Frame::hello(true, 8)).await;
            host.hello().await.unwrap();
            send(&mut w, Frame::control(Kind::Connect, 10, 4317)).await;
            assert_eq!(incoming.recv().await.unwrap().port, 4317, "breaker {n}");
        }
    }
}
