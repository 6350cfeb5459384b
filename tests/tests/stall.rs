//! A client that stops reading its Execute's output, on real VMs: another tenant's code on
//! the same node runs meanwhile, and after the stall timeout the stalled stream ends
//! DEADLINE_EXCEEDED and the code behind it is interrupted, freeing the session's kernel.

use std::time::{Duration, Instant};

use capsa_e2e::{Stack, StackOptions, create_default_session, exec};
use capsa_proto::common::v1::Language;
use tonic::Code;

/// `--stalled-client-timeout-ms` of session-manager and executor in this test.
const STALL: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_reader_that_stops_loses_its_stream_and_its_run_and_nobody_else_waits() {
    let stall_ms = STALL.as_millis().to_string();
    let stack = Stack::start(StackOptions {
        warm: 2,
        env: vec![
            ("CAPSA_STALLED_CLIENT_TIMEOUT_MS".into(), stall_ms.clone()),
            ("CAPSA_EXECUTOR_STALLED_CLIENT_TIMEOUT_MS".into(), stall_ms),
        ],
        ..Default::default()
    })
    .await;
    let mut a = stack.client(0).await;
    let other_key = stack.new_tenant_key("e2e-other");
    let mut b = stack.client_with_key(0, &other_key).await;
    let a_session = create_default_session(&mut a).await;
    let b_session = create_default_session(&mut b).await;

    // Endless output under a run timeout far past the test: only the stall can end it.
    let flood =
        "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n    sys.stdout.flush()\n";
    let flood = exec::request(&a_session.id, Language::Python, flood, 600_000);
    let started = Instant::now();
    let stalled = a.execute(flood).await.unwrap().into_inner();

    // Tenant B's code on the same node does not wait for A's reader.
    let print = exec::request(&b_session.id, Language::Python, "print(1)", 0);
    let out = tokio::time::timeout(Duration::from_secs(60), exec::try_run(&mut b, print))
        .await
        .expect("another tenant's print(1) did not complete within 60 s")
        .expect("another tenant's print(1)");
    assert_eq!(out.stdout_text(), "1\n");

    // A's next execute waits for the session's kernel, which the flood holds until the
    // stall ends its stream and interrupts it (not its 600 s timeout).
    let mut a2 = stack.client(0).await;
    let next = exec::request(&a_session.id, Language::Python, "print(2)", 0);
    let out = tokio::time::timeout(Duration::from_secs(120), exec::try_run(&mut a2, next))
        .await
        .expect("the kernel was not freed within 120 s of the stall")
        .expect("print(2) after the stall");
    assert_eq!(out.stdout_text(), "2\n");
    assert!(started.elapsed() >= STALL, "{:?}", started.elapsed());

    // The stalled reader, coming back, gets what was buffered and then why it ended.
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        capsa_test_support::execute::collect(stalled),
    )
    .await
    .expect("the stalled stream did not deliver its end within 60 s");
    let status = out.error.expect("the stalled stream ended with an error");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("client stopped reading for 10s"),
        "{}",
        status.message()
    );
    assert!(out.completion.is_none());
    assert!(!out.stdout.is_empty());
}
