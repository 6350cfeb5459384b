//! An in-test double of the guest agent's gRPC API, for what the real agent cannot be made
//! to do on demand: never answer, fall silent, end a stream without a completion, flood.
//! It records what reached it (cancelled executes, how uploads ended) for assertions.
//!
//! Execute behaviour by `code`:
//! - `hang`: never answers the call (no response headers);
//! - `silent`: opens the stream and never sends anything;
//! - `park`: sends `parked\n` on stdout, then waits for the caller to go away;
//! - `flood:<MiB>`: that many MiB of stdout in 64 KiB chunks, then a completion;
//! - `lines:<n>`: stdout chunks `0\n` .. `<n-1>\n`, then a completion;
//! - `nocompletion`: one stdout chunk, then the stream ends;
//! - anything else: the code echoed on stdout, then a completion.
//!
//! Downloads of `/gen/<MiB>` stream that many MiB of a fixed pattern; other paths are
//! NOT_FOUND.
//!
//! Processes: WaitProcess waits its whole timeout, then answers DEADLINE_EXCEEDED like the
//! agent ("still running"). A terminal answers `opened`, echoes keystrokes (a resize as
//! "<rows>x<cols>"), and when its input ends sends `exit`; a port connection echoes
//! (port 1 refuses). Both count the request streams that ended, however they ended.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use capsa_proto::agent::v1::agent_service_server::{AgentService, AgentServiceServer};
use capsa_proto::agent::v1::*;
use capsa_proto::common::v1::{
    Completion, CompletionStatus, ExecuteEvent, FileInfo, FileType, OutputChunk, UploadResult,
    execute_event::Event,
};
use capsa_test_support::GrpcDouble;
use futures::Stream;
use sha2::Digest as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};

/// How one upload reached the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadOutcome {
    pub path: String,
    pub bytes: u64,
    /// The request stream ended cleanly (a committed file) rather than by a reset.
    pub clean_end: bool,
}

#[derive(Default)]
pub struct FakeState {
    /// Execute streams whose caller went away while the agent was still running them.
    pub cancelled: AtomicUsize,
    pub uploads: Mutex<Vec<UploadOutcome>>,
    pub env: Mutex<HashMap<String, String>>,
    /// Terminal and port request streams that ended (cleanly or by a reset).
    pub inputs_ended: AtomicUsize,
}

/// The double, serving on a Unix socket until dropped.
pub struct FakeAgent {
    pub state: Arc<FakeState>,
    pub socket: std::path::PathBuf,
    _server: GrpcDouble,
    _dir: tempfile::TempDir,
}

impl FakeAgent {
    pub fn start() -> FakeAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let state = Arc::new(FakeState::default());
        let service = AgentServiceServer::new(Fake {
            state: state.clone(),
        });
        let server = GrpcDouble::start_unix(Routes::new(service), &socket);
        FakeAgent {
            state,
            socket,
            _server: server,
            _dir: dir,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn cancelled(&self) -> usize {
        self.state.cancelled.load(Ordering::SeqCst)
    }

    pub fn uploads(&self) -> Vec<UploadOutcome> {
        self.state.uploads.lock().unwrap().clone()
    }

    pub fn inputs_ended(&self) -> usize {
        self.state.inputs_ended.load(Ordering::SeqCst)
    }
}

struct Fake {
    state: Arc<FakeState>,
}

type Events = mpsc::Sender<Result<ExecuteResponse, Status>>;

fn stdout(data: impl Into<Bytes>) -> Result<ExecuteResponse, Status> {
    let event = Event::Stdout(OutputChunk { data: data.into() });
    Ok(ExecuteResponse {
        event: Some(ExecuteEvent { event: Some(event) }),
    })
}

fn completion() -> Result<ExecuteResponse, Status> {
    let event = Event::Completion(Completion {
        status: CompletionStatus::Ok as i32,
        wall_time: Some(prost_types::Duration {
            seconds: 0,
            nanos: 1_000_000,
        }),
        cpu_time: Some(prost_types::Duration {
            seconds: 0,
            nanos: 500_000,
        }),
        ..Default::default()
    });
    Ok(ExecuteResponse {
        event: Some(ExecuteEvent { event: Some(event) }),
    })
}

/// Runs one scripted execute into `tx`; counts a cancellation when the caller leaves first.
async fn script(code: String, tx: Events, state: Arc<FakeState>) {
    let sent_all = async {
        if code == "silent" {
            std::future::pending::<()>().await;
        } else if code == "park" {
            tx.send(stdout("parked\n")).await.ok()?;
            std::future::pending::<()>().await;
        } else if let Some(mib) = code.strip_prefix("flood:") {
            let chunk = Bytes::from(vec![b'x'; 64 << 10]);
            for _ in 0..mib.parse::<usize>().unwrap() * 16 {
                tx.send(stdout(chunk.clone())).await.ok()?;
            }
            tx.send(completion()).await.ok()?;
        } else if let Some(n) = code.strip_prefix("lines:") {
            for i in 0..n.parse::<usize>().unwrap() {
                tx.send(stdout(format!("{i}\n"))).await.ok()?;
            }
            tx.send(completion()).await.ok()?;
        } else if code == "nocompletion" {
            tx.send(stdout("partial\n")).await.ok()?;
        } else {
            tx.send(stdout(code.clone())).await.ok()?;
            tx.send(completion()).await.ok()?;
        }
        Some(())
    };
    tokio::select! {
        done = sent_all => if done.is_none() {
            state.cancelled.fetch_add(1, Ordering::SeqCst);
        },
        () = tx.closed() => {
            state.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Fake {
    type ExecuteStream = BoxStream<ExecuteResponse>;
    type DownloadFileStream = BoxStream<DownloadFileResponse>;

    async fn configure(
        &self,
        request: Request<ConfigureRequest>,
    ) -> Result<Response<ConfigureResponse>, Status> {
        *self.state.env.lock().unwrap() = request.into_inner().env;
        Ok(Response::new(ConfigureResponse {}))
    }

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let spec = request.into_inner().spec.unwrap_or_default();
        if spec.code == "hang" {
            std::future::pending::<()>().await;
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(script(spec.code, tx, self.state.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn upload_file(
        &self,
        request: Request<Streaming<UploadFileRequest>>,
    ) -> Result<Response<UploadFileResponse>, Status> {
        let mut incoming = request.into_inner();
        let Some(UploadFileRequest {
            part: Some(upload_file_request::Part::Header(header)),
        }) = incoming.message().await?
        else {
            return Err(Status::invalid_argument("header first"));
        };
        let mut hasher = sha2::Sha256::new();
        let mut bytes = 0u64;
        let clean_end = loop {
            match incoming.message().await {
                Ok(Some(UploadFileRequest {
                    part: Some(upload_file_request::Part::Data(d)),
                })) => {
                    bytes += d.len() as u64;
                    hasher.update(&d);
                }
                Ok(Some(m)) => {
                    eprintln!("fake agent: unexpected upload message {m:?}");
                    break false;
                }
                Ok(None) => break true,
                Err(e) => {
                    eprintln!("fake agent: upload stream error: {e:?}");
                    break false;
                }
            }
        };
        self.state.uploads.lock().unwrap().push(UploadOutcome {
            path: header.path.clone(),
            bytes,
            clean_end,
        });
        if !clean_end {
            return Err(Status::cancelled("upload aborted"));
        }
        let info = FileInfo {
            path: header.path,
            size: bytes,
            r#type: FileType::Regular as i32,
            mode: 0o644,
            ..Default::default()
        };
        Ok(Response::new(UploadFileResponse {
            result: Some(UploadResult {
                info: Some(info),
                sha256: hex::encode(hasher.finalize()),
            }),
        }))
    }

    async fn download_file(
        &self,
        request: Request<DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        let path = request.into_inner().path;
        let Some(mib) = path
            .strip_prefix("/gen/")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return Err(Status::not_found(format!("{path} does not exist")));
        };
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let info = FileInfo {
                path,
                size: mib << 20,
                ..Default::default()
            };
            let first = DownloadFileResponse {
                part: Some(download_file_response::Part::Info(info)),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            for i in 0..mib {
                let chunk = Bytes::from(vec![(i % 251) as u8; 1 << 20]);
                let msg = DownloadFileResponse {
                    part: Some(download_file_response::Part::Data(chunk)),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_files(
        &self,
        request: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        let path = request.into_inner().path;
        if !path.starts_with('/') {
            return Err(Status::invalid_argument("field `path` must be absolute"));
        }
        let file = FileInfo {
            path: format!("{path}/a.txt"),
            name: "a.txt".into(),
            ..Default::default()
        };
        Ok(Response::new(ListFilesResponse { files: vec![file] }))
    }

    async fn get_file_info(
        &self,
        request: Request<GetFileInfoRequest>,
    ) -> Result<Response<GetFileInfoResponse>, Status> {
        let path = request.into_inner().path;
        Ok(Response::new(GetFileInfoResponse {
            info: Some(FileInfo {
                path,
                ..Default::default()
            }),
        }))
    }

    async fn make_directory(
        &self,
        request: Request<MakeDirectoryRequest>,
    ) -> Result<Response<MakeDirectoryResponse>, Status> {
        let r = request.into_inner();
        let info = FileInfo {
            path: r.path,
            mode: r.mode,
            ..Default::default()
        };
        Ok(Response::new(MakeDirectoryResponse { info: Some(info) }))
    }

    async fn remove_file(
        &self,
        request: Request<RemoveFileRequest>,
    ) -> Result<Response<RemoveFileResponse>, Status> {
        if request.into_inner().recursive {
            Ok(Response::new(RemoveFileResponse {}))
        } else {
            Err(Status::failed_precondition("directory not empty"))
        }
    }

    async fn get_stats(
        &self,
        _request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        Ok(Response::new(GetStatsResponse {
            memory_total_bytes: 512 << 20,
            memory_used_bytes: 100 << 20,
            process_count: 7,
            uptime_ms: 1234,
            kernel_release: "6.1.0-capsa".into(),
            processes_running: 2,
            terminals_open: 1,
        }))
    }

    async fn start_process(
        &self,
        _: Request<StartProcessRequest>,
    ) -> Result<Response<StartProcessResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_processes(
        &self,
        _: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn wait_process(
        &self,
        request: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        let r = request.into_inner();
        let timeout = r.timeout.expect("the executor fills in the timeout");
        let timeout = capsa_proto::time::from_duration(&timeout).unwrap();
        tokio::time::sleep(timeout).await;
        Err(Status::deadline_exceeded(format!(
            "process {} is still running after {timeout:?}",
            r.process_id
        )))
    }

    async fn signal_process(
        &self,
        _: Request<SignalProcessRequest>,
    ) -> Result<Response<SignalProcessResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn write_stdin(
        &self,
        _: Request<WriteStdinRequest>,
    ) -> Result<Response<WriteStdinResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type AttachProcessStream =
        Pin<Box<dyn Stream<Item = Result<AttachProcessResponse, Status>> + Send>>;

    async fn attach_process(
        &self,
        _: Request<AttachProcessRequest>,
    ) -> Result<Response<Self::AttachProcessStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type OpenTerminalStream =
        Pin<Box<dyn Stream<Item = Result<OpenTerminalResponse, Status>> + Send>>;

    async fn open_terminal(
        &self,
        request: Request<Streaming<OpenTerminalRequest>>,
    ) -> Result<Response<Self::OpenTerminalStream>, Status> {
        use capsa_proto::common::v1::{ProcessExit, ProcessInfo, TerminalOutput, terminal_output};
        use open_terminal_request::Part;
        let mut input = request.into_inner();
        let Some(OpenTerminalRequest {
            part: Some(Part::Open(open)),
        }) = input.message().await?
        else {
            return Err(Status::invalid_argument("field `open` must come first"));
        };
        let output = |part| {
            Ok(OpenTerminalResponse {
                output: Some(TerminalOutput { part: Some(part) }),
            })
        };
        let (tx, rx) = mpsc::channel(4);
        let opened = ProcessInfo {
            process_id: "t-1".into(),
            command: open.command,
            ..Default::default()
        };
        let _ = tx.send(output(terminal_output::Part::Opened(opened))).await;
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = input.message().await {
                let echo = match message.part {
                    Some(Part::Data(data)) => data,
                    Some(Part::Resize(r)) => Bytes::from(format!("{}x{}", r.rows, r.cols)),
                    _ => continue,
                };
                let _ = tx.send(output(terminal_output::Part::Data(echo))).await;
            }
            state.inputs_ended.fetch_add(1, Ordering::SeqCst);
            let exit = ProcessExit {
                exit_code: 0,
                signal: 0,
            };
            let _ = tx.send(output(terminal_output::Part::Exit(exit))).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ConnectPortStream =
        Pin<Box<dyn Stream<Item = Result<ConnectPortResponse, Status>> + Send>>;

    async fn connect_port(
        &self,
        request: Request<Streaming<ConnectPortRequest>>,
    ) -> Result<Response<Self::ConnectPortStream>, Status> {
        use connect_port_request::Part;
        let mut input = request.into_inner();
        let Some(ConnectPortRequest {
            part: Some(Part::Port(port)),
        }) = input.message().await?
        else {
            return Err(Status::invalid_argument("field `port` must come first"));
        };
        if port == 1 {
            return Err(Status::failed_precondition(
                "nothing listens on port 1 in the guest (connection refused)",
            ));
        }
        let (tx, rx) = mpsc::channel(4);
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = input.message().await {
                if let Some(Part::Data(data)) = message.part {
                    let _ = tx.send(Ok(ConnectPortResponse { data })).await;
                }
            }
            state.inputs_ended.fetch_add(1, Ordering::SeqCst);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// vm-pool calls it, never the executor.
    async fn reidentify(
        &self,
        _: Request<ReidentifyRequest>,
    ) -> Result<Response<ReidentifyResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}
