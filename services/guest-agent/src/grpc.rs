//! The AgentService adapter: validates and translates proto messages into domain calls
//! (kernels, files, stats) and domain results and errors back. No business logic here.
//!
//! Streams: Execute and DownloadFile answer through bounded channels fed by a task, so a
//! slow client slows the producer instead of growing a buffer. The Execute stream holds a
//! drop guard on the execute's cancellation token: when the client goes away, tonic drops
//! the stream and the code is interrupted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use capsa_proto::agent::v1 as pb;
use capsa_proto::agent::v1::agent_service_server::AgentService;
use capsa_proto::common::v1 as common;
use futures::{Stream, StreamExt as _};
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::error::Error;
use crate::files::{self, FileInfo, FileKind};
use crate::kernel::{Completion, Event, ExecuteRequest, Kernels, Language};
use crate::stats;

/// Largest `code` accepted.
pub const MAX_CODE: usize = 1024 * 1024;
/// `max_output_bytes` when the request says 0.
pub const DEFAULT_MAX_OUTPUT: u64 = 32 * 1024 * 1024;
/// Largest `max_output_bytes` accepted.
pub const MAX_OUTPUT_LIMIT: u64 = 1024 * 1024 * 1024;
/// Longest timeout accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Events buffered between a kernel and a slow client.
const EXECUTE_BUFFER: usize = 16;
/// Chunks buffered between the file reader and a slow client.
const DOWNLOAD_BUFFER: usize = 4;

type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct AgentApi {
    kernels: Arc<Kernels>,
    default_timeout: Duration,
    /// Parent of every execute's token: cancelled when the agent shuts down.
    shutdown: CancellationToken,
}

impl AgentApi {
    pub fn new(
        kernels: Arc<Kernels>,
        default_timeout: Duration,
        shutdown: CancellationToken,
    ) -> AgentApi {
        AgentApi {
            kernels,
            default_timeout,
            shutdown,
        }
    }
}

fn status(e: Error) -> Status {
    capsa_grpc::to_status(&e)
}

/// Session and per-call env: names a shell can export, values without NUL.
fn check_env(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for (k, v) in env {
        let valid_name = k
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return Err(Error::invalid(
                "env",
                format!("{k:?} is not a valid variable name"),
            ));
        }
        if v.contains('\0') {
            return Err(Error::invalid(
                "env",
                format!("the value of {k} contains a NUL byte"),
            ));
        }
        out.insert(k, v);
    }
    Ok(out)
}

pub fn execute_request(
    spec: Option<common::ExecuteSpec>,
    default_timeout: Duration,
) -> Result<ExecuteRequest, Error> {
    let spec = spec.ok_or_else(|| Error::invalid("spec", "is missing"))?;
    let language = match common::Language::try_from(spec.language) {
        Ok(common::Language::Unspecified | common::Language::Python) => Language::Python,
        Ok(common::Language::Shell) => Language::Shell,
        Err(_) => {
            return Err(Error::invalid(
                "language",
                format!("unknown value {}", spec.language),
            ));
        }
    };
    if spec.code.len() > MAX_CODE {
        return Err(Error::invalid(
            "code",
            format!("is {} bytes; the limit is {MAX_CODE}", spec.code.len()),
        ));
    }
    let timeout = match &spec.timeout {
        None => default_timeout,
        Some(d) => match capsa_proto::time::from_duration(d) {
            Some(t) if !t.is_zero() && t <= MAX_TIMEOUT => t,
            _ => {
                return Err(Error::invalid(
                    "timeout",
                    format!("must be positive and at most {MAX_TIMEOUT:?}"),
                ));
            }
        },
    };
    let max_output_bytes = match spec.max_output_bytes {
        0 => DEFAULT_MAX_OUTPUT,
        n if n <= MAX_OUTPUT_LIMIT => n,
        n => {
            return Err(Error::invalid(
                "max_output_bytes",
                format!("{n} exceeds {MAX_OUTPUT_LIMIT}"),
            ));
        }
    };
    let cwd = if spec.cwd.is_empty() {
        None
    } else {
        Some(files::check_path("cwd", &spec.cwd)?)
    };
    if let Some(dir) = &cwd {
        if !dir.is_dir() {
            return Err(Error::invalid(
                "cwd",
                format!("{} is not an existing directory", dir.display()),
            ));
        }
    }
    Ok(ExecuteRequest {
        language,
        code: spec.code,
        timeout,
        env: check_env(spec.env)?,
        cwd: cwd.map(|p| p.to_string_lossy().into_owned()),
        max_output_bytes,
    })
}

fn event_to_proto(event: Event) -> pb::ExecuteResponse {
    use common::execute_event::Event as E;
    let event = match event {
        Event::Stdout(data) => E::Stdout(common::OutputChunk { data }),
        Event::Stderr(data) => E::Stderr(common::OutputChunk { data }),
        Event::Display(data) => E::Display(common::DisplayData {
            data: data.into_iter().collect(),
        }),
        Event::Result(data) => E::Result(common::ExecuteResult {
            data: data.into_iter().collect(),
        }),
        Event::Error {
            name,
            value,
            traceback,
        } => E::Error(common::ExecuteError {
            name,
            value,
            traceback,
        }),
        Event::Completion(c) => E::Completion(completion_to_proto(c)),
    };
    pb::ExecuteResponse {
        event: Some(common::ExecuteEvent { event: Some(event) }),
    }
}

fn completion_to_proto(c: Completion) -> common::Completion {
    use crate::kernel::Status as S;
    let status = match c.status {
        S::Ok => common::CompletionStatus::Ok,
        S::Error => common::CompletionStatus::Error,
        S::Timeout => common::CompletionStatus::Timeout,
        S::Interrupted => common::CompletionStatus::Interrupted,
        S::KernelDied => common::CompletionStatus::KernelDied,
    };
    let d = capsa_proto::time::duration;
    common::Completion {
        status: status as i32,
        exit_code: c.exit_code,
        wall_time: Some(d(c.wall_time)),
        cpu_time: Some(d(c.cpu_time)),
        interpreter_time: Some(d(c.interpreter_time)),
        state_lost: c.state_lost,
        output_truncated: c.output_truncated,
        output_bytes: c.output_bytes,
        message: c.message,
    }
}

fn info_to_proto(i: FileInfo) -> common::FileInfo {
    let kind = match i.kind {
        FileKind::Regular => common::FileType::Regular,
        FileKind::Directory => common::FileType::Directory,
        FileKind::Symlink => common::FileType::Symlink,
        FileKind::Other => common::FileType::Other,
    };
    common::FileInfo {
        path: i.path,
        name: i.name,
        r#type: kind as i32,
        size: i.size,
        mode: i.mode,
        modify_time: i.modified.map(capsa_proto::time::timestamp),
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn configure(
        &self,
        request: Request<pb::ConfigureRequest>,
    ) -> Result<Response<pb::ConfigureResponse>, Status> {
        let env = check_env(request.into_inner().env).map_err(status)?;
        self.kernels.configure(env).await.map_err(status)?;
        Ok(Response::new(pb::ConfigureResponse {}))
    }

    type ExecuteStream = BoxStream<pb::ExecuteResponse>;

    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let req =
            execute_request(request.into_inner().spec, self.default_timeout).map_err(status)?;
        let (tx, rx) = mpsc::channel(EXECUTE_BUFFER);
        let cancel = self.shutdown.child_token();
        let guard = cancel.clone().drop_guard();
        self.kernels
            .execute(req, tx, cancel)
            .await
            .map_err(status)?;
        let stream = ReceiverStream::new(rx).map(move |item| {
            let _ = &guard; // dropped with the stream: the client went away
            item.map(event_to_proto).map_err(status)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn upload_file(
        &self,
        request: Request<Streaming<pb::UploadFileRequest>>,
    ) -> Result<Response<pb::UploadFileResponse>, Status> {
        use pb::upload_file_request::Part;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(pb::UploadFileRequest {
                part: Some(Part::Header(h)),
            }) => h,
            _ => {
                return Err(status(Error::invalid(
                    "header",
                    "the first message must be the upload header",
                )));
            }
        };
        let span = tracing::info_span!("upload", path = %header.path);
        async move {
            let mut upload = files::Upload::begin(&header.path, header.mode, header.no_overwrite)
                .await
                .map_err(status)?;
            while let Some(msg) = stream.message().await? {
                match msg.part {
                    Some(Part::Data(data)) => upload.write(&data).await.map_err(status)?,
                    Some(Part::Header(_)) => {
                        return Err(status(Error::invalid(
                            "header",
                            "only the first message may be a header",
                        )));
                    }
                    None => {
                        return Err(status(Error::invalid(
                            "part",
                            "message has neither header nor data",
                        )));
                    }
                }
            }
            let (info, sha256) = upload.finish().await.map_err(status)?;
            tracing::info!(size = info.size, "uploaded");
            Ok(Response::new(pb::UploadFileResponse {
                result: Some(common::UploadResult {
                    info: Some(info_to_proto(info)),
                    sha256,
                }),
            }))
        }
        .instrument(span)
        .await
    }

    type DownloadFileStream = BoxStream<pb::DownloadFileResponse>;

    async fn download_file(
        &self,
        request: Request<pb::DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        use pb::download_file_response::Part;
        let path = request.into_inner().path;
        let (info, mut file) = files::open_download(&path).await.map_err(status)?;
        let (tx, rx) = mpsc::channel(DOWNLOAD_BUFFER);
        let first = pb::DownloadFileResponse {
            part: Some(Part::Info(info_to_proto(info))),
        };
        tokio::spawn(async move {
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let mut chunk = BytesMut::with_capacity(files::MAX_CHUNK);
                while chunk.len() < files::MAX_CHUNK {
                    match file.read_buf(&mut chunk).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            let _ = tx.send(Err(status(Error::fs("read", &path, e)))).await;
                            return;
                        }
                    }
                }
                if chunk.is_empty() {
                    return;
                }
                let last = chunk.len() < files::MAX_CHUNK;
                let msg = pb::DownloadFileResponse {
                    part: Some(Part::Data(chunk.freeze())),
                };
                if tx.send(Ok(msg)).await.is_err() || last {
                    return; // client gone, or end of file
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_files(
        &self,
        request: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let files = files::list(&request.into_inner().path)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListFilesResponse {
            files: files.into_iter().map(info_to_proto).collect(),
        }))
    }

    async fn get_file_info(
        &self,
        request: Request<pb::GetFileInfoRequest>,
    ) -> Result<Response<pb::GetFileInfoResponse>, Status> {
        let info = files::info(&request.into_inner().path)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetFileInfoResponse {
            info: Some(info_to_proto(info)),
        }))
    }

    async fn make_directory(
        &self,
        request: Request<pb::MakeDirectoryRequest>,
    ) -> Result<Response<pb::MakeDirectoryResponse>, Status> {
        let r = request.into_inner();
        let info = files::make_dir(&r.path, r.mode).await.map_err(status)?;
        Ok(Response::new(pb::MakeDirectoryResponse {
            info: Some(info_to_proto(info)),
        }))
    }

    async fn remove_file(
        &self,
        request: Request<pb::RemoveFileRequest>,
    ) -> Result<Response<pb::RemoveFileResponse>, Status> {
        let r = request.into_inner();
        files::remove(&r.path, r.recursive).await.map_err(status)?;
        Ok(Response::new(pb::RemoveFileResponse {}))
    }

    async fn get_stats(
        &self,
        _request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let s = tokio::task::spawn_blocking(stats::read)
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        Ok(Response::new(pb::GetStatsResponse {
            memory_total_bytes: s.memory_total_bytes,
            memory_used_bytes: s.memory_used_bytes,
            process_count: s.process_count,
            uptime_ms: s.uptime_ms,
            kernel_release: s.kernel_release,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(f: impl FnOnce(&mut common::ExecuteSpec)) -> Option<common::ExecuteSpec> {
        let mut s = common::ExecuteSpec {
            code: "1".into(),
            ..Default::default()
        };
        f(&mut s);
        Some(s)
    }

    fn field_of(r: Result<ExecuteRequest, Error>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn defaults_apply() {
        let r = execute_request(spec(|_| {}), Duration::from_secs(60)).unwrap();
        assert_eq!(r.language, Language::Python);
        assert_eq!(r.timeout, Duration::from_secs(60));
        assert_eq!(r.max_output_bytes, DEFAULT_MAX_OUTPUT);
        assert!(r.cwd.is_none());
    }

    #[test]
    fn bad_fields_are_named() {
        let d = Duration::from_secs(60);
        assert_eq!(field_of(execute_request(None, d)), "spec");
        assert_eq!(
            field_of(execute_request(
                spec(|s| s.code = "x".repeat(MAX_CODE + 1)),
                d
            )),
            "code"
        );
        assert_eq!(
            field_of(execute_request(spec(|s| s.language = 9), d)),
            "language"
        );
        assert_eq!(
            field_of(execute_request(
                spec(|s| s.timeout = Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0
                })),
                d
            )),
            "timeout"
        );
        assert_eq!(
            field_of(execute_request(spec(|s| s.cwd = "relative".into()), d)),
            "cwd"
        );
        assert_eq!(
            field_of(execute_request(
                spec(|s| s.cwd = "/no/such/dir/anywhere".into()),
                d
            )),
            "cwd"
        );
        assert_eq!(
            field_of(execute_request(
                spec(|s| {
                    s.env.insert("A-B".into(), "1".into());
                }),
                d
            )),
            "env"
        );
        assert_eq!(
            field_of(execute_request(
                spec(|s| s.max_output_bytes = MAX_OUTPUT_LIMIT + 1),
                d
            )),
            "max_output_bytes"
        );
    }
}
