//! The executor's errors and their gRPC codes. Errors the guest agent returns for bad input
//! (a relative path, a missing file) keep their code and message; everything else the agent
//! or the transport says becomes UNAVAILABLE: from the caller's side the VM failed.

use std::time::Duration;

use capsa_grpc::{ErrorCode, ServiceError};

/// Which stream or call limit ran out; the message names it so operators can tune it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The agent did not accept the call (response headers) in time.
    FirstEvent,
    /// No event arrived for too long.
    Idle,
    /// The whole stream took longer than its own timeout plus grace.
    Total,
    /// A unary call to the agent did not answer in time.
    Call,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limit::FirstEvent => "time-to-first-event",
            Limit::Idle => "idle",
            Limit::Total => "total stream time",
            Limit::Call => "call",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("field `{field}` {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    #[error("vm {vm_id} not on this node")]
    VmNotFound { vm_id: String },

    /// The agent rejected the request; its message is meant for the caller as it is.
    #[error("{message}")]
    Rejected { code: ErrorCode, message: String },

    /// The caller's own request stream broke off.
    #[error("request stream failed: {message}")]
    ClientStream { message: String },

    #[error("guest agent of vm {vm_id} unavailable: {message}")]
    AgentUnavailable { vm_id: String, message: String },

    #[error("guest agent of vm {vm_id} ended the execute stream without a completion")]
    MissingCompletion { vm_id: String },

    #[error("vm {vm_id}: {limit} limit of {after:?} exceeded")]
    LimitExceeded {
        vm_id: String,
        limit: Limit,
        after: Duration,
    },

    /// The caller took nothing from a stream for the stall timeout; the stream ended and
    /// the guest's work was interrupted.
    #[error("client stopped reading for {after:?}")]
    ClientStalled { after: Duration },

    #[error("executor is shutting down")]
    ShuttingDown,

    #[error("serving gRPC")]
    Serve(#[source] capsa_grpc::ServeError),
}

impl ServiceError for Error {
    fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            Error::VmNotFound { .. } => ErrorCode::NotFound,
            Error::Rejected { code, .. } => *code,
            Error::ClientStream { .. } => ErrorCode::Cancelled,
            Error::AgentUnavailable { .. } | Error::MissingCompletion { .. } => {
                ErrorCode::Unavailable
            }
            // The guest stopped talking (or never started): a VM-side failure.
            Error::LimitExceeded {
                limit: Limit::FirstEvent | Limit::Idle,
                ..
            } => ErrorCode::Unavailable,
            Error::LimitExceeded {
                limit: Limit::Total | Limit::Call,
                ..
            } => ErrorCode::DeadlineExceeded,
            Error::ClientStalled { .. } => ErrorCode::DeadlineExceeded,
            Error::ShuttingDown => ErrorCode::Unavailable,
            Error::Serve(_) => ErrorCode::Internal,
        }
    }
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// Classifies a status from the agent call: the agent's verdicts on the request pass
    /// through, transport failures and agent-side faults become UNAVAILABLE.
    pub(crate) fn from_agent(vm_id: &str, status: &tonic::Status) -> Error {
        use tonic::Code;
        let passthrough = match status.code() {
            Code::InvalidArgument => Some(ErrorCode::InvalidArgument),
            Code::NotFound => Some(ErrorCode::NotFound),
            Code::AlreadyExists => Some(ErrorCode::AlreadyExists),
            Code::FailedPrecondition | Code::OutOfRange => Some(ErrorCode::FailedPrecondition),
            Code::PermissionDenied => Some(ErrorCode::PermissionDenied),
            Code::ResourceExhausted => Some(ErrorCode::ResourceExhausted),
            // A wait or a stdin write the guest gave up on ("still running after 60s").
            Code::DeadlineExceeded => Some(ErrorCode::DeadlineExceeded),
            // A port tunnel's guest socket failed; the message says how.
            Code::Aborted => Some(ErrorCode::Aborted),
            _ => None,
        };
        match passthrough {
            Some(code) => Error::Rejected {
                code,
                message: status.message().to_owned(),
            },
            None => Error::AgentUnavailable {
                vm_id: vm_id.to_owned(),
                message: format!("{:?}: {}", status.code(), status.message()),
            },
        }
    }

    /// Whether this error suggests the VM may be gone, so its cached channel is rechecked.
    pub(crate) fn is_transport(&self) -> bool {
        matches!(
            self,
            Error::AgentUnavailable { .. } | Error::LimitExceeded { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    #[test]
    fn the_code_table_is_pinned() {
        let vm = || "vm-1".to_string();
        let cases = [
            (Error::invalid("vm_id", "is empty"), Code::InvalidArgument),
            (Error::VmNotFound { vm_id: vm() }, Code::NotFound),
            (
                Error::AgentUnavailable {
                    vm_id: vm(),
                    message: "x".into(),
                },
                Code::Unavailable,
            ),
            (Error::MissingCompletion { vm_id: vm() }, Code::Unavailable),
            (
                Error::LimitExceeded {
                    vm_id: vm(),
                    limit: Limit::FirstEvent,
                    after: Duration::ZERO,
                },
                Code::Unavailable,
            ),
            (
                Error::LimitExceeded {
                    vm_id: vm(),
                    limit: Limit::Idle,
                    after: Duration::ZERO,
                },
                Code::Unavailable,
            ),
            (
                Error::LimitExceeded {
                    vm_id: vm(),
                    limit: Limit::Total,
                    after: Duration::ZERO,
                },
                Code::DeadlineExceeded,
            ),
            (
                Error::LimitExceeded {
                    vm_id: vm(),
                    limit: Limit::Call,
                    after: Duration::ZERO,
                },
                Code::DeadlineExceeded,
            ),
            (Error::ShuttingDown, Code::Unavailable),
            (
                Error::ClientStalled {
                    after: Duration::from_secs(30),
                },
                Code::DeadlineExceeded,
            ),
            (
                Error::ClientStream {
                    message: "x".into(),
                },
                Code::Cancelled,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(capsa_grpc::to_status(&err).code(), code, "{err}");
        }
    }

    #[test]
    fn agent_verdicts_pass_through_and_transport_failures_become_unavailable() {
        let e = Error::from_agent(
            "vm-1",
            &Status::invalid_argument("field `path` must be absolute"),
        );
        let s = capsa_grpc::to_status(&e);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "field `path` must be absolute");

        for status in [
            Status::unknown("h2 protocol error"),
            Status::internal("boom"),
            Status::cancelled("reset"),
        ] {
            let s = capsa_grpc::to_status(&Error::from_agent("vm-1", &status));
            assert_eq!(s.code(), Code::Unavailable, "{status:?}");
            assert!(s.message().contains("vm-1"), "{}", s.message());
        }
    }

    #[test]
    fn limit_messages_name_the_limit() {
        let e = Error::LimitExceeded {
            vm_id: "vm-1".into(),
            limit: Limit::Idle,
            after: Duration::from_secs(60),
        };
        assert_eq!(e.to_string(), "vm vm-1: idle limit of 60s exceeded");
    }
}
