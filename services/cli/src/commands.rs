//! One function per subcommand: call the API through `capsa-client`, render the answer.
//! Every stream is consumed as it arrives (exec output to the terminal, downloads to disk),
//! never collected whole.

use std::io::{IsTerminal as _, Write};
use std::path::Path;
use std::time::Instant;

use capsa_client::{
    Client, Event, ExecuteOptions, Language, ListOptions, SessionOptions, SessionStatus,
    UploadOptions,
};
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::AsyncReadExt as _;

use crate::args::*;
use crate::error::{CliError, local};
use crate::render::{self, ExecRenderer};
use crate::view;

/// Writes a line to stdout, turning a closed pipe into an error instead of a panic.
pub(crate) fn say(line: impl std::fmt::Display) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(local)
}

pub(crate) fn note(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

pub(crate) fn print_block(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(local)
}

/// A byte progress bar on stderr, only for people: none with `--json` or when stderr is
/// not a terminal (piped, redirected, in CI).
fn progress_bar(json: bool, total: u64, verb: &str) -> Option<ProgressBar> {
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(verb.to_owned());
    Some(bar)
}

pub async fn create(client: &Client, a: CreateArgs, json: bool) -> Result<u8, CliError> {
    let options = SessionOptions {
        template: a.template,
        vcpus: a.vcpus,
        memory_mib: a.memory_mib,
        lifetime: a.lifetime,
        env: a.env.into_iter().collect(),
        labels: a.labels.into_iter().collect(),
        egress: a.egress.policy(),
        auto_suspend: a.auto_suspend,
        auto_resume: a.auto_resume,
        snapshot_id: a.from_snapshot,
    };
    // The session outlives this command: it is left running for the next ones.
    let session = client.create_session_info(options).await?;
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
pub async fn exec(client: &Client, a: ExecArgs, json: bool) -> Result<u8, CliError> {
    let code = read_code(&a).await?;
    let options = ExecuteOptions {
        language: match a.lang {
            Lang::Python => Language::Python,
            Lang::Shell => Language::Shell,
        },
        timeout: a.timeout,
        env: a.env.into_iter().collect(),
        cwd: a.cwd,
        max_output_bytes: a.max_output_bytes,
    };
    let session = client.session(&a.session);
    let mut events = session.execute_with(code, options).await?;
    let mut renderer = ExecRenderer::new(
        std::io::stdout(),
        std::io::stderr(),
        json,
        a.display_dir,
        &a.session,
    );
    let mut status = None;
    while let Some(event) = events.next().await {
        let event = event?;
        renderer.event(&event).map_err(local)?;
        if let Event::Completion(c) = &event {
            status = Some(render::exit_status(c));
        }
    }
    status.ok_or_else(|| CliError::Local("the execute stream ended without a completion".into()))
}

pub async fn upload(client: &Client, a: UploadArgs, json: bool) -> Result<u8, CliError> {
    let started = Instant::now();
    let file = tokio::fs::File::open(&a.local)
        .await
        .map_err(|e| CliError::Usage(format!("cannot open {}: {e}", a.local.display())))?;
    let size = file.metadata().await.map_err(local)?.len();
    let options = UploadOptions {
        mode: a.mode,
        no_overwrite: a.no_overwrite,
        size: Some(size),
    };
    let session = client.session(&a.session);
    let uploaded = match progress_bar(json, size, "upload") {
        Some(bar) => {
            let result = session
                .upload_from(bar.wrap_async_read(file), &a.remote, options)
                .await;
            bar.finish_and_clear();
            result
        }
        None => session.upload_from(file, &a.remote, options).await,
    }
    .map_err(|e| match e {
        capsa_client::Error::Io { source, .. } => {
            CliError::Local(format!("reading {}: {source}", a.local.display()))
        }
        other => other.into(),
    })?;
    let info = uploaded.info;
    if json {
        let mut v = view::file_json(&info);
        v["sha256"] = serde_json::json!(uploaded.sha256);
        say(v)?;
    } else {
        note(format!(
            "capsa: uploaded {}",
            view::bytes_note(
                Path::new(&info.path),
                info.size,
                &uploaded.sha256,
                started.elapsed()
            )
        ));
    }
    Ok(0)
}

pub async fn download(client: &Client, a: DownloadArgs, json: bool) -> Result<u8, CliError> {
    let started = Instant::now();
    let mut download = client.session(&a.session).download(&a.remote).await?;
    let to_stdout = a.local.as_os_str() == "-";
    let target = if !to_stdout && a.local.is_dir() {
        a.local.join(&download.info().name)
    } else {
        a.local.clone()
    };
    let bar = progress_bar(json, download.info().size, "download");
    if let Some(bar) = bar.clone() {
        download = download.on_progress(move |n| bar.inc(n));
    }
    let result = if to_stdout {
        download.write_to(tokio::io::stdout()).await
    } else {
        download.save_as(&target).await
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let done = result?;
    if json {
        let mut v = view::file_json(&done.info);
        v["sha256"] = serde_json::json!(done.sha256);
        v["local"] = serde_json::json!(target.display().to_string());
        say(v)?;
    } else {
        note(format!(
            "capsa: downloaded {}",
            view::bytes_note(&target, done.bytes, &done.sha256, started.elapsed())
        ));
    }
    Ok(0)
}

pub async fn ls(client: &Client, a: LsArgs, json: bool) -> Result<u8, CliError> {
    let mut files = client.session(&a.session).list_files(&a.path).await?;
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

pub async fn stat(client: &Client, a: PathArgs, json: bool) -> Result<u8, CliError> {
    let info = client.session(&a.session).stat(&a.path).await?;
    if json {
        say(view::file_json(&info))?;
    } else {
        print_block(&view::file_text(&info))?;
    }
    Ok(0)
}

pub async fn mkdir(client: &Client, a: MkdirArgs, json: bool) -> Result<u8, CliError> {
    let session = client.session(&a.session);
    let info = session
        .mkdir_with_mode(&a.path, a.mode.unwrap_or(0o755))
        .await?;
    if json {
        say(view::file_json(&info))?;
    } else {
        say(view::file_row(&info))?;
    }
    Ok(0)
}

pub async fn rm(client: &Client, a: RmArgs, json: bool) -> Result<u8, CliError> {
    let session = client.session(&a.session);
    if a.recursive {
        session.remove_all(&a.path).await?;
    } else {
        session.remove(&a.path).await?;
    }
    if json {
        say(serde_json::json!({"path": a.path, "removed": true}))?;
    }
    Ok(0)
}

pub async fn info(client: &Client, a: SessionArg, json: bool) -> Result<u8, CliError> {
    let session = client.session_info(&a.session).await?;
    if json {
        say(view::session_json(&session))?;
    } else {
        print_block(&view::session_text(&session))?;
    }
    Ok(0)
}

/// Prints a session's egress policy, or with `--set` replaces it and prints the new one.
pub async fn egress(client: &Client, a: EgressArgs, json: bool) -> Result<u8, CliError> {
    let session = client.session(&a.session);
    let policy = if a.set {
        let policy = a.policy.policy().ok_or_else(|| {
            CliError::Usage("--set needs the new policy: give at least one policy flag".into())
        })?;
        session.set_egress(policy).await?
    } else {
        session.egress().await?
    };
    if json {
        say(view::egress_json(&policy))?;
    } else {
        print_block(&view::egress_text(&policy))?;
    }
    Ok(0)
}

pub async fn usage(client: &Client, a: UsageArgs, json: bool) -> Result<u8, CliError> {
    match a.session {
        Some(session_id) => {
            let usage = client.session(&session_id).usage().await?;
            if json {
                let mut v = view::usage_json(&usage);
                v["session_id"] = serde_json::json!(session_id);
                say(v)?;
            } else {
                print_block(&format!(
                    "{:<14} {}\n{}",
                    "session",
                    session_id,
                    view::usage_text(&usage)
                ))?;
            }
        }
        None => {
            let r = client.tenant_usage().await?;
            let total = r.total.unwrap_or_default();
            if json {
                let mut v = view::usage_json(&total);
                v["tenant_id"] = serde_json::json!(r.tenant_id);
                v["active_sessions"] = serde_json::json!(r.active_sessions);
                v["total_sessions"] = serde_json::json!(r.total_sessions);
                v["snapshots"] = serde_json::json!(r.snapshots);
                v["snapshot_bytes"] = serde_json::json!(r.snapshot_bytes);
                v["snapshot_limit"] = serde_json::json!(r.snapshot_limit);
                v["snapshot_bytes_limit"] = serde_json::json!(r.snapshot_bytes_limit);
                v["snapshot_gib_seconds"] = serde_json::json!(r.snapshot_gib_seconds);
                say(v)?;
            } else {
                print_block(&format!(
                    "{:<14} {}\n{:<14} {}\n{:<14} {}\n{:<14} {} of {}, {} of {}, {:.1} GiB-s so far\n{}",
                    "tenant",
                    r.tenant_id,
                    "active",
                    r.active_sessions,
                    "sessions",
                    r.total_sessions,
                    "snapshots",
                    r.snapshots,
                    r.snapshot_limit,
                    view::bytes(r.snapshot_bytes),
                    view::bytes(r.snapshot_bytes_limit),
                    r.snapshot_gib_seconds,
                    view::usage_text(&total)
                ))?;
            }
        }
    }
    Ok(0)
}

pub async fn extend(client: &Client, a: ExtendArgs, json: bool) -> Result<u8, CliError> {
    let session = client.session(&a.session).extend(a.by).await?;
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

pub async fn kill(client: &Client, a: SessionArg, json: bool) -> Result<u8, CliError> {
    let session = client.delete_session(&a.session).await?;
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

pub async fn suspend(client: &Client, a: SessionArg, json: bool) -> Result<u8, CliError> {
    let session = client.session(&a.session).suspend().await?;
    if json {
        say(view::session_json(&session))?;
    } else {
        say(format!(
            "{} SUSPENDED ({} on disk; expires at {})",
            session.id,
            view::bytes(session.snapshot_bytes),
            view::timestamp(&session.expire_time)
        ))?;
    }
    Ok(0)
}

pub async fn snapshot(client: &Client, c: SnapshotCommand, json: bool) -> Result<u8, CliError> {
    match c {
        SnapshotCommand::Create(a) => {
            let request = capsa_client::proto::session::v1::SnapshotSessionRequest {
                session_id: a.session,
                name: a.name,
                metadata: a.labels.into_iter().collect(),
            };
            let snapshot = client
                .raw()
                .snapshot_session(request)
                .await
                .map_err(capsa_client::Error::from)?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            if json {
                say(view::snapshot_json(&snapshot))?;
            } else {
                // Only the id on stdout, so `snap=$(capsa snapshot create ...)` works.
                say(&snapshot.id)?;
                note(format!(
                    "capsa: snapshot of {} is {} ({} on disk)",
                    snapshot.session_id,
                    view::snapshot_status(&snapshot),
                    view::bytes(snapshot.size_bytes)
                ));
            }
        }
        SnapshotCommand::List => {
            let snapshots = client.list_snapshots().await?;
            if json {
                for s in &snapshots {
                    say(view::snapshot_json(s))?;
                }
            } else {
                say(view::SNAPSHOT_HEADER)?;
                for s in &snapshots {
                    say(view::snapshot_row(s))?;
                }
            }
        }
        SnapshotCommand::Info(a) => {
            let snapshot = client.snapshot_info(&a.snapshot).await?;
            if json {
                say(view::snapshot_json(&snapshot))?;
            } else {
                print_block(&view::snapshot_text(&snapshot))?;
            }
        }
        SnapshotCommand::Rm(a) => {
            let snapshot = client.delete_snapshot(&a.snapshot).await?;
            if json {
                say(view::snapshot_json(&snapshot))?;
            } else {
                say(format!("{} deleted", snapshot.id))?;
            }
        }
    }
    Ok(0)
}

pub async fn fork(client: &Client, a: ForkArgs, json: bool) -> Result<u8, CliError> {
    let request = capsa_client::proto::session::v1::ForkSessionRequest {
        session_id: a.session,
        count: a.count,
        lifetime: a.lifetime.map(capsa_client::proto::time::duration),
        metadata: Default::default(),
    };
    let forks = client
        .raw()
        .fork_session(request)
        .await
        .map_err(capsa_client::Error::from)?
        .into_inner();
    for session in &forks.sessions {
        if json {
            say(view::session_json(session))?;
        } else {
            say(&session.id)?;
        }
    }
    Ok(0)
}

pub async fn resume(client: &Client, a: SessionArg, json: bool) -> Result<u8, CliError> {
    let session = client.session(&a.session).resume().await?;
    if json {
        say(view::session_json(&session))?;
    } else {
        say(format!(
            "{} ACTIVE (vm {}; expires at {})",
            session.id,
            session.vm_id,
            view::timestamp(&session.expire_time)
        ))?;
    }
    Ok(0)
}

pub async fn list(client: &Client, a: ListArgs, json: bool) -> Result<u8, CliError> {
    let status = a.status.map(|s| match s {
        StatusFilter::Creating => SessionStatus::Creating,
        StatusFilter::Active => SessionStatus::Active,
        StatusFilter::Suspending => SessionStatus::Suspending,
        StatusFilter::Suspended => SessionStatus::Suspended,
        StatusFilter::Resuming => SessionStatus::Resuming,
        StatusFilter::Terminating => SessionStatus::Terminating,
        StatusFilter::Terminated => SessionStatus::Terminated,
    });
    let options = ListOptions {
        status,
        labels: a.labels.into_iter().collect(),
    };
    let sessions = client.list_sessions(options).await?;
    if !json {
        say(view::SESSION_HEADER)?;
    }
    for s in &sessions {
        if json {
            say(view::session_json(s))?;
        } else {
            say(view::session_row(s))?;
        }
    }
    Ok(0)
}
