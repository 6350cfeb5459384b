//! One function per subcommand: build the request, call the API, render the answer. Every
//! stream is consumed as it arrives (exec output to the terminal, downloads to disk), never
//! collected whole.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use capsa_proto::common::v1::{Language, UploadHeader, execute_event::Event};
use capsa_proto::limits::{MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES};
use capsa_proto::session::v1::session_service_client::SessionServiceClient;
use capsa_proto::session::v1::*;
use futures::StreamExt as _;
use sha2::Digest as _;
use tokio::io::AsyncReadExt as _;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::args::*;
use crate::config::Target;
use crate::error::CliError;
use crate::render::{self, ExecRenderer};
use crate::view;

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

pub type Client = SessionServiceClient<InterceptedService<Channel, Auth>>;

pub async fn connect(target: &Target) -> Result<Client, CliError> {
    let auth = format!("Bearer {}", target.api_key).parse().map_err(|_| {
        CliError::Usage("the API key contains characters not allowed in a header".into())
    })?;
    let connect_err = |message: String| CliError::Connect {
        endpoint: target.endpoint.clone(),
        message,
    };
    let channel = tonic::transport::Endpoint::from_shared(target.endpoint.clone())
        .map_err(|e| CliError::Usage(format!("invalid endpoint {}: {e}", target.endpoint)))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| connect_err(capsa_error_chain(&e)))?;
    // Uploads go in chunks of the API's maximum; results and figures come back in messages
    // up to the contract's limit, past tonic's default 4 MiB.
    Ok(SessionServiceClient::with_interceptor(channel, Auth(auth))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

fn capsa_error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out += &format!(": {s}");
        source = s.source();
    }
    out
}

fn local(e: std::io::Error) -> CliError {
    CliError::Local(e.to_string())
}

/// Writes a line to stdout, turning a closed pipe into an error instead of a panic.
fn say(line: impl std::fmt::Display) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(local)
}

fn note(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

pub async fn create(client: &mut Client, a: CreateArgs, json: bool) -> Result<u8, CliError> {
    let request = CreateSessionRequest {
        template: a.template.unwrap_or_default(),
        vcpus: a.vcpus.unwrap_or(0),
        memory_mib: a.memory_mib.unwrap_or(0),
        lifetime: a.lifetime.map(capsa_proto::time::duration),
        env: a.env.into_iter().collect(),
        metadata: a.labels.into_iter().collect(),
        egress: a.egress.policy(),
    };
    let session = client
        .create_session(request)
        .await?
        .into_inner()
        .session
        .unwrap_or_default();
    if json {
        say(view::session_json(&session))?;
    } else {
        // Only the id on stdout, so `sid=$(capsa create)` works.
        say(&session.id)?;
        note(format!(
            "capsa: session expires at {}",
            view::timestamp(&session.expire_time)
        ));
    }
    Ok(0)
}

async fn read_code(a: &ExecArgs) -> Result<String, CliError> {
    match (&a.code, &a.file) {
        (Some(code), _) if code == "-" => {
            let mut code = String::new();
            tokio::io::stdin()
                .read_to_string(&mut code)
                .await
                .map_err(|e| CliError::Usage(format!("cannot read code from stdin: {e}")))?;
            Ok(code)
        }
        (Some(code), _) => Ok(code.clone()),
        (None, Some(file)) => tokio::fs::read_to_string(file)
            .await
            .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display()))),
        (None, None) => Err(CliError::Usage(
            "no code: give CODE, -f FILE, or - for stdin".into(),
        )),
    }
}

/// Runs code and streams its events; returns the exit status for the code's outcome.
pub async fn exec(client: &mut Client, a: ExecArgs, json: bool) -> Result<u8, CliError> {
    let code = read_code(&a).await?;
    let request = ExecuteRequest {
        session_id: a.session.clone(),
        language: match a.lang {
            Lang::Python => Language::Python,
            Lang::Shell => Language::Shell,
        } as i32,
        code,
        timeout: a.timeout.map(capsa_proto::time::duration),
        env: a.env.into_iter().collect(),
        cwd: a.cwd.unwrap_or_default(),
        max_output_bytes: a.max_output_bytes.unwrap_or(0),
    };
    let mut stream = client.execute(request).await?.into_inner();
    let mut renderer = ExecRenderer::new(
        std::io::stdout(),
        std::io::stderr(),
        json,
        a.display_dir,
        &a.session,
    );
    let mut status = None;
    while let Some(message) = stream.message().await? {
        let Some(event) = message.event.and_then(|e| e.event) else {
            continue;
        };
        renderer.event(&event).map_err(local)?;
        if let Event::Completion(c) = &event {
            status = Some(render::exit_status(c));
        }
    }
    status.ok_or_else(|| CliError::Local("the execute stream ended without a completion".into()))
}

pub async fn upload(client: &mut Client, a: UploadArgs, json: bool) -> Result<u8, CliError> {
    let started = std::time::Instant::now();
    let file = tokio::fs::File::open(&a.local)
        .await
        .map_err(|e| CliError::Usage(format!("cannot open {}: {e}", a.local.display())))?;
    let size = file.metadata().await.map_err(local)?.len();
    let header = UploadFileRequest {
        part: Some(upload_file_request::Part::Header(UploadFileHeader {
            session_id: a.session,
            file: Some(UploadHeader {
                path: a.remote.clone(),
                mode: a.mode.unwrap_or(0),
                no_overwrite: a.no_overwrite,
                size: Some(size),
            }),
        })),
    };
    // Read and hash chunk by chunk as the transport asks for them.
    let hasher = Arc::new(Mutex::new(sha2::Sha256::new()));
    let read_error = Arc::new(Mutex::new(None));
    let (h, re) = (hasher.clone(), read_error.clone());
    let chunks = futures::stream::unfold(file, move |mut file| {
        let (h, re) = (h.clone(), re.clone());
        async move {
            let mut buf = BytesMut::with_capacity(MAX_CHUNK_BYTES);
            while buf.len() < MAX_CHUNK_BYTES {
                match file.read_buf(&mut buf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        // Ending here short of the declared size makes the server reject it.
                        *re.lock().unwrap() = Some(e);
                        return None;
                    }
                }
            }
            if buf.is_empty() {
                return None;
            }
            h.lock().unwrap().update(&buf);
            let data = upload_file_request::Part::Data(buf.freeze());
            Some((UploadFileRequest { part: Some(data) }, file))
        }
    });
    let response = client
        .upload_file(futures::stream::iter([header]).chain(chunks))
        .await;
    if let Some(e) = read_error.lock().unwrap().take() {
        return Err(CliError::Local(format!(
            "reading {}: {e}",
            a.local.display()
        )));
    }
    let result = response?.into_inner().result.unwrap_or_default();
    let local_sha = hex::encode(hasher.lock().unwrap().clone().finalize());
    if result.sha256 != local_sha {
        return Err(CliError::Local(format!(
            "the sandbox received different bytes (sha256 {} != local {local_sha})",
            result.sha256
        )));
    }
    let info = result.info.unwrap_or_default();
    if json {
        let mut v = view::file_json(&info);
        v["sha256"] = serde_json::json!(result.sha256);
        say(v)?;
    } else {
        note(format!(
            "capsa: uploaded {}",
            view::bytes_note(
                Path::new(&info.path),
                info.size,
                &result.sha256,
                started.elapsed()
            )
        ));
    }
    Ok(0)
}

/// Removes a partial download unless it was completed.
struct PartFile {
    path: PathBuf,
    done: bool,
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub async fn download(client: &mut Client, a: DownloadArgs, json: bool) -> Result<u8, CliError> {
    use tokio::io::AsyncWriteExt as _;
    let started = std::time::Instant::now();
    let request = DownloadFileRequest {
        session_id: a.session,
        path: a.remote.clone(),
    };
    let mut stream = client.download_file(request).await?.into_inner();
    let Some(download_file_response::Part::Info(info)) =
        stream.message().await?.and_then(|m| m.part)
    else {
        return Err(CliError::Local(
            "the download did not start with the file's info".into(),
        ));
    };
    let to_stdout = a.local.as_os_str() == "-";
    let target = if !to_stdout && a.local.is_dir() {
        a.local.join(&info.name)
    } else {
        a.local.clone()
    };
    let mut part = None;
    let mut sink: Box<dyn tokio::io::AsyncWrite + Unpin> = if to_stdout {
        Box::new(tokio::io::stdout())
    } else {
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = dir.join(format!(".{name}.capsa-part-{}", std::process::id()));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", path.display())))?;
        part = Some(PartFile { path, done: false });
        Box::new(file)
    };
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    while let Some(message) = stream.message().await? {
        let Some(download_file_response::Part::Data(data)) = message.part else {
            return Err(CliError::Local("unexpected message in the download".into()));
        };
        hasher.update(&data);
        size += data.len() as u64;
        sink.write_all(&data).await.map_err(local)?;
    }
    sink.flush().await.map_err(local)?;
    drop(sink);
    if size != info.size {
        return Err(CliError::Local(format!(
            "the download ended after {size} of {} bytes",
            info.size
        )));
    }
    if let Some(mut part) = part {
        tokio::fs::rename(&part.path, &target)
            .await
            .map_err(local)?;
        part.done = true;
    }
    let sha = hex::encode(hasher.finalize());
    if json {
        let mut v = view::file_json(&info);
        v["sha256"] = serde_json::json!(sha);
        v["local"] = serde_json::json!(target.display().to_string());
        say(v)?;
    } else {
        note(format!(
            "capsa: downloaded {}",
            view::bytes_note(&target, size, &sha, started.elapsed())
        ));
    }
    Ok(0)
}

pub async fn ls(client: &mut Client, a: LsArgs, json: bool) -> Result<u8, CliError> {
    let request = ListFilesRequest {
        session_id: a.session,
        path: a.path,
    };
    let mut files = client.list_files(request).await?.into_inner().files;
    files.sort_by(|x, y| x.name.cmp(&y.name));
    for f in &files {
        if json {
            say(view::file_json(f))?;
        } else {
            say(view::file_row(f))?;
        }
    }
    Ok(0)
}

pub async fn info(client: &mut Client, a: SessionArg, json: bool) -> Result<u8, CliError> {
    let request = GetSessionRequest {
        session_id: a.session,
    };
    let session = client
        .get_session(request)
        .await?
        .into_inner()
        .session
        .unwrap_or_default();
    if json {
        say(view::session_json(&session))?;
    } else {
        print_block(&view::session_text(&session))?;
    }
    Ok(0)
}

/// Prints a session's egress policy, or with `--set` replaces it and prints the new one.
pub async fn egress(client: &mut Client, a: EgressArgs, json: bool) -> Result<u8, CliError> {
    let policy = if a.set {
        let policy = a.policy.policy().ok_or_else(|| {
            CliError::Usage("--set needs the new policy: give at least one policy flag".into())
        })?;
        client
            .update_egress_policy(UpdateEgressPolicyRequest {
                session_id: a.session,
                egress: Some(policy),
            })
            .await?
            .into_inner()
            .egress
    } else {
        client
            .get_egress_policy(GetEgressPolicyRequest {
                session_id: a.session,
            })
            .await?
            .into_inner()
            .egress
    }
    .unwrap_or_default();
    if json {
        say(view::egress_json(&policy))?;
    } else {
        print_block(&view::egress_text(&policy))?;
    }
    Ok(0)
}

fn print_block(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(local)
}

pub async fn usage(client: &mut Client, a: UsageArgs, json: bool) -> Result<u8, CliError> {
    match a.session {
        Some(session_id) => {
            let r = client
                .get_usage(GetUsageRequest { session_id })
                .await?
                .into_inner();
            let usage = r.usage.unwrap_or_default();
            if json {
                let mut v = view::usage_json(&usage);
                v["session_id"] = serde_json::json!(r.session_id);
                say(v)?;
            } else {
                print_block(&format!(
                    "{:<14} {}\n{}",
                    "session",
                    r.session_id,
                    view::usage_text(&usage)
                ))?;
            }
        }
        None => {
            let r = client
                .get_tenant_usage(GetTenantUsageRequest {})
                .await?
                .into_inner();
            let total = r.total.unwrap_or_default();
            if json {
                let mut v = view::usage_json(&total);
                v["tenant_id"] = serde_json::json!(r.tenant_id);
                v["active_sessions"] = serde_json::json!(r.active_sessions);
                v["total_sessions"] = serde_json::json!(r.total_sessions);
                say(v)?;
            } else {
                print_block(&format!(
                    "{:<14} {}\n{:<14} {}\n{:<14} {}\n{}",
                    "tenant",
                    r.tenant_id,
                    "active",
                    r.active_sessions,
                    "sessions",
                    r.total_sessions,
                    view::usage_text(&total)
                ))?;
            }
        }
    }
    Ok(0)
}

pub async fn extend(client: &mut Client, a: ExtendArgs, json: bool) -> Result<u8, CliError> {
    let request = ExtendSessionRequest {
        session_id: a.session,
        extend_by: Some(capsa_proto::time::duration(a.by)),
    };
    let session = client
        .extend_session(request)
        .await?
        .into_inner()
        .session
        .unwrap_or_default();
    if json {
        say(view::session_json(&session))?;
    } else {
        say(format!(
            "{} expires at {}",
            session.id,
            view::timestamp(&session.expire_time)
        ))?;
    }
    Ok(0)
}

pub async fn kill(client: &mut Client, a: SessionArg, json: bool) -> Result<u8, CliError> {
    let request = DeleteSessionRequest {
        session_id: a.session,
    };
    let session = client
        .delete_session(request)
        .await?
        .into_inner()
        .session
        .unwrap_or_default();
    if json {
        say(view::session_json(&session))?;
    } else {
        let v = view::session_json(&session);
        say(format!(
            "{} {} ({})",
            session.id,
            v["status"].as_str().unwrap_or(""),
            v["end_reason"].as_str().unwrap_or("")
        ))?;
    }
    Ok(0)
}

pub async fn list(client: &mut Client, a: ListArgs, json: bool) -> Result<u8, CliError> {
    let status = match a.status {
        None => SessionStatus::Unspecified,
        Some(StatusFilter::Creating) => SessionStatus::Creating,
        Some(StatusFilter::Active) => SessionStatus::Active,
        Some(StatusFilter::Terminating) => SessionStatus::Terminating,
        Some(StatusFilter::Terminated) => SessionStatus::Terminated,
    };
    let metadata: std::collections::HashMap<_, _> = a.labels.into_iter().collect();
    if !json {
        say(view::SESSION_HEADER)?;
    }
    let mut page_token = String::new();
    loop {
        let request = ListSessionsRequest {
            page_size: 100,
            page_token: page_token.clone(),
            status: status as i32,
            metadata: metadata.clone(),
        };
        let page = client.list_sessions(request).await?.into_inner();
        for s in &page.sessions {
            if json {
                say(view::session_json(s))?;
            } else {
                say(view::session_row(s))?;
            }
        }
        if page.next_page_token.is_empty() {
            return Ok(0);
        }
        page_token = page.next_page_token;
    }
}
