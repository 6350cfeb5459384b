//! capsa-vm-pool: one per KVM host. Keeps warm microVMs booted per template and hands
//! each out to exactly one lease; a released VM is destroyed, never reused.
//!
//! Start-up: choose the engine ([`capsa_vmm::engine`]), load the templates' images, reap
//! whatever a previous run left in `<state_dir>/vms` ([`capsa_vmm::orphans`]) and the
//! unfinished snapshots in `<state_dir>/snapshots` (complete ones stay: [`snapshots`]),
//! take up the warm pools' base snapshots ([`warm_base`]), start the refill loop and the node heartbeat, serve gRPC. Shutdown, on the caller's signal:
//! health NOT_SERVING and no new calls (capsa-grpc), the pool stops booting and ends watch
//! streams, the node record is removed, then every VM is destroyed.

pub mod boot;
mod capacity;
pub mod config;
mod counters;
pub mod error;
pub mod grpc;
mod metrics;
pub mod net;
pub mod node;
pub mod otlp_relay;
pub mod pool;
pub mod snapshots;
pub mod vm;
mod warm_base;

use std::future::Future;
use std::sync::Arc;

use capsa_proto::vmpool::v1::vm_pool_service_server::VmPoolServiceServer;
use capsa_vmm::{
    CloudHypervisor, CloudHypervisorConfig, EngineKind, GuestImage, HostFacts, Hypervisor, Qemu,
    QemuAccel, QemuConfig,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;
pub use pool::{Pool, Settings, Template};

/// Chooses the engine and builds its driver.
pub fn hypervisor(
    config: &Config,
) -> Result<(Arc<dyn Hypervisor>, capsa_vmm::EngineChoice), Error> {
    let facts = HostFacts::probe(
        config.cloud_hypervisor.clone(),
        None,
        config.pvm_guest_kernel.clone(),
    );
    let choice = capsa_vmm::engine::choose(config.engine, &facts)?;
    tracing::info!(engine = %choice.kind, reason = %choice.reason, "engine chosen");
    let die_with_parent = !config.orphan_vms_on_crash;
    if config.merge_pages && !ksm_running() {
        tracing::warn!(
            "--merge-pages offers guest RAM to KSM, but KSM is off on this host: nothing is \
             merged until `echo 1 > {KSM_RUN}`"
        );
    }
    // Every VMM runs unprivileged, in its VM's cgroup, mount view and seccomp filter.
    let sandbox = Arc::new(capsa_vmm::Sandbox::new(
        config.sandbox(),
        choice.kind != EngineKind::QemuTcg,
    )?);
    tracing::info!(user = %sandbox.user.name, uid = sandbox.user.uid, cgroup_version = sandbox.cgroups.version(), "vmms confined");
    let hv: Arc<dyn Hypervisor> = match choice.kind {
        EngineKind::CloudHypervisor => {
            let qemu_img = QemuConfig::discover(QemuAccel::Kvm)?.qemu_img;
            Arc::new(CloudHypervisor::new(CloudHypervisorConfig {
                binary: choice.binary.clone(),
                qemu_img,
                kernel_override: choice.kernel_override.clone(),
                die_with_parent,
                sandbox: Some(sandbox),
                merge_pages: config.merge_pages,
            }))
        }
        kind => {
            let accel = if kind == EngineKind::QemuKvm {
                QemuAccel::Kvm
            } else {
                QemuAccel::Tcg
            };
            let mut qemu = QemuConfig::discover(accel)?;
            qemu.qemu = choice.binary.clone();
            qemu.kernel_override = choice.kernel_override.clone();
            qemu.die_with_parent = die_with_parent;
            qemu.sandbox = Some(sandbox);
            qemu.disk_bytes_per_sec = config.vm_disk_bytes_per_sec;
            qemu.disk_iops = config.vm_disk_iops;
            qemu.merge_pages = config.merge_pages;
            qemu.tcg_tb_mib = config.tcg_tb_mib;
            Arc::new(Qemu::new(qemu))
        }
    };
    Ok((hv, choice))
}

const KSM_RUN: &str = "/sys/kernel/mm/ksm/run";

/// Whether the kernel's same-page merging is scanning (1; 0 is off, 2 unmerges all).
fn ksm_running() -> bool {
    std::fs::read_to_string(KSM_RUN).is_ok_and(|v| v.trim() == "1")
}

/// Loads every configured template's image.
pub fn templates(config: &Config) -> Result<Vec<Template>, Error> {
    let all = config.all_templates();
    if all.is_empty() {
        return Err(Error::Config(
            "no template: pass --image-dir (and/or --template NAME=DIR)".into(),
        ));
    }
    all.into_iter()
        .map(|(name, dir)| {
            let image = GuestImage::load(&dir)
                .map_err(|e| Error::Config(format!("template {name}: {}", capsa_grpc::error::chain(&e))))?;
            tracing::info!(template = %name, image = %image.dir.display(), hash = %image.hash, "template loaded");
            Ok(Template { name, image, vcpus: config.vcpus, memory_mib: config.memory_mib, warm_target: config.warm })
        })
        .collect()
}

/// Runs vm-pool on `listener` until `shutdown` resolves, then decommissions the node.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let templates = templates(&config)?;
    let (hv, choice) = hypervisor(&config)?;
    std::fs::create_dir_all(config.state_dir.join("vms"))
        .map_err(|e| Error::Config(format!("state dir {}: {e}", config.state_dir.display())))?;
    let reaped = capsa_vmm::orphans::reap(&config.state_dir.join("vms")).await?;
    if !reaped.killed.is_empty() || !reaped.removed_dirs.is_empty() {
        tracing::warn!(killed = ?reaped.killed, dirs = reaped.removed_dirs.len(), "reaped leftovers of a previous run");
    }
    let unfinished = snapshots::prepare(&config.state_dir)?;
    if unfinished > 0 {
        tracing::warn!(
            count = unfinished,
            "removed snapshots a previous run left unfinished"
        );
    }
    // After the reap: a namespace lives as long as a process in it.
    let tap_owner = capsa_vmm::VmmUser::lookup(&config.vmm_user)?.uid;
    let network = net::Network::start(net::NetConfig {
        names: config.net_names(),
        vm_subnet: config.vm_subnet,
        link_subnet: config.link_subnet,
        tap_owner,
        dns: net::dns::DnsConfig {
            upstreams: if config.dns_upstreams.is_empty() {
                net::dns::system_upstreams()
            } else {
                config.dns_upstreams.clone()
            },
            ..Default::default()
        },
    })
    .await?;
    let result = serve(
        config,
        listener,
        shutdown,
        templates,
        hv,
        choice,
        network.clone(),
    )
    .await;
    // Last: the VMs (and with them every process in the namespace) are gone.
    network.shutdown().await;
    result
}

/// Pool, registry and gRPC, until `shutdown`; every VM destroyed on the way out.
async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    templates: Vec<Template>,
    hv: Arc<dyn Hypervisor>,
    choice: capsa_vmm::EngineChoice,
    network: Arc<net::Network>,
) -> Result<(), Error> {
    let node_id = config.node_id.clone().unwrap_or_else(node::hostname);
    let limits = otlp_relay::Limits {
        max_connections: config.guest_otlp_max_connections,
        idle_timeout: config.guest_otlp_idle_timeout,
        bytes_per_minute: config.guest_otlp_bytes_per_minute,
    };
    let guest_otlp = match &config.guest_otlp_endpoint {
        Some(endpoint) => Some(Arc::new(otlp_relay::Relay::new(
            endpoint,
            node_id.clone(),
            limits,
        )?)),
        None => None,
    };
    let (capacity_memory_mib, capacity_vcpus) = config.node_capacity();
    tracing::info!(
        max_vms = config.capacity,
        capacity_memory_mib,
        capacity_vcpus,
        "node capacity"
    );
    let cgroups = capsa_vmm::cgroup::CgroupRoot::detect(&config.vm_cgroup)?;
    let settings = Settings {
        state_dir: config.state_dir.clone(),
        capacity: config.capacity,
        capacity_memory_mib,
        capacity_vcpus,
        vm_overhead_mib: config.vmm_memory_overhead_mib,
        max_concurrent_boots: config.max_concurrent_boots,
        boot_timeout: config.boot_timeout,
        failed_vm_retention: config.failed_vm_retention,
        max_vcpus: config.max_vcpus,
        max_memory_mib: config.max_memory_mib,
        guest_otlp,
        network: Some(network.clone()),
        warm_from_snapshot: config.warm_from_snapshot,
        vm_cgroups: Some(cgroups.clone()),
    };
    let pool = Pool::new(hv, choice, templates, settings);
    warm_base::adopt(&pool).await?;
    let refill = tokio::spawn(boot::refill_loop(pool.0.clone()));
    // CPU-bound sessions yield to interactive ones (capsa_vmm::cpu_balance); booting and
    // warm VMs are never demoted (a refill boot has its own lower weight, set by the boot).
    let leases = pool.clone();
    tokio::spawn(capsa_vmm::cpu_balance::run(
        cgroups,
        move |vm_id| {
            leases
                .get(vm_id)
                .is_ok_and(|vm| vm.state == crate::vm::VmState::Leased)
        },
        pool.closing(),
    ));

    let local = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("listener address: {e}")))?;
    let identity = node::NodeIdentity {
        node_id,
        vmpool_url: config.advertise_url.clone().unwrap_or_else(|| {
            let scheme = if config.common.tls.enabled() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{local}")
        }),
        executor_url: config.executor_url.clone(),
    };
    let stop_heartbeat = CancellationToken::new();
    let heartbeat = match &config.redis_url {
        Some(url) => {
            let registry = node::connect(url.expose(), &identity, &pool).await?;
            tracing::info!(node = %identity.node_id, "node registered");
            Some(tokio::spawn(node::heartbeat_loop(
                registry,
                identity.clone(),
                pool.clone(),
                stop_heartbeat.clone(),
            )))
        }
        None => None,
    };

    let server = capsa_grpc::Server::new()
        .tls(config.common.tls.server())
        .health_listen(config.common.health_listen)
        .add_service(VmPoolServiceServer::new(grpc::Service::new(
            pool.clone(),
            identity.node_id.clone(),
        )));
    let closing = pool.clone();
    let served = capsa_grpc::serve_tcp(server, listener, async move {
        shutdown.await;
        tracing::info!("shutting down");
        // Ends watch streams and pending boots so in-flight calls can drain.
        closing.close();
    })
    .await;

    stop_heartbeat.cancel();
    if let Some(h) = heartbeat {
        let _ = h.await;
    }
    pool.destroy_all().await;
    let _ = refill.await;
    served?;
    Ok(())
}
