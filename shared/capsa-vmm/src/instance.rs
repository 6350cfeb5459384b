//! What every engine's running VM has in common: its directory, the VMM process, the
//! console, process-level counters from `/proc`, and destruction.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tokio::process::Command;

use crate::cgroup::VmCgroup;
use crate::console::Console;
use crate::process::{self, Supervised};
use crate::{EngineKind, VmCounters, VmExit, VmSpec, VmmError, layout};

/// The [`crate::VirtualMachine`] methods every engine answers from its `instance` field
/// alone; used inside each engine's `impl VirtualMachine`.
macro_rules! delegate_to_instance {
    () => {
        fn id(&self) -> &str {
            &self.instance.id
        }
        fn engine(&self) -> EngineKind {
            self.instance.engine
        }
        fn vmm_pid(&self) -> u32 {
            self.instance.vmm.pid()
        }
        fn pids(&self) -> Vec<u32> {
            self.instance.pids()
        }
        fn dir(&self) -> &Path {
            &self.instance.dir
        }
        fn wait(&self) -> BoxFuture<'_, VmExit> {
            self.instance.wait().boxed()
        }
        fn exit(&self) -> Option<VmExit> {
            self.instance.exit()
        }
        fn wait_for_console<'a>(&'a self, marker: &'a str) -> BoxFuture<'a, Result<(), VmmError>> {
            self.instance.console.wait_for(marker).boxed()
        }
    };
}
pub(crate) use delegate_to_instance;

pub(crate) struct Instance {
    pub id: String,
    pub dir: PathBuf,
    pub engine: EngineKind,
    pub vmm: Supervised,
    pub console: Console,
    /// The VM's cgroup, when its processes are confined.
    pub cgroup: Option<VmCgroup>,
    /// The VM's tap, whose counters are its network bytes.
    tap: Option<String>,
    /// Held while destroying; `true` once done, so destroy is idempotent.
    destroyed: tokio::sync::Mutex<bool>,
}

impl Instance {
    pub fn new(
        spec: &VmSpec,
        engine: EngineKind,
        vmm: Supervised,
        console: Console,
        cgroup: Option<VmCgroup>,
    ) -> Instance {
        Instance {
            id: spec.id.clone(),
            dir: spec.dir.clone(),
            engine,
            vmm,
            console,
            cgroup,
            tap: spec.net.as_ref().map(|n| n.tap.clone()),
            destroyed: tokio::sync::Mutex::new(false),
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        vec![self.vmm.pid()]
    }

    pub async fn wait(&self) -> VmExit {
        self.vmm.wait().await
    }

    pub fn exit(&self) -> Option<VmExit> {
        self.vmm.exit()
    }

    /// cpu time and resident memory of the VMM process, and the tap's bytes; disk left at
    /// zero for the engine to fill in.
    pub fn process_counters(&self) -> Result<VmCounters, VmmError> {
        if let Some(exit) = self.vmm.exit() {
            return Err(VmmError::Exited(exit.description));
        }
        let pid = self.vmm.pid();
        let proc_path = PathBuf::from(format!("/proc/{pid}"));
        let cpu_time =
            process::cpu_time(pid).map_err(|e| VmmError::io("read vmm stat", &proc_path, e))?;
        let vmm_resident_bytes = process::resident_bytes(pid)
            .map_err(|e| VmmError::io("read vmm status", &proc_path, e))?;
        // The VMM runs in the tap's namespace, so its /proc view of net/dev lists the tap.
        let (network_rx_bytes, network_tx_bytes) = match &self.tap {
            Some(tap) => {
                let path = proc_path.join("net/dev");
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| VmmError::io("read vmm net/dev", &path, e))?;
                tap_bytes(&text, tap).ok_or_else(|| {
                    VmmError::io(
                        "find the tap in",
                        &path,
                        std::io::Error::other(format!("no line for {tap}")),
                    )
                })?
            }
            None => (0, 0),
        };
        Ok(VmCounters {
            cpu_time,
            vmm_resident_bytes,
            network_rx_bytes,
            network_tx_bytes,
            sample_time: Some(SystemTime::now()),
            ..Default::default()
        })
    }

    /// Kills the VMM, waits for its exit, removes the cgroup, then the directory (which
    /// names the cgroup for a reap, should this stop half-way). Idempotent.
    pub async fn destroy(&self) -> Result<(), VmmError> {
        let mut destroyed = self.destroyed.lock().await;
        if *destroyed {
            return Ok(());
        }
        self.vmm.kill_and_wait().await;
        if let Some(cg) = &self.cgroup {
            cg.remove().await?;
        }
        remove_dir(&self.dir).await?;
        *destroyed = true;
        Ok(())
    }
}

/// (guest rx, guest tx) bytes of `tap` in a `/proc/net/dev` text. What the tap receives
/// the guest sent, and the other way round.
fn tap_bytes(net_dev: &str, tap: &str) -> Option<(u64, u64)> {
    net_dev.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != tap {
            return None;
        }
        let fields: Vec<u64> = rest
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // rx bytes, packets, errs, drop, fifo, frame, compressed, multicast, then tx bytes.
        Some((*fields.get(8)?, *fields.first()?))
    })
}

/// Creates the VM's directory; it must not exist (a VM id is never reused).
pub(crate) fn create_dir(dir: &Path) -> Result<(), VmmError> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| VmmError::io("create state dir", parent, e))?;
    }
    std::fs::create_dir(dir).map_err(|e| VmmError::io("create vm dir", dir, e))
}

pub(crate) async fn remove_dir(dir: &Path) -> Result<(), VmmError> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VmmError::io("remove vm dir", dir, e)),
    }
}

/// Writes a pid file so a later owner of the state dir can find (and verify) the process.
pub(crate) fn write_pid(dir: &Path, name: &str, pid: u32) -> Result<(), VmmError> {
    let path = dir.join(name);
    std::fs::write(&path, format!("{pid}\n")).map_err(|e| VmmError::io("write pid file", path, e))
}

/// `qemu-img create -f qcow2 -F raw -b <base> <dir>/overlay.qcow2 <size of base>`: a
/// copy-on-write layer that costs no copy of the base. Its virtual size is the base's, stated
/// explicitly: the guest's file system fills it at most, so the overlay on the host stays
/// under that size (plus qcow2 metadata) whatever the guest writes, and a guest that fills its
/// disk gets ENOSPC in the guest.
pub(crate) async fn create_overlay(
    qemu_img: &Path,
    base: &Path,
    dir: &Path,
) -> Result<PathBuf, VmmError> {
    let overlay = dir.join(layout::OVERLAY);
    let size = std::fs::metadata(base)
        .map_err(|e| VmmError::io("stat rootfs_base", base, e))?
        .len();
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(&overlay)
        .arg(size.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| VmmError::Spawn {
            program: qemu_img.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmmError::StartupExit {
            process: "qemu-img",
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(overlay)
}

/// Removes `dir` (and the VM's cgroup, if set) when dropped, unless disarmed: start-up
/// failures leave nothing behind.
pub(crate) struct DirGuard<'a> {
    dir: Option<&'a Path>,
    cgroup: Option<VmCgroup>,
}

impl<'a> DirGuard<'a> {
    pub fn new(dir: &'a Path) -> Self {
        DirGuard {
            dir: Some(dir),
            cgroup: None,
        }
    }
    pub fn cgroup(&mut self, cgroup: &VmCgroup) {
        self.cgroup = Some(cgroup.clone());
    }
    pub fn disarm(mut self) {
        self.dir = None;
        self.cgroup = None;
    }
}

impl Drop for DirGuard<'_> {
    fn drop(&mut self) {
        if let Some(dir) = self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        // Processes started so far are being killed by their supervisors right now: the
        // removal waits for them to leave.
        if let Some(cg) = self.cgroup.take() {
            tokio::spawn(async move {
                if let Err(e) = cg.remove().await {
                    tracing::warn!(error = %e, "removing the cgroup of a failed start");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_bytes_are_read_from_the_guests_side() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n \
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n \
vmtap1:    1500      10    0    0    0     0          0         0    90000      60    0    0    0     0       0          0\n";
        // The tap received 1500 (the guest sent them) and sent 90000 (the guest received).
        assert_eq!(tap_bytes(text, "vmtap1"), Some((90000, 1500)));
        assert_eq!(tap_bytes(text, "vmtap2"), None);
    }
}
