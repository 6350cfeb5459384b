//! gRPC adapter: `capsa.executor.v1.ExecutorService` onto [`Executor`]. Only translation
//! happens here: proto messages to domain calls, domain errors to `Status` through
//! `capsa_grpc::to_status`.

use std::pin::Pin;
use std::sync::Arc;

use capsa_proto::agent::v1 as agent;
use capsa_proto::executor::v1::executor_service_server::ExecutorService;
use capsa_proto::executor::v1::*;
use capsa_proto::limits::MAX_CHUNK_BYTES;
use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::executor::Executor;
use crate::processes::check_data;

type GrpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct ExecutorGrpc {
    executor: Arc<Executor>,
}

impl ExecutorGrpc {
    pub fn new(executor: Arc<Executor>) -> ExecutorGrpc {
        ExecutorGrpc { executor }
    }
}

fn status(err: Error) -> Status {
    let mut status = capsa_grpc::to_status(&err);
    if matches!(err, Error::VmNotFound { .. }) {
        status.metadata_mut().insert(
            capsa_grpc::VM_GONE_METADATA,
            tonic::metadata::MetadataValue::from_static("1"),
        );
    }
    status
}

/// A message of the caller's request stream; a broken stream ends the call.
fn client_message<T>(message: Result<T, Status>) -> Result<T, Error> {
    message.map_err(|s| Error::ClientStream {
        message: s.message().to_owned(),
    })
}

#[tonic::async_trait]
impl ExecutorService for ExecutorGrpc {
    type ExecuteStream = GrpcStream<ExecuteResponse>;
    type DownloadFileStream = GrpcStream<DownloadFileResponse>;
    type AttachProcessStream = GrpcStream<AttachProcessResponse>;
    type OpenTerminalStream = GrpcStream<OpenTerminalResponse>;
    type ConnectPortStream = GrpcStream<ConnectPortResponse>;

    async fn configure_vm(
        &self,
        request: Request<ConfigureVmRequest>,
    ) -> Result<Response<ConfigureVmResponse>, Status> {
        let r = request.into_inner();
        self.executor
            .configure(&r.vm_id, r.env)
            .await
            .map_err(status)?;
        Ok(Response::new(ConfigureVmResponse {}))
    }

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let r = request.into_inner();
        let events = self.executor.execute(&r.vm_id, r.spec).map_err(status)?;
        let stream = events.map(|item| {
            item.map(|event| ExecuteResponse { event: Some(event) })
                .map_err(status)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn upload_file(
        &self,
        request: Request<Streaming<UploadFileRequest>>,
    ) -> Result<Response<UploadFileResponse>, Status> {
        let mut incoming = request.into_inner();
        let header = match incoming.message().await? {
            Some(UploadFileRequest {
                part: Some(upload_file_request::Part::Header(h)),
            }) => h,
            _ => {
                return Err(status(Error::invalid(
                    "header",
                    "must be the first message of an upload",
                )));
            }
        };
        let file = header
            .file
            .ok_or_else(|| status(Error::invalid("header.file", "is required")))?;
        let data = incoming.map(|message| match message {
            Ok(UploadFileRequest {
                part: Some(upload_file_request::Part::Data(chunk)),
            }) => {
                if chunk.len() > MAX_CHUNK_BYTES {
                    Err(Error::invalid("data", "chunks must be at most 1 MiB"))
                } else {
                    Ok(chunk)
                }
            }
            Ok(_) => Err(Error::invalid(
                "header",
                "may only be the first message of an upload",
            )),
            Err(s) => Err(Error::ClientStream {
                message: s.message().to_owned(),
            }),
        });
        let result = self
            .executor
            .upload(&header.vm_id, file, Box::pin(data))
            .await
            .map_err(status)?;
        Ok(Response::new(UploadFileResponse {
            result: Some(result),
        }))
    }

    async fn download_file(
        &self,
        request: Request<DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        let r = request.into_inner();
        let parts = self
            .executor
            .download(&r.vm_id, r.path)
            .await
            .map_err(status)?;
        let stream = parts.map(|item| {
            let part = item.map_err(status)?.map(|part| match part {
                agent::download_file_response::Part::Info(info) => {
                    download_file_response::Part::Info(info)
                }
                agent::download_file_response::Part::Data(data) => {
                    download_file_response::Part::Data(data)
                }
            });
            Ok(DownloadFileResponse { part })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_files(
        &self,
        request: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        let r = request.into_inner();
        let files = self
            .executor
            .list_files(&r.vm_id, r.path)
            .await
            .map_err(status)?
            .files;
        Ok(Response::new(ListFilesResponse { files }))
    }

    async fn get_file_info(
        &self,
        request: Request<GetFileInfoRequest>,
    ) -> Result<Response<GetFileInfoResponse>, Status> {
        let r = request.into_inner();
        let info = self
            .executor
            .file_info(&r.vm_id, r.path)
            .await
            .map_err(status)?
            .info;
        Ok(Response::new(GetFileInfoResponse { info }))
    }

    async fn make_directory(
        &self,
        request: Request<MakeDirectoryRequest>,
    ) -> Result<Response<MakeDirectoryResponse>, Status> {
        let r = request.into_inner();
        let info = self
            .executor
            .make_directory(&r.vm_id, r.path, r.mode)
            .await
            .map_err(status)?
            .info;
        Ok(Response::new(MakeDirectoryResponse { info }))
    }

    async fn remove_file(
        &self,
        request: Request<RemoveFileRequest>,
    ) -> Result<Response<RemoveFileResponse>, Status> {
        let r = request.into_inner();
        self.executor
            .remove_file(&r.vm_id, r.path, r.recursive)
            .await
            .map_err(status)?;
        Ok(Response::new(RemoveFileResponse {}))
    }

    async fn get_guest_stats(
        &self,
        request: Request<GetGuestStatsRequest>,
    ) -> Result<Response<GetGuestStatsResponse>, Status> {
        let r = request.into_inner();
        let s = self.executor.guest_stats(&r.vm_id).await.map_err(status)?;
        Ok(Response::new(GetGuestStatsResponse {
            memory_total_bytes: s.memory_total_bytes,
            memory_used_bytes: s.memory_used_bytes,
            process_count: s.process_count,
            uptime_ms: s.uptime_ms,
            processes_running: s.processes_running,
            terminals_open: s.terminals_open,
        }))
    }

    async fn start_process(
        &self,
        request: Request<StartProcessRequest>,
    ) -> Result<Response<StartProcessResponse>, Status> {
        let r = request.into_inner();
        let process = self
            .executor
            .start_process(&r.vm_id, r.spec)
            .await
            .map_err(status)?;
        Ok(Response::new(StartProcessResponse {
            process: Some(process),
        }))
    }

    async fn list_processes(
        &self,
        request: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        let r = request.into_inner();
        let processes = self
            .executor
            .list_processes(&r.vm_id)
            .await
            .map_err(status)?;
        Ok(Response::new(ListProcessesResponse { processes }))
    }

    async fn wait_process(
        &self,
        request: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        let r = request.into_inner();
        let process = self
            .executor
            .wait_process(&r.vm_id, r.process_id, r.timeout)
            .await
            .map_err(status)?;
        Ok(Response::new(WaitProcessResponse {
            process: Some(process),
        }))
    }

    async fn signal_process(
        &self,
        request: Request<SignalProcessRequest>,
    ) -> Result<Response<SignalProcessResponse>, Status> {
        let r = request.into_inner();
        let process = self
            .executor
            .signal_process(&r.vm_id, r.process_id, r.signal)
            .await
            .map_err(status)?;
        Ok(Response::new(SignalProcessResponse {
            process: Some(process),
        }))
    }

    async fn write_stdin(
        &self,
        request: Request<WriteStdinRequest>,
    ) -> Result<Response<WriteStdinResponse>, Status> {
        let r = request.into_inner();
        self.executor
            .write_stdin(&r.vm_id, r.process_id, r.data, r.close)
            .await
            .map_err(status)?;
        Ok(Response::new(WriteStdinResponse {}))
    }

    async fn attach_process(
        &self,
        request: Request<AttachProcessRequest>,
    ) -> Result<Response<Self::AttachProcessStream>, Status> {
        let r = request.into_inner();
        let events = self
            .executor
            .attach_process(&r.vm_id, r.process_id, r.from_offset, r.follow)
            .await
            .map_err(status)?;
        let stream = events.map(|item| {
            item.map(|event| AttachProcessResponse { event })
                .map_err(status)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn open_terminal(
        &self,
        request: Request<Streaming<OpenTerminalRequest>>,
    ) -> Result<Response<Self::OpenTerminalStream>, Status> {
        use agent::open_terminal_request::Part as Up;
        use open_terminal_request::Part;
        let mut incoming = request.into_inner();
        let header = match incoming.message().await? {
            Some(OpenTerminalRequest {
                part: Some(Part::Open(h)),
            }) => h,
            _ => {
                return Err(status(Error::invalid(
                    "open",
                    "must be the first message of a terminal",
                )));
            }
        };
        let terminal = header
            .terminal
            .ok_or_else(|| status(Error::invalid("open.terminal", "is required")))?;
        let input = incoming.map(|message| match client_message(message)?.part {
            Some(Part::Data(data)) => check_data(&data).map(|()| Up::Data(data)),
            Some(Part::Resize(size)) => Ok(Up::Resize(size)),
            Some(Part::Open(_)) => Err(Error::invalid(
                "open",
                "may only be the first message of a terminal",
            )),
            None => Err(Error::invalid("part", "a message carried nothing")),
        });
        let output = self
            .executor
            .open_terminal(&header.vm_id, terminal, Box::pin(input))
            .await
            .map_err(status)?;
        let stream = output.map(|item| {
            item.map(|output| OpenTerminalResponse { output })
                .map_err(status)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn connect_port(
        &self,
        request: Request<Streaming<ConnectPortRequest>>,
    ) -> Result<Response<Self::ConnectPortStream>, Status> {
        use connect_port_request::Part;
        let mut incoming = request.into_inner();
        let header = match incoming.message().await? {
            Some(ConnectPortRequest {
                part: Some(Part::Open(h)),
            }) => h,
            _ => {
                return Err(status(Error::invalid(
                    "open",
                    "must be the first message of a port connection",
                )));
            }
        };
        let input = incoming.map(|message| match client_message(message)?.part {
            Some(Part::Data(data)) => check_data(&data).map(|()| data),
            Some(Part::Open(_)) => Err(Error::invalid(
                "open",
                "may only be the first message of a port connection",
            )),
            None => Err(Error::invalid("part", "a message carried nothing")),
        });
        let output = self
            .executor
            .connect_port(&header.vm_id, header.port, Box::pin(input))
            .await
            .map_err(status)?;
        let stream = output.map(|item| {
            item.map(|data| ConnectPortResponse { data })
                .map_err(status)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
