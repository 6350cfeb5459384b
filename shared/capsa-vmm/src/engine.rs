//! Which engine runs VMs on this host, and why.
//!
//! `auto` prefers, in order:
//! 1. Cloud Hypervisor, when its binary exists and KVM is usable;
//! 2. QEMU microvm + KVM, when KVM is usable;
//! 3. QEMU microvm + TCG (software emulation: slow, but runs anywhere).
//!
//! "KVM usable" means `/dev/kvm` opens read-write and answers `KVM_GET_API_VERSION` = 12.
//! A PVM host (`/sys/module/kvm_pvm` present) serves `/dev/kvm` but runs only PVM guest
//! kernels, so there it counts as usable only when a PVM guest kernel is configured, and
//! that kernel then replaces the image's. The choice is a pure function of [`HostFacts`]
//! so every branch is tested; [`HostFacts::probe`] gathers the facts.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::VmmError;
use crate::process::{find_in_path, is_executable};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    CloudHypervisor,
    QemuKvm,
    QemuTcg,
}

impl EngineKind {
    /// The name used in config, logs and the API: "cloud-hypervisor", "qemu-kvm", "qemu-tcg".
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::CloudHypervisor => "cloud-hypervisor",
            EngineKind::QemuKvm => "qemu-kvm",
            EngineKind::QemuTcg => "qemu-tcg",
        }
    }

    /// Cloud Hypervisor boots the ELF `vmlinux`; QEMU the bzImage.
    pub fn wants_elf_kernel(self) -> bool {
        self == EngineKind::CloudHypervisor
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `auto` or a fixed engine (`--engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EnginePreference {
    #[default]
    Auto,
    Fixed(EngineKind),
}

impl FromStr for EnginePreference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => EnginePreference::Auto,
            "cloud-hypervisor" => EnginePreference::Fixed(EngineKind::CloudHypervisor),
            "qemu-kvm" => EnginePreference::Fixed(EngineKind::QemuKvm),
            "qemu-tcg" => EnginePreference::Fixed(EngineKind::QemuTcg),
            other => {
                return Err(format!(
                    "unknown engine {other:?}: expected auto, cloud-hypervisor, qemu-kvm or qemu-tcg"
                ));
            }
        })
    }
}

/// The state of `/dev/kvm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kvm {
    Usable,
    /// Served by PVM: only PVM guest kernels run.
    Pvm,
    Unusable(String),
}

/// Everything the engine choice depends on.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub cloud_hypervisor: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    pub kvm: Kvm,
    pub pvm_guest_kernel: Option<PathBuf>,
}

impl HostFacts {
    /// Looks at this host. `cloud_hypervisor` overrides the `PATH` lookup of the binary.
    pub fn probe(
        cloud_hypervisor: Option<PathBuf>,
        qemu: Option<PathBuf>,
        pvm_guest_kernel: Option<PathBuf>,
    ) -> HostFacts {
        let cloud_hypervisor = cloud_hypervisor.filter(|p| {
            let ok = is_executable(p);
            if !ok {
                // Named by the operator but unusable: say so, or `auto` would quietly pick
                // another engine (or another cloud-hypervisor from PATH).
                tracing::warn!(path = %p.display(), "configured cloud-hypervisor is not an executable file; looking in PATH");
            }
            ok
        });
        HostFacts {
            cloud_hypervisor: cloud_hypervisor.or_else(|| find_in_path("cloud-hypervisor")),
            qemu: qemu
                .filter(|p| is_executable(p))
                .or_else(|| find_in_path("qemu-system-x86_64")),
            kvm: probe_kvm(),
            pvm_guest_kernel,
        }
    }
}

/// The engine to use and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineChoice {
    pub kind: EngineKind,
    pub reason: String,
    /// Replaces the image's kernel (a PVM guest kernel on a PVM host).
    pub kernel_override: Option<PathBuf>,
    /// The VMM binary.
    pub binary: PathBuf,
}

/// Chooses the engine for `pref` on a host described by `facts`.
pub fn choose(pref: EnginePreference, facts: &HostFacts) -> Result<EngineChoice, VmmError> {
    let pvm_kernel = match facts.kvm {
        Kvm::Pvm => facts.pvm_guest_kernel.clone(),
        _ => None,
    };
    // Whether KVM can run this host's guests, and if not, why not.
    let kvm = match (&facts.kvm, &facts.pvm_guest_kernel) {
        (Kvm::Usable, _) => Ok("KVM is usable".to_owned()),
        (Kvm::Pvm, Some(k)) => Ok(format!("/dev/kvm is PVM and PVM guest kernel {} is configured", k.display())),
        (Kvm::Pvm, None) => Err("/dev/kvm is served by PVM (kvm_pvm), which runs only PVM guest kernels, and no --pvm-guest-kernel is configured".to_owned()),
        (Kvm::Unusable(why), _) => Err(why.clone()),
    };
    let ch = facts.cloud_hypervisor.clone();
    let qemu = facts.qemu.clone();
    let no_qemu = || VmmError::NoEngine("qemu-system-x86_64 not found in PATH".into());
    let pick = |kind, binary, reason: String| {
        Ok(EngineChoice {
            kind,
            reason,
            kernel_override: pvm_kernel.clone(),
            binary,
        })
    };
    match pref {
        EnginePreference::Fixed(EngineKind::CloudHypervisor) => {
            let binary = ch.ok_or_else(|| VmmError::NoEngine("cloud-hypervisor binary not found (--cloud-hypervisor, CAPSA_CLOUD_HYPERVISOR or PATH)".into()))?;
            pick(
                EngineKind::CloudHypervisor,
                binary,
                format!(
                    "configured (--engine cloud-hypervisor); {}",
                    reason_of(&kvm)
                ),
            )
        }
        EnginePreference::Fixed(kind) => pick(
            kind,
            qemu.ok_or_else(no_qemu)?,
            format!("configured (--engine {kind}); {}", reason_of(&kvm)),
        ),
        EnginePreference::Auto => match (&kvm, ch, qemu) {
            (Ok(why), Some(ch), _) => pick(
                EngineKind::CloudHypervisor,
                ch,
                format!("auto: cloud-hypervisor found and {why}"),
            ),
            (Ok(why), None, Some(q)) => pick(
                EngineKind::QemuKvm,
                q,
                format!("auto: no cloud-hypervisor binary; {why}"),
            ),
            (Err(why), _, Some(q)) => pick(
                EngineKind::QemuTcg,
                q,
                format!("auto: KVM not usable ({why}); software emulation"),
            ),
            (_, _, None) => Err(no_qemu()),
        },
    }
}

fn reason_of(kvm: &Result<String, String>) -> String {
    match kvm {
        Ok(s) => s.clone(),
        Err(s) => format!("warning: {s}"),
    }
}

/// `KVM_GET_API_VERSION` = `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

fn probe_kvm() -> Kvm {
    use std::os::fd::AsRawFd as _;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(f) => f,
        Err(e) => return Kvm::Unusable(format!("/dev/kvm: {e}")),
    };
    // SAFETY: an ioctl without arguments on a file descriptor we own.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _) };
    if version != 12 {
        return Kvm::Unusable(format!(
            "/dev/kvm answered KVM_GET_API_VERSION with {version}"
        ));
    }
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        Kvm::Pvm
    } else {
        Kvm::Usable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(ch: bool, kvm: Kvm, pvm_kernel: bool) -> HostFacts {
        HostFacts {
            cloud_hypervisor: ch.then(|| PathBuf::from("/usr/bin/cloud-hypervisor")),
            qemu: Some(PathBuf::from("/usr/bin/qemu-system-x86_64")),
            kvm,
            pvm_guest_kernel: pvm_kernel.then(|| PathBuf::from("/boot/pvm-vmlinux")),
        }
    }

    #[test]
    fn auto_prefers_cloud_hypervisor_then_qemu_kvm_then_tcg() {
        let c = choose(EnginePreference::Auto, &facts(true, Kvm::Usable, false)).unwrap();
        assert_eq!(c.kind, EngineKind::CloudHypervisor);
        assert_eq!(c.binary, PathBuf::from("/usr/bin/cloud-hypervisor"));
        let c = choose(EnginePreference::Auto, &facts(false, Kvm::Usable, false)).unwrap();
        assert_eq!(c.kind, EngineKind::QemuKvm);
        let c = choose(
            EnginePreference::Auto,
            &facts(true, Kvm::Unusable("/dev/kvm: No such file".into()), false),
        )
        .unwrap();
        assert_eq!(c.kind, EngineKind::QemuTcg);
        assert!(c.reason.contains("No such file"), "{}", c.reason);
    }

    #[test]
    fn pvm_counts_only_with_a_guest_kernel_which_then_overrides() {
        let c = choose(EnginePreference::Auto, &facts(false, Kvm::Pvm, false)).unwrap();
        assert_eq!(c.kind, EngineKind::QemuTcg);
        assert!(c.reason.contains("PVM"), "{}", c.reason);
        assert_eq!(c.kernel_override, None);
        let c = choose(EnginePreference::Auto, &facts(false, Kvm::Pvm, true)).unwrap();
        assert_eq!(c.kind, EngineKind::QemuKvm);
        assert_eq!(c.kernel_override, Some(PathBuf::from("/boot/pvm-vmlinux")));
        // A PVM kernel configured on a non-PVM host changes nothing.
        let c = choose(EnginePreference::Auto, &facts(false, Kvm::Usable, true)).unwrap();
        assert_eq!(c.kernel_override, None);
    }

    #[test]
    fn fixed_engines_are_honoured_or_refused() {
        let f = facts(false, Kvm::Pvm, false);
        let c = choose("qemu-kvm".parse().unwrap(), &f).unwrap();
        assert_eq!(c.kind, EngineKind::QemuKvm);
        assert!(c.reason.contains("warning"), "{}", c.reason);
        let err = choose("cloud-hypervisor".parse().unwrap(), &f).unwrap_err();
        assert!(
            err.to_string()
                .contains("cloud-hypervisor binary not found"),
            "{err}"
        );
        let mut f = facts(true, Kvm::Usable, false);
        f.qemu = None;
        assert!(choose("qemu-tcg".parse().unwrap(), &f).is_err());
        assert!("firecracker".parse::<EnginePreference>().is_err());
    }

    #[test]
    fn probing_this_host_gives_an_answer() {
        let f = HostFacts::probe(None, None, None);
        // Whatever the host, the choice is made or refused with a reason, never a panic.
        match choose(EnginePreference::Auto, &f) {
            Ok(c) => assert!(!c.reason.is_empty()),
            Err(e) => assert!(e.to_string().contains("qemu")),
        }
    }
}
