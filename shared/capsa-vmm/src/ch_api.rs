//! Cloud Hypervisor's REST API client (HTTP/1.1 over the API Unix socket).
//!
//! Endpoints live under `/api/v1/` (spec: `vmm/src/api/openapi/cloud-hypervisor.yaml` in
//! the Cloud Hypervisor repository). Actions are `PUT` with an optional JSON body and answer
//! 204 (or 200 with JSON); queries are `GET` answering 200 with JSON. Any other status is an
//! error whose body (Cloud Hypervisor's error chain as text) goes into the message. One
//! connection per request: the API socket is local and requests are rare, so keep-alive
//! state is not worth carrying.
//!
//! Bodies are the `cloud-hypervisor-client` models (see [`crate::ch_model`]); the transport
//! is our own rather than that crate's `DefaultApiClient`, which suits this driver poorly:
//! it has no request timeout (a wedged VMM would hang a boot or a snapshot), reads bodies
//! without a size limit, can only decode a reply into its model (so what the model does not
//! know is lost before [`crate::ch_model::Preserved`] could keep it), and its pooled
//! `hyper_util` legacy client over `hyperlocal` buys nothing for a few requests per VM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::VmmError;

/// Snapshot and restore copy guest memory; everything else is quick.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest response body read (vm.info with a device tree is a few KiB).
const MAX_BODY: usize = 4 << 20;

pub(crate) struct ChApi {
    socket: PathBuf,
}

impl ChApi {
    pub fn new(socket: &Path) -> ChApi {
        ChApi {
            socket: socket.to_owned(),
        }
    }

    /// `PUT /api/v1/<endpoint>` without a body.
    pub async fn put(&self, endpoint: &str) -> Result<(), VmmError> {
        self.request(http::Method::PUT, endpoint, None)
            .await
            .map(drop)
    }

    /// `PUT /api/v1/<endpoint>` with `body` as JSON.
    pub async fn put_json<B: Serialize>(&self, endpoint: &str, body: &B) -> Result<(), VmmError> {
        let body = serde_json::to_vec(body).map_err(|e| api_err(endpoint, format!("body: {e}")))?;
        self.request(http::Method::PUT, endpoint, Some(Bytes::from(body)))
            .await
            .map(drop)
    }

    /// `GET /api/v1/<endpoint>`, its JSON body read as `T`.
    pub async fn get<T: DeserializeOwned>(&self, endpoint: &str) -> Result<T, VmmError> {
        let body = self
            .request(http::Method::GET, endpoint, None)
            .await?
            .ok_or_else(|| api_err(endpoint, "empty response body".into()))?;
        serde_json::from_slice(&body).map_err(|e| api_err(endpoint, format!("bad reply: {e}")))
    }

    async fn request(
        &self,
        method: http::Method,
        endpoint: &str,
        body: Option<Bytes>,
    ) -> Result<Option<Bytes>, VmmError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, endpoint, body))
            .await
            .map_err(|_| VmmError::Timeout(format!("cloud hypervisor api {endpoint}")))?
    }

    async fn request_inner(
        &self,
        method: http::Method,
        endpoint: &str,
        body: Option<Bytes>,
    ) -> Result<Option<Bytes>, VmmError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| VmmError::io("connect cloud hypervisor api", &self.socket, e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| api_err(endpoint, format!("handshake: {e}")))?;
        let conn = tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("/api/v1/{endpoint}"))
            .header(http::header::HOST, "localhost")
            .header(http::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| api_err(endpoint, format!("request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| api_err(endpoint, format!("send: {e}")))?;
        let status = resp.status();
        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| api_err(endpoint, format!("read body: {e}")))?
            .to_bytes();
        conn.abort();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            return Err(api_err(endpoint, format!("{status}: {}", text.trim())));
        }
        Ok((!bytes.is_empty()).then_some(bytes))
    }
}

fn api_err(endpoint: &str, message: String) -> VmmError {
    VmmError::Api {
        endpoint: endpoint.to_owned(),
        message,
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A tiny HTTP/1.1 server on a Unix socket standing in for Cloud Hypervisor's API:
    //! records each request and answers from a closure.

    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::net::UnixListener;

    #[derive(Debug, Clone)]
    pub struct Recorded {
        pub method: String,
        pub path: String,
        pub body: String,
    }

    pub type Reply = (u16, String);

    pub fn serve(
        path: &Path,
        answer: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Arc<Mutex<Vec<Recorded>>> {
        let listener = UnixListener::bind(path).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mut reader = BufReader::new(stream);
                let mut request_line = String::new();
                reader.read_line(&mut request_line).await.unwrap();
                let mut length = 0usize;
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).await.unwrap();
                    if h == "\r\n" || h.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).await.unwrap();
                let mut parts = request_line.split_whitespace();
                let rec = Recorded {
                    method: parts.next().unwrap().to_owned(),
                    path: parts.next().unwrap().to_owned(),
                    body: String::from_utf8(body).unwrap(),
                };
                let (status, text) = answer(&rec);
                log2.lock().unwrap().push(rec);
                let mut stream = reader.into_inner();
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
                stream.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        log
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[tokio::test]
    async fn put_get_and_error_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let log = fake::serve(&sock, |r| match r.path.as_str() {
            "/api/v1/vm.create" => (204, String::new()),
            "/api/v1/vm.counters" => (200, r#"{"_disk0":{"read_bytes":5}}"#.into()),
            "/api/v1/vm.info" => (200, "{not json".into()),
            "/api/v1/vm.boot" => (204, String::new()),
            _ => (405, "Error from API: VM is not booted".into()),
        });
        let api = ChApi::new(&sock);
        api.put_json("vm.create", &json!({"cpus": {"boot_vcpus": 1}}))
            .await
            .unwrap();
        let counters: Value = api.get("vm.counters").await.unwrap();
        assert_eq!(counters["_disk0"]["read_bytes"], 5);
        let err = api.put("vm.pause").await.unwrap_err().to_string();
        assert!(
            err.contains("405") && err.contains("VM is not booted"),
            "{err}"
        );
        let err = api.get::<Value>("vm.info").await.unwrap_err().to_string();
        assert!(
            err.contains("vm.info") && err.contains("bad reply"),
            "{err}"
        );
        let err = api.get::<Value>("vm.boot").await.unwrap_err().to_string();
        assert!(err.contains("empty response body"), "{err}");
        let log = log.lock().unwrap();
        assert_eq!(log[0].method, "PUT");
        assert_eq!(log[0].path, "/api/v1/vm.create");
        assert_eq!(
            serde_json::from_str::<Value>(&log[0].body).unwrap()["cpus"]["boot_vcpus"],
            1
        );
        assert_eq!(log[1].method, "GET");
        assert_eq!(log[2].body, "");
    }

    #[tokio::test]
    async fn a_vmm_that_does_not_answer_is_a_timeout_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        // Accepts and never answers.
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        });
        tokio::time::pause();
        let err = ChApi::new(&sock).put("vm.boot").await.unwrap_err();
        assert!(matches!(err, VmmError::Timeout(_)), "{err}");
        held.abort();
    }
}
