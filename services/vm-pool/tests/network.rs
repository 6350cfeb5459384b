//! VM networking on real VMs and real packets: the egress policy in force (CIDRs, ports,
//! DNS names), a policy change cutting an open connection, isolation from the host, the
//! metadata address and other VMs, deny-all while warm, and no network object left behind
//! after a crash or a shutdown. The "internet" is a namespace on 198.18.0.0/15
//! ([`FakeInternet`]); no packet leaves this machine. Needs root.

mod common;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsa_proto::common::v1::EgressPolicy;
use capsa_proto::vmpool::v1::{AcquireVmRequest, GetVmCountersRequest, SetEgressPolicyRequest};
use capsa_test_support::eventually;
use capsa_test_support::inet::FakeInternet;
use common::{PoolUnderTest, shell, shell_with, wait_warm, warm_vms};

/// Connects to each `host:port` argument, sends a GET and prints `host:port ok:<status
/// line>`, `err:<error>` or `timeout`, with the seconds it took.
const PROBE: &str = r#"
import socket, sys, time
for arg in sys.argv[1:]:
    host, port = arg.rsplit(":", 1)
    t = time.time()
    try:
        s = socket.create_connection((host, int(port)), timeout=20)
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        r = "ok:" + s.recv(200).split(b"\r\n")[0].decode()
    except socket.timeout:
        r = "timeout"
    except OSError as e:
        r = "err:" + type(e).__name__
    print(f"{arg} {r} {time.time() - t:.1f}", flush=True)
"#;

/// How long a denied connect may take: it is refused at once, but TCG is slow.
const FAST: f64 = 5.0;

async fn probe(vsock: &Path, targets: &[String]) -> Vec<(String, String, f64)> {
    let code = format!("python3 - {} <<'EOF'\n{PROBE}\nEOF", targets.join(" "));
    let (rc, out) = shell(vsock, &code).await;
    assert_eq!(rc, 0, "{out}");
    let results: Vec<(String, String, f64)> = out
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((
                w.next()?.to_owned(),
                w.next()?.to_owned(),
                w.next()?.parse().ok()?,
            ))
        })
        .collect();
    assert_eq!(results.len(), targets.len(), "{out}");
    results
}

/// Asserts each target's outcome: `true` reached (HTTP answer), `false` refused fast.
async fn expect(vsock: &Path, cases: &[(String, bool)]) {
    let targets: Vec<String> = cases.iter().map(|(t, _)| t.clone()).collect();
    let results = probe(vsock, &targets).await;
    for ((target, reach), (_, outcome, secs)) in cases.iter().zip(&results) {
        if *reach {
            assert!(
                outcome.starts_with("ok:HTTP/1."),
                "{target} should be reachable: {results:?}"
            );
        } else {
            assert!(
                outcome.starts_with("err:"),
                "{target} should be refused: {results:?}"
            );
            assert!(
                *secs < FAST,
                "{target} was refused only after {secs} s: {results:?}"
            );
        }
    }
}

fn policy(cidrs: &[String], domains: &[&str], http: bool) -> EgressPolicy {
    EgressPolicy {
        allowed_cidrs: cidrs.to_vec(),
        allowed_domains: domains.iter().map(|d| d.to_string()).collect(),
        allow_http: Some(http),
        ..Default::default()
    }
}

fn vsock_of(pool: &PoolUnderTest, vm_id: &str) -> PathBuf {
    pool.vms_dir().join(vm_id).join("vsock.sock")
}

fn at(ip: IpAddr, port: u16) -> String {
    format!("{ip}:{port}")
}

async fn guest_ip(vsock: &Path) -> String {
    let (rc, out) = shell(vsock, "ip -4 -o addr show dev eth0").await;
    assert_eq!(rc, 0, "{out}");
    let cidr = out.split_whitespace().nth(3).expect("an address on eth0");
    cidr.split('/').next().unwrap().to_owned()
}

/// What nft lists in vm-pool's namespace (the denied sets among it).
fn ns_ruleset(netns: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft", "list", "ruleset"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policy_is_enforced_changed_live_and_isolates_the_host_and_other_vms() {
    let mut inet = FakeInternet::start().unwrap();
    let allowed = inet.add_host("cidr.capsa.test").unwrap();
    let neighbour = inet.add_host("neighbour.capsa.test").unwrap();
    inet.add_host("named.capsa.test").unwrap();
    let dns = inet.dns_server().to_string();
    // Something listening on the host, on its own address and on every address.
    let host_listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    let pool = PoolUnderTest::start(&["--warm", "1", "--dns-upstream", &dns]).await;
    let mut client = pool.client().await;
    wait_warm(&mut client, 1).await;
    let warm = warm_vms(&mut client).await.remove(0);
    let vsock = vsock_of(&pool, &warm.id);

    // Warm: nothing at all, not even the address a lease will admit.
    expect(&vsock, &[(at(allowed, 80), false)]).await;

    // Leased with a CIDR (and the host's own address, which the host still refuses).
    let egress = policy(
        &[format!("{allowed}/32"), "192.0.2.2/32".into()],
        &["named.capsa.test"],
        true,
    );
    let vm = client
        .acquire_vm(AcquireVmRequest {
            lease_id: "net-1".into(),
            egress: Some(egress),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(vm.id, warm.id, "the warm vm is leased");
    let link_host = {
        // The host's end of vm-pool's veth: an address of the host like any other.
        let out = std::process::Command::new("ip")
            .args([
                "-4",
                "-o",
                "addr",
                "show",
                "dev",
                &pool.net_names().host_veth,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .nth(3)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    };
    expect(
        &vsock,
        &[
            (at(allowed, 80), true),
            (at(allowed, 443), true),
            (at(neighbour, 80), false),
            (format!("192.0.2.2:{host_port}"), false),
            (format!("{link_host}:{host_port}"), false),
            ("169.254.169.254:80".into(), false),
            ("named.capsa.test:80".into(), true),
        ],
    )
    .await;
    // A name the policy does not allow fails to resolve, at once.
    let (rc, out) = shell(
        &vsock,
        "python3 -c \"import socket,time; t=time.time()\ntry: socket.gethostbyname('neighbour.capsa.test'); print('resolved')\nexcept OSError as e: print('unresolved', round(time.time()-t,1))\"",
    )
    .await;
    assert_eq!(rc, 0, "{out}");
    let secs: f64 = out
        .trim()
        .strip_prefix("unresolved ")
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();
    assert!(secs < FAST, "{out}");

    // allow_http=false: port 80 closes, 443 stays.
    client
        .set_egress_policy(SetEgressPolicyRequest {
            vm_id: vm.id.clone(),
            egress: Some(policy(&[format!("{allowed}/32")], &[], false)),
        })
        .await
        .unwrap();
    expect(
        &vsock,
        &[(at(allowed, 80), false), (at(allowed, 443), true)],
    )
    .await;

    // A connection open while the policy narrows is cut at its next packet.
    let stream = format!(
        "python3 - <<'EOF'\nimport socket\ns = socket.create_connection(('{allowed}', 443), timeout=60)\ns.sendall(b'GET /stream HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n')\ngot = 0\ntry:\n    while True:\n        d = s.recv(4096)\n        if not d:\n            print('closed', flush=True); break\n        got += len(d)\n        if got > 200: print('streaming', flush=True); got = -10**9\nexcept OSError as e:\n    print('cut', type(e).__name__, flush=True)\nEOF"
    );
    let mut narrowed_at = None;
    let vm_id = vm.id.clone();
    let mut setter = client.clone();
    let (rc, out) = shell_with(&vsock, &stream, async |out: &str| {
        if narrowed_at.is_none() && out.contains("streaming") {
            setter
                .set_egress_policy(SetEgressPolicyRequest {
                    vm_id: vm_id.clone(),
                    egress: Some(policy(&[], &[], true)),
                })
                .await
                .unwrap();
            narrowed_at = Some(Instant::now());
        }
    })
    .await;
    let narrowed_at = narrowed_at.unwrap_or_else(|| panic!("never streamed: {out}"));
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("cut ConnectionResetError"), "{out}");
    assert!(
        narrowed_at.elapsed() < Duration::from_secs(30),
        "cut only after {:?}",
        narrowed_at.elapsed()
    );

    // Widening works at once, without a restart.
    client
        .set_egress_policy(SetEgressPolicyRequest {
            vm_id: vm.id.clone(),
            egress: Some(policy(
                &[format!("{allowed}/32"), format!("{neighbour}/32")],
                &[],
                true,
            )),
        })
        .await
        .unwrap();
    expect(
        &vsock,
        &[(at(allowed, 80), true), (at(neighbour, 80), true)],
    )
    .await;

    // Network bytes are the guest's, from its tap: a 1 MB download shows as received.
    let counters =
        |client: &mut capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient<
            tonic::transport::Channel,
        >,
         vm_id: String| {
            let mut client = client.clone();
            async move {
                client
                    .get_vm_counters(GetVmCountersRequest { vm_id })
                    .await
                    .unwrap()
                    .into_inner()
            }
        };
    let before = counters(&mut client, vm.id.clone()).await;
    let fetch = format!(
        "python3 -c \"import urllib.request; print(len(urllib.request.urlopen('http://{allowed}/bytes/1000000', timeout=60).read()))\""
    );
    let (rc, out) = shell(&vsock, &fetch).await;
    assert_eq!((rc, out.trim()), (0, "1000000"), "{out}");
    let after = counters(&mut client, vm.id.clone()).await;
    assert!(
        after.network_rx_bytes >= before.network_rx_bytes + 1_000_000,
        "rx {} -> {}",
        before.network_rx_bytes,
        after.network_rx_bytes
    );
    assert!(
        after.network_tx_bytes > before.network_tx_bytes,
        "{after:?}"
    );

    // A second VM with its own, narrower policy reaches neither the first VM nor what
    // only the first may reach.
    let first_ip = guest_ip(&vsock).await;
    let second = client
        .acquire_vm(AcquireVmRequest {
            lease_id: "net-2".into(),
            egress: Some(policy(&[format!("{allowed}/32")], &[], true)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    let vsock2 = vsock_of(&pool, &second.id);
    expect(
        &vsock2,
        &[
            (at(allowed, 80), true),
            (at(neighbour, 80), false),
            (format!("{first_ip}:22"), false),
        ],
    )
    .await;
    // Refused by the rule (not by the first guest's kernel): logged as a denial.
    let netns = pool.net_names().netns;
    eventually!(ns_ruleset(&netns).contains(&format!("{first_ip} . 22")), 10);

    // Bad requests: the field is named; an unknown or unleased VM is NOT_FOUND.
    let err = client
        .set_egress_policy(SetEgressPolicyRequest {
            vm_id: vm.id.clone(),
            egress: Some(policy(&["300.1.1.1/8".into()], &[], true)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("egress.allowed_cidrs"),
        "{}",
        err.message()
    );
    for vm_id in ["vm-00000000000000aa".to_owned()]
        .into_iter()
        .chain(warm_vms(&mut client).await.into_iter().map(|v| v.id))
    {
        let err = client
            .set_egress_policy(SetEgressPolicyRequest {
                vm_id,
                egress: Some(policy(&[], &[], true)),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{}", err.message());
    }
    drop(host_listener);
}

fn exists(names: &capsa_vm_pool::net::Names) -> (bool, bool, bool) {
    let tables = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    (
        names.ns_path().exists(),
        Path::new("/sys/class/net").join(&names.host_veth).exists(),
        String::from_utf8_lossy(&tables.stdout).contains(&format!("table inet {}\n", names.table)),
    )
}

fn taps(netns: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-br", "link"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("vmtap"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_pools_network_is_replaced_and_a_shutdown_removes_it_all() {
    let mut pool = PoolUnderTest::start(&["--warm", "1", "--dns-upstream", "127.0.0.1:9"]).await;
    let names = pool.net_names();
    let mut client = pool.client().await;
    wait_warm(&mut client, 1).await;
    assert_eq!(exists(&names), (true, true, true));
    let before = taps(&names.netns);
    assert_eq!(before.len(), 1, "{before:?}");

    pool.crash().await;
    // A crash leaves the network (the next start removes it): still there.
    assert!(exists(&names).0);
    pool.restart(&["--warm", "1", "--dns-upstream", "127.0.0.1:9"])
        .await;
    let mut client = pool.client().await;
    wait_warm(&mut client, 1).await;
    assert_eq!(exists(&names), (true, true, true));
    // One namespace, holding only the new VM's tap (the old one went with the old namespace).
    let after = taps(&names.netns);
    assert_eq!(after.len(), 1, "{after:?}");
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let count = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(names.netns.as_str()))
        .count();
    assert_eq!(count, 1);

    let status = pool
        .process
        .take()
        .unwrap()
        .terminate(Duration::from_secs(120))
        .await;
    assert!(status.success(), "{status:?}");
    assert_eq!(
        exists(&names),
        (false, false, false),
        "a clean shutdown removes everything"
    );
}
