//! A VM's host-side counters, and the snapshot of them taken when it is leased: booting
//! and waiting warm are the node's cost, so metering subtracts the snapshot to bill the
//! lease alone.

use std::sync::Arc;

use capsa_vmm::{VirtualMachine, VmCounters};

use crate::error::Error;
use crate::pool::Pool;
use crate::vm::VmState;

impl Pool {
    /// The VM's counters now, and (once leased) its counters at lease time.
    pub async fn counters(&self, vm_id: &str) -> Result<(VmCounters, Option<VmCounters>), Error> {
        let (vm, at_lease) = {
            let st = self.0.lock();
            let entry = st.vms.get(vm_id).ok_or_else(|| {
                Error::NotFound(format!("vm_id {vm_id:?} is not held by this node"))
            })?;
            let state = entry.info.borrow().state;
            match (&entry.vm, state.is_live()) {
                (Some(vm), true) => (
                    vm.clone(),
                    (state == VmState::Leased).then(|| entry.at_lease.clone()),
                ),
                _ => {
                    return Err(Error::FailedPrecondition(format!(
                        "vm {vm_id} is {state:?}, not running"
                    )));
                }
            }
        };
        let counters_of = |vm: &Arc<dyn VirtualMachine>| {
            let vm = vm.clone();
            async move {
                vm.counters().await.map_err(|e| match e {
                    capsa_vmm::VmmError::Exited(why) => {
                        Error::FailedPrecondition(format!("vm {vm_id} has exited: {why}"))
                    }
                    // Stopped while being read (a delete or a suspend closes its control
                    // socket): that is the VM's state, not a fault of the node.
                    other => match self.get(vm_id).map(|vm| vm.state) {
                        Ok(state) if state.is_live() => Error::Vmm(other),
                        Ok(state) => Error::FailedPrecondition(format!(
                            "vm {vm_id} is {state:?}, not running"
                        )),
                        Err(gone) => gone,
                    },
                })
            }
        };
        let baseline = match at_lease {
            Some(cell) => Some(cell.get_or_try_init(|| counters_of(&vm)).await?.clone()),
            None => None,
        };
        Ok((counters_of(&vm).await?, baseline))
    }

    /// Takes the leased VM's counters in the background (see
    /// [`crate::pool::Entry::at_lease`]), so AcquireVm does not wait for them.
    pub(crate) fn record_counters_at_lease(&self, vm_id: &str) {
        let (vm, cell) = {
            let st = self.0.lock();
            let Some(entry) = st.vms.get(vm_id) else {
                return;
            };
            let Some(vm) = entry.vm.clone() else {
                return;
            };
            (vm, entry.at_lease.clone())
        };
        let vm_id = vm_id.to_owned();
        let pool = self.clone();
        tokio::spawn(async move {
            if let Err(e) = cell.get_or_try_init(|| vm.counters()).await {
                // A lease released at once races this read; only a live VM's miss matters.
                if pool.get(&vm_id).is_ok_and(|vm| vm.state.is_live()) {
                    tracing::warn!(vm = %vm_id, error = %e, "counters at lease not taken");
                } else {
                    tracing::debug!(vm = %vm_id, error = %e, "counters at lease not taken: the vm is gone");
                }
            }
        });
    }
}
