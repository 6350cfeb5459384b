//! Sessions on the network, through the whole stack: real VMs, real packets. The "internet"
//! is a network namespace on 198.18.0.0/15 that the test builds (a web server per fake host
//! and a DNS zone the node's forwarder is pointed at); the one exception is the package
//! index that `pip install` reaches, which is installation, not load.

use capsa_e2e::{Client, Stack, StackOptions, exec};
use capsa_proto::common::v1::EgressPolicy;
use capsa_proto::session::v1 as pb;
use capsa_test_support::eventually;
use capsa_test_support::inet::FakeInternet;

/// Runs Python in the session and returns its stdout; panics (with the output) on an error.
use capsa_e2e::exec::python_stdout as py;

async fn create(c: &mut Client, egress: Option<EgressPolicy>) -> pb::Session {
    c.create_session(pb::CreateSessionRequest {
        egress,
        ..Default::default()
    })
    .await
    .expect("create session")
    .into_inner()
    .session
    .expect("a session")
}

async fn usage(c: &mut Client, sid: &str) -> capsa_proto::common::v1::Usage {
    c.get_usage(pb::GetUsageRequest {
        session_id: sid.to_string(),
    })
    .await
    .expect("usage")
    .into_inner()
    .usage
    .expect("a usage")
}

/// Guest-side probes: what a connect to (host, port) does within 5 s, and how long it took.
const PROBES: &str = r#"
import socket, time, urllib.request
def connect(host, port):
    t = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=5).close()
        r = "open"
    except ConnectionRefusedError:
        r = "refused"
    except ConnectionResetError:
        r = "reset"
    except socket.timeout:
        r = "timeout"
    except OSError as e:
        r = "error:" + (e.strerror or str(e))
    return r, time.monotonic() - t
def resolve(name):
    t = time.monotonic()
    try:
        r = socket.gethostbyname(name)
    except socket.gaierror as e:
        r = "gaierror:" + str(e.args[0])
    return r, time.monotonic() - t
def get(url):
    return urllib.request.urlopen(url, timeout=20).read().decode()
"#;

/// Domain rules work through the node's DNS: an allowed name resolves and answers, a denied
/// one is NXDOMAIN at once, the address of a name DNS never answered is refused, and
/// widening the policy of a running session works without a restart.
#[tokio::test]
async fn domain_rules_admit_what_dns_answered_for_allowed_names() {
    let mut inet = FakeInternet::start().expect("fake internet");
    inet.add_host("allowed.capsa.test").unwrap();
    let denied_ip = inet.add_host("denied.capsa.test").unwrap();
    let stack = Stack::start(StackOptions {
        vm_pool_args: vec!["--dns-upstream".into(), inet.dns_server().to_string()],
        ..Default::default()
    })
    .await;
    let mut c = stack.client(0).await;
    let s = create(
        &mut c,
        Some(EgressPolicy {
            allowed_domains: vec!["allowed.capsa.test".into()],
            ..Default::default()
        }),
    )
    .await;
    py(&mut c, &s.id, PROBES).await;

    let body = py(&mut c, &s.id, "print(get('http://allowed.capsa.test/'))").await;
    assert_eq!(body.trim(), "allowed.capsa.test");
    let queries = inet.dns_queries();
    assert!(
        queries >= 1,
        "the node forwarded the allowed name to the zone"
    );

    let denied = py(&mut c, &s.id, "print(*resolve('denied.capsa.test'))").await;
    let (answer, secs) = denied.trim().split_once(' ').unwrap();
    assert!(answer.starts_with("gaierror"), "{denied}");
    assert!(
        secs.parse::<f64>().unwrap() < 1.0,
        "a denied name fails at once: {denied}"
    );
    assert_eq!(
        inet.dns_queries(),
        queries,
        "a denied name never leaves the node"
    );

    // Its address, never answered to this VM: refused fast, not a hang.
    let direct = py(
        &mut c,
        &s.id,
        &format!("print(*connect('{denied_ip}', 80))"),
    )
    .await;
    let (result, secs) = direct.trim().split_once(' ').unwrap();
    assert!(
        matches!(result, "refused" | "reset") || result.starts_with("error"),
        "{direct}"
    );
    assert!(secs.parse::<f64>().unwrap() < 3.0, "{direct}");

    // Widen: the denied name is allowed from now on, same VM, same kernel.
    let updated = c
        .update_egress_policy(pb::UpdateEgressPolicyRequest {
            session_id: s.id.clone(),
            egress: Some(EgressPolicy {
                allowed_domains: vec!["allowed.capsa.test".into(), "*.capsa.test".into()],
                ..Default::default()
            }),
        })
        .await
        .expect("update egress")
        .into_inner();
    assert_eq!(updated.egress.unwrap().allowed_domains.len(), 2);
    let body = py(&mut c, &s.id, "print(get('http://denied.capsa.test/'))").await;
    assert_eq!(body.trim(), "denied.capsa.test");
    let got = c
        .get_egress_policy(pb::GetEgressPolicyRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .egress
        .unwrap();
    assert!(got.allowed_domains.contains(&"*.capsa.test".to_string()));
}

/// Whatever the policy says, a guest reaches neither the node (Redis, the Capsa services,
/// anything listening on the host) nor the metadata address, and network usage counts the
/// bytes a session moved (and none for a session that moved none).
#[tokio::test]
async fn the_node_is_out_of_reach_and_network_bytes_are_metered() {
    let mut inet = FakeInternet::start().expect("fake internet");
    let web = inet.add_host("bulk.capsa.test").unwrap();
    let stack = Stack::start(StackOptions::default()).await;
    let mut c = stack.client(0).await;
    // Everything a CIDR can name, on purpose: the node stays out of reach anyway.
    let open = create(
        &mut c,
        Some(EgressPolicy {
            allowed_cidrs: vec!["0.0.0.0/0".into()],
            ..Default::default()
        }),
    )
    .await;
    let quiet = create(&mut c, None).await;
    py(&mut c, &open.id, PROBES).await;

    // A service of the host's, listening on every address, as Redis or Capsa's own would.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let host_ip = host_address();
    for (what, target) in [
        (
            "a host service on the host's address",
            format!("'{host_ip}', {port}"),
        ),
        (
            "a host service on the fake internet's gateway (the host's side)",
            format!("'{}', {port}", inet.gateway()),
        ),
        ("cloud metadata", "'169.254.169.254', 80".to_string()),
    ] {
        let out = py(&mut c, &open.id, &format!("print(*connect({target}))")).await;
        let (result, secs) = out.trim().split_once(' ').unwrap();
        assert_ne!(result, "open", "{what} is reachable: {out}");
        // Refused at once, never a silent hang (generous: the guest runs under TCG).
        assert!(
            result != "timeout" && secs.parse::<f64>().unwrap() < 3.0,
            "{what}: {out}"
        );
    }
    drop(listener);

    let before = usage(&mut c, &open.id).await;
    let got = py(
        &mut c,
        &open.id,
        &format!(
            "print(len(urllib.request.urlopen('http://{web}/bytes/5000000', timeout=60).read()))"
        ),
    )
    .await;
    assert_eq!(got.trim(), "5000000");
    eventually!(
        usage(&mut c, &open.id).await.network_rx_bytes >= before.network_rx_bytes + 5_000_000,
        30
    );
    assert!(usage(&mut c, &open.id).await.network_tx_bytes > before.network_tx_bytes);

    // The quiet session ran code but sent nothing: its counters were sampled and are zero.
    py(&mut c, &quiet.id, "x = 1").await;
    eventually!(usage(&mut c, &quiet.id).await.sample_time.is_some(), 30);
    let q = usage(&mut c, &quiet.id).await;
    assert_eq!((q.network_rx_bytes, q.network_tx_bytes), (0, 0), "{q:?}");
}

/// The workflow Capsa exists for: `pip install` of a package the image lacks, from the real
/// package index, under `allow_package_managers`; it imports in the next Execute.
#[tokio::test]
async fn pip_installs_a_package_the_image_lacks() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut c = stack.client(0).await;
    let s = create(
        &mut c,
        Some(EgressPolicy {
            allow_package_managers: true,
            ..Default::default()
        }),
    )
    .await;
    let missing = exec::python(&mut c, &s.id, "import tabulate").await;
    assert!(!missing.errors.is_empty(), "the image already has tabulate");
    let out = exec::run(
        &mut c,
        exec::request(
            &s.id,
            capsa_proto::common::v1::Language::Shell,
            "pip install --no-cache-dir --disable-pip-version-check tabulate==0.9.0 2>&1",
            600_000,
        ),
    )
    .await;
    assert_eq!(out.completion().exit_code, 0, "{}", out.stdout_text());
    let printed = py(
        &mut c,
        &s.id,
        "import tabulate\nprint(tabulate.__version__)",
    )
    .await;
    assert_eq!(printed.trim(), "0.9.0");
    // Not a general opening: another host is still out of reach.
    let out = py(
        &mut c,
        &s.id,
        &format!("{PROBES}\nprint(*resolve('example.com'))"),
    )
    .await;
    assert!(out.trim().starts_with("gaierror"), "{out}");
}

/// The host's address on its default route (a routing lookup: nothing is sent).
fn host_address() -> String {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "route", "get", "1.1.1.1"])
        .output()
        .expect("ip route get");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|w| *w != "src")
        .nth(1)
        .unwrap_or_else(|| panic!("no src in {text:?}"))
        .to_string()
}
