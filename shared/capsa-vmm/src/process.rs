//! Child processes of a VM and what `/proc` says about them.
//!
//! A [`Supervised`] process runs in its own process group (so a kill reaches everything it
//! forked) and is owned by one task that awaits its exit: the exit is published on a watch
//! channel the moment it happens, and a kill request is carried out by the same task, before
//! the child is reaped, so a kill can never hit a recycled pid. Dropping the handle kills
//! the group; if the runtime itself goes away, tokio's `kill_on_drop` still kills the child.

use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::{ChildStdout, Command};
use tokio::sync::{mpsc, watch};

use crate::sandbox::Confinement;
use crate::{VmExit, VmmError};

/// A child process in its own process group, reaped by its supervising task.
pub(crate) struct Supervised {
    pid: u32,
    exit: watch::Receiver<Option<VmExit>>,
    kill: mpsc::UnboundedSender<()>,
}

impl Supervised {
    /// Spawns `cmd` in a new process group and starts supervising it. Returns the child's
    /// stdout when `cmd` piped it. `stderr_log`, when given, is read for the last line to
    /// describe the exit.
    ///
    /// With `die_with_parent` the kernel SIGKILLs the child when this process dies
    /// (`PR_SET_PDEATHSIG`), so even a SIGKILLed owner leaves no VMM behind. Without it the
    /// child survives its owner as an orphan, for [`crate::orphans::reap`] to find.
    pub fn spawn(
        mut cmd: Command,
        program: &str,
        stderr_log: Option<&Path>,
        die_with_parent: bool,
        confinement: Option<Confinement>,
    ) -> Result<(Supervised, Option<ChildStdout>), VmmError> {
        cmd.process_group(0).kill_on_drop(true);
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // calls (see `Confinement::apply`; prctl, getppid); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // First: the uid change inside clears the parent-death signal.
                if let Some(c) = &confinement {
                    c.apply()?;
                }
                if die_with_parent {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent may have died before prctl took effect.
                    if libc::getppid() as u32 != parent {
                        return Err(std::io::Error::other("parent exited during spawn"));
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
            program: program.to_owned(),
            source,
        })?;
        let pid = child.id().expect("a just-spawned child has a pid");
        let stdout = child.stdout.take();
        let (exit_tx, exit) = watch::channel(None);
        let (kill, mut kill_rx) = mpsc::unbounded_channel::<()>();
        let stderr_log = stderr_log.map(Path::to_owned);
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                // A request, or every handle dropped: either way the group goes.
                _ = kill_rx.recv() => {
                    kill_group(pid);
                    child.wait().await
                }
            };
            let _ = exit_tx.send(Some(describe(status, stderr_log.as_deref())));
        });
        Ok((Supervised { pid, exit, kill }, stdout))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit, if it happened.
    pub fn exit(&self) -> Option<VmExit> {
        self.exit.borrow().clone()
    }

    /// Resolves at the exit.
    pub async fn wait(&self) -> VmExit {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(exit) => exit.clone().expect("wait_for returned a Some"),
            // The supervisor was dropped with the runtime; its child was killed with it.
            Err(_) => VmExit {
                code: None,
                signal: None,
                description: "supervisor stopped".into(),
            },
        }
    }

    /// Sends SIGKILL to the process group (if still running) and waits for the exit.
    pub async fn kill_and_wait(&self) -> VmExit {
        let _ = self.kill.send(());
        self.wait().await
    }
}

fn kill_group(pgid: u32) {
    // SAFETY: kill(2) on a process group whose leader we have not reaped yet, so the id
    // cannot have been recycled.
    unsafe { libc::kill(-(pgid as i32), libc::SIGKILL) };
}

fn describe(status: std::io::Result<ExitStatus>, stderr_log: Option<&Path>) -> VmExit {
    use std::os::unix::process::ExitStatusExt as _;
    let (code, signal, mut description) = match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => (Some(c), None, format!("exited with code {c}")),
            (None, Some(sig)) => (None, Some(sig), format!("killed by signal {sig}")),
            (None, None) => (None, None, format!("ended: {s}")),
        },
        Err(e) => (None, None, format!("wait failed: {e}")),
    };
    if let Some(line) = stderr_log.and_then(last_line) {
        description.push_str(": ");
        description.push_str(&line);
    }
    VmExit {
        code,
        signal,
        description,
    }
}

/// The last non-empty line of a (small) log file, for error messages.
pub(crate) fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let tail = &text[text.len().saturating_sub(4096)..];
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
}

/// Waits until a Unix socket at `path` is listening (per `/proc/net/unix`), or `process`
/// exits, or `timeout` passes. We only look: a probing connection would be a client the
/// server did not expect.
pub(crate) async fn wait_listening(
    path: &Path,
    process: &Supervised,
    name: &'static str,
    timeout: Duration,
) -> Result<(), VmmError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(1);
    loop {
        if is_listening(path) {
            return Ok(());
        }
        if let Some(exit) = process.exit() {
            return Err(VmmError::StartupExit {
                process: name,
                detail: exit.description,
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(VmmError::Timeout(format!(
                "{name} listening on {}",
                path.display()
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(20));
    }
}

/// Whether `/proc/net/unix` lists a listening socket bound at `path`.
pub(crate) fn is_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    listening_in(&table, &want)
}

/// `/proc/net/unix` columns: Num RefCount Protocol Flags Type St Inode Path; a listening
/// socket has `__SO_ACCEPTCON` (0x10000) in Flags.
fn listening_in(table: &str, path: &str) -> bool {
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8
            && cols[7] == path
            && u32::from_str_radix(cols[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// utime + stime of the whole process (every thread, live and exited), from
/// `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> std::io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| {
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / hz)
        })
        .ok_or_else(|| std::io::Error::other("unparsable /proc/<pid>/stat"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let fields = stat_fields(stat)?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The process group of `pid`, from `/proc/<pid>/stat`; `None` if it is gone.
pub fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat)?.get(2)?.parse().ok()
}

/// The fields of a `/proc/<pid>/stat` line from field 3 (state) on. The command name
/// (field 2) may contain spaces and parentheses, so they start after the last ')': ppid
/// is at index 1, pgrp at 2, utime and stime at 11 and 12.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace().collect())
}

/// The value of a `Key:   1234 kB` line of a /proc file (meminfo, status, smaps_rollup),
/// in KiB.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `key` of `/proc/<pid>/<file>` in bytes.
fn proc_bytes(pid: u32, file: &str, key: &str) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))?;
    kib_field(&text, key)
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::other(format!("no {key} in /proc/<pid>/{file}")))
}

/// MemTotal of /proc/meminfo in MiB (0 if unreadable).
pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| kib_field(&m, "MemTotal"))
        .map_or(0, |kib| kib / 1024)
}

/// Resident set size in bytes (VmRSS of `/proc/<pid>/status`: anon + file + shmem, so the
/// touched part of the guest's memory counts, whatever backs it).
pub fn resident_bytes(pid: u32) -> std::io::Result<u64> {
    proc_bytes(pid, "status", "VmRSS")
}

/// A process's proportional set size: its resident memory with each page it shares
/// divided by the number of processes mapping it (KSM-merged pages included), so the
/// figures of processes sharing pages add up to what they hold together.
pub fn proportional_bytes(pid: u32) -> std::io::Result<u64> {
    proc_bytes(pid, "smaps_rollup", "Pss")
}

/// The argv of a process, from `/proc/<pid>/cmdline`.
pub(crate) fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Looks `name` up in `PATH`.
pub(crate) fn find_in_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 5 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn the_process_group_is_read_from_stat() {
        // SAFETY: getpgrp has no preconditions.
        let own = unsafe { libc::getpgrp() } as u32;
        assert_eq!(process_group(std::process::id()), Some(own));
        assert_eq!(process_group(u32::MAX), None);
    }

    #[test]
    fn proc_net_unix_listening_flag() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 1234 /tmp/a/api.sock\n\
            0000000000000000: 00000002 00000000 00000000 0001 03 1235 /tmp/a/other.sock\n";
        assert!(listening_in(table, "/tmp/a/api.sock"));
        assert!(!listening_in(table, "/tmp/a/other.sock"));
        assert!(!listening_in(table, "/tmp/a/missing.sock"));
    }

    #[test]
    fn a_proportional_size_is_at_most_the_resident_one() {
        let me = std::process::id();
        // Some of this process's pages (libc's) are mapped by others too.
        let (pss, rss) = (proportional_bytes(me).unwrap(), resident_bytes(me).unwrap());
        assert!(pss > 0 && pss <= rss, "pss {pss}, rss {rss}");
        assert!(proportional_bytes(u32::MAX).is_err());
    }

    #[tokio::test]
    async fn supervised_exit_is_seen_and_kill_reaches_the_group() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 100 & wait"]);
        let (p, _) = Supervised::spawn(cmd, "sh", None, true, None).unwrap();
        assert!(p.exit().is_none());
        assert!(cpu_time(p.pid()).is_ok());
        assert!(resident_bytes(p.pid()).unwrap() > 0);
        let exit = p.kill_and_wait().await;
        assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit:?}");
        // The backgrounded sleep was in the same group: it must go too (SIGKILL delivery to
        // it is asynchronous, hence the bounded wait).
        let group_alive = || {
            std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                    .is_some_and(|pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                            let rest = &s[s.rfind(')').unwrap() + 1..];
                            let f: Vec<&str> = rest.split_whitespace().collect();
                            f[0] != "Z" && f[2] == p.pid().to_string()
                        })
                    })
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while group_alive() {
            assert!(
                std::time::Instant::now() < deadline,
                "a process of the killed group survived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_natural_exit_carries_code_and_stderr_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("err.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'bad thing happened' >&2; exit 3"]);
        cmd.stderr(std::fs::File::create(&log).unwrap());
        let (p, _) = Supervised::spawn(cmd, "sh", Some(&log), false, None).unwrap();
        let exit = p.wait().await;
        assert_eq!(exit.code, Some(3));
        assert!(
            exit.description.contains("bad thing happened"),
            "{}",
            exit.description
        );
    }
}
