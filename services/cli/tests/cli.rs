//! The real `capsa` binary against an in-test SessionService double on 127.0.0.1:0:
//! streaming to the terminal, exit statuses, JSON lines, configuration, file transfer;
//! processes, terminals and port forwarding in `process_double`.

mod process_double;

use std::collections::HashMap;
use std::pin::Pin;
use std::process::Output;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use capsa_proto::common::v1::*;
use capsa_proto::session::v1::session_service_server::{SessionService, SessionServiceServer};
use capsa_proto::session::v1::*;
use futures::Stream;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const KEY: &str = "test-key";

#[derive(Default)]
struct State {
    last_execute: Mutex<Option<ExecuteRequest>>,
    files: Mutex<HashMap<String, Vec<u8>>>,
    /// The egress of every CreateSession, in order.
    create_egress: Mutex<Vec<Option<EgressPolicy>>>,
    /// The policy of session `s-1` as the double holds it (the last update).
    egress: Mutex<EgressPolicy>,
    /// Directories made by MakeDirectory, with their modes.
    dirs: Mutex<HashMap<String, u32>>,
    /// What the process, terminal and port RPCs received.
    procs: process_double::Recorded,
}

fn dir_info(path: &str, mode: u32) -> FileInfo {
    FileInfo {
        path: path.into(),
        name: path.rsplit('/').next().unwrap_or_default().into(),
        r#type: FileType::Directory as i32,
        mode,
        ..Default::default()
    }
}

#[derive(Clone)]
struct Double {
    state: Arc<State>,
}

fn check_auth<T>(r: &Request<T>) -> Result<(), Status> {
    match r
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        Some(v) if v == format!("Bearer {KEY}") => Ok(()),
        _ => Err(Status::unauthenticated("invalid API key")),
    }
}

fn event(e: execute_event::Event) -> Result<ExecuteResponse, Status> {
    Ok(ExecuteResponse {
        event: Some(ExecuteEvent { event: Some(e) }),
    })
}

fn out(data: &[u8]) -> Result<ExecuteResponse, Status> {
    event(execute_event::Event::Stdout(OutputChunk {
        data: Bytes::copy_from_slice(data),
    }))
}

fn done(
    status: CompletionStatus,
    exit_code: i32,
    message: &str,
) -> Result<ExecuteResponse, Status> {
    event(execute_event::Event::Completion(Completion {
        status: status as i32,
        exit_code,
        message: message.into(),
        state_lost: status == CompletionStatus::KernelDied,
        wall_time: Some(prost_types::Duration {
            seconds: 0,
            nanos: 7_000_000,
        }),
        ..Default::default()
    }))
}

fn session(id: &str) -> Session {
    Session {
        id: id.into(),
        status: SessionStatus::Active as i32,
        template: "default".into(),
        vcpus: 1,
        memory_mib: 512,
        expire_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        ..Default::default()
    }
}

const SNAP: &str = "snap-00000000000000000000000000000001";

fn snapshot(id: &str) -> Snapshot {
    Snapshot {
        id: id.into(),
        name: "with-numpy".into(),
        status: SnapshotStatus::Ready as i32,
        session_id: "s-1".into(),
        template: "default".into(),
        vcpus: 1,
        memory_mib: 512,
        size_bytes: 60 << 20,
        create_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        node_id: "node-a".into(),
        ..Default::default()
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SessionService for Double {
    type ExecuteStream = BoxStream<ExecuteResponse>;
    type DownloadFileStream = BoxStream<DownloadFileResponse>;
    type AttachProcessStream = BoxStream<AttachProcessResponse>;
    type OpenTerminalStream = BoxStream<OpenTerminalResponse>;
    type ConnectPortStream = BoxStream<ConnectPortResponse>;

    async fn create_session(
        &self,
        r: Request<CreateSessionRequest>,
    ) -> Result<Response<CreateSessionResponse>, Status> {
        check_auth(&r)?;
        let r = r.into_inner();
        self.state
            .create_egress
            .lock()
            .unwrap()
            .push(r.egress.clone());
        let mut s = session("s-new");
        s.egress = r.egress;
        s.env_names = r.env.into_keys().collect();
        s.env_names.sort();
        s.metadata = r.metadata;
        s.source_snapshot_id = r.snapshot_id;
        Ok(Response::new(CreateSessionResponse { session: Some(s) }))
    }

    async fn get_session(
        &self,
        r: Request<GetSessionRequest>,
    ) -> Result<Response<GetSessionResponse>, Status> {
        check_auth(&r)?;
        let id = r.into_inner().session_id;
        if id == "missing" {
            return Err(Status::not_found("session missing not found"));
        }
        Ok(Response::new(GetSessionResponse {
            session: Some(session(&id)),
        }))
    }

    async fn list_sessions(
        &self,
        r: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        check_auth(&r)?;
        // Two pages, so the CLI must follow the token.
        let (ids, next) = match r.into_inner().page_token.as_str() {
            "" => (["s-1", "s-2"], "page-2"),
            _ => (["s-3", "s-4"], ""),
        };
        Ok(Response::new(ListSessionsResponse {
            sessions: ids.iter().map(|id| session(id)).collect(),
            next_page_token: next.into(),
        }))
    }

    async fn delete_session(
        &self,
        r: Request<DeleteSessionRequest>,
    ) -> Result<Response<DeleteSessionResponse>, Status> {
        check_auth(&r)?;
        let mut s = session(&r.into_inner().session_id);
        s.status = SessionStatus::Terminated as i32;
        s.end_reason = EndReason::Deleted as i32;
        Ok(Response::new(DeleteSessionResponse { session: Some(s) }))
    }

    async fn extend_session(
        &self,
        r: Request<ExtendSessionRequest>,
    ) -> Result<Response<ExtendSessionResponse>, Status> {
        check_auth(&r)?;
        let r = r.into_inner();
        let mut s = session(&r.session_id);
        s.expire_time = Some(prost_types::Timestamp {
            seconds: 1_700_000_000 + r.extend_by.unwrap_or_default().seconds,
            nanos: 0,
        });
        Ok(Response::new(ExtendSessionResponse { session: Some(s) }))
    }

    async fn suspend_session(
        &self,
        r: Request<SuspendSessionRequest>,
    ) -> Result<Response<SuspendSessionResponse>, Status> {
        check_auth(&r)?;
        let mut s = session(&r.into_inner().session_id);
        s.status = SessionStatus::Suspended as i32;
        s.vm_id = String::new();
        s.snapshot_bytes = 60 << 20;
        Ok(Response::new(SuspendSessionResponse { session: Some(s) }))
    }

    async fn resume_session(
        &self,
        r: Request<ResumeSessionRequest>,
    ) -> Result<Response<ResumeSessionResponse>, Status> {
        check_auth(&r)?;
        let mut s = session(&r.into_inner().session_id);
        s.vm_id = "vm-resumed".into();
        Ok(Response::new(ResumeSessionResponse { session: Some(s) }))
    }

    async fn snapshot_session(
        &self,
        r: Request<SnapshotSessionRequest>,
    ) -> Result<Response<SnapshotSessionResponse>, Status> {
        check_auth(&r)?;
        let r = r.into_inner();
        let mut s = snapshot(SNAP);
        s.session_id = r.session_id;
        s.name = r.name;
        s.metadata = r.metadata;
        Ok(Response::new(SnapshotSessionResponse { snapshot: Some(s) }))
    }

    async fn get_snapshot(
        &self,
        r: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        check_auth(&r)?;
        let id = r.into_inner().snapshot_id;
        if id != SNAP {
            return Err(Status::not_found(format!("snapshot {id} not found")));
        }
        Ok(Response::new(GetSnapshotResponse {
            snapshot: Some(snapshot(&id)),
        }))
    }

    async fn list_snapshots(
        &self,
        r: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        check_auth(&r)?;
        // Two pages, so the client must follow the token.
        let (id, next) = match r.into_inner().page_token.as_str() {
            "" => (SNAP, "page-2"),
            _ => ("snap-00000000000000000000000000000002", ""),
        };
        Ok(Response::new(ListSnapshotsResponse {
            snapshots: vec![snapshot(id)],
            next_page_token: next.into(),
        }))
    }

    async fn delete_snapshot(
        &self,
        r: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        check_auth(&r)?;
        Ok(Response::new(DeleteSnapshotResponse {
            snapshot: Some(snapshot(&r.into_inner().snapshot_id)),
        }))
    }

    async fn fork_session(
        &self,
        r: Request<ForkSessionRequest>,
    ) -> Result<Response<ForkSessionResponse>, Status> {
        check_auth(&r)?;
        let r = r.into_inner();
        if !(1..=8).contains(&r.count) {
            return Err(Status::invalid_argument("count: must be 1 to 8"));
        }
        let sessions = (1..=r.count)
            .map(|i| {
                let mut s = session(&format!("s-fork-{i}"));
                s.parent_session_id = r.session_id.clone();
                s
            })
            .collect();
        Ok(Response::new(ForkSessionResponse { sessions }))
    }

    async fn execute(
        &self,
        r: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        check_auth(&r)?;
        let r = r.into_inner();
        *self.state.last_execute.lock().unwrap() = Some(r.clone());
        let code = r.code.trim().to_string();
        let events: Vec<Result<ExecuteResponse, Status>> = match code.as_str() {
            "hello" => vec![
                out(b"hello\n"),
                event(execute_event::Event::Stderr(OutputChunk {
                    data: "careful\n".into(),
                })),
                event(execute_event::Event::Result(ExecuteResult {
                    data: [("text/plain".to_string(), Bytes::from("42"))].into(),
                })),
                done(CompletionStatus::Ok, 0, ""),
            ],
            "binary" => {
                vec![
                    out(&(0..=255u8).collect::<Vec<_>>()),
                    done(CompletionStatus::Ok, 0, ""),
                ]
            }
            "raise" => vec![
                event(execute_event::Event::Error(ExecuteError {
                    name: "ValueError".into(),
                    value: "bad".into(),
                    traceback: vec![
                        "Traceback (most recent call last):\n".into(),
                        "ValueError: bad\n".into(),
                    ],
                })),
                done(CompletionStatus::Error, 1, ""),
            ],
            "timeout" => vec![
                out(b"tick\n"),
                done(CompletionStatus::Timeout, 0, "timed out after 1s"),
            ],
            "died" => vec![done(
                CompletionStatus::KernelDied,
                0,
                "the kernel exited with status 3",
            )],
            "interrupted" => vec![done(CompletionStatus::Interrupted, 0, "interrupted")],
            "png" => vec![
                event(execute_event::Event::Display(DisplayData {
                    data: [("image/png".to_string(), Bytes::from_static(b"\x89PNG-fake"))].into(),
                })),
                done(CompletionStatus::Ok, 0, ""),
            ],
            // Over tonic's default 4 MiB decode limit, within the contract's.
            "bigpng" => vec![
                event(execute_event::Event::Display(DisplayData {
                    data: [("image/png".to_string(), Bytes::from(vec![7u8; 5_000_000]))].into(),
                })),
                done(CompletionStatus::Ok, 0, ""),
            ],
            "boom" => vec![out(b"partial\n"), Err(Status::unavailable("vm gone"))],
            other => match other.strip_prefix("exit:") {
                Some(n) => vec![done(CompletionStatus::Error, n.parse().unwrap(), "")],
                None => vec![out(other.as_bytes()), done(CompletionStatus::Ok, 0, "")],
            },
        };
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }

    async fn upload_file(
        &self,
        r: Request<Streaming<UploadFileRequest>>,
    ) -> Result<Response<UploadFileResponse>, Status> {
        check_auth(&r)?;
        let mut incoming = r.into_inner();
        let Some(UploadFileRequest {
            part: Some(upload_file_request::Part::Header(h)),
        }) = incoming.message().await?
        else {
            return Err(Status::invalid_argument("header first"));
        };
        let file = h.file.unwrap_or_default();
        let mut data = Vec::new();
        while let Some(m) = incoming.message().await? {
            match m.part {
                Some(upload_file_request::Part::Data(d)) if d.len() <= 1 << 20 => {
                    data.extend_from_slice(&d)
                }
                _ => return Err(Status::invalid_argument("bad chunk")),
            }
        }
        if file.size != Some(data.len() as u64) {
            return Err(Status::invalid_argument("size mismatch"));
        }
        let sha256 = hex::encode(sha2::Sha256::digest(&data));
        let info = FileInfo {
            path: file.path.clone(),
            name: file.path.rsplit('/').next().unwrap_or_default().into(),
            r#type: FileType::Regular as i32,
            size: data.len() as u64,
            mode: if file.mode == 0 { 0o644 } else { file.mode },
            ..Default::default()
        };
        self.state.files.lock().unwrap().insert(file.path, data);
        Ok(Response::new(UploadFileResponse {
            result: Some(UploadResult {
                info: Some(info),
                sha256,
            }),
        }))
    }

    async fn download_file(
        &self,
        r: Request<DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        check_auth(&r)?;
        let path = r.into_inner().path;
        let Some(data) = self.state.files.lock().unwrap().get(&path).cloned() else {
            return Err(Status::not_found(format!("{path} not found")));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let info = FileInfo {
                name: path.rsplit('/').next().unwrap_or_default().into(),
                path,
                size: data.len() as u64,
                ..Default::default()
            };
            let _ = tx
                .send(Ok(DownloadFileResponse {
                    part: Some(download_file_response::Part::Info(info)),
                }))
                .await;
            for chunk in data.chunks(1 << 20) {
                let part = download_file_response::Part::Data(Bytes::copy_from_slice(chunk));
                if tx
                    .send(Ok(DownloadFileResponse { part: Some(part) }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_files(
        &self,
        r: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        check_auth(&r)?;
        let files = self
            .state
            .files
            .lock()
            .unwrap()
            .iter()
            .map(|(path, data)| FileInfo {
                path: path.clone(),
                name: path.rsplit('/').next().unwrap_or_default().into(),
                r#type: FileType::Regular as i32,
                size: data.len() as u64,
                mode: 0o644,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(ListFilesResponse { files }))
    }

    async fn get_file_info(
        &self,
        r: Request<GetFileInfoRequest>,
    ) -> Result<Response<GetFileInfoResponse>, Status> {
        check_auth(&r)?;
        let path = r.into_inner().path;
        let info = if let Some(mode) = self.state.dirs.lock().unwrap().get(&path) {
            dir_info(&path, *mode)
        } else {
            let files = self.state.files.lock().unwrap();
            let data = files
                .get(&path)
                .ok_or_else(|| Status::not_found(format!("{path} not found")))?;
            FileInfo {
                path: path.clone(),
                name: path.rsplit('/').next().unwrap_or_default().into(),
                r#type: FileType::Regular as i32,
                size: data.len() as u64,
                mode: 0o644,
                ..Default::default()
            }
        };
        Ok(Response::new(GetFileInfoResponse { info: Some(info) }))
    }

    async fn make_directory(
        &self,
        r: Request<MakeDirectoryRequest>,
    ) -> Result<Response<MakeDirectoryResponse>, Status> {
        check_auth(&r)?;
        let r = r.into_inner();
        self.state
            .dirs
            .lock()
            .unwrap()
            .insert(r.path.clone(), r.mode);
        Ok(Response::new(MakeDirectoryResponse {
            info: Some(dir_info(&r.path, r.mode)),
        }))
    }

    async fn remove_file(
        &self,
        r: Request<RemoveFileRequest>,
    ) -> Result<Response<RemoveFileResponse>, Status> {
        check_auth(&r)?;
        let r = r.into_inner();
        let mut dirs = self.state.dirs.lock().unwrap();
        let mut files = self.state.files.lock().unwrap();
        if dirs.contains_key(&r.path) {
            let prefix = format!("{}/", r.path);
            let children = files.keys().any(|p| p.starts_with(&prefix));
            if children && !r.recursive {
                return Err(Status::failed_precondition(format!(
                    "{} is a directory that is not empty",
                    r.path
                )));
            }
            files.retain(|p, _| !p.starts_with(&prefix));
            dirs.remove(&r.path);
        } else if files.remove(&r.path).is_none() {
            return Err(Status::not_found(format!("{} not found", r.path)));
        }
        Ok(Response::new(RemoveFileResponse {}))
    }

    async fn get_usage(
        &self,
        r: Request<GetUsageRequest>,
    ) -> Result<Response<GetUsageResponse>, Status> {
        check_auth(&r)?;
        let usage = Usage {
            memory_used_bytes: 64 << 20,
            network_rx_bytes: 10,
            ..Default::default()
        };
        Ok(Response::new(GetUsageResponse {
            session_id: r.into_inner().session_id,
            usage: Some(usage),
        }))
    }

    async fn get_tenant_usage(
        &self,
        r: Request<GetTenantUsageRequest>,
    ) -> Result<Response<GetTenantUsageResponse>, Status> {
        check_auth(&r)?;
        Ok(Response::new(GetTenantUsageResponse {
            tenant_id: "t-1".into(),
            total: Some(Usage::default()),
            active_sessions: 2,
            total_sessions: 5,
            snapshots: 1,
            snapshot_bytes: 60 << 20,
            snapshot_limit: 20,
            snapshot_bytes_limit: 10 << 30,
            snapshot_gib_seconds: 12.5,
        }))
    }

    async fn get_egress_policy(
        &self,
        r: Request<GetEgressPolicyRequest>,
    ) -> Result<Response<GetEgressPolicyResponse>, Status> {
        check_auth(&r)?;
        if r.into_inner().session_id != "s-1" {
            return Err(Status::not_found("session not found"));
        }
        Ok(Response::new(GetEgressPolicyResponse {
            egress: Some(self.state.egress.lock().unwrap().clone()),
        }))
    }

    async fn update_egress_policy(
        &self,
        r: Request<UpdateEgressPolicyRequest>,
    ) -> Result<Response<UpdateEgressPolicyResponse>, Status> {
        check_auth(&r)?;
        let r = r.into_inner();
        if r.session_id != "s-1" {
            return Err(Status::not_found("session not found"));
        }
        let policy = r.egress.unwrap_or_default();
        if policy.allowed_domains.iter().any(|d| d.contains(' ')) {
            return Err(Status::invalid_argument(
                "invalid `egress.allowed_domains[0]`: not a domain name",
            ));
        }
        *self.state.egress.lock().unwrap() = policy.clone();
        Ok(Response::new(UpdateEgressPolicyResponse {
            egress: Some(policy),
        }))
    }

    async fn start_process(
        &self,
        r: Request<StartProcessRequest>,
    ) -> Result<Response<StartProcessResponse>, Status> {
        check_auth(&r)?;
        process_double::response(process_double::start_process(
            &self.state.procs,
            r.into_inner(),
        ))
    }

    async fn list_processes(
        &self,
        r: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        check_auth(&r)?;
        Ok(Response::new(process_double::list_processes()))
    }

    async fn wait_process(
        &self,
        r: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        check_auth(&r)?;
        process_double::response(process_double::wait_process(
            &self.state.procs,
            r.into_inner(),
        ))
    }

    async fn signal_process(
        &self,
        r: Request<SignalProcessRequest>,
    ) -> Result<Response<SignalProcessResponse>, Status> {
        check_auth(&r)?;
        process_double::response(process_double::signal_process(
            &self.state.procs,
            r.into_inner(),
        ))
    }

    async fn attach_process(
        &self,
        r: Request<AttachProcessRequest>,
    ) -> Result<Response<Self::AttachProcessStream>, Status> {
        check_auth(&r)?;
        process_double::response(process_double::attach_process(
            &self.state.procs,
            r.into_inner(),
        ))
    }

    async fn write_stdin(
        &self,
        r: Request<WriteStdinRequest>,
    ) -> Result<Response<WriteStdinResponse>, Status> {
        check_auth(&r)?;
        process_double::response(process_double::write_stdin(
            &self.state.procs,
            r.into_inner(),
        ))
    }

    async fn open_terminal(
        &self,
        r: Request<Streaming<OpenTerminalRequest>>,
    ) -> Result<Response<Self::OpenTerminalStream>, Status> {
        check_auth(&r)?;
        process_double::response(
            process_double::open_terminal(&self.state.procs, r.into_inner()).await,
        )
    }

    async fn connect_port(
        &self,
        r: Request<Streaming<ConnectPortRequest>>,
    ) -> Result<Response<Self::ConnectPortStream>, Status> {
        check_auth(&r)?;
        process_double::response(process_double::connect_port(r.into_inner()).await)
    }
}

/// The double on 127.0.0.1:0 plus a scratch dir to run the CLI in; stops on drop.
struct Api {
    endpoint: String,
    state: Arc<State>,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Api {
    async fn start() -> Api {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State::default());
        let service = SessionServiceServer::new(Double {
            state: state.clone(),
        });
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        Api {
            endpoint,
            state,
            dir: tempfile::tempdir().unwrap(),
            task,
        }
    }

    /// Runs `capsa` with the endpoint and key as flags.
    async fn capsa(&self, args: &[&str]) -> Output {
        let mut all = vec!["--endpoint", &self.endpoint, "--api-key", KEY];
        all.extend_from_slice(args);
        self.capsa_raw(&all, None).await
    }

    /// Runs `capsa` with exactly `args`, in the scratch dir, with no CAPSA_* environment.
    async fn capsa_raw(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_capsa"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("CAPSA_ENDPOINT")
            .env_remove("CAPSA_API_KEY")
            .env_remove("CAPSA_ENV_FILE")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(data) = stdin {
            input.write_all(data).await.unwrap();
        }
        drop(input);
        child.wait_with_output().await.unwrap()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn exec_streams_output_prints_the_result_and_sends_the_options() {
    let api = Api::start().await;
    let o = api
        .capsa(&[
            "exec",
            "s-1",
            "hello",
            "--timeout",
            "30s",
            "--env",
            "A=1",
            "--cwd",
            "/work",
            "--lang",
            "shell",
        ])
        .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "hello\n42\n");
    assert_eq!(text(&o.stderr), "careful\n");
    let r = api.state.last_execute.lock().unwrap().clone().unwrap();
    assert_eq!(r.session_id, "s-1");
    assert_eq!(r.language(), Language::Shell);
    assert_eq!(
        r.timeout,
        Some(prost_types::Duration {
            seconds: 30,
            nanos: 0
        })
    );
    assert_eq!(r.env.get("A").map(String::as_str), Some("1"));
    assert_eq!(r.cwd, "/work");
}

#[tokio::test]
async fn exit_statuses_follow_the_completion() {
    let api = Api::start().await;
    for (code, status, stderr_has) in [
        ("exit:3", 3, ""),
        ("raise", 1, "ValueError: bad"),
        ("timeout", 124, "capsa: timed out: timed out after 1s"),
        ("interrupted", 130, "capsa: interrupted"),
        ("died", 137, "state is lost"),
        ("boom", 1, "capsa: UNAVAILABLE: vm gone"),
    ] {
        let o = api.capsa(&["exec", "s-1", code]).await;
        assert_eq!(o.status.code(), Some(status), "{code}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(stderr_has),
            "{code}: {}",
            text(&o.stderr)
        );
    }
    // Output that arrived before a broken stream was still shown.
    let o = api.capsa(&["exec", "s-1", "boom"]).await;
    assert_eq!(text(&o.stdout), "partial\n");
}

#[tokio::test]
async fn binary_output_is_passed_through_unchanged() {
    let api = Api::start().await;
    let o = api.capsa(&["exec", "s-1", "binary"]).await;
    assert_eq!(o.stdout, (0..=255u8).collect::<Vec<_>>());
}

#[tokio::test]
async fn json_mode_prints_one_event_per_line() {
    let api = Api::start().await;
    let o = api.capsa(&["--json", "exec", "s-1", "hello"]).await;
    assert_eq!(o.status.code(), Some(0));
    let lines: Vec<serde_json::Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["stdout", "stderr", "result", "completion"]);
    assert_eq!(lines[0]["text"], "hello\n");
    assert_eq!(lines[2]["data"]["text/plain"]["text"], "42");
    assert_eq!(lines[3]["status"], "OK");
    assert_eq!(lines[3]["wall_time_ms"], 7);

    let o = api.capsa(&["exec", "--json", "s-1", "exit:4"]).await;
    assert_eq!(o.status.code(), Some(4));
    let last: serde_json::Value =
        serde_json::from_str(text(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["status"].as_str(), last["exit_code"].as_i64()),
        (Some("ERROR"), Some(4))
    );
}

#[tokio::test]
async fn code_from_stdin_and_from_a_file() {
    let api = Api::start().await;
    let o = api
        .capsa_raw(
            &[
                "--endpoint",
                &api.endpoint,
                "--api-key",
                KEY,
                "exec",
                "s-1",
                "-",
            ],
            Some(b"hello\n"),
        )
        .await;
    assert_eq!(text(&o.stdout), "hello\n42\n");
    std::fs::write(api.dir.path().join("job.py"), "exit:5").unwrap();
    let o = api.capsa(&["exec", "s-1", "-f", "job.py"]).await;
    assert_eq!(o.status.code(), Some(5));
}

#[tokio::test]
async fn endpoint_and_key_come_from_dev_env_and_bad_keys_are_api_errors() {
    let api = Api::start().await;
    let o = api.capsa_raw(&["info", "s-1"], None).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).starts_with("capsa: no endpoint"),
        "{}",
        text(&o.stderr)
    );

    std::fs::create_dir_all(api.dir.path().join(".capsa")).unwrap();
    std::fs::write(
        api.dir.path().join(".capsa/dev.env"),
        format!("CAPSA_ENDPOINT={}\nCAPSA_API_KEY={KEY}\n", api.endpoint),
    )
    .unwrap();
    let o = api.capsa_raw(&["info", "s-1"], None).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("s-1"));

    let o = api
        .capsa_raw(&["--api-key", "wrong", "info", "s-1"], None)
        .await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(text(&o.stderr), "capsa: UNAUTHENTICATED: invalid API key\n");
}

#[tokio::test]
async fn usage_errors_exit_2_and_api_errors_exit_1() {
    let api = Api::start().await;
    let o = api.capsa(&["exec", "s-1"]).await;
    assert_eq!(o.status.code(), Some(2));
    let o = api.capsa(&["exec", "s-1", "x", "--timeout", "soon"]).await;
    assert_eq!(o.status.code(), Some(2));
    let o = api.capsa(&["info", "missing"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        "capsa: NOT_FOUND: session missing not found\n"
    );
}

#[tokio::test]
async fn upload_then_download_round_trips_a_file() {
    let api = Api::start().await;
    let data: Vec<u8> = (0..3 * (1 << 20) + 123)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let local = api.dir.path().join("in.bin");
    std::fs::write(&local, &data).unwrap();
    let o = api
        .capsa(&[
            "--json",
            "upload",
            "s-1",
            local.to_str().unwrap(),
            "/data/in.bin",
            "--mode",
            "600",
        ])
        .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(v["sha256"], hex::encode(sha2::Sha256::digest(&data)));
    assert_eq!(
        (v["size"].as_u64(), v["mode"].as_str()),
        (Some(data.len() as u64), Some("600"))
    );

    // Without --json but piped: no progress bar, only the note.
    let o = api
        .capsa(&["upload", "s-1", local.to_str().unwrap(), "/data/again.bin"])
        .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let note = text(&o.stderr);
    assert!(
        note.starts_with("capsa: uploaded /data/again.bin (3145851 bytes, sha256 ")
            && note.lines().count() == 1
            && !note.contains('\r'),
        "{note:?}"
    );

    let back = api.dir.path().join("out.bin");
    let o = api
        .capsa(&["download", "s-1", "/data/in.bin", back.to_str().unwrap()])
        .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let note = text(&o.stderr);
    assert!(
        note.starts_with("capsa: downloaded ") && note.lines().count() == 1 && !note.contains('\r'),
        "{note:?}"
    );
    // Into a directory: named after the remote file; and to stdout with `-`.
    let o = api
        .capsa(&[
            "download",
            "s-1",
            "/data/in.bin",
            api.dir.path().to_str().unwrap(),
        ])
        .await;
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(std::fs::read(api.dir.path().join("in.bin")).unwrap(), data);
    let o = api.capsa(&["download", "s-1", "/data/in.bin", "-"]).await;
    assert_eq!(o.stdout, data);

    let o = api
        .capsa(&["download", "s-1", "/nope", back.to_str().unwrap()])
        .await;
    assert_eq!(o.status.code(), Some(1));
    let o = api.capsa(&["ls", "s-1", "/data"]).await;
    assert!(text(&o.stdout).contains("in.bin"), "{}", text(&o.stdout));
    // No partial files were left behind.
    let leftovers: Vec<_> = std::fs::read_dir(api.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("capsa-part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn display_data_is_saved_where_asked() {
    let api = Api::start().await;
    let dir = api.dir.path().join("plots");
    std::fs::create_dir(&dir).unwrap();
    let o = api
        .capsa(&["exec", "s-1", "png", "--display-dir", dir.to_str().unwrap()])
        .await;
    assert_eq!(o.status.code(), Some(0));
    let saved: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(saved.len(), 1);
    assert_eq!(std::fs::read(&saved[0]).unwrap(), b"\x89PNG-fake");
    assert!(text(&o.stderr).contains(&saved[0].display().to_string()));
}

#[tokio::test]
async fn a_figure_over_4_mib_is_received_and_saved_whole() {
    let api = Api::start().await;
    let dir = api.dir.path().join("big");
    std::fs::create_dir(&dir).unwrap();
    let o = api
        .capsa(&[
            "exec",
            "s-1",
            "bigpng",
            "--display-dir",
            dir.to_str().unwrap(),
        ])
        .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let saved: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(saved.len(), 1);
    assert_eq!(std::fs::read(&saved[0]).unwrap(), vec![7u8; 5_000_000]);
}

#[tokio::test]
async fn session_commands() {
    let api = Api::start().await;
    let o = api
        .capsa(&[
            "create",
            "--lifetime",
            "10m",
            "--env",
            "K=V",
            "--label",
            "team=ml",
        ])
        .await;
    assert_eq!(text(&o.stdout), "s-new\n");
    let o = api.capsa(&["--json", "create", "--label", "team=ml"]).await;
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(v["labels"]["team"], "ml");

    let o = api.capsa(&["--json", "list", "--status", "active"]).await;
    let ids: Vec<String> = text(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["s-1", "s-2", "s-3", "s-4"]);

    let o = api.capsa(&["extend", "s-1", "1h"]).await;
    assert_eq!(text(&o.stdout), "s-1 expires at 2023-11-14T23:13:20Z\n");
    let o = api.capsa(&["suspend", "s-1"]).await;
    assert_eq!(
        text(&o.stdout),
        "s-1 SUSPENDED (60.0 MiB on disk; expires at 2023-11-14T22:13:20Z)\n"
    );
    let o = api.capsa(&["--json", "suspend", "s-1"]).await;
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["snapshot_bytes"].as_u64()),
        (Some("SUSPENDED"), Some(60 << 20))
    );
    let o = api.capsa(&["resume", "s-1"]).await;
    assert_eq!(
        text(&o.stdout),
        "s-1 ACTIVE (vm vm-resumed; expires at 2023-11-14T22:13:20Z)\n"
    );
    let o = api.capsa(&["kill", "s-1"]).await;
    assert_eq!(text(&o.stdout), "s-1 TERMINATED (DELETED)\n");
    let o = api.capsa(&["--json", "usage", "--tenant"]).await;
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(
        (v["active_sessions"].as_u64(), v["total_sessions"].as_u64()),
        (Some(2), Some(5))
    );
    let o = api.capsa(&["usage", "s-1"]).await;
    assert!(text(&o.stdout).contains("64.0 MiB"), "{}", text(&o.stdout));
}

#[tokio::test]
async fn snapshot_fork_and_create_from_snapshot_commands() {
    let api = Api::start().await;
    let o = api
        .capsa(&[
            "snapshot", "create", "s-1", "--name", "base", "--label", "k=v",
        ])
        .await;
    assert_eq!(text(&o.stdout), format!("{SNAP}\n"));
    assert!(text(&o.stderr).contains("READY"), "{}", text(&o.stderr));
    let o = api
        .capsa(&["--json", "snapshot", "create", "s-1", "--name", "base"])
        .await;
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(
        (
            v["name"].as_str(),
            v["status"].as_str(),
            v["size_bytes"].as_u64()
        ),
        (Some("base"), Some("READY"), Some(60 << 20))
    );
    // Both pages of the list.
    let o = api.capsa(&["snapshot", "list"]).await;
    let listed = text(&o.stdout);
    let rows: Vec<&str> = listed.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{}", text(&o.stdout));
    assert!(
        rows[0].starts_with(SNAP) && rows[0].contains("60.0 MiB"),
        "{}",
        rows[0]
    );
    let o = api.capsa(&["snapshot", "info", SNAP]).await;
    assert!(
        text(&o.stdout).contains("with-numpy"),
        "{}",
        text(&o.stdout)
    );
    let o = api.capsa(&["snapshot", "info", "snap-missing"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("NOT_FOUND"), "{}", text(&o.stderr));
    let o = api.capsa(&["snapshot", "rm", SNAP]).await;
    assert_eq!(text(&o.stdout), format!("{SNAP} deleted\n"));

    let o = api
        .capsa(&["create", "--from-snapshot", SNAP, "--json"])
        .await;
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(v["source_snapshot_id"], SNAP);

    let o = api.capsa(&["fork", "s-1", "--count", "3"]).await;
    assert_eq!(text(&o.stdout), "s-fork-1\ns-fork-2\ns-fork-3\n");
    let o = api.capsa(&["--json", "fork", "s-1"]).await;
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(v["parent_session_id"], "s-1");
    let o = api.capsa(&["fork", "s-1", "--count", "9"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("count"), "{}", text(&o.stderr));

    let o = api.capsa(&["usage", "--tenant"]).await;
    assert!(
        text(&o.stdout).contains("1 of 20, 60.0 MiB of 10240.0 MiB, 12.5 GiB-s"),
        "{}",
        text(&o.stdout)
    );
}

#[tokio::test]
async fn create_sends_the_egress_flags_and_egress_shows_and_replaces_the_policy() {
    let api = Api::start().await;
    let o = api.capsa(&["create"]).await;
    assert!(o.status.success());
    let o = api
        .capsa(&[
            "create",
            "--allow-domain",
            "pypi.org",
            "--allow-cidr",
            "198.51.100.0/24",
            "--no-http",
        ])
        .await;
    assert_eq!(text(&o.stdout), "s-new\n");
    let o = api.capsa(&["create", "--no-egress"]).await;
    assert!(o.status.success());
    {
        let sent = api.state.create_egress.lock().unwrap();
        assert_eq!(sent.len(), 3);
        assert_eq!(sent[0], None, "no flag: the server's default");
        let p = sent[1].as_ref().unwrap();
        assert_eq!(
            (p.allowed_domains.as_slice(), p.allowed_cidrs.as_slice()),
            (
                &["pypi.org".to_string()][..],
                &["198.51.100.0/24".to_string()][..]
            )
        );
        assert_eq!(
            (p.allow_http, p.allow_https, p.deny_all),
            (Some(false), None, false)
        );
        assert!(sent[2].as_ref().unwrap().deny_all);
    }

    let o = api.capsa(&["egress", "s-1"]).await;
    assert!(o.status.success());
    assert!(
        text(&o.stdout).starts_with("summary           none\n"),
        "{}",
        text(&o.stdout)
    );
    let o = api
        .capsa(&[
            "egress",
            "s-1",
            "--set",
            "--allow-package-managers",
            "--allow-domain",
            "*.example.com",
        ])
        .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("summary           package managers, *.example.com\n"),
        "{}",
        text(&o.stdout)
    );
    assert_eq!(
        api.state.egress.lock().unwrap().allowed_domains,
        ["*.example.com"]
    );
    let o = api.capsa(&["--json", "egress", "s-1"]).await;
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(
        (
            v["allow_package_managers"].as_bool(),
            v["allow_http"].as_bool()
        ),
        (Some(true), Some(true))
    );
    // The server's refusal is printed with its code; a usage error never reaches it.
    let o = api
        .capsa(&["egress", "s-1", "--set", "--allow-domain", "not a name"])
        .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("egress.allowed_domains[0]"),
        "{}",
        text(&o.stderr)
    );
    let o = api.capsa(&["egress", "s-1", "--no-egress"]).await;
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        api.state.egress.lock().unwrap().allowed_domains,
        ["*.example.com"]
    );
    let o = api.capsa(&["egress", "other"]).await;
    assert_eq!(o.status.code(), Some(1));
}

#[tokio::test]
async fn file_subcommands_mkdir_stat_and_rm() {
    let api = Api::start().await;
    let o = api
        .capsa(&["mkdir", "s-1", "/data/out", "--mode", "700"])
        .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).starts_with("d0700 "), "{}", text(&o.stdout));
    let o = api.capsa(&["--json", "stat", "s-1", "/data/out"]).await;
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["mode"].as_str()),
        (Some("directory"), Some("700"))
    );

    let local = api.dir.path().join("f.txt");
    std::fs::write(&local, "hi").unwrap();
    let o = api
        .capsa(&["upload", "s-1", local.to_str().unwrap(), "/data/out/f.txt"])
        .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = api.capsa(&["stat", "s-1", "/data/out/f.txt"]).await;
    assert!(
        text(&o.stdout).contains("size         2\n"),
        "{}",
        text(&o.stdout)
    );

    // A non-empty directory needs -r; the server's refusal is shown with its code.
    let o = api.capsa(&["rm", "s-1", "/data/out"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).starts_with("capsa: FAILED_PRECONDITION: "),
        "{}",
        text(&o.stderr)
    );
    let o = api.capsa(&["--json", "rm", "s-1", "/data/out", "-r"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(v["removed"], true);
    let o = api.capsa(&["stat", "s-1", "/data/out/f.txt"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).starts_with("capsa: NOT_FOUND: "),
        "{}",
        text(&o.stderr)
    );
}

#[tokio::test]
async fn completions_need_no_server_and_typos_get_suggestions() {
    let api = Api::start().await;
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef capsa"),
        ("fish", "complete -c capsa"),
    ] {
        // No endpoint configured: completions do not connect.
        let o = api.capsa_raw(&["completions", shell], None).await;
        assert_eq!(o.status.code(), Some(0), "{shell}: {}", text(&o.stderr));
        let script = text(&o.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        for sub in ["mkdir", "stat", "egress"] {
            assert!(script.contains(sub), "{shell} completes {sub}");
        }
    }
    let o = api.capsa_raw(&["completions", "tcsh"], None).await;
    assert_eq!(o.status.code(), Some(2));

    let o = api.capsa(&["exce", "s-1", "x"]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("'exec'"), "{}", text(&o.stderr));
    // Durations are humantime's: a bare number has no unit.
    let o = api.capsa(&["extend", "s-1", "90"]).await;
    assert_eq!(o.status.code(), Some(2));
    let o = api.capsa(&["extend", "s-1", "1h 30m"]).await;
    assert_eq!(text(&o.stdout), "s-1 expires at 2023-11-14T23:43:20Z\n");
}

/// Runs `capsa` with the endpoint and key under `script`, which gives it a pseudo-terminal
/// for stdout and stderr; returns the terminal's transcript.
async fn on_a_terminal(api: &Api, args: &[&str]) -> String {
    let mut line = format!(
        "{} --endpoint {} --api-key {KEY}",
        env!("CARGO_BIN_EXE_capsa"),
        api.endpoint
    );
    for a in args {
        line += " ";
        line += a;
    }
    let o = tokio::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .current_dir(api.dir.path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run script (util-linux)");
    assert!(o.status.success(), "{line}: {}", text(&o.stdout));
    text(&o.stdout)
}

#[tokio::test]
async fn transfers_show_a_progress_bar_on_a_terminal_only_without_json() {
    let api = Api::start().await;
    let local = api.dir.path().join("big.bin");
    std::fs::write(&local, vec![5u8; 3 << 20]).unwrap();
    let local = local.to_str().unwrap();

    let shown = on_a_terminal(&api, &["upload", "s-1", local, "/data/big.bin"]).await;
    assert!(shown.contains("upload ["), "{shown:?}");
    assert!(shown.contains("capsa: uploaded /data/big.bin"), "{shown:?}");
    let back = api.dir.path().join("back.bin");
    let back = back.to_str().unwrap();
    let shown = on_a_terminal(&api, &["download", "s-1", "/data/big.bin", back]).await;
    assert!(shown.contains("download ["), "{shown:?}");
    assert_eq!(std::fs::read(back).unwrap(), vec![5u8; 3 << 20]);

    let shown = on_a_terminal(&api, &["--json", "upload", "s-1", local, "/data/b2.bin"]).await;
    assert!(!shown.contains("upload ["), "{shown:?}");
    assert!(shown.contains("\"sha256\""), "{shown:?}");
}
