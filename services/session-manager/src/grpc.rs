//! The gRPC adapter: authenticates each call, validates it and translates proto ⇄ domain,
//! and turns errors into statuses through `capsa_grpc::to_status`. No business logic lives
//! here, and nothing below it sees a request message or returns a `Status`.

use std::pin::Pin;
use std::sync::Arc;

use capsa_proto::session::v1 as pb;
use capsa_proto::session::v1::session_service_server::SessionService;
use capsa_proto::time::timestamp_ms;
use capsa_store::{EndReason, SessionRecord, SessionStatus};
use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use crate::app::App;
use crate::error::Error;
use crate::proxy::DownloadPart;
use crate::validate;

type GrpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct SessionApi {
    app: Arc<App>,
}

impl SessionApi {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }

    async fn tenant<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let header = authorization(req)?;
        self.app.authenticate(header).await.map_err(|e| status(&e))
    }

    /// The caller's tenant and its session `session_id`, read in one Redis round trip once
    /// `validated` (the request's own check, which covers `session_id`) passes. Errors come
    /// in the order of every other call: UNAUTHENTICATED, then INVALID_ARGUMENT, then
    /// NOT_FOUND.
    async fn tenant_and_session<T, V>(
        &self,
        req: &Request<T>,
        session_id: &str,
        validated: Result<V, Error>,
    ) -> Result<(String, SessionRecord, V), Status> {
        let header = authorization(req)?;
        let valid = match validated {
            Ok(v) => v,
            Err(e) => {
                self.app
                    .authenticate(header)
                    .await
                    .map_err(|e| status(&e))?;
                return Err(status(&e));
            }
        };
        let (tenant, session) = self
            .app
            .authenticate_for_session(header, session_id)
            .await
            .map_err(|e| status(&e))?;
        Ok((tenant, session, valid))
    }
}

/// The call's `authorization` metadata, if any.
fn authorization<T>(req: &Request<T>) -> Result<Option<&str>, Status> {
    match req.metadata().get("authorization") {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| {
            status(&Error::Unauthenticated(
                "authorization metadata is not ASCII",
            ))
        }),
    }
}

fn status(err: &Error) -> Status {
    capsa_grpc::to_status(err)
}

/// The domain record as the public message.
pub fn session_to_proto(rec: &SessionRecord) -> pb::Session {
    pb::Session {
        id: rec.id.clone(),
        status: match rec.status {
            SessionStatus::Creating => pb::SessionStatus::Creating,
            SessionStatus::Active => pb::SessionStatus::Active,
            SessionStatus::Suspending => pb::SessionStatus::Suspending,
            SessionStatus::Suspended => pb::SessionStatus::Suspended,
            SessionStatus::Resuming => pb::SessionStatus::Resuming,
            SessionStatus::Terminating => pb::SessionStatus::Terminating,
            SessionStatus::Terminated => pb::SessionStatus::Terminated,
        } as i32,
        end_reason: match rec.end_reason {
            None => pb::EndReason::Unspecified,
            Some(EndReason::Deleted) => pb::EndReason::Deleted,
            Some(EndReason::Expired) => pb::EndReason::Expired,
            Some(EndReason::VmFailed) => pb::EndReason::VmFailed,
            Some(EndReason::CreateFailed) => pb::EndReason::CreateFailed,
        } as i32,
        end_message: rec.end_message.clone(),
        template: rec.template.clone(),
        vcpus: rec.vcpus,
        memory_mib: rec.memory_mib,
        // Values are never stored, so never returned: names only.
        env: Default::default(),
        env_names: rec.env_names.clone(),
        metadata: rec
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        create_time: Some(timestamp_ms(rec.create_ms)),
        expire_time: rec.expire_ms.map(timestamp_ms),
        last_active_time: Some(timestamp_ms(rec.last_active_ms)),
        end_time: rec.end_ms.map(timestamp_ms),
        node_id: rec.node_id.clone(),
        vm_id: rec.vm_id.clone(),
        egress: Some(capsa_egress::proto::to_proto(&rec.egress)),
        auto_suspend: rec.auto_suspend,
        auto_resume: rec.auto_resume,
        suspend_time: rec.suspend_ms.map(timestamp_ms),
        snapshot_bytes: if rec.status == SessionStatus::Suspended {
            rec.snapshot_bytes
        } else {
            0
        },
        source_snapshot_id: rec.source_snapshot_id.clone(),
        parent_session_id: rec.parent_session_id.clone(),
    }
}

pub fn snapshot_to_proto(rec: &capsa_store::SnapshotRecord) -> pb::Snapshot {
    use capsa_store::SnapshotStatus as S;
    pb::Snapshot {
        id: rec.id.clone(),
        name: rec.name.clone(),
        status: match rec.status {
            S::Creating => pb::SnapshotStatus::Creating,
            S::Ready => pb::SnapshotStatus::Ready,
            // Gone as far as the tenant is concerned: its files are on their way out.
            S::Deleting => pb::SnapshotStatus::Unspecified,
        } as i32,
        session_id: rec.session_id.clone(),
        template: rec.template.clone(),
        vcpus: rec.vcpus,
        memory_mib: rec.memory_mib,
        size_bytes: rec.size_bytes,
        create_time: Some(timestamp_ms(rec.create_ms)),
        node_id: rec.node_id.clone(),
        metadata: rec
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let spec = validate::create(req.get_ref()).map_err(|e| status(&e))?;
        let rec = self
            .app
            .create_session_for_caller(&tenant, spec)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::CreateSessionResponse {
            session: Some(session_to_proto(&rec)),
        }))
    }

    async fn get_session(
        &self,
        req: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let id = &req.get_ref().session_id;
        let (_, rec, ()) = self
            .tenant_and_session(&req, id, validate::session_id(id))
            .await?;
        Ok(Response::new(pb::GetSessionResponse {
            session: Some(session_to_proto(&rec)),
        }))
    }

    async fn list_sessions(
        &self,
        req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let (filter, page_size, after) = validate::list(req.get_ref()).map_err(|e| status(&e))?;
        let (sessions, next) = self
            .app
            .list_sessions(&tenant, &filter, page_size, after.as_ref())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: sessions.iter().map(session_to_proto).collect(),
            next_page_token: next.map(|c| c.to_token()).unwrap_or_default(),
        }))
    }

    async fn delete_session(
        &self,
        req: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        validate::session_id(&req.get_ref().session_id).map_err(|e| status(&e))?;
        let rec = self
            .app
            .delete_session(&tenant, &req.get_ref().session_id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteSessionResponse {
            session: Some(session_to_proto(&rec)),
        }))
    }

    async fn extend_session(
        &self,
        req: Request<pb::ExtendSessionRequest>,
    ) -> Result<Response<pb::ExtendSessionResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let r = req.get_ref();
        validate::session_id(&r.session_id).map_err(|e| status(&e))?;
        let by = validate::extend_by(r.extend_by.as_ref()).map_err(|e| status(&e))?;
        let rec = self
            .app
            .extend_session(&tenant, &r.session_id, by)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ExtendSessionResponse {
            session: Some(session_to_proto(&rec)),
        }))
    }

    async fn suspend_session(
        &self,
        req: Request<pb::SuspendSessionRequest>,
    ) -> Result<Response<pb::SuspendSessionResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        validate::session_id(&req.get_ref().session_id).map_err(|e| status(&e))?;
        let rec = self
            .app
            .suspend_session(&tenant, &req.get_ref().session_id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::SuspendSessionResponse {
            session: Some(session_to_proto(&rec)),
        }))
    }

    async fn snapshot_session(
        &self,
        req: Request<pb::SnapshotSessionRequest>,
    ) -> Result<Response<pb::SnapshotSessionResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let spec = validate::snapshot(req.get_ref()).map_err(|e| status(&e))?;
        let snap = self
            .app
            .snapshot_session(&tenant, &req.get_ref().session_id, spec)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::SnapshotSessionResponse {
            snapshot: Some(snapshot_to_proto(&snap)),
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let id = &req.get_ref().snapshot_id;
        validate::snapshot_id("snapshot_id", id).map_err(|e| status(&e))?;
        let snap = self
            .app
            .get_snapshot(&tenant, id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::GetSnapshotResponse {
            snapshot: Some(snapshot_to_proto(&snap)),
        }))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let (page_size, after) = validate::list_snapshots(req.get_ref()).map_err(|e| status(&e))?;
        let (page, next) = self
            .app
            .list_snapshots(&tenant, page_size, after.as_deref())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: page.iter().map(snapshot_to_proto).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let id = &req.get_ref().snapshot_id;
        validate::snapshot_id("snapshot_id", id).map_err(|e| status(&e))?;
        let snap = self
            .app
            .delete_snapshot_of_tenant(&tenant, id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteSnapshotResponse {
            snapshot: Some(snapshot_to_proto(&snap)),
        }))
    }

    async fn fork_session(
        &self,
        req: Request<pb::ForkSessionRequest>,
    ) -> Result<Response<pb::ForkSessionResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let spec = validate::fork(req.get_ref()).map_err(|e| status(&e))?;
        let forks = self
            .app
            .fork_session(&tenant, &req.get_ref().session_id, spec)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ForkSessionResponse {
            sessions: forks.iter().map(session_to_proto).collect(),
        }))
    }

    async fn resume_session(
        &self,
        req: Request<pb::ResumeSessionRequest>,
    ) -> Result<Response<pb::ResumeSessionResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        validate::session_id(&req.get_ref().session_id).map_err(|e| status(&e))?;
        let rec = self
            .app
            .resume_session(&tenant, &req.get_ref().session_id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ResumeSessionResponse {
            session: Some(session_to_proto(&rec)),
        }))
    }

    type ExecuteStream = GrpcStream<pb::ExecuteResponse>;

    async fn execute(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let r = req.get_ref();
        let (tenant, session, spec) = self
            .tenant_and_session(&req, &r.session_id, validate::execute(r))
            .await?;
        let events = self
            .app
            .execute(&tenant, session, spec)
            .await
            .map_err(|e| status(&e))?;
        let stream = events.map(|item| {
            item.map(|event| pb::ExecuteResponse { event: Some(event) })
                .map_err(|e| status(&e))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn upload_file(
        &self,
        req: Request<Streaming<pb::UploadFileRequest>>,
    ) -> Result<Response<pb::UploadFileResponse>, Status> {
        use pb::upload_file_request::Part;
        let tenant = self.tenant(&req).await?;
        let mut inbound = req.into_inner();
        let header = match inbound.message().await {
            Ok(Some(pb::UploadFileRequest {
                part: Some(Part::Header(h)),
            })) => h,
            Ok(_) => {
                let e = Error::field("header", "the first message must be the header");
                return Err(status(&e));
            }
            Err(s) => return Err(status(&Error::ClientStream(s.message().to_owned()))),
        };
        validate::upload_header(&header).map_err(|e| status(&e))?;
        let file = header.file.unwrap_or_default();
        let data = inbound.map(|msg| match msg {
            Ok(pb::UploadFileRequest {
                part: Some(Part::Data(chunk)),
            }) => validate::chunk(chunk.len()).map(|()| chunk),
            Ok(pb::UploadFileRequest {
                part: Some(Part::Header(_)),
            }) => Err(Error::field(
                "header",
                "only the first message may be a header",
            )),
            Ok(pb::UploadFileRequest { part: None }) => Err(Error::field(
                "part",
                "a message carried neither header nor data",
            )),
            Err(s) => Err(Error::ClientStream(s.message().to_owned())),
        });
        let result = self
            .app
            .upload(&tenant, &header.session_id, file, data)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::UploadFileResponse {
            result: Some(result),
        }))
    }

    type DownloadFileStream = GrpcStream<pb::DownloadFileResponse>;

    async fn download_file(
        &self,
        req: Request<pb::DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        use pb::download_file_response::Part;
        let tenant = self.tenant(&req).await?;
        let r = req.into_inner();
        validate::session_id(&r.session_id).map_err(|e| status(&e))?;
        validate::path("path", &r.path).map_err(|e| status(&e))?;
        let parts = self
            .app
            .download(&tenant, &r.session_id, r.path)
            .await
            .map_err(|e| status(&e))?;
        let stream = parts.map(|item| {
            let part = match item.map_err(|e| status(&e))? {
                DownloadPart::Info(info) => Part::Info(info),
                DownloadPart::Data(data) => Part::Data(data),
            };
            Ok(pb::DownloadFileResponse { part: Some(part) })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_files(
        &self,
        req: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let r = req.into_inner();
        validate::session_id(&r.session_id).map_err(|e| status(&e))?;
        validate::path("path", &r.path).map_err(|e| status(&e))?;
        let files = self
            .app
            .list_files(&tenant, &r.session_id, r.path)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ListFilesResponse { files }))
    }

    async fn get_file_info(
        &self,
        req: Request<pb::GetFileInfoRequest>,
    ) -> Result<Response<pb::GetFileInfoResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let r = req.into_inner();
        validate::session_id(&r.session_id).map_err(|e| status(&e))?;
        validate::path("path", &r.path).map_err(|e| status(&e))?;
        let info = self
            .app
            .file_info(&tenant, &r.session_id, r.path)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::GetFileInfoResponse { info }))
    }

    async fn make_directory(
        &self,
        req: Request<pb::MakeDirectoryRequest>,
    ) -> Result<Response<pb::MakeDirectoryResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let r = req.into_inner();
        validate::session_id(&r.session_id).map_err(|e| status(&e))?;
        validate::path("path", &r.path).map_err(|e| status(&e))?;
        validate::mode("mode", r.mode).map_err(|e| status(&e))?;
        let info = self
            .app
            .make_directory(&tenant, &r.session_id, r.path, r.mode)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::MakeDirectoryResponse { info }))
    }

    async fn remove_file(
        &self,
        req: Request<pb::RemoveFileRequest>,
    ) -> Result<Response<pb::RemoveFileResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let r = req.into_inner();
        validate::session_id(&r.session_id).map_err(|e| status(&e))?;
        validate::path("path", &r.path).map_err(|e| status(&e))?;
        self.app
            .remove_file(&tenant, &r.session_id, r.path, r.recursive)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::RemoveFileResponse {}))
    }

    async fn get_usage(
        &self,
        req: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let id = &req.get_ref().session_id;
        validate::session_id(id).map_err(|e| status(&e))?;
        let usage = self
            .app
            .session_usage(&tenant, id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::GetUsageResponse {
            session_id: id.clone(),
            usage,
        }))
    }

    async fn get_egress_policy(
        &self,
        req: Request<pb::GetEgressPolicyRequest>,
    ) -> Result<Response<pb::GetEgressPolicyResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let id = &req.get_ref().session_id;
        validate::session_id(id).map_err(|e| status(&e))?;
        let policy = self
            .app
            .egress_policy(&tenant, id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::GetEgressPolicyResponse {
            egress: Some(capsa_egress::proto::to_proto(&policy)),
        }))
    }

    async fn update_egress_policy(
        &self,
        req: Request<pb::UpdateEgressPolicyRequest>,
    ) -> Result<Response<pb::UpdateEgressPolicyResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let r = req.get_ref();
        validate::session_id(&r.session_id).map_err(|e| status(&e))?;
        let policy = validate::egress_required(r.egress.as_ref()).map_err(|e| status(&e))?;
        let policy = self
            .app
            .update_egress_policy(&tenant, &r.session_id, policy)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::UpdateEgressPolicyResponse {
            egress: Some(capsa_egress::proto::to_proto(&policy)),
        }))
    }

    async fn get_tenant_usage(
        &self,
        req: Request<pb::GetTenantUsageRequest>,
    ) -> Result<Response<pb::GetTenantUsageResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let u = self
            .app
            .tenant_usage(&tenant)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::GetTenantUsageResponse {
            tenant_id: tenant,
            total: u.total,
            active_sessions: u.active_sessions,
            total_sessions: u.total_sessions,
            snapshots: u.snapshots.count,
            snapshot_bytes: u.snapshots.named_bytes,
            snapshot_limit: u.snapshot_limits.max_snapshots,
            snapshot_bytes_limit: u.snapshot_limits.max_bytes,
            snapshot_gib_seconds: u.snapshots.gib_seconds,
        }))
    }

    async fn start_process(
        &self,
        req: Request<pb::StartProcessRequest>,
    ) -> Result<Response<pb::StartProcessResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let r = req.get_ref();
        validate::session_id(&r.session_id).map_err(|e| status(&e))?;
        let spec = validate::process_spec(r.spec.as_ref()).map_err(|e| status(&e))?;
        let process = self
            .app
            .start_process(&tenant, &r.session_id, spec)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::StartProcessResponse {
            process: Some(process),
        }))
    }

    async fn list_processes(
        &self,
        req: Request<pb::ListProcessesRequest>,
    ) -> Result<Response<pb::ListProcessesResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let id = &req.get_ref().session_id;
        validate::session_id(id).map_err(|e| status(&e))?;
        let processes = self
            .app
            .list_processes(&tenant, id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ListProcessesResponse { processes }))
    }

    async fn wait_process(
        &self,
        req: Request<pb::WaitProcessRequest>,
    ) -> Result<Response<pb::WaitProcessResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let r = req.into_inner();
        validate::session_id(&r.session_id).map_err(|e| status(&e))?;
        validate::process_id(&r.process_id).map_err(|e| status(&e))?;
        let timeout = validate::wait_timeout(r.timeout.as_ref()).map_err(|e| status(&e))?;
        let process = self
            .app
            .wait_process(&tenant, &r.session_id, r.process_id, timeout)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::WaitProcessResponse {
            process: Some(process),
        }))
    }

    async fn signal_process(
        &self,
        req: Request<pb::SignalProcessRequest>,
    ) -> Result<Response<pb::SignalProcessResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let r = req.into_inner();
        validate::session_id(&r.session_id).map_err(|e| status(&e))?;
        validate::process_id(&r.process_id).map_err(|e| status(&e))?;
        let signal = validate::signal(r.signal).map_err(|e| status(&e))?;
        let process = self
            .app
            .signal_process(&tenant, &r.session_id, r.process_id, signal)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::SignalProcessResponse {
            process: Some(process),
        }))
    }

    async fn write_stdin(
        &self,
        req: Request<pb::WriteStdinRequest>,
    ) -> Result<Response<pb::WriteStdinResponse>, Status> {
        let tenant = self.tenant(&req).await?;
        let r = req.into_inner();
        validate::session_id(&r.session_id).map_err(|e| status(&e))?;
        validate::process_id(&r.process_id).map_err(|e| status(&e))?;
        validate::stream_data(r.data.len()).map_err(|e| status(&e))?;
        self.app
            .write_stdin(&tenant, &r.session_id, r.process_id, r.data, r.close)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::WriteStdinResponse {}))
    }

    type AttachProcessStream = GrpcStream<pb::AttachProcessResponse>;

    async fn attach_process(
        &self,
        req: Request<pb::AttachProcessRequest>,
    ) -> Result<Response<Self::AttachProcessStream>, Status> {
        let tenant = self.tenant(&req).await?;
        let r = req.into_inner();
        validate::session_id(&r.session_id).map_err(|e| status(&e))?;
        validate::process_id(&r.process_id).map_err(|e| status(&e))?;
        let events = self
            .app
            .attach_process(
                &tenant,
                &r.session_id,
                r.process_id,
                r.from_offset,
                r.follow,
            )
            .await
            .map_err(|e| status(&e))?;
        let stream = events.map(|item| {
            item.map(|event| pb::AttachProcessResponse { event: Some(event) })
                .map_err(|e| status(&e))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type OpenTerminalStream = GrpcStream<pb::OpenTerminalResponse>;

    async fn open_terminal(
        &self,
        req: Request<Streaming<pb::OpenTerminalRequest>>,
    ) -> Result<Response<Self::OpenTerminalStream>, Status> {
        use capsa_proto::executor::v1::open_terminal_request::Part as Up;
        use pb::open_terminal_request::Part;
        let tenant = self.tenant(&req).await?;
        let mut inbound = req.into_inner();
        let header = match inbound.message().await {
            Ok(Some(pb::OpenTerminalRequest {
                part: Some(Part::Open(h)),
            })) => h,
            Ok(_) => {
                let e = Error::field("open", "the first message must be `open`");
                return Err(status(&e));
            }
            Err(s) => return Err(status(&Error::ClientStream(s.message().to_owned()))),
        };
        let terminal = validate::terminal_open(&header).map_err(|e| status(&e))?;
        let input = inbound.map(|msg| match msg {
            Ok(pb::OpenTerminalRequest {
                part: Some(Part::Data(data)),
            }) => validate::stream_data(data.len()).map(|()| Up::Data(data)),
            Ok(pb::OpenTerminalRequest {
                part: Some(Part::Resize(size)),
            }) => validate::terminal_size("resize", Some(&size)).map(|()| Up::Resize(size)),
            Ok(pb::OpenTerminalRequest {
                part: Some(Part::Open(_)),
            }) => Err(Error::field("open", "only the first message may be `open`")),
            Ok(pb::OpenTerminalRequest { part: None }) => Err(Error::field(
                "part",
                "a message carried neither data nor resize",
            )),
            Err(s) => Err(Error::ClientStream(s.message().to_owned())),
        });
        let output = self
            .app
            .open_terminal(&tenant, &header.session_id, terminal, Box::pin(input))
            .await
            .map_err(|e| status(&e))?;
        let stream = output.map(|item| {
            item.map(|output| pb::OpenTerminalResponse {
                output: Some(output),
            })
            .map_err(|e| status(&e))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type ConnectPortStream = GrpcStream<pb::ConnectPortResponse>;

    async fn connect_port(
        &self,
        req: Request<Streaming<pb::ConnectPortRequest>>,
    ) -> Result<Response<Self::ConnectPortStream>, Status> {
        use pb::connect_port_request::Part;
        let tenant = self.tenant(&req).await?;
        let mut inbound = req.into_inner();
        let header = match inbound.message().await {
            Ok(Some(pb::ConnectPortRequest {
                part: Some(Part::Open(h)),
            })) => h,
            Ok(_) => {
                let e = Error::field(
                    "open",
                    "the first message must be `open` (session and port)",
                );
                return Err(status(&e));
            }
            Err(s) => return Err(status(&Error::ClientStream(s.message().to_owned()))),
        };
        let port = validate::port_open(&header).map_err(|e| status(&e))?;
        let input = inbound.map(|msg| match msg {
            Ok(pb::ConnectPortRequest {
                part: Some(Part::Data(data)),
            }) => validate::stream_data(data.len()).map(|()| data),
            Ok(pb::ConnectPortRequest {
                part: Some(Part::Open(_)),
            }) => Err(Error::field("open", "only the first message may be `open`")),
            Ok(pb::ConnectPortRequest { part: None }) => {
                Err(Error::field("part", "a message carried no data"))
            }
            Err(s) => Err(Error::ClientStream(s.message().to_owned())),
        });
        let output = self
            .app
            .connect_port(&tenant, &header.session_id, port, Box::pin(input))
            .await
            .map_err(|e| status(&e))?;
        let stream = output.map(|item| {
            item.map(|data| pb::ConnectPortResponse { data })
                .map_err(|e| status(&e))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
