//! One cgroup per VM, under one parent cgroup per vm-pool, on cgroup v2 or v1.
//!
//! [`CgroupRoot::detect`] reads `/proc/self/mounts`: when the memory controller is mounted
//! as cgroup v1 (a hybrid host such as the development machines), every VM gets a dir in
//! each v1 hierarchy it needs (cpu, memory, pids); otherwise the unified v2 hierarchy with
//! `cpu`, `memory` and `pids` enabled down to the parent. A VM's limits:
//! - memory: guest RAM plus the VMM's own overhead, swap not allowed (`memory.max` and
//!   `memory.swap.max = 0`; v1 `memory.limit_in_bytes` and `memory.memsw.limit_in_bytes`):
//!   a VMM past it is OOM-killed alone, and the pool sees its VM fail;
//! - cpu: `vcpus` whole CPUs (`cpu.max = vcpus*100000 100000`; v1 cfs quota/period);
//! - pids: tasks (threads included) of the VMM (`pids.max`).
//!
//! The VMM's processes join the cgroup before they exec (see `sandbox`), so nothing of
//! theirs runs outside it. The cgroup's dirs are written to the VM dir's `cgroup` file,
//! which is how [`crate::orphans::reap`] removes them after a crash.

use std::path::{Path, PathBuf};

use crate::VmmError;

const CPU_PERIOD_US: u64 = 100_000;
/// Controllers a VM's limits need.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Which cgroup hierarchy the host gives us, with the pool's parent cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupRoot {
    /// The parent dir in the unified hierarchy.
    V2 { parent: PathBuf },
    /// The parent dir in each v1 hierarchy, per controller.
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
        pids: PathBuf,
        /// `memory.memsw.*` exists (swap accounting on).
        memsw: bool,
    },
}

/// A VM's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub pids: u32,
}

impl CgroupRoot {
    /// Finds the hierarchy and creates the parent `parent` (a relative path such as
    /// `capsa-vm-pool`) in it, with the controllers enabled on v2.
    pub fn detect(parent: &str) -> Result<CgroupRoot, VmmError> {
        let valid = !parent.is_empty()
            && parent.split('/').all(|c| {
                !c.is_empty()
                    && c != "."
                    && c != ".."
                    && c.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            });
        if !valid {
            return Err(VmmError::InvalidSpec(format!(
                "cgroup parent {parent:?} must be a relative path of letters, digits, '-', '_', '.'"
            )));
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts")
            .map_err(|e| VmmError::io("read mounts", "/proc/self/mounts", e))?;
        let root = match parse_mounts(&mounts) {
            Mounts::V1 { cpu, memory, pids } => {
                let memsw = memory.join("memory.memsw.limit_in_bytes").exists();
                let root = CgroupRoot::V1 {
                    cpu: cpu.join(parent),
                    memory: memory.join(parent),
                    pids: pids.join(parent),
                    memsw,
                };
                for dir in root.dirs() {
                    mkdir_all(&dir)?;
                }
                // Children inherit this; without it a v1 parent accounts nothing of theirs.
                let _ = write(&memory.join(parent), "memory.use_hierarchy", "1");
                root
            }
            Mounts::V2(mount) => {
                let dir = mount.join(parent);
                mkdir_all(&dir)?;
                // Enable the controllers from the mount down to the parent (the parent's own
                // subtree_control is what its VM children get).
                let mut at = mount.clone();
                let mut chain = vec![at.clone()];
                for c in Path::new(parent).components() {
                    at.push(c);
                    chain.push(at.clone());
                }
                let enable = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
                for d in chain {
                    write(&d, "cgroup.subtree_control", &enable)?;
                }
                CgroupRoot::V2 { parent: dir }
            }
            Mounts::None(why) => return Err(VmmError::NoEngine(format!("cgroups: {why}"))),
        };
        Ok(root)
    }

    /// Removes VM cgroups left empty for longer than `age`: those whose VM dir went with its
    /// state dir (a test's temporary dir, a wiped host) so no reap can name them. A
    /// populated cgroup refuses rmdir, and a VM's cgroup is populated within its start-up
    /// (well under `age`), so a live or starting VM of any pool sharing the parent is never
    /// touched. Returns the dirs removed.
    pub fn reap_stale(&self, age: std::time::Duration) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for parent in self.dirs() {
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|d| d > age));
                let name = e.file_name();
                if old
                    && crate::is_vm_id(name.to_str().unwrap_or(""))
                    && std::fs::remove_dir(e.path()).is_ok()
                {
                    removed.push(e.path());
                }
            }
        }
        removed
    }

    /// The parent dir in every hierarchy used.
    pub fn dirs(&self) -> Vec<PathBuf> {
        match self {
            CgroupRoot::V2 { parent } => vec![parent.clone()],
            CgroupRoot::V1 {
                cpu, memory, pids, ..
            } => {
                let mut v = vec![cpu.clone(), memory.clone(), pids.clone()];
                // cpu and cpuacct (or others) may share one mount.
                v.dedup();
                v
            }
        }
    }

    pub fn version(&self) -> u8 {
        match self {
            CgroupRoot::V2 { .. } => 2,
            CgroupRoot::V1 { .. } => 1,
        }
    }

    /// Creates the VM's cgroup `<parent>/<vm_id>` with `limits`; on error nothing is left.
    pub fn create_vm(&self, vm_id: &str, limits: VmLimits) -> Result<VmCgroup, VmmError> {
        let cg = VmCgroup {
            dirs: self.dirs().iter().map(|d| d.join(vm_id)).collect(),
        };
        for d in &cg.dirs {
            if let Err(e) = std::fs::create_dir(d) {
                cg.remove_now();
                return Err(VmmError::io("create vm cgroup", d, e));
            }
        }
        if let Err(e) = self.limit(vm_id, limits) {
            cg.remove_now();
            return Err(e);
        }
        Ok(cg)
    }

    fn limit(&self, vm_id: &str, l: VmLimits) -> Result<(), VmmError> {
        let cpu_quota = u64::from(l.vcpus) * CPU_PERIOD_US;
        match self {
            CgroupRoot::V2 { parent } => {
                let d = parent.join(vm_id);
                write(&d, "memory.max", &l.memory_bytes.to_string())?;
                // Absent without swap support in the kernel: nothing to turn off then.
                if d.join("memory.swap.max").exists() {
                    write(&d, "memory.swap.max", "0")?;
                }
                write(&d, "cpu.max", &format!("{cpu_quota} {CPU_PERIOD_US}"))?;
                write(&d, "pids.max", &l.pids.to_string())
            }
            CgroupRoot::V1 {
                cpu,
                memory,
                pids,
                memsw,
            } => {
                let m = memory.join(vm_id);
                write(&m, "memory.limit_in_bytes", &l.memory_bytes.to_string())?;
                if *memsw {
                    // memsw must stay >= limit_in_bytes, so it is set after it.
                    write(
                        &m,
                        "memory.memsw.limit_in_bytes",
                        &l.memory_bytes.to_string(),
                    )?;
                }
                let c = cpu.join(vm_id);
                write(&c, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                write(&c, "cpu.cfs_quota_us", &cpu_quota.to_string())?;
                write(&pids.join(vm_id), "pids.max", &l.pids.to_string())
            }
        }
    }
}

/// One VM's cgroup: a dir per hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    pub dirs: Vec<PathBuf>,
}

impl VmCgroup {
    /// The `cgroup.procs` file of every dir: a process joins by writing its pid (or 0).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// What the VM dir's `cgroup` file holds: one dir per line.
    pub fn to_file(&self) -> String {
        self.dirs
            .iter()
            .map(|d| format!("{}\n", d.display()))
            .collect()
    }

    /// The dirs named in a VM dir's `cgroup` file, keeping only those that can be a VM
    /// cgroup of `vm_id` (under `/sys/fs/cgroup`, last component the id, no `..`): the file
    /// sits in a dir the VMM's user can write.
    pub fn from_file(text: &str, vm_id: &str) -> VmCgroup {
        let dirs = text
            .lines()
            .map(PathBuf::from)
            .filter(|p| {
                p.starts_with("/sys/fs/cgroup")
                    && p.file_name().and_then(|n| n.to_str()) == Some(vm_id)
                    && p.components().all(|c| {
                        matches!(
                            c,
                            std::path::Component::RootDir | std::path::Component::Normal(_)
                        )
                    })
            })
            .collect();
        VmCgroup { dirs }
    }

    /// Removes the dirs, waiting (up to 5 s) for the kernel to let go of exited members.
    pub async fn remove(&self) -> Result<(), VmmError> {
        for d in &self.dirs {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // EBUSY: a killed member not yet fully gone.
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::trace!(dir = %d.display(), error = %e, "vm cgroup busy; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(VmmError::io("remove vm cgroup", d, e)),
                }
            }
        }
        Ok(())
    }

    pub(crate) fn remove_now(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

enum Mounts {
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
        pids: PathBuf,
    },
    V2(PathBuf),
    None(String),
}

/// Where the controllers are, from `/proc/self/mounts`. A controller lives in exactly one
/// hierarchy: memory in a v1 mount means v1 for all of them.
fn parse_mounts(mounts: &str) -> Mounts {
    let mut v1 = std::collections::HashMap::new();
    let mut v2 = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(&dir), Some(&fstype), Some(&opts)) = (f.get(1), f.get(2), f.get(3)) else {
            continue;
        };
        match fstype {
            "cgroup" => {
                for c in opts.split(',').filter(|o| CONTROLLERS.contains(o)) {
                    v1.entry(c).or_insert_with(|| PathBuf::from(dir));
                }
            }
            "cgroup2" if v2.is_none() => v2 = Some(PathBuf::from(dir)),
            _ => {}
        }
    }
    if v1.contains_key("memory") {
        let mut get = |c| v1.remove(c).ok_or(c);
        return match (get("cpu"), get("memory"), get("pids")) {
            (Ok(cpu), Ok(memory), Ok(pids)) => Mounts::V1 { cpu, memory, pids },
            (Err(c), _, _) | (_, Err(c), _) | (_, _, Err(c)) => {
                Mounts::None(format!("cgroup v1 controller {c} is not mounted"))
            }
        };
    }
    match v2 {
        Some(dir) => {
            let have = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
            let have: Vec<&str> = have.split_whitespace().collect();
            match CONTROLLERS.iter().find(|c| !have.contains(c)) {
                None => Mounts::V2(dir),
                Some(c) => Mounts::None(format!(
                    "controller {c} is not available in {}/cgroup.controllers",
                    dir.display()
                )),
            }
        }
        None => Mounts::None("no cgroup v1 memory controller nor cgroup2 mount".into()),
    }
}

fn mkdir_all(dir: &Path) -> Result<(), VmmError> {
    std::fs::create_dir_all(dir).map_err(|e| VmmError::io("create cgroup", dir, e))
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), VmmError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|e| VmmError::io("write cgroup file", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_pick_v1_when_memory_is_v1_else_v2() {
        let hybrid = "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
            cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
            cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        match parse_mounts(hybrid) {
            Mounts::V1 { cpu, memory, pids } => {
                assert_eq!(cpu, PathBuf::from("/sys/fs/cgroup/cpu"));
                assert_eq!(memory, PathBuf::from("/sys/fs/cgroup/memory"));
                assert_eq!(pids, PathBuf::from("/sys/fs/cgroup/pids"));
            }
            _ => panic!("expected v1"),
        }
        let combined = "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
            cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        assert!(
            matches!(parse_mounts(combined), Mounts::None(why) if why.contains("pids")),
            "a missing v1 controller is named"
        );
        assert!(matches!(
            parse_mounts("proc /proc proc rw 0 0\n"),
            Mounts::None(_)
        ));
    }

    #[test]
    fn the_cgroup_file_only_names_this_vms_cgroups() {
        let cg = VmCgroup {
            dirs: vec![
                "/sys/fs/cgroup/memory/capsa-vm-pool/vm-1".into(),
                "/sys/fs/cgroup/cpu/capsa-vm-pool/vm-1".into(),
            ],
        };
        assert_eq!(VmCgroup::from_file(&cg.to_file(), "vm-1"), cg);
        let forged = "/sys/fs/cgroup/memory/system.slice\n/etc/vm-1\n\
            /sys/fs/cgroup/memory/../../../etc/vm-1\n/sys/fs/cgroup/memory/x/vm-2\n";
        assert!(VmCgroup::from_file(forged, "vm-1").dirs.is_empty());
    }

    #[test]
    fn bad_parent_names_are_refused() {
        for bad in ["", "/abs", "a/../b", "a//b", "sp ace"] {
            let err = CgroupRoot::detect(bad).unwrap_err().to_string();
            assert!(err.contains("cgroup parent"), "{bad}: {err}");
        }
    }
}
