//! Running code through the public API and gathering what comes back, for assertions.

use capsa_proto::common::v1::{
    Completion, CompletionStatus, ExecuteError, Language, execute_event::Event,
};
use capsa_proto::session::v1::ExecuteRequest;

use crate::Client;

/// Everything one Execute stream carried, in order.
#[derive(Debug, Default)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// `text/plain` of each trailing-expression result.
    pub results: Vec<String>,
    pub errors: Vec<ExecuteError>,
    /// MIME types of display data, with their bytes.
    pub displays: Vec<(String, Vec<u8>)>,
    pub completion: Option<Completion>,
    /// Kinds of the events in arrival order ("stdout", "stderr", "result", ...).
    pub order: Vec<&'static str>,
}

impl Outcome {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn status(&self) -> CompletionStatus {
        self.completion
            .as_ref()
            .expect("stream ended without a completion")
            .status()
    }
    pub fn completion(&self) -> &Completion {
        self.completion
            .as_ref()
            .expect("stream ended without a completion")
    }
}

/// A request for `code` in `language` with `timeout_ms` (0: server default).
pub fn request(
    session_id: &str,
    language: Language,
    code: &str,
    timeout_ms: u64,
) -> ExecuteRequest {
    ExecuteRequest {
        session_id: session_id.to_string(),
        language: language as i32,
        code: code.to_string(),
        timeout: (timeout_ms > 0)
            .then(|| capsa_proto::time::duration(std::time::Duration::from_millis(timeout_ms))),
        ..Default::default()
    }
}

/// Runs `req` and gathers the whole stream; panics on a transport or status error.
pub async fn run(client: &mut Client, req: ExecuteRequest) -> Outcome {
    try_run(client, req).await.expect("execute")
}

/// Runs `req` and gathers the whole stream, or returns the status it failed with.
pub async fn try_run(client: &mut Client, req: ExecuteRequest) -> Result<Outcome, tonic::Status> {
    let mut stream = client.execute(req).await?.into_inner();
    let mut out = Outcome::default();
    while let Some(msg) = stream.message().await? {
        let Some(event) = msg.event.and_then(|e| e.event) else {
            continue;
        };
        match event {
            Event::Stdout(c) => {
                out.order.push("stdout");
                out.stdout.extend_from_slice(&c.data);
            }
            Event::Stderr(c) => {
                out.order.push("stderr");
                out.stderr.extend_from_slice(&c.data);
            }
            Event::Result(r) => {
                out.order.push("result");
                let text = r
                    .data
                    .get("text/plain")
                    .map(|b| String::from_utf8_lossy(b).into_owned());
                out.results.push(text.unwrap_or_default());
            }
            Event::Error(e) => {
                out.order.push("error");
                out.errors.push(e);
            }
            Event::Display(d) => {
                out.order.push("display");
                for (mime, bytes) in d.data {
                    out.displays.push((mime, bytes.to_vec()));
                }
            }
            Event::Completion(c) => {
                out.order.push("completion");
                out.completion = Some(c);
            }
        }
    }
    Ok(out)
}

/// Python shorthand for [`run`].
pub async fn python(client: &mut Client, session_id: &str, code: &str) -> Outcome {
    run(client, request(session_id, Language::Python, code, 0)).await
}

/// Shell shorthand for [`run`].
pub async fn shell(client: &mut Client, session_id: &str, code: &str) -> Outcome {
    run(client, request(session_id, Language::Shell, code, 0)).await
}
