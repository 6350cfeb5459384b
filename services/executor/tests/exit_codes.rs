//! The exit-code policy (`capsa_grpc::process`) as the executor binary applies it: bad
//! flags and malformed telemetry variables exit 64 with a message naming the culprit,
//! never a panic.

use capsa_test_support::run_to_exit;

const BIN: &str = "capsa-executor";

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn bad_flags_exit_64_and_help_exits_0() {
    for (args, named) in [
        (&["--listen", "nowhere"][..], "--listen"),
        (&["--idle-timeout-ms", "0"], "--idle-timeout-ms"),
        (&["--no-such-flag"], "--no-such-flag"),
    ] {
        let out = run_to_exit(BIN, args, &[]).await;
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(named), "{args:?}: {}", stderr(&out));
    }
    let out = run_to_exit(BIN, &["--help"], &[]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--otlp-endpoint"));
}

#[tokio::test]
async fn malformed_otlp_variables_and_log_filters_exit_64_naming_them() {
    let listen = ["--listen", "127.0.0.1:0"];
    for (var, value) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://[bad"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:4317"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "authorization"),
        ("RUST_LOG", "capsa=loud"),
    ] {
        let out = run_to_exit(BIN, &listen, &[(var, value)]).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{var}={value}: {err}");
        assert!(err.contains(var), "{var}={value}: {err}");
        assert!(!err.contains("panicked"), "{var}={value}: {err}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("CAPSA_LISTENING="),
            "{var}={value}: it must fail before serving"
        );
    }
    let out = run_to_exit(
        BIN,
        &[&listen[..], &["--otlp-endpoint", "nope"]].concat(),
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("--otlp-endpoint"), "{}", stderr(&out));
}
