//! Execute, file and process calls, relayed to the executor of the session's node with the
//! session's vm id (processes, terminals and ports: `crate::processes`). Requests arrive validated, as domain values (`grpc.rs` translates); auth, tenant
//! and session state fail here before a stream starts, as a plain error.
//!
//! Streams go through a bounded channel and a relay task: a slow client stalls the relay,
//! which stops pulling from the node, so backpressure reaches the guest. Two bounds keep
//! one client from holding more than its own stream:
//! - a relay waits at most `--stalled-client-timeout-ms` for its client to take one item;
//!   then the stream ends DEADLINE_EXCEEDED and the relay drops its upstream call, which
//!   interrupts the code in the guest (a client that goes away does the same at once);
//! - a tenant has at most `--max-streams-per-tenant` streaming calls open on this replica
//!   ([`crate::app::StreamSlots`]); a stream's slot goes with the stream however it ends.
//!
//! The connection to the node that all tenants share is sized so that stalled streams
//! cannot starve it (`crate::clients`). A node that fails mid-call is checked with GetVm:
//! if the VM failed or is gone the session ends VM_FAILED and the client is told so.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use capsa_proto::common::v1::{ExecuteEvent, ExecuteSpec, FileInfo, UploadHeader, UploadResult};
use capsa_proto::executor::v1 as ex;
use capsa_proto::vmpool::v1::GetVmRequest;
use capsa_store::{EndReason, NodeRecord, SessionRecord, SessionStatus, Transition};
use futures::{Stream, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::app::{App, StreamSlot};
use crate::clients::with_timeout;
use crate::error::Error;
use crate::sessions::{describe_end, not_active};
use crate::teardown::vm_failure;

/// Bound of every relay channel: a few chunks in flight, never a whole output.
pub(crate) const RELAY_BUFFER: usize = 16;
pub(crate) const UNARY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a node answering a streaming call with its headers: the executor answers a
/// Download after the agent does (its own first-event limit, 30 s) and an Execute at once.
/// Also bounds the wait for a free stream on a connection at its concurrency limit.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
const VM_CHECK_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a VM whose socket vanished may still look alive to its vm-pool, which notices
/// a dead VMM within its exit watch (well under a second unless the node is starved).
const VM_GONE_CONFIRM: Duration = Duration::from_secs(5);

/// A part of a download: its info first, then data chunks.
#[derive(Debug)]
pub enum DownloadPart {
    Info(FileInfo),
    Data(Bytes),
}

/// A relayed server stream: the items, then at most one error. It holds its tenant's
/// stream slot until the client is done with it (read the end, or went away): until then
/// the buffered items are still held for that client.
pub struct Relayed<T> {
    flow: Pin<Box<dyn Stream<Item = Result<T, Error>> + Send>>,
    _slot: StreamSlot,
}

impl<T> Stream for Relayed<T> {
    type Item = Result<T, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.flow.as_mut().poll_next(cx)
    }
}

/// The client's half of a bidi stream, as its relay sees it: `aborted` yields the error
/// when the client's input broke (a bad message, a failed stream); `stop` is cancelled
/// when the relay ends, so the pump feeding the node stops too.
pub(crate) struct ClientHalf {
    pub aborted: oneshot::Receiver<Error>,
    pub stop: tokio_util::sync::DropGuard,
}

/// Where a session's calls go.
#[derive(Clone)]
pub(crate) struct Target {
    pub session: SessionRecord,
    pub node: NodeRecord,
}

impl App {
    /// The tenant's ACTIVE session (resumed first if it is suspended with auto_resume) and
    /// its live node (UNAVAILABLE while the node is not heartbeating: see
    /// [`crate::sessions::node_not_heartbeating`]).
    pub(crate) async fn target(self: &Arc<Self>, tenant: &str, id: &str) -> Result<Target, Error> {
        let session = self.session(tenant, id).await?;
        self.target_of(tenant, session).await
    }

    /// [`App::target`] of a session record just read for `tenant`.
    async fn target_of(
        self: &Arc<Self>,
        tenant: &str,
        mut session: SessionRecord,
    ) -> Result<Target, Error> {
        if session.auto_resume
            && matches!(
                session.status,
                SessionStatus::Suspending | SessionStatus::Suspended | SessionStatus::Resuming
            )
        {
            let id = session.id.clone();
            session = self.resume_session(tenant, &id).await?;
        }
        if session.status != SessionStatus::Active {
            return Err(not_active(&session));
        }
        let node = self.session_node(&session).await?;
        Ok(Target { session, node })
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

    /// What a node error means for the client. UNAVAILABLE may mean the VM died, and so
    /// may NOT_FOUND (the executor's "vm not on this node" once the VM's socket is gone,
    /// marked with [`capsa_grpc::VM_GONE_METADATA`]): ask the node's vm-pool, and if the VM
    /// is failed or gone, end the session. A NOT_FOUND about a VM that is fine (a missing
    /// file, an unknown process) reaches the client as it is; a marked one never does.
    pub(crate) async fn upstream_error(self: &Arc<Self>, t: &Target, status: Status) -> Error {
        let code = status.code();
        if !matches!(
            code,
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::NotFound
        ) {
            return Error::Upstream(status);
        }
        let vm_gone = status.metadata().contains_key(capsa_grpc::VM_GONE_METADATA);
        let mut why = self.vm_check(t).await;
        // The executor saw the VM's socket vanish: the VMM died a moment ago and vm-pool
        // may not have noticed yet. Ask again for a little while rather than hand the
        // client a NOT_FOUND about a session that exists.
        let confirm_until = tokio::time::Instant::now() + VM_GONE_CONFIRM;
        while why.is_none() && vm_gone && tokio::time::Instant::now() < confirm_until {
            tokio::time::sleep(Duration::from_millis(250)).await;
            why = self.vm_check(t).await;
        }
        match why {
            Some(why) => self.vm_failed_error(&t.session, &why).await,
            None if vm_gone => Error::Unavailable(format!(
                "vm {} of session {} is not reachable on node {}; try again",
                t.session.vm_id, t.session.id, t.node.node_id
            )),
            None if code == tonic::Code::NotFound => Error::Upstream(status),
            None => Error::Unavailable(format!(
                "node {} is unavailable: {}",
                t.node.node_id,
                status.message()
            )),
        }
    }

    /// Why the session's VM is failed or gone, by its node's vm-pool; `None` when it runs
    /// or the node does not answer in time.
    async fn vm_check(self: &Arc<Self>, t: &Target) -> Option<String> {
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
    }

    /// Opens a streaming call on the node under [`OPEN_TIMEOUT`].
    pub(crate) async fn open<T>(
        self: &Arc<Self>,
        t: &Target,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(OPEN_TIMEOUT, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(self.upstream_error(t, status).await),
            Err(_) => Err(Error::Unavailable(format!(
                "node {} did not answer within {OPEN_TIMEOUT:?}",
                t.node.node_id
            ))),
        }
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session.id))]
    pub async fn execute(
        self: &Arc<Self>,
        tenant: &str,
        session: SessionRecord,
        spec: ExecuteSpec,
    ) -> Result<Relayed<ExecuteEvent>, Error> {
        let slot = self.streams.acquire(tenant)?;
        let t = self.target_of(tenant, session).await?;
        self.touch(&t);
        let mut client = self.clients.executor(&t.node.executor_url)?;
        let upstream = ex::ExecuteRequest {
            vm_id: t.session.vm_id.clone(),
            spec: Some(spec),
        };
        let stream = self.open(&t, client.execute(upstream)).await?;
        Ok(self.relay(t, slot, stream, |ev: ex::ExecuteResponse| ev.event, None))
    }

    /// Records activity on the session off the call's path: one HSET nobody waits for, at
    /// most once per [`crate::app::TOUCH_INTERVAL`].
    pub(crate) fn touch(&self, t: &Target) {
        if !self.touches.due(&t.session.id, std::time::Instant::now()) {
            return;
        }
        let sessions = self.sessions.clone();
        let id = t.session.id.clone();
        tokio::spawn(async move {
            if let Err(e) = sessions.touch(&id).await {
                tracing::debug!(error = %e, "touch failed");
            }
        });
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session_id))]
    pub async fn download(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        path: String,
    ) -> Result<Relayed<DownloadPart>, Error> {
        let slot = self.streams.acquire(tenant)?;
        let t = self.target(tenant, session_id).await?;
        let mut client = self.clients.executor(&t.node.executor_url)?;
        let upstream = ex::DownloadFileRequest {
            vm_id: t.session.vm_id.clone(),
            path,
        };
        let stream = self.open(&t, client.download_file(upstream)).await?;
        Ok(self.relay(
            t,
            slot,
            stream,
            |m: ex::DownloadFileResponse| {
                use ex::download_file_response::Part;
                match m.part? {
                    Part::Info(info) => Some(DownloadPart::Info(info)),
                    Part::Data(data) => Some(DownloadPart::Data(data)),
                }
            },
            None,
        ))
    }

    /// Pumps an upstream server stream into a bounded channel; `map` drops empty messages.
    /// The relay returns, dropping `stream` and so cancelling the call on the node, when
    /// the client goes away or takes nothing for the stall timeout, or (bidi) when the
    /// client's input broke; an error (the stall, the node's, the input's) reaches the
    /// client after what is buffered, without waiting for room.
    pub(crate) fn relay<U, D>(
        self: &Arc<Self>,
        t: Target,
        slot: StreamSlot,
        mut stream: tonic::Streaming<U>,
        map: fn(U) -> Option<D>,
        client_half: Option<ClientHalf>,
    ) -> Relayed<D>
    where
        U: Send + 'static,
        D: Send + 'static,
    {
        let (tx, rx) = mpsc::channel(RELAY_BUFFER);
        let (end, ended) = oneshot::channel::<Error>();
        let stalled = self.config.stalled_client_timeout();
        let app = self.clone();
        let (aborted, stop) = match client_half {
            Some(half) => (Some(half.aborted), Some(half.stop)),
            None => (None, None),
        };
        // Resolves only with an error: a pump that ended cleanly dropped its sender.
        let aborted = async move {
            match aborted {
                Some(rx) => match rx.await {
                    Ok(err) => err,
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::spawn(async move {
            let _stop = stop;
            tokio::pin!(aborted);
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    err = &mut aborted => {
                        let _ = end.send(err);
                        return;
                    }
                    next = stream.message() => next,
                };
                match next {
                    Ok(Some(msg)) => {
                        let Some(item) = map(msg) else { continue };
                        match tokio::time::timeout(stalled, tx.send(item)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return,
                            Err(_) => {
                                tracing::warn!(session_id = %t.session.id, ?stalled, "client stopped reading");
                                let _ = end.send(Error::ClientStalled(stalled));
                                return;
                            }
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        let _ = end.send(app.upstream_error(&t, status).await);
                        return;
                    }
                }
            }
        });
        // The error slot is read once the items end, i.e. once the relay has returned.
        let ended = futures::stream::once(ended).filter_map(|e| async move { e.ok().map(Err) });
        Relayed {
            flow: Box::pin(ReceiverStream::new(rx).map(Ok).chain(ended)),
            _slot: slot,
        }
    }

    /// Relays an upload: the header, then the data chunks as they come (the adapter has
    /// checked each). An error in `data` drops the upstream call, so the guest discards
    /// its partial file.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, session_id = %session_id))]
    pub async fn upload<S>(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        file: UploadHeader,
        mut data: S,
    ) -> Result<UploadResult, Error>
    where
        S: Stream<Item = Result<Bytes, Error>> + Unpin + Send + 'static,
    {
        let _slot = self.streams.acquire(tenant)?;
        let t = self.target(tenant, session_id).await?;
        let mut client = self.clients.executor(&t.node.executor_url)?;
        let (tx, rx) = mpsc::channel::<ex::UploadFileRequest>(4);
        let first = ex::UploadFileRequest {
            part: Some(ex::upload_file_request::Part::Header(
                ex::UploadFileHeader {
                    vm_id: t.session.vm_id.clone(),
                    file: Some(file),
                },
            )),
        };
        tx.send(first)
            .await
            .map_err(|_| Error::Internal("upload channel closed".into()))?;
        let pump = async move {
            while let Some(chunk) = data.next().await {
                let msg = ex::UploadFileRequest {
                    part: Some(ex::upload_file_request::Part::Data(chunk?)),
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
        self.unary_on(&t, UNARY_TIMEOUT, call).await
    }

    /// One unary call on the session's node, answered within `limit` (the call should
    /// carry the same deadline for the node: `with_timeout`).
    pub(crate) async fn unary_on<T, F, Fut>(
        self: &Arc<Self>,
        t: &Target,
        limit: Duration,
        call: F,
    ) -> Result<T, Error>
    where
        F: FnOnce(crate::clients::ExecutorClient, String) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let client = self.clients.executor(&t.node.executor_url)?;
        match tokio::time::timeout(limit, call(client, t.session.vm_id.clone())).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(self.upstream_error(t, status).await),
            Err(_) => Err(Error::Unavailable(format!(
                "node {} did not answer within {limit:?}",
                t.node.node_id
            ))),
        }
    }

    pub async fn list_files(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        path: String,
    ) -> Result<Vec<FileInfo>, Error> {
        let resp = self
            .unary(tenant, session_id, |mut c, vm_id| async move {
                let r = ex::ListFilesRequest { vm_id, path };
                c.list_files(with_timeout(r, UNARY_TIMEOUT)).await
            })
            .await?;
        Ok(resp.files)
    }

    pub async fn file_info(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        path: String,
    ) -> Result<Option<FileInfo>, Error> {
        let resp = self
            .unary(tenant, session_id, |mut c, vm_id| async move {
                let r = ex::GetFileInfoRequest { vm_id, path };
                c.get_file_info(with_timeout(r, UNARY_TIMEOUT)).await
            })
            .await?;
        Ok(resp.info)
    }

    pub async fn make_directory(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        path: String,
        mode: u32,
    ) -> Result<Option<FileInfo>, Error> {
        let resp = self
            .unary(tenant, session_id, |mut c, vm_id| async move {
                let r = ex::MakeDirectoryRequest { vm_id, path, mode };
                c.make_directory(with_timeout(r, UNARY_TIMEOUT)).await
            })
            .await?;
        Ok(resp.info)
    }

    pub async fn remove_file(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        path: String,
        recursive: bool,
    ) -> Result<(), Error> {
        self.unary(tenant, session_id, |mut c, vm_id| async move {
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
