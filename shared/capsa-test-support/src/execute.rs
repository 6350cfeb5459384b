//! Reading an Execute stream to its end, for assertions. The guest agent, the executor and
//! the public API all stream the same `ExecuteEvent`s, each in its own response message;
//! [`collect`] reads any of them into one [`Outcome`] and checks the stream's contract:
//! every message carries an event, and the completion comes once, last.

use capsa_proto::common::v1::execute_event::Event;
use capsa_proto::common::v1::{
    Completion, CompletionStatus, DisplayData, ExecuteError, ExecuteEvent,
};

/// A response message of an Execute stream.
pub trait ExecuteMessage {
    fn into_event(self) -> Option<ExecuteEvent>;
}

impl ExecuteMessage for capsa_proto::agent::v1::ExecuteResponse {
    fn into_event(self) -> Option<ExecuteEvent> {
        self.event
    }
}

impl ExecuteMessage for capsa_proto::executor::v1::ExecuteResponse {
    fn into_event(self) -> Option<ExecuteEvent> {
        self.event
    }
}

impl ExecuteMessage for capsa_proto::session::v1::ExecuteResponse {
    fn into_event(self) -> Option<ExecuteEvent> {
        self.event
    }
}

/// Everything one Execute stream carried, in order, and how it ended.
#[derive(Debug, Default)]
pub struct Outcome {
    pub events: Vec<Event>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// `text/plain` of each trailing-expression result.
    pub results: Vec<String>,
    pub errors: Vec<ExecuteError>,
    pub displays: Vec<DisplayData>,
    pub completion: Option<Completion>,
    /// The status the stream failed with, if it did not end cleanly.
    pub error: Option<tonic::Status>,
}

impl Outcome {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// `text/plain` of the first result.
    pub fn result_text(&self) -> Option<String> {
        self.results.first().cloned()
    }

    /// The completion; panics (showing the whole outcome) if the stream had none.
    pub fn completion(&self) -> &Completion {
        self.completion
            .as_ref()
            .unwrap_or_else(|| panic!("the stream ended without a completion: {self:?}"))
    }

    pub fn status(&self) -> CompletionStatus {
        self.completion().status()
    }
}

/// Reads `stream` to its end (or its error, kept in [`Outcome::error`]).
pub async fn collect<M: ExecuteMessage>(mut stream: tonic::Streaming<M>) -> Outcome {
    let mut out = Outcome::default();
    loop {
        let msg = match stream.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return out,
            Err(status) => {
                out.error = Some(status);
                return out;
            }
        };
        let Some(event) = msg.into_event().and_then(|e| e.event) else {
            panic!("a message without an event after {:?}", out.events);
        };
        assert!(
            out.completion.is_none(),
            "event after the completion: {event:?}"
        );
        match &event {
            Event::Stdout(c) => out.stdout.extend_from_slice(&c.data),
            Event::Stderr(c) => out.stderr.extend_from_slice(&c.data),
            Event::Result(r) => out.results.push(
                r.data
                    .get("text/plain")
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            ),
            Event::Error(e) => out.errors.push(e.clone()),
            Event::Display(d) => out.displays.push(d.clone()),
            Event::Completion(c) => out.completion = Some(c.clone()),
        }
        out.events.push(event);
    }
}
