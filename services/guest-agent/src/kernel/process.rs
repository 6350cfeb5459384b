//! A kernel process and its pipes. Every kernel is a child in its own process group with
//!
//! - fd 0 `/dev/null` (user code that reads stdin gets EOF instead of our control stream),
//! - fd 1 and 2 pipes the agent reads as raw byte chunks,
//! - fd 3 the request pipe (agent → driver) and fd 4 the event pipe (driver → agent),
//!   one message per line; the protocols are described in `driver.py` and `driver.sh`.
//!
//! The child gets `PR_SET_PDEATHSIG(SIGKILL)` so a kernel never outlives an agent that was
//! killed, and dropping a [`KernelProcess`] kills its whole group.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};

use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::pipe;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

/// Output is read in chunks of at most this many bytes, never by lines. Large chunks matter
/// most where the guest is slow (software emulation): every chunk costs a wakeup, a read
/// and one message through each hop, whatever its size.
pub const CHUNK: usize = 256 * 1024;

/// The kernel's stdout and stderr pipes hold this much (Linux' default is 64 KiB), so a
/// writer can get a whole chunk ahead while the agent sends the previous one.
const PIPE_SIZE: libc::c_int = 1024 * 1024;

/// An event line longer than this is a protocol violation (a PNG of a huge figure still fits).
const MAX_EVENT_LINE: usize = 64 * 1024 * 1024;

/// What to start.
pub struct Spawn {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    /// Start at the lowest CPU priority (nice 19) until [`KernelProcess::raise_priority`]:
    /// a kernel started ahead of use then takes only CPU time nothing else wants.
    pub idle_priority: bool,
}

/// The nice value of a kernel started at idle priority.
pub(super) const IDLE_NICE: libc::c_int = 19;

pub struct KernelProcess {
    pub child: Child,
    pub pgid: Pid,
    pub stdout: ChildStdout,
    pub stderr: ChildStderr,
    /// Read buffers for stdout and stderr, allocated once per kernel: a fresh pair per
    /// execute cost milliseconds of page faults under software emulation.
    pub out_buf: Box<[u8]>,
    pub err_buf: Box<[u8]>,
    pub requests: pipe::Sender,
    pub events: LineReader,
    /// Still at idle priority (see [`Spawn::idle_priority`]).
    idle_priority: bool,
}

impl KernelProcess {
    pub fn spawn(spec: Spawn) -> io::Result<KernelProcess> {
        let (req_r, req_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (evt_r, evt_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &spec.workdir {
            cmd.current_dir(dir);
        }
        let (req_fd, evt_fd) = (req_r.as_raw_fd(), evt_w.as_raw_fd());
        let idle_priority = spec.idle_priority;
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (fcntl, dup2, prctl, setpriority) on fds that are open in the child.
        unsafe {
            cmd.pre_exec(move || {
                // Lowering one's own priority is always allowed.
                if idle_priority && libc::setpriority(libc::PRIO_PROCESS, 0, IDLE_NICE) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Move both ends above 4 first: a source fd that is already 3 or 4 would
                // otherwise be clobbered by the other dup2, or keep its CLOEXEC flag.
                let a = libc::fcntl(req_fd, libc::F_DUPFD_CLOEXEC, 10);
                let b = libc::fcntl(evt_fd, libc::F_DUPFD_CLOEXEC, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        drop((req_r, evt_w));
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("kernel exited at once"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        for fd in [stdout.as_raw_fd(), stderr.as_raw_fd()] {
            // SAFETY: fcntl on a pipe fd this process owns. Failure (a lower
            // /proc/sys/fs/pipe-max-size) only costs speed, so it is ignored.
            unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_SIZE) };
        }
        Ok(KernelProcess {
            pgid: Pid::from_raw(pid as i32),
            stdout,
            stderr,
            out_buf: vec![0u8; CHUNK].into_boxed_slice(),
            err_buf: vec![0u8; CHUNK].into_boxed_slice(),
            child,
            requests: pipe::Sender::from_owned_fd(req_w)?,
            events: LineReader::new(pipe::Receiver::from_owned_fd(evt_r)?),
            idle_priority,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pgid.as_raw()
    }

    /// Back to normal priority (nice 0) for a kernel started at idle priority, before it
    /// runs anything of the session's, so the code and what it starts run at full speed.
    /// Every thread of the kernel: Linux keeps a nice value per thread. Raising priority
    /// needs CAP_SYS_NICE (the agent is root in its VM); without it the kernel stays slow
    /// but correct, and a warning says so.
    pub fn raise_priority(&mut self) {
        if !std::mem::take(&mut self.idle_priority) {
            return;
        }
        let tasks = format!("/proc/{}/task", self.pid());
        let tids = std::fs::read_dir(&tasks).into_iter().flatten().flatten();
        for tid in tids.filter_map(|t| t.file_name().to_str()?.parse::<libc::id_t>().ok()) {
            // SAFETY: setpriority on a thread id; no memory is passed.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 0) } < 0 {
                let error = io::Error::last_os_error();
                tracing::warn!(pid = self.pid(), tid, %error, "kernel left at idle priority");
            }
        }
    }

    /// Signals the kernel's whole process group (the code and anything it started in
    /// the foreground).
    pub fn signal_group(&self, signal: Signal) {
        if let Err(e) = killpg(self.pgid, signal) {
            tracing::debug!(pgid = self.pgid.as_raw(), %signal, error = %e, "killpg failed");
        }
    }

    pub async fn send(&mut self, line: &[u8]) -> io::Result<()> {
        self.requests.write_all(line).await
    }

    /// The exit status if the kernel is gone.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for KernelProcess {
    fn drop(&mut self) {
        // A kernel that died by itself leaves its background jobs alone (they are the
        // session's); one that is dropped alive goes with its whole group.
        if self.exited().is_none() {
            self.signal_group(Signal::SIGKILL);
        }
    }
}

/// Reads what is already in a non-blocking pipe right now, without waiting: at most
/// `limit` bytes, in chunks of `buf`'s size. Used after the driver reports an event, so the
/// output written before it is sent first. A raw read is used because the reactor's
/// readiness may not have caught up with data that is already there.
pub fn read_ready(fd: BorrowedFd<'_>, buf: &mut [u8], limit: usize, mut each: impl FnMut(&[u8])) {
    let mut total = 0;
    while total < limit {
        match nix::unistd::read(fd, buf) {
            Ok(0) => return,
            Ok(n) => {
                total += n;
                each(&buf[..n]);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return, // EAGAIN: drained
        }
    }
}

/// Splits the event pipe into lines, with a bound on line length.
pub struct LineReader {
    rx: pipe::Receiver,
    lines: LineBuffer,
}

impl LineReader {
    fn new(rx: pipe::Receiver) -> LineReader {
        LineReader {
            rx,
            lines: LineBuffer::new(MAX_EVENT_LINE),
        }
    }

    /// The next line without its newline; `None` at EOF. Cancel-safe: partial lines stay
    /// in the buffer.
    pub async fn next_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(line) = self
                .lines
                .next_line()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            {
                return Ok(Some(line));
            }
            let mut chunk = [0u8; 8192];
            let n = self.rx.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.lines.extend(&chunk[..n]);
        }
    }
}

/// A driver event line over the limit: the driver broke the protocol.
#[derive(Debug, thiserror::Error)]
#[error("event line over {0} bytes")]
pub struct LineTooLong(pub usize);

/// The event pipe's framing without the I/O: bytes in, newline-terminated lines out, none
/// longer than a bound, so a driver that never ends a line cannot make the agent buffer
/// without end. Public (re-exported by [`super`]) so the fuzz targets in `fuzz/` reach it.
pub struct LineBuffer {
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline. Kept across calls so a long line that
    /// arrives in many reads (each read may cancel and restart `next_line`) is scanned once.
    scanned: usize,
    max: usize,
}

impl LineBuffer {
    /// Lines of at most `max` bytes, newline not counted.
    pub fn new(max: usize) -> LineBuffer {
        LineBuffer {
            buf: Vec::new(),
            scanned: 0,
            max,
        }
    }

    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole line without its newline; `None` until one has arrived. A line over
    /// the bound, whole or still arriving, is an error and leaves the buffer unusable.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, LineTooLong> {
        match self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let end = self.scanned + i;
                if end > self.max {
                    return Err(LineTooLong(self.max));
                }
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                Ok(Some(line))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max {
                    return Err(LineTooLong(self.max));
                }
                Ok(None)
            }
        }
    }

    /// Bytes held: the start of a line still arriving, and whole lines not taken yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// CPU time (user + system, self + waited-for children) of `pid` from /proc, for kernels
/// whose driver does not measure it itself.
pub fn proc_cpu_time(pid: i32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // utime, stime, cutime, cstime are fields 14..=17 of the whole line.
    let ticks: u64 = stat_fields(&stat)?
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()? as u64;
    Some(std::time::Duration::from_nanos(
        ticks * 1_000_000_000 / hz.max(1),
    ))
}

/// The fields of `/proc/<pid>/stat` after the command name (which may itself contain
/// spaces and parentheses): index 0 is the line's field 3, the state.
fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat.get(stat.rfind(')')? + 2..)?.split_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of thread `tid` (field 19 of its stat line).
    fn nice_of(tid: i32) -> i64 {
        let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).unwrap();
        stat_fields(&stat)
            .unwrap()
            .nth(16)
            .unwrap()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn an_idle_priority_kernel_runs_at_nice_19_until_raised() {
        let spawn = |idle_priority| Spawn {
            program: "sleep".into(),
            args: vec!["60".into()],
            env: BTreeMap::new(),
            workdir: None,
            idle_priority,
        };
        let mut idle = KernelProcess::spawn(spawn(true)).unwrap();
        assert_eq!(nice_of(idle.pid()), 19);
        idle.raise_priority();
        // Raising needs CAP_SYS_NICE: the agent has it as root in its VM.
        let expected = if nix::unistd::geteuid().is_root() {
            0
        } else {
            19
        };
        assert_eq!(nice_of(idle.pid()), expected);
        let normal = KernelProcess::spawn(spawn(false)).unwrap();
        assert_eq!(nice_of(normal.pid()), 0);
    }

    #[tokio::test]
    async fn lines_are_split_across_reads_and_eof_is_reported() {
        let (tx, rx) = pipe::pipe().unwrap();
        let mut reader = LineReader::new(rx);
        let mut tx = tx;
        tx.write_all(b"one\ntw").await.unwrap();
        assert_eq!(reader.next_line().await.unwrap().unwrap(), b"one");
        tx.write_all(b"o\n").await.unwrap();
        assert_eq!(reader.next_line().await.unwrap().unwrap(), b"two");
        drop(tx);
        assert!(reader.next_line().await.unwrap().is_none());
    }

    #[test]
    fn lines_over_the_bound_are_an_error_whole_or_arriving() {
        let mut lines = LineBuffer::new(4);
        lines.extend(b"abcd\nab");
        assert_eq!(lines.next_line().unwrap().unwrap(), b"abcd");
        assert!(lines.next_line().unwrap().is_none());
        lines.extend(b"c");
        assert!(lines.next_line().unwrap().is_none());
        lines.extend(b"de");
        assert!(lines.next_line().is_err(), "5 bytes and no newline yet");
        let mut lines = LineBuffer::new(4);
        lines.extend(b"abcde\n");
        assert!(lines.next_line().is_err(), "5 bytes with their newline");
        // Held bytes stay within the bound plus one read.
        let mut lines = LineBuffer::new(MAX_EVENT_LINE);
        for _ in 0..(MAX_EVENT_LINE / (1 << 20)) {
            lines.extend(&[b'x'; 1 << 20]);
            assert!(lines.next_line().unwrap().is_none());
        }
        lines.extend(b"x");
        assert!(lines.next_line().is_err());
        assert_eq!(lines.buffered(), MAX_EVENT_LINE + 1);
    }

    #[test]
    fn our_own_cpu_time_is_readable() {
        assert!(proc_cpu_time(std::process::id() as i32).is_some());
    }
}
