//! Terminals: a program (bash by default) on a real PTY, as the session leader with the PTY
//! as its controlling terminal, so the line discipline turns 0x03 into SIGINT for the
//! foreground job and a resize (TIOCSWINSZ) sends SIGWINCH.
//!
//! [`Terminal::run`] is one task per terminal that copies keystrokes to the master and
//! screen bytes from it. Input is written only as the master accepts it, and the next
//! request is read only once the previous one is written, so a program that does not read
//! slows the client instead of growing a buffer; output goes out through a bounded channel.
//! When the program exits the master is drained until EIO (at most
//! [`OUTPUT_GRACE`](crate::processes::OUTPUT_GRACE) if a background job keeps the PTY open),
//! then the exit is sent. When the client's request stream ends or the call is cancelled the
//! terminal hangs up as a real one does: the master is closed (the program's reads get EIO)
//! and its process group gets SIGHUP, then SIGKILL 2 s later. Closing the master matters: a
//! shell that takes SIGHUP just before it blocks in read() (bash's readline defers the
//! signal to its next read) would otherwise sleep until the SIGKILL.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::Error;
use crate::processes::{
    ExitInfo, Info, Kind, Launch, MAX_OUTPUT_CHUNK, OUTPUT_GRACE, Processes, Record,
};

/// Between SIGHUP and SIGKILL when the client hangs up.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub rows: u16,
    pub cols: u16,
}

/// A validated TerminalOpen.
#[derive(Debug, Clone)]
pub struct TerminalSpec {
    /// Empty means `bash -l`.
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub size: Size,
    /// The TERM variable.
    pub term: String,
}

/// What the client sends after the open.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Data(Bytes),
    Resize(Size),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Data(Bytes),
    Exit(ExitInfo),
}

pub struct Terminal {
    record: Arc<Record>,
    master: AsyncFd<OwnedFd>,
}

impl Processes {
    /// Starts the terminal's program on a new PTY.
    pub fn open_terminal(&self, spec: TerminalSpec) -> Result<(Info, Terminal), Error> {
        let io_err = |op: &'static str| {
            move |e: nix::Error| Error::Io {
                op,
                path: "/dev/ptmx".into(),
                source: e.into(),
            }
        };
        // Both ends close-on-exec from the start, so no program spawned meanwhile inherits
        // them (a stray slave fd would keep the master from ever reading EIO).
        let master = nix::pty::posix_openpt(
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        )
        .map_err(io_err("open"))?;
        nix::pty::grantpt(&master).map_err(io_err("grantpt"))?;
        nix::pty::unlockpt(&master).map_err(io_err("unlockpt"))?;
        let slave_path = nix::pty::ptsname_r(&master).map_err(io_err("ptsname"))?;
        // SAFETY: the fd is open and owned by `master`, which gives it up here.
        let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
        let slave = nix::fcntl::open(
            slave_path.as_str(),
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err("open the PTY slave"))?;
        set_size(&master, spec.size).map_err(|source| Error::Io {
            op: "resize",
            path: slave_path.clone(),
            source,
        })?;
        let (command, args) = if spec.command.is_empty() {
            let mut args = vec!["-l".to_string()];
            args.extend(spec.args);
            ("bash".to_string(), args)
        } else {
            (spec.command, spec.args)
        };
        let mut env = spec.env;
        env.insert("TERM".into(), spec.term);
        // SAFETY: an OwnedFd stays open and keeps its fd until the AsyncFd drops it.
        let master = unsafe { AsyncFd::register(master) }.map_err(|e| Error::Io {
            op: "register",
            path: "/dev/ptmx".into(),
            source: e.into(),
        })?;
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|source| Error::Io {
                op: "duplicate",
                path: slave_path.clone(),
                source,
            })
        };
        // The Command holds the slave until `launch` returns, then it is closed here: a
        // copy left in the agent would keep the master from reading EIO.
        let mut stdio = Some((dup(&slave)?, dup(&slave)?, slave));
        let (record, child) = self.launch(Launch {
            kind: Kind::Terminal,
            command: &command,
            args: &args,
            env: &env,
            cwd: spec.cwd.as_deref(),
            ring: None,
            configure: &mut |cmd| {
                if let Some((stdin, stdout, stderr)) = stdio.take() {
                    cmd.stdin(Stdio::from(stdin))
                        .stdout(Stdio::from(stdout))
                        .stderr(Stdio::from(stderr));
                }
            },
        })?;
        let info = record.info();
        tokio::spawn({
            let record = record.clone();
            async move { crate::processes::wait_exit(&record, child).await }
        });
        Ok((info, Terminal { record, master }))
    }
}

impl Terminal {
    /// Runs the terminal until its program has ended: keystrokes and resizes from `input`
    /// (its end, or an item that is an error, hangs up), screen bytes and the exit to
    /// `output` (an error from `input` goes there too, and ends it).
    pub async fn run(
        self,
        input: impl Stream<Item = Result<Input, Error>>,
        output: mpsc::Sender<Result<Output, Error>>,
    ) {
        let Terminal { record, master } = self;
        // None once hung up.
        let mut master = Some(master);
        let mut input = std::pin::pin!(input);
        let mut changes = record.subscribe();
        let mut buf = vec![0u8; MAX_OUTPUT_CHUNK];
        let mut pending: Option<(Bytes, usize)> = None;
        let mut input_open = true;
        let mut client_there = true;
        let mut output_open = true;
        let mut exit = record.exit();
        let mut drain_until = exit.map(|_| Instant::now() + OUTPUT_GRACE);
        let mut kill_at: Option<Instant> = None;
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        loop {
            if exit.is_some() && !output_open {
                break;
            }
            let mut hang_up = false;
            tokio::select! {
                item = input.next(), if input_open && pending.is_none() => match item {
                    Some(Ok(Input::Data(data))) => pending = Some((data, 0)),
                    Some(Ok(Input::Resize(size))) => {
                        let resized = master.as_ref().map(|m| set_size(m.get_ref(), size));
                        if let Some(Err(e)) = resized {
                            tracing::debug!(id = %record.id, error = %e, "resize failed");
                        }
                    }
                    Some(Err(e)) => {
                        let _ = output.send(Err(e)).await;
                        client_there = false;
                        hang_up = true;
                    }
                    None => hang_up = true,
                },
                ready = writable(master.as_ref()), if pending.is_some() => {
                    let (data, pos) = pending.as_mut().expect("checked by the guard");
                    let Ok(mut guard) = ready else {
                        pending = None;
                        continue;
                    };
                    match guard.try_io(|fd| Ok(nix::unistd::write(fd.get_ref(), &data[*pos..])?)) {
                        Ok(Ok(n)) => {
                            *pos += n;
                            if *pos == data.len() {
                                pending = None;
                            }
                        }
                        // The program is gone (EIO): its keystrokes go nowhere.
                        Ok(Err(_)) => pending = None,
                        Err(_would_block) => {}
                    }
                }
                read = read_master(master.as_ref(), &mut buf), if output_open => match read {
                    Ok(n) if n > 0 => {
                        let data = Bytes::copy_from_slice(&buf[..n]);
                        if client_there && output.send(Ok(Output::Data(data))).await.is_err() {
                            client_there = false;
                            hang_up = true;
                        }
                    }
                    // EIO: every slave fd is closed.
                    _ => output_open = false,
                },
                _ = changes.changed(), if exit.is_none() => {
                    exit = record.exit();
                    if exit.is_some() {
                        drain_until = Some(Instant::now() + OUTPUT_GRACE);
                    }
                }
                () = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() => {
                    tracing::debug!(id = %record.id, "the PTY is still open after the exit");
                    break;
                }
                () = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() && exit.is_none() => {
                    let _ = record.signal(Signal::SIGKILL);
                    kill_at = None;
                }
                _ = output.closed(), if client_there => {
                    client_there = false;
                    hang_up = true;
                }
            }
            if hang_up && input_open {
                input_open = false;
                pending = None;
                master = None;
                output_open = false;
                if record.signal(Signal::SIGHUP).is_ok() {
                    tracing::info!(id = %record.id, "hung up");
                    kill_at = Some(Instant::now() + HANGUP_GRACE);
                }
            }
        }
        if client_there && let Some(exit) = exit {
            let _ = output.send(Ok(Output::Exit(exit))).await;
        }
    }
}

/// Never ready once hung up.
async fn writable(
    master: Option<&AsyncFd<OwnedFd>>,
) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>> {
    match master {
        Some(master) => master.writable().await,
        None => std::future::pending().await,
    }
}

/// Never ready once hung up.
async fn read_master(master: Option<&AsyncFd<OwnedFd>>, buf: &mut [u8]) -> io::Result<usize> {
    let Some(master) = master else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = master.readable().await?;
        if let Ok(read) = guard.try_io(|fd| Ok(nix::unistd::read(fd.get_ref(), buf)?)) {
            return read;
        }
    }
}

fn set_size(fd: &OwnedFd, size: Size) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
