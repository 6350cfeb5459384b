//! The closed internal plane on a real stack: services talk mTLS with the certificates of
//! `deploy/scripts/certs.sh`, the seed flow works through it, and the node services refuse
//! a caller without a certificate, with one from another CA, and with one from the right CA
//! but the wrong identity (the gateway's: PERMISSION_DENIED), while a plaintext health-only
//! listener answers probes and nothing else. Also: Redis with a password
//! (a wrong one ends start-up with exit 69).

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsa_e2e::{Stack, StackOptions, create_default_session, exec};
use capsa_proto::common::v1::{ExecuteSpec, Language};
use capsa_proto::executor::v1::ExecuteRequest as NodeExecute;
use capsa_proto::executor::v1::executor_service_client::ExecutorServiceClient;
use capsa_proto::vmpool::v1::ListVmsRequest;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use capsa_test_support::workspace_binary;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn certs(dir: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/scripts/certs.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(dir)
        .output()
        .expect("run certs.sh");
    assert!(
        out.status.success(),
        "certs.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_path_buf()
}

/// A channel to `url` (http://) over TLS, trusting `ca`, expecting the server to be
/// `server`, presenting `client` (a certs.sh name in `client_dir`) if given.
async fn channel(
    url: &str,
    ca: &Path,
    server: &str,
    client: Option<(&Path, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name(server);
    if let Some((dir, name)) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(dir.join(format!("{name}.pem"))).unwrap(),
            std::fs::read(dir.join(format!("{name}.key"))).unwrap(),
        ));
    }
    Endpoint::from_shared(url.replacen("http://", "https://", 1))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .tls_config(tls)?
        .connect()
        .await
}

/// ListVms on vm-pool as `client`: the status, or Ok.
async fn list_vms(url: &str, ca: &Path, client: Option<(&Path, &str)>) -> Result<(), Code> {
    let channel = match channel(url, ca, "vm-pool.capsa.internal", client).await {
        Ok(c) => c,
        // The handshake itself refused us (no or untrusted certificate).
        Err(_) => return Err(Code::Unavailable),
    };
    VmPoolServiceClient::new(channel)
        .list_vms(ListVmsRequest {})
        .await
        .map(|_| ())
        .map_err(|s| s.code())
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_plane_runs_the_seed_flow_and_node_services_admit_only_their_callers() {
    let dir = tempfile::tempdir().unwrap();
    let good = certs(&dir.path().join("good"));
    let other_ca = certs(&dir.path().join("other"));
    let ca = good.join("ca.pem");
    let health_port = capsa_test_support::free_port();
    let stack = Stack::start(StackOptions {
        tls_dir: Some(good.clone()),
        vm_pool_args: vec![format!("--health-listen=127.0.0.1:{health_port}")],
        ..Default::default()
    })
    .await;

    // (a) The public API (plaintext here) works end to end over the mTLS plane.
    let mut client = stack.client(0).await;
    let session = create_default_session(&mut client).await;
    let out = exec::run(
        &mut client,
        exec::request(&session.id, Language::Python, "print(1)", 0),
    )
    .await;
    assert_eq!(out.stdout_text(), "1\n");

    let vm_pool = stack.vm_pool.url();
    let executor = stack.executor.url();
    // session-manager's certificate is admitted: the control for the refusals below.
    assert_eq!(
        list_vms(&vm_pool, &ca, Some((&good, "session-manager"))).await,
        Ok(())
    );
    assert_eq!(
        list_vms(&vm_pool, &ca, Some((&good, "metering"))).await,
        Ok(())
    );

    // (b) No certificate, or one from another CA: the server ends the handshake. Under TLS
    // 1.3 the client learns it on its first call, as a broken connection (UNAVAILABLE,
    // CANCELLED or UNKNOWN, depending on when the alert arrives), never an answer.
    let refused =
        |r: Result<(), Code>| matches!(r, Err(Code::Unavailable | Code::Cancelled | Code::Unknown));
    let r = list_vms(&vm_pool, &ca, None).await;
    assert!(refused(r), "no certificate: {r:?}");
    let r = list_vms(&vm_pool, &ca, Some((&other_ca, "session-manager"))).await;
    assert!(refused(r), "another CA's certificate: {r:?}");
    // Plaintext is not served at all.
    let plain = Endpoint::from_shared(vm_pool.clone())
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        let res = VmPoolServiceClient::new(plain)
            .list_vms(ListVmsRequest {})
            .await;
        assert!(res.is_err(), "plaintext ListVms answered: {res:?}");
    }

    // (c) The right CA, the wrong identity: PERMISSION_DENIED, on vm-pool and on the
    // executor's Execute aimed at the session's real VM.
    assert_eq!(
        list_vms(&vm_pool, &ca, Some((&good, "gateway"))).await,
        Err(Code::PermissionDenied)
    );
    let vms = VmPoolServiceClient::new(
        channel(
            &vm_pool,
            &ca,
            "vm-pool.capsa.internal",
            Some((&good, "session-manager")),
        )
        .await
        .unwrap(),
    )
    .list_vms(ListVmsRequest {})
    .await
    .unwrap()
    .into_inner()
    .vms;
    let vm = vms
        .iter()
        .find(|vm| vm.lease_id == session.id)
        .expect("the session's VM is listed");
    let execute = |code: &str| NodeExecute {
        vm_id: vm.id.clone(),
        spec: Some(ExecuteSpec {
            code: code.into(),
            language: Language::Python as i32,
            ..Default::default()
        }),
    };
    let as_gateway = channel(
        &executor,
        &ca,
        "executor.capsa.internal",
        Some((&good, "gateway")),
    )
    .await
    .unwrap();
    let denied = ExecutorServiceClient::new(as_gateway)
        .execute(execute("print('pwned')"))
        .await
        .expect_err("the gateway's certificate ran code on a node");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let no_cert = channel(&executor, &ca, "executor.capsa.internal", None).await;
    if let Ok(no_cert) = no_cert {
        let res = ExecutorServiceClient::new(no_cert)
            .execute(execute("print('pwned')"))
            .await;
        assert!(res.is_err(), "Execute without a certificate: {res:?}");
    }
    // A client that expects the executor but reaches vm-pool refuses it (server identity).
    assert!(
        channel(
            &vm_pool,
            &ca,
            "executor.capsa.internal",
            Some((&good, "session-manager"))
        )
        .await
        .is_err()
    );

    // (d) Probes without a certificate (the kubelet's) get vm-pool's health, and nothing
    // else, on its plaintext health-only listener.
    let health_only = Endpoint::from_shared(format!("http://127.0.0.1:{health_port}"))
        .unwrap()
        .connect()
        .await
        .expect("the health-only listener takes plaintext");
    let mut health = HealthClient::new(health_only.clone());
    for service in ["", "capsa.vmpool.v1.VmPoolService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e:?}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let other = VmPoolServiceClient::new(health_only)
        .list_vms(ListVmsRequest {})
        .await
        .expect_err("ListVms answered on the health-only listener");
    assert_eq!(other.code(), Code::Unimplemented, "{other:?}");

    // The session still runs: nothing above disturbed it.
    let out = exec::run(
        &mut client,
        exec::request(&session.id, Language::Python, "print(2)", 0),
    )
    .await;
    assert_eq!(out.stdout_text(), "2\n");
    stack.stop().await;
}

/// Redis with `requirepass`: the right password in the URL serves (and session-manager's
/// public TLS with it), a wrong or missing one ends session-manager's start-up with exit 69
/// and a message that does not show it.
#[tokio::test(flavor = "multi_thread")]
async fn redis_password_is_required_and_a_wrong_one_fails_start_up_with_69() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--requirepass", "s3cret-pw"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start redis-server");
    // Killed however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _redis = Kill(redis);
    capsa_test_support::eventually!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        30
    );
    let good = format!("redis://:s3cret-pw@127.0.0.1:{port}/");
    let key = std::process::Command::new(workspace_binary("capsa-session-manager"))
        .args(["create-api-key", "--redis-url", &good, "--tenant", "t"])
        .output()
        .unwrap();
    assert!(
        key.status.success(),
        "{}",
        String::from_utf8_lossy(&key.stderr)
    );
    let key = String::from_utf8(key.stdout).unwrap().trim().to_owned();

    // The right password serves, here on a public port with TLS (--public-tls-*): a client
    // that trusts the CA lists sessions over https; plaintext gets no answer.
    let tls = certs(&dir.path().join("tls"));
    let file = |name: &str| tls.join(name).display().to_string();
    let public = capsa_test_support::ServiceProcess::start(
        "capsa-session-manager",
        &[
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--redis-url".into(),
            good.clone(),
            "--public-tls-cert".into(),
            file("public.pem"),
            "--public-tls-key".into(),
            file("public.key"),
        ],
    )
    .await;
    let https = Endpoint::from_shared(format!("https://{}", public.addr()))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(
            std::fs::read(tls.join("ca.pem")).unwrap(),
        )))
        .unwrap()
        .connect()
        .await
        .expect("TLS to the public port");
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
    let list = |channel: Channel| {
        let bearer = bearer.clone();
        async move {
            let mut req =
                tonic::Request::new(capsa_proto::session::v1::ListSessionsRequest::default());
            req.metadata_mut().insert("authorization", bearer);
            capsa_proto::session::v1::session_service_client::SessionServiceClient::new(channel)
                .list_sessions(req)
                .await
        }
    };
    list(https).await.expect("ListSessions over TLS");
    if let Ok(plain) = Endpoint::from_shared(public.url()).unwrap().connect().await {
        let res = list(plain).await;
        assert!(res.is_err(), "plaintext answered on a TLS port: {res:?}");
    }
    drop(public);

    for url in [
        format!("redis://:wrong-pw@127.0.0.1:{port}/"),
        format!("redis://127.0.0.1:{port}/"),
    ] {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(workspace_binary("capsa-session-manager"))
                .args(["--listen", "127.0.0.1:0", "--redis-url", &url])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("session-manager did not give up within 60 s")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(69), "{url}: {stderr}{stdout}");
        assert!(!stderr.contains("wrong-pw") && !stdout.contains("wrong-pw"));
    }
}
