//! The InstaVM-compatible HTTP gateway: two `capsa-gateway` replicas in front of one real
//! stack, and the gateway's pytest suite (services/gateway/tests/python: the official
//! `instavm` SDK, unchanged, running the seed's flows; bad input; a hostile second tenant),
//! run with `$CAPSA_PYTHON` (deploy/scripts/python-env.sh builds that venv). Async executions
//! are started on one replica and polled on the other, so their state is really shared.

use std::time::Duration;

use capsa_e2e::{Stack, StackOptions, run_pytest, test_python};
use capsa_test_support::ServiceProcess;

/// Generous: the suite boots two sessions' VMs under TCG.
const SUITE_TIMEOUT: Duration = Duration::from_secs(1800);

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
    // Checked before the stack starts: without the venv there is nothing to run.
    test_python();
    // Two warm VMs: the suite holds at most two sessions at once.
    let stack = Stack::start(StackOptions {
        warm: 2,
        ..StackOptions::default()
    })
    .await;
    let gateways = [gateway(&stack).await, gateway(&stack).await];
    let other_key = stack.new_tenant_key("other");
    run_pytest(
        &[
            "services/gateway/tests/python",
            // The suite is synchronous; the venv's pytest-asyncio would only warn.
            "-p",
            "no:asyncio",
        ],
        &[
            ("CAPSA_HTTP_ENDPOINT", gateways[0].url()),
            ("CAPSA_HTTP_ENDPOINT_2", gateways[1].url()),
            ("CAPSA_API_KEY", stack.api_key.clone()),
            ("CAPSA_OTHER_API_KEY", other_key),
        ],
        SUITE_TIMEOUT,
    )
    .await;
    // Both replicas stop cleanly on SIGTERM (no execution is left in flight).
    for g in gateways {
        let status = g.terminate(Duration::from_secs(30)).await;
        assert!(status.success(), "gateway exited with {status}");
    }
}
