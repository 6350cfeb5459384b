//! The routes: InstaVM's REST API (what `instavm` 0.26 calls) translated onto
//! `SessionService`, plus two extensions, `POST /v1/execute/stream` (server-sent events) and
//! `GET /openapi.json`.
//!
//! Every route takes the API key from `X-API-Key` (or `Authorization: Bearer`) and passes it
//! on; bodies are JSON, or form-encoded where the SDK sends forms (`/download`), or multipart
//! (`/upload`). JSON and form bodies are read whole before a handler runs, bounded in size
//! (`--max-body-bytes`) and in time between bytes (`--client-idle-secs`).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest as _, Multipart, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, extract::DefaultBodyLimit};
use capsa_proto::common::v1::{UploadHeader, execute_event::Event};
use capsa_proto::limits::{MAX_CHUNK_BYTES, MAX_PATH_BYTES};
use capsa_proto::session::v1 as pb;
use futures::{Stream, StreamExt as _};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};
use utoipa::{OpenApi, ToSchema};

use crate::AppState;
use crate::backend::{ApiKey, request};
use crate::error::ApiError;
use crate::executions::{ExecutionRecordView, Record, now_ms};
use crate::model::*;

/// Time an Execute may take past its own timeout before the gateway gives up on it: the
/// hops to the VM and back.
const EXECUTE_MARGIN: Duration = Duration::from_secs(30);

/// After a body turns out too large, up to this much more is read and dropped so the client,
/// still sending, gets to read the 413 instead of a reset connection.
const DRAIN_BYTES: u64 = 32 << 20;

/// Largest text field of an upload form (session id, path, flags).
const MAX_FORM_FIELD_BYTES: usize = 64 << 10;

type Shared = State<Arc<AppState>>;

/// The whole API.
pub fn router(state: Arc<AppState>) -> Router {
    let buffered = Router::new()
        .route("/v1/sessions/session", post(create_session))
        .route("/v1/sessions/session/{id}", get(get_session))
        .route("/v1/sessions/status/{id}", get(session_status))
        .route("/v1/sessions/usage/{id}", get(session_usage))
        .route("/v1/sessions/sandboxes", get(list_sandboxes))
        .route("/kill", post(kill))
        .route("/execute", post(execute))
        .route("/execute_async", post(execute_async))
        .route("/v1/executions/{id}", get(get_execution))
        .route("/v1/execute/stream", post(execute_stream))
        .route("/download", post(download))
        .route("/v1/vms", post(create_vm).get(list_vms))
        .route("/v1/vms/", get(list_all_vms))
        .route("/v1/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{id}/suspend", post(suspend_vm))
        .route("/v1/vms/{id}/resume", post(resume_vm))
        .route("/v1/vms/{id}/snapshot", post(snapshot_vm))
        .route("/v1/vms/{id}/clone", post(clone_vm))
        .route("/v1/snapshots", get(list_snapshots).post(build_snapshot))
        .route(
            "/v1/snapshots/{id}",
            get(get_snapshot).delete(delete_snapshot),
        )
        .route("/v1/egress/session/{id}", get(get_egress).post(set_egress))
        .route("/v1/egress/vm/{id}", get(get_egress).post(set_egress))
        .route("/openapi.json", get(openapi))
        .route("/health", get(health))
        .route_layer(middleware::from_fn_with_state(state.clone(), buffer_body));
    // Multipart is streamed to a spool file by the handler, which bounds it itself.
    let upload = Router::new().route("/upload", post(upload));
    buffered
        .merge(upload)
        .fallback(not_found)
        // The limits are this module's own (buffer_body, upload): axum's default of 2 MiB
        // would answer first, without a `detail`.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(trace_request))
        .with_state(state)
}

/// One span per request (the parent of the gRPC calls it makes, whose trace context goes to
/// session-manager), named by its route, not its path: ids stay out of span names.
/// Histogram (seconds): one HTTP request, by `http.route`, `http.request.method` and
/// `http.response.status_code` (streams: until their headers).
pub const REQUEST_DURATION: &str = "capsa.gateway.request.duration";

pub(crate) static REQUEST_SECONDS: std::sync::LazyLock<opentelemetry::metrics::Histogram<f64>> =
    std::sync::LazyLock::new(|| {
        capsa_telemetry::meter()
            .f64_histogram(REQUEST_DURATION)
            .with_unit("s")
            .with_description("HTTP requests, by route, method and status")
            .build()
    });

async fn trace_request(req: Request, next: Next) -> Response {
    use tracing::Instrument as _;
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = req.method().clone();
    let span =
        tracing::info_span!("http", otel.name = %format!("{method} {route}"), %method, %route);
    let started = std::time::Instant::now();
    async move {
        let response = next.run(req).await;
        let status = response.status().as_u16();
        tracing::debug!(status, elapsed = ?started.elapsed(), "request");
        REQUEST_SECONDS.record(
            started.elapsed().as_secs_f64(),
            &[
                opentelemetry::KeyValue::new("http.route", route),
                opentelemetry::KeyValue::new("http.request.method", method.to_string()),
                opentelemetry::KeyValue::new("http.response.status_code", i64::from(status)),
            ],
        );
        response
    }
    .instrument(span)
    .await
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// Reads the body whole, within `--max-body-bytes` and `--client-idle-secs`.
async fn buffer_body(State(s): Shared, req: Request, next: Next) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = read_body(body, s.limits.max_body_bytes, s.limits.client_idle).await?;
    Ok(next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await)
}

async fn read_body(body: Body, limit: u64, idle: Duration) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    let mut total: u64 = 0;
    loop {
        let chunk = match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => return Err(ApiError::BodyTimeout(idle.as_secs())),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ApiError::BadBody(format!("reading it failed: {e}"))),
            Ok(Some(Ok(chunk))) => chunk,
        };
        total += chunk.len() as u64;
        if total > limit {
            if total <= limit + DRAIN_BYTES {
                continue;
            }
            break;
        }
        buf.extend_from_slice(&chunk);
    }
    if total > limit {
        return Err(ApiError::BodyTooLarge {
            limit,
            hint: "a command is at most 1 MiB; upload files with /upload",
        });
    }
    Ok(buf.freeze())
}

/// JSON, or a form when the client says so; an empty body reads as `{}`.
fn parse<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, ApiError> {
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    if form {
        return serde_urlencoded::from_bytes(body).map_err(|e| ApiError::BadBody(e.to_string()));
    }
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| ApiError::BadBody(e.to_string()))
}

fn query<T: DeserializeOwned>(raw: Option<String>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::BadBody(format!("query: {e}")))
}

async fn get_session_pb(s: &AppState, key: &ApiKey, id: &str) -> Result<pb::Session, ApiError> {
    let req = pb::GetSessionRequest {
        session_id: id.to_owned(),
    };
    let resp = s
        .backend
        .client(key)?
        .get_session(request(req, s.limits.call_timeout))
        .await?;
    resp.into_inner()
        .session
        .ok_or_else(|| ApiError::Internal("GetSession answered without a session".into()))
}

/// `{"detail": ...}`, InstaVM's error body.
#[derive(ToSchema)]
#[allow(dead_code)] // describes ApiError's body in the OpenAPI document
pub struct ErrorBody {
    detail: String,
}

#[utoipa::path(post, path = "/v1/sessions/session", tag = "sessions",
    request_body = CreateSessionBody,
    responses((status = 200, body = SessionView), (status = 401, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
              (status = 503, body = ErrorBody)))]
async fn create_session(
    State(s): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<SessionView>, ApiError> {
    create(&s, &headers, &body).await.map(Json)
}

async fn create(s: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<SessionView, ApiError> {
    // The key may be in the body, so the body is read first; a missing key still wins over a
    // body that does not parse, as it would with the key in a header.
    let parsed: Result<CreateSessionBody, ApiError> = parse(headers, body);
    let key = ApiKey::from_request(
        headers,
        parsed.as_ref().ok().and_then(|b| b.api_key.as_deref()),
    )?;
    let req = parsed?.to_request();
    let session = s
        .backend
        .client(&key)?
        .create_session(request(req, s.limits.create_timeout))
        .await?
        .into_inner()
        .session
        .ok_or_else(|| ApiError::Internal("CreateSession answered without a session".into()))?;
    Ok(session.into())
}

#[utoipa::path(get, path = "/v1/sessions/session/{id}", tag = "sessions",
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = SessionView), (status = 404, body = ErrorBody)))]
async fn get_session(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    Ok(Json(get_session_pb(&s, &key, &id).await?.into()))
}

#[utoipa::path(get, path = "/v1/sessions/status/{id}", tag = "sessions",
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = SessionStatusView), (status = 404, body = ErrorBody)))]
async fn session_status(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SessionStatusView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    Ok(Json(get_session_pb(&s, &key, &id).await?.into()))
}

#[utoipa::path(get, path = "/v1/sessions/usage/{id}", tag = "sessions",
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = UsageView), (status = 404, body = ErrorBody)))]
async fn session_usage(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<UsageView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let resp = s
        .backend
        .client(&key)?
        .get_usage(request(
            pb::GetUsageRequest {
                session_id: id.clone(),
            },
            s.limits.call_timeout,
        ))
        .await?
        .into_inner();
    Ok(Json(UsageView::new(id, resp.usage.unwrap_or_default())))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<i32>,
    /// JSON object of labels every listed session has.
    metadata: Option<String>,
}

async fn list(
    s: &AppState,
    headers: &HeaderMap,
    raw: Option<String>,
    status: pb::SessionStatus,
) -> Result<Vec<SessionView>, ApiError> {
    let key = ApiKey::from_request(headers, None)?;
    let q: ListQuery = query(raw)?;
    let metadata = match q.metadata.as_deref() {
        None | Some("") => Default::default(),
        Some(m) => serde_json::from_str::<std::collections::HashMap<String, serde_json::Value>>(m)
            .map_err(|e| ApiError::invalid("metadata", format!("not a JSON object: {e}")))?
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
    };
    let req = pb::ListSessionsRequest {
        page_size: q.limit.unwrap_or(0),
        status: status as i32,
        metadata,
        ..Default::default()
    };
    let resp = s
        .backend
        .client(&key)?
        .list_sessions(request(req, s.limits.call_timeout))
        .await?
        .into_inner();
    Ok(resp.sessions.into_iter().map(Into::into).collect())
}

#[utoipa::path(get, path = "/v1/sessions/sandboxes", tag = "sessions",
    params(("limit" = Option<i32>, Query, description = "1 to 1000; 100 when absent"),
           ("metadata" = Option<String>, Query, description = "JSON object of labels to match")),
    responses((status = 200, body = Vec<SessionView>)))]
async fn list_sandboxes(
    State(s): Shared,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<SessionView>>, ApiError> {
    list(&s, &headers, raw, pb::SessionStatus::Unspecified)
        .await
        .map(Json)
}

#[derive(serde::Serialize, ToSchema)]
pub struct KillView {
    success: bool,
    session_id: String,
    status: String,
}

#[utoipa::path(post, path = "/kill", tag = "sessions", request_body = KillBody,
    responses((status = 200, body = KillView), (status = 404, body = ErrorBody)))]
async fn kill(
    State(s): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<KillView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let body: KillBody = parse(&headers, &body)?;
    let session = delete(&s, &key, body.session_id).await?;
    Ok(Json(KillView {
        success: true,
        session_id: session.id,
        status: status_name(session.status).to_owned(),
    }))
}

async fn delete(s: &AppState, key: &ApiKey, id: String) -> Result<pb::Session, ApiError> {
    s.backend
        .client(key)?
        .delete_session(request(
            pb::DeleteSessionRequest { session_id: id },
            s.limits.call_timeout,
        ))
        .await?
        .into_inner()
        .session
        .ok_or_else(|| ApiError::Internal("DeleteSession answered without a session".into()))
}

/// Runs one Execute to its end and folds its events, within its timeout plus a margin.
async fn run_execute(
    s: &AppState,
    key: &ApiKey,
    req: pb::ExecuteRequest,
    timeout: Duration,
) -> Result<ExecutionView, ApiError> {
    let mut client = s.backend.client(key)?;
    let bound = timeout + EXECUTE_MARGIN;
    let run = async {
        let mut stream = client.execute(request(req, bound)).await?.into_inner();
        let mut collector = Collector::default();
        while let Some(msg) = stream.message().await? {
            if let Some(event) = msg.event.and_then(|e| e.event) {
                collector.push(event);
            }
        }
        collector.finish().ok_or_else(|| {
            ApiError::Internal("the execute stream ended without a completion".into())
        })
    };
    tokio::time::timeout(bound, run)
        .await
        .map_err(|_| ApiError::UpstreamTimeout(bound.as_secs()))?
}

#[utoipa::path(post, path = "/execute", tag = "execute", request_body = ExecuteBody,
    responses((status = 200, body = ExecutionView), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
async fn execute(
    State(s): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ExecutionView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let body: ExecuteBody = parse(&headers, &body)?;
    let (req, timeout) = body.to_request()?;
    run_execute(&s, &key, req, timeout).await.map(Json)
}

#[derive(serde::Serialize, ToSchema)]
pub struct AsyncStarted {
    task_id: String,
    id: String,
    session_id: String,
    status: String,
}

#[utoipa::path(post, path = "/execute_async", tag = "execute", request_body = ExecuteBody,
    responses((status = 200, body = AsyncStarted), (status = 404, body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn execute_async(
    State(s): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<AsyncStarted>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let body: ExecuteBody = parse(&headers, &body)?;
    let (req, timeout) = body.to_request()?;
    // A bad key or a session the caller cannot see fails now, not in every poll.
    get_session_pb(&s, &key, &req.session_id).await?;
    let mut record = Record::new(
        uuid::Uuid::new_v4().to_string(),
        key.owner_hash(),
        req.session_id.clone(),
        language_name(req.language),
        timeout,
    );
    s.executions.insert(&record).await?;
    let started = AsyncStarted {
        task_id: record.id.clone(),
        id: record.id.clone(),
        session_id: record.session_id.clone(),
        status: "running".into(),
    };
    let state = s.clone();
    s.tasks.spawn(async move {
        let outcome = run_execute(&state, &key, req, timeout).await;
        record.result = Some(outcome.unwrap_or_else(|e| ExecutionView {
            status: "failed".into(),
            stderr: e.to_string(),
            exit_code: -1,
            ..Default::default()
        }));
        if let Err(e) = state.executions.complete(&record).await {
            tracing::warn!(id = %record.id, "storing an async execution's outcome: {e}");
        }
    });
    Ok(Json(started))
}

#[utoipa::path(get, path = "/v1/executions/{id}", tag = "execute",
    params(("id" = String, Path, description = "task id from /execute_async")),
    responses((status = 200, body = ExecutionRecordView), (status = 404, body = ErrorBody)))]
async fn get_execution(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<ExecutionRecordView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let record = s.executions.get(&id, &key.owner_hash()).await?;
    // session-manager still decides whether the key is valid (a revoked key is 401 here
    // too); a session that has since been purged does not hide its execution's outcome.
    match get_session_pb(&s, &key, &record.session_id).await {
        Ok(_) => {}
        Err(ApiError::Upstream(st)) if st.code() == tonic::Code::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(Json(record.view(now_ms())))
}

/// `POST /v1/execute/stream`: the events of one Execute as server-sent events, as they
/// happen: `stdout` and `stderr` (`{"text"}`), `result` and `display` (`{"data": {mime:
/// value}}`), `error` (an exception: `{"name","value","traceback"}`), then `completion`
/// (`{"status","exit_code","execution_time","cpu_time",...}`), or `failed` (`{"detail"}`)
/// if the call broke off.
#[utoipa::path(post, path = "/v1/execute/stream", tag = "execute", request_body = ExecuteBody,
    responses((status = 200, description = "text/event-stream of the execute's events"),
              (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
async fn execute_stream(
    State(s): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let body: ExecuteBody = parse(&headers, &body)?;
    let (req, timeout) = body.to_request()?;
    let bound = timeout + EXECUTE_MARGIN;
    let deadline = tokio::time::Instant::now() + bound;
    // Errors before the first event (auth, unknown session) are still an HTTP status.
    let mut upstream = tokio::time::timeout_at(
        deadline,
        s.backend.client(&key)?.execute(request(req, bound)),
    )
    .await
    .map_err(|_| ApiError::UpstreamTimeout(bound.as_secs()))??
    .into_inner();
    let events = async_stream::stream! {
        let (mut out, mut err) = (Utf8Carry::default(), Utf8Carry::default());
        loop {
            let msg = match tokio::time::timeout_at(deadline, upstream.message()).await {
                Err(_) => Err(ApiError::UpstreamTimeout(bound.as_secs())),
                Ok(r) => r.map_err(ApiError::from),
            };
            let event = match msg {
                Ok(Some(m)) => match m.event.and_then(|e| e.event) {
                    Some(e) => e,
                    None => continue,
                },
                Ok(None) => {
                    let detail = "the execute stream ended without a completion";
                    yield Ok(sse("failed", serde_json::json!({ "detail": detail })));
                    break;
                }
                Err(e) => {
                    yield Ok(sse("failed", serde_json::json!({ "detail": e.to_string() })));
                    break;
                }
            };
            let done = matches!(event, Event::Completion(_));
            yield Ok(match event {
                Event::Stdout(c) => sse("stdout", serde_json::json!({ "text": out.push(&c.data) })),
                Event::Stderr(c) => sse("stderr", serde_json::json!({ "text": err.push(&c.data) })),
                Event::Result(r) => sse("result", serde_json::json!({ "data": mime_bundle(r.data) })),
                Event::Display(d) => sse("display", serde_json::json!({ "data": mime_bundle(d.data) })),
                Event::Error(e) => sse("error", serde_json::json!({
                    "name": e.name, "value": e.value, "traceback": e.traceback
                })),
                Event::Completion(c) => {
                    let mut collector = Collector::default();
                    collector.push(Event::Completion(c));
                    let v = collector.finish().unwrap_or_default();
                    sse("completion", serde_json::json!({
                        "status": v.status, "success": v.success, "exit_code": v.exit_code,
                        "execution_time": v.execution_time, "cpu_time": v.cpu_time,
                        "state_lost": v.state_lost, "output_truncated": v.output_truncated,
                        "message": v.message,
                    }))
                }
            });
            if done {
                break;
            }
        }
    };
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

fn sse(name: &'static str, data: serde_json::Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

/// The multipart form of `/upload`, for the OpenAPI document. The text fields must come
/// before the file, as the SDK sends them.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    session_id: String,
    /// Absolute path in the VM; parent directories are created.
    remote_path: String,
    /// Only `false` (directory uploads are not supported).
    recursive: Option<String>,
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
}

#[utoipa::path(post, path = "/upload", tag = "files",
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 200, body = UploadView), (status = 404, body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn upload(State(s): Shared, req: Request) -> Result<Json<UploadView>, ApiError> {
    let key = ApiKey::from_request(req.headers(), None)?;
    let idle = s.limits.client_idle;
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::BadBody(e.body_text()))?;
    let (mut session_id, mut remote_path) = (None, None);
    let spooled = loop {
        let field = tokio::time::timeout(idle, form.next_field())
            .await
            .map_err(|_| ApiError::BodyTimeout(idle.as_secs()))?
            .map_err(|e| ApiError::BadBody(e.body_text()))?;
        let Some(mut field) = field else {
            return Err(ApiError::invalid("file", "is required"));
        };
        match field.name().unwrap_or_default() {
            "session_id" => session_id = Some(small_field(&mut field, idle).await?),
            "remote_path" => remote_path = Some(small_field(&mut field, idle).await?),
            "recursive" => {
                if small_field(&mut field, idle)
                    .await?
                    .eq_ignore_ascii_case("true")
                {
                    return Err(ApiError::invalid(
                        "recursive",
                        "directory uploads are not supported; upload files one by one",
                    ));
                }
            }
            "file" => {
                if session_id.is_none() || remote_path.is_none() {
                    return Err(ApiError::invalid(
                        "file",
                        "session_id and remote_path must come before the file in the form",
                    ));
                }
                break spool(&mut field, s.limits.max_upload_bytes, idle).await?;
            }
            _ => {
                small_field(&mut field, idle).await?;
            }
        }
    };
    let session_id = session_id.unwrap_or_default();
    let remote_path = remote_path.unwrap_or_default();
    check_guest_path("remote_path", &remote_path)?;
    let (mut file, size) = spooled;
    let header = pb::UploadFileRequest {
        part: Some(pb::upload_file_request::Part::Header(
            pb::UploadFileHeader {
                session_id,
                file: Some(UploadHeader {
                    path: remote_path.clone(),
                    size: Some(size),
                    ..Default::default()
                }),
            },
        )),
    };
    // The size goes in the header: should a read here fail, the upload ends short and
    // session-manager rejects it whole instead of writing part of a file.
    let outbound = async_stream::stream! {
        yield header;
        let mut buf = vec![0u8; MAX_CHUNK_BYTES];
        loop {
            let n = match read_full(&mut file, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            yield pb::UploadFileRequest {
                part: Some(pb::upload_file_request::Part::Data(Bytes::copy_from_slice(&buf[..n]))),
            };
        }
    };
    // One second per MiB on top of the call timeout: generous on any network.
    let bound = s.limits.call_timeout + Duration::from_secs(size >> 20);
    let mut call = tonic::Request::new(outbound);
    call.set_timeout(bound);
    let result = tokio::time::timeout(bound, s.backend.client(&key)?.upload_file(call))
        .await
        .map_err(|_| ApiError::UpstreamTimeout(bound.as_secs()))??
        .into_inner()
        .result
        .unwrap_or_default();
    let info = result.info.unwrap_or_default();
    Ok(Json(UploadView {
        success: true,
        status: "success".into(),
        remote_path: if info.path.is_empty() {
            remote_path
        } else {
            info.path
        },
        size: info.size,
        sha256: result.sha256,
    }))
}

fn check_guest_path(field: &'static str, path: &str) -> Result<(), ApiError> {
    if !path.starts_with('/') {
        return Err(ApiError::invalid(
            field,
            format!("{path:?} is not an absolute path in the VM"),
        ));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(ApiError::invalid(
            field,
            format!("longer than {MAX_PATH_BYTES} bytes"),
        ));
    }
    Ok(())
}

async fn next_chunk(
    field: &mut axum::extract::multipart::Field<'_>,
    idle: Duration,
) -> Result<Option<Bytes>, ApiError> {
    tokio::time::timeout(idle, field.chunk())
        .await
        .map_err(|_| ApiError::BodyTimeout(idle.as_secs()))?
        .map_err(|e| ApiError::BadBody(e.body_text()))
}

async fn small_field(
    field: &mut axum::extract::multipart::Field<'_>,
    idle: Duration,
) -> Result<String, ApiError> {
    let name = field.name().unwrap_or_default().to_owned();
    let mut buf = Vec::new();
    while let Some(chunk) = next_chunk(field, idle).await? {
        buf.extend_from_slice(&chunk);
        if buf.len() > MAX_FORM_FIELD_BYTES {
            return Err(ApiError::BadBody(format!(
                "form field {name:?} is over {MAX_FORM_FIELD_BYTES} bytes"
            )));
        }
    }
    String::from_utf8(buf)
        .map_err(|_| ApiError::BadBody(format!("form field {name:?} is not UTF-8")))
}

/// Writes the file part to an unnamed temporary file (gone when dropped), so the upload
/// can be sent with its exact size.
async fn spool(
    field: &mut axum::extract::multipart::Field<'_>,
    limit: u64,
    idle: Duration,
) -> Result<(tokio::fs::File, u64), ApiError> {
    let internal = |e: std::io::Error| ApiError::Internal(format!("spooling the upload: {e}"));
    let mut file = tokio::fs::File::from_std(tempfile::tempfile().map_err(internal)?);
    let mut size: u64 = 0;
    while let Some(chunk) = next_chunk(field, idle).await? {
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::TooLarge {
                what: "the file",
                size,
                limit,
            });
        }
        file.write_all(&chunk).await.map_err(internal)?;
    }
    file.flush().await.map_err(internal)?;
    file.rewind().await.map_err(internal)?;
    Ok((file, size))
}

async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]).await? {
            0 => break,
            m => n += m,
        }
    }
    Ok(n)
}

#[utoipa::path(post, path = "/download", tag = "files",
    request_body(content = DownloadBody, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = DownloadView), (status = 404, body = ErrorBody),
              (status = 413, body = ErrorBody)))]
async fn download(
    State(s): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<DownloadView>, ApiError> {
    use base64::Engine as _;
    let key = ApiKey::from_request(&headers, None)?;
    let body: DownloadBody = parse(&headers, &body)?;
    check_guest_path("filename", &body.filename)?;
    let limit = s.limits.max_download_bytes;
    let idle = s.limits.call_timeout;
    let timed_out = || ApiError::UpstreamTimeout(idle.as_secs());
    let req = pb::DownloadFileRequest {
        session_id: body.session_id,
        path: body.filename.clone(),
    };
    let mut stream = tokio::time::timeout(idle, s.backend.client(&key)?.download_file(req))
        .await
        .map_err(|_| timed_out())??
        .into_inner();
    let mut data = Vec::new();
    // Each message within the call timeout: a stalled transfer ends, a long one does not.
    while let Some(msg) = tokio::time::timeout(idle, stream.message())
        .await
        .map_err(|_| timed_out())??
    {
        match msg.part {
            Some(pb::download_file_response::Part::Info(info)) if info.size > limit => {
                return Err(ApiError::TooLarge {
                    what: "the file",
                    size: info.size,
                    limit,
                });
            }
            Some(pb::download_file_response::Part::Data(chunk)) => {
                if (data.len() + chunk.len()) as u64 > limit {
                    return Err(ApiError::TooLarge {
                        what: "the file",
                        size: (data.len() + chunk.len()) as u64,
                        limit,
                    });
                }
                data.extend_from_slice(&chunk);
            }
            _ => {}
        }
    }
    Ok(Json(DownloadView {
        status: "success".into(),
        filename: body.filename,
        size: data.len() as u64,
        content: base64::engine::general_purpose::STANDARD.encode(&data),
    }))
}

#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = CreateSessionBody,
    params(("wait" = Option<bool>, Query, description = "accepted; creation always waits")),
    responses((status = 200, body = SessionView), (status = 401, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn create_vm(
    State(s): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<SessionView>, ApiError> {
    // `wait` is not read: creating a session always returns once it is ACTIVE.
    create(&s, &headers, &body).await.map(Json)
}

#[utoipa::path(get, path = "/v1/vms", tag = "vms",
    responses((status = 200, description = "the caller's active sessions", body = Vec<SessionView>)))]
async fn list_vms(
    State(s): Shared,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<SessionView>>, ApiError> {
    list(&s, &headers, raw, pb::SessionStatus::Active)
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/v1/vms/", tag = "vms",
    responses((status = 200, description = "the caller's sessions in any state", body = Vec<SessionView>)))]
async fn list_all_vms(
    State(s): Shared,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<SessionView>>, ApiError> {
    list(&s, &headers, raw, pb::SessionStatus::Unspecified)
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "vm id (the session id)")),
    responses((status = 200, body = SessionView), (status = 404, body = ErrorBody)))]
async fn get_vm(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    Ok(Json(get_session_pb(&s, &key, &id).await?.into()))
}

#[utoipa::path(delete, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "vm id (the session id)")),
    responses((status = 200, body = SessionView), (status = 404, body = ErrorBody)))]
async fn delete_vm(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    Ok(Json(delete(&s, &key, id).await?.into()))
}

fn answered<T>(what: &str, value: Option<T>) -> Result<T, ApiError> {
    value.ok_or_else(|| ApiError::Internal(format!("{what} answered without a result")))
}

#[utoipa::path(post, path = "/v1/vms/{id}/suspend", tag = "vms",
    params(("id" = String, Path, description = "vm id (the session id)")),
    responses((status = 200, description = "the VM, `suspended`", body = SessionView),
              (status = 404, body = ErrorBody),
              (status = 409, description = "not active (nor already suspended)", body = ErrorBody)))]
async fn suspend_vm(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let resp = s
        .backend
        .client(&key)?
        .suspend_session(request(
            pb::SuspendSessionRequest { session_id: id },
            s.limits.create_timeout,
        ))
        .await?
        .into_inner();
    Ok(Json(answered("SuspendSession", resp.session)?.into()))
}

#[utoipa::path(post, path = "/v1/vms/{id}/resume", tag = "vms",
    params(("id" = String, Path, description = "vm id (the session id); it keeps its id"),
           ("wait" = Option<bool>, Query, description = "accepted; resuming always waits")),
    responses((status = 200, description = "the VM, `active`", body = SessionView),
              (status = 404, body = ErrorBody),
              (status = 409, description = "not suspended (nor already active)", body = ErrorBody)))]
async fn resume_vm(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    // `wait` is not read: ResumeSession returns once the session is ACTIVE.
    let key = ApiKey::from_request(&headers, None)?;
    let resp = s
        .backend
        .client(&key)?
        .resume_session(request(
            pb::ResumeSessionRequest { session_id: id },
            s.limits.create_timeout,
        ))
        .await?
        .into_inner();
    Ok(Json(answered("ResumeSession", resp.session)?.into()))
}

#[utoipa::path(post, path = "/v1/vms/{id}/snapshot", tag = "snapshots",
    request_body = SnapshotBody,
    params(("id" = String, Path, description = "vm id (the session id); it runs on"),
           ("wait" = Option<bool>, Query, description = "accepted; the snapshot is ready when this answers")),
    responses((status = 200, body = SnapshotView), (status = 404, body = ErrorBody),
              (status = 409, description = "the VM is not active", body = ErrorBody),
              (status = 422, body = ErrorBody),
              (status = 429, description = "the snapshot quota is used up", body = ErrorBody)))]
async fn snapshot_vm(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SnapshotView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let body: SnapshotBody = parse(&headers, &body)?;
    let resp = s
        .backend
        .client(&key)?
        .snapshot_session(request(body.to_request(id), s.limits.create_timeout))
        .await?
        .into_inner();
    Ok(Json(answered("SnapshotSession", resp.snapshot)?.into()))
}

#[utoipa::path(post, path = "/v1/vms/{id}/clone", tag = "vms", request_body = CloneBody,
    params(("id" = String, Path, description = "vm id (the session id) to clone; it runs on"),
           ("wait" = Option<bool>, Query, description = "accepted; the clone is active when this answers")),
    responses((status = 200, description = "the new VM", body = SessionView),
              (status = 404, body = ErrorBody),
              (status = 409, description = "the VM is not active", body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn clone_vm(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SessionView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let body: CloneBody = parse(&headers, &body)?;
    let resp = s
        .backend
        .client(&key)?
        .fork_session(request(body.to_request(id), s.limits.create_timeout))
        .await?
        .into_inner();
    let clone = resp.sessions.into_iter().next();
    Ok(Json(answered("ForkSession", clone)?.into()))
}

/// Most snapshots one `GET /v1/snapshots` returns (a tenant's quota is far below).
const MAX_LISTED_SNAPSHOTS: usize = 10_000;

/// Largest page asked of ListSnapshots.
const SNAPSHOT_PAGE: usize = 1000;

#[derive(Deserialize)]
struct SnapshotListQuery {
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots",
    params(("limit" = Option<u32>, Query, description = "at most this many (1 to 10000); all (up to 10000) when absent"),
           ("type" = Option<String>, Query, description = "accepted and ignored: every snapshot is a VM's")),
    responses((status = 200, description = "the caller's snapshots, newest first", body = Vec<SnapshotView>)))]
async fn list_snapshots(
    State(s): Shared,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<SnapshotView>>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    // Keys other than `limit` (the SDK's `type`, say) are ignored.
    let q: SnapshotListQuery = query(raw)?;
    let cap = match q.limit {
        None => MAX_LISTED_SNAPSHOTS,
        Some(n @ 1..=MAX_LISTED_SNAPSHOTS) => n,
        Some(n) => {
            return Err(ApiError::invalid(
                "limit",
                format!("{n} is not 1 to {MAX_LISTED_SNAPSHOTS}"),
            ));
        }
    };
    let mut client = s.backend.client(&key)?;
    let mut out: Vec<SnapshotView> = Vec::new();
    let mut page_token = String::new();
    // Bounded by `cap`: every page but the last brings at least one snapshot.
    loop {
        let page_size = (cap - out.len()).min(SNAPSHOT_PAGE) as i32;
        let resp = client
            .list_snapshots(request(
                pb::ListSnapshotsRequest {
                    page_size,
                    page_token,
                },
                s.limits.call_timeout,
            ))
            .await?
            .into_inner();
        let got = resp.snapshots.len();
        out.extend(resp.snapshots.into_iter().map(SnapshotView::from));
        if resp.next_page_token.is_empty() || got == 0 || out.len() >= cap {
            break;
        }
        page_token = resp.next_page_token;
    }
    out.truncate(cap);
    Ok(Json(out))
}

#[utoipa::path(get, path = "/v1/snapshots/{id}", tag = "snapshots",
    params(("id" = String, Path, description = "snapshot id")),
    responses((status = 200, body = SnapshotView), (status = 404, body = ErrorBody)))]
async fn get_snapshot(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SnapshotView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let resp = s
        .backend
        .client(&key)?
        .get_snapshot(request(
            pb::GetSnapshotRequest { snapshot_id: id },
            s.limits.call_timeout,
        ))
        .await?
        .into_inner();
    Ok(Json(answered("GetSnapshot", resp.snapshot)?.into()))
}

#[utoipa::path(delete, path = "/v1/snapshots/{id}", tag = "snapshots",
    params(("id" = String, Path, description = "snapshot id")),
    responses((status = 200, description = "the snapshot as it was; VMs made from it run on",
               body = SnapshotView),
              (status = 404, body = ErrorBody)))]
async fn delete_snapshot(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SnapshotView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let resp = s
        .backend
        .client(&key)?
        .delete_snapshot(request(
            pb::DeleteSnapshotRequest { snapshot_id: id },
            s.limits.call_timeout,
        ))
        .await?
        .into_inner();
    Ok(Json(answered("DeleteSnapshot", resp.snapshot)?.into()))
}

/// Why `POST /v1/snapshots` is refused.
const NO_IMAGE_SNAPSHOTS: &str = "snapshots are not built from OCI images here: take one of \
a running VM with POST /v1/vms/{id}/snapshot, then start VMs from it with POST /v1/vms \
{\"snapshot_id\": ...}";

/// `POST /v1/snapshots` (InstaVM builds a snapshot from an OCI image): not offered.
#[utoipa::path(post, path = "/v1/snapshots", tag = "snapshots",
    responses((status = 501, description = "always: snapshot a running VM instead", body = ErrorBody)))]
async fn build_snapshot(headers: HeaderMap) -> Result<Json<SnapshotView>, ApiError> {
    ApiKey::from_request(&headers, None)?;
    Err(ApiError::Unsupported(NO_IMAGE_SNAPSHOTS))
}

#[utoipa::path(get, path = "/v1/egress/session/{id}", tag = "egress",
    params(("id" = String, Path, description = "session id (`/v1/egress/vm/{id}` is the same)")),
    responses((status = 200, body = EgressView), (status = 404, body = ErrorBody)))]
async fn get_egress(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<EgressView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let resp = s
        .backend
        .client(&key)?
        .get_egress_policy(request(
            pb::GetEgressPolicyRequest {
                session_id: id.clone(),
            },
            s.limits.call_timeout,
        ))
        .await?
        .into_inner();
    Ok(Json(EgressView::new(id, resp.egress.unwrap_or_default())))
}

#[utoipa::path(post, path = "/v1/egress/session/{id}", tag = "egress", request_body = EgressBody,
    params(("id" = String, Path, description = "session id (`/v1/egress/vm/{id}` is the same)")),
    responses((status = 200, body = EgressView), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn set_egress(
    State(s): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<EgressView>, ApiError> {
    let key = ApiKey::from_request(&headers, None)?;
    let body: EgressBody = parse(&headers, &body)?;
    let resp = s
        .backend
        .client(&key)?
        .update_egress_policy(request(
            pb::UpdateEgressPolicyRequest {
                session_id: id.clone(),
                egress: Some(body.to_policy()),
            },
            s.limits.call_timeout,
        ))
        .await?
        .into_inner();
    Ok(Json(EgressView::new(id, resp.egress.unwrap_or_default())))
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

struct ApiKeyHeader;

impl utoipa::Modify for ApiKeyHeader {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey as Key, ApiKeyValue, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(Key::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Capsa InstaVM-compatible API",
         description = "InstaVM's REST API over Capsa sessions; errors are {\"detail\": ...}."),
    paths(create_session, get_session, session_status, session_usage, list_sandboxes, kill,
          execute, execute_async, get_execution, execute_stream, upload, download,
          create_vm, list_vms, list_all_vms, get_vm, delete_vm, suspend_vm, resume_vm,
          snapshot_vm, clone_vm, list_snapshots, get_snapshot, delete_snapshot, build_snapshot,
          get_egress, set_egress),
    modifiers(&ApiKeyHeader),
    security(("api_key" = []))
)]
pub struct ApiDoc;

async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use tower::ServiceExt as _;

    /// A router whose backends are never reached: every request here is refused before.
    fn app() -> Router {
        let limits = crate::Limits {
            max_body_bytes: 2 << 20,
            client_idle: Duration::from_secs(2),
            ..Default::default()
        };
        router(Arc::new(
            AppState::new(
                "http://127.0.0.1:1",
                "redis://127.0.0.1:1/",
                limits,
                &Default::default(),
            )
            .unwrap(),
        ))
    }

    async fn call(req: axum::http::Request<Body>) -> (StatusCode, serde_json::Value) {
        let resp = app().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn post(path: &str, key: Option<&str>, body: impl Into<Body>) -> axum::http::Request<Body> {
        let mut b = axum::http::Request::post(path).header("content-type", "application/json");
        if let Some(k) = key {
            b = b.header("x-api-key", k);
        }
        b.body(body.into()).unwrap()
    }

    fn detail(json: &serde_json::Value) -> &str {
        json["detail"].as_str().unwrap()
    }

    #[tokio::test]
    async fn a_request_without_a_key_is_401() {
        let (status, json) = call(post(
            "/execute",
            None,
            r#"{"session_id":"s","command":"1"}"#,
        ))
        .await;
        assert_eq!(status, 401);
        assert!(detail(&json).contains("X-API-Key"), "{json}");
        let get = axum::http::Request::get("/v1/sessions/session/s")
            .body(Body::empty())
            .unwrap();
        assert_eq!(call(get).await.0, 401);
        let (status, _) = call(post("/v1/sessions/session", None, "{}")).await;
        assert_eq!(status, 401, "no key in the header nor in the body");
    }

    #[tokio::test]
    async fn bad_json_is_422_naming_the_problem() {
        let (status, json) = call(post("/execute", Some("k"), "{not json")).await;
        assert_eq!(status, 422);
        assert!(detail(&json).starts_with("invalid request body"), "{json}");
        let (status, json) = call(post("/execute", Some("k"), r#"{"session_id":"s"}"#)).await;
        assert_eq!(status, 422);
        assert!(detail(&json).contains("command"), "{json}");
        let (status, json) = call(post(
            "/execute",
            Some("k"),
            r#"{"session_id":"s","command":"1","language":"cobol"}"#,
        ))
        .await;
        assert_eq!(status, 422);
        assert!(detail(&json).starts_with("language: "), "{json}");
    }

    #[tokio::test]
    async fn oversized_commands_and_bodies_are_413_with_a_reason() {
        // Over the body limit: refused while reading, before any parsing.
        let huge = serde_json::json!({"session_id": "s", "command": "x".repeat(10 << 20)});
        let (status, json) = call(post("/execute", Some("k"), huge.to_string())).await;
        assert_eq!(status, 413);
        assert!(
            detail(&json).contains("a command is at most 1 MiB"),
            "{json}"
        );
        // Within the body limit, over the command limit.
        let big = serde_json::json!({"session_id": "s", "command": "x".repeat((1 << 20) + 1)});
        let (status, json) = call(post("/execute_async", Some("k"), big.to_string())).await;
        assert_eq!(status, 413);
        assert_eq!(
            detail(&json),
            "command is 1048577 bytes; at most 1048576 are accepted"
        );
    }

    #[tokio::test]
    async fn a_body_that_stalls_is_cut_off() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        tx.send(Ok(Bytes::from_static(b"{\"session_id\":")))
            .await
            .unwrap();
        let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        let started = std::time::Instant::now();
        let (status, json) = call(post("/execute", Some("k"), body)).await;
        assert_eq!(status, 408, "{json}");
        assert!(started.elapsed() < Duration::from_secs(30));
        drop(tx);
    }

    #[tokio::test]
    async fn session_manager_down_is_503() {
        let get = axum::http::Request::get("/v1/sessions/session/s")
            .header("x-api-key", "k")
            .body(Body::empty())
            .unwrap();
        let (status, json) = call(get).await;
        assert_eq!(status, 503, "{json}");
        assert!(
            detail(&json).starts_with("unavailable, try again"),
            "{json}"
        );
    }

    #[tokio::test]
    async fn downloads_need_an_absolute_path() {
        let req = axum::http::Request::post("/download")
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-api-key", "k")
            .body(Body::from("filename=out.png&session_id=s"))
            .unwrap();
        let (status, json) = call(req).await;
        assert_eq!(status, 422);
        assert!(detail(&json).starts_with("filename: "), "{json}");
    }

    #[tokio::test]
    async fn uploads_need_the_fields_before_the_file() {
        let body = "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n\
                    data\r\n--b--\r\n";
        let req = axum::http::Request::post("/upload")
            .header("content-type", "multipart/form-data; boundary=b")
            .header("x-api-key", "k")
            .body(Body::from(body))
            .unwrap();
        let (status, json) = call(req).await;
        assert_eq!(status, 422);
        assert!(
            detail(&json).contains("must come before the file"),
            "{json}"
        );
    }

    fn with_key(b: axum::http::request::Builder) -> axum::http::Request<Body> {
        b.header("x-api-key", "k").body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn building_a_snapshot_from_an_image_is_501_saying_what_to_do() {
        let (status, _) = call(post("/v1/snapshots", None, r#"{"oci_image":"python:3"}"#)).await;
        assert_eq!(status, 401, "the key is still checked first");
        let (status, json) = call(post(
            "/v1/snapshots",
            Some("k"),
            r#"{"oci_image":"python:3","name":"n"}"#,
        ))
        .await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
        assert!(
            detail(&json).contains("POST /v1/vms/{id}/snapshot"),
            "{json}"
        );
    }

    #[tokio::test]
    async fn vm_lifecycle_and_snapshot_routes_check_input_before_calling_out() {
        use axum::http::Request as R;
        // The SDK's `type` and `wait` are accepted: these reach the (absent) backend.
        for req in [
            with_key(R::get("/v1/snapshots?type=user")),
            with_key(R::get("/v1/snapshots?limit=5")),
            with_key(R::get("/v1/snapshots/snap-1")),
            with_key(R::delete("/v1/snapshots/snap-1")),
            with_key(R::post("/v1/vms/s/suspend")),
            with_key(R::post("/v1/vms/s/resume?wait=true")),
            post(
                "/v1/vms/s/snapshot?wait=true",
                Some("k"),
                r#"{"name":"base"}"#,
            ),
            post("/v1/vms/s/snapshot", Some("k"), ""),
            post(
                "/v1/vms/s/clone?wait=false",
                Some("k"),
                r#"{"snapshot_name":"x"}"#,
            ),
        ] {
            let what = format!("{} {}", req.method(), req.uri());
            let (status, json) = call(req).await;
            assert_eq!(status, 503, "{what}: {json}");
        }
        let (status, json) = call(with_key(R::get("/v1/snapshots?limit=0"))).await;
        assert_eq!(status, 422);
        assert!(detail(&json).starts_with("limit: "), "{json}");
        let (status, json) = call(post("/v1/vms/s/snapshot", Some("k"), r#"{"name":5}"#)).await;
        assert_eq!(status, 422);
        assert!(detail(&json).starts_with("invalid request body"), "{json}");
        let (status, _) = call(post(
            "/v1/vms/s/clone",
            Some("k"),
            r#"{"vm_lifetime_seconds":-1}"#,
        ))
        .await;
        assert_eq!(status, 422);
        for req in [
            R::post("/v1/vms/s/suspend").body(Body::empty()).unwrap(),
            R::post("/v1/vms/s/resume").body(Body::empty()).unwrap(),
            post("/v1/vms/s/snapshot", None, "{}"),
            post("/v1/vms/s/clone", None, "{}"),
            R::get("/v1/snapshots").body(Body::empty()).unwrap(),
            R::delete("/v1/snapshots/snap-1")
                .body(Body::empty())
                .unwrap(),
        ] {
            let what = format!("{} {}", req.method(), req.uri());
            assert_eq!(call(req).await.0, 401, "{what}");
        }
    }

    #[tokio::test]
    async fn unknown_routes_are_404_with_detail_and_the_openapi_document_lists_every_route() {
        let get = |p: &str| axum::http::Request::get(p).body(Body::empty()).unwrap();
        let (status, json) = call(get("/nope")).await;
        assert_eq!(
            (status, detail(&json)),
            (StatusCode::NOT_FOUND, "no such route")
        );
        let (status, doc) = call(get("/openapi.json")).await;
        assert_eq!(status, 200);
        for path in [
            "/v1/sessions/session",
            "/execute",
            "/execute_async",
            "/v1/executions/{id}",
            "/upload",
            "/download",
            "/kill",
            "/v1/vms",
            "/v1/vms/{id}",
            "/v1/egress/session/{id}",
            "/v1/execute/stream",
            "/v1/vms/{id}/suspend",
            "/v1/vms/{id}/resume",
            "/v1/vms/{id}/snapshot",
            "/v1/vms/{id}/clone",
            "/v1/snapshots",
            "/v1/snapshots/{id}",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        for (path, method) in [
            ("/v1/vms/{id}", "delete"),
            ("/v1/snapshots", "get"),
            ("/v1/snapshots", "post"),
            ("/v1/snapshots/{id}", "get"),
            ("/v1/snapshots/{id}", "delete"),
        ] {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} missing"
            );
        }
        assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
    }
}
