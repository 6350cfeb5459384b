//! Execute: the options of a call, its events as they stream in, and their sum.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use capsa_proto::common::v1 as pb;
use futures::{Stream, StreamExt as _};

use crate::error::{Error, Result};

/// The interpreter the code runs in; each has one persistent kernel per session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Language {
    #[default]
    Python,
    Shell,
}

/// Options of one execute; `Default` means Python with the server's defaults.
#[derive(Debug, Clone, Default)]
pub struct ExecuteOptions {
    pub language: Language,
    /// Measured in the sandbox, 1 ms to 1 h [server default: 60 s].
    pub timeout: Option<Duration>,
    /// Extra environment for this call only.
    pub env: HashMap<String, String>,
    /// Working directory for this call only.
    pub cwd: Option<String>,
    /// Output cap (stdout, stderr, results and display data together) [server default: 32 MiB].
    pub max_output_bytes: Option<u64>,
}

impl ExecuteOptions {
    /// Shell instead of Python.
    pub fn shell() -> Self {
        ExecuteOptions {
            language: Language::Shell,
            ..Default::default()
        }
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub(crate) fn into_request(
        self,
        session_id: String,
        code: String,
    ) -> capsa_proto::session::v1::ExecuteRequest {
        capsa_proto::session::v1::ExecuteRequest {
            session_id,
            language: match self.language {
                Language::Python => pb::Language::Python,
                Language::Shell => pb::Language::Shell,
            } as i32,
            code,
            timeout: self.timeout.map(capsa_proto::time::duration),
            env: self.env,
            cwd: self.cwd.unwrap_or_default(),
            max_output_bytes: self.max_output_bytes.unwrap_or(0),
        }
    }
}

/// Rich data keyed by MIME type (`text/plain`, `image/png`, ...).
pub type MimeBundle = HashMap<String, Bytes>;

/// One event of an execute, in the order the sandbox produced it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Raw bytes as the program wrote them (not split into lines, not decoded).
    Stdout(Bytes),
    Stderr(Bytes),
    /// The value of a trailing expression (`text/plain` always present).
    Result(MimeBundle),
    /// Rich output, e.g. a matplotlib figure as `image/png`.
    Display(MimeBundle),
    /// An uncaught exception (Python).
    Error(ExecError),
    /// Always the last event.
    Completion(Completion),
}

/// An uncaught exception with its traceback lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecError {
    pub name: String,
    pub value: String,
    pub traceback: Vec<String>,
}

/// How an execute ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Status {
    /// Ran to the end (shell: see `exit_code`).
    Ok,
    /// Raised an exception (Python) or exited non-zero (shell).
    Error,
    /// Stopped by the timeout.
    Timeout,
    /// Stopped because the client went away or asked to stop.
    Interrupted,
    /// The kernel died; its state is lost.
    KernelDied,
    /// A status this client does not know.
    #[default]
    Unknown,
}

impl Status {
    /// `OK`, `ERROR`, `TIMEOUT`, `INTERRUPTED`, `KERNEL_DIED` or `UNSPECIFIED`, as the
    /// contract spells them.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Error => "ERROR",
            Status::Timeout => "TIMEOUT",
            Status::Interrupted => "INTERRUPTED",
            Status::KernelDied => "KERNEL_DIED",
            Status::Unknown => "UNSPECIFIED",
        }
    }
}

/// The last event of every execute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completion {
    pub status: Status,
    /// Shell: the code's exit status. Python: 0, or 1 after an exception.
    pub exit_code: i32,
    /// Wall time in the sandbox.
    pub wall_time: Option<Duration>,
    /// CPU time of the kernel and its children.
    pub cpu_time: Option<Duration>,
    /// Time inside the interpreter running the code.
    pub interpreter_time: Option<Duration>,
    /// The kernel was restarted: variables and imports are gone.
    pub state_lost: bool,
    /// Output passed the cap and the rest was dropped.
    pub output_truncated: bool,
    /// Output produced, including any dropped past the cap.
    pub output_bytes: u64,
    /// Detail for timeouts, interruptions and kernel deaths.
    pub message: String,
}

fn duration(d: Option<prost_types::Duration>) -> Option<Duration> {
    d.as_ref().and_then(capsa_proto::time::from_duration)
}

impl From<pb::Completion> for Completion {
    fn from(c: pb::Completion) -> Self {
        Completion {
            status: match c.status() {
                pb::CompletionStatus::Ok => Status::Ok,
                pb::CompletionStatus::Error => Status::Error,
                pb::CompletionStatus::Timeout => Status::Timeout,
                pb::CompletionStatus::Interrupted => Status::Interrupted,
                pb::CompletionStatus::KernelDied => Status::KernelDied,
                pb::CompletionStatus::Unspecified => Status::Unknown,
            },
            exit_code: c.exit_code,
            wall_time: duration(c.wall_time),
            cpu_time: duration(c.cpu_time),
            interpreter_time: duration(c.interpreter_time),
            state_lost: c.state_lost,
            output_truncated: c.output_truncated,
            output_bytes: c.output_bytes,
            message: c.message,
        }
    }
}

impl From<pb::execute_event::Event> for Event {
    fn from(e: pb::execute_event::Event) -> Self {
        use pb::execute_event::Event as E;
        match e {
            E::Stdout(c) => Event::Stdout(c.data),
            E::Stderr(c) => Event::Stderr(c.data),
            E::Result(r) => Event::Result(r.data),
            E::Display(d) => Event::Display(d.data),
            E::Error(e) => Event::Error(ExecError {
                name: e.name,
                value: e.value,
                traceback: e.traceback,
            }),
            E::Completion(c) => Event::Completion(c.into()),
        }
    }
}

/// The events of one execute as they arrive; a `Stream` of `Result<Event>`. The last
/// event is a [`Completion`]; an error ends the stream (output before it was delivered).
/// Dropping the stream early cancels the call, which interrupts the code.
pub struct ExecuteStream {
    inner: Pin<Box<dyn Stream<Item = Result<Event>> + Send>>,
}

impl std::fmt::Debug for ExecuteStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecuteStream").finish_non_exhaustive()
    }
}

impl ExecuteStream {
    pub(crate) fn new(
        responses: impl Stream<Item = Result<capsa_proto::session::v1::ExecuteResponse, tonic::Status>>
        + Send
        + 'static,
    ) -> Self {
        let events = responses.filter_map(|item| async move {
            match item {
                // A response without an event carries nothing to show.
                Ok(r) => r.event.and_then(|e| e.event).map(|e| Ok(Event::from(e))),
                Err(status) => Some(Err(Error::from(status))),
            }
        });
        ExecuteStream {
            inner: Box::pin(events),
        }
    }

    /// Reads the stream to its end and sums it up.
    pub async fn collect_output(mut self) -> Result<ExecuteOutput> {
        let mut acc = Accumulator::default();
        while let Some(event) = self.next().await {
            acc.push(event?);
        }
        acc.finish()
    }
}

impl Stream for ExecuteStream {
    type Item = Result<Event>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Everything one execute produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecuteOutput {
    /// Stdout, decoded as UTF-8 once whole (invalid sequences replaced).
    pub stdout: String,
    pub stderr: String,
    /// The value of a trailing expression, if there was one.
    pub result: Option<MimeBundle>,
    pub displays: Vec<MimeBundle>,
    /// The uncaught exception, if there was one.
    pub error: Option<ExecError>,
    pub status: Status,
    pub exit_code: i32,
    pub wall_time: Option<Duration>,
    pub cpu_time: Option<Duration>,
    /// The whole completion, with the fields above and the rest.
    pub completion: Completion,
}

impl ExecuteOutput {
    /// The code ran to its end without error.
    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }

    /// The `text/plain` of the result, e.g. `42` after `x * 2`.
    pub fn result_text(&self) -> Option<String> {
        self.result
            .as_ref()
            .and_then(|r| r.get("text/plain"))
            .map(|t| String::from_utf8_lossy(t).into_owned())
    }
}

#[derive(Default)]
struct Accumulator {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    result: Option<MimeBundle>,
    displays: Vec<MimeBundle>,
    error: Option<ExecError>,
    completion: Option<Completion>,
}

impl Accumulator {
    fn push(&mut self, event: Event) {
        match event {
            Event::Stdout(b) => self.stdout.extend_from_slice(&b),
            Event::Stderr(b) => self.stderr.extend_from_slice(&b),
            Event::Result(r) => self.result = Some(r),
            Event::Display(d) => self.displays.push(d),
            Event::Error(e) => self.error = Some(e),
            Event::Completion(c) => self.completion = Some(c),
        }
    }

    fn finish(self) -> Result<ExecuteOutput> {
        let completion = self.completion.ok_or_else(|| {
            Error::Protocol("the execute stream ended without a completion".into())
        })?;
        Ok(ExecuteOutput {
            stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
            result: self.result,
            displays: self.displays,
            error: self.error,
            status: completion.status,
            exit_code: completion.exit_code,
            wall_time: completion.wall_time,
            cpu_time: completion.cpu_time,
            completion,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_proto::session::v1::ExecuteResponse;

    fn response(e: pb::execute_event::Event) -> Result<ExecuteResponse, tonic::Status> {
        Ok(ExecuteResponse {
            event: Some(pb::ExecuteEvent { event: Some(e) }),
        })
    }

    fn chunk(s: &[u8]) -> pb::OutputChunk {
        pb::OutputChunk {
            data: Bytes::copy_from_slice(s),
        }
    }

    #[tokio::test]
    async fn events_are_typed_in_order_and_collected() {
        use pb::execute_event::Event as E;
        let euro = "€".as_bytes();
        let responses = vec![
            response(E::Stdout(chunk(&euro[..1]))),
            response(E::Stdout(chunk(&euro[1..]))),
            Ok(ExecuteResponse { event: None }),
            response(E::Stderr(chunk(b"warn\n"))),
            response(E::Result(pb::ExecuteResult {
                data: [("text/plain".to_string(), Bytes::from("42"))].into(),
            })),
            response(E::Completion(pb::Completion {
                status: pb::CompletionStatus::Ok as i32,
                wall_time: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 5_000_000,
                }),
                ..Default::default()
            })),
        ];
        let events: Vec<Event> = ExecuteStream::new(futures::stream::iter(responses.clone()))
            .map(|e| e.unwrap())
            .collect()
            .await;
        assert_eq!(events.len(), 5, "the empty response is skipped");
        assert_eq!(events[0], Event::Stdout(Bytes::copy_from_slice(&euro[..1])));
        assert!(matches!(events[4], Event::Completion(ref c) if c.status == Status::Ok));

        let out = ExecuteStream::new(futures::stream::iter(responses))
            .collect_output()
            .await
            .unwrap();
        // A character split across chunks is whole in the sum.
        assert_eq!(out.stdout, "€");
        assert_eq!(out.stderr, "warn\n");
        assert_eq!(out.result_text().as_deref(), Some("42"));
        assert!(out.is_ok());
        assert_eq!(out.wall_time, Some(Duration::from_millis(1005)));
        assert_eq!(out.cpu_time, None);
    }

    #[tokio::test]
    async fn a_broken_stream_or_a_missing_completion_is_an_error() {
        use pb::execute_event::Event as E;
        let broken = vec![
            response(E::Stdout(chunk(b"partial"))),
            Err(tonic::Status::unavailable("vm gone")),
        ];
        let mut stream = ExecuteStream::new(futures::stream::iter(broken.clone()));
        assert!(matches!(stream.next().await, Some(Ok(Event::Stdout(_)))));
        assert!(matches!(
            stream.next().await,
            Some(Err(Error::Unavailable(ref m))) if m == "vm gone"
        ));
        let err = ExecuteStream::new(futures::stream::iter(broken))
            .collect_output()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err}");

        let short = vec![response(E::Stdout(chunk(b"x")))];
        let err = ExecuteStream::new(futures::stream::iter(short))
            .collect_output()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{err}");
    }
}
