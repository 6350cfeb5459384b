//! An async client of Capsa's public API (`capsa.session.v1.SessionService`): persistent
//! code-execution sessions in microVMs.
//!
//! ```no_run
//! use capsa_client::{Client, SessionOptions};
//!
//! # async fn demo() -> capsa_client::Result<()> {
//! // CAPSA_ENDPOINT / CAPSA_API_KEY, else .capsa/dev.env in the current directory.
//! let client = Client::from_env().await?;
//! let session = client.create_session(SessionOptions::default()).await?;
//! session.run("x = 42").await?;
//! let out = session.run("print(x)").await?;
//! assert_eq!(out.stdout, "42\n");
//! println!("{:?} wall, {:?} cpu", out.wall_time, out.cpu_time);
//! session.close().await?; // ends the session and its VM
//! # Ok(())
//! # }
//! ```
//!
//! Output streams while the code runs:
//!
//! ```no_run
//! use capsa_client::{Event, ExecuteOptions, Session};
//! use futures::StreamExt as _;
//! use std::time::Duration;
//!
//! # async fn demo(session: &Session) -> capsa_client::Result<()> {
//! let options = ExecuteOptions::shell().timeout(Duration::from_secs(30));
//! let mut events = session.execute_with("for i in 1 2 3; do echo $i; sleep 1; done", options).await?;
//! while let Some(event) = events.next().await {
//!     match event? {
//!         Event::Stdout(bytes) => print!("{}", String::from_utf8_lossy(&bytes)),
//!         Event::Completion(c) => println!("ended {} with {}", c.status.as_str(), c.exit_code),
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Files go through any `AsyncRead` / `AsyncWrite`, chunk by chunk:
//!
//! ```no_run
//! use capsa_client::{Session, UploadOptions};
//!
//! # async fn demo(session: &Session) -> capsa_client::Result<()> {
//! session.upload_from(&b"a,b\n1,2\n"[..], "/root/data.csv", UploadOptions::default()).await?;
//! let mut back = Vec::new();
//! session.download_to("/root/data.csv", &mut back).await?;
//! session.upload_file("model.bin", "/root/model.bin", UploadOptions::default().mode(0o600)).await?;
//! session.download_file("/root/out.png", "out.png").await?;
//! session.mkdir("/root/results").await?;
//! let listing = session.list_files("/root").await?;
//! session.remove_all("/root/results").await?;
//! # Ok(())
//! # }
//! ```
//!
//! Background processes outlive the call (and the client) that started them; their output
//! waits in a ring to be attached to; terminals and guest ports are bidirectional streams:
//!
//! ```no_run
//! use capsa_client::{ProcessEvent, ProcessOptions, Session, Signal, TerminalOptions};
//! use futures::StreamExt as _;
//!
//! # async fn demo(session: &Session) -> capsa_client::Result<()> {
//! let server = session
//!     .start_process("python3", ["-m", "http.server", "8000"], ProcessOptions::default())
//!     .await?;
//! let mut output = session.attach_process(&server.process_id, 0, false).await?;
//! while let Some(event) = output.next().await {
//!     if let ProcessEvent::Stderr { data, .. } = event? {
//!         eprint!("{}", String::from_utf8_lossy(&data));
//!     }
//! }
//! // A local TCP connection (here any AsyncRead + AsyncWrite) tunnelled to guest port 8000.
//! let (local, _peer) = tokio::io::duplex(64 << 10);
//! session.connect_port(8000).await?.pipe(local).await?;
//! session.signal_process(&server.process_id, Signal::Term).await?;
//!
//! let mut terminal = session.open_terminal(TerminalOptions::default().size(40, 120)).await?;
//! terminal.input.write("echo hi; exit\r").await?;
//! while let Some(event) = terminal.output.next().await {
//!     println!("{:?}", event?);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Errors are one enum sorted by gRPC status code:
//!
//! ```
//! use capsa_client::Error;
//!
//! let e = Error::from(tonic::Status::not_found("session s-1 not found"));
//! assert!(matches!(e, Error::NotFound(_)));
//! assert_eq!(e.to_string(), "NOT_FOUND: session s-1 not found");
//! ```

pub mod config;
mod error;
mod execute;
mod files;
mod port;
mod process;
mod session;
mod terminal;

use std::time::Duration;

use capsa_proto::limits::MAX_MESSAGE_BYTES;
use capsa_proto::session::v1 as pb;
use capsa_proto::session::v1::session_service_client::SessionServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub use config::Config;
pub use error::{Error, Result, code_name};
pub use execute::{
    Completion, Event, ExecError, ExecuteOptions, ExecuteOutput, ExecuteStream, Language,
    MimeBundle, Status,
};
pub use files::{Download, Downloaded, UploadOptions, Uploaded};
pub use port::{Piped, PortConnection, PortReceiver, PortSender};
pub use process::{AttachStream, ProcessEvent, ProcessExit, ProcessOptions};
pub use session::{Session, SessionOptions};
pub use terminal::{Terminal, TerminalEvent, TerminalInput, TerminalOptions, TerminalOutput};

/// The generated messages and clients, for what this crate does not wrap.
pub use capsa_proto as proto;
pub use capsa_proto::common::v1::{
    EgressPolicy, FileInfo, FileType, ProcessInfo, ProcessKind, ProcessState, Signal, Usage,
};
/// What the API says about a session (status, deadline, node, labels, ...).
pub use capsa_proto::session::v1::Session as SessionInfo;
pub use capsa_proto::session::v1::{GetTenantUsageResponse as TenantUsage, SessionStatus};
pub use capsa_proto::session::v1::{Snapshot as SnapshotInfo, SnapshotStatus};

/// The generated client with the key added to every call.
pub type RawClient = SessionServiceClient<InterceptedService<Channel, Auth>>;

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub struct Auth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A connection to the API with one key. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    raw: RawClient,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// Which sessions [`Client::list_sessions`] returns.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// Only sessions in this status [default: any].
    pub status: Option<SessionStatus>,
    /// Only sessions carrying every one of these labels.
    pub labels: std::collections::HashMap<String, String>,
}

impl Client {
    /// Connects to `endpoint` (`http://host:port`, or `host:port`) with `api_key`; fails
    /// with [`Error::Connect`] if the endpoint does not answer within 10 s.
    pub async fn connect(endpoint: impl Into<String>, api_key: impl AsRef<str>) -> Result<Client> {
        let name = config::with_scheme(endpoint.into());
        let (endpoint, auth) = endpoint_and_auth(name.clone(), api_key.as_ref())?;
        let channel = endpoint.connect().await.map_err(|e| Error::Connect {
            endpoint: name,
            message: error_chain(&e),
        })?;
        Ok(Client::wrap(channel, auth))
    }

    /// Like [`Client::connect`], but connects on the first call instead of now.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> capsa_client::Result<()> {
    /// let client = capsa_client::Client::connect_lazy("127.0.0.1:50051", "ck_example")?;
    /// let session = client.session("3451838d7de94944b315227a930d4610");
    /// assert_eq!(session.id(), "3451838d7de94944b315227a930d4610");
    /// # Ok(())
    /// # }
    /// ```
    pub fn connect_lazy(endpoint: impl Into<String>, api_key: impl AsRef<str>) -> Result<Client> {
        let (endpoint, auth) = endpoint_and_auth(endpoint.into(), api_key.as_ref())?;
        Ok(Client::wrap(endpoint.connect_lazy(), auth))
    }

    fn wrap(channel: Channel, auth: Auth) -> Client {
        // Results and figures come in messages up to the contract's limit, past tonic's
        // default 4 MiB.
        let raw = SessionServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Client { raw }
    }

    /// Connects with a resolved [`Config`].
    pub async fn with_config(config: &Config) -> Result<Client> {
        Client::connect(config.endpoint.clone(), &config.api_key).await
    }

    /// Connects with `CAPSA_ENDPOINT` / `CAPSA_API_KEY`, else `.capsa/dev.env` in the
    /// current directory (never a parent's); see [`Config::from_env`].
    pub async fn from_env() -> Result<Client> {
        Client::with_config(&Config::from_env()?).await
    }

    /// The generated client, for calls this crate does not wrap.
    pub fn raw(&self) -> RawClient {
        self.raw.clone()
    }

    /// Creates a session (a warm VM) and returns once it is ACTIVE. The handle owns it:
    /// call [`Session::close`] when done.
    pub async fn create_session(&self, options: SessionOptions) -> Result<Session> {
        let info = self.create_session_info(options).await?;
        Ok(Session::new(self.clone(), info.id, true))
    }

    /// Creates a session and returns what the server says about it, without a handle.
    pub async fn create_session_info(&self, options: SessionOptions) -> Result<SessionInfo> {
        let response = self.raw().create_session(options.into_request()).await?;
        response
            .into_inner()
            .session
            .ok_or_else(|| Error::Protocol("CreateSession returned no session".into()))
    }

    /// A handle on an existing session (no call is made; a wrong id fails at first use).
    /// It does not own the session: dropping it is silent, [`Session::close`] still ends it.
    pub fn session(&self, id: impl Into<String>) -> Session {
        Session::new(self.clone(), id.into(), false)
    }

    /// The session `id` as the server sees it now.
    pub async fn session_info(&self, id: &str) -> Result<SessionInfo> {
        let request = pb::GetSessionRequest {
            session_id: id.to_owned(),
        };
        let session = self.raw().get_session(request).await?;
        Ok(session.into_inner().session.unwrap_or_default())
    }

    /// Ends session `id`; returns it as it ended.
    pub async fn delete_session(&self, id: &str) -> Result<SessionInfo> {
        let request = pb::DeleteSessionRequest {
            session_id: id.to_owned(),
        };
        let session = self.raw().delete_session(request).await?;
        Ok(session.into_inner().session.unwrap_or_default())
    }

    /// The tenant's sessions, newest first, every page.
    pub async fn list_sessions(&self, options: ListOptions) -> Result<Vec<SessionInfo>> {
        let mut sessions = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListSessionsRequest {
                page_size: 100,
                page_token,
                status: options.status.unwrap_or(SessionStatus::Unspecified) as i32,
                metadata: options.labels.clone(),
            };
            let page = self.raw().list_sessions(request).await?.into_inner();
            sessions.extend(page.sessions);
            if page.next_page_token.is_empty() {
                return Ok(sessions);
            }
            page_token = page.next_page_token;
        }
    }

    /// The snapshot `id` as the server sees it now.
    pub async fn snapshot_info(&self, id: &str) -> Result<SnapshotInfo> {
        let request = pb::GetSnapshotRequest {
            snapshot_id: id.to_owned(),
        };
        let snapshot = self.raw().get_snapshot(request).await?;
        Ok(snapshot.into_inner().snapshot.unwrap_or_default())
    }

    /// The tenant's snapshots, newest first, every page.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut snapshots = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListSnapshotsRequest {
                page_size: 100,
                page_token,
            };
            let page = self.raw().list_snapshots(request).await?.into_inner();
            snapshots.extend(page.snapshots);
            if page.next_page_token.is_empty() {
                return Ok(snapshots);
            }
            page_token = page.next_page_token;
        }
    }

    /// Removes snapshot `id` and its files; returns it as it was.
    pub async fn delete_snapshot(&self, id: &str) -> Result<SnapshotInfo> {
        let request = pb::DeleteSnapshotRequest {
            snapshot_id: id.to_owned(),
        };
        let snapshot = self.raw().delete_snapshot(request).await?;
        Ok(snapshot.into_inner().snapshot.unwrap_or_default())
    }

    /// Resource use summed over the tenant, with its session counts.
    pub async fn tenant_usage(&self) -> Result<TenantUsage> {
        let usage = self
            .raw()
            .get_tenant_usage(pb::GetTenantUsageRequest {})
            .await?;
        Ok(usage.into_inner())
    }
}

fn endpoint_and_auth(endpoint: String, api_key: &str) -> Result<(Endpoint, Auth)> {
    let endpoint = config::with_scheme(endpoint);
    let auth = format!("Bearer {api_key}").parse().map_err(|_| {
        Error::Config("the API key contains characters not allowed in a header".into())
    })?;
    let endpoint = Endpoint::from_shared(endpoint.clone())
        .map_err(|e| Error::Config(format!("invalid endpoint {endpoint}: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        // Output and downloads arrive in chunks of up to 1 MiB: whole frames of 512 KiB
        // instead of HTTP/2's 16 KiB, so a fast stream costs a read per chunk, not 16
        // (capsa_grpc's MAX_FRAME_BYTES, spelt out: this crate stays free of the server stack).
        .max_frame_size(512 << 10);
    Ok((endpoint, Auth(auth)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out += &format!(": {s}");
        source = s.source();
    }
    out
}
