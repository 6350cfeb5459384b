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
    capsa_grpc::to_status(&err)
}

#[tonic::async_trait]
impl ExecutorService for ExecutorGrpc {
    type ExecuteStream = GrpcStream<ExecuteResponse>;
    type DownloadFileStream = GrpcStream<DownloadFileResponse>;

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
        }))
    }
}
