//! File streams between a client and a guest agent.
//!
//! Upload: the client's chunks are fed one at a time into the agent call's request body,
//! so at most a chunk plus the HTTP/2 windows are in flight. The agent commits the file
//! when the body ends cleanly, and a tonic server cannot tell a caller's cancel
//! (RST_STREAM CANCEL) from a clean end: both read as end-of-stream. So:
//! - the body ends cleanly only on an explicit finish; when the feeder stops any other way
//!   (an error, a limit, the caller gone and this future dropped), the body sends an abort
//!   marker instead, a second header, which the agent must reject (discarding its temp
//!   file);
//! - the agent call runs in its own task, so dropping this future does not reset the call
//!   before the marker goes out;
//! - a declared `size` is checked: an upload that ends short was cancelled upstream, even
//!   if it looked clean here, and is aborted the same way.
//!
//! Download: one relay (see [`crate::relay`]) with the idle and stalled-client limits and
//! no total limit; a large file legitimately takes long, a silent agent or a caller that
//! stopped reading does not.

use bytes::Bytes;
use capsa_proto::agent::v1 as agent;
use capsa_proto::common::v1::{UploadHeader, UploadResult};
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;

use crate::error::{Error, Limit};
use crate::executor::Executor;
use crate::relay::{CHANNEL_CAPACITY, Outflow, Relay, outlet};

/// The parts of a download as the agent sends them: info first, then data.
pub type DownloadStream = Outflow<Option<agent::download_file_response::Part>>;

type UploadCall =
    tokio::task::JoinHandle<Result<tonic::Response<agent::UploadFileResponse>, tonic::Status>>;

/// What the feeder hands the agent call's body.
enum Feed {
    Data(Bytes),
    Finish,
}

/// The agent's request body: the header, the fed chunks, then a clean end on
/// [`Feed::Finish`] or the abort marker if the feeder went away without finishing.
fn agent_body(
    header: UploadHeader,
    feed: mpsc::Receiver<Feed>,
) -> impl Stream<Item = agent::UploadFileRequest> + Send + 'static {
    use agent::upload_file_request::Part;
    let message = |part| agent::UploadFileRequest { part: Some(part) };
    let header = message(Part::Header(header));
    let rest = futures::stream::unfold(Some(feed), move |feed| async move {
        let mut feed = feed?;
        match feed.recv().await {
            Some(Feed::Data(chunk)) => Some((message(Part::Data(chunk)), Some(feed))),
            Some(Feed::Finish) => None,
            None => Some((message(Part::Header(UploadHeader::default())), None)),
        }
    });
    futures::stream::once(async { header }).chain(rest)
}

impl Executor {
    /// Streams `data` into `file` on the VM; returns what the agent wrote.
    #[tracing::instrument(skip(self, data), fields(path = %file.path, size = ?file.size))]
    pub async fn upload<S>(
        &self,
        vm_id: &str,
        file: UploadHeader,
        mut data: S,
    ) -> Result<UploadResult, Error>
    where
        S: Stream<Item = Result<Bytes, Error>> + Send + Unpin + 'static,
    {
        let link = self.agents.get(vm_id)?;
        let declared = file.size;
        let (feed, body) = mpsc::channel(1);
        let mut client = link.client();
        let body = agent_body(file, body);
        let mut call: UploadCall = tokio::spawn(async move { client.upload_file(body).await });
        let idle = self.limits.idle;
        let idle_error = || Error::LimitExceeded {
            vm_id: vm_id.to_owned(),
            limit: Limit::Idle,
            after: idle,
        };
        let mut received = 0u64;
        let fed = loop {
            let next = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break Err(Error::ShuttingDown),
                done = &mut call => return self.upload_answer(vm_id, done),
                () = tokio::time::sleep(idle) => break Err(idle_error()),
                next = data.next() => next,
            };
            let item = match next {
                Some(Ok(chunk)) => {
                    received += chunk.len() as u64;
                    if let Some(size) = declared
                        && received > size
                    {
                        break Err(Error::invalid(
                            "data",
                            format!("exceeds the declared size of {size} bytes"),
                        ));
                    }
                    Feed::Data(chunk)
                }
                Some(Err(err)) => break Err(err),
                None => match declared {
                    Some(size) if size != received => {
                        break Err(Error::invalid(
                            "size",
                            format!("declares {size} bytes but the upload ended after {received}"),
                        ));
                    }
                    _ => Feed::Finish,
                },
            };
            let finished = matches!(item, Feed::Finish);
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break Err(Error::ShuttingDown),
                done = &mut call => return self.upload_answer(vm_id, done),
                () = tokio::time::sleep(idle) => break Err(idle_error()),
                sent = feed.send(item) => if sent.is_err() {
                    return self.upload_answer(vm_id, call.await);
                },
            }
            if finished {
                break Ok(());
            }
        };
        match fed {
            Ok(()) => match tokio::time::timeout(idle, &mut call).await {
                Ok(done) => self.upload_answer(vm_id, done),
                Err(_) => {
                    call.abort();
                    Err(idle_error())
                }
            },
            Err(err) => {
                // The body now sends the abort marker; let the call finish on its own.
                drop(feed);
                let abort = call.abort_handle();
                tokio::spawn(async move {
                    if tokio::time::timeout(idle, call).await.is_err() {
                        abort.abort();
                    }
                });
                if err.is_transport() {
                    self.agents.recheck(vm_id);
                }
                Err(err)
            }
        }
    }

    fn upload_answer(
        &self,
        vm_id: &str,
        done: Result<
            Result<tonic::Response<agent::UploadFileResponse>, tonic::Status>,
            tokio::task::JoinError,
        >,
    ) -> Result<UploadResult, Error> {
        let unavailable = |message: String| Error::AgentUnavailable {
            vm_id: vm_id.to_owned(),
            message,
        };
        match done {
            Ok(Ok(response)) => response
                .into_inner()
                .result
                .ok_or_else(|| unavailable("upload answered without a result".into())),
            Ok(Err(status)) => {
                let err = Error::from_agent(vm_id, &status);
                if err.is_transport() {
                    self.agents.recheck(vm_id);
                }
                Err(err)
            }
            Err(join) => Err(unavailable(format!("upload call ended abnormally: {join}"))),
        }
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
        let (tx, rx) = outlet(CHANNEL_CAPACITY);
        let relay = Relay {
            vm_id: vm_id.to_owned(),
            idle: Some(self.limits.idle),
            total: None,
            stalled: self.limits.stalled,
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
