//! `capsa-exec-bench --native --json` runs end to end (redis, metering, executor,
//! session-manager, a host agent behind a hybrid-vsock socket) and its last line is the JSON
//! object the rest of the project reads; so does `--creates N` on real VMs. No timing
//! bounds: only that every figure is there, finite and positive.

use capsa_test_support::run_to_exit;

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
    let out = run_to_exit("capsa-exec-bench", args, &[]).await;
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

/// `figures[key]` is a finite, positive number.
fn assert_positive(figures: &serde_json::Value, key: &str) {
    let v = figures[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is missing or not a number: {figures}"));
    assert!(v.is_finite() && v > 0.0, "{key} = {v}: {figures}");
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
    for key in FIGURES {
        assert_positive(&figures, key);
    }
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
    for key in [
        "create_exec_p50_ms",
        "create_exec_p99_ms",
        "create_exec_p99_p50_ratio",
        "creates_refill_s",
    ] {
        assert_positive(&figures, key);
    }
    assert!(figures["creates_warm_min"].as_u64() < Some(2), "{figures}");
    assert!(stdout.contains("| p99 / p50"), "{stdout}");
}
