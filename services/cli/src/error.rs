//! The CLI's failures and their exit codes: 2 for usage errors (bad arguments, nothing
//! configured, unreadable local files), 1 for API errors, printed as
//! `capsa: <STATUS_CODE>: <message>`.

use std::process::ExitCode;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Api(tonic::Status),
    #[error("cannot connect to {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    #[error("{0}")]
    Local(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            CliError::Api(_) | CliError::Connect { .. } | CliError::Local(_) => ExitCode::from(1),
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        CliError::Api(status)
    }
}

/// The canonical gRPC name of a status code, as the docs and other tools print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_print_the_canonical_code() {
        let e = CliError::Api(tonic::Status::not_found("session s-1 not found"));
        assert_eq!(e.to_string(), "NOT_FOUND: session s-1 not found");
        assert_eq!(e.exit_code(), ExitCode::from(1));
        assert_eq!(CliError::Usage("x".into()).exit_code(), ExitCode::from(2));
    }
}
