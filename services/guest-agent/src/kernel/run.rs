//! One execute on a running kernel, from writing the request to the Completion.
//!
//! The loop reads stdout and stderr in raw chunks as they arrive, and the driver's event
//! pipe line by line. Before forwarding any driver event (and before the completion) it
//! first takes whatever is already in the output pipes, because the driver wrote that
//! output before the event: so output always precedes the result, error and completion
//! that follow it. Events go to a bounded channel; while the client is slow the loop
//! waits on that channel and stops reading the pipes, so the child blocks on write.
//!
//! The output cap counts stdout, stderr and the data of Result and Display events together;
//! past it everything is counted and dropped after one marker. A Result or Display event
//! larger than one message is cut to fit (see [`super::rich`]) with a marker on stderr, and
//! an error's value and traceback are cut too, so no event can fail the stream at a hop.
//!
//! Timers: at the deadline (or when the client goes away) the kernel's process group gets
//! SIGINT; if the driver has not reported completion `grace` later, the group gets SIGKILL
//! and the kernel is replaced on the next execute (state lost). The pipes are read until
//! the end in every case, so the kernel is left ready for the next call.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use bytes::Bytes;
use capsa_proto::limits::MAX_EVENT_DATA_BYTES;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{ChildStderr, ChildStdout};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::process::{KernelProcess, proc_cpu_time, read_ready};
use super::{Completion, Event, EventSender, ExecuteRequest, Language, Status, rich};

/// Most bytes taken from one pipe when draining before an event: a background writer
/// that never stops must not keep the completion from being sent.
const DRAIN_LIMIT: usize = 1024 * 1024;

/// A request ready to write, and the files to remove once the execute is over.
pub struct Prepared {
    pub line: Vec<u8>,
    pub files: Vec<PathBuf>,
}

pub struct Context<'a> {
    pub language: Language,
    pub grace: Duration,
    pub events: &'a EventSender,
    pub cancel: &'a CancellationToken,
    /// The kernel was replaced before this execute.
    pub state_lost: bool,
}

pub struct Outcome {
    /// The process is dead (or killed) and must be replaced.
    pub kernel_gone: bool,
}

/// What a driver reports on its event pipe.
pub enum DriverEvent {
    Emit(Event),
    Done(Done),
}

pub struct Done {
    pub ok: bool,
    pub exit_code: i32,
    /// CPU time the driver measured; `None` means the agent measures it from /proc.
    pub cpu: Option<Duration>,
    pub interpreter: Duration,
}

#[derive(Clone, Copy, Debug)]
enum Reason {
    Timeout,
    ClientGone,
    /// The driver broke its protocol (e.g. an endless event line); the kernel is killed.
    Broken,
}

enum Fire {
    Cancelled,
    Deadline,
    Grace,
}

enum End {
    Done(Done),
    Exited(Option<ExitStatus>),
}

struct FilesGuard(Vec<PathBuf>);

impl Drop for FilesGuard {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

struct Run<'a> {
    ctx: Context<'a>,
    pgid: Pid,
    timeout: Duration,
    deadline: Instant,
    cap: u64,
    produced: u64,
    delivered: u64,
    truncated: bool,
    interrupt: Option<(Reason, Instant)>,
    killed: bool,
    client_gone: bool,
}

pub async fn run(
    p: &mut KernelProcess,
    req: &ExecuteRequest,
    prepared: Prepared,
    ctx: Context<'_>,
) -> Outcome {
    let started = Instant::now();
    let _files = FilesGuard(prepared.files);
    // Two /proc reads were an eighth of the agent's CPU time per Execute: only when needed.
    let cpu_before = if ctx.language.driver_measures_cpu() {
        None
    } else {
        proc_cpu_time(p.pid())
    };
    let mut run = Run {
        ctx,
        pgid: p.pgid,
        timeout: req.timeout,
        deadline: started + req.timeout,
        cap: req.max_output_bytes,
        produced: 0,
        delivered: 0,
        truncated: false,
        interrupt: None,
        killed: false,
        client_gone: false,
    };
    let end = run.pump(p, &prepared.line).await;
    let wall_time = started.elapsed();
    let language = run.ctx.language.name();
    let mut c = Completion {
        status: Status::Ok,
        exit_code: 0,
        wall_time,
        cpu_time: Duration::ZERO,
        interpreter_time: Duration::ZERO,
        state_lost: run.ctx.state_lost,
        output_truncated: run.truncated,
        output_bytes: run.produced,
        message: String::new(),
    };
    let kernel_gone = match end {
        End::Done(done) => {
            c.exit_code = done.exit_code;
            c.interpreter_time = done.interpreter;
            c.cpu_time = done
                .cpu
                .or_else(|| Some(proc_cpu_time(p.pid())?.saturating_sub(cpu_before?)))
                .unwrap_or_default();
            c.status = if done.ok { Status::Ok } else { Status::Error };
            if let Some((reason, _)) = run.interrupt {
                c.status = run.interrupted_status(reason);
                c.message = format!(
                    "{}; the code was interrupted and the kernel kept its state",
                    run.why(reason)
                );
            }
            // A completion that raced the SIGKILL still leaves a dead kernel behind.
            c.state_lost |= run.killed;
            run.killed
        }
        End::Exited(status) => {
            c.state_lost = true;
            c.exit_code = status.map(exit_code).unwrap_or(-1);
            match run.interrupt {
                Some((reason, _)) if run.killed => {
                    c.status = run.interrupted_status(reason);
                    c.message = format!(
                        "{}; the code did not stop within {:?} of SIGINT, so the {language} kernel was killed (state lost)",
                        run.why(reason),
                        run.ctx.grace
                    );
                }
                Some((reason, _)) => {
                    c.status = run.interrupted_status(reason);
                    c.message = format!(
                        "{}; the {language} kernel exited when interrupted (state lost)",
                        run.why(reason)
                    );
                }
                None => {
                    c.status = Status::KernelDied;
                    c.message = format!(
                        "the {language} kernel {}; a fresh one starts on the next execute (state lost)",
                        describe_exit(status)
                    );
                }
            }
            true
        }
    };
    tracing::info!(status = ?c.status, exit_code = c.exit_code, wall_ms = wall_time.as_millis() as u64, output_bytes = c.output_bytes, truncated = c.output_truncated, "execute finished");
    record_duration(language, c.status, wall_time);
    run.send(Event::Completion(c)).await;
    Outcome { kernel_gone }
}

impl Run<'_> {
    async fn pump(&mut self, p: &mut KernelProcess, line: &[u8]) -> End {
        let language = self.ctx.language;
        let KernelProcess {
            child,
            stdout,
            stderr,
            out_buf,
            err_buf,
            requests,
            events,
            ..
        } = p;
        let (mut out_open, mut err_open, mut events_open) = (true, true, true);
        let mut written = 0;
        loop {
            // Biased, in this order: timers are honoured even under an output flood, and
            // stdout is read before stderr, so output the code wrote to stdout before it
            // wrote to stderr is delivered (and counted against the cap) first.
            tokio::select! {
                biased;
                fire = self.fire() => self.on_fire(fire),
                r = requests.write(&line[written..]), if written < line.len() => match r {
                    Ok(n) => written += n,
                    Err(e) => {
                        // The driver is gone; the exit branch below reports it.
                        tracing::debug!(error = %e, "request pipe closed");
                        written = line.len();
                    }
                },
                r = stdout.read(out_buf), if out_open => match r {
                    Ok(n) if n > 0 => self.output(true, &out_buf[..n]).await,
                    _ => out_open = false,
                },
                r = stderr.read(err_buf), if err_open => match r {
                    Ok(n) if n > 0 => {
                        // The reactor may not know yet of stdout data written before this
                        // stderr data (its readiness is learnt asynchronously): take it
                        // first, with a raw read.
                        self.take_stdout(stdout, out_buf).await;
                        self.output(false, &err_buf[..n]).await
                    }
                    _ => err_open = false,
                },
                r = events.next_line(), if events_open => match r {
                    Ok(Some(raw)) => {
                        self.drain(stdout, stderr, out_buf).await;
                        match super::parse_event(language, &raw) {
                            Ok(DriverEvent::Done(done)) => return End::Done(done),
                            Ok(DriverEvent::Emit(Event::Result(data))) => {
                                self.rich(data, Event::Result, "result").await
                            }
                            Ok(DriverEvent::Emit(Event::Display(data))) => {
                                self.rich(data, Event::Display, "display data").await
                            }
                            Ok(DriverEvent::Emit(Event::Error {
                                mut name,
                                mut value,
                                mut traceback,
                            })) => {
                                // Not output (not counted), but it must fit one message.
                                rich::fit_error(
                                    &mut name,
                                    &mut value,
                                    &mut traceback,
                                    MAX_EVENT_DATA_BYTES,
                                );
                                let error = Event::Error {
                                    name,
                                    value,
                                    traceback,
                                };
                                self.send(error).await
                            }
                            Ok(DriverEvent::Emit(event)) => self.send(event).await,
                            Err(e) => tracing::warn!(error = %e, "malformed driver event"),
                        }
                    }
                    Ok(None) => events_open = false,
                    Err(e) => {
                        tracing::warn!(error = %e, "driver event pipe failed; killing the kernel");
                        self.interrupt.get_or_insert((Reason::Broken, Instant::now()));
                        self.kill();
                        events_open = false;
                    }
                },
                status = child.wait() => {
                    self.drain(stdout, stderr, out_buf).await;
                    return End::Exited(status.ok());
                }
            }
        }
    }

    /// Resolves when the next timer is due.
    async fn fire(&self) -> Fire {
        match self.interrupt {
            None => tokio::select! {
                _ = self.ctx.cancel.cancelled() => Fire::Cancelled,
                _ = sleep_until(self.deadline) => Fire::Deadline,
            },
            Some((_, grace_at)) if !self.killed => {
                sleep_until(grace_at).await;
                Fire::Grace
            }
            Some(_) => std::future::pending().await,
        }
    }

    fn on_fire(&mut self, fire: Fire) {
        match fire {
            Fire::Cancelled => self.interrupt(Reason::ClientGone),
            Fire::Deadline => self.interrupt(Reason::Timeout),
            Fire::Grace => {
                tracing::warn!(grace = ?self.ctx.grace, "code ignored SIGINT; killing the kernel's process group");
                self.kill();
            }
        }
    }

    fn interrupt(&mut self, reason: Reason) {
        if self.interrupt.is_some() {
            return;
        }
        tracing::info!(?reason, "interrupting the code");
        self.signal(Signal::SIGINT);
        self.interrupt = Some((reason, Instant::now() + self.ctx.grace));
    }

    /// Callers set `interrupt` first: it says why, in the completion.
    fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        self.killed = true;
    }

    fn signal(&self, signal: Signal) {
        if let Err(e) = killpg(self.pgid, signal) {
            tracing::debug!(%signal, error = %e, "killpg failed");
        }
    }

    fn interrupted_status(&self, reason: Reason) -> Status {
        match reason {
            Reason::Timeout => Status::Timeout,
            Reason::ClientGone => Status::Interrupted,
            Reason::Broken => Status::KernelDied,
        }
    }

    fn why(&self, reason: Reason) -> String {
        match reason {
            Reason::Timeout => format!("timed out after {:?}", self.timeout),
            Reason::ClientGone => {
                "cancelled (the client went away or the agent is stopping)".to_string()
            }
            Reason::Broken => "the kernel's driver sent a malformed event stream".to_string(),
        }
    }

    /// Takes what is in the stdout pipe right now.
    async fn take_stdout(&mut self, stdout: &ChildStdout, buf: &mut [u8]) {
        use std::os::fd::AsFd as _;
        let mut chunks: Vec<Bytes> = Vec::new();
        read_ready(stdout.as_fd(), buf, DRAIN_LIMIT, |b| {
            chunks.push(Bytes::copy_from_slice(b))
        });
        for data in chunks {
            self.output(true, &data).await;
        }
    }

    /// Takes what is in both output pipes right now.
    async fn drain(&mut self, stdout: &ChildStdout, stderr: &ChildStderr, buf: &mut [u8]) {
        use std::os::fd::AsFd as _;
        let mut chunks: Vec<(bool, Bytes)> = Vec::new();
        read_ready(stdout.as_fd(), buf, DRAIN_LIMIT, |b| {
            chunks.push((true, Bytes::copy_from_slice(b)))
        });
        read_ready(stderr.as_fd(), buf, DRAIN_LIMIT, |b| {
            chunks.push((false, Bytes::copy_from_slice(b)))
        });
        for (is_stdout, data) in chunks {
            self.output(is_stdout, &data).await;
        }
    }

    /// Counts output and forwards it up to the cap; past the cap, one marker on stderr.
    async fn output(&mut self, is_stdout: bool, data: &[u8]) {
        self.produced += data.len() as u64;
        if self.truncated {
            return;
        }
        let room = self.cap - self.delivered;
        let take = (data.len() as u64).min(room) as usize;
        if take > 0 {
            self.delivered += take as u64;
            let chunk = Bytes::copy_from_slice(&data[..take]);
            self.send(if is_stdout {
                Event::Stdout(chunk)
            } else {
                Event::Stderr(chunk)
            })
            .await;
        }
        if take < data.len() {
            self.truncate().await;
        }
    }

    /// A Result or Display event: its bytes count against the cap together with stdout and
    /// stderr, and it is cut to what fits under the cap and in one message (see
    /// [`rich`](super::rich)). Past the cap: the usual marker, and the output ends. Cut only
    /// to fit a message: a marker naming what was cut, and the output goes on.
    async fn rich(
        &mut self,
        data: HashMap<String, Bytes>,
        event: fn(HashMap<String, Bytes>) -> Event,
        what: &str,
    ) {
        let size: u64 = data.values().map(|v| v.len() as u64).sum();
        self.produced += size;
        if self.truncated {
            return;
        }
        let cap_room = self.cap - self.delivered;
        let fitted = rich::fit(data, cap_room, MAX_EVENT_DATA_BYTES);
        if !fitted.data.is_empty() {
            self.delivered += fitted.value_bytes;
            self.send(event(fitted.data)).await;
        }
        if fitted.cuts.is_empty() {
            return;
        }
        if size > cap_room {
            self.truncate().await;
        } else {
            let marker = format!(
                "\n[capsa: {what} cut to fit one message of {MAX_EVENT_DATA_BYTES} bytes: {}]\n",
                rich::describe(&fitted.cuts)
            );
            self.send(Event::Stderr(Bytes::from(marker))).await;
        }
    }

    /// The cap is reached: one marker on stderr, and nothing more is forwarded.
    async fn truncate(&mut self) {
        self.truncated = true;
        let marker = format!("\n[capsa: output truncated after {} bytes]\n", self.cap);
        self.send(Event::Stderr(Bytes::from(marker))).await;
    }

    /// Sends one event, waiting for room in the channel while still honouring the timers.
    /// A closed channel means the client went away: the code is interrupted, and the rest
    /// of its output is read and dropped.
    async fn send(&mut self, event: Event) {
        if self.client_gone {
            return;
        }
        let events = self.ctx.events;
        loop {
            tokio::select! {
                biased;
                permit = events.reserve() => {
                    match permit {
                        Ok(permit) => permit.send(Ok(event)),
                        Err(_) => {
                            self.client_gone = true;
                            self.interrupt(Reason::ClientGone);
                        }
                    }
                    return;
                }
                fire = self.fire() => self.on_fire(fire),
            }
        }
    }
}

fn record_duration(language: &'static str, status: Status, wall_time: Duration) {
    use opentelemetry::KeyValue;
    static HISTOGRAM: std::sync::OnceLock<opentelemetry::metrics::Histogram<f64>> =
        std::sync::OnceLock::new();
    let h = HISTOGRAM.get_or_init(|| {
        capsa_telemetry::meter()
            .f64_histogram(capsa_telemetry::metrics::EXECUTE_DURATION)
            .with_unit("s")
            .build()
    });
    let status = format!("{status:?}").to_lowercase();
    h.record(
        wall_time.as_secs_f64(),
        &[
            KeyValue::new("service", "capsa-guest-agent"),
            KeyValue::new("language", language),
            KeyValue::new("status", status),
        ],
    );
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn describe_exit(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match status {
        Some(s) if s.code().is_some() => format!("exited with status {}", s.code().unwrap_or(0)),
        Some(s) => match s.signal().and_then(|n| Signal::try_from(n).ok()) {
            Some(sig) => format!("was killed by signal {} ({sig})", sig as i32),
            None => "was killed by a signal".to_string(),
        },
        None => "exited".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    #[test]
    fn exits_are_described_with_code_or_signal() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(11)), 139);
        assert_eq!(
            describe_exit(Some(ExitStatus::from_raw(3 << 8))),
            "exited with status 3"
        );
        assert_eq!(
            describe_exit(Some(ExitStatus::from_raw(11))),
            "was killed by signal 11 (SIGSEGV)"
        );
    }
}
