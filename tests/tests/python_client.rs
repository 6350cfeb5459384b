//! The Python package's pytest suite (clients/python/tests: sync and async clients, streaming,
//! timeouts, files, errors, the generated code's currency, examples/python) against one real
//! stack, run with `$CAPSA_PYTHON` (deploy/scripts/python-env.sh builds that venv).

use std::time::Duration;

use capsa_e2e::{Stack, StackOptions, run_pytest, test_python};

/// Generous (the suite takes about a minute here, with five sessions' VMs under TCG), and
/// short of nextest's limit for VM tests (.config/nextest.toml) so that the output is shown.
const SUITE_TIMEOUT: Duration = Duration::from_secs(1000);

#[tokio::test]
async fn the_python_client_suite_passes_against_the_stack() {
    // Checked before the stack starts: without the venv there is nothing to run.
    test_python();
    // Two warm VMs: the suite holds at most two pool sessions at once (its forks and the
    // session made from a snapshot are restored, not taken from the pool); vm-pool refills
    // the pool while the tests run.
    let stack = Stack::start(StackOptions {
        warm: 2,
        ..StackOptions::default()
    })
    .await;
    let other_key = stack.new_tenant_key("python-other");
    run_pytest(
        &["clients/python/tests"],
        &[
            ("CAPSA_ENDPOINT", stack.session_managers[0].url()),
            ("CAPSA_API_KEY", stack.api_key.clone()),
            ("CAPSA_TEST_OTHER_API_KEY", other_key),
        ],
        SUITE_TIMEOUT,
    )
    .await;
}
