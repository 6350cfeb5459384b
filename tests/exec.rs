//! Running code through the public API and gathering what comes back, for assertions.

use capsa_proto::common::v1::Language;
use capsa_proto::session::v1::ExecuteRequest;

use crate::Client;

pub use capsa_test_support::execute::Outcome;

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
    let stream = client.execute(req).await?.into_inner();
    let mut out = capsa_test_support::execute::collect(stream).await;
    match out.error.take() {
        Some(status) => Err(status),
        None => Ok(out),
    }
}

/// Python shorthand for [`run`].
pub async fn python(client: &mut Client, session_id: &str, code: &str) -> Outcome {
    run(client, request(session_id, Language::Python, code, 0)).await
}

/// Shell shorthand for [`run`].
pub async fn shell(client: &mut Client, session_id: &str, code: &str) -> Outcome {
    run(client, request(session_id, Language::Shell, code, 0)).await
}

/// Runs Python `code` and returns its stdout; panics, showing all it printed, if it raised.
pub async fn python_stdout(client: &mut Client, session_id: &str, code: &str) -> String {
    let out = python(client, session_id, code).await;
    assert!(
        out.errors.is_empty(),
        "{code}\n--- stdout\n{}\n--- stderr\n{}\n--- errors\n{:?}",
        out.stdout_text(),
        out.stderr_text(),
        out.errors
    );
    out.stdout_text()
}

/// Runs shell `code` (up to 10 minutes: a pip install under TCG) and returns its stdout;
/// panics, showing all it printed, if it exited non-zero.
pub async fn shell_stdout(client: &mut Client, session_id: &str, code: &str) -> String {
    let out = run(client, request(session_id, Language::Shell, code, 600_000)).await;
    assert_eq!(
        out.completion().exit_code,
        0,
        "{code}\n--- stdout\n{}\n--- stderr\n{}",
        out.stdout_text(),
        out.stderr_text()
    );
    out.stdout_text()
}
