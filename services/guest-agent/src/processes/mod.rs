//! Background processes and terminals: one table per agent (that is, per session) of every
//! program started by StartProcess ("p-<n>") or OpenTerminal ("t-<n>"), running or exited.
//!
//! - Each program is a child in its own session (`setsid`), so its process group is its
//!   own: signals go to the whole group, and the kernels' interrupts never reach it. It
//!   gets `PR_SET_PDEATHSIG(SIGKILL)` so it does not outlive an agent that was killed, and
//!   [`Processes::kill_all`] kills every running group when the agent shuts down.
//! - A background process's stdout and stderr are always drained, into one [`Ring`] per
//!   process (so it never blocks on a full pipe); readers ([`Attach`]) follow it by offset.
//! - A waiter task per program records its exit; a background process's output is
//!   complete when its pipes reach EOF, or 1 s after the exit if a grandchild holds them.
//! - Limits (`capsa_proto::limits`): running background processes, open terminals, and
//!   records kept (past it the oldest exited record is forgotten).

pub mod ring;

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use capsa_proto::limits::{MAX_PROCESS_RECORDS, MAX_RUNNING_PROCESSES, MAX_TERMINALS};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;

use crate::error::Error;
pub use ring::{Read, Ring, Stream};

/// Largest output chunk of an AttachProcess event or a terminal's screen bytes.
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;

/// How long output may still arrive after the process exited (a grandchild holding the
/// pipes) before its output counts as complete.
pub const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// A WriteStdin to a process that does not read its stdin gives up after this.
const STDIN_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Background,
    Terminal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, or -1 when a signal ended the process.
    pub code: i32,
    /// The signal that ended it, or 0.
    pub signal: i32,
    pub end_time: SystemTime,
}

impl ExitInfo {
    fn from_status(status: ExitStatus) -> ExitInfo {
        use std::os::unix::process::ExitStatusExt as _;
        let (code, signal) = match (status.code(), status.signal()) {
            (Some(code), _) => (code, 0),
            (None, Some(signal)) => (-1, signal),
            (None, None) => (-1, 0),
        };
        ExitInfo {
            code,
            signal,
            end_time: SystemTime::now(),
        }
    }
}

/// A snapshot of one record.
#[derive(Debug, Clone)]
pub struct Info {
    pub id: String,
    pub kind: Kind,
    pub pid: u32,
    pub command: String,
    pub args: Vec<String>,
    /// `None` while running.
    pub exit: Option<ExitInfo>,
    pub start_time: SystemTime,
    /// The offset the next output byte will have (0 for terminals).
    pub output_offset: u64,
    pub stdin_open: bool,
}

/// A validated StartProcess.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub stdin: Bytes,
    pub keep_stdin_open: bool,
    pub output_buffer_bytes: usize,
}

/// One event of an AttachProcess stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Output {
        stream: Stream,
        offset: u64,
        data: Bytes,
    },
    Dropped {
        from: u64,
        to: u64,
    },
    Exit(ExitInfo),
}

pub(crate) struct Record {
    pub id: String,
    pub kind: Kind,
    pub pid: i32,
    command: String,
    args: Vec<String>,
    start_time: SystemTime,
    state: Mutex<State>,
    /// Bumped on new output, exit and output completion.
    changed: watch::Sender<()>,
    /// Locked for a whole write, so writes (the spec's stdin first) go in order.
    stdin: Arc<tokio::sync::Mutex<Option<ChildStdin>>>,
    stdin_open: AtomicBool,
}

struct State {
    exit: Option<ExitInfo>,
    /// Background processes only.
    ring: Option<Ring>,
    /// Exited and the output pipes reached EOF (or the grace passed).
    output_done: bool,
}

impl Record {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        self.lock().exit
    }

    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    pub fn info(&self) -> Info {
        let state = self.lock();
        Info {
            id: self.id.clone(),
            kind: self.kind,
            pid: self.pid as u32,
            command: self.command.clone(),
            args: self.args.clone(),
            exit: state.exit,
            start_time: self.start_time,
            output_offset: state.ring.as_ref().map_or(0, Ring::end),
            stdin_open: self.stdin_open.load(Ordering::Relaxed),
        }
    }

    /// Signals the process group if the process is still running.
    pub fn signal(&self, signal: Signal) -> Result<(), Error> {
        let state = self.lock();
        if state.exit.is_some() {
            return Err(Error::Precondition(format!(
                "process {} has already exited",
                self.id
            )));
        }
        // An exited record is never signalled: its pid may belong to someone else by now.
        killpg(Pid::from_raw(self.pid), signal).map_err(|e| Error::Io {
            op: "signal",
            path: self.id.clone(),
            source: e.into(),
        })
    }

    fn set_exit(&self, exit: ExitInfo) {
        self.lock().exit = Some(exit);
        self.changed.send_replace(());
    }

    fn push_output(&self, stream: Stream, data: &[u8]) {
        if let Some(ring) = &mut self.lock().ring {
            ring.push(stream, data);
        }
        self.changed.send_replace(());
    }

    fn set_output_done(&self) {
        self.lock().output_done = true;
        self.changed.send_replace(());
    }
}

pub struct Processes {
    table: Mutex<Table>,
    /// Where programs start when their spec names no cwd; the agent's own when `None`.
    workdir: Option<PathBuf>,
}

struct Table {
    /// Oldest first.
    records: VecDeque<Arc<Record>>,
    next_process: u64,
    next_terminal: u64,
    session_env: BTreeMap<String, String>,
    /// Set at shutdown: nothing new starts.
    closed: bool,
}

impl Table {
    fn running(&self, kind: Kind) -> usize {
        self.records
            .iter()
            .filter(|r| r.kind == kind && r.exit().is_none())
            .count()
    }
}

/// How [`Processes::launch`] sets up a child besides its program, env and cwd.
pub(crate) struct Launch<'a> {
    pub kind: Kind,
    pub command: &'a str,
    pub args: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub cwd: Option<&'a Path>,
    /// Background processes: the ring size.
    pub ring: Option<usize>,
    /// Sets stdio and, for terminals, the controlling terminal.
    pub configure: &'a mut dyn FnMut(&mut Command),
}

impl Processes {
    pub fn new(workdir: Option<PathBuf>) -> Processes {
        Processes {
            table: Mutex::new(Table {
                records: VecDeque::new(),
                next_process: 0,
                next_terminal: 0,
                session_env: BTreeMap::new(),
                closed: false,
            }),
            workdir,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("not poisoned")
    }

    /// Adds to the session env of every program started from now on.
    pub fn configure(&self, env: &BTreeMap<String, String>) {
        self.lock().session_env.extend(env.clone());
    }

    /// (background processes running, terminals open).
    pub fn counts(&self) -> (usize, usize) {
        let t = self.lock();
        (t.running(Kind::Background), t.running(Kind::Terminal))
    }

    pub fn list(&self) -> Vec<Info> {
        let records: Vec<_> = self.lock().records.iter().cloned().collect();
        records.iter().map(|r| r.info()).collect()
    }

    pub(crate) fn get(&self, id: &str) -> Result<Arc<Record>, Error> {
        self.lock()
            .records
            .iter()
            .find(|r| r.id == id)
            .cloned()
            .ok_or_else(|| Error::UnknownProcess { id: id.into() })
    }

    /// Checks the limits, spawns the child in its own session and records it. The table
    /// stays locked across the spawn, so concurrent starts cannot pass a limit together.
    pub(crate) fn launch(&self, l: Launch<'_>) -> Result<(Arc<Record>, Child), Error> {
        let mut t = self.lock();
        if t.closed {
            return Err(Error::ShuttingDown);
        }
        match l.kind {
            Kind::Background if t.running(Kind::Background) >= MAX_RUNNING_PROCESSES => {
                return Err(Error::Exhausted(format!(
                    "{MAX_RUNNING_PROCESSES} background processes are running, the limit \
                     (MAX_RUNNING_PROCESSES)"
                )));
            }
            Kind::Terminal if t.running(Kind::Terminal) >= MAX_TERMINALS => {
                return Err(Error::Exhausted(format!(
                    "{MAX_TERMINALS} terminals are open, the limit (MAX_TERMINALS)"
                )));
            }
            _ => {}
        }
        let mut cmd = Command::new(l.command);
        cmd.args(l.args)
            .envs(&t.session_env)
            .envs(l.env)
            .kill_on_drop(false);
        if let Some(dir) = l.cwd.or(self.workdir.as_deref()) {
            cmd.current_dir(dir);
        }
        (l.configure)(&mut cmd);
        let controlling_tty = l.kind == Kind::Terminal;
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (setsid, ioctl, prctl). Stdio is already in place when it runs.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Spawned from a runtime worker thread, which lives as long as the agent.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
                Error::invalid("command", format!("cannot run {:?}: {e}", l.command))
            }
            _ => Error::Io {
                op: "spawn",
                path: l.command.into(),
                source: e,
            },
        })?;
        let pid = child.id().expect("not yet waited for") as i32;
        let id = match l.kind {
            Kind::Background => {
                t.next_process += 1;
                format!("p-{}", t.next_process)
            }
            Kind::Terminal => {
                t.next_terminal += 1;
                format!("t-{}", t.next_terminal)
            }
        };
        let record = Arc::new(Record {
            id,
            kind: l.kind,
            pid,
            command: l.command.into(),
            args: l.args.to_vec(),
            start_time: SystemTime::now(),
            state: Mutex::new(State {
                exit: None,
                ring: l.ring.map(Ring::new),
                output_done: false,
            }),
            changed: watch::channel(()).0,
            stdin: Arc::new(tokio::sync::Mutex::new(None)),
            stdin_open: AtomicBool::new(false),
        });
        while t.records.len() >= MAX_PROCESS_RECORDS {
            // Running ones are at most MAX_RUNNING_PROCESSES + MAX_TERMINALS, far fewer.
            match t.records.iter().position(|r| r.exit().is_some()) {
                Some(i) => drop(t.records.remove(i)),
                None => break,
            }
        }
        t.records.push_back(record.clone());
        tracing::info!(id = %record.id, pid, command = l.command, "started");
        Ok((record, child))
    }

    /// Starts a background process; it runs until it exits, is signalled, or the agent
    /// shuts down, whoever is attached.
    pub fn start(&self, spec: ProcessSpec) -> Result<Info, Error> {
        let stdin = spec.keep_stdin_open || !spec.stdin.is_empty();
        let (record, mut child) = self.launch(Launch {
            kind: Kind::Background,
            command: &spec.command,
            args: &spec.args,
            env: &spec.env,
            cwd: spec.cwd.as_deref(),
            ring: Some(spec.output_buffer_bytes),
            configure: &mut |cmd| {
                cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
            },
        })?;
        if let Some(pipe) = child.stdin.take() {
            // Locked before anyone else can see the record: WriteStdin waits for this.
            let mut guard = record
                .stdin
                .clone()
                .try_lock_owned()
                .expect("nobody else has the new record");
            *guard = Some(pipe);
            record.stdin_open.store(true, Ordering::Relaxed);
            let record = record.clone();
            let (data, keep) = (spec.stdin, spec.keep_stdin_open);
            tokio::spawn(async move {
                let pipe = guard.as_mut().expect("set above");
                let written = data.is_empty() || pipe.write_all(&data).await.is_ok();
                if !written || !keep {
                    *guard = None;
                    record.stdin_open.store(false, Ordering::Relaxed);
                }
            });
        }
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let pump = tokio::spawn(pump_output(record.clone(), stdout, stderr));
        let info = record.info();
        tokio::spawn(async move {
            wait_exit(&record, child).await;
            if tokio::time::timeout(OUTPUT_GRACE, pump).await.is_err() {
                tracing::debug!(id = %record.id, "output still open after exit");
            }
            record.set_output_done();
        });
        Ok(info)
    }

    /// Waits for the exit and, for a background process, for its output to be complete
    /// (at most [`OUTPUT_GRACE`] more), so the answer's `output_offset` is final and an
    /// attach after it reads everything.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Info, Error> {
        let record = self.get(id)?;
        let mut changes = record.subscribe();
        let finished = |r: &Record| {
            let state = r.lock();
            state.exit.is_some() && (r.kind == Kind::Terminal || state.output_done)
        };
        let exited = tokio::time::timeout(timeout, async {
            while !finished(&record) {
                if changes.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        match exited {
            Ok(()) => Ok(record.info()),
            Err(_) => Err(Error::Deadline(format!(
                "process {id} is still running after {}s",
                timeout.as_secs()
            ))),
        }
    }

    pub fn signal(&self, id: &str, signal: Signal) -> Result<Info, Error> {
        let record = self.get(id)?;
        record.signal(signal)?;
        tracing::info!(id, %signal, "signalled");
        Ok(record.info())
    }

    /// Writes to a background process's stdin, then closes it if `close`.
    pub async fn write_stdin(&self, id: &str, data: Bytes, close: bool) -> Result<(), Error> {
        let record = self.get(id)?;
        if record.kind == Kind::Terminal {
            return Err(terminal_io(id));
        }
        let write = async {
            let mut guard = record.stdin.lock().await;
            let Some(pipe) = guard.as_mut() else {
                return Err(Error::Precondition(format!(
                    "the stdin of process {id} is closed (or was not kept open: \
                     keep_stdin_open)"
                )));
            };
            let written = pipe.write_all(&data).await;
            if close || written.is_err() {
                *guard = None;
                record.stdin_open.store(false, Ordering::Relaxed);
            }
            match written {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Error::Precondition(
                    format!("process {id} closed its stdin"),
                )),
                Err(e) => Err(Error::Io {
                    op: "write stdin of",
                    path: id.into(),
                    source: e,
                }),
            }
        };
        tokio::time::timeout(STDIN_WRITE_TIMEOUT, write)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Deadline(format!(
                    "process {id} did not read its stdin for {}s",
                    STDIN_WRITE_TIMEOUT.as_secs()
                )))
            })
    }

    /// A reader of a background process's output from `from`; with `follow` it waits for
    /// new output until the process's output is complete.
    pub fn attach(&self, id: &str, from: u64, follow: bool) -> Result<Attach, Error> {
        let record = self.get(id)?;
        if record.kind == Kind::Terminal {
            return Err(terminal_io(id));
        }
        let end = record.info().output_offset;
        if from > end {
            return Err(Error::invalid(
                "from_offset",
                format!("{from} is past the end of the output of {id} ({end})"),
            ));
        }
        Ok(Attach {
            changes: record.subscribe(),
            record,
            pos: from,
            follow,
            done: false,
        })
    }

    /// Kills every running program's process group; nothing starts afterwards.
    pub fn kill_all(&self) {
        let mut t = self.lock();
        t.closed = true;
        for record in &t.records {
            if record.signal(Signal::SIGKILL).is_ok() {
                tracing::info!(id = %record.id, "killed at shutdown");
            }
        }
    }
}

fn terminal_io(id: &str) -> Error {
    Error::Precondition(format!(
        "terminal {id}'s input and output go through its OpenTerminal stream"
    ))
}

/// Records the child's exit once it is reaped.
pub(crate) async fn wait_exit(record: &Record, mut child: Child) {
    let exit = match child.wait().await {
        Ok(status) => ExitInfo::from_status(status),
        Err(e) => {
            tracing::error!(id = %record.id, error = %e, "cannot wait for the process");
            ExitInfo {
                code: -1,
                signal: 0,
                end_time: SystemTime::now(),
            }
        }
    };
    tracing::info!(id = %record.id, code = exit.code, signal = exit.signal, "exited");
    record.set_exit(exit);
}

/// Drains both pipes into the ring until both reach EOF.
async fn pump_output(
    record: Arc<Record>,
    mut stdout: tokio::process::ChildStdout,
    mut stderr: tokio::process::ChildStderr,
) {
    let mut out_buf = vec![0u8; MAX_OUTPUT_CHUNK];
    let mut err_buf = vec![0u8; MAX_OUTPUT_CHUNK];
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        tokio::select! {
            r = stdout.read(&mut out_buf), if out_open => match r {
                Ok(n) if n > 0 => record.push_output(Stream::Stdout, &out_buf[..n]),
                _ => out_open = false,
            },
            r = stderr.read(&mut err_buf), if err_open => match r {
                Ok(n) if n > 0 => record.push_output(Stream::Stderr, &err_buf[..n]),
                _ => err_open = false,
            },
        }
    }
}

/// A reader of one process's output; see [`Processes::attach`].
pub struct Attach {
    record: Arc<Record>,
    changes: watch::Receiver<()>,
    pos: u64,
    follow: bool,
    done: bool,
}

impl Attach {
    /// The next event; `None` when the stream ends.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if self.done {
                return None;
            }
            // Marked seen before looking, so a change after the look wakes the wait below.
            self.changes.borrow_and_update();
            {
                let state = self.record.lock();
                let ring = state
                    .ring
                    .as_ref()
                    .expect("background processes have a ring");
                match ring.read(self.pos, MAX_OUTPUT_CHUNK) {
                    Read::Dropped { to } => {
                        let from = std::mem::replace(&mut self.pos, to);
                        return Some(Event::Dropped { from, to });
                    }
                    Read::Data { stream, data } => {
                        let offset = self.pos;
                        self.pos += data.len() as u64;
                        return Some(Event::Output {
                            stream,
                            offset,
                            data,
                        });
                    }
                    Read::CaughtUp | Read::Beyond => {
                        if state.output_done {
                            self.done = true;
                            return state.exit.map(Event::Exit);
                        }
                        if !self.follow {
                            return None;
                        }
                    }
                }
            }
            if self.changes.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn true_spec() -> ProcessSpec {
        ProcessSpec {
            command: "true".into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            stdin: Bytes::new(),
            keep_stdin_open: false,
            output_buffer_bytes: 16,
        }
    }

    #[tokio::test]
    async fn past_the_record_limit_the_oldest_exited_are_forgotten() {
        let p = Processes::new(None);
        let mut sleeper = true_spec();
        sleeper.command = "sleep".into();
        sleeper.args = vec!["100".into()];
        // p-1 runs throughout: a running record is never forgotten.
        p.start(sleeper).unwrap();
        for _ in 0..MAX_PROCESS_RECORDS + 2 {
            let info = p.start(true_spec()).unwrap();
            p.wait(&info.id, Duration::from_secs(30)).await.unwrap();
        }
        let ids: Vec<_> = p.list().into_iter().map(|i| i.id).collect();
        assert_eq!(ids.len(), MAX_PROCESS_RECORDS);
        assert_eq!(ids[0], "p-1");
        assert_eq!(ids[1], "p-5", "p-2..=p-4 were the oldest exited");
        assert!(matches!(
            p.wait("p-2", Duration::from_secs(1)).await,
            Err(Error::UnknownProcess { .. })
        ));
        p.kill_all();
        p.wait("p-1", Duration::from_secs(30)).await.unwrap();
        assert!(matches!(p.start(true_spec()), Err(Error::ShuttingDown)));
    }
}
