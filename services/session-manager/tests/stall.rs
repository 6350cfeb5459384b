//! Clients that stop reading cost only their own streams: the node connection every tenant
//! shares keeps flowing past stalled streams, a stalled stream ends after the stall timeout
//! with DEADLINE_EXCEEDED and its call on the node is dropped, and a tenant's streaming
//! calls are capped per replica without touching other tenants.
//!
//! The node's executor here is a flood double: its Execute (code `flood`) and Download
//! produce output without end until the caller goes away, and it counts the callers that
//! went away and the streams it could not hand a message to (blocked on flow control).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use capsa_proto::common::v1::{
    Completion, CompletionStatus, ExecuteEvent, FileInfo, OutputChunk, UploadHeader, execute_event,
};
use capsa_proto::executor::v1 as ex;
use capsa_proto::executor::v1::executor_service_server::{ExecutorService, ExecutorServiceServer};
use capsa_proto::session::v1 as pb;
use capsa_store::NodeRegistry;
use capsa_test_support::{ServiceProcess, eventually};
use common::{Client, Harness, NODE_ID, create, register};
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

/// What the flood double saw.
#[derive(Default)]
struct Counters {
    /// Streams whose next message waits for the caller (HTTP/2 flow control).
    blocked: AtomicUsize,
    /// Endless streams whose caller went away.
    cancelled: AtomicUsize,
}

#[derive(Clone, Default)]
struct Flood(Arc<Counters>);

type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Flood {
    /// Sends `next()` until the caller goes away, counting the waits and the end.
    fn endless<T: Send + 'static>(
        &self,
        mut next: impl FnMut() -> T + Send + 'static,
    ) -> BoxStream<T> {
        let (tx, rx) = mpsc::channel(1);
        let counters = self.0.clone();
        tokio::spawn(async move {
            loop {
                match tx.try_send(Ok(next())) {
                    Ok(()) => {}
                    Err(TrySendError::Full(item)) => {
                        counters.blocked.fetch_add(1, Ordering::SeqCst);
                        let sent = tx.send(item).await;
                        counters.blocked.fetch_sub(1, Ordering::SeqCst);
                        if sent.is_err() {
                            break;
                        }
                    }
                    Err(TrySendError::Closed(_)) => break,
                }
            }
            counters.cancelled.fetch_add(1, Ordering::SeqCst);
        });
        Box::pin(ReceiverStream::new(rx))
    }

    fn blocked(&self) -> usize {
        self.0.blocked.load(Ordering::SeqCst)
    }

    fn cancelled(&self) -> usize {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Whether `n` streams stay blocked for a whole second: stuck on flow control, not
    /// waiting a moment for the transport to pick up the next message.
    async fn stuck(&self, n: usize) -> bool {
        let watch = tokio::time::Instant::now() + Duration::from_secs(1);
        while tokio::time::Instant::now() < watch {
            if self.blocked() != n {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

fn event(e: execute_event::Event) -> ex::ExecuteResponse {
    ex::ExecuteResponse {
        event: Some(ExecuteEvent { event: Some(e) }),
    }
}

#[tonic::async_trait]
impl ExecutorService for Flood {
    async fn configure_vm(
        &self,
        _: Request<ex::ConfigureVmRequest>,
    ) -> Result<Response<ex::ConfigureVmResponse>, Status> {
        Ok(Response::new(ex::ConfigureVmResponse {}))
    }

    type ExecuteStream = BoxStream<ex::ExecuteResponse>;

    async fn execute(
        &self,
        req: Request<ex::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let code = req.into_inner().spec.unwrap_or_default().code;
        if code == "flood" {
            let chunk = Bytes::from(vec![b'x'; 64 << 10]);
            return Ok(Response::new(self.endless(move || {
                event(execute_event::Event::Stdout(OutputChunk {
                    data: chunk.clone(),
                }))
            })));
        }
        let done = Completion {
            status: CompletionStatus::Ok as i32,
            output_bytes: 2,
            ..Default::default()
        };
        let events = [
            event(execute_event::Event::Stdout(OutputChunk {
                data: Bytes::from_static(b"1\n"),
            })),
            event(execute_event::Event::Completion(done)),
        ];
        Ok(Response::new(Box::pin(futures::stream::iter(
            events.map(Ok),
        ))))
    }

    async fn upload_file(
        &self,
        req: Request<Streaming<ex::UploadFileRequest>>,
    ) -> Result<Response<ex::UploadFileResponse>, Status> {
        let mut stream = req.into_inner();
        while stream.message().await?.is_some() {}
        Ok(Response::new(ex::UploadFileResponse::default()))
    }

    type DownloadFileStream = BoxStream<ex::DownloadFileResponse>;

    async fn download_file(
        &self,
        req: Request<ex::DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        use ex::download_file_response::Part;
        let path = req.into_inner().path;
        let chunk = Bytes::from(vec![0u8; 1 << 20]);
        let mut info = Some(FileInfo {
            path,
            size: u64::MAX,
            ..Default::default()
        });
        Ok(Response::new(self.endless(move || {
            let part = match info.take() {
                Some(info) => Part::Info(info),
                None => Part::Data(chunk.clone()),
            };
            ex::DownloadFileResponse { part: Some(part) }
        })))
    }

    async fn list_files(
        &self,
        _: Request<ex::ListFilesRequest>,
    ) -> Result<Response<ex::ListFilesResponse>, Status> {
        Err(Status::unimplemented("not used here"))
    }

    async fn get_file_info(
        &self,
        _: Request<ex::GetFileInfoRequest>,
    ) -> Result<Response<ex::GetFileInfoResponse>, Status> {
        Err(Status::unimplemented("not used here"))
    }

    async fn make_directory(
        &self,
        _: Request<ex::MakeDirectoryRequest>,
    ) -> Result<Response<ex::MakeDirectoryResponse>, Status> {
        Err(Status::unimplemented("not used here"))
    }

    async fn remove_file(
        &self,
        _: Request<ex::RemoveFileRequest>,
    ) -> Result<Response<ex::RemoveFileResponse>, Status> {
        Err(Status::unimplemented("not used here"))
    }

    async fn get_guest_stats(
        &self,
        _: Request<ex::GetGuestStatsRequest>,
    ) -> Result<Response<ex::GetGuestStatsResponse>, Status> {
        Err(Status::unimplemented("not used here"))
    }

    async fn start_process(
        &self,
        _: Request<ex::StartProcessRequest>,
    ) -> Result<Response<ex::StartProcessResponse>, Status> {
        Err(Status::unimplemented("not used here"))
    }

    async fn list_processes(
        &self,
        _: Request<ex::ListProcessesRequest>,
    ) -> Result<Response<ex::ListProcessesResponse>, Status> {
        Err(Status::unimplemented("not used here"))
    }

    async fn wait_process(
        &self,
        _: Request<ex::WaitProcessRequest>,
    ) -> Result<Response<ex::WaitProcessResponse>, Status> {
        Err(Status::unimplemented("not used here"))
    }

    async fn signal_process(
        &self,
        _: Request<ex::SignalProcessRequest>,
    ) -> Result<Response<ex::SignalProcessResponse>, Status> {
        Err(Status::unimplemented("not used here"))
    }

    async fn write_stdin(
        &self,
        _: Request<ex::WriteStdinRequest>,
    ) -> Result<Response<ex::WriteStdinResponse>, Status> {
        Err(Status::unimplemented("not used here"))
    }

    type AttachProcessStream = BoxStream<ex::AttachProcessResponse>;

    async fn attach_process(
        &self,
        _: Request<ex::AttachProcessRequest>,
    ) -> Result<Response<Self::AttachProcessStream>, Status> {
        Err(Status::unimplemented("not used here"))
    }

    type OpenTerminalStream = BoxStream<ex::OpenTerminalResponse>;

    /// A terminal whose program prints without end: a client that stops reading its
    /// screen must be cut off like any other stream.
    async fn open_terminal(
        &self,
        _: Request<Streaming<ex::OpenTerminalRequest>>,
    ) -> Result<Response<Self::OpenTerminalStream>, Status> {
        use capsa_proto::common::v1::{TerminalOutput, terminal_output::Part};
        Ok(Response::new(self.endless(|| ex::OpenTerminalResponse {
            output: Some(TerminalOutput {
                part: Some(Part::Data(Bytes::from(vec![b'y'; 32 * 1024]))),
            }),
        })))
    }

    type ConnectPortStream = BoxStream<ex::ConnectPortResponse>;

    async fn connect_port(
        &self,
        _: Request<Streaming<ex::ConnectPortRequest>>,
    ) -> Result<Response<Self::ConnectPortStream>, Status> {
        Err(Status::unimplemented("not used here"))
    }
}

/// The harness's node doubles with the flood double as the node's executor, and one
/// session-manager replica with these extra flags; tenants `t1` (`h.key`) and `t2`.
struct Setup {
    h: Harness,
    flood: Flood,
    other_key: String,
    _flood_server: tokio::task::JoinHandle<()>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self._flood_server.abort();
    }
}

async fn setup(flags: &[&str]) -> Setup {
    let mut h = Harness::start_with(0, false).await;
    let flood = Flood::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flood_url = format!("http://{}", listener.local_addr().unwrap());
    // The production server assembly: the executor's stream limit and windows.
    let server = capsa_grpc::Server::new()
        .max_concurrent_streams(capsa_grpc::server::max_streams::EXECUTOR)
        .add_service(ExecutorServiceServer::new(flood.clone()));
    let flood_server = tokio::spawn(async move {
        let _ = capsa_grpc::serve_tcp(server, listener, std::future::pending()).await;
    });
    register(&h.redis, &h.node, 1000, 0).await;
    let nodes = NodeRegistry::new(capsa_store::connect(&h.redis.url()).await.unwrap());
    let mut node = nodes.get(NODE_ID).await.unwrap().unwrap();
    node.executor_url = flood_url;
    nodes
        .heartbeat(&node, Duration::from_secs(3600))
        .await
        .unwrap();

    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--redis-url".into(),
        h.redis.url(),
        "--metering-url".into(),
        h.node.url.clone(),
    ];
    args.extend(flags.iter().map(|f| f.to_string()));
    h.replicas
        .push(ServiceProcess::start("capsa-session-manager", &args).await);
    let other_key = h.new_key("t2").await;
    Setup {
        h,
        flood,
        other_key,
        _flood_server: flood_server,
    }
}

fn exec(id: &str, code: &str) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        session_id: id.into(),
        code: code.into(),
        ..Default::default()
    }
}

fn download(id: &str) -> pb::DownloadFileRequest {
    pb::DownloadFileRequest {
        session_id: id.into(),
        path: "/root/big".into(),
    }
}

/// Runs `print(1)` to its end; whether it ended with a completion.
async fn run_print_one(c: &mut Client, id: &str) -> Result<bool, Status> {
    let mut stream = c.execute(exec(id, "print(1)")).await?.into_inner();
    let mut completed = false;
    while let Some(msg) = stream.message().await? {
        completed |= matches!(
            msg.event.and_then(|e| e.event),
            Some(execute_event::Event::Completion(_))
        );
    }
    Ok(completed)
}

/// Runs `print(1)` to completion within a generous bound; panics past it.
async fn print_one(c: &mut Client, id: &str, within: Duration) {
    match tokio::time::timeout(within, run_print_one(c, id)).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => panic!("print(1) ended without a completion"),
        Ok(Err(status)) => panic!("print(1) failed: {status:?}"),
        Err(_) => panic!("print(1) did not complete within {within:?}"),
    }
}

/// Reads a stream the client had stopped reading: what was buffered, then its status.
async fn drain<T>(mut stream: Streaming<T>) -> Status {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => panic!("the stalled stream ended without an error"),
            Ok(Err(status)) => return status,
            Err(_) => panic!("the stalled stream neither delivered nor ended within 30 s"),
        }
    }
}

#[tokio::test]
async fn another_tenants_execute_completes_while_a_tenant_stalls_streams_on_the_same_node() {
    // A stall timeout far beyond the test's bounds: only flow control is under test here.
    let s = setup(&["--stalled-client-timeout-ms", "300000"]).await;
    let mut a = s.h.client(0).await;
    let mut b =
        s.h.client_with(0, Some(&format!("Bearer {}", s.other_key)))
            .await;
    let a_session = create(&mut a, None).await;
    let b_session = create(&mut b, None).await;

    // Tenant A opens four endless downloads and an endless execute and reads none of them.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(a.download_file(download(&a_session.id)).await.unwrap());
    }
    let flooding = a.execute(exec(&a_session.id, "flood")).await.unwrap();
    // Every one of them is stuck on flow control at the node: whatever windows the streams
    // (and, before the windows were sized, the shared connection) had are full.
    eventually!(s.flood.stuck(5).await, 30);

    // Tenant B's Execute on the same node goes through the same connection.
    print_one(&mut b, &b_session.id, Duration::from_secs(20)).await;
    // A's streams were still open and stalled all along (not ended by a limit).
    assert_eq!(s.flood.cancelled(), 0);
    drop(held);
    drop(flooding);
    eventually!(s.flood.cancelled() == 5);
}

#[tokio::test]
async fn a_stalled_stream_ends_deadline_exceeded_and_its_node_call_is_dropped() {
    let s = setup(&["--stalled-client-timeout-ms", "1500"]).await;
    let mut a = s.h.client(0).await;
    let session = create(&mut a, None).await;
    let flooding = a
        .execute(exec(&session.id, "flood"))
        .await
        .unwrap()
        .into_inner();
    let downloading = a
        .download_file(download(&session.id))
        .await
        .unwrap()
        .into_inner();
    let open = pb::OpenTerminalRequest {
        part: Some(pb::open_terminal_request::Part::Open(
            pb::OpenTerminalHeader {
                session_id: session.id.clone(),
                terminal: Some(capsa_proto::common::v1::TerminalOpen {
                    size: Some(capsa_proto::common::v1::TerminalSize { rows: 24, cols: 80 }),
                    ..Default::default()
                }),
            },
        )),
    };
    // The request stream stays open (pending): only the screen direction stalls.
    let keys = futures::stream::iter([open]).chain(futures::stream::pending());
    let screen = a.open_terminal(keys).await.unwrap().into_inner();
    // Nobody reads: after the stall timeout session-manager drops every call on the node
    // (for an Execute that interrupts the code in the guest).
    eventually!(s.flood.cancelled() == 3, 30);
    for status in [
        drain(flooding).await,
        drain(downloading).await,
        drain(screen).await,
    ] {
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(
            status.message().contains("client stopped reading for 1.5s"),
            "{}",
            status.message()
        );
    }
    // The session is fine and serves the next call.
    print_one(&mut a, &session.id, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn a_tenant_at_its_stream_cap_is_refused_and_another_tenant_is_not() {
    let s = setup(&["--max-streams-per-tenant", "2"]).await;
    let mut a = s.h.client(0).await;
    let mut b =
        s.h.client_with(0, Some(&format!("Bearer {}", s.other_key)))
            .await;
    let a_session = create(&mut a, None).await;
    let b_session = create(&mut b, None).await;

    let mut flooding = a
        .execute(exec(&a_session.id, "flood"))
        .await
        .unwrap()
        .into_inner();
    flooding.message().await.unwrap().unwrap();
    let mut downloading = a
        .download_file(download(&a_session.id))
        .await
        .unwrap()
        .into_inner();
    downloading.message().await.unwrap().unwrap();

    // A third stream of A, of any kind, is refused naming the limit.
    let err = a
        .execute(exec(&a_session.id, "print(1)"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--max-streams-per-tenant") && err.message().contains(" 2 "),
        "{}",
        err.message()
    );
    let header = pb::UploadFileRequest {
        part: Some(pb::upload_file_request::Part::Header(
            pb::UploadFileHeader {
                session_id: a_session.id.clone(),
                file: Some(UploadHeader {
                    path: "/root/f".into(),
                    ..Default::default()
                }),
            },
        )),
    };
    let err = a
        .upload_file(futures::stream::iter([header]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let err = a.download_file(download(&a_session.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // B is untouched by A's cap.
    print_one(&mut b, &b_session.id, Duration::from_secs(20)).await;

    // The slot goes with the stream: once A lets go of its download, A may stream again.
    drop(downloading);
    eventually!(s.flood.cancelled() == 1);
    eventually!(matches!(
        run_print_one(&mut a, &a_session.id).await,
        Ok(true)
    ));
    drop(flooding);
}
