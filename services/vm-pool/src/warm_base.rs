//! Refilling the warm pool by restore (`--warm-from-snapshot`). Once per template (for its
//! image, engine and shape) vm-pool cold-boots one VM, saves it as the template's *base*
//! snapshot and releases it; from then on the refill loop restores warm VMs from the base
//! instead of booting them. A restore skips the kernel's and the agent's start-up (about a
//! sixth of a cold boot under TCG), and, like every restore, gives each VM an identity of
//! its own (Reidentify: address, MAC, machine-id, RNG, clock).
//!
//! The base is the node's own: it lives beside the tenants' snapshots as
//! `<state_dir>/snapshots/pool-base-<hash>`, a prefix the API refuses and ListSnapshots
//! leaves out. Its id is a hash of everything it depends on, so it survives a restart and a
//! stale one (another image, shape or engine, or the option turned off) is deleted at
//! start-up ([`adopt`]). Until the base is ready, refills cold-boot; a base that fails to
//! save or restore is dropped and the template cold-boots from then on, with a warning.

use std::sync::Arc;

use crate::boot::{Source, run_boot};
use crate::error::Error;
use crate::pool::{Pool, Shared, Template};

/// Ids of base snapshots start with this; tenants' ids may not.
pub(crate) const BASE_PREFIX: &str = "pool-base-";

/// A template's base snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Base {
    /// Its VM is booting or being saved.
    Making,
    /// Complete, with this snapshot id: refills restore it.
    Ready(String),
    /// Saving or restoring it failed: refills cold-boot.
    Unusable,
}

/// The base snapshot id of `tpl` on `engine`: FNV-1a over what a restore depends on, so the
/// same inputs give the same id after a restart (and other inputs another id).
pub(crate) fn base_id(tpl: &Template, engine: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let parts = [
        tpl.name.as_bytes(),
        tpl.image.hash.as_bytes(),
        engine.as_bytes(),
        &tpl.vcpus.to_le_bytes(),
        &tpl.memory_mib.to_le_bytes(),
    ];
    for part in parts {
        // Each part ends with a byte no part holds, so ("ab", "c") and ("a", "bc") differ.
        for &b in part.iter().chain([&0xff]) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{BASE_PREFIX}{hash:016x}")
}

/// At start-up, before the refill loop: takes up the complete base snapshots still wanted
/// and deletes the others.
pub(crate) async fn adopt(pool: &Pool) -> Result<(), Error> {
    let shared = &pool.0;
    let engine = shared.engine.kind.as_str();
    let wanted: Vec<(String, String)> = shared
        .templates
        .values()
        .filter(|t| shared.settings.warm_from_snapshot && t.warm_target > 0)
        .map(|t| (base_id(t, engine), t.name.clone()))
        .collect();
    for snapshot in shared.snapshots.list()? {
        if !snapshot.id.starts_with(BASE_PREFIX) {
            continue;
        }
        match wanted.iter().find(|(id, _)| *id == snapshot.id) {
            Some((id, template)) => {
                tracing::info!(
                    template,
                    snapshot = id,
                    "warm refills restore the kept base snapshot"
                );
                shared
                    .lock()
                    .bases
                    .insert(template.clone(), Base::Ready(id.clone()));
            }
            None => {
                tracing::info!(snapshot = %snapshot.id, "deleting a base snapshot no template uses");
                pool.delete_now(&snapshot.id).await?;
            }
        }
    }
    Ok(())
}

/// Boots the `Booting` VM `vm_id` (leased to the pool itself), saves it as `tpl`'s base and
/// releases it.
pub(crate) async fn make(shared: Arc<Shared>, vm_id: String, tpl: Template) {
    let pool = Pool(shared.clone());
    let id = base_id(&tpl, shared.engine.kind.as_str());
    let booted = run_boot(
        &shared,
        &vm_id,
        &tpl,
        tpl.vcpus,
        tpl.memory_mib,
        Source::Boot,
    )
    .await;
    let outcome = match booted {
        // A failed boot has backed the template's refills off; the base is tried again
        // after that.
        Err(e) => {
            tracing::warn!(template = %tpl.name, error = %e, "the vm for the base snapshot did not boot");
            None
        }
        Ok(_) => match pool.save_base(&vm_id, &id).await {
            Ok(info) => {
                tracing::info!(template = %tpl.name, snapshot = %id, bytes = info.size_bytes, "base snapshot saved; warm refills restore it");
                Some(Base::Ready(id))
            }
            Err(e) => {
                tracing::warn!(template = %tpl.name, error = %capsa_grpc::error::chain(&e), "base snapshot not saved; warm refills cold-boot");
                let _ = pool.release(&vm_id).await;
                Some(Base::Unusable)
            }
        },
    };
    let mut st = shared.lock();
    match outcome {
        Some(base) => st.bases.insert(tpl.name.clone(), base),
        None => st.bases.remove(&tpl.name),
    };
    drop(st);
    shared.changed.notify_one();
}

/// Restores a warm VM (the `Booting` VM `vm_id`) from `tpl`'s base `id`; a restore that
/// fails (not one cut short by a release or the shutdown) drops the base.
pub(crate) async fn restore_warm(shared: Arc<Shared>, vm_id: String, tpl: Template, id: String) {
    let hold = shared.snapshots.shared(&id).await;
    let source = Source::Restore {
        dir: shared.snapshots.path(&id),
        hold,
    };
    let restored = run_boot(&shared, &vm_id, &tpl, tpl.vcpus, tpl.memory_mib, source).await;
    if let Err(Error::BootFailed(reason)) = restored {
        tracing::warn!(template = %tpl.name, snapshot = %id, %reason, "restoring the base snapshot failed; warm refills cold-boot");
        shared.lock().bases.insert(tpl.name.clone(), Base::Unusable);
        if let Err(e) = Pool(shared.clone()).delete_now(&id).await {
            tracing::error!(snapshot = %id, error = %capsa_grpc::error::chain(&e), "unusable base snapshot not deleted");
        }
        shared.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(name: &str, hash: &str, memory_mib: u32) -> Template {
        Template {
            name: name.into(),
            image: capsa_vmm::GuestImage {
                dir: "/img".into(),
                hash: hash.into(),
                bzimage: "/img/bzImage".into(),
                vmlinux: "/img/vmlinux".into(),
                rootfs: "/img/rootfs.ext4".into(),
                cmdline: String::new(),
                tcg_append: None,
            },
            vcpus: 1,
            memory_mib,
            warm_target: 2,
        }
    }

    #[test]
    fn base_ids_follow_what_a_restore_depends_on_and_are_valid_reserved_ids() {
        let a = template("default", "caa6137f2dcd32be", 512);
        let id = base_id(&a, "qemu-tcg");
        assert_eq!(id, base_id(&a.clone(), "qemu-tcg"), "stable");
        assert!(
            id.starts_with(BASE_PREFIX) && id.len() == BASE_PREFIX.len() + 16,
            "{id}"
        );
        for other in [
            base_id(&template("other", "caa6137f2dcd32be", 512), "qemu-tcg"),
            base_id(&template("default", "04a891e3d979a71a", 512), "qemu-tcg"),
            base_id(&template("default", "caa6137f2dcd32be", 1024), "qemu-tcg"),
            base_id(&a, "cloud-hypervisor"),
        ] {
            assert_ne!(id, other);
        }
        // Shaped like any snapshot id, and refused to callers of the API.
        let err = crate::snapshots::validate_id(&id).unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
    }
}
