//! The gateway's only way to Capsa: session-manager's public `SessionService`, called with
//! the HTTP caller's own API key as `authorization: Bearer <key>`. The gateway holds no
//! credentials and decides nothing about tenancy: session-manager authenticates every call
//! and scopes it to the key's tenant, so one tenant's ids are NOT_FOUND to another.

use std::time::Duration;

use axum::http::HeaderMap;
use capsa_proto::limits::MAX_MESSAGE_BYTES;
use capsa_proto::session::v1::session_service_client::SessionServiceClient;
use sha2::Digest as _;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::ApiError;

/// A caller's API key, from `X-API-Key` (what the SDK sends), `Authorization: Bearer`, or
/// (session create only) the body's `api_key`.
#[derive(Clone)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(****)")
    }
}

impl ApiKey {
    /// The key from the request headers, else `fallback` (a body field).
    pub fn from_request(headers: &HeaderMap, fallback: Option<&str>) -> Result<ApiKey, ApiError> {
        let header = headers
            .get("x-api-key")
            .map(|v| v.to_str().map(str::to_owned))
            .or_else(|| {
                headers.get(axum::http::header::AUTHORIZATION).map(|v| {
                    v.to_str()
                        .map(|s| s.strip_prefix("Bearer ").unwrap_or(s).to_owned())
                })
            });
        let key = match header {
            Some(Ok(key)) => key,
            Some(Err(_)) => return Err(ApiError::MalformedKey),
            None => fallback.unwrap_or_default().to_owned(),
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(ApiError::MissingKey);
        }
        Ok(ApiKey(key.to_owned()))
    }

    /// A stable, non-reversible name for the key: what async execution records are kept
    /// under, so only the key that started one can read it.
    pub fn owner_hash(&self) -> String {
        hex::encode(sha2::Sha256::digest(self.0.as_bytes()))
    }
}

/// Adds the caller's key and the trace context to every call.
#[derive(Clone)]
pub struct CallerAuth(MetadataValue<Ascii>);

impl tonic::service::Interceptor for CallerAuth {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut req = capsa_telemetry::propagate(req)?;
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Client = SessionServiceClient<InterceptedService<Channel, CallerAuth>>;

/// One lazily connected channel to session-manager, shared by every request.
#[derive(Clone)]
pub struct Backend {
    channel: Channel,
}

impl Backend {
    /// Does not connect: the first call does, and the channel reconnects by itself, so the
    /// gateway starts (and answers 503) while session-manager is down. An https:// URL is
    /// checked against `tls`'s CA.
    pub fn new(url: &str, tls: &capsa_grpc::tls::TlsArgs) -> Result<Backend, String> {
        let endpoint = tls
            .public_endpoint(url)
            .map_err(|e| format!("--session-manager-url: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(capsa_grpc::server::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(capsa_grpc::server::KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(capsa_grpc::server::STREAM_WINDOW)
            .max_frame_size(capsa_grpc::server::MAX_FRAME_BYTES)
            .tcp_nodelay(true);
        Ok(Backend {
            channel: endpoint.connect_lazy(),
        })
    }

    /// A client whose calls carry `key`.
    pub fn client(&self, key: &ApiKey) -> Result<Client, ApiError> {
        let auth = format!("Bearer {}", key.0)
            .parse()
            .map_err(|_| ApiError::MalformedKey)?;
        Ok(
            SessionServiceClient::with_interceptor(self.channel.clone(), CallerAuth(auth))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }
}

/// `message` as a request bounded by `timeout` (sent as `grpc-timeout`, which the server and
/// the channel both enforce), so a stuck session-manager costs a bounded wait.
pub fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(timeout);
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_key_comes_from_x_api_key_then_bearer_then_the_body() {
        let k = ApiKey::from_request(&headers(&[("x-api-key", "k1")]), Some("body")).unwrap();
        assert_eq!(k.0, "k1");
        let k = ApiKey::from_request(&headers(&[("authorization", "Bearer k2")]), None).unwrap();
        assert_eq!(k.0, "k2");
        let k = ApiKey::from_request(&HeaderMap::new(), Some("k3")).unwrap();
        assert_eq!(k.0, "k3");
        assert!(matches!(
            ApiKey::from_request(&HeaderMap::new(), None),
            Err(ApiError::MissingKey)
        ));
        assert!(matches!(
            ApiKey::from_request(&headers(&[("x-api-key", "  ")]), None),
            Err(ApiError::MissingKey)
        ));
    }

    #[test]
    fn keys_are_hashed_and_never_printed() {
        let k = ApiKey("secret".into());
        assert_eq!(k.owner_hash().len(), 64);
        assert_ne!(k.owner_hash(), ApiKey("other".into()).owner_hash());
        assert!(!format!("{k:?}").contains("secret"));
    }
}
