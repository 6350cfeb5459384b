//! Interactive terminals: a PTY in the guest, keystrokes and resizes in, screen bytes out.
//!
//! The call is one bidirectional stream. The first request opens the terminal and the
//! first response says it runs ([`Terminal::info`]); then [`TerminalInput`] sends
//! keystrokes (raw bytes: `0x03` is Ctrl-C, which the guest's line discipline turns into
//! SIGINT for the foreground job) and resizes, and [`TerminalOutput`] yields the screen
//! bytes until the program exits. Dropping the input (every clone of it) ends the request
//! stream, which hangs the terminal up (SIGHUP, then SIGKILL after 2 s).

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use capsa_proto::common::v1 as common;
use capsa_proto::limits::MAX_STREAM_DATA_BYTES;
use capsa_proto::session::v1 as pb;
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::RawClient;
use crate::error::{Error, Result};
use crate::process::ProcessExit;

/// Requests queued ahead of the call: keystrokes are small, and a full queue makes
/// [`TerminalInput::write`] wait, which is the backpressure.
const INPUT_QUEUE: usize = 16;

/// What a terminal runs and how it starts.
#[derive(Debug, Clone)]
pub struct TerminalOptions {
    /// The program [default: bash as a login shell].
    pub command: Option<String>,
    pub args: Vec<String>,
    /// Added to the session's environment.
    pub env: HashMap<String, String>,
    /// Absolute guest directory [default: the agent's working directory].
    pub cwd: Option<String>,
    /// Rows and columns, 1 to 1000 each.
    pub rows: u32,
    pub cols: u32,
    /// TERM in the guest [default: xterm-256color].
    pub term: Option<String>,
}

impl Default for TerminalOptions {
    /// bash, 24 rows by 80 columns.
    fn default() -> Self {
        TerminalOptions {
            command: None,
            args: Vec::new(),
            env: HashMap::new(),
            cwd: None,
            rows: 24,
            cols: 80,
            term: None,
        }
    }
}

impl TerminalOptions {
    /// Runs `command` with `args` instead of bash.
    pub fn command(mut self, command: impl Into<String>, args: Vec<String>) -> Self {
        self.command = Some(command.into());
        self.args = args;
        self
    }

    pub fn size(mut self, rows: u32, cols: u32) -> Self {
        self.rows = rows;
        self.cols = cols;
        self
    }

    fn into_request(self, session_id: String) -> pb::OpenTerminalRequest {
        pb::OpenTerminalRequest {
            part: Some(pb::open_terminal_request::Part::Open(
                pb::OpenTerminalHeader {
                    session_id,
                    terminal: Some(common::TerminalOpen {
                        command: self.command.unwrap_or_default(),
                        args: self.args,
                        env: self.env,
                        cwd: self.cwd.unwrap_or_default(),
                        size: Some(common::TerminalSize {
                            rows: self.rows,
                            cols: self.cols,
                        }),
                        term: self.term.unwrap_or_default(),
                    }),
                },
            )),
        }
    }
}

/// A running terminal: its record, its input and its output.
#[derive(Debug)]
pub struct Terminal {
    /// The terminal as the guest agent started it (its id is `t-<n>`).
    pub info: common::ProcessInfo,
    pub input: TerminalInput,
    pub output: TerminalOutput,
}

impl Terminal {
    pub(crate) async fn open(
        mut raw: RawClient,
        session_id: String,
        options: TerminalOptions,
    ) -> Result<Terminal> {
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        tx.send(options.into_request(session_id))
            .await
            .map_err(|_| Error::Ended("the terminal call".into()))?;
        let mut stream = raw
            .open_terminal(ReceiverStream::new(rx))
            .await?
            .into_inner();
        use common::terminal_output::Part;
        let info = match stream.message().await?.and_then(|m| m.output?.part) {
            Some(Part::Opened(info)) => info,
            _ => {
                return Err(Error::Protocol(
                    "the terminal did not start with its record".into(),
                ));
            }
        };
        Ok(Terminal {
            info,
            input: TerminalInput { tx },
            output: TerminalOutput::new(stream),
        })
    }
}

/// Sends keystrokes and resizes; clones share the stream. Dropping every clone hangs the
/// terminal up.
#[derive(Debug, Clone)]
pub struct TerminalInput {
    tx: mpsc::Sender<pb::OpenTerminalRequest>,
}

impl TerminalInput {
    /// Sends `data` as typed (split into messages of at most 1 MiB). Fails with
    /// [`Error::Ended`] once the call has ended; the output says how.
    pub async fn write(&self, data: impl Into<Bytes>) -> Result<()> {
        let mut data: Bytes = data.into();
        while !data.is_empty() {
            let part = data.split_to(data.len().min(MAX_STREAM_DATA_BYTES));
            self.send(pb::open_terminal_request::Part::Data(part))
                .await?;
        }
        Ok(())
    }

    /// Tells the guest the terminal is now `rows` by `cols` (1 to 1000 each); the program
    /// gets SIGWINCH.
    pub async fn resize(&self, rows: u32, cols: u32) -> Result<()> {
        self.send(pb::open_terminal_request::Part::Resize(
            common::TerminalSize { rows, cols },
        ))
        .await
    }

    async fn send(&self, part: pb::open_terminal_request::Part) -> Result<()> {
        self.tx
            .send(pb::OpenTerminalRequest { part: Some(part) })
            .await
            .map_err(|_| Error::Ended("the terminal".into()))
    }
}

/// What the terminal shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalEvent {
    /// Screen bytes as the PTY wrote them (escape sequences included).
    Data(Bytes),
    /// The last event: the program ended.
    Exit(ProcessExit),
}

/// The screen bytes as they arrive; a `Stream` of `Result<TerminalEvent>` that ends after
/// [`TerminalEvent::Exit`] (or with an error).
pub struct TerminalOutput {
    inner: Pin<Box<dyn Stream<Item = Result<TerminalEvent>> + Send>>,
}

impl std::fmt::Debug for TerminalOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminalOutput").finish_non_exhaustive()
    }
}

impl TerminalOutput {
    fn new(
        responses: impl Stream<Item = Result<pb::OpenTerminalResponse, tonic::Status>> + Send + 'static,
    ) -> Self {
        use common::terminal_output::Part;
        let events = responses.filter_map(|item| async move {
            match item {
                Ok(r) => match r.output.and_then(|o| o.part) {
                    Some(Part::Data(data)) => Some(Ok(TerminalEvent::Data(data))),
                    Some(Part::Exit(exit)) => Some(Ok(TerminalEvent::Exit(exit.into()))),
                    Some(Part::Opened(_)) => Some(Err(Error::Protocol(
                        "the terminal said it opened a second time".into(),
                    ))),
                    None => None,
                },
                Err(status) => Some(Err(Error::from(status))),
            }
        });
        TerminalOutput {
            inner: Box::pin(events),
        }
    }
}

impl Stream for TerminalOutput {
    type Item = Result<TerminalEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(
        part: common::terminal_output::Part,
    ) -> Result<pb::OpenTerminalResponse, tonic::Status> {
        Ok(pb::OpenTerminalResponse {
            output: Some(common::TerminalOutput { part: Some(part) }),
        })
    }

    #[tokio::test]
    async fn screen_bytes_then_the_exit() {
        use common::terminal_output::Part;
        let responses = vec![
            output(Part::Data(Bytes::from_static(b"$ "))),
            Ok(pb::OpenTerminalResponse { output: None }),
            output(Part::Exit(common::ProcessExit {
                exit_code: 2,
                signal: 0,
            })),
            output(Part::Opened(common::ProcessInfo::default())),
        ];
        let events: Vec<Result<TerminalEvent>> =
            TerminalOutput::new(futures::stream::iter(responses))
                .collect()
                .await;
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(
            events[0].as_ref().unwrap(),
            &TerminalEvent::Data(Bytes::from_static(b"$ "))
        );
        assert_eq!(
            events[1].as_ref().unwrap(),
            &TerminalEvent::Exit(ProcessExit {
                exit_code: 2,
                signal: 0
            })
        );
        assert!(matches!(events[2], Err(Error::Protocol(_))));
    }

    #[tokio::test]
    async fn input_is_split_into_messages_and_fails_once_the_call_ended() {
        let (tx, mut rx) = mpsc::channel(8);
        let input = TerminalInput { tx };
        let data = vec![b'x'; MAX_STREAM_DATA_BYTES + 10];
        input.write(data).await.unwrap();
        input.resize(40, 120).await.unwrap();
        use pb::open_terminal_request::Part;
        let mut sizes = Vec::new();
        for _ in 0..3 {
            match rx.recv().await.unwrap().part.unwrap() {
                Part::Data(d) => sizes.push(d.len()),
                Part::Resize(s) => assert_eq!((s.rows, s.cols), (40, 120)),
                Part::Open(_) => panic!("a second open"),
            }
        }
        assert_eq!(sizes, [MAX_STREAM_DATA_BYTES, 10]);
        drop(rx);
        assert!(matches!(input.write("ls\r").await, Err(Error::Ended(_))));
    }

    #[test]
    fn the_open_request_carries_the_options() {
        let options = TerminalOptions::default()
            .command("python3", vec!["-q".into()])
            .size(40, 120);
        let Some(pb::open_terminal_request::Part::Open(open)) =
            options.into_request("s-1".into()).part
        else {
            panic!("not an open")
        };
        assert_eq!(open.session_id, "s-1");
        let t = open.terminal.unwrap();
        assert_eq!(
            (t.command.as_str(), t.args.as_slice()),
            ("python3", &["-q".to_string()][..])
        );
        assert_eq!(
            t.size,
            Some(common::TerminalSize {
                rows: 40,
                cols: 120
            })
        );
        assert_eq!(t.term, "");
    }
}
