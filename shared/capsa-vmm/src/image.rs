//! A guest image directory (built by `deploy/guest/build-image.sh`) and what each engine
//! needs from it.
//!
//! `manifest.json` names the files (relative to the directory) and the kernel command
//! line. Under TCG the guest cannot calibrate its TSC (no kvm-clock, no HPET, no PM timer
//! on microvm) and hangs, so the manifest's `kernel_cmdline_tcg_append` (containing
//! `{host_tsc_khz}`) is added with the host's TSC rate filled in; TCG's guest `rdtsc` runs
//! at the host rate, so the guest clock is then exact. The append also carries `tsc=reliable`:
//! otherwise the clocksource watchdog, comparing with jiffies that lag on a busy host, drops
//! the TSC for jiffies and the idle guest never stops its tick. Never under KVM (kvm-clock).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::{EngineKind, VmmError};

#[derive(Debug, Deserialize)]
struct Manifest {
    hash: Option<String>,
    kernel_cmdline: String,
    #[serde(default)]
    kernel_cmdline_tcg_append: Option<String>,
    rootfs: String,
    bzimage: String,
    vmlinux: String,
}

/// A loaded image directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub dir: PathBuf,
    /// The manifest's hash, or the directory name.
    pub hash: String,
    pub bzimage: PathBuf,
    pub vmlinux: PathBuf,
    pub rootfs: PathBuf,
    pub cmdline: String,
    pub tcg_append: Option<String>,
}

impl GuestImage {
    /// Reads `<dir>/manifest.json` and checks that the files it names exist.
    pub fn load(dir: &Path) -> Result<GuestImage, VmmError> {
        let dir = dir
            .canonicalize()
            .map_err(|e| VmmError::io("open image dir", dir, e))?;
        let path = dir.join("manifest.json");
        let text =
            std::fs::read(&path).map_err(|e| VmmError::io("read image manifest", &path, e))?;
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| VmmError::InvalidSpec(format!("{}: {e}", path.display())))?;
        let image = GuestImage {
            hash: m.hash.unwrap_or_else(|| {
                dir.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            }),
            bzimage: dir.join(m.bzimage),
            vmlinux: dir.join(m.vmlinux),
            rootfs: dir.join(m.rootfs),
            cmdline: m.kernel_cmdline,
            tcg_append: m.kernel_cmdline_tcg_append,
            dir,
        };
        for (field, p) in [
            ("bzimage", &image.bzimage),
            ("vmlinux", &image.vmlinux),
            ("rootfs", &image.rootfs),
        ] {
            if !p.is_file() {
                return Err(VmmError::InvalidSpec(format!(
                    "image {field} {} is missing",
                    p.display()
                )));
            }
        }
        Ok(image)
    }

    /// The kernel file the engine boots.
    pub fn kernel_for(&self, engine: EngineKind) -> &Path {
        if engine.wants_elf_kernel() {
            &self.vmlinux
        } else {
            &self.bzimage
        }
    }

    /// The kernel command line for the engine.
    pub fn cmdline_for(&self, engine: EngineKind) -> String {
        tcg_cmdline(&self.cmdline, self.tcg_append.as_deref(), engine)
    }
}

/// `cmdline` plus, under TCG only, the TCG append with the host TSC rate filled in.
pub fn tcg_cmdline(cmdline: &str, tcg_append: Option<&str>, engine: EngineKind) -> String {
    match (engine, tcg_append) {
        (EngineKind::QemuTcg, Some(extra)) if !extra.trim().is_empty() => {
            let extra = extra.replace("{host_tsc_khz}", &host_tsc_khz().to_string());
            format!("{cmdline} {}", extra.trim())
        }
        _ => cmdline.to_owned(),
    }
}

/// The host's TSC rate in kHz: the kernel's own value when it exports one, else measured
/// once (rdtsc against the monotonic clock over 100 ms) and cached.
pub fn host_tsc_khz() -> u64 {
    static KHZ: OnceLock<u64> = OnceLock::new();
    *KHZ.get_or_init(|| {
        std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|&khz: &u64| khz > 0)
            .unwrap_or_else(measure_tsc_khz)
    })
}

fn measure_tsc_khz() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions on x86_64.
        #[allow(unused_unsafe)]
        let rdtsc = || unsafe { core::arch::x86_64::_rdtsc() };
        let (t0, c0) = (Instant::now(), rdtsc());
        std::thread::sleep(Duration::from_millis(100));
        let (c1, elapsed) = (rdtsc(), t0.elapsed());
        (c1.wrapping_sub(c0) as u128 * 1000 / elapsed.as_micros().max(1)) as u64
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (Instant::now(), Duration::ZERO);
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_loads_and_engines_get_their_kernel_and_cmdline() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["bzImage", "vmlinux", "rootfs.ext4"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        std::fs::write(
            dir.path().join("manifest.json"),
            r#"{"hash": "abc", "kernel_cmdline": "console=ttyS0 quiet", "kernel_cmdline_tcg_append": "tsc_early_khz={host_tsc_khz}",
                "rootfs": "rootfs.ext4", "bzimage": "bzImage", "vmlinux": "vmlinux", "extra": 1}"#,
        )
        .unwrap();
        let img = GuestImage::load(dir.path()).unwrap();
        assert_eq!(img.hash, "abc");
        assert!(
            img.kernel_for(EngineKind::CloudHypervisor)
                .ends_with("vmlinux")
        );
        assert!(img.kernel_for(EngineKind::QemuTcg).ends_with("bzImage"));
        assert_eq!(img.cmdline_for(EngineKind::QemuKvm), "console=ttyS0 quiet");
        let tcg = img.cmdline_for(EngineKind::QemuTcg);
        let khz: u64 = tcg
            .strip_prefix("console=ttyS0 quiet tsc_early_khz=")
            .unwrap()
            .parse()
            .unwrap();
        // Any real x86 TSC runs between 100 MHz and 10 GHz.
        assert!((100_000..10_000_000).contains(&khz), "{khz}");

        std::fs::remove_file(dir.path().join("vmlinux")).unwrap();
        let err = GuestImage::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("vmlinux"), "{err}");
    }
}
