//! The InstaVM-compatible HTTP gateway: two `capsa-gateway` replicas in front of one real
//! stack, and the gateway's pytest suite (services/gateway/tests/python: the official
//! `instavm` SDK, unchanged, running the seed's flows; bad input; a hostile second tenant),
//! run with `$CAPSA_PYTHON` (deploy/scripts/python-env.sh builds that venv). Async executions
//! are started on one replica and polled on the other, so their state is really shared.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use capsa_e2e::{Stack, StackOptions};
use capsa_test_support::ServiceProcess;

/// Generous: the suite boots two sessions' VMs under TCG.
const SUITE_TIMEOUT: Duration = Duration::from_secs(1800);

/// SIGKILLs a process group on drop, so nothing the suite started outlives a failed or
/// timed-out test.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // Fails harmlessly (ESRCH) when the group is already gone.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .stderr(Stdio::null())
            .status();
    }
}

async fn gateway(stack: &Stack) -> ServiceProcess {
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--session-manager-url",
        &stack.session_managers[0].url(),
        "--redis-url",
        &stack.redis.url(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ServiceProcess::start("capsa-gateway", &args).await
}

#[tokio::test]
async fn the_instavm_sdk_suite_passes_against_the_gateway() {
    let python = std::env::var("CAPSA_PYTHON").unwrap_or_else(|_| {
        panic!(
            "CAPSA_PYTHON is not set: it names the interpreter of the Python test venv; run \
             `export CAPSA_PYTHON=$(deploy/scripts/python-env.sh | tail -n1)` \
             (deploy/scripts/test.sh does this)"
        )
    });
    // Two warm VMs: the suite holds at most two sessions at once.
    let stack = Stack::start(StackOptions {
        warm: 2,
        ..StackOptions::default()
    })
    .await;
    let gateways = [gateway(&stack).await, gateway(&stack).await];
    let other_key = stack.new_tenant_key("other");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // Output goes to a file so that it can be shown even when the run is cut off.
    let log = tempfile::NamedTempFile::new().unwrap();

    let mut cmd = tokio::process::Command::new(&python);
    cmd.args([
        "-m",
        "pytest",
        "services/gateway/tests/python",
        "-q",
        "-p",
        "no:cacheprovider",
        // The suite is synchronous; the venv's pytest-asyncio would only warn.
        "-p",
        "no:asyncio",
    ])
    .current_dir(root)
    .env("CAPSA_HTTP_ENDPOINT", gateways[0].url())
    .env("CAPSA_HTTP_ENDPOINT_2", gateways[1].url())
    .env("CAPSA_API_KEY", &stack.api_key)
    .env("CAPSA_OTHER_API_KEY", &other_key)
    // Nothing written into the source tree.
    .env("PYTHONDONTWRITEBYTECODE", "1")
    .stdin(Stdio::null())
    .stdout(log.reopen().unwrap())
    .stderr(log.reopen().unwrap())
    .process_group(0)
    .kill_on_drop(true);
    let started = std::time::Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("run {python} (CAPSA_PYTHON): {e}"));
    let _group = ProcessGroup(child.id().expect("pytest's pid"));
    let status = tokio::time::timeout(SUITE_TIMEOUT, child.wait()).await;
    let output = std::fs::read_to_string(log.path()).unwrap_or_default();
    match status {
        Ok(Ok(status)) if status.success() => {
            let summary = output
                .lines()
                .rfind(|l| l.contains(" passed"))
                .unwrap_or_default();
            println!(
                "pytest: {summary} ({:.0?} with the stack up)",
                started.elapsed()
            );
        }
        Ok(Ok(status)) => panic!("pytest failed ({status}):\n{output}"),
        Ok(Err(e)) => panic!("waiting for pytest: {e}\n{output}"),
        Err(_) => panic!("pytest still runs after {SUITE_TIMEOUT:?}; its output:\n{output}"),
    }
    // Both replicas stop cleanly on SIGTERM (no execution is left in flight).
    for g in gateways {
        let status = g.terminate(Duration::from_secs(30)).await;
        assert!(status.success(), "gateway exited with {status}");
    }
}
