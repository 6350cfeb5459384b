//! Reaping what a previous owner of a state dir left behind.
//!
//! A vm-pool that crashed (or was SIGKILLed) leaves its VMMs running: they are in their own
//! process groups, so nothing kills them with it. On start-up the new owner calls [`reap`]
//! on `<state_dir>/vms`: every process named in a pid file there, and every VMM process
//! whose command line points into that directory, is killed,
//! but only after `/proc/<pid>/cmdline` confirms it really is one of ours (a pid file may
//! be stale and its pid reused by an unrelated process). Then the VMs' cgroups (named in each
//! VM dir's `cgroup` file) and the VM dirs are removed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cgroup::VmCgroup;
use crate::process::cmdline;
use crate::{VmmError, layout};

/// Program names that may be killed (argv\[0\]'s file name must contain one of them).
const OUR_PROGRAMS: [&str; 2] = ["qemu-system", "cloud-hypervisor"];
/// How long a killed process may take to disappear.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`reap`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// Processes killed.
    pub killed: Vec<u32>,
    /// VM directories removed.
    pub removed_dirs: Vec<PathBuf>,
    /// VM cgroups removed.
    pub removed_cgroups: Vec<PathBuf>,
}

/// Kills every leftover VMM of the VM dirs under `vms_dir` and removes the dirs.
pub async fn reap(vms_dir: &Path) -> Result<Reaped, VmmError> {
    let mut reaped = Reaped::default();
    let entries = match std::fs::read_dir(vms_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(reaped),
        Err(e) => return Err(VmmError::io("read state dir", vms_dir, e)),
    };
    let dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();

    let mut candidates = BTreeSet::new();
    for dir in &dirs {
        if let Some(pid) = std::fs::read_to_string(dir.join(layout::VMM_PID))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            candidates.insert(pid);
        }
    }
    // A crash between spawning and writing the pid file leaves no pid file: look too.
    candidates.extend(all_pids());
    for pid in candidates {
        if pid != std::process::id() && is_ours(pid, vms_dir) {
            tracing::warn!(pid, "killing orphaned vmm process");
            // SAFETY: kill(2) on a pid just verified to be one of our VMM processes.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            reaped.killed.push(pid);
        }
    }
    for &pid in &reaped.killed {
        wait_gone(pid).await;
    }
    for dir in dirs {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Ok(text) = std::fs::read_to_string(dir.join(layout::CGROUP)) {
            let cg = VmCgroup::from_file(&text, name);
            match cg.remove().await {
                Ok(()) => reaped.removed_cgroups.extend(cg.dirs),
                Err(e) => {
                    // Kept, with the file naming the cgroup, for the next reap.
                    tracing::warn!(error = %e, "cannot remove an orphaned vm cgroup");
                    continue;
                }
            }
        }
        crate::instance::remove_dir(&dir).await?;
        reaped.removed_dirs.push(dir);
    }
    Ok(reaped)
}

/// Whether `pid` runs one of our programs with an argument pointing into `vms_dir`.
fn is_ours(pid: u32, vms_dir: &Path) -> bool {
    let Some(argv) = cmdline(pid) else {
        return false;
    };
    matches_ours(&argv, vms_dir)
}

fn matches_ours(argv: &[String], vms_dir: &Path) -> bool {
    let Some(program) = argv.first() else {
        return false;
    };
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let prefix = format!("{}/", vms_dir.display());
    OUR_PROGRAMS.iter().any(|p| name.contains(p))
        && argv.iter().skip(1).any(|a| a.contains(&prefix))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `pid` is gone or a zombie (its parent, not us, reaps it).
async fn wait_gone(pid: u32) {
    let deadline = tokio::time::Instant::now() + EXIT_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    tracing::error!(pid, "orphaned vmm process did not exit after SIGKILL");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_programs_pointing_into_the_state_dir_match() {
        let vms = Path::new("/var/lib/capsa/vms");
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(matches_ours(
            &argv(&[
                "/usr/bin/qemu-system-x86_64",
                "-qmp",
                "unix:/var/lib/capsa/vms/vm-1/qmp.sock"
            ]),
            vms
        ));
        assert!(matches_ours(
            &argv(&[
                "cloud-hypervisor",
                "--api-socket",
                "path=/var/lib/capsa/vms/vm-1/api.sock"
            ]),
            vms
        ));
        // Someone reading a console log is not a VMM.
        assert!(!matches_ours(
            &argv(&["tail", "-f", "/var/lib/capsa/vms/vm-1/console.log"]),
            vms
        ));
        // Another pool's VMM (another state dir) is not ours.
        assert!(!matches_ours(
            &argv(&[
                "qemu-system-x86_64",
                "-qmp",
                "unix:/var/lib/capsa/vms2/vm-1/qmp.sock"
            ]),
            vms
        ));
        assert!(!matches_ours(&[], vms));
    }

    #[tokio::test]
    async fn stale_pid_files_never_kill_strangers_and_dirs_go() {
        let root = tempfile::tempdir().unwrap();
        let vms = root.path().join("vms");
        let vm = vms.join("vm-1");
        std::fs::create_dir_all(&vm).unwrap();
        // A stranger's pid in the pid file (a recycled pid): must survive.
        let mut stranger = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        std::fs::write(vm.join(layout::VMM_PID), format!("{}\n", stranger.id())).unwrap();
        let reaped = reap(&vms).await.unwrap();
        assert!(reaped.killed.is_empty(), "{reaped:?}");
        assert_eq!(reaped.removed_dirs, vec![vm.clone()]);
        assert!(!vm.exists());
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "a stranger was killed"
        );
        stranger.kill().unwrap();
        stranger.wait().unwrap();
    }

    #[tokio::test]
    async fn a_leftover_vmm_is_killed() {
        let root = tempfile::tempdir().unwrap();
        let vms = root.path().join("vms");
        let vm = vms.join("vm-2");
        std::fs::create_dir_all(&vm).unwrap();
        // A process whose argv[0] says it is QEMU and which points into the dir.
        let qmp_arg = format!("unix:{}/qmp.sock", vm.display());
        let mut leftover = std::process::Command::new("bash")
            .args([
                "-c",
                "exec -a qemu-system-x86_64 perl -e 'sleep 100' \"$0\"",
                &qmp_arg,
            ])
            .spawn()
            .unwrap();
        let pid = leftover.id();
        // Wait for the exec to have happened (argv[0] renamed), or the check cannot match.
        for _ in 0..500 {
            if cmdline(pid).is_some_and(|a| a.first().is_some_and(|a0| a0 == "qemu-system-x86_64"))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let reaped = reap(&vms).await.unwrap();
        assert_eq!(reaped.killed, vec![pid]);
        let status = leftover.wait().unwrap();
        assert!(!status.success());
        assert!(!vm.exists());
    }
}
