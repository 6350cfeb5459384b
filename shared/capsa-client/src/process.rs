//! Background processes: the options of a StartProcess, and the events of an AttachProcess
//! as they stream in.
//!
//! A process's stdout and stderr share one offset space (every byte either one received,
//! counted from 0) and the server keeps the newest of it in a bounded ring. An attach asks
//! for everything from an offset: what the ring no longer holds comes as one
//! [`ProcessEvent::Dropped`] first, then the output, then, once the process has exited and
//! all of it was sent, [`ProcessEvent::Exit`]. A client that lost its stream attaches again
//! from the offset after the last byte it received and misses nothing the ring still holds.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use capsa_proto::common::v1 as pb;
use futures::{Stream, StreamExt as _};

use crate::error::{Error, Result};

/// How a background process starts; `Default` means the server's defaults for everything.
#[derive(Debug, Clone, Default)]
pub struct ProcessOptions {
    /// Added to the session's environment for this process.
    pub env: HashMap<String, String>,
    /// Absolute guest directory [default: the agent's working directory].
    pub cwd: Option<String>,
    /// Written to the process's stdin first.
    pub stdin: Bytes,
    /// Keep stdin open after `stdin` for [`Session::write_stdin`](crate::Session::write_stdin);
    /// otherwise the process reads EOF once `stdin` is consumed.
    pub keep_stdin_open: bool,
    /// Size of the ring keeping the newest output for attaches [server default: 1 MiB,
    /// at most 16 MiB].
    pub output_buffer_bytes: Option<u64>,
}

impl ProcessOptions {
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn keep_stdin_open(mut self) -> Self {
        self.keep_stdin_open = true;
        self
    }

    pub fn output_buffer_bytes(mut self, bytes: u64) -> Self {
        self.output_buffer_bytes = Some(bytes);
        self
    }

    pub(crate) fn into_spec(self, command: String, args: Vec<String>) -> pb::ProcessSpec {
        pb::ProcessSpec {
            command,
            args,
            env: self.env,
            cwd: self.cwd.unwrap_or_default(),
            stdin: self.stdin,
            keep_stdin_open: self.keep_stdin_open,
            output_buffer_bytes: self.output_buffer_bytes.unwrap_or(0),
        }
    }
}

/// How a process or terminal ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// The exit code, or -1 when a signal ended it.
    pub exit_code: i32,
    /// The signal that ended it, or 0.
    pub signal: i32,
}

impl ProcessExit {
    /// The status a shell reports for it: the exit code, or 128 + the signal.
    pub fn shell_status(&self) -> u8 {
        if self.signal > 0 {
            (128 + self.signal).clamp(0, 255) as u8
        } else {
            self.exit_code.clamp(0, 255) as u8
        }
    }
}

impl From<pb::ProcessExit> for ProcessExit {
    fn from(e: pb::ProcessExit) -> Self {
        ProcessExit {
            exit_code: e.exit_code,
            signal: e.signal,
        }
    }
}

/// One event of an attach, in the order the process produced its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    /// Bytes the process wrote to stdout, starting at `offset`.
    Stdout { offset: u64, data: Bytes },
    /// Bytes the process wrote to stderr, starting at `offset`.
    Stderr { offset: u64, data: Bytes },
    /// The ring had already dropped `[from_offset, to_offset)` when asked for it.
    Dropped { from_offset: u64, to_offset: u64 },
    /// The last event: the process exited and its output up to the exit was sent.
    Exit(ProcessExit),
}

impl ProcessEvent {
    /// The offset after this event's output, for attaching again where it left off.
    pub fn end_offset(&self) -> Option<u64> {
        match self {
            ProcessEvent::Stdout { offset, data } | ProcessEvent::Stderr { offset, data } => {
                Some(offset + data.len() as u64)
            }
            ProcessEvent::Dropped { to_offset, .. } => Some(*to_offset),
            ProcessEvent::Exit(_) => None,
        }
    }
}

fn event(e: pb::process_event::Event) -> Result<ProcessEvent> {
    use pb::process_event::Event as E;
    Ok(match e {
        E::Output(chunk) => match chunk.stream() {
            pb::OutputStream::Stdout => ProcessEvent::Stdout {
                offset: chunk.offset,
                data: chunk.data,
            },
            pb::OutputStream::Stderr => ProcessEvent::Stderr {
                offset: chunk.offset,
                data: chunk.data,
            },
            pb::OutputStream::Unspecified => {
                return Err(Error::Protocol(format!(
                    "process output at offset {} names no stream",
                    chunk.offset
                )));
            }
        },
        E::Dropped(d) => ProcessEvent::Dropped {
            from_offset: d.from_offset,
            to_offset: d.to_offset,
        },
        E::Exit(e) => ProcessEvent::Exit(e.into()),
    })
}

/// The events of one attach as they arrive; a `Stream` of `Result<ProcessEvent>`. It ends
/// after [`ProcessEvent::Exit`], or once caught up when the attach does not follow; an
/// error ends it too. Dropping it cancels the attach, never the process.
pub struct AttachStream {
    inner: Pin<Box<dyn Stream<Item = Result<ProcessEvent>> + Send>>,
}

impl std::fmt::Debug for AttachStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachStream").finish_non_exhaustive()
    }
}

impl AttachStream {
    pub(crate) fn new(
        responses: impl Stream<
            Item = Result<capsa_proto::session::v1::AttachProcessResponse, tonic::Status>,
        > + Send
        + 'static,
    ) -> Self {
        let events = responses.filter_map(|item| async move {
            match item {
                // A response without an event carries nothing to show.
                Ok(r) => r.event.and_then(|e| e.event).map(event),
                Err(status) => Some(Err(Error::from(status))),
            }
        });
        AttachStream {
            inner: Box::pin(events),
        }
    }
}

impl Stream for AttachStream {
    type Item = Result<ProcessEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_proto::session::v1::AttachProcessResponse;

    fn response(e: pb::process_event::Event) -> Result<AttachProcessResponse, tonic::Status> {
        Ok(AttachProcessResponse {
            event: Some(pb::ProcessEvent { event: Some(e) }),
        })
    }

    fn output(
        stream: pb::OutputStream,
        offset: u64,
        data: &'static [u8],
    ) -> pb::process_event::Event {
        pb::process_event::Event::Output(pb::ProcessOutputChunk {
            stream: stream as i32,
            offset,
            data: Bytes::from_static(data),
        })
    }

    #[tokio::test]
    async fn attach_events_are_typed_in_order_with_their_offsets() {
        use pb::process_event::Event as E;
        let responses = vec![
            response(E::Dropped(pb::OutputDropped {
                from_offset: 0,
                to_offset: 10,
            })),
            response(output(pb::OutputStream::Stdout, 10, b"out\n")),
            Ok(AttachProcessResponse { event: None }),
            response(output(pb::OutputStream::Stderr, 14, b"err\n")),
            response(E::Exit(pb::ProcessExit {
                exit_code: -1,
                signal: 15,
            })),
        ];
        let events: Vec<ProcessEvent> = AttachStream::new(futures::stream::iter(responses))
            .map(|e| e.unwrap())
            .collect()
            .await;
        assert_eq!(events.len(), 4, "the empty response is skipped");
        assert_eq!(
            events[0],
            ProcessEvent::Dropped {
                from_offset: 0,
                to_offset: 10
            }
        );
        assert_eq!(
            events[1],
            ProcessEvent::Stdout {
                offset: 10,
                data: Bytes::from_static(b"out\n")
            }
        );
        let ends: Vec<Option<u64>> = events.iter().map(ProcessEvent::end_offset).collect();
        assert_eq!(ends, [Some(10), Some(14), Some(18), None]);
        let ProcessEvent::Exit(exit) = events[3] else {
            panic!("{:?}", events[3])
        };
        assert_eq!(exit.shell_status(), 143);
    }

    #[tokio::test]
    async fn output_without_a_stream_and_a_broken_stream_are_errors() {
        let responses = vec![
            response(output(pb::OutputStream::Unspecified, 3, b"?")),
            Err(tonic::Status::not_found("process p-9 not found")),
        ];
        let events: Vec<Result<ProcessEvent>> = AttachStream::new(futures::stream::iter(responses))
            .collect()
            .await;
        assert!(
            matches!(events[0], Err(Error::Protocol(ref m)) if m.contains("offset 3")),
            "{events:?}"
        );
        assert!(matches!(events[1], Err(Error::NotFound(_))), "{events:?}");
    }

    #[test]
    fn shell_status_is_the_code_or_128_plus_the_signal() {
        let exit = |exit_code, signal| ProcessExit { exit_code, signal };
        assert_eq!(exit(0, 0).shell_status(), 0);
        assert_eq!(exit(3, 0).shell_status(), 3);
        assert_eq!(exit(-1, 9).shell_status(), 137);
        assert_eq!(exit(300, 0).shell_status(), 255);
    }

    #[test]
    fn options_make_the_spec() {
        let spec = ProcessOptions::default()
            .env("A", "1")
            .cwd("/srv")
            .keep_stdin_open()
            .output_buffer_bytes(4096)
            .into_spec("python3".into(), vec!["-m".into(), "http.server".into()]);
        assert_eq!(spec.command, "python3");
        assert_eq!(spec.args, ["-m", "http.server"]);
        assert_eq!(spec.env["A"], "1");
        assert_eq!(spec.cwd, "/srv");
        assert!(spec.keep_stdin_open);
        assert_eq!(spec.output_buffer_bytes, 4096);
        let spec = ProcessOptions::default().into_spec("sleep".into(), vec![]);
        assert_eq!((spec.cwd.as_str(), spec.output_buffer_bytes), ("", 0));
    }
}
