//! Keeps CPU-bound sessions from slowing down interactive ones.
//!
//! Each VM's cgroup caps it at its vcpus (`cpu.max`), but a node holds more vcpus than it has
//! CPUs: five guests spinning at full speed on a 2-CPU host leave a sixth, which only wakes
//! up to answer an `Execute`, one sixth of the CPU when it needs it. So every second this
//! looks at how much each leased VM *wanted* the CPU (time its threads ran plus time they
//! waited runnable, from `/proc/<pid>/task/*/schedstat`, which does not depend on how
//! contended the host is): a VM whose busiest thread wanted the CPU for [`BUSY`] of the time,
//! [`DEMOTE_AFTER`] seconds in a row, is *batch*, and its cgroup gets an eighth of the normal
//! CPU weight (`cpu.weight` 12 of 100 on v2, `cpu.shares` 128 of 1024 on v1). It is
//! *interactive* again after [`PROMOTE_AFTER`] seconds below [`IDLE`]. A batch VM loses
//! nothing on an idle host, and under contention still gets its eighth: a weight, not
//! `cpu.idle`, because an idle-class VM starves outright while normal tasks run (seen: a VM
//! demoted while it booted missed its 60 s health check beside two other boots). Only VMs
//! the caller says are eligible (vm-pool: leased ones) are ever demoted: booting and warm
//! VMs are the node's own work, and a starved boot is a lost VM.
//!
//! A boot that refills the warm pool is the node's work too, but nobody waits for it while
//! sessions do wait for their Executes: vm-pool gives such a boot the [`CpuClass::Refill`]
//! weight, a quarter of the normal one ([`set_class`]), while it boots (at most a quarter of
//! the boot timeout: dozens of idle VMs can take a small host's CPUs and starve it). Under a
//! burst of new sessions their first Executes then run ahead of the refill rather than
//! beside it (two refill boots fill both CPUs of a small host), and a boot still outweighs
//! a batch VM twice over, so a node full of CPU-bound sessions keeps refilling.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cgroup::CgroupRoot;

/// Share of wall time the busiest thread wanted the CPU for a "busy" second.
pub const BUSY: f64 = 0.9;
/// Below this a batch VM counts as idle.
pub const IDLE: f64 = 0.5;
/// Busy seconds in a row before a VM becomes batch: a short burst (a pip install, a cell
/// that computes for a second) stays interactive.
pub const DEMOTE_AFTER: u32 = 3;
/// Idle seconds in a row before a batch VM is interactive again.
pub const PROMOTE_AFTER: u32 = 2;
const TICK: Duration = Duration::from_secs(1);

/// How the scheduler should treat a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuClass {
    /// The normal weight.
    Interactive,
    /// A session that has wanted the CPU for seconds: an eighth of the normal weight.
    Batch,
    /// A boot that refills the warm pool: a quarter of the normal weight. Set by the pool
    /// ([`set_class`]), never by the balance loop.
    Refill,
}

impl CpuClass {
    /// The normal weight divided by this gives the class's weight.
    fn divisor(self) -> u64 {
        match self {
            CpuClass::Interactive => 1,
            CpuClass::Refill => 4,
            CpuClass::Batch => 8,
        }
    }
}

/// One VM's history, fed a demand figure per tick.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tracker {
    class: CpuClass,
    /// Consecutive ticks that point away from `class`.
    streak: u32,
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            class: CpuClass::Interactive,
            streak: 0,
        }
    }

    /// Back to interactive with no history (a VM that is not eligible); returns the class
    /// when that is a change.
    fn reset(&mut self) -> Option<CpuClass> {
        let was = self.class;
        *self = Tracker::new();
        (was != self.class).then_some(self.class)
    }

    /// Feeds one tick's demand (0.0 to 1.0); returns the new class when it changes.
    fn observe(&mut self, demand: f64) -> Option<CpuClass> {
        // A tracker only ever holds Interactive or Batch.
        let batch = self.class == CpuClass::Batch;
        let (towards, needed) = if batch {
            (demand < IDLE, PROMOTE_AFTER)
        } else {
            (demand >= BUSY, DEMOTE_AFTER)
        };
        self.streak = if towards { self.streak + 1 } else { 0 };
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.class = if batch {
            CpuClass::Interactive
        } else {
            CpuClass::Batch
        };
        Some(self.class)
    }
}

/// Ran + waited nanoseconds per thread of every process in a cgroup dir.
fn wanted_ns(cgroup_dir: &Path) -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    let Ok(procs) = std::fs::read_to_string(cgroup_dir.join("cgroup.procs")) else {
        return out;
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ns) = std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|s| parse_schedstat(&s))
            {
                out.insert(tid, ns);
            }
        }
    }
    out
}

/// `/proc/<pid>/task/<tid>/schedstat`: "<ran ns> <waited ns> <timeslices>"; the sum of the
/// first two.
fn parse_schedstat(text: &str) -> Option<u64> {
    let mut fields = text.split_whitespace();
    let ran: u64 = fields.next()?.parse().ok()?;
    let waited: u64 = fields.next()?.parse().ok()?;
    Some(ran.saturating_add(waited))
}

/// The busiest thread's demand between two samples: a guest's vCPU thread spinning is 1.0
/// whatever the host gives it.
fn demand(before: &HashMap<u32, u64>, now: &HashMap<u32, u64>, wall: Duration) -> f64 {
    let wall = wall.as_nanos().max(1) as f64;
    now.iter()
        .filter_map(|(tid, ns)| before.get(tid).map(|b| ns.saturating_sub(*b) as f64 / wall))
        .fold(0.0, f64::max)
        .min(1.0)
}

/// Applies `class` to a VM's cgroup (the dir of its cpu controller): the default weight
/// (v2 `cpu.weight` 100, v1 `cpu.shares` 1024) divided by the class's divisor.
fn apply(cpu_dir: &Path, class: CpuClass) -> std::io::Result<()> {
    let (file, normal) = if cpu_dir.join("cpu.weight").exists() {
        ("cpu.weight", 100)
    } else {
        ("cpu.shares", 1024)
    };
    std::fs::write(cpu_dir.join(file), (normal / class.divisor()).to_string())
}

/// Gives VM `vm_id` under `root` the weight of `class` now. The balance loop leaves a VM it
/// does not track as batch alone, so a [`CpuClass::Refill`] set here stays until the
/// caller sets [`CpuClass::Interactive`] again.
pub fn set_class(root: &CgroupRoot, vm_id: &str, class: CpuClass) -> std::io::Result<()> {
    apply(&cpu_parent(root).join(vm_id), class)
}

/// The dir holding the VMs' cgroups in the cpu controller's hierarchy.
fn cpu_parent(root: &CgroupRoot) -> PathBuf {
    match root {
        CgroupRoot::V2 { parent } => parent.clone(),
        CgroupRoot::V1 { cpu, .. } => cpu.clone(),
    }
}

/// Samples every VM cgroup under `root` once a second and moves the VMs for which
/// `eligible(vm_id)` holds between the classes (any other goes back to interactive), until
/// `cancel`.
pub async fn run(
    root: CgroupRoot,
    eligible: impl Fn(&str) -> bool + Send + 'static,
    cancel: CancellationToken,
) {
    let parent = cpu_parent(&root);
    let mut vms: HashMap<PathBuf, (Tracker, HashMap<u32, u64>)> = HashMap::new();
    let mut last = Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
        let now = Instant::now();
        let wall = now - last;
        last = now;
        let dirs: Vec<PathBuf> = match std::fs::read_dir(&parent) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_dir()
                        && p.file_name()
                            .is_some_and(|n| crate::is_vm_id(&n.to_string_lossy()))
                })
                .collect(),
            Err(e) => {
                tracing::warn!(dir = %parent.display(), error = %e, "cpu balance: cannot list vm cgroups");
                continue;
            }
        };
        vms.retain(|dir, _| dirs.contains(dir));
        for dir in dirs {
            let vm = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let sample = wanted_ns(&dir);
            let (tracker, before) = vms
                .entry(dir.clone())
                .or_insert_with(|| (Tracker::new(), HashMap::new()));
            let d = demand(before, &sample, wall);
            *before = sample;
            let change = if eligible(&vm) {
                tracker.observe(d)
            } else {
                tracker.reset()
            };
            if let Some(class) = change {
                match apply(&dir, class) {
                    Ok(()) => tracing::info!(vm = %vm, ?class, demand = d, "vm cpu class changed"),
                    Err(e) => {
                        tracing::warn!(vm = %vm, ?class, error = %e, "vm cpu class not applied")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_becomes_batch_after_sustained_demand_and_interactive_when_it_rests() {
        let mut t = Tracker::new();
        // A burst shorter than DEMOTE_AFTER stays interactive.
        assert_eq!(t.observe(1.0), None);
        assert_eq!(t.observe(0.95), None);
        assert_eq!(t.observe(0.2), None);
        assert_eq!(t.observe(1.0), None);
        assert_eq!(t.observe(1.0), None);
        assert_eq!(t.observe(1.0), Some(CpuClass::Batch));
        assert_eq!(t.observe(1.0), None, "stays batch while busy");
        // Middling demand neither promotes nor demotes.
        assert_eq!(t.observe(0.7), None);
        assert_eq!(t.observe(0.1), None);
        assert_eq!(t.observe(0.7), None, "the idle streak restarts");
        assert_eq!(t.observe(0.1), None);
        assert_eq!(t.observe(0.0), Some(CpuClass::Interactive));
        assert_eq!(t.class, CpuClass::Interactive);
    }

    #[test]
    fn demand_is_the_busiest_threads_share_of_wall_time() {
        let before = HashMap::from([(1, 0), (2, 100), (3, 5)]);
        let now = HashMap::from([(1, 400_000_000), (2, 900_000_100), (4, 999_999_999_999)]);
        let d = demand(&before, &now, Duration::from_secs(1));
        assert!((d - 0.9).abs() < 1e-9, "{d}");
        // Threads seen for the first time count from their next sample; capped at 1.0.
        assert_eq!(demand(&HashMap::new(), &now, Duration::from_secs(1)), 0.0);
        let spin = HashMap::from([(1, 3_000_000_000)]);
        assert_eq!(demand(&before, &spin, Duration::from_secs(1)), 1.0);
    }

    #[test]
    fn schedstat_lines_parse() {
        assert_eq!(parse_schedstat("863641 10853 2\n"), Some(874_494));
        assert_eq!(parse_schedstat("garbage"), None);
        // This thread's own line, after it has run for a while (the kernel adds run time
        // at scheduler ticks, so a thread that just started may still read 0).
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        let own = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
        assert!(parse_schedstat(&own).unwrap() > 0, "{own}");
    }

    #[test]
    fn an_ineligible_vm_goes_back_to_interactive_and_starts_over() {
        let mut t = Tracker::new();
        assert_eq!(t.reset(), None);
        for _ in 0..DEMOTE_AFTER {
            t.observe(1.0);
        }
        assert_eq!(t.class, CpuClass::Batch);
        assert_eq!(t.reset(), Some(CpuClass::Interactive));
        assert_eq!(t.observe(1.0), None, "the busy streak starts over");
    }

    #[test]
    fn classes_are_written_as_cgroup_weights() {
        let weight = |file: PathBuf| std::fs::read_to_string(file).unwrap();
        let v1 = tempfile::tempdir().unwrap();
        let shares = v1.path().join("cpu.shares");
        std::fs::write(&shares, "1024").unwrap();
        apply(v1.path(), CpuClass::Batch).unwrap();
        assert_eq!(weight(shares.clone()), "128");
        apply(v1.path(), CpuClass::Interactive).unwrap();
        assert_eq!(weight(shares.clone()), "1024");
        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cpu.weight"), "100").unwrap();
        apply(v2.path(), CpuClass::Batch).unwrap();
        assert_eq!(weight(v2.path().join("cpu.weight")), "12");
        // A refill boot: a quarter, still twice a batch VM's weight.
        let root = CgroupRoot::V2 {
            parent: v2.path().to_owned(),
        };
        std::fs::create_dir(v2.path().join("vm-refill")).unwrap();
        std::fs::write(v2.path().join("vm-refill/cpu.weight"), "100").unwrap();
        set_class(&root, "vm-refill", CpuClass::Refill).unwrap();
        assert_eq!(weight(v2.path().join("vm-refill/cpu.weight")), "25");
        apply(v1.path(), CpuClass::Refill).unwrap();
        assert_eq!(weight(shares), "256");
    }
}
