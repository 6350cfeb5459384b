//! `capsa-vm-pool-bench --json`: scripts (and issue 14's report) read its last line, so its
//! names and its sanity are tested here with one real boot of each kind. The figures
//! themselves are the bench's business, not this test's: only that they are there and
//! plausible.

use std::process::Stdio;
use std::time::Duration;

use capsa_test_support::workspace_binary;

#[tokio::test]
async fn the_pool_bench_prints_its_figures_as_json_last() {
    let run = tokio::process::Command::new(workspace_binary("capsa-vm-pool-bench"))
        .args([
            "--json",
            "--samples",
            "1",
            "--concurrency",
            "2",
            "--net-samples",
            "0",
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    // Generous: three boots and a pool of two under software emulation.
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the bench ends within 10 min")
        .expect("run capsa-vm-pool-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("cold boot to agent ready"), "{stdout}");
    let last = stdout.lines().last().expect("output");
    let figures: serde_json::Value = serde_json::from_str(last).expect("the last line is JSON");
    assert!(
        ["qemu-tcg", "qemu-kvm", "cloud-hypervisor"]
            .contains(&figures["engine"].as_str().unwrap_or_default()),
        "{figures}"
    );
    for key in [
        "cold_boot_ratio",
        "idle_rss_ratio",
        "acquire_p50_ms",
        "acquire_p99_ms",
        "acquire_concurrent_p50_ms",
        "cold_boot_ms",
        "floor_boot_ms",
        "idle_rss_mib",
        "floor_rss_mib",
        "boot_kernel_ms",
        "boot_init_ms",
        "boot_agent_ms",
        "snapshot_ms",
        "snapshot_mib",
        "disk_write_ms",
        "snapshot_write_ratio",
        "restore_ms",
        "restore_cold_ratio",
        "restored_rss_mib",
        "restored_rss_ratio",
        "tcg_tb_mib",
    ] {
        let v = figures[key].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{key} = {v} in {figures}");
    }
    // A booted agent VM does more than the do-nothing floor.
    assert!(
        figures["cold_boot_ratio"].as_f64().unwrap() > 1.0,
        "{figures}"
    );
    // A restore skips the kernel, init and the agent's start: far less than a boot.
    assert!(
        figures["restore_cold_ratio"].as_f64().unwrap() < 1.0,
        "{figures}"
    );
    assert_eq!(figures["samples"], 1);
    assert!(figures["boots_hung"].as_u64().is_some(), "{figures}");
}
