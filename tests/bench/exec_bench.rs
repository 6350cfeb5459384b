//! Execute benchmark: one stack, one session, one VM, all figures from the same run.
//!
//! - Execute of `x = 1` end to end (client → session-manager → executor → vsock → agent →
//!   Python and back), split into the interpreter's own time (measured in the guest and
//!   reported in the completion), a bare vsock round trip to the same VM (the agent's echo
//!   port), and the rest: Capsa's own overhead.
//! - stdout throughput through every service beside the bare vsock throughput of that VM.
//!
//! Run: `cargo build --release --workspace && target/release/capsa-exec-bench [samples]`
//! (the service binaries are taken from the same target dir as this one).

use std::time::{Duration, Instant};

use capsa_e2e::{Stack, StackOptions, exec};
use capsa_proto::common::v1::Language;
use capsa_proto::session::v1::CreateSessionRequest;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The agent's raw echo port (beside gRPC on 1024).
const ECHO_PORT: u32 = 1025;
const THROUGHPUT_BYTES: usize = 64 << 20;
/// Throughput runs of each kind, alternating; the table gives their medians.
const THROUGHPUT_RUNS: usize = 5;

#[tokio::main]
async fn main() {
    let samples: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let stack = Stack::start(StackOptions::default()).await;
    let mut client = stack.client(0).await;
    let session = client
        .create_session(CreateSessionRequest {
            lifetime: Some(capsa_proto::time::duration(Duration::from_secs(3600))),
            ..Default::default()
        })
        .await
        .expect("create session")
        .into_inner()
        .session
        .unwrap();
    let vsock =
        capsa_vsock::vm_socket_path(&stack.state_dir.path().join("vm-state"), &session.vm_id)
            .expect("vm id");

    // Warm up the kernel, the channels and the caches on every hop.
    for _ in 0..20 {
        exec::python(&mut client, &session.id, "x = 1").await;
    }

    let mut e2e = Vec::with_capacity(samples);
    let mut interp = Vec::with_capacity(samples);
    let mut agent_wall = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        let out = exec::python(&mut client, &session.id, "x = 1").await;
        e2e.push(started.elapsed());
        let t = out
            .completion()
            .interpreter_time
            .as_ref()
            .expect("interpreter_time");
        interp.push(capsa_proto::time::from_duration(t).unwrap());
        let w = out.completion().wall_time.as_ref().expect("wall_time");
        agent_wall.push(capsa_proto::time::from_duration(w).unwrap());
    }

    let mut echo = capsa_vsock::connect(&vsock, ECHO_PORT)
        .await
        .expect("echo port");
    let mut rtt = Vec::with_capacity(samples);
    let mut byte = [0u8; 1];
    for _ in 0..samples + 20 {
        let started = Instant::now();
        echo.write_all(b"x").await.unwrap();
        echo.read_exact(&mut byte).await.unwrap();
        rtt.push(started.elapsed());
    }
    rtt.drain(..20);

    let vsock_rtt_p50 = percentile(&rtt, 50.0);
    let overhead: Vec<Duration> = e2e
        .iter()
        .zip(&interp)
        .map(|(total, i)| total.saturating_sub(*i).saturating_sub(vsock_rtt_p50))
        .collect();
    // Where the overhead is: inside the guest (the agent's wall time around the
    // interpreter) or on the host (three services and their hops, minus one vsock trip).
    let in_guest: Vec<Duration> = agent_wall
        .iter()
        .zip(&interp)
        .map(|(w, i)| w.saturating_sub(*i))
        .collect();
    let on_host: Vec<Duration> = e2e
        .iter()
        .zip(&agent_wall)
        .map(|(total, w)| total.saturating_sub(*w).saturating_sub(vsock_rtt_p50))
        .collect();

    // Throughput: the same number of bytes through the whole stack and through bare vsock,
    // alternating, so both see the same host load.
    let mut stack_secs = Vec::with_capacity(THROUGHPUT_RUNS);
    let mut vsock_secs = Vec::with_capacity(THROUGHPUT_RUNS);
    for _ in 0..THROUGHPUT_RUNS {
        stack_secs.push(stdout_through_stack(&mut client, &session.id).await);
        vsock_secs.push(echo_through_vsock(&vsock).await);
    }
    let (stack_secs, vsock_secs) = (median_f64(stack_secs), median_f64(vsock_secs));

    let mib = THROUGHPUT_BYTES as f64 / (1 << 20) as f64;
    let (stack_tp, vsock_tp) = (mib / stack_secs, mib / vsock_secs);
    println!("Execute of `x = 1`, {samples} samples, one VM (engine: see vm-pool log), one run");
    println!("| part                              |   p50 (ms) |   p99 (ms) |");
    println!("|-----------------------------------|-----------:|-----------:|");
    for (name, v) in [
        ("end to end (client)", &e2e),
        ("interpreter in the guest", &interp),
        ("bare vsock round trip (echo)", &rtt),
        ("Capsa's own overhead (the rest)", &overhead),
        ("  of which: agent, in the guest", &in_guest),
        ("  of which: services on the host", &on_host),
    ] {
        println!(
            "| {name:<33} | {:>10.3} | {:>10.3} |",
            ms(percentile(v, 50.0)),
            ms(percentile(v, 99.0))
        );
    }
    println!();
    println!(
        "| stdout throughput ({mib:.0} MiB, median of {THROUGHPUT_RUNS}) |      MiB/s | ratio to bare vsock |"
    );
    println!("|-----------------------------------|-----------:|--------------------:|");
    println!(
        "| through all services              | {stack_tp:>10.1} | {:>19.2} |",
        stack_tp / vsock_tp
    );
    println!(
        "| bare vsock (echo, same VM)        | {vsock_tp:>10.1} | {:>19.2} |",
        1.0
    );
}

/// Seconds to stream `THROUGHPUT_BYTES` of Python stdout through every service.
async fn stdout_through_stack(client: &mut capsa_e2e::Client, session_id: &str) -> f64 {
    let code = format!(
        "import sys\nsys.stdout.buffer.write(b'x' * {THROUGHPUT_BYTES})\nsys.stdout.flush()"
    );
    let mut req = exec::request(session_id, Language::Python, &code, 600_000);
    req.max_output_bytes = 2 * THROUGHPUT_BYTES as u64; // above the 32 MiB default cap
    let started = Instant::now();
    let out = exec::run(client, req).await;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(out.stdout.len(), THROUGHPUT_BYTES, "all output arrived");
    secs
}

/// Seconds to send `THROUGHPUT_BYTES` through the agent's echo port and read them back.
async fn echo_through_vsock(vsock: &std::path::Path) -> f64 {
    let echo = capsa_vsock::connect(vsock, ECHO_PORT)
        .await
        .expect("echo port");
    let (mut rd, mut wr) = echo.into_split();
    let started = Instant::now();
    // The writer hands its half back instead of dropping it: a half-close would let the
    // echo end the connection while its last bytes are still in flight.
    let writer = tokio::spawn(async move {
        let block = vec![0x78u8; 1 << 16];
        for _ in 0..THROUGHPUT_BYTES / block.len() {
            wr.write_all(&block).await.unwrap();
        }
        wr
    });
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0;
    let reading = async {
        while got < THROUGHPUT_BYTES {
            match rd.read(&mut buf).await.unwrap() {
                0 => panic!("echo connection closed after {got} bytes"),
                n => got += n,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(300), reading)
        .await
        .unwrap_or_else(|_| panic!("bare vsock echo stalled after {got} bytes"));
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
