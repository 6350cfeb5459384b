//! The InstaVM-compatible HTTP gateway: two `capsa-gateway` replicas in front of one real
//! stack, and the gateway's pytest suite (services/gateway/tests/python: the official
//! `instavm` SDK, unchanged, running the seed's flows; bad input; a hostile second tenant),
//! run with `$CAPSA_PYTHON` (deploy/scripts/python-env.sh builds that venv). Async executions
//! are started on one replica and polled on the other, so their state is really shared.
//! The first replica serves HTTPS (`--public-tls-cert`, certs.sh's localhost certificate), so
//! the whole suite also runs over TLS; the second stays plaintext.

use std::path::Path;
use std::time::Duration;

use capsa_e2e::{Stack, StackOptions, run_pytest, test_python};
use capsa_test_support::ServiceProcess;

/// Generous: the suite boots two sessions' VMs under TCG.
const SUITE_TIMEOUT: Duration = Duration::from_secs(1800);

/// A gateway replica; HTTPS with `tls`'s `public.pem`/`public.key` (certs.sh) if given.
async fn gateway(stack: &Stack, tls: Option<&Path>) -> ServiceProcess {
    let mut args: Vec<String> = [
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
    if let Some(dir) = tls {
        for (flag, file) in [
            ("--public-tls-cert", "public.pem"),
            ("--public-tls-key", "public.key"),
        ] {
            args.push(flag.into());
            args.push(dir.join(file).display().to_string());
        }
    }
    ServiceProcess::start("capsa-gateway", &args).await
}

/// An HTTPS port does not answer plaintext HTTP.
async fn no_plaintext_on(addr: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext HTTP answered on the HTTPS port: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

/// A client that opens a connection to an HTTPS port and never starts its handshake is cut
/// off after --client-idle-secs (30 s by default); watched for up to 120 s.
async fn silent_client_is_cut_off(addr: String) {
    use tokio::io::AsyncReadExt as _;
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(120), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent client still held its connection after 120 s: {closed:?}"
    );
}

#[tokio::test]
async fn the_instavm_sdk_suite_passes_against_the_gateway() {
    // Checked before the stack starts: without the venv there is nothing to run.
    test_python();
    // Two warm VMs: the suite holds at most two pool sessions at once (its clone and the VM
    // made from a snapshot are restored, not taken from the pool).
    let stack = Stack::start(StackOptions {
        warm: 2,
        ..StackOptions::default()
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/scripts/certs.sh"))
        .arg(certs.path())
        .output()
        .expect("run certs.sh");
    assert!(out.status.success(), "certs.sh: {out:?}");
    let gateways = [
        gateway(&stack, Some(certs.path())).await,
        gateway(&stack, None).await,
    ];
    no_plaintext_on(gateways[0].addr()).await;
    // Watched while the suite runs.
    let silent = tokio::spawn(silent_client_is_cut_off(gateways[0].addr().to_owned()));
    let https = gateways[0].url().replacen("http://", "https://", 1);
    let other_key = stack.new_tenant_key("other");
    run_pytest(
        &[
            "services/gateway/tests/python",
            // The suite is synchronous; the venv's pytest-asyncio would only warn.
            "-p",
            "no:asyncio",
        ],
        &[
            ("CAPSA_HTTP_ENDPOINT", https),
            // requests (the SDK's HTTP client) trusts the test CA.
            (
                "REQUESTS_CA_BUNDLE",
                certs.path().join("ca.pem").display().to_string(),
            ),
            ("CAPSA_HTTP_ENDPOINT_2", gateways[1].url()),
            ("CAPSA_API_KEY", stack.api_key.clone()),
            ("CAPSA_OTHER_API_KEY", other_key),
        ],
        SUITE_TIMEOUT,
    )
    .await;
    silent.await.unwrap();
    // Both replicas stop cleanly on SIGTERM (no execution is left in flight).
    for g in gateways {
        let status = g.terminate(Duration::from_secs(30)).await;
        assert!(status.success(), "gateway exited with {status}");
    }
}
