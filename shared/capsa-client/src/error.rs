//! What can go wrong, as one enum. API errors arrive as a `tonic::Status` and are sorted
//! into variants by their code in one place ([`From<tonic::Status>`]); they print as
//! `CODE: message`, the code in its canonical gRPC spelling.

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The session or file does not exist, or belongs to another tenant.
    #[error("NOT_FOUND: {0}")]
    NotFound(String),
    /// The API key is missing, unknown or revoked.
    #[error("UNAUTHENTICATED: {0}")]
    Unauthenticated(String),
    #[error("PERMISSION_DENIED: {0}")]
    PermissionDenied(String),
    /// A request field is invalid; the message names it.
    #[error("INVALID_ARGUMENT: {0}")]
    InvalidArgument(String),
    /// E.g. an upload with `no_overwrite` onto an existing file.
    #[error("ALREADY_EXISTS: {0}")]
    AlreadyExists(String),
    /// E.g. the session is no longer ACTIVE.
    #[error("FAILED_PRECONDITION: {0}")]
    FailedPrecondition(String),
    /// A quota or limit was reached (sessions per tenant, no room for a VM).
    #[error("RESOURCE_EXHAUSTED: {0}")]
    ResourceExhausted(String),
    /// The service could not be reached or is overloaded; safe calls may be retried.
    #[error("UNAVAILABLE: {0}")]
    Unavailable(String),
    #[error("DEADLINE_EXCEEDED: {0}")]
    DeadlineExceeded(String),
    /// Any other status code.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    /// The first connection to the endpoint failed.
    #[error("cannot connect to {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    /// No endpoint or key could be found, or one is malformed.
    #[error("{0}")]
    Config(String),
    /// Reading or writing a local file or stream.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The server's answer broke the contract (e.g. a download shorter than announced).
    #[error("{0}")]
    Protocol(String),
    /// Input for a stream whose call has ended (a terminal that exited, a port connection
    /// the guest closed); the call's output says how it ended.
    #[error("{0} has ended")]
    Ended(String),
}

/// The crate's `Result`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let message = || status.message().to_owned();
        match status.code() {
            Code::NotFound => Error::NotFound(message()),
            Code::Unauthenticated => Error::Unauthenticated(message()),
            Code::PermissionDenied => Error::PermissionDenied(message()),
            Code::InvalidArgument => Error::InvalidArgument(message()),
            Code::AlreadyExists => Error::AlreadyExists(message()),
            Code::FailedPrecondition => Error::FailedPrecondition(message()),
            Code::ResourceExhausted => Error::ResourceExhausted(message()),
            Code::Unavailable => Error::Unavailable(message()),
            Code::DeadlineExceeded => Error::DeadlineExceeded(message()),
            _ => Error::Status(status),
        }
    }
}

impl Error {
    /// The gRPC status code of an API error; `None` for local and connection errors.
    pub fn code(&self) -> Option<tonic::Code> {
        use tonic::Code;
        Some(match self {
            Error::NotFound(_) => Code::NotFound,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Status(s) => s.code(),
            Error::Connect { .. }
            | Error::Config(_)
            | Error::Io { .. }
            | Error::Protocol(_)
            | Error::Ended(_) => {
                return None;
            }
        })
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
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
    fn statuses_sort_into_variants_and_print_their_canonical_code() {
        let e = Error::from(tonic::Status::not_found("session s-1 not found"));
        assert!(matches!(e, Error::NotFound(ref m) if m == "session s-1 not found"));
        assert_eq!(e.to_string(), "NOT_FOUND: session s-1 not found");
        assert_eq!(e.code(), Some(tonic::Code::NotFound));

        let e = Error::from(tonic::Status::internal("boom"));
        assert!(matches!(e, Error::Status(_)));
        assert_eq!(e.to_string(), "INTERNAL: boom");
        assert_eq!(e.code(), Some(tonic::Code::Internal));

        for (status, code) in [
            (
                tonic::Status::unauthenticated("k"),
                tonic::Code::Unauthenticated,
            ),
            (
                tonic::Status::invalid_argument("f"),
                tonic::Code::InvalidArgument,
            ),
            (tonic::Status::unavailable("u"), tonic::Code::Unavailable),
            (
                tonic::Status::already_exists("a"),
                tonic::Code::AlreadyExists,
            ),
        ] {
            assert_eq!(Error::from(status).code(), Some(code));
        }
        assert_eq!(Error::Protocol("x".into()).code(), None);
    }
}
