//! Metering's errors and their gRPC codes. Redis down is UNAVAILABLE (retrying helps); a
//! record this code cannot read is INTERNAL. Node errors (vm-pool, executor) only ever
//! reach logs and metrics: sampling is best effort, and FinalizeSession falls back to the
//! last stored sample.

use capsa_grpc::{ErrorCode, ServiceError};
use capsa_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("field `{field}` {reason}")]
    InvalidArgument {
        field: &'static str,
        reason: &'static str,
    },

    #[error("session {session_id} has no usage and no record")]
    SessionNotFound { session_id: String },

    #[error("usage store")]
    Store(#[from] StoreError),

    /// A node's vm-pool or executor failed a call (or its URL is unusable).
    #[error("{service} at {url}: {message}")]
    Node {
        service: &'static str,
        url: String,
        code: tonic::Code,
        message: String,
    },

    #[error("serving gRPC")]
    Serve(#[source] capsa_grpc::ServeError),
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: &'static str) -> Error {
        Error::InvalidArgument { field, reason }
    }

    pub(crate) fn node(service: &'static str, url: &str, status: &tonic::Status) -> Error {
        Error::Node {
            service,
            url: url.to_owned(),
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

    /// The node answered that the VM does not exist (any more), or its vm-pool that it no
    /// longer runs (it exited, or is being destroyed or suspended): its usage ends with the
    /// last sample, which is no fault of anyone's.
    pub fn is_vm_gone(&self) -> bool {
        match self {
            Error::Node { code, service, .. } => {
                *code == tonic::Code::NotFound
                    || (*code == tonic::Code::FailedPrecondition
                        && *service == crate::clients::VMPOOL)
            }
            _ => false,
        }
    }
}

impl ServiceError for Error {
    fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            Error::SessionNotFound { .. } => ErrorCode::NotFound,
            Error::Store(StoreError::Redis(_)) => ErrorCode::Unavailable,
            Error::Store(StoreError::Corrupt { .. }) => ErrorCode::Internal,
            Error::Node { .. } => ErrorCode::Unavailable,
            Error::Serve(_) => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_pinned() {
        let corrupt = StoreError::Corrupt {
            key: "k".into(),
            reason: "r".into(),
        };
        let cases = [
            (
                Error::invalid("session_id", "is empty"),
                ErrorCode::InvalidArgument,
            ),
            (
                Error::SessionNotFound {
                    session_id: "s".into(),
                },
                ErrorCode::NotFound,
            ),
            (Error::Store(corrupt), ErrorCode::Internal),
            (
                Error::node("vm-pool", "http://n:1", &tonic::Status::not_found("no vm")),
                ErrorCode::Unavailable,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
        }
        let bad = capsa_grpc::to_status(&Error::invalid("session_id", "is empty"));
        assert_eq!(bad.message(), "field `session_id` is empty");
    }

    #[test]
    fn not_found_or_vm_pool_saying_not_running_means_the_vm_is_gone() {
        let node = |service, status| Error::node(service, "u", &status);
        assert!(node("vm-pool", tonic::Status::not_found("x")).is_vm_gone());
        assert!(node("executor", tonic::Status::not_found("x")).is_vm_gone());
        let not_running = || tonic::Status::failed_precondition("vm v is Destroyed, not running");
        assert!(node("vm-pool", not_running()).is_vm_gone());
        // The executor's FAILED_PRECONDITION is about the guest, not the VM's life.
        assert!(!node("executor", not_running()).is_vm_gone());
        assert!(!node("vm-pool", tonic::Status::unavailable("x")).is_vm_gone());
        assert!(!node("vm-pool", tonic::Status::internal("qmp read")).is_vm_gone());
    }
}
