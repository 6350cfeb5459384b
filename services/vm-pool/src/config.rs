//! Command-line and environment configuration of vm-pool. Tests build [`Config`] values
//! with [`Config::for_image`]; nothing here reads global state after parsing.

use std::path::PathBuf;
use std::time::Duration;

use capsa_vmm::EnginePreference;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "capsa-vm-pool",
    version,
    about = "Keeps warm microVMs booted on this host and leases them out, one VM per lease."
)]
pub struct Config {
    /// Address to serve gRPC on, e.g. 0.0.0.0:50052 (127.0.0.1:0 in tests).
    #[arg(long, env = "CAPSA_VMPOOL_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: String,

    /// Where VMs live: <dir>/vms/<vm_id>/ holds each VM's sockets, overlay, pid files and
    /// console log. The executor is configured with the same dir. Reconciled at start-up:
    /// leftovers of a previous run are killed and removed.
    #[arg(long, env = "CAPSA_VM_STATE_DIR", default_value = "/var/lib/capsa")]
    pub state_dir: PathBuf,

    /// Guest image dir of the template "default" (manifest.json, bzImage, vmlinux,
    /// rootfs.ext4).
    #[arg(long, env = "CAPSA_IMAGE_DIR")]
    pub image_dir: Option<PathBuf>,

    /// More templates, as NAME=IMAGE_DIR (repeatable).
    #[arg(long = "template", value_parser = parse_template)]
    pub templates: Vec<(String, PathBuf)>,

    /// Where the guest agents' telemetry goes: each agent exports OTLP over vsock to host
    /// port 4317, and vm-pool relays that port of every VM to this OTLP/gRPC endpoint
    /// (`http://host:port`). Defaults to the standard variable; unset, guests only log.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub guest_otlp_endpoint: Option<String>,

    /// Warm VMs kept booted per template.
    #[arg(long, env = "CAPSA_VMPOOL_WARM", default_value_t = 2)]
    pub warm: u32,

    /// VMs booting at once (refills and cold boots together).
    #[arg(long, env = "CAPSA_VMPOOL_MAX_CONCURRENT_BOOTS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_boots: u32,

    /// Most VMs this host holds at once (booting, warm and leased).
    #[arg(long, env = "CAPSA_VMPOOL_CAPACITY", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub capacity: u32,

    /// vCPUs of a template's VMs (and of an AcquireVm that leaves vcpus at 0).
    #[arg(long, env = "CAPSA_VMPOOL_VCPUS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: u32,

    /// Memory of a template's VMs in MiB (and of an AcquireVm that leaves it at 0).
    #[arg(long, env = "CAPSA_VMPOOL_MEMORY_MIB", default_value_t = 512, value_parser = clap::value_parser!(u32).range(128..))]
    pub memory_mib: u32,

    /// Largest vcpus an AcquireVm may ask for.
    #[arg(long, env = "CAPSA_VMPOOL_MAX_VCPUS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_vcpus: u32,

    /// Largest memory_mib an AcquireVm may ask for.
    #[arg(long, env = "CAPSA_VMPOOL_MAX_MEMORY_MIB", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(128..))]
    pub max_memory_mib: u32,

    /// Time from starting a VMM to its agent's first healthy answer before the boot counts
    /// as failed (seconds). Software-emulated boots take 4 to 15 s on a busy 2-core host;
    /// a failed cold boot is retried once, within session-manager's acquire timeout.
    #[arg(long = "boot-timeout-secs", env = "CAPSA_VMPOOL_BOOT_TIMEOUT_SECS", default_value = "60", value_parser = parse_secs)]
    pub boot_timeout: Duration,

    /// auto, cloud-hypervisor, qemu-kvm or qemu-tcg.
    #[arg(long, env = "CAPSA_ENGINE", default_value = "auto")]
    pub engine: EnginePreference,

    /// The cloud-hypervisor binary (else looked up in PATH).
    #[arg(long, env = "CAPSA_CLOUD_HYPERVISOR")]
    pub cloud_hypervisor: Option<PathBuf>,

    /// On a PVM host (kvm_pvm), the PVM guest kernel that makes KVM usable; it replaces
    /// the image's kernel.
    #[arg(long, env = "CAPSA_PVM_GUEST_KERNEL")]
    pub pvm_guest_kernel: Option<PathBuf>,

    /// Leave VMMs running when vm-pool dies abruptly (they are reaped at the next start)
    /// instead of having the kernel kill them with it.
    #[arg(long, env = "CAPSA_VMPOOL_ORPHAN_VMS_ON_CRASH")]
    pub orphan_vms_on_crash: bool,

    /// Redis for the node registry; without it the node is not registered.
    #[arg(long, env = "CAPSA_REDIS_URL")]
    pub redis_url: Option<String>,

    /// This host's id in the registry (default: the hostname).
    #[arg(long, env = "CAPSA_NODE_ID")]
    pub node_id: Option<String>,

    /// vm-pool's own URL as session-manager should dial it (default: http://<bound addr>).
    #[arg(long, env = "CAPSA_VMPOOL_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// URL of the executor beside this vm-pool, published in the node record.
    #[arg(
        long,
        env = "CAPSA_EXECUTOR_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    pub executor_url: String,
}

fn parse_template(s: &str) -> Result<(String, PathBuf), String> {
    let (name, dir) = s.split_once('=').ok_or("expected NAME=IMAGE_DIR")?;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(format!(
            "template name {name:?}: 1-64 letters, digits, '-' or '_'"
        ));
    }
    Ok((name.to_owned(), PathBuf::from(dir)))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1 s".into()),
        Ok(n) => Ok(Duration::from_secs(n)),
        Err(e) => Err(format!("not a number of seconds: {e}")),
    }
}

impl Config {
    /// Defaults with `state_dir` and the default template's `image_dir`, for tests and
    /// embedding.
    pub fn for_image(state_dir: PathBuf, image_dir: PathBuf) -> Config {
        use clap::Parser as _;
        let mut config = Config::parse_from(["capsa-vm-pool"]);
        config.state_dir = state_dir;
        config.image_dir = Some(image_dir);
        config
    }

    /// Every template: "default" from `--image-dir`, then `--template`s.
    pub fn all_templates(&self) -> Vec<(String, PathBuf)> {
        self.image_dir
            .iter()
            .map(|d| ("default".to_owned(), d.clone()))
            .chain(self.templates.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn defaults_templates_and_bad_values() {
        let c = Config::try_parse_from([
            "x",
            "--image-dir",
            "/img/a",
            "--template",
            "big=/img/b",
            "--engine",
            "qemu-tcg",
        ])
        .unwrap();
        assert_eq!(
            c.all_templates(),
            vec![
                ("default".into(), "/img/a".into()),
                ("big".into(), "/img/b".into())
            ]
        );
        assert_eq!(c.engine, "qemu-tcg".parse().unwrap());
        assert_eq!((c.vcpus, c.memory_mib, c.warm), (1, 512, 2));
        assert!(Config::try_parse_from(["x", "--template", "no-equals"]).is_err());
        assert!(Config::try_parse_from(["x", "--template", "a/b=/img"]).is_err());
        assert!(Config::try_parse_from(["x", "--engine", "firecracker"]).is_err());
        assert!(Config::try_parse_from(["x", "--max-concurrent-boots", "0"]).is_err());
        assert!(Config::try_parse_from(["x", "--boot-timeout-secs", "0"]).is_err());
    }
}
