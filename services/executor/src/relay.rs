//! The relay between one upstream agent stream and one downstream client stream.
//!
//! Backpressure: the relay owns the sending half of a small bounded channel whose receiver
//! is the client's response stream. While the client reads slowly, `send` waits, the relay
//! stops polling the agent stream, HTTP/2 flow control stops the agent, and the agent stops
//! reading the kernel's pipes: memory stays bounded at every hop.
//!
//! Cancellation: when the client goes away the receiver is dropped; the relay notices
//! (`closed`) even while the agent is silent, returns, and dropping the upstream stream
//! resets it, which the agent treats as an interrupt of the running code.
//!
//! Limits: an idle limit between upstream events and an optional total limit. Both measure
//! the guest, not the client: time spent waiting for a slow client to take an event pushes
//! the total deadline out by as much, and the idle clock restarts after every delivery.

use std::time::Duration;

use futures::{Stream, StreamExt as _};
use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Limit};

/// Events buffered between the relay and the client's response stream. Small on purpose:
/// HTTP/2 windows already buffer a little on each side.
pub const CHANNEL_CAPACITY: usize = 16;

/// How a relay ended, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// The upstream ended normally (after its final event, where one is required).
    Finished,
    /// The client went away; the upstream was dropped, interrupting the guest.
    ClientGone,
    /// A limit, a transport failure or shutdown ended it; the client got the error.
    Failed,
}

/// One relay's settings.
pub struct Relay {
    pub vm_id: String,
    pub idle: Duration,
    pub total: Option<Duration>,
    /// Whether the upstream must deliver a final event (an Execute's completion).
    pub require_final: bool,
    /// Released as soon as the final event arrives: the guest's kernel is free again.
    pub gate: Option<OwnedMutexGuard<()>>,
    pub shutdown: CancellationToken,
}

impl Relay {
    /// Forwards `upstream` into `tx` until either side ends. `convert` maps an upstream
    /// message to the downstream one and says whether it was the final event.
    pub async fn run<U, D, S, F>(
        self,
        mut upstream: S,
        tx: mpsc::Sender<Result<D, Error>>,
        mut convert: F,
    ) -> RelayEnd
    where
        S: Stream<Item = Result<U, tonic::Status>> + Unpin,
        F: FnMut(U) -> (D, bool),
    {
        let Relay {
            vm_id,
            idle,
            total,
            require_final,
            mut gate,
            shutdown,
        } = self;
        let mut total_deadline = total.map(|t| Instant::now() + t);
        let mut saw_final = false;
        loop {
            let idle_deadline = Instant::now() + idle;
            let (deadline, limit, after) = match (total_deadline, total) {
                (Some(t), Some(after)) if t <= idle_deadline => (t, Limit::Total, after),
                _ => (idle_deadline, Limit::Idle, idle),
            };
            let item = tokio::select! {
                biased;
                () = tx.closed() => return RelayEnd::ClientGone,
                () = shutdown.cancelled() => {
                    let _ = tx.send(Err(Error::ShuttingDown)).await;
                    return RelayEnd::Failed;
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(%vm_id, %limit, ?after, "stream limit exceeded");
                    let _ = tx.send(Err(Error::LimitExceeded { vm_id, limit, after })).await;
                    return RelayEnd::Failed;
                }
                item = upstream.next() => item,
            };
            match item {
                Some(Ok(message)) => {
                    let (out, is_final) = convert(message);
                    if is_final {
                        saw_final = true;
                        gate = None;
                    }
                    let blocked_since = Instant::now();
                    tokio::select! {
                        sent = tx.send(Ok(out)) => if sent.is_err() {
                            return RelayEnd::ClientGone;
                        },
                        () = shutdown.cancelled() => return RelayEnd::Failed,
                    }
                    if let Some(deadline) = &mut total_deadline {
                        *deadline += blocked_since.elapsed();
                    }
                }
                Some(Err(status)) => {
                    tracing::warn!(%vm_id, ?status, "agent stream failed");
                    let _ = tx.send(Err(Error::from_agent(&vm_id, &status))).await;
                    return RelayEnd::Failed;
                }
                None if require_final && !saw_final => {
                    let _ = tx.send(Err(Error::MissingCompletion { vm_id })).await;
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
    use tokio_stream::wrappers::ReceiverStream;

    type Up = mpsc::Sender<Result<u32, tonic::Status>>;

    fn relay(idle: u64, total: Option<u64>) -> Relay {
        Relay {
            vm_id: "vm-1".into(),
            idle: Duration::from_secs(idle),
            total: total.map(Duration::from_secs),
            require_final: true,
            gate: None,
            shutdown: CancellationToken::new(),
        }
    }

    /// Starts `relay` over an upstream the test feeds; `99` is the final event.
    fn start(
        relay: Relay,
    ) -> (
        Up,
        mpsc::Receiver<Result<u32, Error>>,
        tokio::task::JoinHandle<RelayEnd>,
    ) {
        let (up_tx, up_rx) = mpsc::channel(64);
        let (tx, rx) = mpsc::channel(2);
        let task = tokio::spawn(relay.run(ReceiverStream::new(up_rx), tx, |m| (m, m == 99)));
        (up_tx, rx, task)
    }

    #[tokio::test(start_paused = true)]
    async fn forwards_in_order_and_finishes_after_the_final_event() {
        let (up, mut rx, task) = start(relay(10, Some(100)));
        for m in [1, 2, 99] {
            up.send(Ok(m)).await.unwrap();
        }
        drop(up);
        for m in [1, 2, 99] {
            assert_eq!(rx.recv().await.unwrap().unwrap(), m);
        }
        assert!(rx.recv().await.is_none());
        assert_eq!(task.await.unwrap(), RelayEnd::Finished);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_hits_the_idle_limit() {
        let (up, mut rx, task) = start(relay(10, Some(100)));
        up.send(Ok(1)).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().unwrap(), 1);
        let err = rx.recv().await.unwrap().unwrap_err();
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
            match rx.recv().await.unwrap() {
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
        let (up, mut rx, task) = start(relay(10, Some(30)));
        for m in [1, 2, 3, 4, 99] {
            up.send(Ok(m)).await.unwrap();
        }
        drop(up);
        // The client takes 20 s per event: 100 s in all, far past the 30 s total.
        let mut got = Vec::new();
        while let Some(item) = rx.recv().await {
            tokio::time::sleep(Duration::from_secs(20)).await;
            got.push(item.unwrap());
        }
        assert_eq!(got, [1, 2, 3, 4, 99]);
        assert_eq!(task.await.unwrap(), RelayEnd::Finished);
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
        assert_eq!(rx.recv().await.unwrap().unwrap(), 1);
        let err = rx.recv().await.unwrap().unwrap_err();
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
        assert_eq!(rx.recv().await.unwrap().unwrap(), 99);
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
        assert!(matches!(rx.recv().await.unwrap(), Err(Error::ShuttingDown)));
        assert_eq!(task.await.unwrap(), RelayEnd::Failed);
    }

    #[tokio::test(start_paused = true)]
    async fn agent_errors_are_classified() {
        let (up, mut rx, task) = start(relay(10, None));
        up.send(Err(tonic::Status::unknown("connection reset")))
            .await
            .unwrap();
        let err = rx.recv().await.unwrap().unwrap_err();
        assert!(matches!(err, Error::AgentUnavailable { .. }), "{err}");
        assert_eq!(task.await.unwrap(), RelayEnd::Failed);
    }
}
