//! File streams between a client and a guest agent.
//!
//! Upload: the client's chunks are pulled straight into the agent call's request body, so
//! at most one chunk plus the HTTP/2 windows are in flight. The agent commits the file only
//! when the body ends cleanly; a client stream that fails must therefore never look like a
//! clean end. On such a failure the body stalls forever and the call is dropped, which
//! resets the agent stream, and the agent discards its temp file.
//!
//! Download: one relay (see [`crate::relay`]) with the idle limit and no total limit; a
//! large file legitimately takes long, a silent agent does not.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use capsa_proto::agent::v1 as agent;
use capsa_proto::common::v1::{UploadHeader, UploadResult};
use futures::{Stream, StreamExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{Error, Limit};
use crate::executor::Executor;
use crate::relay::{CHANNEL_CAPACITY, Relay};

/// The largest data chunk accepted in either direction.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// The parts of a download as the agent sends them: info first, then data.
pub type DownloadStream =
    mpsc::Receiver<Result<Option<agent::download_file_response::Part>, Error>>;

impl Executor {
    /// Streams `data` into `file` on the VM; returns what the agent wrote.
    #[tracing::instrument(skip(self, data), fields(path = %file.path))]
    pub async fn upload<S>(
        &self,
        vm_id: &str,
        file: UploadHeader,
        data: S,
    ) -> Result<UploadResult, Error>
    where
        S: Stream<Item = Result<Bytes, Error>> + Send + Unpin + 'static,
    {
        let link = self.agents.get(vm_id)?;
        let (fail_tx, fail_rx) = oneshot::channel::<Error>();
        let last_progress = Arc::new(Mutex::new(Instant::now()));
        let header = agent::UploadFileRequest {
            part: Some(agent::upload_file_request::Part::Header(file)),
        };
        let progress = last_progress.clone();
        let body =
            futures::stream::unfold((data, Some(fail_tx)), move |(mut data, mut fail_tx)| {
                let progress = progress.clone();
                async move {
                    match data.next().await {
                        Some(Ok(chunk)) => {
                            *progress.lock().unwrap() = Instant::now();
                            let part = agent::upload_file_request::Part::Data(chunk);
                            Some((
                                agent::UploadFileRequest { part: Some(part) },
                                (data, fail_tx),
                            ))
                        }
                        Some(Err(err)) => {
                            if let Some(tx) = fail_tx.take() {
                                let _ = tx.send(err);
                            }
                            // Never end cleanly after a failure: see the module doc.
                            futures::future::pending().await
                        }
                        None => None,
                    }
                }
            });
        let body = futures::stream::once(async { header }).chain(body);
        let mut client = link.client();
        let idle = self.limits.idle;
        let stalled = async {
            loop {
                let deadline = *last_progress.lock().unwrap() + idle;
                if Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep_until(deadline).await;
            }
        };
        let result = tokio::select! {
            response = client.upload_file(body) => match response {
                Ok(r) => r.into_inner().result.ok_or_else(|| Error::AgentUnavailable {
                    vm_id: vm_id.to_owned(),
                    message: "upload answered without a result".into(),
                }),
                Err(status) => Err(Error::from_agent(vm_id, &status)),
            },
            Ok(err) = fail_rx => Err(err),
            () = stalled => Err(Error::LimitExceeded { vm_id: vm_id.to_owned(), limit: Limit::Idle, after: idle }),
            () = self.shutdown.cancelled() => Err(Error::ShuttingDown),
        };
        if let Err(err) = &result
            && err.is_transport()
        {
            self.agents.recheck(vm_id);
        }
        result
    }

    /// Opens a download from the VM and relays it; fails before the stream starts when the
    /// agent refuses (a missing file, a bad path) or does not answer in time.
    #[tracing::instrument(skip(self))]
    pub async fn download(&self, vm_id: &str, path: String) -> Result<DownloadStream, Error> {
        let link = self.agents.get(vm_id)?;
        let mut client = link.client();
        let call = tokio::time::timeout(
            self.limits.first_event,
            client.download_file(agent::DownloadFileRequest { path }),
        )
        .await;
        let upstream = match call {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                let err = Error::from_agent(vm_id, &status);
                if err.is_transport() {
                    self.agents.recheck(vm_id);
                }
                return Err(err);
            }
            Err(_) => {
                self.agents.recheck(vm_id);
                return Err(Error::LimitExceeded {
                    vm_id: vm_id.to_owned(),
                    limit: Limit::FirstEvent,
                    after: self.limits.first_event,
                });
            }
        };
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let relay = Relay {
            vm_id: vm_id.to_owned(),
            idle: self.limits.idle,
            total: None,
            require_final: false,
            gate: None,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(relay.run(upstream, tx, |m: agent::DownloadFileResponse| {
            (m.part, false)
        }));
        Ok(rx)
    }
}
