//! Persistent kernels: one Python and one shell interpreter per agent (that is, per
//! session), each started on first use (Python optionally at boot) and restarted after it
//! dies. Each kernel is an actor task that owns the process and takes jobs from a queue,
//! so executes on one kernel run one at a time in arrival order. Python and shell are
//! separate actors: an execute in one language never waits for the other.
//!
//! Session env (`Configure`) travels through the same queue, so it applies to every execute
//! queued after it and is never applied in the middle of a running one.
//!
//! Python is started at boot by default (`--prestart-python`): a cold interpreter costs
//! tens of milliseconds natively and far more under emulation, and most sessions run Python.
//! It starts at idle priority (nice 19), so the agent's own start and its first health
//! check, which make the VM ready, do not share the vCPU with it; the first job for the
//! kernel (an execute, the session's env) raises it to normal priority before any code of
//! the session runs. The shell starts on its first execute.
//!
//! Output written between executes (a background thread or process) waits in the pipe and
//! arrives with the next execute; a writer that fills the pipe blocks until then. Interrupts
//! go to the kernel's whole process group, which includes processes the code started in the
//! foreground and Python `subprocess.Popen` children; bash's `cmd &` jobs ignore SIGINT, and
//! a process meant to outlive interrupts should start its own session (`setsid`).

mod process;
mod python;
mod rich;
mod run;
mod shell;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::error::Error;
use process::{KernelProcess, Spawn};

// The driver protocol's parsers are public so the fuzz targets (`fuzz/`) can reach them.
pub use process::{LineBuffer, LineTooLong};
pub use run::{Done, DriverEvent};

/// Parses one line (without its newline) of `language`'s driver event pipe.
pub fn parse_event(language: Language, line: &[u8]) -> Result<DriverEvent, String> {
    match language {
        Language::Python => python::parse_event(line),
        Language::Shell => shell::parse_event(line),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Python,
    Shell,
}

impl Language {
    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Shell => "shell",
        }
    }

    /// Whether the kernel's driver reports the CPU time of each execute itself; for the
    /// others the agent reads the kernel's from /proc before and after.
    pub fn driver_measures_cpu(self) -> bool {
        match self {
            Language::Python => true,
            Language::Shell => false,
        }
    }
}

/// A validated execute.
#[derive(Debug, Clone)]
pub struct ExecuteRequest {
    pub language: Language,
    pub code: String,
    pub timeout: Duration,
    /// For this call only.
    pub env: BTreeMap<String, String>,
    /// For this call only; absolute.
    pub cwd: Option<String>,
    pub max_output_bytes: u64,
}

/// One event of an execute, in the order the kernel produced it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Stdout(Bytes),
    Stderr(Bytes),
    Display(HashMap<String, Bytes>),
    Result(HashMap<String, Bytes>),
    Error {
        name: String,
        value: String,
        traceback: Vec<String>,
    },
    Completion(Completion),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Error,
    Timeout,
    Interrupted,
    KernelDied,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub status: Status,
    pub exit_code: i32,
    pub wall_time: Duration,
    pub cpu_time: Duration,
    pub interpreter_time: Duration,
    pub state_lost: bool,
    pub output_truncated: bool,
    pub output_bytes: u64,
    pub message: String,
}

/// The receiving end of an execute: events, or an infrastructure error that ends it.
pub type EventSender = mpsc::Sender<Result<Event, Error>>;

/// Where kernels come from.
#[derive(Debug, Clone)]
pub struct KernelSettings {
    pub python: PathBuf,
    pub shell: PathBuf,
    pub workdir: Option<PathBuf>,
    /// Private directory for the shell kernel's code files.
    pub scratch: PathBuf,
    pub interrupt_grace: Duration,
}

enum Job {
    Execute {
        req: ExecuteRequest,
        events: EventSender,
        cancel: CancellationToken,
        /// Made in the caller's context, so the execute joins the request's trace.
        span: tracing::Span,
    },
    Configure(BTreeMap<String, String>),
    Start,
}

/// Handles to both kernel actors.
pub struct Kernels {
    python: mpsc::Sender<Job>,
    shell: mpsc::Sender<Job>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Kernels {
    /// Starts both actors; they stop (killing their kernels) once `stop` is cancelled
    /// and the job in hand is done.
    pub fn start(
        settings: KernelSettings,
        prestart_python: bool,
        stop: CancellationToken,
    ) -> Kernels {
        let settings = Arc::new(settings);
        let (python, py_rx) = mpsc::channel(64);
        let (shell, sh_rx) = mpsc::channel(64);
        let tasks = vec![
            tokio::spawn(Actor::new(Language::Python, settings.clone()).run(py_rx, stop.clone())),
            tokio::spawn(Actor::new(Language::Shell, settings).run(sh_rx, stop)),
        ];
        if prestart_python {
            // The queue is empty and open: this cannot fail.
            let _ = python.try_send(Job::Start);
        }
        Kernels {
            python,
            shell,
            tasks: std::sync::Mutex::new(tasks),
        }
    }

    /// Queues an execute; its events go to `events`. Cancelling `cancel` (the client went
    /// away) interrupts it, or skips it if it has not started.
    pub async fn execute(
        &self,
        req: ExecuteRequest,
        events: EventSender,
        cancel: CancellationToken,
    ) -> Result<(), Error> {
        let language = req.language;
        let span = tracing::info_span!(
            "execute",
            language = language.name(),
            code_bytes = req.code.len(),
            seq = tracing::field::Empty,
        );
        self.queue(language)
            .send(Job::Execute {
                req,
                events,
                cancel,
                span,
            })
            .await
            .map_err(|_| Error::KernelGone {
                language: language.name(),
            })
    }

    /// Sets session env variables in both kernels (running ones in place).
    pub async fn configure(&self, env: BTreeMap<String, String>) -> Result<(), Error> {
        for language in [Language::Python, Language::Shell] {
            self.queue(language)
                .send(Job::Configure(env.clone()))
                .await
                .map_err(|_| Error::KernelGone {
                    language: language.name(),
                })?;
        }
        Ok(())
    }

    fn queue(&self, language: Language) -> &mpsc::Sender<Job> {
        match language {
            Language::Python => &self.python,
            Language::Shell => &self.shell,
        }
    }

    /// Waits, at most `timeout`, for the actors to stop after the stop token was cancelled.
    pub async fn wait_stopped(&self, timeout: Duration) {
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("not poisoned"));
        if tokio::time::timeout(timeout, futures::future::join_all(tasks))
            .await
            .is_err()
        {
            tracing::warn!("kernels did not stop in time");
        }
    }
}

/// Owns one kernel process and runs its jobs in order.
struct Actor {
    language: Language,
    settings: Arc<KernelSettings>,
    session_env: BTreeMap<String, String>,
    /// Shell only: session env set since the last execute, exported before the next one.
    pending_env: BTreeMap<String, String>,
    process: Option<KernelProcess>,
    /// The last kernel died or was killed: the next execute starts on a fresh one.
    lost_state: bool,
    seq: u64,
}

impl Actor {
    fn new(language: Language, settings: Arc<KernelSettings>) -> Actor {
        Actor {
            language,
            settings,
            session_env: BTreeMap::new(),
            pending_env: BTreeMap::new(),
            process: None,
            lost_state: false,
            seq: 0,
        }
    }

    async fn run(mut self, mut jobs: mpsc::Receiver<Job>, stop: CancellationToken) {
        loop {
            let job = tokio::select! {
                job = jobs.recv() => match job { Some(job) => job, None => break },
                _ = stop.cancelled() => break,
            };
            match job {
                Job::Start => {
                    if let Err(e) = self.prestart().await {
                        tracing::warn!(language = self.language.name(), error = %capsa_grpc::error::chain(&e), "kernel pre-start failed");
                    }
                }
                Job::Configure(env) => self.configure(env).await,
                Job::Execute {
                    req,
                    events,
                    cancel,
                    span,
                } => {
                    if cancel.is_cancelled() {
                        continue; // the client left while it was queued
                    }
                    self.seq += 1;
                    span.record("seq", self.seq);
                    self.execute(req, events, cancel).instrument(span).await;
                }
            }
        }
        // Dropping the process kills its group.
        self.process = None;
    }

    /// Forgets a kernel that died while idle; the next execute reports the state as lost.
    fn reap_if_dead(&mut self) {
        if let Some(status) = self.process.as_mut().and_then(|p| p.exited()) {
            tracing::warn!(language = self.language.name(), %status, "kernel died while idle");
            self.process = None;
            self.lost_state = true;
        }
    }

    /// Starts the kernel if none runs; `idle_priority` as in [`Spawn`].
    fn ensure_started(&mut self, idle_priority: bool) -> Result<(), Error> {
        let Some(spawn) = self.spawn_spec(idle_priority) else {
            return Ok(());
        };
        let p = KernelProcess::spawn(spawn).map_err(|source| self.start_error(source))?;
        self.started(p);
        Ok(())
    }

    /// Starts the kernel ahead of its first job. At idle priority where the agent can raise
    /// it again (root: in a VM), and then spawned by [`low_priority_spawner`] too: under
    /// emulation the guest has one slow vCPU, and the fork and exec (about 0.1 s of it)
    /// held the runtime's only worker while the agent was answering its first health check.
    /// The first job for the kernel raises its priority.
    async fn prestart(&mut self) -> Result<(), Error> {
        let idle_priority = nix::unistd::geteuid().is_root();
        let Some(spawn) = self.spawn_spec(idle_priority) else {
            return Ok(());
        };
        let spawned = if idle_priority {
            spawn_at_low_priority(spawn).await
        } else {
            KernelProcess::spawn(spawn)
        };
        let p = spawned.map_err(|source| self.start_error(source))?;
        self.started(p);
        Ok(())
    }

    /// What to spawn, or `None` if a kernel runs (one that died while idle is forgotten).
    fn spawn_spec(&mut self, idle_priority: bool) -> Option<Spawn> {
        self.reap_if_dead();
        if self.process.is_some() {
            return None;
        }
        let mut env = self.session_env.clone();
        let (program, args) = match self.language {
            Language::Python => {
                // Figures render off-screen; the driver saves them as PNG.
                env.entry("MPLBACKEND".into())
                    .or_insert_with(|| "Agg".into());
                (self.settings.python.clone(), python::args())
            }
            Language::Shell => (self.settings.shell.clone(), shell::args()),
        };
        Some(Spawn {
            program,
            args,
            env,
            workdir: self.settings.workdir.clone(),
            idle_priority,
        })
    }

    fn start_error(&self, source: std::io::Error) -> Error {
        Error::KernelStart {
            language: self.language.name(),
            source,
        }
    }

    fn started(&mut self, p: KernelProcess) {
        tracing::info!(
            language = self.language.name(),
            pid = p.pid(),
            "kernel started"
        );
        // A new shell already has the whole session env.
        self.pending_env.clear();
        self.process = Some(p);
    }

    async fn configure(&mut self, env: BTreeMap<String, String>) {
        self.session_env.extend(env.clone());
        match self.language {
            Language::Python => {
                if let Some(p) = &mut self.process {
                    // A session's env: the VM is in use.
                    p.raise_priority();
                    if let Err(e) = p.send(&python::env_request(&env)).await {
                        // The kernel is dying; its successor starts with the full env.
                        tracing::warn!(error = %e, "cannot update the python kernel's env");
                    }
                }
            }
            Language::Shell => {
                if self.process.is_some() {
                    self.pending_env.extend(env);
                }
            }
        }
    }

    async fn execute(
        &mut self,
        req: ExecuteRequest,
        events: EventSender,
        cancel: CancellationToken,
    ) {
        if let Err(e) = self.ensure_started(false) {
            let _ = events.send(Err(e)).await;
            return;
        }
        let state_lost = std::mem::take(&mut self.lost_state);
        let pending_env = std::mem::take(&mut self.pending_env);
        let prepared = match self.language {
            Language::Python => Ok(run::Prepared {
                line: python::exec_request(&req),
                files: Vec::new(),
            }),
            Language::Shell => shell::prepare(&req, &pending_env, &self.settings.scratch, self.seq),
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(source) => {
                let path = self.settings.scratch.display().to_string();
                let _ = events
                    .send(Err(Error::Io {
                        op: "write code file",
                        path,
                        source,
                    }))
                    .await;
                return;
            }
        };
        let ctx = run::Context {
            language: self.language,
            grace: self.settings.interrupt_grace,
            events: &events,
            cancel: &cancel,
            state_lost,
        };
        let process = self.process.as_mut().expect("started above");
        process.raise_priority();
        let outcome = run::run(process, &req, prepared, ctx).await;
        if outcome.kernel_gone {
            self.process = None;
            self.lost_state = true;
        }
    }
}

type SpawnJob = (
    tokio::runtime::Handle,
    Spawn,
    tokio::sync::oneshot::Sender<std::io::Result<KernelProcess>>,
);

/// Spawns `spawn` from [`low_priority_spawner`]'s thread.
async fn spawn_at_low_priority(spawn: Spawn) -> std::io::Result<KernelProcess> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = (tokio::runtime::Handle::current(), spawn, tx);
    let answer = match low_priority_spawner().send(job) {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    answer.unwrap_or_else(|| Err(std::io::Error::other("the kernel spawner thread died")))
}

/// One thread, for the agent's lifetime, at the lowest priority, that spawns pre-started
/// kernels. For the agent's lifetime because a kernel's parent-death signal
/// (`PR_SET_PDEATHSIG`) follows the thread that forked it, not the process.
fn low_priority_spawner() -> &'static std::sync::mpsc::Sender<SpawnJob> {
    static SPAWNER: std::sync::OnceLock<std::sync::mpsc::Sender<SpawnJob>> =
        std::sync::OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        let spawned = std::thread::Builder::new()
            .name("kernel-spawner".into())
            .spawn(move || {
                // Only this thread: Linux keeps a nice value per thread.
                // SAFETY: setpriority has no memory effects.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, process::IDLE_NICE) };
                for (runtime, spawn, answer) in rx {
                    // The child's pipes and reaper belong to the caller's runtime.
                    let _runtime = runtime.enter();
                    let _ = answer.send(KernelProcess::spawn(spawn));
                }
            });
        if let Err(e) = spawned {
            // The receiver is dropped with the closure: every send fails, and says so.
            tracing::warn!(error = %e, "cannot start the kernel spawner thread");
        }
        tx
    })
}
