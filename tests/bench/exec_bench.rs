//! Execute benchmark: one stack, one session, one guest agent, all figures from the same run.
//!
//! - `--engine vm` (the default): the whole stack with vm-pool booting a real VM (the engine
//!   this machine offers). `--engine native` (or `--native`): Capsa's own path with no
//!   emulation, the guest agent running as a host process behind the same kind of
//!   hybrid-vsock socket a VM exposes (see `native_node.rs`; a bench seam, no product mode).
//! - Execute of `x = 1` (`--code`), hop by hop, interleaved so every hop sees the same load:
//!   a bare round trip of one byte through the agent's echo port, the agent's Execute
//!   straight over the hybrid-vsock socket (as the executor dials it), the executor's
//!   Execute, and end to end through session-manager. The interpreter's own time comes from
//!   the completion; host overhead is end to end − interpreter − bare round trip, per sample.
//! - stdout throughput through every service beside the bare socket throughput of the same
//!   agent, and GetSession latency beside the gRPC floor: a health Check on the same
//!   session-manager, one unary call on the same kind of connection with no Redis and no
//!   handler work, what any call on this host costs at least.
//!
//! - `--creates N`, instead: N clients at once each create a session and run `print(1)`,
//!   against a node whose warm pool was filled to N; `--arrivals M`: M clients one by one at
//!   half the node's measured boot rate, against a warm pool of `--warm` (see `creates.rs`).
//!
//! Run: `cargo build --release --workspace && target/release/capsa-exec-bench [--native]
//! [--samples N] [--creates N | --arrivals M] [--json]` (the service binaries are taken from the same target dir as this
//! one). With `--json` the last line printed is one JSON object of the figures.

mod creates;
mod native_node;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsa_e2e::{Client, Stack, StackOptions, connect_client, exec};
use capsa_proto::agent::v1::agent_service_client::AgentServiceClient;
use capsa_proto::common::v1::{ExecuteSpec, Language};
use capsa_proto::executor::v1::executor_service_client::ExecutorServiceClient;
use capsa_proto::session::v1::{DeleteSessionRequest, GetSessionRequest};
use capsa_proto::vmpool::v1::GetVmRequest;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use capsa_test_support::execute::{Outcome, collect};
use clap::Parser;
use native_node::{ECHO_PORT, NativeNode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Throughput runs of each kind, alternating; the table gives their medians.
const THROUGHPUT_RUNS: usize = 5;
/// Calls of each hop before measuring: the kernel, the channels and the caches warm up.
const WARMUP: usize = 20;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Engine {
    /// vm-pool boots a real VM (KVM, or QEMU TCG where there is no KVM).
    Vm,
    /// The agent runs as a host process behind a hybrid-vsock socket: no emulation.
    Native,
}

#[derive(Parser)]
#[command(
    name = "capsa-exec-bench",
    about = "Execute latency hop by hop, stdout throughput and GetSession latency"
)]
struct Args {
    /// Where the guest agent runs.
    #[arg(long, value_enum, default_value_t = Engine::Vm)]
    engine: Engine,
    /// Shorthand for `--engine native`.
    #[arg(long, conflicts_with = "engine")]
    native: bool,
    /// Samples of each hop (and of GetSession).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    samples: u32,
    /// The Python code each Execute runs.
    #[arg(long, default_value = "x = 1")]
    code: String,
    /// MiB of stdout per throughput run.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    throughput_mib: u32,
    /// Instead of the Execute table: this many clients at once each create a session and
    /// run `print(1)`, against a node whose warm pool holds that many VMs (real VMs only).
    #[arg(long, default_value_t = 0, conflicts_with = "native")]
    creates: u32,
    /// Instead of the Execute table: this many clients arrive one by one, each creating a
    /// session and running `print(1)`, at `--arrival-share` of the node's boot rate
    /// (measured first by filling the warm pool of `--warm`; real VMs only).
    #[arg(long, default_value_t = 0, conflicts_with_all = ["native", "creates"])]
    arrivals: u32,
    /// Warm VMs the node keeps for `--arrivals`.
    #[arg(long, default_value_t = 2, requires = "arrivals", value_parser = clap::value_parser!(u32).range(1..))]
    warm: u32,
    /// The arrival rate of `--arrivals` as a share of the node's boot rate (above 0).
    #[arg(long, default_value_t = 0.5, requires = "arrivals", value_parser = positive_share)]
    arrival_share: f64,
    /// Also print the figures as one JSON object, on the last line.
    #[arg(long)]
    json: bool,
}

/// `--arrival-share`: a finite number above 0.
fn positive_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number above 0")),
    }
}

/// What the measurements run against: a session and the node it lives on.
struct Target {
    client: Client,
    /// The session-manager the client calls, for the gRPC floor.
    session_manager_url: String,
    session_id: String,
    vm_id: String,
    executor_url: String,
    /// The VM's hybrid-vsock socket.
    vm_socket: PathBuf,
    engine: String,
}

/// Per-sample figures of every hop.
#[derive(Default)]
struct Samples {
    rtt: Vec<Duration>,
    agent: Vec<Duration>,
    executor: Vec<Duration>,
    e2e: Vec<Duration>,
    interp: Vec<Duration>,
    agent_wall: Vec<Duration>,
    get_session: Vec<Duration>,
    grpc_floor: Vec<Duration>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.creates > 0 {
        assert!(
            args.engine == Engine::Vm,
            "--creates measures real VMs: leave --engine at vm"
        );
        let figures = creates::run(args.creates).await;
        creates::report(&figures, args.json);
        return;
    }
    if args.arrivals > 0 {
        assert!(
            args.engine == Engine::Vm,
            "--arrivals measures real VMs: leave --engine at vm"
        );
        let figures = creates::run_arrivals(args.arrivals, args.warm, args.arrival_share).await;
        creates::report_arrivals(&figures, args.json);
        return;
    }
    if args.native || args.engine == Engine::Native {
        let node = NativeNode::start().await;
        let client = connect_client(&node.session_manager.url(), &node.api_key).await;
        let target = open(
            client,
            node.session_manager.url(),
            node.executor.url(),
            node.vmpool_url(),
            node.state_dir.path(),
        )
        .await;
        bench(target, &args).await;
    } else {
        let stack = Stack::start(StackOptions::default()).await;
        let client = stack.client(0).await;
        let target = open(
            client,
            stack.session_managers[0].url(),
            stack.executor.url(),
            stack.vm_pool.url(),
            &stack.vm_state_dir(),
        )
        .await;
        bench(target, &args).await;
    }
}

/// Creates the session the bench runs in and finds its VM.
async fn open(
    mut client: Client,
    session_manager_url: String,
    executor_url: String,
    vmpool_url: String,
    state_dir: &Path,
) -> Target {
    let session = capsa_e2e::create_session_living(&mut client, Duration::from_secs(3600)).await;
    let vm = VmPoolServiceClient::connect(vmpool_url)
        .await
        .expect("connect to the node's vm pool")
        .get_vm(GetVmRequest {
            vm_id: session.vm_id.clone(),
        })
        .await
        .expect("get the session's vm")
        .into_inner()
        .vm
        .expect("a vm");
    Target {
        client,
        session_manager_url,
        vm_socket: capsa_vsock::vm_socket_path(state_dir, &session.vm_id).expect("vm id"),
        session_id: session.id,
        vm_id: session.vm_id,
        executor_url,
        engine: vm.engine,
    }
}

async fn bench(mut t: Target, args: &Args) {
    let code = args.code.as_str();
    let spec = ExecuteSpec {
        language: Language::Python as i32,
        code: code.to_string(),
        ..Default::default()
    };
    let mut agent = AgentServiceClient::new(capsa_vsock::channel(
        t.vm_socket.clone(),
        capsa_vsock::AGENT_PORT,
    ));
    let mut executor = ExecutorServiceClient::connect(t.executor_url.clone())
        .await
        .expect("connect to the executor");
    let mut echo = capsa_vsock::connect(&t.vm_socket, ECHO_PORT)
        .await
        .expect("echo port");
    let mut health = HealthClient::new(
        tonic::transport::Endpoint::from_shared(t.session_manager_url.clone())
            .expect("session-manager url")
            .connect()
            .await
            .expect("connect to the session-manager's health service"),
    );

    let mut s = Samples::default();
    let samples = args.samples as usize;
    for i in 0..WARMUP + samples {
        let keep = i >= WARMUP;

        let started = Instant::now();
        let mut byte = [0u8; 1];
        echo.write_all(b"x").await.unwrap();
        echo.read_exact(&mut byte).await.unwrap();
        push(keep, &mut s.rtt, started.elapsed());

        let started = Instant::now();
        let req = capsa_proto::agent::v1::ExecuteRequest {
            spec: Some(spec.clone()),
        };
        ok(collect(
            agent
                .execute(req)
                .await
                .expect("agent execute")
                .into_inner(),
        )
        .await);
        push(keep, &mut s.agent, started.elapsed());

        let started = Instant::now();
        let req = capsa_proto::executor::v1::ExecuteRequest {
            vm_id: t.vm_id.clone(),
            spec: Some(spec.clone()),
        };
        ok(collect(
            executor
                .execute(req)
                .await
                .expect("executor execute")
                .into_inner(),
        )
        .await);
        push(keep, &mut s.executor, started.elapsed());

        let started = Instant::now();
        let out = exec::python(&mut t.client, &t.session_id, code).await;
        push(keep, &mut s.e2e, started.elapsed());
        let c = ok(out).completion().clone();
        let d = |d: Option<&prost_types::Duration>| {
            capsa_proto::time::from_duration(d.expect("completion times")).unwrap()
        };
        push(keep, &mut s.interp, d(c.interpreter_time.as_ref()));
        push(keep, &mut s.agent_wall, d(c.wall_time.as_ref()));

        let started = Instant::now();
        t.client
            .get_session(GetSessionRequest {
                session_id: t.session_id.clone(),
            })
            .await
            .expect("get session");
        push(keep, &mut s.get_session, started.elapsed());

        let started = Instant::now();
        health
            .check(HealthCheckRequest::default())
            .await
            .expect("health check");
        push(keep, &mut s.grpc_floor, started.elapsed());
    }
    drop(echo);

    let host_overhead: Vec<Duration> = (0..samples)
        .map(|i| {
            s.e2e[i]
                .saturating_sub(s.interp[i])
                .saturating_sub(s.rtt[i])
        })
        .collect();
    // Where the host overhead is: in the agent around the interpreter (inside the guest, in
    // a VM), or in the services and their hops.
    let in_agent: Vec<Duration> = (0..samples)
        .map(|i| s.agent_wall[i].saturating_sub(s.interp[i]))
        .collect();
    let in_services: Vec<Duration> = (0..samples)
        .map(|i| {
            s.e2e[i]
                .saturating_sub(s.agent_wall[i])
                .saturating_sub(s.rtt[i])
        })
        .collect();

    // Throughput: the same number of bytes through the whole stack and through the bare
    // socket, alternating, so both see the same host load.
    let bytes = args.throughput_mib as usize * (1 << 20);
    let mut stack_secs = Vec::with_capacity(THROUGHPUT_RUNS);
    let mut bare_secs = Vec::with_capacity(THROUGHPUT_RUNS);
    for _ in 0..THROUGHPUT_RUNS {
        stack_secs.push(stdout_through_stack(&mut t.client, &t.session_id, bytes).await);
        bare_secs.push(echo_through_socket(&t.vm_socket, bytes).await);
    }
    let mib = f64::from(args.throughput_mib);
    let stack_tp = mib / median_f64(stack_secs);
    let bare_tp = mib / median_f64(bare_secs);

    t.client
        .delete_session(DeleteSessionRequest {
            session_id: t.session_id.clone(),
        })
        .await
        .expect("delete session");

    let build = if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    };
    let engine = &t.engine;
    println!("Execute of `{code}`, {samples} samples, engine: {engine}, {build} build, one run");
    println!("| hop                                       |   p50 (ms) |   p99 (ms) |");
    println!("|-------------------------------------------|-----------:|-----------:|");
    for (name, v) in [
        ("bare socket round trip (echo, 1 byte)", &s.rtt),
        ("agent direct (AgentService Execute)", &s.agent),
        ("executor direct (ExecutorService Execute)", &s.executor),
        ("end to end (through session-manager)", &s.e2e),
        ("interpreter (from the completion)", &s.interp),
        ("host overhead (e2e - interp - bare RTT)", &host_overhead),
        ("  of which: agent, around the interpreter", &in_agent),
        ("  of which: services and their hops", &in_services),
        ("GetSession", &s.get_session),
        ("gRPC floor (health Check, same server)", &s.grpc_floor),
    ] {
        println!(
            "| {name:<41} | {:>10.3} | {:>10.3} |",
            ms(percentile(v, 50.0)),
            ms(percentile(v, 99.0))
        );
    }
    println!();
    println!(
        "| stdout throughput ({mib:.0} MiB, median of {THROUGHPUT_RUNS})   |      MiB/s | ratio to bare |"
    );
    println!("|-------------------------------------------|-----------:|--------------:|");
    println!(
        "| through all services                      | {stack_tp:>10.1} | {:>13.2} |",
        stack_tp / bare_tp
    );
    println!(
        "| bare socket (echo, same agent)            | {bare_tp:>10.1} | {:>13.2} |",
        1.0
    );
    if args.json {
        let p50 = |v: &[Duration]| ms(percentile(v, 50.0));
        let p99 = |v: &[Duration]| ms(percentile(v, 99.0));
        let figures = serde_json::json!({
            "engine": engine,
            "build": build,
            "code": code,
            "samples": samples,
            "host_overhead_p50_ms": p50(&host_overhead),
            "host_overhead_p99_ms": p99(&host_overhead),
            "throughput_ratio": stack_tp / bare_tp,
            "throughput_mib_s": stack_tp,
            "bare_throughput_mib_s": bare_tp,
            "get_session_p50_ms": p50(&s.get_session),
            "get_session_p99_ms": p99(&s.get_session),
            "grpc_floor_p50_ms": p50(&s.grpc_floor),
            "bare_rtt_p50_ms": p50(&s.rtt),
            "agent_direct_p50_ms": p50(&s.agent),
            "executor_direct_p50_ms": p50(&s.executor),
            "end_to_end_p50_ms": p50(&s.e2e),
            "end_to_end_p99_ms": p99(&s.e2e),
            "interpreter_p50_ms": p50(&s.interp),
        });
        println!("{figures}");
    }
}

fn push(keep: bool, v: &mut Vec<Duration>, d: Duration) {
    if keep {
        v.push(d);
    }
}

/// `out`, checked to have completed without an error: a failing hop is no figure.
fn ok(out: Outcome) -> Outcome {
    assert!(out.error.is_none(), "execute failed: {out:?}");
    assert!(out.errors.is_empty(), "the code raised: {out:?}");
    out.completion();
    out
}

/// Seconds to stream `bytes` of Python stdout through every service.
async fn stdout_through_stack(client: &mut Client, session_id: &str, bytes: usize) -> f64 {
    let code = format!("import sys\nsys.stdout.buffer.write(b'x' * {bytes})\nsys.stdout.flush()");
    let mut req = exec::request(session_id, Language::Python, &code, 600_000);
    req.max_output_bytes = 2 * bytes as u64; // above the 32 MiB default cap
    let started = Instant::now();
    let out = exec::run(client, req).await;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(out.stdout.len(), bytes, "all output arrived");
    secs
}

/// Seconds to send `bytes` through the agent's echo port and read them back.
async fn echo_through_socket(vm_socket: &Path, bytes: usize) -> f64 {
    let echo = capsa_vsock::connect(vm_socket, ECHO_PORT)
        .await
        .expect("echo port");
    let (mut rd, mut wr) = echo.into_split();
    let started = Instant::now();
    // The writer hands its half back instead of dropping it: a half-close would let the
    // echo end the connection while its last bytes are still in flight.
    let writer = tokio::spawn(async move {
        let block = vec![0x78u8; 1 << 16];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(block.len());
            wr.write_all(&block[..n]).await.unwrap();
            left -= n;
        }
        wr
    });
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0;
    let reading = async {
        while got < bytes {
            match rd.read(&mut buf).await.unwrap() {
                0 => panic!("echo connection closed after {got} bytes"),
                n => got += n,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(300), reading)
        .await
        .unwrap_or_else(|_| panic!("bare socket echo stalled after {got} bytes"));
    let _open_until_read = writer.await.unwrap();
    started.elapsed().as_secs_f64()
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
