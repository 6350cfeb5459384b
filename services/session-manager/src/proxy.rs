//! Execute and file calls, relayed to the executor of the session's node with the session's
//! vm id. Everything that can fail (validation, auth, tenant, session state) fails before a
//! stream starts, as a plain status. Streams go through a bounded channel and a relay task:
//! a slow client stalls the relay, which stops pulling from the node, so backpressure
//! reaches the guest; a client that goes away drops the relay's upstream call, which
//! interrupts the code in the guest. A node that fails mid-call is checked with GetVm: if
//! the VM failed or is gone the session ends VM_FAILED and the client is told so.

use std::sync::Arc;
use std::time::Duration;

use capsa_proto::common::v1::{ExecuteSpec, FileInfo, UploadResult};
use capsa_proto::executor::v1 as ex;
use capsa_proto::session::v1 as pb;
use capsa_proto::vmpool::v1::GetVmRequest;
use capsa_store::{EndReason, NodeRecord, SessionRecord, SessionStatus, Transition};
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::app::App;
use crate::clients::with_timeout;
use crate::error::Error;
use crate::sessions::{describe_end, not_active};
use crate::teardown::vm_failure;
use crate::validate;

/// Bound of every relay channel: a few chunks in flight, never a whole output.
const RELAY_BUFFER: usize = 16;
const UNARY_TIMEOUT: Duration = Duration::from_secs(30);
const VM_CHECK_TIMEOUT: Duration = Duration::from_millis(1500);

/// A relayed server stream, as the gRPC adapter hands it to tonic.
pub type Relay<T> = ReceiverStream<Result<T, Status>>;

/// Where a session's calls go.
#[derive(Clone)]
struct Target {
    session: SessionRecord,
    node: NodeRecord,
}

impl App {
    /// The tenant's ACTIVE session and its live node.
    async fn target(self: &Arc<Self>, tenant: &str, id: &str) -> Result<Target, Error> {
        let session = self.session(tenant, id).await?;
        if session.status != SessionStatus::Active {
            return Err(not_active(&session));
        }
        match self.nodes.get(&session.node_id).await? {
            Some(node) => Ok(Target { session, node }),
            None => {
                let why = format!("node {} stopped heartbeating", session.node_id);
                Err(self.vm_failed_error(&session, &why).await)
            }
        }
    }

    /// Ends an ACTIVE session as VM_FAILED (teardown in the background) and returns the
    /// UNAVAILABLE the client gets.
    async fn vm_failed_error(self: &Arc<Self>, session: &SessionRecord, why: &str) -> Error {
        match self.end_vm_failed(&session.id, why).await {
            // Ended meanwhile (deleted, expired): that, not the VM, is why the call broke.
            Ok(Transition::Conflict(rec)) if rec.end_reason != Some(EndReason::VmFailed) => {
                return Error::FailedPrecondition(format!(
                    "session {} ended during the call: {}",
                    rec.id,
                    describe_end(&rec)
                ));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot end session after vm failure"),
        }
        Error::Unavailable(format!(
            "the session's vm failed ({why}); session {} has ended with VM_FAILED",
            session.id
        ))
    }

    /// What a node error means for the client. UNAVAILABLE may mean the VM died: ask the
    /// node's vm-pool, and if the VM is failed or gone, end the session.
    async fn upstream_error(self: &Arc<Self>, t: &Target, status: Status) -> Error {
        if status.code() != tonic::Code::Unavailable && status.code() != tonic::Code::Unknown {
            return Error::Upstream(status);
        }
        let check = async {
            let mut client = self.clients.vmpool(&t.node.vmpool_url).ok()?;
            let req = GetVmRequest {
                vm_id: t.session.vm_id.clone(),
            };
            match tokio::time::timeout(
                VM_CHECK_TIMEOUT,
                client.get_vm(with_timeout(req, VM_CHECK_TIMEOUT)),
            )
            .await
            {
                Ok(Ok(resp)) => match resp.into_inner().vm {
                    Some(vm) => vm_failure(&vm),
                    None => Some(format!("vm {} is gone", t.session.vm_id)),
                },
                Ok(Err(s)) if s.code() == tonic::Code::NotFound => {
                    Some(format!("vm {} is gone", t.session.vm_id))
                }
                _ => None,
            }
        };
        match check.await {
            Some(why) => self.vm_failed_error(&t.session, &why).await,
            None => Error::Unavailable(format!(
                "node {} is unavailable: {}",
                t.node.node_id,
                status.message()
            )),
        }
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %req.session_id))]
    pub async fn execute(
        self: &Arc<Self>,
        tenant: &str,
        req: pb::ExecuteRequest,
    ) -> Result<Relay<pb::ExecuteResponse>, Error> {
        let spec: ExecuteSpec = validate::execute(&req)?;
        let t = self.target(tenant, &req.session_id).await?;
        // Activity is recorded off the stream's path: one HSET nobody waits for.
        let sessions = self.sessions.clone();
        let id = t.session.id.clone();
        tokio::spawn(async move {
            if let Err(e) = sessions.touch(&id).await {
                tracing::debug!(error = %e, "touch failed");
            }
        });
        let mut client = self.clients.executor(&t.node.executor_url)?;
        let upstream = ex::ExecuteRequest {
            vm_id: t.session.vm_id.clone(),
            spec: Some(spec),
        };
        let stream = match client.execute(upstream).await {
            Ok(resp) => resp.into_inner(),
            Err(status) => return Err(self.upstream_error(&t, status).await),
        };
        Ok(
            self.relay(t, stream, |ev: ex::ExecuteResponse| pb::ExecuteResponse {
                event: ev.event,
            }),
        )
    }

    pub async fn download(
        self: &Arc<Self>,
        tenant: &str,
        req: pb::DownloadFileRequest,
    ) -> Result<Relay<pb::DownloadFileResponse>, Error> {
        validate::session_id(&req.session_id)?;
        validate::path("path", &req.path)?;
        let t = self.target(tenant, &req.session_id).await?;
        let mut client = self.clients.executor(&t.node.executor_url)?;
        let upstream = ex::DownloadFileRequest {
            vm_id: t.session.vm_id.clone(),
            path: req.path,
        };
        let stream = match client.download_file(upstream).await {
            Ok(resp) => resp.into_inner(),
            Err(status) => return Err(self.upstream_error(&t, status).await),
        };
        Ok(self.relay(t, stream, |m: ex::DownloadFileResponse| {
            pb::DownloadFileResponse {
                part: m.part.map(|p| match p {
                    ex::download_file_response::Part::Info(i) => {
                        pb::download_file_response::Part::Info(i)
                    }
                    ex::download_file_response::Part::Data(d) => {
                        pb::download_file_response::Part::Data(d)
                    }
                }),
            }
        }))
    }

    /// Pumps an upstream server stream into a bounded channel. When the client goes away
    /// the receiver closes, the relay returns and drops `stream`, cancelling the call.
    fn relay<U, D>(
        self: &Arc<Self>,
        t: Target,
        mut stream: tonic::Streaming<U>,
        map: fn(U) -> D,
    ) -> Relay<D>
    where
        U: Send + 'static,
        D: Send + 'static,
    {
        let (tx, rx) = mpsc::channel(RELAY_BUFFER);
        let app = self.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    next = stream.message() => next,
                };
                match next {
                    Ok(Some(msg)) => {
                        if tx.send(Ok(map(msg))).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        let err = app.upstream_error(&t, status).await;
                        let _ = tx.send(Err(capsa_grpc::to_status(&err))).await;
                        return;
                    }
                }
            }
        });
        ReceiverStream::new(rx)
    }

    /// Relays an upload: the header (already read and validated by the caller's stream
    /// contract here), then data chunks, each checked before it is forwarded. A bad
    /// message drops the upstream call, so the guest discards its partial file.
    #[tracing::instrument(skip_all, fields(tenant = %tenant))]
    pub async fn upload<S>(
        self: &Arc<Self>,
        tenant: &str,
        mut inbound: S,
    ) -> Result<UploadResult, Error>
    where
        S: Stream<Item = Result<pb::UploadFileRequest, Status>> + Unpin + Send + 'static,
    {
        use pb::upload_file_request::Part;
        let header = match inbound.next().await {
            Some(Ok(pb::UploadFileRequest {
                part: Some(Part::Header(h)),
            })) => h,
            Some(Ok(_)) | None => {
                return Err(Error::field(
                    "header",
                    "the first message must be the header",
                ));
            }
            Some(Err(status)) => return Err(Error::Upstream(status)),
        };
        validate::upload_header(&header)?;
        let t = self.target(tenant, &header.session_id).await?;
        let mut client = self.clients.executor(&t.node.executor_url)?;
        let (tx, rx) = mpsc::channel::<ex::UploadFileRequest>(4);
        let first = ex::UploadFileRequest {
            part: Some(ex::upload_file_request::Part::Header(
                ex::UploadFileHeader {
                    vm_id: t.session.vm_id.clone(),
                    file: header.file,
                },
            )),
        };
        tx.send(first)
            .await
            .map_err(|_| Error::Internal("upload channel closed".into()))?;
        let pump = async move {
            while let Some(msg) = inbound.next().await {
                let data = match msg.map_err(Error::Upstream)?.part {
                    Some(Part::Data(d)) => d,
                    Some(Part::Header(_)) => {
                        return Err(Error::field(
                            "header",
                            "only the first message may be a header",
                        ));
                    }
                    None => {
                        return Err(Error::field(
                            "part",
                            "a message carried neither header nor data",
                        ));
                    }
                };
                validate::chunk(data.len())?;
                let msg = ex::UploadFileRequest {
                    part: Some(ex::upload_file_request::Part::Data(data)),
                };
                if tx.send(msg).await.is_err() {
                    break; // the node ended the call; its answer says why
                }
            }
            Ok::<(), Error>(())
        };
        let call = client.upload_file(ReceiverStream::new(rx));
        tokio::pin!(call);
        let result = tokio::select! {
            result = &mut call => result,
            pumped = pump => {
                pumped?;
                call.await
            }
        };
        match result {
            Ok(resp) => resp
                .into_inner()
                .result
                .ok_or_else(|| Error::Internal("executor returned no upload result".into())),
            Err(status) => Err(self.upstream_error(&t, status).await),
        }
    }

    /// The unary file calls share this: target, call with a deadline, map errors.
    async fn unary<T, F, Fut>(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        call: F,
    ) -> Result<T, Error>
    where
        F: FnOnce(crate::clients::ExecutorClient, String) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let t = self.target(tenant, session_id).await?;
        let client = self.clients.executor(&t.node.executor_url)?;
        match tokio::time::timeout(UNARY_TIMEOUT, call(client, t.session.vm_id.clone())).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(self.upstream_error(&t, status).await),
            Err(_) => Err(Error::Unavailable(format!(
                "node {} did not answer within {UNARY_TIMEOUT:?}",
                t.node.node_id
            ))),
        }
    }

    pub async fn list_files(
        self: &Arc<Self>,
        tenant: &str,
        req: pb::ListFilesRequest,
    ) -> Result<Vec<FileInfo>, Error> {
        validate::session_id(&req.session_id)?;
        validate::path("path", &req.path)?;
        let path = req.path;
        let resp = self
            .unary(tenant, &req.session_id, |mut c, vm_id| async move {
                c.list_files(with_timeout(
                    ex::ListFilesRequest { vm_id, path },
                    UNARY_TIMEOUT,
                ))
                .await
            })
            .await?;
        Ok(resp.files)
    }

    pub async fn file_info(
        self: &Arc<Self>,
        tenant: &str,
        req: pb::GetFileInfoRequest,
    ) -> Result<Option<FileInfo>, Error> {
        validate::session_id(&req.session_id)?;
        validate::path("path", &req.path)?;
        let path = req.path;
        let resp = self
            .unary(tenant, &req.session_id, |mut c, vm_id| async move {
                c.get_file_info(with_timeout(
                    ex::GetFileInfoRequest { vm_id, path },
                    UNARY_TIMEOUT,
                ))
                .await
            })
            .await?;
        Ok(resp.info)
    }

    pub async fn make_directory(
        self: &Arc<Self>,
        tenant: &str,
        req: pb::MakeDirectoryRequest,
    ) -> Result<Option<FileInfo>, Error> {
        validate::session_id(&req.session_id)?;
        validate::path("path", &req.path)?;
        validate::mode("mode", req.mode)?;
        let (path, mode) = (req.path, req.mode);
        let resp = self
            .unary(tenant, &req.session_id, |mut c, vm_id| async move {
                let r = ex::MakeDirectoryRequest { vm_id, path, mode };
                c.make_directory(with_timeout(r, UNARY_TIMEOUT)).await
            })
            .await?;
        Ok(resp.info)
    }

    pub async fn remove_file(
        self: &Arc<Self>,
        tenant: &str,
        req: pb::RemoveFileRequest,
    ) -> Result<(), Error> {
        validate::session_id(&req.session_id)?;
        validate::path("path", &req.path)?;
        let (path, recursive) = (req.path, req.recursive);
        self.unary(tenant, &req.session_id, |mut c, vm_id| async move {
            let r = ex::RemoveFileRequest {
                vm_id,
                path,
                recursive,
            };
            c.remove_file(with_timeout(r, UNARY_TIMEOUT)).await
        })
        .await?;
        Ok(())
    }
}
