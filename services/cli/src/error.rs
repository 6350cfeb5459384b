//! The CLI's failures and their exit codes: 2 for usage errors (bad arguments, nothing
//! configured, unreadable local files), 1 for API errors, printed as
//! `capsa: <STATUS_CODE>: <message>`, and for local or connection failures.

use std::process::ExitCode;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    /// From the client: API errors print as `CODE: message`.
    #[error(transparent)]
    Client(#[from] capsa_client::Error),
    #[error("{0}")]
    Local(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) | CliError::Client(capsa_client::Error::Config(_)) => {
                ExitCode::from(2)
            }
            CliError::Client(_) | CliError::Local(_) => ExitCode::from(1),
        }
    }
}

pub(crate) fn local(e: std::io::Error) -> CliError {
    CliError::Local(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_print_the_canonical_code_and_config_errors_are_usage_errors() {
        let status = tonic::Status::not_found("session s-1 not found");
        let e = CliError::from(capsa_client::Error::from(status));
        assert_eq!(e.to_string(), "NOT_FOUND: session s-1 not found");
        assert_eq!(e.exit_code(), ExitCode::from(1));
        assert_eq!(CliError::Usage("x".into()).exit_code(), ExitCode::from(2));
        let e = CliError::from(capsa_client::Error::Config("no endpoint".into()));
        assert_eq!(e.exit_code(), ExitCode::from(2));
    }
}
