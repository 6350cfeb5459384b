//! The relay between one upstream agent stream and one downstream client stream.
//!
//! Backpressure: the relay sends into a small bounded channel whose receiver is the
//! client's response stream ([`Outlet`]). While the client reads slowly, `send` waits, the
//! relay stops polling the agent stream, HTTP/2 flow control stops the agent, and the agent
//! stops reading the kernel's pipes: memory stays bounded at every hop.
//!
//! Stalled clients: a send may wait at most `stalled` (`--stalled-client-timeout-ms`). A
//! client that takes nothing for that long gets DEADLINE_EXCEEDED and the upstream is
//! dropped, which interrupts the code in the guest and frees its kernel: a reader that
//! stopped holds its own stream, and the node's resources, only that long.
//!
//! Cancellation: when the client goes away the receiver is dropped; the relay notices
//! (`closed`) even while the agent is silent, returns, and dropping the upstream stream
//! resets it, which the agent treats as an interrupt of the running code.
//!
//! Limits: an optional idle limit between upstream events and an optional total limit
//! (process output, terminals and port tunnels have neither: they may be silent for
//! hours, and end when either side does). Both measure
//! the guest, not the client: time spent waiting for a slow client to take an event pushes
//! the total deadline out by as much (each wait is bounded by `stalled`), and the idle
//! clock restarts after every delivery.
//!
//! Errors end a stream without waiting for room in the channel ([`Outlet::fail`]): the
//! client gets what was buffered, then the error, and a relay never hangs on a full channel
//! to say why it stopped.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Limit};

/// Events buffered between the relay and the client's response stream. Small on purpose:
/// HTTP/2 windows already buffer a little on each side.
pub const CHANNEL_CAPACITY: usize = 16;

/// What the client reads: the relayed items, then at most one error.
pub type Outflow<T> = Pin<Box<dyn Stream<Item = Result<T, Error>> + Send>>;

/// The relay's end of a client stream: items wait for room, the final error does not.
pub struct Outlet<T> {
    items: mpsc::Sender<T>,
    end: oneshot::Sender<Error>,
}

/// A client stream buffering `capacity` items ([`CHANNEL_CAPACITY`] outside tests): the
/// [`Outlet`] to feed it and the [`Outflow`] the client reads.
pub fn outlet<T: Send + 'static>(capacity: usize) -> (Outlet<T>, Outflow<T>) {
    let (items, items_rx) = mpsc::channel(capacity);
    let (end, end_rx) = oneshot::channel();
    // The error slot is read once the items end, i.e. once the outlet is gone: after
    // everything buffered. An outlet dropped without `fail` leaves the slot empty.
    let ended = futures::stream::once(end_rx).filter_map(|end| async move { end.ok().map(Err) });
    let flow = ReceiverStream::new(items_rx).map(Ok).chain(ended);
    (Outlet { items, end }, Box::pin(flow))
}

impl<T> Outlet<T> {
    /// Waits for room and sends; `false` when the client is gone.
    pub async fn send(&self, item: T) -> bool {
        self.items.send(item).await.is_ok()
    }

    /// Resolves when the client has gone away.
    pub async fn closed(&self) {
        self.items.closed().await
    }

    /// Ends the stream with `err` after what is already buffered, without waiting.
    pub fn fail(self, err: Error) {
        let _ = self.end.send(err);
    }
}

/// How a relay ended, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// The upstream ended normally (after its final event, where one is required).
    Finished,
    /// The client went away; the upstream was dropped, interrupting the guest.
    ClientGone,
    /// The client took nothing for the stall timeout; the upstream was dropped.
    ClientStalled,
    /// A limit, a transport failure or shutdown ended it; the client got the error.
    Failed,
}

/// One relay's settings.
pub struct Relay {
    pub vm_id: String,
    pub idle: Option<Duration>,
    pub total: Option<Duration>,
    /// Longest wait for the client to take one item.
    pub stalled: Duration,
    /// Whether the upstream must deliver a final event (an Execute's completion).
    pub require_final: bool,
    /// Released as soon as the final event arrives: the guest's kernel is free again.
    pub gate: Option<OwnedMutexGuard<()>>,
    pub shutdown: CancellationToken,
}

impl Relay {
    /// Forwards `upstream` into `out` until either side ends. `convert` maps an upstream
    /// message to the downstream one and says whether it was the final event.
    pub async fn run<U, D, S, F>(self, upstream: S, out: Outlet<D>, convert: F) -> RelayEnd
    where
        S: Stream<Item = Result<U, tonic::Status>> + Unpin,
        F: FnMut(U) -> (D, bool),
    {
        self.run_until(upstream, out, convert, std::future::pending())
            .await
    }

    /// [`Relay::run`], also ending (with its error for the client) when `abort` resolves:
    /// the client's half of a bidi stream broke (a bad message, a reset).
    pub async fn run_until<U, D, S, F, A>(
        self,
        mut upstream: S,
        out: Outlet<D>,
        mut convert: F,
        abort: A,
    ) -> RelayEnd
    where
        S: Stream<Item = Result<U, tonic::Status>> + Unpin,
        F: FnMut(U) -> (D, bool),
        A: Future<Output = Error>,
    {
        tokio::pin!(abort);
        let Relay {
            vm_id,
            idle,
            total,
            stalled,
            require_final,
            mut gate,
            shutdown,
        } = self;
        let mut total_deadline = total.map(|t| Instant::now() + t);
        let mut saw_final = false;
        loop {
            let idle_limit = idle.map(|idle| (Instant::now() + idle, Limit::Idle, idle));
            let total_limit = total_deadline
                .zip(total)
                .map(|(t, after)| (t, Limit::Total, after));
            // The earlier of the two, if any.
            let next_limit = match (idle_limit, total_limit) {
                (Some(i), Some(t)) => Some(if t.0 <= i.0 { t } else { i }),
                (i, t) => i.or(t),
            };
            let limit_reached = async {
                match next_limit {
                    Some((deadline, limit, after)) => {
                        tokio::time::sleep_until(deadline).await;
                        (limit, after)
                    }
                    None => std::future::pending().await,
                }
            };
            let item = tokio::select! {
                biased;
                () = out.closed() => return RelayEnd::ClientGone,
                () = shutdown.cancelled() => {
                    out.fail(Error::ShuttingDown);
                    return RelayEnd::Failed;
                }
                err = &mut abort => {
                    tracing::info!(%vm_id, error = %err, "client stream failed");
                    out.fail(err);
                    return RelayEnd::Failed;
                }
                (limit, after) = limit_reached => {
                    tracing::warn!(%vm_id, %limit, ?after, "stream limit exceeded");
                    out.fail(Error::LimitExceeded { vm_id, limit, after });
                    return RelayEnd::Failed;
                }
                item = upstream.next() => item,
            };
            match item {
                Some(Ok(message)) => {
                    let (item, is_final) = convert(message);
                    if is_final {
                        saw_final = true;
                        gate = None;
                    }
                    let blocked_since = Instant::now();
                    tokio::select! {
                        sent = out.send(item) => if !sent {
                            return RelayEnd::ClientGone;
                        },
                        () = tokio::time::sleep(stalled) => {
                            tracing::warn!(%vm_id, ?stalled, "client stopped reading");
                            out.fail(Error::ClientStalled { after: stalled });
                            return RelayEnd::ClientStalled;
                        }
                        () = shutdown.cancelled() => {
                            out.fail(Error::ShuttingDown);
                            return RelayEnd::Failed;
                        }
                    }
                    if let Some(deadline) = &mut total_deadline {
                        *deadline += blocked_since.elapsed();
                    }
                }
                Some(Err(status)) => {
                    tracing::warn!(%vm_id, ?status, "agent stream failed");
                    out.fail(Error::from_agent(&vm_id, &status));
                    return RelayEnd::Failed;
                }
                None if require_final && !saw_final => {
                    out.fail(Error::MissingCompletion { vm_id });
                    return RelayEnd::Failed;
                }
                None => {
                    drop(gate);
                    return RelayEnd::Finished;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    type Up = mpsc::Sender<Result<u32, tonic::Status>>;

    fn relay(idle: u64, total: Option<u64>) -> Relay {
        Relay {
            vm_id: "vm-1".into(),
            idle: Some(Duration::from_secs(idle)),
            total: total.map(Duration::from_secs),
            stalled: Duration::from_secs(1000),
            require_final: true,
            gate: None,
            shutdown: CancellationToken::new(),
        }
    }

    /// Starts `relay` over an upstream the test feeds; `99` is the final event.
    fn start(relay: Relay) -> (Up, Outflow<u32>, tokio::task::JoinHandle<RelayEnd>) {
        let (up_tx, up_rx) = mpsc::channel(64);
        let (out, flow) = outlet(2);
        let task = tokio::spawn(relay.run(ReceiverStream::new(up_rx), out, |m| (m, m == 99)));
        (up_tx, flow, task)
    }

    #[tokio::test(start_paused = true)]
    async fn forwards_in_order_and_finishes_after_the_final_event() {
        let (up, mut rx, task) = start(relay(10, Some(100)));
        for m in [1, 2, 99] {
            up.send(Ok(m)).await.unwrap();
        }
        drop(up);
        for m in [1, 2, 99] {
            assert_eq!(rx.next().await.unwrap().unwrap(), m);
        }
        assert!(rx.next().await.is_none());
        assert_eq!(task.await.unwrap(), RelayEnd::Finished);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_hits_the_idle_limit() {
        let (up, mut rx, task) = start(relay(10, Some(100)));
        up.send(Ok(1)).await.unwrap();
        assert_eq!(rx.next().await.unwrap().unwrap(), 1);
        let err = rx.next().await.unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                Error::LimitExceeded {
                    limit: Limit::Idle,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(task.await.unwrap(), RelayEnd::Failed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_chatty_stream_still_hits_the_total_limit() {
        let (up, mut rx, task) = start(relay(10, Some(30)));
        let feeder = tokio::spawn(async move {
            while up.send(Ok(1)).await.is_ok() {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let started = Instant::now();
        let err = loop {
            match rx.next().await.unwrap() {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(
                err,
                Error::LimitExceeded {
                    limit: Limit::Total,
                    ..
                }
            ),
            "{err}"
        );
        assert!(started.elapsed() >= Duration::from_secs(30));
        assert_eq!(task.await.unwrap(), RelayEnd::Failed);
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn time_blocked_on_a_slow_client_does_not_count() {
        let mut r = relay(10, Some(30));
        r.stalled = Duration::from_secs(25);
        let (up, mut rx, task) = start(r);
        for m in [1, 2, 3, 4, 99] {
            up.send(Ok(m)).await.unwrap();
        }
        drop(up);
        // The client takes 20 s per event: 100 s in all, far past the 30 s total.
        let mut got = Vec::new();
        while let Some(item) = rx.next().await {
            tokio::time::sleep(Duration::from_secs(20)).await;
            got.push(item.unwrap());
        }
        assert_eq!(got, [1, 2, 3, 4, 99]);
        assert_eq!(task.await.unwrap(), RelayEnd::Finished);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_ends_the_stream_and_drops_the_upstream() {
        let mut r = relay(1000, Some(1000));
        r.stalled = Duration::from_secs(30);
        let (up, mut rx, task) = start(r);
        // The guest has endless output; the client takes none of it.
        let feeder = tokio::spawn(async move { while up.send(Ok(1)).await.is_ok() {} });
        let started = Instant::now();
        assert_eq!(task.await.unwrap(), RelayEnd::ClientStalled);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
            "{waited:?}"
        );
        // The upstream was dropped (the agent sees a reset and interrupts the code).
        feeder.await.unwrap();
        // A client that comes back gets what was buffered, then why the stream ended.
        assert_eq!(rx.next().await.unwrap().unwrap(), 1);
        assert_eq!(rx.next().await.unwrap().unwrap(), 1);
        let err = rx.next().await.unwrap().unwrap_err();
        assert!(matches!(err, Error::ClientStalled { .. }), "{err}");
        assert_eq!(err.to_string(), "client stopped reading for 30s");
        assert!(rx.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_does_not_wait_for_room_in_a_full_channel() {
        let (up, mut rx, task) = start(relay(10, None));
        for m in [1, 2] {
            up.send(Ok(m)).await.unwrap();
        }
        up.send(Err(tonic::Status::unknown("reset"))).await.unwrap();
        // The two items fill the channel; nobody reads, yet the relay ends at the error.
        assert_eq!(task.await.unwrap(), RelayEnd::Failed);
        assert_eq!(rx.next().await.unwrap().unwrap(), 1);
        assert_eq!(rx.next().await.unwrap().unwrap(), 2);
        let err = rx.next().await.unwrap().unwrap_err();
        assert!(matches!(err, Error::AgentUnavailable { .. }), "{err}");
        assert!(rx.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_goes_away_drops_the_upstream_even_when_it_is_silent() {
        let (up, rx, task) = start(relay(1000, None));
        drop(rx);
        assert_eq!(task.await.unwrap(), RelayEnd::ClientGone);
        up.closed().await; // the upstream was dropped: the agent sees a reset
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_ends_without_its_final_event_is_an_error() {
        let (up, mut rx, task) = start(relay(10, None));
        up.send(Ok(1)).await.unwrap();
        drop(up);
        assert_eq!(rx.next().await.unwrap().unwrap(), 1);
        let err = rx.next().await.unwrap().unwrap_err();
        assert!(matches!(err, Error::MissingCompletion { .. }), "{err}");
        assert_eq!(task.await.unwrap(), RelayEnd::Failed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_is_released_at_the_final_event() {
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let mut r = relay(10, None);
        r.gate = Some(gate.clone().lock_owned().await);
        let (up, mut rx, task) = start(r);
        up.send(Ok(99)).await.unwrap();
        assert_eq!(rx.next().await.unwrap().unwrap(), 99);
        // The upstream has not ended yet, but the kernel is free for the next execute.
        let _next = gate.lock().await;
        drop(up);
        assert_eq!(task.await.unwrap(), RelayEnd::Finished);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_stream_with_unavailable() {
        let r = relay(1000, None);
        let token = r.shutdown.clone();
        let (_up, mut rx, task) = start(r);
        token.cancel();
        assert!(matches!(rx.next().await.unwrap(), Err(Error::ShuttingDown)));
        assert_eq!(task.await.unwrap(), RelayEnd::Failed);
    }

    #[tokio::test(start_paused = true)]
    async fn without_limits_a_silent_stream_stays_open_until_aborted() {
        let mut r = relay(1, None);
        r.idle = None;
        r.require_final = false;
        let (_up, up_rx) = mpsc::channel::<Result<u32, tonic::Status>>(1);
        let (out, mut rx) = outlet(2);
        let (abort, aborted) = oneshot::channel();
        let task = tokio::spawn(r.run_until(
            ReceiverStream::new(up_rx),
            out,
            |m| (m, false),
            async move { aborted.await.unwrap() },
        ));
        // Silent for an hour of (paused) time: no limit ends it.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!task.is_finished());
        abort
            .send(Error::invalid("open", "may only be the first message"))
            .unwrap();
        assert_eq!(task.await.unwrap(), RelayEnd::Failed);
        let err = rx.next().await.unwrap().unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { field: "open", .. }),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn agent_errors_are_classified() {
        let (up, mut rx, task) = start(relay(10, None));
        up.send(Err(tonic::Status::unknown("connection reset")))
            .await
            .unwrap();
        let err = rx.next().await.unwrap().unwrap_err();
        assert!(matches!(err, Error::AgentUnavailable { .. }), "{err}");
        assert_eq!(task.await.unwrap(), RelayEnd::Failed);
    }
}
