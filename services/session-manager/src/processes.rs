//! Background processes, terminals and port tunnels, relayed to the executor of the
//! session's node. Requests arrive validated (`grpc.rs`); the session is resolved with
//! [`App::target`], so another tenant's session is NOT_FOUND before anything reaches a node
//! (and a process id only ever names a process in the caller's own session's VM).
//!
//! Streams hold one of the tenant's stream slots for as long as they are open, and keep the
//! stalled-client limit on their output; none has a total or idle limit (a terminal may sit
//! idle for hours). A terminal or a port connection is bidi: the first message goes to the
//! node with the session's vm id; then an input pump feeds the client's messages into the
//! node's call through a bounded channel, while [`App::relay`] carries the output back.
//! Either side ending ends the other: the client's request stream ending ends the node's
//! (the terminal gets SIGHUP, the connection is half-closed); the relay ending (output done,
//! client gone, stalled, or its input broke) stops the pump and drops the node's call.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use capsa_proto::common::v1::{
    ProcessEvent, ProcessInfo, ProcessSpec, Signal, TerminalOpen, TerminalOutput,
};
use capsa_proto::executor::v1 as ex;
use futures::{Stream, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::clients::{ExecutorClient, with_timeout};
use crate::error::Error;
use crate::proxy::{ClientHalf, RELAY_BUFFER, Relayed, UNARY_TIMEOUT};

/// Added to a WaitProcess's own timeout for the node's answer: more than the executor's
/// margin (its stream grace, 15 s by default), so the guest's "still running" arrives
/// before this replica gives up on the node.
const WAIT_MARGIN: Duration = Duration::from_secs(30);

/// The client's messages after the first one of a bidi stream, checked by the adapter.
pub type Input<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Error>> + Send>>;

impl App {
    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session_id))]
    pub async fn start_process(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        spec: ProcessSpec,
    ) -> Result<ProcessInfo, Error> {
        let t = self.target(tenant, session_id).await?;
        self.touch(&t);
        let r = self
            .unary_on(&t, UNARY_TIMEOUT, |mut c, vm_id| async move {
                let r = ex::StartProcessRequest {
                    vm_id,
                    spec: Some(spec),
                };
                c.start_process(with_timeout(r, UNARY_TIMEOUT)).await
            })
            .await?;
        r.process.ok_or_else(|| missing("StartProcess"))
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session_id))]
    pub async fn list_processes(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
    ) -> Result<Vec<ProcessInfo>, Error> {
        let t = self.target(tenant, session_id).await?;
        let r = self
            .unary_on(&t, UNARY_TIMEOUT, |mut c, vm_id| async move {
                let r = ex::ListProcessesRequest { vm_id };
                c.list_processes(with_timeout(r, UNARY_TIMEOUT)).await
            })
            .await?;
        Ok(r.processes)
    }

    /// Waits up to `timeout` in the guest; the node call's own deadline leaves
    /// [`WAIT_MARGIN`] on top so the guest's DEADLINE_EXCEEDED comes back as it is.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session_id, process_id = %process_id))]
    pub async fn wait_process(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        process_id: String,
        timeout: Duration,
    ) -> Result<ProcessInfo, Error> {
        let t = self.target(tenant, session_id).await?;
        let limit = timeout + WAIT_MARGIN;
        let r = self
            .unary_on(&t, limit, |mut c, vm_id| async move {
                let r = ex::WaitProcessRequest {
                    vm_id,
                    process_id,
                    timeout: Some(capsa_proto::time::duration(timeout)),
                };
                c.wait_process(with_timeout(r, limit)).await
            })
            .await?;
        r.process.ok_or_else(|| missing("WaitProcess"))
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session_id, process_id = %process_id))]
    pub async fn signal_process(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        process_id: String,
        signal: Signal,
    ) -> Result<ProcessInfo, Error> {
        let t = self.target(tenant, session_id).await?;
        self.touch(&t);
        let r = self
            .unary_on(&t, UNARY_TIMEOUT, |mut c, vm_id| async move {
                let r = ex::SignalProcessRequest {
                    vm_id,
                    process_id,
                    signal: signal as i32,
                };
                c.signal_process(with_timeout(r, UNARY_TIMEOUT)).await
            })
            .await?;
        r.process.ok_or_else(|| missing("SignalProcess"))
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session_id, process_id = %process_id))]
    pub async fn write_stdin(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        process_id: String,
        data: Bytes,
        close: bool,
    ) -> Result<(), Error> {
        let t = self.target(tenant, session_id).await?;
        self.touch(&t);
        self.unary_on(&t, UNARY_TIMEOUT, |mut c, vm_id| async move {
            let r = ex::WriteStdinRequest {
                vm_id,
                process_id,
                data,
                close,
            };
            c.write_stdin(with_timeout(r, UNARY_TIMEOUT)).await
        })
        .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session_id, process_id = %process_id))]
    pub async fn attach_process(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        process_id: String,
        from_offset: u64,
        follow: bool,
    ) -> Result<Relayed<ProcessEvent>, Error> {
        let slot = self.streams.acquire(tenant)?;
        let t = self.target(tenant, session_id).await?;
        self.touch(&t);
        let mut client = self.clients.executor(&t.node.executor_url)?;
        let upstream = ex::AttachProcessRequest {
            vm_id: t.session.vm_id.clone(),
            process_id,
            from_offset,
            follow,
        };
        let stream = self.open(&t, client.attach_process(upstream)).await?;
        Ok(self.relay(
            t,
            slot,
            stream,
            |m: ex::AttachProcessResponse| m.event,
            None,
        ))
    }

    /// A terminal: `open` (validated) goes first, then `input` (keystrokes, resizes).
    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session_id))]
    pub async fn open_terminal(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        terminal: TerminalOpen,
        input: Input<ex::open_terminal_request::Part>,
    ) -> Result<Relayed<TerminalOutput>, Error> {
        use ex::open_terminal_request::Part;
        let wrap = |part| ex::OpenTerminalRequest { part: Some(part) };
        let first = |vm_id| {
            wrap(Part::Open(ex::OpenTerminalHeader {
                vm_id,
                terminal: Some(terminal),
            }))
        };
        let input = Box::pin(input.map(move |part| part.map(wrap)));
        self.bidi(
            tenant,
            session_id,
            first,
            input,
            |mut c, body| async move { c.open_terminal(body).await },
            |m: ex::OpenTerminalResponse| m.output,
        )
        .await
    }

    /// A TCP connection to `port` in the guest, answered once connected; then `input`
    /// goes to the guest's socket and its bytes come back.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session_id, port))]
    pub async fn connect_port(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        port: u32,
        input: Input<Bytes>,
    ) -> Result<Relayed<Bytes>, Error> {
        use ex::connect_port_request::Part;
        let wrap = |part| ex::ConnectPortRequest { part: Some(part) };
        let first = |vm_id| wrap(Part::Open(ex::ConnectPortHeader { vm_id, port }));
        let input = Box::pin(input.map(move |data| data.map(|d| wrap(Part::Data(d)))));
        self.bidi(
            tenant,
            session_id,
            first,
            input,
            |mut c, body| async move { c.connect_port(body).await },
            |m: ex::ConnectPortResponse| Some(m.data),
        )
        .await
    }

    /// A bidi stream to the session's node: `first(vm id)` opens the node's call (which
    /// answers once the guest side is open), then `input` follows it through [`pump`],
    /// and the node's output comes back through [`App::relay`] under the tenant's slot.
    async fn bidi<Req, Resp, D, Fut>(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        first: impl FnOnce(String) -> Req,
        input: Input<Req>,
        call: impl FnOnce(ExecutorClient, ReceiverStream<Req>) -> Fut,
        map: fn(Resp) -> Option<D>,
    ) -> Result<Relayed<D>, Error>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
        D: Send + 'static,
        Fut: Future<Output = Result<tonic::Response<tonic::Streaming<Resp>>, tonic::Status>>,
    {
        let slot = self.streams.acquire(tenant)?;
        let t = self.target(tenant, session_id).await?;
        self.touch(&t);
        let client = self.clients.executor(&t.node.executor_url)?;
        let (feed, body) = mpsc::channel(RELAY_BUFFER);
        feed.send(first(t.session.vm_id.clone()))
            .await
            .map_err(|_| Error::Internal("stream channel closed".into()))?;
        let stream = self
            .open(&t, call(client, ReceiverStream::new(body)))
            .await?;
        let half = pump(input, feed);
        Ok(self.relay(t, slot, stream, map, Some(half)))
    }
}

/// Feeds `input` into `feed` (the node call's request body) until the client's stream
/// ends (the body then ends cleanly), its input breaks (the relay gets the error), or the
/// relay ends (it drops [`ClientHalf::stop`]). Waiting for room in `feed` is the
/// backpressure: a guest not reading stops this pump, which stops reading the client.
fn pump<T: Send + 'static>(mut input: Input<T>, feed: mpsc::Sender<T>) -> ClientHalf {
    let stop = CancellationToken::new();
    let (abort, aborted) = oneshot::channel();
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                () = stopped.cancelled() => return,
                next = input.next() => next,
            };
            match next {
                Some(Ok(message)) => tokio::select! {
                    () = stopped.cancelled() => return,
                    sent = feed.send(message) => if sent.is_err() { return },
                },
                Some(Err(err)) => {
                    let _ = abort.send(err);
                    return;
                }
                None => return,
            }
        }
    });
    ClientHalf {
        aborted,
        stop: stop.drop_guard(),
    }
}

fn missing(call: &str) -> Error {
    Error::Internal(format!("the node answered {call} without a process"))
}
