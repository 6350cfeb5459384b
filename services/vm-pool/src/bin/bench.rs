//! `capsa-vm-pool-bench`: boot and lease latency on this host's engine, beside the floor.
//!
//! The floor is the same engine booting the do-nothing initramfs of
//! `deploy/guest/build-floor-initramfs.sh` (no disk, no agent; ready = "capsa-floor-ready"
//! on the serial console). Measured, medians over `--samples` runs:
//! - cold boot: VMM start until the agent answers its health check over vsock, split by the
//!   guest's uptime stamps on the console (`deploy/guest/capsa-init`) into the kernel (to
//!   init), init (to the agent's exec), and the rest (the agent coming up and answering, and
//!   the VMM's own start-up, which the guest's clock does not see);
//! - VMM resident memory of an idle VM (agent image and floor);
//! - snapshot of a running VM beside the time to write its memory size to the same disk;
//!   a fork (snapshot, the VM running on, a copy restored to its first Execute) and a
//!   restore, each beside the cold boot; the memory of three copies of one snapshot beside
//!   three idle VMs';
//! - warm AcquireVm latency (gRPC, in-process vm-pool on 127.0.0.1:0) with 1 caller, and
//!   with `--concurrency` callers at once against a pool pre-warmed to that size.
//!
//! Network, medians over `--net-samples` leases (0 skips it; needs root), against a fake
//! internet namespace ([`FakeInternet`], 198.18.k.0/24, nothing leaves the host):
//! - a freshly leased VM's first outbound TCP connect, timed in the guest (python3
//!   `time.monotonic()` around `socket.create_connection`), and the p50 of AcquireVm plus
//!   that probe as seen from the host;
//! - bulk download (`GET /bytes/N`, `--net-bytes`) into the guest, timed in the guest, beside
//!   the floor: the same download from the host's namespace, over the fake internet's veth.
//!
//! Run: `cargo run --release -p capsa-vm-pool --bin capsa-vm-pool-bench` (`--json` adds a
//! last line with the figures as one JSON object).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use capsa_proto::common::v1::EgressPolicy;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use capsa_proto::vmpool::v1::{AcquireVmRequest, GetNodeInfoRequest, ReleaseVmRequest};
use capsa_test_support::inet::{FakeInternet, MAX_BYTES};
use capsa_vmm::{GuestImage, Hypervisor, VmSpec};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "capsa-vm-pool-bench",
    about = "Boot and lease latency beside the floor"
)]
struct Args {
    /// Guest image (default: $CAPSA_CACHE_DIR/images/current).
    #[arg(long, env = "CAPSA_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    /// Boots per measurement (cold and floor), and sequential warm acquires.
    #[arg(long, default_value_t = 5)]
    samples: usize,
    /// Concurrent AcquireVm callers in the concurrent round (the pool is pre-warmed to it).
    #[arg(long, default_value_t = 50)]
    concurrency: u32,
    /// Memory of every VM, floor included (MiB).
    #[arg(long, default_value_t = 512)]
    memory_mib: u32,
    /// Leases in the network round, each a fresh warm VM (0 skips the round).
    #[arg(long, default_value_t = 5)]
    net_samples: usize,
    /// Bytes of each bulk download, guest and floor.
    #[arg(long, default_value_t = 32 << 20, value_parser = clap::value_parser!(u64).range(1..=MAX_BYTES))]
    net_bytes: u64,
    /// Offer guest RAM to KSM (vm-pool's `--merge-pages`) and run KSM for the bench (its
    /// settings are put back at the end): the three copies of one snapshot then share
    /// their identical pages.
    #[arg(long)]
    merge_pages: bool,
    /// Print, as the last line, one JSON object with the figures (`engine`, `cold_boot_ratio`,
    /// `idle_rss_ratio`, `acquire_p50_ms`, ...) for scripts.
    #[arg(long)]
    json: bool,
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// A boot that is not ready in this long is counted as hung, reported, and tried once more
/// (vm-pool does the same with its health-check deadline); generous for TCG under load.
const BOOT_HANG: Duration = Duration::from_secs(120);
/// Time an idle VM gets to settle before its resident memory is read.
const SETTLE: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = capsa_telemetry::init(
        "capsa-vm-pool-bench",
        &capsa_telemetry::Settings::from_env("warn"),
    )?;
    let image_dir = args.image_dir.clone().unwrap_or_else(|| {
        let cache =
            std::env::var_os("CAPSA_CACHE_DIR").unwrap_or_else(|| "/var/cache/capsa".into());
        PathBuf::from(cache).join("images/current")
    });
    let image = GuestImage::load(&image_dir)
        .context("guest image (build it with deploy/guest/build-image.sh)")?;
    let floor = floor_initramfs()?;
    let state = tempfile::Builder::new()
        .prefix("capsa-vmpool-bench-")
        .tempdir()?;
    let mut config = capsa_vm_pool::Config::for_image(state.path().to_owned(), image_dir.clone());
    config.memory_mib = args.memory_mib;
    config.merge_pages = args.merge_pages;
    let tcg_tb_mib = config.tcg_tb_mib;
    let ksm = args.merge_pages.then(Ksm::start).transpose()?;
    let (hv, choice) = capsa_vm_pool::hypervisor(&config)?;
    println!("engine: {} ({})", choice.kind, choice.reason);

    let kind = choice.kind;
    let mut n = 0;
    let mut spec = |floor_boot: bool| {
        n += 1;
        let id = format!("vm-bench{n}");
        VmSpec {
            dir: state.path().join("vms").join(&id),
            net: None,
            id,
            vcpus: 1,
            memory_mib: args.memory_mib,
            kernel: image.kernel_for(kind).to_owned(),
            cmdline: if floor_boot {
                capsa_vmm::image::tcg_cmdline(
                    "console=ttyS0 panic=-1 quiet",
                    image.tcg_append.as_deref(),
                    kind,
                )
            } else {
                image.cmdline_for(kind)
            },
            rootfs_base: (!floor_boot).then(|| image.rootfs.clone()),
            initrd: floor_boot.then(|| floor.clone()),
        }
    };

    let (mut floor_boot, mut floor_rss, mut cold_boot, mut cold_rss) =
        (vec![], vec![], vec![], vec![]);
    let (mut kernel_phase, mut init_phase, mut agent_phase) = (vec![], vec![], vec![]);
    let mut hung = 0;
    for i in 0..args.samples {
        eprintln!("boot sample {}/{}", i + 1, args.samples);
        let floor = boot_measured(&hv, spec(true), Ready::Console, &mut hung).await?;
        floor_boot.push(floor.took);
        floor_rss.push(floor.rss);
        let cold = boot_measured(&hv, spec(false), Ready::Agent, &mut hung).await?;
        cold_boot.push(cold.took);
        cold_rss.push(cold.rss);
        let (init_at, agent_at) = cold
            .stamps
            .context("no capsa-init uptime stamps on the console (an image older than them?)")?;
        kernel_phase.push(init_at);
        init_phase.push(agent_at.saturating_sub(init_at));
        agent_phase.push(cold.took.saturating_sub(agent_at));
    }

    let mut snapshot_samples = Vec::new();
    for _ in 0..args.samples {
        snapshot_samples.push((spec(false), [spec(false), spec(false), spec(false)]));
    }
    let snaps = snapshot_round(
        &hv,
        snapshot_samples,
        state.path(),
        args.memory_mib,
        ksm.as_ref(),
    )
    .await?;

    let (warm_1, warm_n) = warm_acquires(&args, config.clone()).await?;
    let net = if args.net_samples > 0 {
        Some(network(&args, config).await?)
    } else {
        None
    };

    let floor_med = median(&mut floor_boot);
    let mut json = serde_json::Map::new();
    json.insert("engine".into(), kind.as_str().into());
    json.insert("tcg_tb_mib".into(), tcg_tb_mib.into());
    json.insert("samples".into(), args.samples.into());
    json.insert("floor_boot_ms".into(), ms(floor_med).into());
    let row = |name: &str, value: String, ratio: String| {
        println!("| {name:<44} | {value:>12} | {ratio:>16} |")
    };
    println!();
    println!(
        "| {:<44} | {:>12} | {:>16} |",
        "measurement (median unless noted)", "value", "vs floor boot"
    );
    println!("|{:-<46}|{:-<14}|{:-<18}|", "", "", "");
    row(
        "floor boot to console ready",
        fmt_d(floor_med),
        "1.00x".into(),
    );
    let cold = median(&mut cold_boot);
    row(
        "cold boot to agent ready",
        fmt_d(cold),
        ratio(cold, floor_med),
    );
    json.insert("cold_boot_ms".into(), ms(cold).into());
    json.insert("boots_hung".into(), hung.into());
    for (label, key, mut v) in [
        (
            "  kernel, to init (guest uptime)",
            "boot_kernel_ms",
            kernel_phase,
        ),
        ("  init, to the agent's exec", "boot_init_ms", init_phase),
        (
            "  agent up and healthy, and VMM start",
            "boot_agent_ms",
            agent_phase,
        ),
    ] {
        let m = median(&mut v);
        row(label, fmt_d(m), ratio(m, floor_med));
        json.insert(key.into(), ms(m).into());
    }
    json.insert(
        "cold_boot_ratio".into(),
        (cold.as_secs_f64() / floor_med.as_secs_f64().max(1e-9)).into(),
    );
    for (label, key, mut v) in [
        ("warm AcquireVm, 1 caller", "acquire", warm_1),
        (
            &*format!("warm AcquireVm, {} callers", args.concurrency),
            "acquire_concurrent",
            warm_n,
        ),
    ] {
        let (p50, p99) = (percentile(&mut v, 50), percentile(&mut v, 99));
        row(&format!("{label}: p50"), fmt_d(p50), ratio(p50, floor_med));
        row(&format!("{label}: p99"), fmt_d(p99), ratio(p99, floor_med));
        json.insert(format!("{key}_p50_ms"), ms(p50).into());
        json.insert(format!("{key}_p99_ms"), ms(p99).into());
    }
    json.insert("acquire_concurrency".into(), args.concurrency.into());
    let SnapFigures {
        mut snapshot,
        mut bytes,
        mut fork,
        mut fork_healthy,
        mut restore,
        mut restored_rss,
        mut three_copies_rss,
        mut write,
    } = snaps;
    let (snap, write_floor, restored) = (
        median(&mut snapshot),
        median(&mut write),
        median(&mut restore),
    );
    let snap_mib = median_u(&mut bytes) as f64 / f64::from(1 << 20);
    row(
        &format!("snapshot of a running {} MiB VM", args.memory_mib),
        fmt_d(snap),
        format!(
            "{:.2}x disk write",
            snap.as_secs_f64() / write_floor.as_secs_f64().max(1e-9)
        ),
    );
    row(
        "  its size on disk (state and disk layer)",
        format!("{snap_mib:.1} MiB"),
        String::new(),
    );
    row(
        &format!("  floor: write {} MiB to that disk, fsync", args.memory_mib),
        fmt_d(write_floor),
        "1.00x disk write".into(),
    );
    row(
        "restore from the snapshot to agent ready",
        fmt_d(restored),
        format!(
            "{:.2}x cold boot",
            restored.as_secs_f64() / cold.as_secs_f64().max(1e-9)
        ),
    );
    let forked = median(&mut fork);
    row(
        "fork of a live VM to the copy's 1st Execute",
        fmt_d(forked),
        format!(
            "{:.2}x cold boot",
            forked.as_secs_f64() / cold.as_secs_f64().max(1e-9)
        ),
    );
    // Where the fork's time goes: what follows the copy's health check is TCG translating
    // the interpreter's code again in a new process (on KVM it is the Execute alone).
    let fork_healthy = median(&mut fork_healthy);
    row(
        "  to the copy's agent answering its health check",
        fmt_d(fork_healthy),
        format!(
            "{:.2}x cold boot",
            fork_healthy.as_secs_f64() / cold.as_secs_f64().max(1e-9)
        ),
    );
    let restored_rss = median_u(&mut restored_rss);
    let (cr, fr) = (median_u(&mut cold_rss), median_u(&mut floor_rss));
    // What an idle VM of a pool refilled by restore (`--warm-from-snapshot`) holds: TCG has
    // translated only the code it ran since the restore, not the whole boot's.
    let restored_rss_ratio = restored_rss as f64 / fr.max(1) as f64;
    row(
        "VMM resident memory, restored idle VM",
        format!("{} MiB", restored_rss >> 20),
        format!("{restored_rss_ratio:.2}x floor RSS"),
    );
    let three = median_u(&mut three_copies_rss);
    let three_ratio = three as f64 / (3 * cr).max(1) as f64;
    row(
        &format!(
            "VMM memory (PSS), 3 copies of one VM{}",
            if args.merge_pages { ", KSM" } else { "" }
        ),
        format!("{} MiB", three >> 20),
        format!("{three_ratio:.2}x 3 idle VMs"),
    );
    json.insert("fork_ms".into(), ms(forked).into());
    json.insert("fork_healthy_ms".into(), ms(fork_healthy).into());
    json.insert(
        "fork_cold_ratio".into(),
        (forked.as_secs_f64() / cold.as_secs_f64().max(1e-9)).into(),
    );
    json.insert("three_copies_rss_ratio".into(), three_ratio.into());
    json.insert("merge_pages".into(), args.merge_pages.into());
    json.insert("snapshot_ms".into(), ms(snap).into());
    json.insert("snapshot_mib".into(), snap_mib.into());
    json.insert("disk_write_ms".into(), ms(write_floor).into());
    json.insert(
        "snapshot_write_ratio".into(),
        (snap.as_secs_f64() / write_floor.as_secs_f64().max(1e-9)).into(),
    );
    json.insert("restore_ms".into(), ms(restored).into());
    json.insert(
        "restore_cold_ratio".into(),
        (restored.as_secs_f64() / cold.as_secs_f64().max(1e-9)).into(),
    );
    json.insert(
        "restored_rss_mib".into(),
        (restored_rss as f64 / f64::from(1 << 20)).into(),
    );
    json.insert("restored_rss_ratio".into(), restored_rss_ratio.into());
    json.insert(
        "idle_rss_mib".into(),
        (cr as f64 / f64::from(1 << 20)).into(),
    );
    json.insert(
        "floor_rss_mib".into(),
        (fr as f64 / f64::from(1 << 20)).into(),
    );
    json.insert(
        "idle_rss_ratio".into(),
        (cr as f64 / fr.max(1) as f64).into(),
    );
    row(
        "VMM resident memory, idle agent VM",
        format!("{} MiB", cr >> 20),
        format!("{:.2}x floor RSS", cr as f64 / fr.max(1) as f64),
    );
    row(
        "VMM resident memory, idle floor VM",
        format!("{} MiB", fr >> 20),
        "1.00x floor RSS".into(),
    );
    if let Some(mut net) = net {
        let connect = median(&mut net.connect);
        row(
            "leased VM's first TCP connect (in guest)",
            fmt_d(connect),
            ratio(connect, floor_med),
        );
        let trip = percentile(&mut net.round_trip, 50);
        row(
            "AcquireVm to guest connected, from host: p50",
            fmt_d(trip),
            ratio(trip, floor_med),
        );
        println!();
        println!(
            "| {:<44} | {:>12} | {:>16} |",
            "bulk download, median", "MB/s", "vs host floor"
        );
        println!("|{:-<46}|{:-<14}|{:-<18}|", "", "", "");
        let (guest, host) = (median_f(&mut net.guest_mbps), median_f(&mut net.host_mbps));
        json.insert("first_connect_ms".into(), ms(connect).into());
        json.insert("acquire_to_connected_p50_ms".into(), ms(trip).into());
        json.insert("download_mbps".into(), guest.into());
        json.insert("download_ratio".into(), (guest / host.max(1e-9)).into());
        let mib = args.net_bytes as f64 / f64::from(1 << 20);
        row(
            &format!("guest <- fake internet ns, {mib:.0} MiB"),
            format!("{guest:.1}"),
            format!("{:.4}x", guest / host.max(1e-9)),
        );
        row(
            &format!("host ns <- fake internet ns (floor), {mib:.0} MiB"),
            format!("{host:.1}"),
            "1.00x".into(),
        );
    }
    let tb = if kind == capsa_vmm::EngineKind::QemuTcg {
        format!(", translation cache {tcg_tb_mib} MiB")
    } else {
        String::new()
    };
    println!(
        "\n{} boot samples each ({hung} hung and were retried); {} sequential warm acquires; \
         {} network leases; engine {kind}{tb}",
        args.samples, args.samples, args.net_samples
    );
    if args.json {
        println!("{}", serde_json::Value::Object(json));
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[derive(Clone, Copy)]
enum Ready {
    Console,
    Agent,
}

/// Boots once; returns the time to ready and the VMM's resident bytes once idle.
/// One boot's figures.
struct Boot {
    took: Duration,
    rss: u64,
    /// Guest uptime at init's start and at the agent's exec (agent image only).
    stamps: Option<(Duration, Duration)>,
}

/// The guest's uptime stamps `capsa-init` writes to the console.
fn boot_stamps(console: &str) -> Option<(Duration, Duration)> {
    let stamp = |prefix: &str| {
        console.lines().find_map(|l| {
            let secs = l.trim().strip_prefix(prefix)?.strip_suffix('s')?;
            Duration::try_from_secs_f64(secs.parse().ok()?).ok()
        })
    };
    Some((
        stamp("capsa-init: started at ")?,
        stamp("capsa-init: starting agent at ")?,
    ))
}

/// Boots `spec` until ready; a boot that hangs is reported on stderr, counted in `hung`, and
/// tried once more with a fresh VM.
async fn boot_measured(
    hv: &Arc<dyn Hypervisor>,
    mut spec: VmSpec,
    ready: Ready,
    hung: &mut u32,
) -> anyhow::Result<Boot> {
    match boot_once(hv, &spec, ready).await {
        Err(BootError::Hung(report)) => {
            eprintln!("{report}\nretrying that boot once");
            *hung += 1;
            spec.id.push_str("-retry");
            spec.dir.set_file_name(&spec.id);
            boot_once(hv, &spec, ready)
                .await
                .map_err(anyhow::Error::from)
        }
        other => other.map_err(anyhow::Error::from),
    }
}

#[derive(Debug, thiserror::Error)]
enum BootError {
    #[error("{0}")]
    Hung(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<capsa_vmm::VmmError> for BootError {
    fn from(e: capsa_vmm::VmmError) -> BootError {
        BootError::Other(e.into())
    }
}

async fn boot_once(
    hv: &Arc<dyn Hypervisor>,
    spec: &VmSpec,
    ready: Ready,
) -> Result<Boot, BootError> {
    let started = Instant::now();
    let vm = hv.boot(spec).await?;
    let vsock = vm.vsock_path();
    let outcome = tokio::time::timeout(BOOT_HANG, async {
        match ready {
            Ready::Console => vm
                .wait_for_console("capsa-floor-ready")
                .await
                .map_err(anyhow::Error::from),
            Ready::Agent => {
                capsa_vm_pool::boot::wait_healthy(&vsock).await;
                Ok(())
            }
        }
    })
    .await;
    let took = started.elapsed();
    let result = match outcome {
        Ok(Ok(())) => {
            let console = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
            tokio::time::sleep(SETTLE).await;
            Ok(Boot {
                took,
                rss: vm.counters().await?.vmm_resident_bytes,
                stamps: boot_stamps(&console),
            })
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => {
            let console = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(20).collect();
            Err(BootError::Hung(format!(
                "{} not ready within {BOOT_HANG:?}; the end of its console:\n{}",
                vm.id(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )))
        }
    };
    vm.destroy().await?;
    result
}

/// Figures of the snapshot round, one entry per sample.
struct SnapFigures {
    /// Snapshot of a running VM whose agent is up, to a directory, fsynced.
    snapshot: Vec<Duration>,
    /// Bytes of each snapshot (machine state and disk layer).
    bytes: Vec<u64>,
    /// Fork of a running VM: its snapshot, the VM running again, a copy restored from the
    /// snapshot and that copy's first Execute answered.
    fork: Vec<Duration>,
    /// The same fork, to the copy's agent answering its health check (before that Execute).
    fork_healthy: Vec<Duration>,
    /// Restore of that snapshot into a new VM, to its agent's first answer.
    restore: Vec<Duration>,
    /// The restored VM's resident memory once idle.
    restored_rss: Vec<u64>,
    /// Memory of three copies restored from one snapshot, together, once idle: the sum of
    /// their proportional set sizes (a page the copies share counts once in all).
    three_copies_rss: Vec<u64>,
    /// The disk floor: writing the VM's memory size to a file beside the snapshots, fsynced.
    write: Vec<Duration>,
}

/// Per sample: boots `boot` to agent ready and runs one Execute, forks it into `copies[0]` (timed to the copy's
/// first Execute), stops the parent, restores the snapshot twice more into `copies[1..]`
/// (timed to agent ready), measures the three copies' memory; then times the disk floor.
async fn snapshot_round(
    hv: &Arc<dyn Hypervisor>,
    samples: Vec<(VmSpec, [VmSpec; 3])>,
    state: &std::path::Path,
    memory_mib: u32,
    ksm: Option<&Ksm>,
) -> anyhow::Result<SnapFigures> {
    let mut figures = SnapFigures {
        snapshot: vec![],
        bytes: vec![],
        fork: vec![],
        fork_healthy: vec![],
        restore: vec![],
        restored_rss: vec![],
        three_copies_rss: vec![],
        write: vec![],
    };
    let count = samples.len();
    for (i, (boot, copies)) in samples.into_iter().enumerate() {
        eprintln!("snapshot sample {}/{count}", i + 1);
        let vm = hv.boot(&boot).await?;
        // Live like a session: its Python kernel is up.
        if !ready(&vm.vsock_path()).await || first_execute(&vm.vsock_path()).await.is_err() {
            vm.destroy().await?;
            anyhow::bail!("{} not ready within {BOOT_HANG:?}", boot.id);
        }
        let dir = state.join(format!("snapshot-{}", boot.id));
        let [first, second, third] = copies;
        let started = Instant::now();
        let snapshotted = vm.snapshot(&dir).await;
        figures.snapshot.push(started.elapsed());
        let resumed = vm.resume().await;
        let parent_ran_on = snapshotted
            .context("snapshot")
            .and(resumed.context("resume after the snapshot"));
        let forked = match parent_ran_on {
            Ok(()) => hv.restore(&first, &dir).await.context("restore"),
            Err(e) => Err(e),
        };
        let forked = match forked {
            Ok(copy) => copy,
            Err(e) => {
                vm.destroy().await?;
                return Err(e);
            }
        };
        let healthy = ready(&forked.vsock_path()).await;
        let healthy_at = started.elapsed();
        let answered = healthy && first_execute(&forked.vsock_path()).await.is_ok();
        figures.fork.push(started.elapsed());
        figures.fork_healthy.push(healthy_at);
        vm.destroy().await?;
        if !answered {
            forked.destroy().await?;
            anyhow::bail!("fork {} did not answer within {BOOT_HANG:?}", first.id);
        }
        figures.bytes.push(dir_bytes(&dir)?);

        let mut live = vec![forked];
        for spec in [second, third] {
            let started = Instant::now();
            let restored = hv.restore(&spec, &dir).await.context("restore")?;
            let healthy = ready(&restored.vsock_path()).await;
            figures.restore.push(started.elapsed());
            live.push(restored);
            if !healthy {
                for vm in live {
                    vm.destroy().await?;
                }
                anyhow::bail!("restored {} not ready within {BOOT_HANG:?}", spec.id);
            }
        }
        tokio::time::sleep(SETTLE).await;
        if let Some(ksm) = ksm {
            ksm.settle().await;
        }
        let mut together = 0;
        for (k, vm) in live.iter().enumerate() {
            if k == 1 {
                figures
                    .restored_rss
                    .push(vm.counters().await?.vmm_resident_bytes);
            }
            together += capsa_vmm::proportional_bytes(vm.vmm_pid())?;
        }
        figures.three_copies_rss.push(together);
        for vm in live {
            vm.destroy().await?;
        }
        std::fs::remove_dir_all(&dir)?;
        figures.write.push(disk_write(state, memory_mib)?);
    }
    Ok(figures)
}

/// The host's KSM, run for the bench with a fast scan and put back as it was when dropped.
struct Ksm {
    saved: Vec<(&'static str, String)>,
}

impl Ksm {
    const DIR: &'static str = "/sys/kernel/mm/ksm";
    /// Fast enough that three idle VMs are scanned in a few seconds (2 cores).
    const SETTINGS: [(&'static str, &'static str); 3] = [
        ("pages_to_scan", "5000"),
        ("sleep_millisecs", "10"),
        ("run", "1"),
    ];
    /// Longest wait for the merging to settle.
    const SETTLE_LIMIT: Duration = Duration::from_secs(120);

    fn start() -> anyhow::Result<Ksm> {
        let mut ksm = Ksm { saved: vec![] };
        for (name, value) in Self::SETTINGS {
            let path = format!("{}/{name}", Self::DIR);
            let old = std::fs::read_to_string(&path)
                .with_context(|| format!("read {path} (KSM needs a kernel with CONFIG_KSM)"))?;
            std::fs::write(&path, value).with_context(|| format!("write {path} (root)"))?;
            ksm.saved.push((name, old.trim().to_owned()));
        }
        Ok(ksm)
    }

    fn read(name: &str) -> u64 {
        std::fs::read_to_string(format!("{}/{name}", Self::DIR))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until KSM has gone over every page twice since now (a page is merged on its
    /// second look) and the count of shared pages stopped growing, or [`Self::SETTLE_LIMIT`].
    async fn settle(&self) {
        let deadline = Instant::now() + Self::SETTLE_LIMIT;
        let scans = Self::read("full_scans");
        let mut sharing = Self::read("pages_sharing");
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = Self::read("pages_sharing");
            if Self::read("full_scans") >= scans + 2 && now <= sharing {
                return;
            }
            sharing = now;
        }
        eprintln!("KSM still merging after {:?}", Self::SETTLE_LIMIT);
    }
}

impl Drop for Ksm {
    fn drop(&mut self) {
        // `run` first: the scan stops before its rate goes back.
        for (name, old) in self.saved.iter().rev() {
            let _ = std::fs::write(format!("{}/{name}", Self::DIR), old);
        }
    }
}

/// Whether the agent behind `vsock` answers its health check within [`BOOT_HANG`].
async fn ready(vsock: &std::path::Path) -> bool {
    tokio::time::timeout(BOOT_HANG, capsa_vm_pool::boot::wait_healthy(vsock))
        .await
        .is_ok()
}

/// One Python Execute (`x = 1`) through the agent, to its completion (the first starts the
/// Python kernel).
async fn first_execute(vsock: &std::path::Path) -> anyhow::Result<()> {
    use capsa_proto::agent::v1::ExecuteRequest;
    use capsa_proto::agent::v1::agent_service_client::AgentServiceClient;
    use capsa_proto::common::v1::{ExecuteSpec, Language, execute_event};
    let channel = capsa_vsock::channel(vsock.to_owned(), capsa_vsock::AGENT_PORT);
    let run = async {
        let mut stream = AgentServiceClient::new(channel)
            .execute(ExecuteRequest {
                spec: Some(ExecuteSpec {
                    language: Language::Python as i32,
                    code: "x = 1".into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner();
        while let Some(msg) = stream.message().await? {
            if let Some(execute_event::Event::Completion(_)) = msg.event.and_then(|e| e.event) {
                return Ok(());
            }
        }
        bail!("the execute ended without a completion")
    };
    tokio::time::timeout(BOOT_HANG, run).await?
}

fn dir_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        total += entry?.metadata()?.len();
    }
    Ok(total)
}

/// Time to write `mib` MiB of non-zero bytes to a new file in `dir` and fsync it.
fn disk_write(dir: &std::path::Path, mib: u32) -> anyhow::Result<Duration> {
    use std::io::Write as _;
    let path = dir.join("disk-floor");
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8 + 1).collect();
    let started = Instant::now();
    let mut file = std::fs::File::create(&path)?;
    for _ in 0..mib {
        file.write_all(&block)?;
    }
    file.sync_all()?;
    let took = started.elapsed();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(took)
}

/// Warm AcquireVm latencies: `samples` sequential ones, then `concurrency` at once.
async fn warm_acquires(
    args: &Args,
    mut config: capsa_vm_pool::Config,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    config.warm = args.concurrency.max(1);
    config.capacity = args.concurrency.max(1) + 2;
    config.max_concurrent_boots = 2;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(capsa_vm_pool::run(config, listener, async move {
        let _ = stopped.await;
    }));
    let mut c = VmPoolServiceClient::connect(url).await?;
    let acquire = |c: &mut VmPoolServiceClient<tonic::transport::Channel>, lease: String| {
        let mut c = c.clone();
        async move {
            let t = Instant::now();
            let r = c
                .acquire_vm(AcquireVmRequest {
                    lease_id: lease,
                    ..Default::default()
                })
                .await?
                .into_inner();
            anyhow::Ok((
                t.elapsed(),
                r.warm_hit,
                r.vm.map(|v| v.id).unwrap_or_default(),
            ))
        }
    };

    eprintln!("pre-warming {} VMs", args.concurrency);
    wait_warm(&mut c, args.concurrency).await?;
    let round = futures::future::join_all(
        (0..args.concurrency).map(|i| acquire(&mut c, format!("concurrent-{i}"))),
    )
    .await;
    let mut concurrent = vec![];
    for r in round {
        let (took, warm_hit, id) = r?;
        if !warm_hit {
            bail!("a concurrent acquire missed the warm pool");
        }
        concurrent.push(took);
        c.release_vm(ReleaseVmRequest { vm_id: id }).await?;
    }

    let mut sequential = vec![];
    for i in 0..args.samples {
        wait_warm(&mut c, 1).await?;
        let (took, warm_hit, id) = acquire(&mut c, format!("seq-{i}")).await?;
        if !warm_hit {
            bail!("a sequential acquire missed the warm pool");
        }
        sequential.push(took);
        c.release_vm(ReleaseVmRequest { vm_id: id }).await?;
    }
    let _ = stop.send(());
    server.await??;
    Ok((sequential, concurrent))
}

/// In the guest: times the first TCP connect to argv host:port, then a `GET /bytes/N` on that
/// connection read to EOF. Prints `connect <s>` and `bulk <bytes read> <s>`.
const NET_PROBE: &str = r#"
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.monotonic()
s = socket.create_connection((host, port), timeout=60)
print(f"connect {time.monotonic() - t:.6f}", flush=True)
s.sendall(b"GET /bytes/%d HTTP/1.0\r\nHost: x\r\n\r\n" % n)
buf, got = bytearray(1 << 20), 0
t = time.monotonic()
while True:
    k = s.recv_into(buf)
    if not k:
        break
    got += k
print(f"bulk {got} {time.monotonic() - t:.6f}", flush=True)
"#;

struct NetFigures {
    connect: Vec<Duration>,
    round_trip: Vec<Duration>,
    guest_mbps: Vec<f64>,
    host_mbps: Vec<f64>,
}

/// The network round: the host floor first, then `net_samples` leases of a fresh warm VM,
/// each allowed the fake internet's subnet, probed once and released (destroyed).
async fn network(args: &Args, mut config: capsa_vm_pool::Config) -> anyhow::Result<NetFigures> {
    let mut inet = FakeInternet::start().context("fake internet (needs root)")?;
    let target = inet.add_host("bench.capsa.test")?;
    let mut host_mbps = vec![];
    for _ in 0..args.net_samples {
        host_mbps.push(host_download(target, args.net_bytes).await?);
    }

    config.warm = 1;
    config.capacity = 2;
    config.dns_upstreams = vec![inet.dns_server()];
    let vms_dir = config.state_dir.join("vms");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(capsa_vm_pool::run(config, listener, async move {
        let _ = stopped.await;
    }));
    let leases = async {
        let mut c = VmPoolServiceClient::connect(url).await?;
        let mut figures = NetFigures {
            connect: vec![],
            round_trip: vec![],
            guest_mbps: vec![],
            host_mbps,
        };
        for i in 0..args.net_samples {
            eprintln!("network lease {}/{}", i + 1, args.net_samples);
            wait_warm(&mut c, 1).await?;
            let started = Instant::now();
            let vm = c
                .acquire_vm(AcquireVmRequest {
                    lease_id: format!("net-{i}"),
                    egress: Some(EgressPolicy {
                        allowed_cidrs: vec![inet.subnet()],
                        allow_http: Some(true),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .vm
                .context("AcquireVm returned no vm")?;
            let vsock = vms_dir.join(&vm.id).join("vsock.sock");
            let code = format!(
                "python3 - {target} 80 {} <<'EOF'\n{NET_PROBE}\nEOF",
                args.net_bytes
            );
            let probe = guest_shell(&vsock, &code, |out| {
                out.contains("connect ").then(|| started.elapsed())
            })
            .await;
            c.release_vm(ReleaseVmRequest { vm_id: vm.id }).await?;
            let ((rc, out), trip) = probe?;
            let parsed = (|| {
                let mut lines = out.lines().filter_map(|l| l.split_once(' '));
                let (_, connect) = lines.find(|(k, _)| *k == "connect")?;
                let (_, bulk) = lines.find(|(k, _)| *k == "bulk")?;
                let (got, secs) = bulk.split_once(' ')?;
                Some((
                    connect.parse::<f64>().ok()?,
                    got.parse::<u64>().ok()?,
                    secs.parse::<f64>().ok()?,
                ))
            })();
            let (Some((connect, got, secs)), 0, Some(trip)) = (parsed, rc, trip) else {
                bail!(
                    "network probe in {} failed (exit {rc}): {out}",
                    vsock.display()
                );
            };
            if got < args.net_bytes {
                bail!("guest read {got} of {} bytes: {out}", args.net_bytes);
            }
            figures.connect.push(Duration::from_secs_f64(connect));
            figures.round_trip.push(trip);
            figures
                .guest_mbps
                .push(args.net_bytes as f64 / 1e6 / secs.max(1e-9));
        }
        anyhow::Ok(figures)
    }
    .await;
    // Stop the pool (destroying its VMs and namespace) whatever happened; then the fake
    // internet goes when `inet` drops.
    let _ = stop.send(());
    let stopped = server.await;
    let figures = leases?;
    stopped??;
    Ok(figures)
}

/// The floor: `GET /bytes/n` from the host's namespace, read to EOF in 1 MiB reads like the
/// guest probe; MB/s from the request to EOF.
async fn host_download(target: std::net::IpAddr, n: u64) -> anyhow::Result<f64> {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        let mut s =
            std::net::TcpStream::connect_timeout(&(target, 80).into(), Duration::from_secs(10))?;
        s.write_all(format!("GET /bytes/{n} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        let t = Instant::now();
        loop {
            match s.read(&mut buf)? {
                0 => break,
                k => got += k as u64,
            }
        }
        let secs = t.elapsed().as_secs_f64();
        if got < n {
            bail!("host read {got} of {n} bytes");
        }
        Ok(n as f64 / 1e6 / secs.max(1e-9))
    })
    .await?
}

/// Runs `code` in the guest's shell through its agent: (exit code, stdout+stderr), and the
/// first `Some` `mark` returned on the output so far (it sees it after every chunk).
async fn guest_shell<T>(
    vsock: &std::path::Path,
    code: &str,
    mut mark: impl FnMut(&str) -> Option<T>,
) -> anyhow::Result<((i32, String), Option<T>)> {
    use capsa_proto::agent::v1::ExecuteRequest;
    use capsa_proto::agent::v1::agent_service_client::AgentServiceClient;
    use capsa_proto::common::v1::{ExecuteSpec, Language, execute_event};
    let channel = capsa_vsock::channel(vsock.to_owned(), capsa_vsock::AGENT_PORT);
    let mut stream = AgentServiceClient::new(channel)
        .execute(ExecuteRequest {
            spec: Some(ExecuteSpec {
                language: Language::Shell as i32,
                code: code.into(),
                timeout: Some(prost_types::Duration {
                    seconds: BOOT_TIMEOUT.as_secs() as i64,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    let (mut out, mut marked) = (String::new(), None);
    while let Some(msg) = stream.message().await? {
        match msg.event.and_then(|e| e.event) {
            Some(execute_event::Event::Stdout(c) | execute_event::Event::Stderr(c)) => {
                out.push_str(&String::from_utf8_lossy(&c.data));
                if marked.is_none() {
                    marked = mark(&out);
                }
            }
            Some(execute_event::Event::Completion(c)) => return Ok(((c.exit_code, out), marked)),
            _ => {}
        }
    }
    bail!("execute ended without a completion: {out}")
}

async fn wait_warm(
    c: &mut VmPoolServiceClient<tonic::transport::Channel>,
    n: u32,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + BOOT_TIMEOUT * 4;
    loop {
        let info = c.get_node_info(GetNodeInfoRequest {}).await?.into_inner();
        if info.pools.iter().map(|p| p.warm).sum::<u32>() >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("pool did not reach {n} warm VMs");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn floor_initramfs() -> anyhow::Result<PathBuf> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/guest/build-floor-initramfs.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .context("run build-floor-initramfs.sh")?;
    if !out.status.success() {
        bail!(
            "build-floor-initramfs.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8(out.stdout)?;
    Ok(PathBuf::from(
        stdout.lines().last().unwrap_or_default().trim(),
    ))
}

fn median(v: &mut [Duration]) -> Duration {
    percentile(v, 50)
}

fn median_f(v: &mut [f64]) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
}

fn median_u(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0)
}

/// Nearest-rank percentile.
fn percentile(v: &mut [Duration], p: usize) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let rank = (p * v.len()).div_ceil(100).max(1);
    v[rank - 1]
}

fn fmt_d(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

fn ratio(a: Duration, floor: Duration) -> String {
    format!("{:.4}x", a.as_secs_f64() / floor.as_secs_f64().max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_stamps_are_read_from_the_console() {
        let console = "[    0.164620] PCI: Fatal\ncapsa-init: started at 1.25s\n\
                       capsa-init: starting agent at 1.75s\nCAPSA_LISTENING=vsock:1024\n";
        assert_eq!(
            boot_stamps(console),
            Some((Duration::from_millis(1250), Duration::from_millis(1750)))
        );
        assert_eq!(boot_stamps("capsa-init: starting agent\n"), None);
        assert_eq!(boot_stamps("capsa-init: started at xs\n"), None);
    }
}
