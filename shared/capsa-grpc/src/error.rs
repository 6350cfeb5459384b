//! The error-code table. Each crate keeps its own `thiserror` enum and says which
//! [`ErrorCode`] each variant is; [`to_status`] is the only place a `tonic::Status` is made
//! from a service error. Client-caused errors carry their message; internal ones are logged
//! with their whole source chain and the client gets only a request id to quote.

use std::error::Error as StdError;
use std::fmt::Write as _;

use tonic::{Code, Status};

/// The closed set of outcomes a Capsa service reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    Aborted,
    Cancelled,
    DeadlineExceeded,
    /// A dependency (VM, node, Redis) is down or not answering; retrying may help.
    Unavailable,
    /// A bug or an unexpected failure; details are logged, not sent.
    Internal,
}

impl ErrorCode {
    /// The gRPC status code for this outcome.
    pub fn grpc(self) -> Code {
        match self {
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::Unauthenticated => Code::Unauthenticated,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            ErrorCode::FailedPrecondition => Code::FailedPrecondition,
            ErrorCode::ResourceExhausted => Code::ResourceExhausted,
            ErrorCode::Aborted => Code::Aborted,
            ErrorCode::Cancelled => Code::Cancelled,
            ErrorCode::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::Internal => Code::Internal,
        }
    }

    /// Whether the message may go to the client. Internal errors may name hosts, paths or
    /// keys, so only a request id leaves the server.
    pub fn is_client_visible(self) -> bool {
        !matches!(self, ErrorCode::Internal)
    }
}

/// Implemented by every service's error enum.
pub trait ServiceError: StdError {
    fn code(&self) -> ErrorCode;

    /// When the caller may try again (a rate limit): sent as the standard
    /// `google.rpc.RetryInfo` status detail, which gRPC clients read.
    fn retry_after(&self) -> Option<std::time::Duration> {
        None
    }
}

/// `google.rpc.Status`, the body of the `grpc-status-details-bin` trailer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    pub retry_delay: Option<prost_types::Duration>,
}

/// The type URL of [`RetryInfo`] in a status' details.
pub const RETRY_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// A status whose details carry `RetryInfo { retry_delay: after }`.
fn with_retry_info(code: Code, message: String, after: std::time::Duration) -> Status {
    let retry = RetryInfo {
        retry_delay: Some(capsa_proto::time::duration(after)),
    };
    let details = RpcStatus {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: RETRY_INFO_TYPE_URL.into(),
            value: prost::Message::encode_to_vec(&retry),
        }],
    };
    Status::with_details(
        code,
        message,
        prost::Message::encode_to_vec(&details).into(),
    )
}

/// Metadata on an executor's NOT_FOUND that means "this VM's socket is gone from the node"
/// (it died or was destroyed), as opposed to a NOT_FOUND about something in a live VM (a
/// missing file, an unknown process): session-manager then waits for vm-pool to confirm the
/// VM's end instead of passing NOT_FOUND on to the client.
pub const VM_GONE_METADATA: &str = "capsa-vm-gone";

/// Converts a service error into the status sent to the client, logging internal errors
/// with their full source chain under a fresh request id.
pub fn to_status<E: ServiceError + ?Sized>(err: &E) -> Status {
    let code = err.code();
    error_counter().add(
        1,
        &[opentelemetry::KeyValue::new(
            "code",
            format!("{:?}", code.grpc()),
        )],
    );
    if code.is_client_visible() {
        if let Some(after) = err.retry_after() {
            return with_retry_info(code.grpc(), chain(err), after);
        }
        // Unavailable keeps its cause: "vm-pool unreachable: connection refused" helps the
        // operator and names nothing secret.
        return Status::new(code.grpc(), chain(err));
    }
    let request_id = uuid::Uuid::new_v4();
    tracing::error!(%request_id, error = %chain(err), "internal error");
    Status::new(
        code.grpc(),
        format!("internal error (request id {request_id})"),
    )
}

/// Errors by gRPC code, counted where every service error becomes a status.
fn error_counter() -> &'static opentelemetry::metrics::Counter<u64> {
    static COUNTER: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> =
        std::sync::OnceLock::new();
    COUNTER.get_or_init(|| {
        capsa_telemetry::meter()
            .u64_counter(capsa_telemetry::metrics::GRPC_ERRORS)
            .with_description("errors returned to callers, by gRPC code")
            .build()
    })
}

/// "outer: inner: innermost", the way `anyhow` prints `{:#}`.
pub fn chain<E: StdError + ?Sized>(err: &E) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum DemoError {
        #[error("field `code` is empty")]
        Bad,
        #[error("redis write failed")]
        Store(#[source] std::io::Error),
        #[error("vm-pool unreachable")]
        Down(#[source] std::io::Error),
    }

    impl ServiceError for DemoError {
        fn code(&self) -> ErrorCode {
            match self {
                DemoError::Bad => ErrorCode::InvalidArgument,
                DemoError::Store(_) => ErrorCode::Internal,
                DemoError::Down(_) => ErrorCode::Unavailable,
            }
        }
    }

    #[test]
    fn the_code_table_is_pinned() {
        let table = [
            (ErrorCode::InvalidArgument, Code::InvalidArgument),
            (ErrorCode::Unauthenticated, Code::Unauthenticated),
            (ErrorCode::PermissionDenied, Code::PermissionDenied),
            (ErrorCode::NotFound, Code::NotFound),
            (ErrorCode::AlreadyExists, Code::AlreadyExists),
            (ErrorCode::FailedPrecondition, Code::FailedPrecondition),
            (ErrorCode::ResourceExhausted, Code::ResourceExhausted),
            (ErrorCode::Aborted, Code::Aborted),
            (ErrorCode::Cancelled, Code::Cancelled),
            (ErrorCode::DeadlineExceeded, Code::DeadlineExceeded),
            (ErrorCode::Unavailable, Code::Unavailable),
            (ErrorCode::Internal, Code::Internal),
        ];
        for (ours, grpc) in table {
            assert_eq!(ours.grpc(), grpc);
        }
    }

    #[test]
    fn client_errors_keep_their_message_and_internal_ones_hide_it() {
        let s = to_status(&DemoError::Bad);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "field `code` is empty");

        let s = to_status(&DemoError::Store(std::io::Error::other(
            "10.0.0.7:6379 refused",
        )));
        assert_eq!(s.code(), Code::Internal);
        assert!(
            s.message().starts_with("internal error (request id "),
            "{}",
            s.message()
        );
        assert!(!s.message().contains("10.0.0.7"));

        let s = to_status(&DemoError::Down(std::io::Error::other(
            "connection refused",
        )));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.message(), "vm-pool unreachable: connection refused");
    }
}
