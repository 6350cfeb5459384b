//! The Python package's pytest suite (clients/python/tests: sync and async clients, streaming,
//! timeouts, files, errors, the generated code's currency, examples/python) against one real
//! stack, run with `$CAPSA_PYTHON` (deploy/scripts/python-env.sh builds that venv).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use capsa_e2e::{Stack, StackOptions};

/// Generous (the suite takes about a minute here, with five sessions' VMs under TCG), and
/// short of nextest's limit for VM tests (.config/nextest.toml) so that the output is shown.
const SUITE_TIMEOUT: Duration = Duration::from_secs(1000);

/// SIGKILLs a process group on drop, so nothing the suite started (pytest, the example it
/// runs) outlives a failed or timed-out test.
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

#[tokio::test]
async fn the_python_client_suite_passes_against_the_stack() {
    let python = std::env::var("CAPSA_PYTHON").unwrap_or_else(|_| {
        panic!(
            "CAPSA_PYTHON is not set: it names the interpreter of the Python test venv; run \
             `export CAPSA_PYTHON=$(deploy/scripts/python-env.sh | tail -n1)` \
             (deploy/scripts/test.sh does this)"
        )
    });
    // Two warm VMs: the suite holds at most two sessions at once; vm-pool refills the pool
    // while the tests run.
    let stack = Stack::start(StackOptions {
        warm: 2,
        ..StackOptions::default()
    })
    .await;
    let other_key = stack.new_tenant_key("python-other");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // Output goes to a file so that it can be shown even when the run is cut off.
    let log = tempfile::NamedTempFile::new().unwrap();

    let mut cmd = tokio::process::Command::new(&python);
    cmd.args([
        "-m",
        "pytest",
        "clients/python/tests",
        "-q",
        "-p",
        "no:cacheprovider",
    ])
    .current_dir(root)
    .env("CAPSA_ENDPOINT", stack.session_managers[0].url())
    .env("CAPSA_API_KEY", &stack.api_key)
    .env("CAPSA_TEST_OTHER_API_KEY", &other_key)
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
            let summary = output.lines().last().unwrap_or_default();
            println!(
                "pytest: {summary} ({:.0?} with the stack up)",
                started.elapsed()
            );
        }
        Ok(Ok(status)) => panic!("pytest failed ({status}):\n{output}"),
        Ok(Err(e)) => panic!("waiting for pytest: {e}\n{output}"),
        Err(_) => panic!("pytest still runs after {SUITE_TIMEOUT:?}; its output:\n{output}"),
    }
}
