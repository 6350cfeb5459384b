//! The AgentService adapter: validates and translates proto messages into domain calls
//! (kernels, files, stats, processes, terminals, ports, identity) and domain results and
//! errors back.
//! No business logic here.
//!
//! Streams: Execute, DownloadFile, OpenTerminal and ConnectPort answer through bounded
//! channels fed by a task, so a slow client slows the producer instead of growing a buffer;
//! AttachProcess reads the ring as the client pulls. The Execute stream holds a drop guard
//! on the execute's cancellation token: when the client goes away, tonic drops the stream
//! and the code is interrupted. No stream has a total deadline (a terminal may sit idle
//! for hours).

mod convert;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use capsa_proto::agent::v1 as pb;
use capsa_proto::agent::v1::agent_service_server::AgentService;
use capsa_proto::common::v1 as common;
use capsa_proto::limits::MAX_CHUNK_BYTES;
use futures::{Stream, StreamExt as _};
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::error::Error;
use crate::files;
use crate::identity::Identity;
use crate::kernel::Kernels;
use crate::ports::Ports;
use crate::processes::Processes;
use crate::stats;
use crate::terminal;
use convert::{
    check_env, event_to_proto, execute_request, info_to_proto, process_event_to_proto,
    process_info_to_proto, process_spec,
};

/// Events buffered between a kernel and a slow client.
const EXECUTE_BUFFER: usize = 16;
/// Chunks buffered between the file reader and a slow client.
const DOWNLOAD_BUFFER: usize = 4;
/// Screen chunks buffered between a terminal and a slow client.
const TERMINAL_BUFFER: usize = 8;
/// Chunks buffered between a guest socket and a slow client.
const PORT_BUFFER: usize = 8;

type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct AgentApi {
    kernels: Arc<Kernels>,
    processes: Arc<Processes>,
    ports: Arc<Ports>,
    identity: Arc<Identity>,
    default_timeout: Duration,
    /// Parent of every execute's token: cancelled when the agent shuts down.
    shutdown: CancellationToken,
}

impl AgentApi {
    pub fn new(
        kernels: Arc<Kernels>,
        processes: Arc<Processes>,
        identity: Identity,
        default_timeout: Duration,
        shutdown: CancellationToken,
    ) -> AgentApi {
        AgentApi {
            kernels,
            processes,
            ports: Arc::new(Ports::default()),
            identity: Arc::new(identity),
            default_timeout,
            shutdown,
        }
    }
}

fn status(e: Error) -> Status {
    capsa_grpc::to_status(&e)
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn configure(
        &self,
        request: Request<pb::ConfigureRequest>,
    ) -> Result<Response<pb::ConfigureResponse>, Status> {
        let env = check_env(request.into_inner().env).map_err(status)?;
        self.processes.configure(&env);
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
                let mut chunk = BytesMut::with_capacity(MAX_CHUNK_BYTES);
                while chunk.len() < MAX_CHUNK_BYTES {
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
                let last = chunk.len() < MAX_CHUNK_BYTES;
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
        let (processes_running, terminals_open) = self.processes.counts();
        Ok(Response::new(pb::GetStatsResponse {
            memory_total_bytes: s.memory_total_bytes,
            memory_used_bytes: s.memory_used_bytes,
            process_count: s.process_count,
            uptime_ms: s.uptime_ms,
            kernel_release: s.kernel_release,
            processes_running: processes_running as u32,
            terminals_open: terminals_open as u32,
        }))
    }

    async fn start_process(
        &self,
        request: Request<pb::StartProcessRequest>,
    ) -> Result<Response<pb::StartProcessResponse>, Status> {
        let spec = process_spec(request.into_inner().spec).map_err(status)?;
        let info = self.processes.start(spec).map_err(status)?;
        Ok(Response::new(pb::StartProcessResponse {
            process: Some(process_info_to_proto(info)),
        }))
    }

    async fn list_processes(
        &self,
        _request: Request<pb::ListProcessesRequest>,
    ) -> Result<Response<pb::ListProcessesResponse>, Status> {
        Ok(Response::new(pb::ListProcessesResponse {
            processes: self
                .processes
                .list()
                .into_iter()
                .map(process_info_to_proto)
                .collect(),
        }))
    }

    async fn wait_process(
        &self,
        request: Request<pb::WaitProcessRequest>,
    ) -> Result<Response<pb::WaitProcessResponse>, Status> {
        let r = request.into_inner();
        let timeout = convert::wait_timeout(r.timeout).map_err(status)?;
        let info = self
            .processes
            .wait(&r.process_id, timeout)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::WaitProcessResponse {
            process: Some(process_info_to_proto(info)),
        }))
    }

    async fn signal_process(
        &self,
        request: Request<pb::SignalProcessRequest>,
    ) -> Result<Response<pb::SignalProcessResponse>, Status> {
        let r = request.into_inner();
        let signal = convert::signal(r.signal).map_err(status)?;
        let info = self
            .processes
            .signal(&r.process_id, signal)
            .map_err(status)?;
        Ok(Response::new(pb::SignalProcessResponse {
            process: Some(process_info_to_proto(info)),
        }))
    }

    async fn write_stdin(
        &self,
        request: Request<pb::WriteStdinRequest>,
    ) -> Result<Response<pb::WriteStdinResponse>, Status> {
        let r = request.into_inner();
        convert::stream_data(&r.data).map_err(status)?;
        self.processes
            .write_stdin(&r.process_id, r.data, r.close)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::WriteStdinResponse {}))
    }

    type AttachProcessStream = BoxStream<pb::AttachProcessResponse>;

    async fn attach_process(
        &self,
        request: Request<pb::AttachProcessRequest>,
    ) -> Result<Response<Self::AttachProcessStream>, Status> {
        let r = request.into_inner();
        let attach = self
            .processes
            .attach(&r.process_id, r.from_offset, r.follow)
            .map_err(status)?;
        // Pulled by the transport: a slow client reads the ring later, nothing piles up.
        let stream = futures::stream::unfold(attach, |mut attach| async move {
            let event = attach.next().await?;
            Some((Ok(process_event_to_proto(event)), attach))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type OpenTerminalStream = BoxStream<pb::OpenTerminalResponse>;

    async fn open_terminal(
        &self,
        request: Request<Streaming<pb::OpenTerminalRequest>>,
    ) -> Result<Response<Self::OpenTerminalStream>, Status> {
        use common::terminal_output::Part as Out;
        use pb::open_terminal_request::Part;
        let mut requests = request.into_inner();
        let open = match requests.message().await? {
            Some(pb::OpenTerminalRequest {
                part: Some(Part::Open(open)),
            }) => open,
            _ => {
                return Err(status(Error::invalid(
                    "open",
                    "the first message must be `open`",
                )));
            }
        };
        let spec = convert::terminal_spec(open).map_err(status)?;
        let (info, terminal) = self.processes.open_terminal(spec).map_err(status)?;
        let span = tracing::info_span!("terminal", id = %info.id);
        // The end of the client's stream, or a broken one, hangs the terminal up.
        let input = futures::stream::unfold(requests, |mut requests| async move {
            let part = requests.message().await.ok()??.part;
            let input = match part {
                Some(Part::Data(data)) => {
                    convert::stream_data(&data).map(|()| terminal::Input::Data(data))
                }
                Some(Part::Resize(size)) => {
                    convert::terminal_size("resize", Some(size)).map(terminal::Input::Resize)
                }
                Some(Part::Open(_)) => Err(Error::invalid(
                    "open",
                    "only the first message may be `open`",
                )),
                None => Err(Error::invalid(
                    "part",
                    "message has neither data nor resize",
                )),
            };
            Some((input, requests))
        });
        let (tx, rx) = mpsc::channel(TERMINAL_BUFFER);
        tokio::spawn(terminal.run(input, tx).instrument(span));
        let opened = pb::OpenTerminalResponse {
            output: Some(common::TerminalOutput {
                part: Some(Out::Opened(process_info_to_proto(info))),
            }),
        };
        let rest = ReceiverStream::new(rx).map(|item| {
            let part = match item.map_err(status)? {
                terminal::Output::Data(data) => Out::Data(data),
                terminal::Output::Exit(exit) => Out::Exit(convert::exit_to_proto(exit)),
            };
            Ok(pb::OpenTerminalResponse {
                output: Some(common::TerminalOutput { part: Some(part) }),
            })
        });
        let stream = futures::stream::once(async { Ok(opened) }).chain(rest);
        Ok(Response::new(Box::pin(stream)))
    }

    type ConnectPortStream = BoxStream<pb::ConnectPortResponse>;

    async fn connect_port(
        &self,
        request: Request<Streaming<pb::ConnectPortRequest>>,
    ) -> Result<Response<Self::ConnectPortStream>, Status> {
        use pb::connect_port_request::Part;
        let mut requests = request.into_inner();
        let port = match requests.message().await? {
            Some(pb::ConnectPortRequest {
                part: Some(Part::Port(port)),
            }) => convert::port(port).map_err(status)?,
            _ => {
                return Err(status(Error::invalid(
                    "port",
                    "the first message must be the port",
                )));
            }
        };
        // Connected before the call answers: a closed port fails the call itself.
        let connection = self.ports.connect(port).await.map_err(status)?;
        let input = futures::stream::unfold(requests, |mut requests| async move {
            let data = match requests.message().await {
                Ok(None) => return None,
                Ok(Some(pb::ConnectPortRequest {
                    part: Some(Part::Data(data)),
                })) => convert::stream_data(&data).map(|()| data),
                Ok(Some(_)) => Err(Error::invalid(
                    "port",
                    "only the first message may be the port",
                )),
                Err(e) => Err(Error::Aborted(format!(
                    "the client's stream failed: {}",
                    e.message()
                ))),
            };
            Some((data, requests))
        });
        let (tx, rx) = mpsc::channel(PORT_BUFFER);
        let span = tracing::info_span!("port", port);
        tokio::spawn(
            connection
                .run(input, tx, self.shutdown.clone())
                .instrument(span),
        );
        let stream = ReceiverStream::new(rx).map(|item| {
            item.map(|data| pb::ConnectPortResponse { data })
                .map_err(status)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn reidentify(
        &self,
        request: Request<pb::ReidentifyRequest>,
    ) -> Result<Response<pb::ReidentifyResponse>, Status> {
        let req = convert::reidentify_request(request.into_inner()).map_err(status)?;
        let done = self.identity.reidentify(req).await.map_err(status)?;
        Ok(Response::new(pb::ReidentifyResponse {
            clock_step: Some(convert::signed_duration(done.clock_offset_nanos)),
            machine_id: done.machine_id,
        }))
    }
}
