//! The gateway's one error type and its one rendering: an HTTP status and InstaVM's error body,
//! `{"detail": "..."}`. The `instavm` SDK turns 401 into `AuthenticationError`, 403 into
//! `ForbiddenError`, 429 into `RateLimitError` (reading `detail`), 5xx into `NetworkError`
//! (with the body in its message), and any other 4xx into the calling method's own error
//! (`SessionError`, `ExecutionError`) or, for the `vms`/`snapshots` managers, `requests`'
//! `HTTPError`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing API key: send it in the X-API-Key header")]
    MissingKey,
    #[error("the API key contains characters that cannot be sent on")]
    MalformedKey,
    /// A field the gateway checks itself; 422 like InstaVM's validation errors.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A body that does not parse (bad JSON, a wrong type, a missing field).
    #[error("invalid request body: {0}")]
    BadBody(String),
    #[error("request body is over the {limit}-byte limit of this route ({hint})")]
    BodyTooLarge { limit: u64, hint: &'static str },
    #[error("{what} is {size} bytes; at most {limit} are accepted")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("the client sent the request body too slowly (no data for {0} s)")]
    BodyTimeout(u64),
    #[error("{0}")]
    NotFound(String),
    /// An InstaVM operation Capsa does not offer; the message says what to use instead.
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// What session-manager answered; its message is already fit for the client.
    #[error("{}", upstream_detail(.0))]
    Upstream(tonic::Status),
    #[error("session-manager did not answer within {0} s")]
    UpstreamTimeout(u64),
    #[error("execution store unavailable: {0}")]
    Store(#[from] redis::RedisError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        ApiError::Upstream(status)
    }
}

impl ApiError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ApiError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MissingKey | ApiError::MalformedKey => StatusCode::UNAUTHORIZED,
            ApiError::Invalid { .. } | ApiError::BadBody(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BodyTooLarge { .. } | ApiError::TooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Upstream(status) => http_status(status.code()),
            ApiError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// session-manager's message; for UNAVAILABLE (which the channel also reports when it cannot
/// reach session-manager at all, with a terse transport message) it says what to do.
fn upstream_detail(status: &tonic::Status) -> String {
    match status.code() {
        Code::Unavailable => format!("unavailable, try again shortly: {}", status.message()),
        _ => status.message().to_owned(),
    }
}

/// The HTTP status for a gRPC code from session-manager.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::UNPROCESSABLE_ENTITY,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // 501 is the client asking for what is not offered: nothing to warn about.
        if status.is_server_error() && !matches!(self, ApiError::Unsupported(_)) {
            tracing::warn!(status = status.as_u16(), "{self}");
        }
        let detail = match &self {
            // Whatever the store said may name hosts; the log has it.
            ApiError::Store(_) => "execution store unavailable; try again".to_owned(),
            other => other.to_string(),
        };
        let mut response = (status, Json(serde_json::json!({ "detail": detail }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("ApiKey"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(err: ApiError) -> (StatusCode, serde_json::Value) {
        let response = err.into_response();
        let status = response.status();
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[test]
    fn grpc_codes_map_to_the_statuses_the_sdk_expects() {
        let cases = [
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::NotFound, 404),
            (Code::InvalidArgument, 422),
            (Code::FailedPrecondition, 409),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
            (Code::Unknown, 500),
        ];
        for (code, http) in cases {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
        }
    }

    #[tokio::test]
    async fn errors_render_as_detail_bodies() {
        let (status, json) = body(ApiError::Upstream(tonic::Status::not_found(
            "session s-1 not found",
        )))
        .await;
        assert_eq!(status, 404);
        assert_eq!(json, serde_json::json!({"detail": "session s-1 not found"}));

        let (status, json) = body(ApiError::TooLarge {
            what: "command",
            size: 10 << 20,
            limit: 1 << 20,
        })
        .await;
        assert_eq!(status, 413);
        assert_eq!(
            json["detail"],
            "command is 10485760 bytes; at most 1048576 are accepted"
        );

        let (status, json) = body(ApiError::invalid("language", "unsupported \"ruby\"")).await;
        assert_eq!(status, 422);
        assert_eq!(json["detail"], "language: unsupported \"ruby\"");

        let (status, json) = body(ApiError::Unsupported("use X instead")).await;
        assert_eq!(status, 501);
        assert_eq!(json["detail"], "not supported: use X instead");
    }

    #[tokio::test]
    async fn store_errors_do_not_leak_their_message() {
        let err = redis::RedisError::from((
            redis::ErrorKind::Io,
            "connect",
            "redis://:hunter2@10.0.0.7".to_owned(),
        ));
        let (status, json) = body(ApiError::Store(err)).await;
        assert_eq!(status, 503);
        assert!(!json["detail"].as_str().unwrap().contains("hunter2"));
    }

    #[test]
    fn unauthorized_carries_www_authenticate() {
        let response = ApiError::MissingKey.into_response();
        assert_eq!(response.status(), 401);
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
    }
}
