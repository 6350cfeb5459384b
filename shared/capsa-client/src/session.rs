//! The [`Session`] handle: one sandbox and everything done in it.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use capsa_proto::limits::MAX_STREAM_DATA_BYTES;
use capsa_proto::session::v1 as pb;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, Result};
use crate::execute::{ExecuteOptions, ExecuteOutput, ExecuteStream};
use crate::files::{self, Download, Downloaded, UploadOptions, Uploaded};
use crate::port::PortConnection;
use crate::process::{AttachStream, ProcessOptions};
use crate::terminal::{Terminal, TerminalOptions};
use crate::{
    Client, EgressPolicy, FileInfo, ProcessInfo, SessionInfo, Signal, SnapshotInfo, Usage,
};

/// What a new session gets; `Default` means the server's defaults for everything.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// VM template [default: `default`].
    pub template: Option<String>,
    /// 1 to 8 [default: the template's, 1].
    pub vcpus: Option<u32>,
    /// 128 to 8192 [default: the template's, 512].
    pub memory_mib: Option<u32>,
    /// 10 s to 24 h [default: 5 min].
    pub lifetime: Option<Duration>,
    /// Environment for every kernel. Values are sent once and never returned.
    pub env: HashMap<String, String>,
    /// Labels to filter [`Client::list_sessions`] by.
    pub labels: HashMap<String, String>,
    /// What the VM may reach [default: the tenant's, else the deployment's, else nothing].
    pub egress: Option<EgressPolicy>,
    /// At its deadline the session is suspended instead of ended (kept for the
    /// deployment's suspended retention).
    pub auto_suspend: bool,
    /// Execute and the file calls resume a suspended session first.
    pub auto_resume: bool,
    /// Start from this READY snapshot of the tenant's (a template) instead of a fresh VM.
    pub snapshot_id: Option<String>,
}

impl SessionOptions {
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    pub(crate) fn into_request(self) -> pb::CreateSessionRequest {
        pb::CreateSessionRequest {
            template: self.template.unwrap_or_default(),
            vcpus: self.vcpus.unwrap_or(0),
            memory_mib: self.memory_mib.unwrap_or(0),
            lifetime: self.lifetime.map(capsa_proto::time::duration),
            env: self.env,
            metadata: self.labels,
            egress: self.egress,
            auto_suspend: self.auto_suspend,
            auto_resume: self.auto_resume,
            snapshot_id: self.snapshot_id.unwrap_or_default(),
        }
    }
}

/// A handle on one session. Cheap to use from many tasks through `&Session`.
///
/// A handle from [`Client::create_session`] owns its session: end it with
/// [`Session::close`] (or keep it running on purpose with [`Session::detach`]); dropping it
/// without either logs a warning, since the session then lives (and counts against the
/// tenant) until its lifetime runs out. A handle from [`Client::session`] attaches to a
/// session created elsewhere and does not warn.
#[derive(Debug)]
pub struct Session {
    client: Client,
    id: String,
    /// Warn on drop: this handle created the session and has not closed or detached it.
    owned: bool,
}

impl Session {
    pub(crate) fn new(client: Client, id: String, owned: bool) -> Self {
        Session { client, id, owned }
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs Python `code` in the session's persistent kernel; see [`Session::execute_with`].
    pub async fn execute(&self, code: impl Into<String>) -> Result<ExecuteStream> {
        self.execute_with(code, ExecuteOptions::default()).await
    }

    /// Runs `code` and streams its events as they happen. Fails at once if the call is
    /// refused (unknown session, bad option); errors later in the run end the stream.
    pub async fn execute_with(
        &self,
        code: impl Into<String>,
        options: ExecuteOptions,
    ) -> Result<ExecuteStream> {
        let request = options.into_request(self.id.clone(), code.into());
        let responses = self.client.raw().execute(request).await?.into_inner();
        Ok(ExecuteStream::new(responses))
    }

    /// Runs Python `code` and waits for all of its output.
    pub async fn run(&self, code: impl Into<String>) -> Result<ExecuteOutput> {
        self.execute(code).await?.collect_output().await
    }

    /// Runs `code` with `options` and waits for all of its output.
    pub async fn run_with(
        &self,
        code: impl Into<String>,
        options: ExecuteOptions,
    ) -> Result<ExecuteOutput> {
        self.execute_with(code, options)
            .await?
            .collect_output()
            .await
    }

    /// Writes what `reader` gives to `remote_path` (absolute; parents are created).
    pub async fn upload_from<R: AsyncRead + Unpin>(
        &self,
        reader: R,
        remote_path: &str,
        options: UploadOptions,
    ) -> Result<Uploaded> {
        files::upload(
            self.client.raw(),
            self.id.clone(),
            reader,
            remote_path,
            options,
        )
        .await
    }

    /// Uploads the local file `local` to `remote_path`, with its size declared.
    pub async fn upload_file(
        &self,
        local: impl AsRef<Path>,
        remote_path: &str,
        mut options: UploadOptions,
    ) -> Result<Uploaded> {
        let local = local.as_ref();
        let context = || format!("cannot read {}", local.display());
        let file = tokio::fs::File::open(local)
            .await
            .map_err(|e| Error::io(context(), e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| Error::io(context(), e))?
            .len();
        options.size = Some(size);
        self.upload_from(file, remote_path, options).await
    }

    /// Starts a download: the file's info now, its data by [`Download::write_to`].
    pub async fn download(&self, remote_path: &str) -> Result<Download> {
        Download::start(self.client.raw(), self.id.clone(), remote_path).await
    }

    /// Writes the file at `remote_path` to `writer`.
    pub async fn download_to<W: AsyncWrite + Unpin>(
        &self,
        remote_path: &str,
        writer: W,
    ) -> Result<Downloaded> {
        self.download(remote_path).await?.write_to(writer).await
    }

    /// Downloads `remote_path` to the local file `local`, replaced only once complete.
    pub async fn download_file(
        &self,
        remote_path: &str,
        local: impl AsRef<Path>,
    ) -> Result<Downloaded> {
        self.download(remote_path)
            .await?
            .save_as(local.as_ref())
            .await
    }

    /// The entries of the directory `path`.
    pub async fn list_files(&self, path: &str) -> Result<Vec<FileInfo>> {
        let request = pb::ListFilesRequest {
            session_id: self.id.clone(),
            path: path.to_owned(),
        };
        Ok(self
            .client
            .raw()
            .list_files(request)
            .await?
            .into_inner()
            .files)
    }

    /// The file or directory at `path`.
    pub async fn stat(&self, path: &str) -> Result<FileInfo> {
        let request = pb::GetFileInfoRequest {
            session_id: self.id.clone(),
            path: path.to_owned(),
        };
        let info = self.client.raw().get_file_info(request).await?;
        Ok(info.into_inner().info.unwrap_or_default())
    }

    /// Creates the directory `path` and its parents (mode 0o755).
    pub async fn mkdir(&self, path: &str) -> Result<FileInfo> {
        self.mkdir_with_mode(path, 0o755).await
    }

    /// Creates the directory `path` and its parents with permission bits `mode`.
    pub async fn mkdir_with_mode(&self, path: &str, mode: u32) -> Result<FileInfo> {
        let request = pb::MakeDirectoryRequest {
            session_id: self.id.clone(),
            path: path.to_owned(),
            mode,
        };
        let info = self.client.raw().make_directory(request).await?;
        Ok(info.into_inner().info.unwrap_or_default())
    }

    /// Removes the file (or empty directory) at `path`.
    pub async fn remove(&self, path: &str) -> Result<()> {
        self.remove_file(path, false).await
    }

    /// Removes `path` and, for a directory, everything under it.
    pub async fn remove_all(&self, path: &str) -> Result<()> {
        self.remove_file(path, true).await
    }

    async fn remove_file(&self, path: &str, recursive: bool) -> Result<()> {
        let request = pb::RemoveFileRequest {
            session_id: self.id.clone(),
            path: path.to_owned(),
            recursive,
        };
        self.client.raw().remove_file(request).await?;
        Ok(())
    }

    /// The session as the server sees it now.
    pub async fn info(&self) -> Result<SessionInfo> {
        self.client.session_info(&self.id).await
    }

    /// Whether the session is ACTIVE (it accepts executes).
    pub async fn is_active(&self) -> Result<bool> {
        Ok(self.info().await?.status() == pb::SessionStatus::Active)
    }

    /// The session's resource use.
    pub async fn usage(&self) -> Result<Usage> {
        let request = pb::GetUsageRequest {
            session_id: self.id.clone(),
        };
        let usage = self.client.raw().get_usage(request).await?;
        Ok(usage.into_inner().usage.unwrap_or_default())
    }

    /// Pushes the deadline out by `by` (1 s to 24 h; the total stays within 24 h).
    pub async fn extend(&self, by: Duration) -> Result<SessionInfo> {
        let request = pb::ExtendSessionRequest {
            session_id: self.id.clone(),
            extend_by: Some(capsa_proto::time::duration(by)),
        };
        let session = self.client.raw().extend_session(request).await?;
        Ok(session.into_inner().session.unwrap_or_default())
    }

    /// Saves the session's VM (memory, processes, files) to its node's disk and stops it:
    /// the session is SUSPENDED and bills no cpu or memory until [`Session::resume`].
    pub async fn suspend(&self) -> Result<SessionInfo> {
        let request = pb::SuspendSessionRequest {
            session_id: self.id.clone(),
        };
        let session = self.client.raw().suspend_session(request).await?;
        Ok(session.into_inner().session.unwrap_or_default())
    }

    /// Brings a SUSPENDED session back, with everything it had; ACTIVE again.
    pub async fn resume(&self) -> Result<SessionInfo> {
        let request = pb::ResumeSessionRequest {
            session_id: self.id.clone(),
        };
        let session = self.client.raw().resume_session(request).await?;
        Ok(session.into_inner().session.unwrap_or_default())
    }

    /// Saves the running session's state (memory, processes, files, packages) as a
    /// snapshot named `name`; the session runs on. Start new sessions from it with
    /// [`SessionOptions::snapshot_id`] (a template), remove it with
    /// [`Client::delete_snapshot`].
    pub async fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        let request = pb::SnapshotSessionRequest {
            session_id: self.id.clone(),
            name: name.to_owned(),
            metadata: HashMap::new(),
        };
        let snapshot = self.client.raw().snapshot_session(request).await?;
        snapshot
            .into_inner()
            .snapshot
            .ok_or_else(|| Error::Protocol("SnapshotSession returned no snapshot".into()))
    }

    /// Starts `count` (1 to 8) new sessions from this session's state at this moment, each
    /// independent afterwards. The handles own their sessions: close each when done.
    pub async fn fork(&self, count: u32) -> Result<Vec<Session>> {
        let request = pb::ForkSessionRequest {
            session_id: self.id.clone(),
            count,
            lifetime: None,
            metadata: HashMap::new(),
        };
        let forks = self.client.raw().fork_session(request).await?.into_inner();
        Ok(forks
            .sessions
            .into_iter()
            .map(|info| Session::new(self.client.clone(), info.id, true))
            .collect())
    }

    /// The egress policy in force.
    pub async fn egress(&self) -> Result<EgressPolicy> {
        let request = pb::GetEgressPolicyRequest {
            session_id: self.id.clone(),
        };
        let policy = self.client.raw().get_egress_policy(request).await?;
        Ok(policy.into_inner().egress.unwrap_or_default())
    }

    /// Replaces the egress policy; in force on the session's node within a second.
    pub async fn set_egress(&self, policy: EgressPolicy) -> Result<EgressPolicy> {
        let request = pb::UpdateEgressPolicyRequest {
            session_id: self.id.clone(),
            egress: Some(policy),
        };
        let policy = self.client.raw().update_egress_policy(request).await?;
        Ok(policy.into_inner().egress.unwrap_or_default())
    }

    /// Starts `command` with `args` in the background and returns its record (with its id,
    /// `p-<n>`) at once. It runs outside the kernels, keeps running between executes and
    /// after this client goes away, and ends with the session (or a signal).
    pub async fn start_process<I, A>(
        &self,
        command: impl Into<String>,
        args: I,
        options: ProcessOptions,
    ) -> Result<ProcessInfo>
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        let spec = options.into_spec(command.into(), args.into_iter().map(Into::into).collect());
        let request = pb::StartProcessRequest {
            session_id: self.id.clone(),
            spec: Some(spec),
        };
        let started = self.client.raw().start_process(request).await?;
        process(started.into_inner().process, "StartProcess")
    }

    /// The session's processes and terminals, running and recently exited.
    pub async fn list_processes(&self) -> Result<Vec<ProcessInfo>> {
        let request = pb::ListProcessesRequest {
            session_id: self.id.clone(),
        };
        let listed = self.client.raw().list_processes(request).await?;
        Ok(listed.into_inner().processes)
    }

    /// Waits until process `id` has exited and returns its record; at most `timeout`
    /// [server default: 60 s, at most 300 s], then [`Error::DeadlineExceeded`].
    pub async fn wait_process(&self, id: &str, timeout: Option<Duration>) -> Result<ProcessInfo> {
        let request = pb::WaitProcessRequest {
            session_id: self.id.clone(),
            process_id: id.to_owned(),
            timeout: timeout.map(capsa_proto::time::duration),
        };
        let waited = self.client.raw().wait_process(request).await?;
        process(waited.into_inner().process, "WaitProcess")
    }

    /// Sends `signal` to process `id`'s process group; returns its record.
    pub async fn signal_process(&self, id: &str, signal: Signal) -> Result<ProcessInfo> {
        let request = pb::SignalProcessRequest {
            session_id: self.id.clone(),
            process_id: id.to_owned(),
            signal: signal as i32,
        };
        let signalled = self.client.raw().signal_process(request).await?;
        process(signalled.into_inner().process, "SignalProcess")
    }

    /// Streams process `id`'s output from `from_offset` (stdout and stderr share one offset
    /// space): what its ring still holds, then with `follow` new output until it exits.
    /// Fails at once for an unknown process or an offset past its output.
    pub async fn attach_process(
        &self,
        id: &str,
        from_offset: u64,
        follow: bool,
    ) -> Result<AttachStream> {
        let request = pb::AttachProcessRequest {
            session_id: self.id.clone(),
            process_id: id.to_owned(),
            from_offset,
            follow,
        };
        let responses = self
            .client
            .raw()
            .attach_process(request)
            .await?
            .into_inner();
        Ok(AttachStream::new(responses))
    }

    /// Writes `data` to the stdin of process `id` (started with `keep_stdin_open`), in
    /// messages of at most 1 MiB; each returns once the process took it.
    pub async fn write_stdin(&self, id: &str, data: impl Into<Bytes>) -> Result<()> {
        let mut data: Bytes = data.into();
        while !data.is_empty() {
            let part = data.split_to(data.len().min(MAX_STREAM_DATA_BYTES));
            self.stdin(id, part, false).await?;
        }
        Ok(())
    }

    /// Closes the stdin of process `id`: it reads EOF after what was written.
    pub async fn close_stdin(&self, id: &str) -> Result<()> {
        self.stdin(id, Bytes::new(), true).await
    }

    async fn stdin(&self, id: &str, data: Bytes, close: bool) -> Result<()> {
        let request = pb::WriteStdinRequest {
            session_id: self.id.clone(),
            process_id: id.to_owned(),
            data,
            close,
        };
        self.client.raw().write_stdin(request).await?;
        Ok(())
    }

    /// Opens an interactive terminal (a PTY in the guest running bash, or the options'
    /// program); see [`Terminal`].
    pub async fn open_terminal(&self, options: TerminalOptions) -> Result<Terminal> {
        Terminal::open(self.client.raw(), self.id.clone(), options).await
    }

    /// Connects to TCP `port` on 127.0.0.1 in the guest; [`Error::FailedPrecondition`] when
    /// nothing listens there. See [`PortConnection`].
    pub async fn connect_port(&self, port: u16) -> Result<PortConnection> {
        PortConnection::connect(self.client.raw(), self.id.clone(), port).await
    }

    /// Ends the session and destroys its VM; returns it as it ended. Closing an ended
    /// session returns it unchanged.
    pub async fn close(mut self) -> Result<SessionInfo> {
        // Whatever the answer, this handle has done its duty: no warning on drop.
        self.owned = false;
        self.client.delete_session(&self.id).await
    }

    /// Lets go of the handle and leaves the session running; returns its id.
    pub fn detach(mut self) -> String {
        self.owned = false;
        std::mem::take(&mut self.id)
    }
}

/// The record a process call answers with; one is always there.
fn process(info: Option<ProcessInfo>, call: &str) -> Result<ProcessInfo> {
    info.ok_or_else(|| Error::Protocol(format!("{call} returned no process")))
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.owned {
            tracing::warn!(
                session_id = %self.id,
                "capsa_client::Session dropped without close(): the session keeps running \
                 until its lifetime runs out"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what is logged while `f` runs.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let out = sink.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn dropping_an_owned_handle_without_close_warns_and_nothing_else_does() {
        // Nothing listens there: no call is made by any of this.
        let client = Client::connect_lazy("127.0.0.1:9", "key").unwrap();
        let owned = Session::new(client.clone(), "s-owned".into(), true);
        let log = logged(|| drop(owned));
        assert!(
            log.contains("WARN") && log.contains("s-owned") && log.contains("without close()"),
            "{log}"
        );

        let detached = Session::new(client.clone(), "s-detached".into(), true);
        let mut id = String::new();
        assert_eq!(logged(|| id = detached.detach()), "");
        assert_eq!(id, "s-detached");
        assert_eq!(logged(|| drop(client.session("s-attached"))), "");
    }
}
