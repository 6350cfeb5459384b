//! In-test gRPC doubles: [`GrpcDouble`] serves a set of tonic services on `127.0.0.1:0` (or
//! a Unix socket) in a task. tonic runs each connection in a task of its own, so a panic
//! in a handler (a failed assertion in a double) would only reset that call; here it is
//! caught, answered as INTERNAL naming the panic, and re-raised by [`GrpcDouble::join`],
//! so a test that joins its double fails with the double's own message.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::Status;
use tonic::body::Body;
use tonic::service::Routes;

/// How long [`GrpcDouble::join`] lets open calls finish before it stops the server anyway.
const JOIN_GRACE: Duration = Duration::from_secs(10);

/// A running double; stops serving when dropped (open calls are cut off).
pub struct GrpcDouble {
    addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    panics: Panics,
}

impl GrpcDouble {
    /// Serves `routes` (e.g. `Routes::new(FooServer::new(double)).add_service(..)`) on
    /// `127.0.0.1:0`.
    pub async fn start(routes: Routes) -> GrpcDouble {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        Self::serve(routes, Some(addr), TcpListenerStream::new(listener))
    }

    /// Serves `routes` on the Unix socket `path` (created here).
    pub fn start_unix(routes: Routes, path: &Path) -> GrpcDouble {
        let listener = tokio::net::UnixListener::bind(path)
            .unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        Self::serve(routes, None, UnixListenerStream::new(listener))
    }

    fn serve<I, IO>(routes: Routes, addr: Option<SocketAddr>, incoming: I) -> GrpcDouble
    where
        I: tokio_stream::Stream<Item = std::io::Result<IO>> + Send + 'static,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
    {
        let panics = Panics::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .layer(CatchPanicLayer {
                panics: panics.clone(),
            })
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            });
        GrpcDouble {
            addr,
            stop: Some(stop),
            task: Some(tokio::spawn(server)),
            panics,
        }
    }

    /// The bound TCP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("a Unix-socket double has no TCP address")
    }

    /// `http://<addr>`, for tonic clients and the URLs services are configured with.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Stops accepting, lets open calls finish (up to 10 s), and re-raises the first panic
    /// of a handler or of the server; panics if the server failed.
    pub async fn join(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let mut task = self.task.take().expect("joined once");
        let result = match tokio::time::timeout(JOIN_GRACE, &mut task).await {
            Ok(result) => result,
            Err(_) => {
                task.abort();
                Ok(Ok(()))
            }
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the double's server failed: {e}"),
            Err(e) if e.is_panic() => resume_unwind(e.into_panic()),
            Err(e) => panic!("the double's server task: {e}"),
        }
        if let Some(payload) = self.panics.take() {
            resume_unwind(payload);
        }
    }
}

impl Drop for GrpcDouble {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The first panic of any handler.
#[derive(Clone, Default)]
struct Panics(Arc<Mutex<Option<Box<dyn Any + Send>>>>);

impl Panics {
    /// Keeps `payload` if it is the first; returns the status the caller gets instead.
    fn record(&self, payload: Box<dyn Any + Send>) -> Status {
        let message = panic_message(payload.as_ref());
        let mut first = self.0.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(payload);
        Status::internal(format!("the double panicked: {message}"))
    }

    fn take(&self) -> Option<Box<dyn Any + Send>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(not a string)".into())
}

#[derive(Clone)]
struct CatchPanicLayer {
    panics: Panics,
}

impl<S> tower_layer::Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;
    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic {
            inner,
            panics: self.panics.clone(),
        }
    }
}

/// Catches panics while a handler makes its response and while its body (a response
/// stream) is polled. A task the handler spawns is its own business.
#[derive(Clone)]
struct CatchPanic<S> {
    inner: S,
    panics: Panics,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower_service::Service<http::Request<Body>> for CatchPanic<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let panics = self.panics.clone();
        let fut = match catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(fut) => fut,
            Err(payload) => {
                let status = panics.record(payload);
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        let mut fut = Box::pin(fut);
        Box::pin(async move {
            let outcome = std::future::poll_fn(|cx| {
                match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
                    Ok(Poll::Pending) => Poll::Pending,
                    Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
                    Err(payload) => Poll::Ready(Err(payload)),
                }
            })
            .await;
            match outcome {
                Ok(Ok(response)) => Ok(response.map(|inner| {
                    Body::new(CatchPanicBody {
                        inner: Some(inner),
                        panics,
                    })
                })),
                Ok(Err(never)) => match never {},
                Err(payload) => Ok(panics.record(payload).into_http()),
            }
        })
    }
}

/// A response body whose panics end the call with INTERNAL instead of resetting it.
struct CatchPanicBody {
    /// `None` once it panicked: a body that panicked is not polled again.
    inner: Option<Body>,
    panics: Panics,
}

impl http_body::Body for CatchPanicBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll_frame(cx))) {
            Ok(frame) => frame,
            Err(payload) => {
                this.inner = None;
                let status = this.panics.record(payload);
                // Trailers, as tonic ends a failed stream: the caller reads the status.
                let mut trailers = http::HeaderMap::new();
                match status.add_header(&mut trailers) {
                    Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    Err(status) => Poll::Ready(Some(Err(status))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_proto::executor::v1 as ex;
    use capsa_proto::executor::v1::executor_service_client::ExecutorServiceClient;
    use capsa_proto::executor::v1::executor_service_server::{
        ExecutorService, ExecutorServiceServer,
    };
    use tokio_stream::StreamExt as _;
    use tonic::{Code, Request, Response};

    type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

    /// Configures fine unless the vm id is "boom"; its Execute stream panics at event 2.
    struct Double;

    fn unused<T>() -> Result<T, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    #[tonic::async_trait]
    impl ExecutorService for Double {
        async fn configure_vm(
            &self,
            req: Request<ex::ConfigureVmRequest>,
        ) -> Result<Response<ex::ConfigureVmResponse>, Status> {
            assert_ne!(req.into_inner().vm_id, "boom", "the double saw vm boom");
            Ok(Response::new(ex::ConfigureVmResponse::default()))
        }
        type ExecuteStream = Stream<ex::ExecuteResponse>;
        async fn execute(
            &self,
            _: Request<ex::ExecuteRequest>,
        ) -> Result<Response<Self::ExecuteStream>, Status> {
            let events = tokio_stream::iter(1..=3).map(|i| {
                assert!(i < 2, "event {i} of the stream");
                Ok(ex::ExecuteResponse::default())
            });
            Ok(Response::new(Box::pin(events)))
        }
        async fn upload_file(
            &self,
            _: Request<tonic::Streaming<ex::UploadFileRequest>>,
        ) -> Result<Response<ex::UploadFileResponse>, Status> {
            unused()
        }
        type DownloadFileStream = Stream<ex::DownloadFileResponse>;
        async fn download_file(
            &self,
            _: Request<ex::DownloadFileRequest>,
        ) -> Result<Response<Self::DownloadFileStream>, Status> {
            unused()
        }
        async fn list_files(
            &self,
            _: Request<ex::ListFilesRequest>,
        ) -> Result<Response<ex::ListFilesResponse>, Status> {
            unused()
        }
        async fn get_file_info(
            &self,
            _: Request<ex::GetFileInfoRequest>,
        ) -> Result<Response<ex::GetFileInfoResponse>, Status> {
            unused()
        }
        async fn make_directory(
            &self,
            _: Request<ex::MakeDirectoryRequest>,
        ) -> Result<Response<ex::MakeDirectoryResponse>, Status> {
            unused()
        }
        async fn remove_file(
            &self,
            _: Request<ex::RemoveFileRequest>,
        ) -> Result<Response<ex::RemoveFileResponse>, Status> {
            unused()
        }
        async fn get_guest_stats(
            &self,
            _: Request<ex::GetGuestStatsRequest>,
        ) -> Result<Response<ex::GetGuestStatsResponse>, Status> {
            unused()
        }
        async fn start_process(
            &self,
            _: Request<ex::StartProcessRequest>,
        ) -> Result<Response<ex::StartProcessResponse>, Status> {
            unused()
        }
        async fn list_processes(
            &self,
            _: Request<ex::ListProcessesRequest>,
        ) -> Result<Response<ex::ListProcessesResponse>, Status> {
            unused()
        }
        async fn wait_process(
            &self,
            _: Request<ex::WaitProcessRequest>,
        ) -> Result<Response<ex::WaitProcessResponse>, Status> {
            unused()
        }
        async fn signal_process(
            &self,
            _: Request<ex::SignalProcessRequest>,
        ) -> Result<Response<ex::SignalProcessResponse>, Status> {
            unused()
        }
        async fn write_stdin(
            &self,
            _: Request<ex::WriteStdinRequest>,
        ) -> Result<Response<ex::WriteStdinResponse>, Status> {
            unused()
        }
        type AttachProcessStream = Stream<ex::AttachProcessResponse>;
        async fn attach_process(
            &self,
            _: Request<ex::AttachProcessRequest>,
        ) -> Result<Response<Self::AttachProcessStream>, Status> {
            unused()
        }
        type OpenTerminalStream = Stream<ex::OpenTerminalResponse>;
        async fn open_terminal(
            &self,
            _: Request<tonic::Streaming<ex::OpenTerminalRequest>>,
        ) -> Result<Response<Self::OpenTerminalStream>, Status> {
            unused()
        }
        type ConnectPortStream = Stream<ex::ConnectPortResponse>;
        async fn connect_port(
            &self,
            _: Request<tonic::Streaming<ex::ConnectPortRequest>>,
        ) -> Result<Response<Self::ConnectPortStream>, Status> {
            unused()
        }
    }

    async fn start() -> (GrpcDouble, ExecutorServiceClient<tonic::transport::Channel>) {
        let double = GrpcDouble::start(Routes::new(ExecutorServiceServer::new(Double))).await;
        let client = ExecutorServiceClient::connect(double.url()).await.unwrap();
        (double, client)
    }

    fn configure(vm_id: &str) -> ex::ConfigureVmRequest {
        ex::ConfigureVmRequest {
            vm_id: vm_id.into(),
            ..Default::default()
        }
    }

    /// The message `join` panicked with (it runs in a task so the panic can be inspected).
    async fn join_panic(double: GrpcDouble) -> String {
        let err = tokio::spawn(double.join())
            .await
            .expect_err("join re-raises the double's panic");
        panic_message(err.into_panic().as_ref())
    }

    #[tokio::test]
    async fn a_double_without_panics_joins_cleanly_and_keeps_serving_until_then() {
        let (double, mut client) = start().await;
        for _ in 0..3 {
            client.configure_vm(configure("vm-1")).await.unwrap();
        }
        double.join().await;
    }

    #[tokio::test]
    async fn a_handler_panic_answers_internal_and_join_re_raises_it() {
        let (double, mut client) = start().await;
        let err = client.configure_vm(configure("boom")).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().contains("the double saw vm boom"), "{err:?}");
        // The server lives on: later calls are served.
        client.configure_vm(configure("vm-1")).await.unwrap();
        let message = join_panic(double).await;
        assert!(message.contains("the double saw vm boom"), "{message}");
    }

    #[tokio::test]
    async fn a_panic_in_a_response_stream_ends_it_with_internal_and_is_re_raised() {
        let (double, mut client) = start().await;
        let mut stream = client
            .execute(ex::ExecuteRequest::default())
            .await
            .unwrap()
            .into_inner();
        // Event 1 may or may not get out first: tonic batches the events that are ready.
        let err = loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended cleanly"),
                Err(err) => break err,
            }
        };
        assert_eq!(err.code(), Code::Internal, "{err:?}");
        assert!(err.message().contains("event 2 of the stream"), "{err:?}");
        let message = join_panic(double).await;
        assert!(message.contains("event 2 of the stream"), "{message}");
    }
}
