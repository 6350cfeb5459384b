//! Command-line and environment configuration of vm-pool. Tests build [`Config`] values
//! with [`Config::for_image`]; nothing here reads global state after parsing.

use std::path::PathBuf;
use std::time::Duration;

use capsa_grpc::args::{CommonArgs, RedisUrl, listen_on};
use capsa_grpc::tls::{allowed_peers, identity};
use capsa_vmm::EnginePreference;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "capsa-vm-pool",
    version,
    about = "Keeps warm microVMs booted on this host and leases them out, one VM per lease.",
    mut_arg("listen", listen_on("CAPSA_VMPOOL_LISTEN", "127.0.0.1:50052")),
    mut_arg("tls_allowed_peers", allowed_peers(identity::NODE_CALLERS))
)]
pub struct Config {
    /// `--listen` and the telemetry flags.
    #[command(flatten)]
    pub common: CommonArgs,

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
    /// port 4317, and vm-pool relays it, tagged with the VM and within the limits below, to
    /// this OTLP/gRPC endpoint (`http://host:port`). Defaults to the standard variable;
    /// unset, guests only log.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub guest_otlp_endpoint: Option<String>,

    /// Open telemetry connections per VM; the guest's next one is closed at once.
    #[arg(long, env = "CAPSA_VMPOOL_GUEST_OTLP_MAX_CONNECTIONS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub guest_otlp_max_connections: u32,

    /// A guest telemetry connection silent this long (seconds) is closed.
    #[arg(long = "guest-otlp-idle-timeout-secs", env = "CAPSA_VMPOOL_GUEST_OTLP_IDLE_TIMEOUT_SECS", default_value = "60", value_parser = parse_secs)]
    pub guest_otlp_idle_timeout: Duration,

    /// Telemetry bytes a VM may export per minute (a token bucket); exports over it are
    /// dropped.
    #[arg(long, env = "CAPSA_VMPOOL_GUEST_OTLP_BYTES_PER_MINUTE", default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub guest_otlp_bytes_per_minute: u64,

    /// Warm VMs kept booted per template.
    #[arg(long, env = "CAPSA_VMPOOL_WARM", default_value_t = 2)]
    pub warm: u32,

    /// Refill the warm pools by restoring a snapshot of a freshly booted VM of each template
    /// (made once, kept in the state dir across restarts) instead of cold booting.
    #[arg(long, env = "CAPSA_VMPOOL_WARM_FROM_SNAPSHOT")]
    pub warm_from_snapshot: bool,

    /// VMs booting at once (refills and cold boots together).
    #[arg(long, env = "CAPSA_VMPOOL_MAX_CONCURRENT_BOOTS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_boots: u32,

    /// Most VMs this host holds at once (booting, warm and leased), whatever their size.
    #[arg(long, env = "CAPSA_VMPOOL_CAPACITY", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub capacity: u32,

    /// Memory (MiB) the VMs may take together, each counted as guest RAM plus
    /// --vmm-memory-overhead-mib (its cgroup limit). 0: the host's MemTotal minus
    /// --memory-reserve-mib.
    #[arg(long, env = "CAPSA_VMPOOL_CAPACITY_MEMORY_MIB", default_value_t = 0)]
    pub capacity_memory_mib: u64,

    /// Memory (MiB) kept for the host (its services, page cache) when --capacity-memory-mib
    /// is 0.
    #[arg(long, env = "CAPSA_VMPOOL_MEMORY_RESERVE_MIB", default_value_t = 2048)]
    pub memory_reserve_mib: u64,

    /// vCPUs the VMs may have together. 0: the host's CPUs times --vcpu-overcommit.
    #[arg(long, env = "CAPSA_VMPOOL_CAPACITY_VCPUS", default_value_t = 0)]
    pub capacity_vcpus: u32,

    /// vCPUs per host CPU when --capacity-vcpus is 0. Sessions are mostly idle between
    /// calls, and each VM's cgroup caps it at its own vcpus' worth of CPU time.
    #[arg(long, env = "CAPSA_VMPOOL_VCPU_OVERCOMMIT", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub vcpu_overcommit: u32,

    /// The system user the VMMs run as (`useradd --system capsa-vmm`).
    #[arg(long, env = "CAPSA_VMM_USER", default_value = "capsa-vmm")]
    pub vmm_user: String,

    /// Parent cgroup of the VMs' cgroups, relative to the cgroup root (one child per VM).
    #[arg(long, env = "CAPSA_VM_CGROUP", default_value = "capsa-vm-pool")]
    pub vm_cgroup: String,

    /// QEMU TCG's translated-code cache per VM (MiB; unused under KVM). Once filled it stays
    /// resident: most of what an idle TCG VM costs beyond its guest's own pages. Smaller
    /// packs more idle VMs on a node, at the cost of a slower first Execute (see
    /// BENCHMARKS.md).
    #[arg(long, env = "CAPSA_TCG_TB_MIB", default_value_t = capsa_vmm::DEFAULT_TCG_TB_MIB, value_parser = clap::value_parser!(u32).range(8..=2048))]
    pub tcg_tb_mib: u32,

    /// Memory (MiB) a VM's cgroup allows beyond its guest RAM: the VMM's own (QEMU TCG's
    /// translation cache, its heap).
    #[arg(long, env = "CAPSA_VMM_MEMORY_OVERHEAD_MIB", default_value_t = 320)]
    pub vmm_memory_overhead_mib: u32,

    /// Tasks (threads count) per VM's cgroup.
    #[arg(long, env = "CAPSA_VMM_PIDS_MAX", default_value_t = 512, value_parser = clap::value_parser!(u32).range(32..))]
    pub vmm_pids_max: u32,

    /// Disk bytes per second per VM, reads and writes together (QEMU block throttling);
    /// unset is unthrottled.
    #[arg(long, env = "CAPSA_VM_DISK_BYTES_PER_SEC")]
    pub vm_disk_bytes_per_sec: Option<u64>,

    /// Disk requests per second per VM (QEMU block throttling); unset is unthrottled.
    #[arg(long, env = "CAPSA_VM_DISK_IOPS")]
    pub vm_disk_iops: Option<u64>,

    /// Offer guest RAM to the host's KSM, which then shares identical pages between VMs
    /// (forks and copies of one snapshot above all; KSM itself is the host's to turn on:
    /// `echo 1 > /sys/kernel/mm/ksm/run`). Off by default: KSM merges pages of every
    /// tenant's VMs alike, and the time a write to a merged page takes tells a guest what
    /// another guest holds (page-deduplication side channels).
    #[arg(long, env = "CAPSA_VMPOOL_MERGE_PAGES")]
    pub merge_pages: bool,

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

    /// How long a failed VM stays listed (state FAILED, with its reason) once nobody can
    /// release it: it failed unleased, or during a cold boot whose lease got another VM or
    /// an error. Its processes and files are gone at once either way.
    #[arg(long = "failed-vm-retention-secs", env = "CAPSA_VMPOOL_FAILED_VM_RETENTION_SECS", default_value = "60", value_parser = parse_secs)]
    pub failed_vm_retention: Duration,

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
    pub redis_url: Option<RedisUrl>,

    /// This host's id in the registry (default: the hostname).
    #[arg(long, env = "CAPSA_NODE_ID")]
    pub node_id: Option<String>,

    /// vm-pool's own URL as session-manager should dial it (default: http://<bound addr>,
    /// https:// with --tls-ca).
    #[arg(long, env = "CAPSA_VMPOOL_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// The network namespace holding every VM's tap (created at start-up, removed at
    /// shutdown; a leftover of a crashed run under this name is removed first). Default:
    /// `capsa-<hash of the state dir>`, distinct per state dir.
    #[arg(long, env = "CAPSA_VMPOOL_NETNS", value_parser = parse_netns)]
    pub netns: Option<String>,

    /// Addresses of the VMs, a /30 per VM, inside vm-pool's namespace only (never seen on
    /// the host's network). Must not overlap a host route.
    #[arg(long, env = "CAPSA_VMPOOL_VM_SUBNET", default_value = "100.80.0.0/16")]
    pub vm_subnet: crate::net::addr::Ipv4Net,

    /// Where the /30 between the host and vm-pool's namespace comes from (a free one is
    /// picked at start-up).
    #[arg(
        long,
        env = "CAPSA_VMPOOL_LINK_SUBNET",
        default_value = "100.127.0.0/16"
    )]
    pub link_subnet: crate::net::addr::Ipv4Net,

    /// Resolver the guests' DNS queries are forwarded to, as IP:PORT (repeatable, tried in
    /// order). Default: the nameservers of /etc/resolv.conf.
    #[arg(
        long = "dns-upstream",
        env = "CAPSA_VMPOOL_DNS_UPSTREAM",
        value_delimiter = ','
    )]
    pub dns_upstreams: Vec<std::net::SocketAddr>,

    /// URL of the executor beside this vm-pool, published in the node record.
    #[arg(
        long,
        env = "CAPSA_EXECUTOR_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    pub executor_url: String,
}

fn parse_netns(s: &str) -> Result<String, String> {
    let valid = (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!("netns {s:?}: 1-32 letters, digits, '-' or '_'"))
    }
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

    /// How the VMMs are confined.
    pub fn sandbox(&self) -> capsa_vmm::SandboxConfig {
        capsa_vmm::SandboxConfig {
            user: self.vmm_user.clone(),
            cgroup_parent: self.vm_cgroup.clone(),
            memory_overhead_mib: self.vmm_memory_overhead_mib,
            pids_max: self.vmm_pids_max,
        }
    }

    /// (memory MiB, vcpus) the VMs may take together, defaults resolved from this host.
    pub fn node_capacity(&self) -> (u64, u32) {
        let memory = match self.capacity_memory_mib {
            0 => capsa_vmm::host_memory_mib().saturating_sub(self.memory_reserve_mib),
            n => n,
        };
        let vcpus = match self.capacity_vcpus {
            0 => {
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
                cpus.saturating_mul(self.vcpu_overcommit)
            }
            n => n,
        };
        (memory, vcpus)
    }

    /// The names of this vm-pool's network objects (namespace, veth, nft table).
    pub fn net_names(&self) -> crate::net::Names {
        let netns = self
            .netns
            .clone()
            .unwrap_or_else(|| crate::net::Names::default_netns(&self.state_dir));
        crate::net::Names::new(&netns)
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
        assert!(Config::try_parse_from(["x", "--netns", "a/b"]).is_err());
        assert_eq!(c.tcg_tb_mib, capsa_vmm::DEFAULT_TCG_TB_MIB);
        let small = Config::try_parse_from(["x", "--tcg-tb-mib", "4"]).unwrap_err();
        assert!(small.to_string().contains("--tcg-tb-mib"), "{small}");
        let set = Config::try_parse_from(["x", "--tcg-tb-mib", "256"]).unwrap();
        assert_eq!(set.tcg_tb_mib, 256);
        assert!(Config::try_parse_from(["x", "--vm-subnet", "100.80.0.1/16"]).is_err());
        assert_eq!(c.vm_subnet.to_string(), "100.80.0.0/16");
        let named = Config::try_parse_from(["x", "--netns", "capsa-t1"]).unwrap();
        assert_eq!(named.net_names().netns, "capsa-t1");
        assert!(c.net_names().netns.starts_with("capsa-"));
        // Capacity defaults come from the host; explicit values win.
        let (memory, vcpus) = c.node_capacity();
        assert!(memory > 0 && vcpus >= 8, "{memory} {vcpus}");
        let c = Config::try_parse_from([
            "x",
            "--capacity-memory-mib",
            "3000",
            "--capacity-vcpus",
            "5",
        ])
        .unwrap();
        assert_eq!(c.node_capacity(), (3000, 5));
    }
}
