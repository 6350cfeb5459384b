//! The node's capacity: what the live VMs take ([`Usage`]) and whether another VM fits
//! ([`Settings::fits`]): at most `capacity` VMs, their guest RAM plus each VMM's overhead
//! within `capacity_memory_mib`, their vCPUs within `capacity_vcpus`.

use crate::pool::{Settings, State};
use crate::vm::VmState;

/// What the live VMs take.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    pub vms: u32,
    pub memory_mib: u64,
    pub vcpus: u32,
}

impl Usage {
    pub fn of(st: &State) -> Usage {
        Usage::of_where(st, |_| true)
    }

    /// Counts one more VM of this shape.
    pub fn add(&mut self, vcpus: u32, memory_mib: u32) {
        self.vms += 1;
        self.memory_mib += u64::from(memory_mib);
        self.vcpus += vcpus;
    }

    /// Of the live VMs in a state `pick` accepts.
    pub fn of_where(st: &State, pick: impl Fn(VmState) -> bool) -> Usage {
        let mut u = Usage::default();
        for e in st.vms.values() {
            let i = e.info.borrow();
            if i.state.is_live() && pick(i.state) {
                u.vms += 1;
                u.memory_mib += u64::from(i.memory_mib);
                u.vcpus += i.vcpus;
            }
        }
        u
    }
}

impl Settings {
    fn vm_memory_mib(&self, memory_mib: u32) -> u64 {
        u64::from(memory_mib) + u64::from(self.vm_overhead_mib)
    }

    /// Whether a VM of this shape fits next to `used`; else what ran out, with figures.
    pub(crate) fn fits(&self, used: Usage, vcpus: u32, memory_mib: u32) -> Result<(), String> {
        let memory_used = used.memory_mib + u64::from(used.vms) * u64::from(self.vm_overhead_mib);
        let memory_wanted = self.vm_memory_mib(memory_mib);
        if memory_used + memory_wanted > self.capacity_memory_mib {
            return Err(format!(
                "memory ({memory_used} of {} MiB in use; this VM needs {memory_wanted} MiB:                  {memory_mib} guest + {} VMM overhead)",
                self.capacity_memory_mib, self.vm_overhead_mib
            ));
        }
        if used.vcpus + vcpus > self.capacity_vcpus {
            return Err(format!(
                "vcpus ({} of {} in use; this VM needs {vcpus})",
                used.vcpus, self.capacity_vcpus
            ));
        }
        if used.vms >= self.capacity {
            return Err(format!("VM slots (at most {} VMs)", self.capacity));
        }
        Ok(())
    }

    pub(crate) fn room_for(&self, st: &State, vcpus: u32, memory_mib: u32) -> Result<(), String> {
        self.fits(Usage::of(st), vcpus, memory_mib)
    }

    /// How many VMs of this shape an empty node holds.
    pub(crate) fn fits_count(&self, vcpus: u32, memory_mib: u32) -> u32 {
        let by_memory = self.capacity_memory_mib / self.vm_memory_mib(memory_mib);
        let by_vcpus = self.capacity_vcpus / vcpus.max(1);
        (by_memory.min(u64::from(by_vcpus)) as u32).min(self.capacity)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    fn settings() -> Settings {
        Settings {
            state_dir: PathBuf::from("/x"),
            capacity: 16,
            capacity_memory_mib: 2048,
            capacity_vcpus: 4,
            vm_overhead_mib: 256,
            max_concurrent_boots: 1,
            boot_timeout: Duration::from_secs(1),
            failed_vm_retention: Duration::from_secs(1),
            max_vcpus: 8,
            max_memory_mib: 8192,
            guest_otlp: None,
            network: None,
            warm_from_snapshot: false,
            vm_cgroups: None,
        }
    }

    #[test]
    fn capacity_is_memory_with_overhead_then_vcpus_then_slots() {
        let s = settings();
        let none = Usage::default();
        s.fits(none, 1, 512).unwrap();
        // 2 x (512 + 256) = 1536 in use; another 768 would make 2304 > 2048.
        let two = Usage {
            vms: 2,
            memory_mib: 1024,
            vcpus: 2,
        };
        let err = s.fits(two, 1, 512).unwrap_err();
        assert!(
            err.starts_with("memory") && err.contains("1536 of 2048"),
            "{err}"
        );
        s.fits(two, 1, 256).unwrap();
        let err = s
            .fits(
                Usage {
                    vms: 1,
                    memory_mib: 128,
                    vcpus: 3,
                },
                2,
                128,
            )
            .unwrap_err();
        assert!(err.starts_with("vcpus"), "{err}");
        let err = Settings {
            capacity: 1,
            ..settings()
        }
        .fits(
            Usage {
                vms: 1,
                memory_mib: 128,
                vcpus: 1,
            },
            1,
            128,
        )
        .unwrap_err();
        assert!(err.starts_with("VM slots"), "{err}");
        // 2048 / 768 = 2 by memory, 4 by vcpus.
        assert_eq!(s.fits_count(1, 512), 2);
        assert_eq!(s.fits_count(4, 128), 1);
        assert_eq!(
            Settings {
                capacity: 1,
                ..settings()
            }
            .fits_count(1, 128),
            1
        );
    }
}
