//! The session-manager's errors and their gRPC codes. Client-caused errors carry a message
//! naming the field or the state; node and Redis failures are UNAVAILABLE with their cause;
//! errors relayed from a node keep the node's code.

use capsa_grpc::{ErrorCode, ServiceError};
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad request field; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    NotFound(String),
    /// The session is not in a state the call needs (e.g. not ACTIVE).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A quota, or no node with room.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A concurrent call on the same thing won; the caller may retry (e.g. a second
    /// UpdateEgressPolicy of a session while one is in flight).
    #[error("{0}")]
    Aborted(String),
    /// A rate limit: the caller may try again after the duration (sent as RetryInfo).
    #[error("{0}")]
    RateLimited(String, std::time::Duration),
    /// A node, metering or the session's VM is down or not answering.
    #[error("{0}")]
    Unavailable(String),
    /// The client took nothing from its stream for this long; the stream ended and the
    /// call on the node was dropped (interrupting the code in the guest).
    #[error("client stopped reading for {0:?}; the stream was ended")]
    ClientStalled(std::time::Duration),
    /// The client's own request stream (an upload) broke off.
    #[error("request stream failed: {0}")]
    ClientStream(String),
    /// The session store (Redis) failed.
    #[error("session store failed")]
    Store(#[from] capsa_store::StoreError),
    /// A node answered a relayed call with this status.
    #[error("{}", .0.message())]
    Upstream(tonic::Status),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// "invalid `field`: why".
    pub fn field(field: &str, why: impl std::fmt::Display) -> Self {
        Error::InvalidArgument(format!("invalid `{field}`: {why}"))
    }
}

impl From<capsa_egress::PolicyError> for Error {
    /// INVALID_ARGUMENT naming the policy's field (`egress.allowed_cidrs[2]`).
    fn from(e: capsa_egress::PolicyError) -> Self {
        Error::field(&e.field, e.message)
    }
}

impl ServiceError for Error {
    fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Error::ResourceExhausted(_) | Error::RateLimited(..) => ErrorCode::ResourceExhausted,
            Error::Aborted(_) => ErrorCode::Aborted,
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::ClientStalled(_) => ErrorCode::DeadlineExceeded,
            Error::ClientStream(_) => ErrorCode::Cancelled,
            Error::Store(capsa_store::StoreError::Redis(_)) => ErrorCode::Unavailable,
            Error::Store(_) => ErrorCode::Internal,
            Error::Upstream(status) => upstream_code(status.code()),
            Error::Internal(_) => ErrorCode::Internal,
        }
    }

    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::RateLimited(_, after) => Some(*after),
            _ => None,
        }
    }
}

/// A node's status code as ours: client-caused codes pass through (a missing file is
/// NOT_FOUND to the client too); anything the node could not explain becomes INTERNAL.
fn upstream_code(code: Code) -> ErrorCode {
    match code {
        Code::InvalidArgument | Code::OutOfRange => ErrorCode::InvalidArgument,
        Code::NotFound => ErrorCode::NotFound,
        Code::AlreadyExists => ErrorCode::AlreadyExists,
        Code::FailedPrecondition => ErrorCode::FailedPrecondition,
        Code::ResourceExhausted => ErrorCode::ResourceExhausted,
        Code::PermissionDenied => ErrorCode::PermissionDenied,
        Code::Aborted => ErrorCode::Aborted,
        Code::Cancelled => ErrorCode::Cancelled,
        Code::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        Code::Unavailable => ErrorCode::Unavailable,
        Code::Ok
        | Code::Unknown
        | Code::Unauthenticated
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => ErrorCode::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_pinned() {
        let table: Vec<(Error, Code)> = vec![
            (
                Error::field("vcpus", "must be 1 to 8"),
                Code::InvalidArgument,
            ),
            (Error::Unauthenticated("no key"), Code::Unauthenticated),
            (Error::NotFound("x".into()), Code::NotFound),
            (
                Error::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (
                Error::ResourceExhausted("x".into()),
                Code::ResourceExhausted,
            ),
            (Error::Unavailable("x".into()), Code::Unavailable),
            (Error::Aborted("x".into()), Code::Aborted),
            (
                Error::ClientStalled(std::time::Duration::from_secs(30)),
                Code::DeadlineExceeded,
            ),
            (Error::ClientStream("x".into()), Code::Cancelled),
            (
                Error::Store(capsa_store::StoreError::Corrupt {
                    key: "k".into(),
                    reason: "r".into(),
                }),
                Code::Internal,
            ),
            (
                Error::Upstream(tonic::Status::not_found("f")),
                Code::NotFound,
            ),
            (
                Error::Upstream(tonic::Status::already_exists("f")),
                Code::AlreadyExists,
            ),
            (Error::Upstream(tonic::Status::unknown("f")), Code::Internal),
            (Error::Internal("x".into()), Code::Internal),
        ];
        for (err, code) in table {
            assert_eq!(capsa_grpc::to_status(&err).code(), code, "{err:?}");
        }
        let s = capsa_grpc::to_status(&Error::field("vcpus", "must be 1 to 8"));
        assert_eq!(s.message(), "invalid `vcpus`: must be 1 to 8");
        let s = capsa_grpc::to_status(&Error::ClientStalled(std::time::Duration::from_secs(30)));
        assert_eq!(
            s.message(),
            "client stopped reading for 30s; the stream was ended"
        );
    }
}
