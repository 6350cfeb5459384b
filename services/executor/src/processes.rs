//! Background processes, terminals and port tunnels, relayed to the guest agent.
//!
//! Unary calls go through [`Executor::call`]; WaitProcess waits in the guest, so its limit
//! is its own timeout plus the stream grace. AttachProcess is a server-stream relay. A
//! terminal or a port tunnel is a bidi relay: the first message (already read by the
//! adapter) opens the agent's call, then an input pump feeds the client's messages into
//! the agent's request body through a bounded channel while a [`Relay`] carries the
//! agent's output back, so backpressure reaches both ends. None of these streams has an
//! idle or total limit (a terminal may sit idle for hours, a process may be silent); each
//! ends when either side ends or goes away, and the stalled-client limit still applies to
//! output nobody takes. When the relay ends, the pump stops and the agent's call is
//! dropped (reset), which the agent treats as the end of the terminal or connection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use capsa_proto::agent::v1 as agent;
use capsa_proto::common::v1::{
    ProcessEvent, ProcessInfo, ProcessSpec, TerminalOpen, TerminalOutput,
};
use capsa_proto::limits::{
    DEFAULT_WAIT_TIMEOUT, MAX_PATH_BYTES, MAX_STREAM_DATA_BYTES, MAX_WAIT_TIMEOUT,
};
use futures::{Stream, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Limit};
use crate::executor::Executor;
use crate::relay::{CHANNEL_CAPACITY, Outflow, Relay, RelayEnd, outlet};
use crate::spec;

/// What a client sends after the first message of a bidi stream, already checked.
pub type Input<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Error>> + Send>>;

/// A process's id, as the agent's calls take it.
fn process_id(id: String) -> Result<String, Error> {
    if id.is_empty() {
        return Err(Error::invalid("process_id", "is required"));
    }
    Ok(id)
}

/// Stdin data, keystrokes and port data: at most [`MAX_STREAM_DATA_BYTES`] a message.
pub fn check_data(data: &[u8]) -> Result<(), Error> {
    if data.len() > MAX_STREAM_DATA_BYTES {
        return Err(Error::invalid(
            "data",
            format!(
                "is {} bytes; the limit is {MAX_STREAM_DATA_BYTES} a message",
                data.len()
            ),
        ));
    }
    Ok(())
}

/// WaitProcess's timeout, the default filled in.
fn wait_timeout(timeout: Option<prost_types::Duration>) -> Result<Duration, Error> {
    match timeout {
        None => Ok(DEFAULT_WAIT_TIMEOUT),
        Some(d) => capsa_proto::time::from_duration(&d)
            .filter(|t| !t.is_zero() && *t <= MAX_WAIT_TIMEOUT)
            .ok_or_else(|| {
                Error::invalid(
                    "timeout",
                    format!("must be between 1 ms and {MAX_WAIT_TIMEOUT:?}"),
                )
            }),
    }
}

fn check_spec(spec: Option<ProcessSpec>) -> Result<ProcessSpec, Error> {
    let spec = spec.ok_or_else(|| Error::invalid("spec", "is required"))?;
    if spec.command.is_empty() {
        return Err(Error::invalid("spec.command", "is required"));
    }
    spec::check_env("spec.env", &spec.env)?;
    if spec.cwd.len() > MAX_PATH_BYTES || spec.cwd.contains('\0') {
        return Err(Error::invalid(
            "spec.cwd",
            format!("must be at most {MAX_PATH_BYTES} bytes without NUL"),
        ));
    }
    Ok(spec)
}

impl Executor {
    #[tracing::instrument(skip_all, fields(vm_id))]
    pub async fn start_process(
        &self,
        vm_id: &str,
        spec: Option<ProcessSpec>,
    ) -> Result<ProcessInfo, Error> {
        let spec = check_spec(spec)?;
        let r = self
            .call(vm_id, |mut c| async move {
                c.start_process(agent::StartProcessRequest { spec: Some(spec) })
                    .await
            })
            .await?;
        r.process.ok_or_else(|| missing(vm_id, "StartProcess"))
    }

    #[tracing::instrument(skip(self))]
    pub async fn list_processes(&self, vm_id: &str) -> Result<Vec<ProcessInfo>, Error> {
        let r = self
            .call(vm_id, |mut c| async move {
                c.list_processes(agent::ListProcessesRequest {}).await
            })
            .await?;
        Ok(r.processes)
    }

    /// Waits in the guest for up to `timeout` (the agent answers DEADLINE_EXCEEDED then);
    /// the call's own limit leaves the grace on top for the answer to come back.
    #[tracing::instrument(skip(self, timeout))]
    pub async fn wait_process(
        &self,
        vm_id: &str,
        process_id: String,
        timeout: Option<prost_types::Duration>,
    ) -> Result<ProcessInfo, Error> {
        let process_id = self::process_id(process_id)?;
        let timeout = wait_timeout(timeout)?;
        let limit = timeout + self.limits.grace;
        let r = self
            .call_within(vm_id, limit, |mut c| async move {
                c.wait_process(agent::WaitProcessRequest {
                    process_id,
                    timeout: Some(capsa_proto::time::duration(timeout)),
                })
                .await
            })
            .await?;
        r.process.ok_or_else(|| missing(vm_id, "WaitProcess"))
    }

    #[tracing::instrument(skip(self))]
    pub async fn signal_process(
        &self,
        vm_id: &str,
        process_id: String,
        signal: i32,
    ) -> Result<ProcessInfo, Error> {
        let process_id = self::process_id(process_id)?;
        let r = self
            .call(vm_id, |mut c| async move {
                c.signal_process(agent::SignalProcessRequest { process_id, signal })
                    .await
            })
            .await?;
        r.process.ok_or_else(|| missing(vm_id, "SignalProcess"))
    }

    #[tracing::instrument(skip(self, data), fields(bytes = data.len()))]
    pub async fn write_stdin(
        &self,
        vm_id: &str,
        process_id: String,
        data: Bytes,
        close: bool,
    ) -> Result<(), Error> {
        let process_id = self::process_id(process_id)?;
        check_data(&data)?;
        self.call(vm_id, |mut c| async move {
            c.write_stdin(agent::WriteStdinRequest {
                process_id,
                data,
                close,
            })
            .await
        })
        .await
        .map(|_| ())
    }

    /// Opens a process's output stream in the guest and relays it; fails before the
    /// stream starts when the agent refuses (an unknown id, a terminal, a bad offset).
    #[tracing::instrument(skip(self))]
    pub async fn attach_process(
        self: &Arc<Self>,
        vm_id: &str,
        process_id: String,
        from_offset: u64,
        follow: bool,
    ) -> Result<Outflow<Option<ProcessEvent>>, Error> {
        let process_id = self::process_id(process_id)?;
        let request = agent::AttachProcessRequest {
            process_id,
            from_offset,
            follow,
        };
        let mut client = self.agents.get(vm_id)?.client();
        let upstream = self
            .open_stream(vm_id, client.attach_process(request))
            .await?;
        let (tx, rx) = outlet(CHANNEL_CAPACITY);
        let relay = self.open_ended_relay(vm_id);
        let this = self.clone();
        let vm_id = vm_id.to_owned();
        tokio::spawn(async move {
            let end = relay
                .run(upstream, tx, |m: agent::AttachProcessResponse| {
                    (m.event, false)
                })
                .await;
            this.relay_ended(&vm_id, "attach", end);
        });
        Ok(rx)
    }

    /// A terminal: `open` goes first, then `input` (keystrokes and resizes).
    #[tracing::instrument(skip_all, fields(vm_id))]
    pub async fn open_terminal(
        self: &Arc<Self>,
        vm_id: &str,
        open: TerminalOpen,
        input: Input<agent::open_terminal_request::Part>,
    ) -> Result<Outflow<Option<TerminalOutput>>, Error> {
        use agent::open_terminal_request::Part;
        let (feed, body) = body(agent::OpenTerminalRequest {
            part: Some(Part::Open(open)),
        });
        let mut client = self.agents.get(vm_id)?.client();
        let call = tokio::spawn(async move { client.open_terminal(body).await });
        let upstream = self.open_bidi(vm_id, call).await?;
        let input = input.map(|part| part.map(|p| agent::OpenTerminalRequest { part: Some(p) }));
        Ok(
            self.bidi(vm_id, "terminal", feed, Box::pin(input), upstream, |m| {
                m.output
            }),
        )
    }

    /// A TCP connection to `port` in the guest: answered once connected; then `input`
    /// goes to the socket and the socket's bytes come back.
    #[tracing::instrument(skip_all, fields(vm_id, port))]
    pub async fn connect_port(
        self: &Arc<Self>,
        vm_id: &str,
        port: u32,
        input: Input<Bytes>,
    ) -> Result<Outflow<Bytes>, Error> {
        use agent::connect_port_request::Part;
        if !(1..=65535).contains(&port) {
            return Err(Error::invalid("port", format!("{port} is not 1 to 65535")));
        }
        let (feed, body) = body(agent::ConnectPortRequest {
            part: Some(Part::Port(port)),
        });
        let mut client = self.agents.get(vm_id)?.client();
        let call = tokio::spawn(async move { client.connect_port(body).await });
        let upstream = self.open_bidi(vm_id, call).await?;
        let input = input.map(|data| {
            data.map(|d| agent::ConnectPortRequest {
                part: Some(Part::Data(d)),
            })
        });
        Ok(self.bidi(vm_id, "port", feed, Box::pin(input), upstream, |m| m.data))
    }

    /// Waits for a streaming agent call to answer, under the time-to-first-event limit.
    async fn open_stream<R>(
        &self,
        vm_id: &str,
        call: impl Future<Output = Result<tonic::Response<tonic::Streaming<R>>, tonic::Status>>,
    ) -> Result<tonic::Streaming<R>, Error> {
        let err = match tokio::time::timeout(self.limits.first_event, call).await {
            Ok(Ok(response)) => return Ok(response.into_inner()),
            Ok(Err(status)) => Error::from_agent(vm_id, &status),
            Err(_) => Error::LimitExceeded {
                vm_id: vm_id.to_owned(),
                limit: Limit::FirstEvent,
                after: self.limits.first_event,
            },
        };
        if err.is_transport() {
            self.agents.recheck(vm_id);
        }
        Err(err)
    }

    /// [`Executor::open_stream`] for a bidi call, which runs in its own task: its future
    /// is not `Send` for every lifetime, as a handler's must be (an upload does the same).
    async fn open_bidi<R: Send + 'static>(
        &self,
        vm_id: &str,
        call: tokio::task::JoinHandle<Result<tonic::Response<tonic::Streaming<R>>, tonic::Status>>,
    ) -> Result<tonic::Streaming<R>, Error> {
        let abort = call.abort_handle();
        let answer = async move {
            call.await.unwrap_or_else(|join| {
                Err(tonic::Status::unknown(format!(
                    "agent call ended abnormally: {join}"
                )))
            })
        };
        let opened = self.open_stream(vm_id, answer).await;
        if opened.is_err() {
            abort.abort();
        }
        opened
    }

    /// A relay without idle or total limits; see the module doc.
    fn open_ended_relay(&self, vm_id: &str) -> Relay {
        Relay {
            vm_id: vm_id.to_owned(),
            idle: None,
            total: None,
            stalled: self.limits.stalled,
            require_final: false,
            gate: None,
            shutdown: self.shutdown.clone(),
        }
    }

    fn relay_ended(&self, vm_id: &str, what: &str, end: RelayEnd) {
        if end == RelayEnd::Failed {
            self.agents.recheck(vm_id);
        }
        tracing::info!(vm_id, what, ?end, "stream relayed");
    }

    /// The bidi relay of terminals and port tunnels, once the agent answered: pumps
    /// `input` into `feed` (the agent's request body) and relays `upstream` back.
    fn bidi<Req, Resp, D>(
        self: &Arc<Self>,
        vm_id: &str,
        what: &'static str,
        feed: mpsc::Sender<Req>,
        mut input: Input<Req>,
        upstream: tonic::Streaming<Resp>,
        convert: fn(Resp) -> D,
    ) -> Outflow<D>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
        D: Send + 'static,
    {
        // The input pump ends cleanly (the agent's body ends) when the client's stream
        // does; a bad message or a broken client stream ends the whole call instead.
        let stop = CancellationToken::new();
        let (abort, aborted) = oneshot::channel::<Error>();
        let pump = {
            let stop = stop.clone();
            async move {
                loop {
                    let next = tokio::select! {
                        () = stop.cancelled() => return,
                        next = input.next() => next,
                    };
                    match next {
                        Some(Ok(message)) => {
                            tokio::select! {
                                () = stop.cancelled() => return,
                                sent = feed.send(message) => if sent.is_err() { return },
                            }
                        }
                        Some(Err(err)) => {
                            let _ = abort.send(err);
                            return;
                        }
                        None => return,
                    }
                }
            }
        };
        tokio::spawn(pump);

        let (tx, rx) = outlet(CHANNEL_CAPACITY);
        let relay = self.open_ended_relay(vm_id);
        let this = self.clone();
        let vm_id = vm_id.to_owned();
        // Resolves only with an error: a pump that ended cleanly dropped its sender.
        let aborted = async move {
            match aborted.await {
                Ok(err) => err,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::spawn(async move {
            let end = relay
                .run_until(upstream, tx, |m| (convert(m), false), aborted)
                .await;
            stop.cancel();
            this.relay_ended(&vm_id, what, end);
        });
        rx
    }
}

/// The agent's request body of a bidi call: `first`, then what the returned sender feeds.
fn body<T: Send + 'static>(first: T) -> (mpsc::Sender<T>, impl Stream<Item = T> + Send + 'static) {
    let (feed, fed) = mpsc::channel(CHANNEL_CAPACITY);
    let body = futures::stream::once(async { first }).chain(ReceiverStream::new(fed));
    (feed, body)
}

fn missing(vm_id: &str, call: &str) -> Error {
    Error::AgentUnavailable {
        vm_id: vm_id.to_owned(),
        message: format!("{call} answered without a process"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<impl std::fmt::Debug, Error>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn wait_timeouts_default_and_are_bounded() {
        assert_eq!(wait_timeout(None).unwrap(), DEFAULT_WAIT_TIMEOUT);
        let d = |s| Some(capsa_proto::time::duration(Duration::from_secs(s)));
        assert_eq!(wait_timeout(d(300)).unwrap(), MAX_WAIT_TIMEOUT);
        assert_eq!(field(wait_timeout(d(301))), "timeout");
        assert_eq!(field(wait_timeout(d(0))), "timeout");
    }

    #[test]
    fn specs_and_data_are_checked() {
        assert_eq!(field(check_spec(None)), "spec");
        assert_eq!(
            field(check_spec(Some(ProcessSpec::default()))),
            "spec.command"
        );
        let spec = |f: fn(&mut ProcessSpec)| {
            let mut s = ProcessSpec {
                command: "sleep".into(),
                ..Default::default()
            };
            f(&mut s);
            Some(s)
        };
        assert!(check_spec(spec(|_| {})).is_ok());
        assert_eq!(
            field(check_spec(spec(|s| {
                s.env.insert("A=B".into(), "1".into());
            }))),
            "spec.env"
        );
        assert_eq!(
            field(check_spec(spec(|s| s.cwd = "/tmp\0".into()))),
            "spec.cwd"
        );
        assert_eq!(field(process_id(String::new())), "process_id");
        assert!(check_data(&vec![0; MAX_STREAM_DATA_BYTES]).is_ok());
        assert_eq!(
            field(check_data(&vec![0; MAX_STREAM_DATA_BYTES + 1])),
            "data"
        );
    }
}
