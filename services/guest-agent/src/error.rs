//! The agent's errors and their gRPC codes. File-system errors are classified by their OS
//! error (missing → NOT_FOUND, exists → ALREADY_EXISTS, wrong kind of file → FAILED_PRECONDITION)
//! because in the guest those are the client's doing, not the agent's.

use std::io;
use std::time::Duration;

use capsa_grpc::{ErrorCode, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid `{field}`: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    #[error("{path}: already exists")]
    AlreadyExists { path: String },
    #[error("{path}: {reason}")]
    FailedPrecondition { path: String, reason: String },
    #[error("{path}: permission denied")]
    PermissionDenied { path: String },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the {language} kernel")]
    KernelStart {
        language: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the {language} kernel is gone")]
    KernelGone { language: &'static str },
    #[error("no process {id}")]
    UnknownProcess { id: String },
    /// A call that does not fit the process's state (exited, stdin closed, a terminal) or
    /// the guest's (nothing listens on the port).
    #[error("{0}")]
    Precondition(String),
    /// A limit of `capsa_proto::limits`; the message names it.
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    Deadline(String),
    /// A port connection broke after it was made.
    #[error("{0}")]
    Aborted(String),
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// A step of Reidentify failed; the guest's identity is half changed.
    #[error("reidentify step `{step}` failed")]
    Reidentify {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reidentify step `{step}` did not finish within {after:?}")]
    ReidentifyTimeout { step: &'static str, after: Duration },
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// Classifies a file-system error on `path`.
    pub fn fs(op: &'static str, path: &str, source: io::Error) -> Error {
        let path = path.to_string();
        match source.kind() {
            io::ErrorKind::NotFound => Error::NotFound { path },
            io::ErrorKind::AlreadyExists => Error::AlreadyExists { path },
            io::ErrorKind::PermissionDenied => Error::PermissionDenied { path },
            io::ErrorKind::NotADirectory
            | io::ErrorKind::IsADirectory
            | io::ErrorKind::DirectoryNotEmpty
            | io::ErrorKind::ReadOnlyFilesystem
            | io::ErrorKind::StorageFull
            | io::ErrorKind::InvalidFilename => Error::FailedPrecondition {
                path,
                reason: source.to_string(),
            },
            _ => Error::Io { op, path, source },
        }
    }
}

impl ServiceError for Error {
    fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            Error::NotFound { .. } => ErrorCode::NotFound,
            Error::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            Error::FailedPrecondition { .. } => ErrorCode::FailedPrecondition,
            Error::PermissionDenied { .. } => ErrorCode::PermissionDenied,
            Error::Io { .. } => ErrorCode::Internal,
            // A failed Reidentify step is the guest's failure, like a kernel that cannot
            // start; its message (the step and the cause) goes to vm-pool.
            Error::KernelStart { .. }
            | Error::KernelGone { .. }
            | Error::ShuttingDown
            | Error::Reidentify { .. } => ErrorCode::Unavailable,
            Error::UnknownProcess { .. } => ErrorCode::NotFound,
            Error::Precondition(_) => ErrorCode::FailedPrecondition,
            Error::Exhausted(_) => ErrorCode::ResourceExhausted,
            Error::Deadline(_) => ErrorCode::DeadlineExceeded,
            Error::Aborted(_) => ErrorCode::Aborted,
            Error::ReidentifyTimeout { .. } => ErrorCode::DeadlineExceeded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_table_is_pinned() {
        let e = |k: io::ErrorKind| Error::fs("op", "/p", io::Error::from(k)).code();
        assert_eq!(e(io::ErrorKind::NotFound), ErrorCode::NotFound);
        assert_eq!(e(io::ErrorKind::AlreadyExists), ErrorCode::AlreadyExists);
        assert_eq!(
            e(io::ErrorKind::PermissionDenied),
            ErrorCode::PermissionDenied
        );
        assert_eq!(
            e(io::ErrorKind::DirectoryNotEmpty),
            ErrorCode::FailedPrecondition
        );
        assert_eq!(
            e(io::ErrorKind::IsADirectory),
            ErrorCode::FailedPrecondition
        );
        assert_eq!(e(io::ErrorKind::Other), ErrorCode::Internal);
        assert_eq!(
            Error::invalid("path", "x").code(),
            ErrorCode::InvalidArgument
        );
        let start = Error::KernelStart {
            language: "python",
            source: io::Error::other("x"),
        };
        assert_eq!(start.code(), ErrorCode::Unavailable);
        assert_eq!(
            Error::UnknownProcess { id: "p-1".into() }.code(),
            ErrorCode::NotFound
        );
        assert_eq!(
            Error::Precondition("x".into()).code(),
            ErrorCode::FailedPrecondition
        );
        assert_eq!(
            Error::Exhausted("x".into()).code(),
            ErrorCode::ResourceExhausted
        );
        assert_eq!(
            Error::Deadline("x".into()).code(),
            ErrorCode::DeadlineExceeded
        );
        assert_eq!(Error::Aborted("x".into()).code(), ErrorCode::Aborted);
        let step = Error::Reidentify {
            step: "network",
            source: io::Error::other("exit status: 2: RTNETLINK answers: No such device"),
        };
        assert_eq!(step.code(), ErrorCode::Unavailable);
        let timeout = Error::ReidentifyTimeout {
            step: "network",
            after: Duration::from_secs(5),
        };
        assert_eq!(timeout.code(), ErrorCode::DeadlineExceeded);
    }

    #[test]
    fn a_failed_reidentify_step_is_named_with_its_cause() {
        let s = capsa_grpc::to_status(&Error::Reidentify {
            step: "entropy",
            source: io::Error::other("RNDADDENTROPY: Operation not permitted"),
        });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains("`entropy`"), "{}", s.message());
        assert!(s.message().contains("RNDADDENTROPY"), "{}", s.message());
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let s = capsa_grpc::to_status(&Error::invalid("path", "must be absolute"));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().contains("`path`"), "{}", s.message());
    }
}
