//! What the pool knows about one VM, independent of gRPC.
//!
//! Life of a VM: `Booting` → `Warm` (in the pool) → `Leased` → `Destroyed` on release; a
//! cold boot for a lease goes `Booting` → `Leased`. Any live state can become `Failed`
//! (VMM died, agent never answered); a failed VM's processes and dir are gone at once, and
//! its record stays visible until it is released (leased) or for a while (unleased).

use std::time::{Duration, SystemTime};

use capsa_vmm::EngineKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Booting,
    Warm,
    Leased,
    Failed,
    Destroyed,
}

impl VmState {
    /// Whether the VM holds host resources (counts against capacity).
    pub fn is_live(self) -> bool {
        matches!(self, VmState::Booting | VmState::Warm | VmState::Leased)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct VmInfo {
    pub id: String,
    pub template: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub state: VmState,
    pub lease_id: Option<String>,
    pub engine: EngineKind,
    /// 0 until the VMM runs.
    pub vmm_pid: u32,
    pub boot_time: SystemTime,
    /// VMM start to the agent's first healthy answer.
    pub boot_duration: Option<Duration>,
    pub lease_time: Option<SystemTime>,
    pub failure: Option<String>,
}

/// A fresh VM id: `vm-` and 16 lowercase hex digits (a valid `capsa_vsock` id).
pub fn new_vm_id() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("vm-{}", &hex[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_everywhere_and_distinct() {
        let a = new_vm_id();
        assert!(capsa_vmm::is_vm_id(&a), "{a}");
        assert!(capsa_vsock::vm_socket_path(std::path::Path::new("/s"), &a).is_some());
        assert_ne!(a, new_vm_id());
    }
}
