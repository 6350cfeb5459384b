//! `capsa-exec-bench --native --json` runs end to end (redis, metering, executor,
//! session-manager, a host agent behind a hybrid-vsock socket) and its last line is the JSON
//! object the rest of the project reads; so do `--creates N` and `--arrivals M` on real VMs.
//! No timing bounds: only that every figure is there, finite and positive, and consistent
//! with the flags.

use std::time::Duration;

use capsa_test_support::{run_to_exit, run_to_exit_within};

/// Bound on one bench run: the VM rounds boot, fill and refill a pool under TCG, on a
/// machine busy with the rest of the suite.
const BENCH_LIMIT: Duration = Duration::from_secs(600);

/// Figures the JSON line must carry, each a positive, finite number of its unit.
const FIGURES: &[&str] = &[
    "host_overhead_p50_ms",
    "host_overhead_p99_ms",
    "throughput_ratio",
    "get_session_p50_ms",
    "bare_rtt_p50_ms",
    "agent_direct_p50_ms",
    "executor_direct_p50_ms",
    "end_to_end_p50_ms",
    "interpreter_p50_ms",
];

/// Runs the bench with `args` to a successful exit: its stdout, and its last line as JSON.
async fn run_bench(args: &[&str]) -> (String, serde_json::Value) {
    let out = run_to_exit_within("capsa-exec-bench", args, &[], BENCH_LIMIT).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "capsa-exec-bench exited with {}:\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    let figures = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last:?}\n{stdout}"));
    (stdout, figures)
}

/// `figures[key]` is a finite, positive number, for every key of `keys`.
fn assert_positive(figures: &serde_json::Value, keys: &[&str]) {
    for key in keys {
        let v = figures[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is missing or not a number: {figures}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}: {figures}");
    }
}

#[tokio::test]
async fn native_bench_prints_its_figures_as_json_last() {
    let (stdout, figures) = run_bench(&[
        "--native",
        "--json",
        "--samples",
        "20",
        "--throughput-mib",
        "8",
    ])
    .await;
    assert_eq!(figures["engine"], "native", "{figures}");
    assert_eq!(figures["samples"], 20, "{figures}");
    assert_positive(&figures, FIGURES);
    assert!(
        figures["host_overhead_p99_ms"].as_f64() >= figures["host_overhead_p50_ms"].as_f64(),
        "p99 below p50: {figures}"
    );
    // The human-readable table is there too, before the JSON.
    assert!(
        stdout.contains("| host overhead (e2e - interp - bare RTT)"),
        "{stdout}"
    );
}

/// `capsa-exec-bench --creates N` on real VMs: N clients create a session and run
/// `print(1)` at once against a warm pool of N; every figure is there, and the warm count
/// went down during the burst (the VMs were taken) and came back (the refill).
#[tokio::test]
async fn creates_bench_prints_its_figures_as_json_last() {
    let (stdout, figures) = run_bench(&["--creates", "2", "--json"]).await;
    assert_eq!(figures["creates_concurrency"], 2, "{figures}");
    assert_positive(
        &figures,
        &[
            "create_exec_p50_ms",
            "create_exec_p99_ms",
            "create_exec_p99_p50_ratio",
            "creates_refill_s",
        ],
    );
    assert!(figures["creates_warm_min"].as_u64() < Some(2), "{figures}");
    assert!(stdout.contains("| p99 / p50"), "{stdout}");
}

/// `capsa-exec-bench --arrivals 3` on real VMs: the node's boot rate is measured, three
/// clients arrive one by one at half of it (the default share), and every figure is there.
/// Whether the warm count stayed above 0 is the bench's finding, not asserted: it depends
/// on how loaded the machine was while the test suite ran.
#[tokio::test]
async fn arrivals_bench_prints_its_figures_as_json_last() {
    let (stdout, figures) = run_bench(&["--arrivals", "3", "--warm", "2", "--json"]).await;
    assert_eq!(figures["arrivals"], 3, "{figures}");
    assert_eq!(figures["arrivals_warm_pool"], 2, "{figures}");
    assert_positive(
        &figures,
        &[
            "arrivals_boot_rate_per_s",
            "arrivals_rate_per_s",
            "arrivals_p50_ms",
            "arrivals_p99_ms",
            "arrivals_p99_p50_ratio",
        ],
    );
    let (boot, arrival) = (
        figures["arrivals_boot_rate_per_s"].as_f64().unwrap(),
        figures["arrivals_rate_per_s"].as_f64().unwrap(),
    );
    assert!((arrival - boot * 0.5).abs() < 1e-9, "{figures}");
    assert!(
        figures["arrivals_warm_min"].as_u64() <= Some(2),
        "{figures}"
    );
    assert!(
        stdout.contains("| fewest warm VMs while they arrived"),
        "{stdout}"
    );
}

#[tokio::test]
async fn arrivals_bench_rejects_a_share_that_is_not_above_zero() {
    for share in ["0", "-1", "nan", "x"] {
        let flag = format!("--arrival-share={share}");
        let out = run_to_exit("capsa-exec-bench", &["--arrivals", "3", &flag], &[]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{share}: {stderr}");
        assert!(stderr.contains("--arrival-share"), "{share}: {stderr}");
    }
}
