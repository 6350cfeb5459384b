//! The exit-code policy (`capsa_grpc::process`) for Redis: unreachable at start exits 69
//! (EX_UNAVAILABLE), a malformed URL exits 64; neither prints the URL's password.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use capsa_test_support::run_to_exit;

const BIN: &str = "capsa-session-manager";
const PASSWORD: &str = "hunter2-secret";

/// A local port nothing listens on (bound, then released): connections are refused.
fn refused_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn unreachable_redis_exits_69_quickly_without_the_password() {
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}/0", refused_port());
    for args in [
        vec!["--listen", "127.0.0.1:0", "--redis-url", &url],
        vec!["list-api-keys", "--redis-url", &url],
    ] {
        let started = Instant::now();
        let out = run_to_exit(BIN, &args, &[]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{args:?}: {err}");
        // A bound on the connect retries, generous for a loaded machine.
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        assert!(err.contains("redis://:****@127.0.0.1:"), "{err}");
        assert!(!err.contains(PASSWORD), "{err}");
    }
}

#[tokio::test]
async fn a_malformed_redis_url_exits_64_without_the_password() {
    for url in [
        format!("redis://:{PASSWORD}@127.0.0.1:notaport/0"),
        format!("http://:{PASSWORD}@127.0.0.1:6379/"),
    ] {
        let out = run_to_exit(BIN, &["--listen", "127.0.0.1:0", "--redis-url", &url], &[]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{url}: {err}");
        assert!(err.contains("--redis-url"), "{err}");
        assert!(!err.contains(PASSWORD), "{err}");
    }
}
