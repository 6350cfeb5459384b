//! Snapshots on real VMs: SuspendVm saves a leased VM and destroys it (its lease, capacity
//! and network slot freed); ResumeVm starts new VMs from the snapshot with the guest's
//! files and processes, each with an identity of its own (address and MAC of its own slot,
//! machine-id, the host's clock) and its egress policy in force; DeleteSnapshot frees the
//! disk. Bad requests are refused with the field named. A vm-pool killed in the middle of
//! a suspend leaves neither a snapshot nor a partial one nor the VM after its restart, and
//! the complete snapshots survive the restart and still restore. SnapshotVm saves a VM that
//! runs on: its copies start from that instant and diverge from it and from each other.
//! Needs root.

mod common;

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsa_proto::common::v1::EgressPolicy;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use capsa_proto::vmpool::v1::{
    DeleteSnapshotRequest, GetNodeInfoRequest, GetSnapshotRequest, GetVmRequest,
    ListSnapshotsRequest, ReleaseVmRequest, ResumeVmRequest, Snapshot, SnapshotVmRequest,
    SuspendVmRequest, Vm, VmState,
};
use capsa_test_support::eventually;
use capsa_test_support::inet::FakeInternet;
use common::{PoolUnderTest, acquire, list, pid_alive, shell};
use tonic::transport::Channel;

type Client = VmPoolServiceClient<Channel>;

fn snapshots_dir(pool: &PoolUnderTest) -> PathBuf {
    pool.state.path().join("snapshots")
}

fn vsock_of(pool: &PoolUnderTest, vm_id: &str) -> PathBuf {
    pool.vms_dir().join(vm_id).join("vsock.sock")
}

/// Bytes the files under `dir` take on disk.
fn disk_usage(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                disk_usage(&e.path())
            } else {
                meta.blocks() * 512
            }
        })
        .sum()
}

/// Names in the snapshots dir (complete snapshots and `.tmp-*` dirs alike).
fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn egress(allowed: Ipv4Addr) -> EgressPolicy {
    EgressPolicy {
        allowed_cidrs: vec![format!("{allowed}/32")],
        allowed_domains: vec!["named.capsa.test".into()],
        allow_http: Some(true),
        ..Default::default()
    }
}

async fn suspend(
    c: &mut Client,
    vm_id: &str,
    snapshot_id: &str,
) -> Result<Snapshot, tonic::Status> {
    c.suspend_vm(SuspendVmRequest {
        vm_id: vm_id.into(),
        snapshot_id: snapshot_id.into(),
    })
    .await
    .map(|r| r.into_inner().snapshot.unwrap())
}

fn resume_request(snapshot_id: &str, lease: &str, egress: Option<EgressPolicy>) -> ResumeVmRequest {
    ResumeVmRequest {
        snapshot_id: snapshot_id.into(),
        lease_id: lease.into(),
        egress,
    }
}

async fn resume(c: &mut Client, req: ResumeVmRequest) -> Result<Vm, tonic::Status> {
    c.resume_vm(req).await.map(|r| r.into_inner().vm.unwrap())
}

async fn snapshots(c: &mut Client) -> Vec<Snapshot> {
    c.list_snapshots(ListSnapshotsRequest {})
        .await
        .unwrap()
        .into_inner()
        .snapshots
}

/// What a guest says about itself, `key=value` per line.
#[derive(Debug)]
struct Guest {
    marker: String,
    /// The command line of the background `sleep` when it still runs.
    sleep: String,
    machine_id: String,
    /// `<ip>/<prefix>` of eth0.
    addr: String,
    mac: String,
    route: String,
    resolver: String,
    /// `date +%s` in the guest, and the host's clock (whole seconds) around the call.
    date: u64,
    host_before: u64,
    host_after: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn guest(vsock: &Path, sleep_pid: &str) -> Guest {
    let script = format!(
        r#"printf 'marker=%s\n' "$(cat /root/marker 2>&1)"
if kill -0 {sleep_pid} 2>/dev/null; then printf 'sleep=%s\n' "$(tr '\0' ' ' </proc/{sleep_pid}/cmdline)"; else echo sleep=gone; fi
printf 'machine=%s\n' "$(cat /etc/machine-id)"
printf 'addr=%s\n' "$(ip -4 -o addr show dev eth0)"
printf 'mac=%s\n' "$(cat /sys/class/net/eth0/address)"
printf 'route=%s\n' "$(ip route show default)"
printf 'resolver=%s\n' "$(grep nameserver /etc/resolv.conf)"
printf 'date=%s\n' "$(date +%s)"
"#
    );
    let host_before = now_secs();
    let (rc, out) = shell(vsock, &script).await;
    let host_after = now_secs();
    assert_eq!(rc, 0, "{out}");
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in {out}"))
            .trim()
            .to_owned()
    };
    Guest {
        marker: field("marker"),
        sleep: field("sleep"),
        machine_id: field("machine"),
        // "2: eth0    inet 100.80.0.2/30 brd ... scope global eth0"
        addr: field("addr")
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .unwrap_or_default()
            .to_owned(),
        mac: field("mac"),
        route: field("route"),
        resolver: field("resolver"),
        date: field("date").parse().unwrap_or_else(|_| panic!("{out}")),
        host_before,
        host_after,
    }
}

/// The network vm-pool gave the VM whose VMM is `vmm_pid`: (guest address "<ip>/30",
/// gateway, MAC), read from QEMU's command line (tap, MAC) and the tap's address (the
/// gateway, `.1` of the slot's /30; the guest is `.2`).
fn assigned(pool: &PoolUnderTest, vmm_pid: u32) -> (String, Ipv4Addr, String) {
    let raw = std::fs::read(format!("/proc/{vmm_pid}/cmdline")).unwrap();
    let args = String::from_utf8_lossy(&raw).replace('\0', " ");
    let after = |key: &str| {
        let rest = &args[args.find(key).unwrap_or_else(|| panic!("{key} in {args}")) + key.len()..];
        rest.split([',', ' ']).next().unwrap().to_owned()
    };
    let (tap, mac) = (after("ifname="), after("mac="));
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            &pool.net_names().netns,
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            &tap,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let cidr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no address on {tap}: {text}"));
    let gateway: Ipv4Addr = cidr.split('/').next().unwrap().parse().unwrap();
    let guest = Ipv4Addr::from(u32::from(gateway) + 1);
    (format!("{guest}/30"), gateway, mac)
}

/// `host:port` targets probed from the guest: `ok` (an HTTP answer) or `err:<error>`.
async fn probe(vsock: &Path, targets: &[String]) -> Vec<String> {
    let code = format!(
        r#"python3 - {} <<'EOF'
import socket, sys
for arg in sys.argv[1:]:
    host, port = arg.rsplit(":", 1)
    try:
        s = socket.create_connection((host, int(port)), timeout=20)
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        r = "ok" if s.recv(200).startswith(b"HTTP/1.") else "garbled"
    except OSError as e:
        r = "err:" + type(e).__name__
    print(arg, r, flush=True)
EOF"#,
        targets.join(" ")
    );
    let (rc, out) = shell(vsock, &code).await;
    assert_eq!(rc, 0, "{out}");
    let results: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect();
    assert_eq!(results.len(), targets.len(), "{out}");
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_vm_resumes_twice_with_its_state_and_new_identities() {
    let mut inet = FakeInternet::start().unwrap();
    let allowed = match inet.add_host("allowed.capsa.test").unwrap() {
        std::net::IpAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    let denied = inet.add_host("denied.capsa.test").unwrap();
    inet.add_host("named.capsa.test").unwrap();
    let dns = inet.dns_server().to_string();
    // Room for two VMs and no warm ones: a resume needs the capacity a suspend frees.
    let pool =
        PoolUnderTest::start(&["--warm", "0", "--capacity", "2", "--dns-upstream", &dns]).await;
    let mut c = pool.client().await;
    // A file on the disk and a process in memory.
    let vm = acquire(&mut c, "s-1", Some(egress(allowed))).await;
    // Made at start-up, before vm-pool answers.
    let snaps = snapshots_dir(&pool);
    let empty_usage = disk_usage(&snaps);
    let vsock = vsock_of(&pool, &vm.id);
    let (rc, out) = shell(
        &vsock,
        "echo kept-on-disk > /root/marker; sync; sleep 1000 </dev/null >/dev/null 2>&1 & echo $!",
    )
    .await;
    assert_eq!(rc, 0, "{out}");
    let sleep_pid = out.trim().to_owned();
    let before = guest(&vsock, &sleep_pid).await;
    assert_eq!(before.marker, "kept-on-disk", "{before:?}");
    assert!(before.sleep.starts_with("sleep 1000"), "{before:?}");
    assert_eq!(before.addr, assigned(&pool, vm.vmm_pid).0, "{before:?}");

    let t0 = SystemTime::now();
    let snap = suspend(&mut c, &vm.id, "snap-1").await.unwrap();
    assert_eq!(snap.id, "snap-1");
    assert_eq!(
        (
            snap.template.as_str(),
            snap.vcpus,
            snap.memory_mib,
            snap.engine.as_str()
        ),
        ("default", vm.vcpus, vm.memory_mib, vm.engine.as_str())
    );
    assert!(snap.size_bytes > 0, "{snap:?}");
    let created = SystemTime::try_from(snap.create_time.unwrap()).unwrap();
    assert!(
        created + Duration::from_secs(1) >= t0 && created <= SystemTime::now(),
        "{snap:?}"
    );
    let used = disk_usage(&snaps);
    assert!(
        used >= snap.size_bytes && used > empty_usage,
        "{used} vs {snap:?}"
    );

    // The VM is gone: record, process, dir, capacity, lease.
    let err = c
        .get_vm(GetVmRequest {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(list(&mut c).await.is_empty());
    assert!(!pid_alive(vm.vmm_pid));
    assert!(!pool.vms_dir().join(&vm.id).exists());
    let info = c
        .get_node_info(GetNodeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.leased, 0, "{info:?}");

    // A retried suspend returns the same snapshot; it is listed and readable.
    let again = suspend(&mut c, &vm.id, "snap-1").await.unwrap();
    assert_eq!(again, snap);
    assert_eq!(snapshots(&mut c).await, vec![snap.clone()]);
    let got = c
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: "snap-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got, snap);

    // The suspended VM's lease ended: its id does not lease again.
    let err = resume(&mut c, resume_request("snap-1", "s-1", None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // Two VMs from the one snapshot, both within the capacity of two.
    let r1 = resume(
        &mut c,
        resume_request("snap-1", "r-1", Some(egress(allowed))),
    )
    .await
    .unwrap();
    let retry = resume(
        &mut c,
        resume_request("snap-1", "r-1", Some(egress(allowed))),
    )
    .await
    .unwrap();
    assert_eq!(retry.id, r1.id, "a retried resume gets the same vm");
    let r2 = resume(
        &mut c,
        resume_request("snap-1", "r-2", Some(egress(allowed))),
    )
    .await
    .unwrap();
    for r in [&r1, &r2] {
        assert_eq!(r.state, VmState::Leased as i32, "{r:?}");
        assert_ne!(r.id, vm.id);
        assert!(r.boot_duration.is_some() && pid_alive(r.vmm_pid), "{r:?}");
    }
    assert_eq!((r1.lease_id.as_str(), r2.lease_id.as_str()), ("r-1", "r-2"));

    let mut ids = vec![before.machine_id.clone()];
    let mut addrs = vec![before.addr.clone()];
    for r in [&r1, &r2] {
        let g = guest(&vsock_of(&pool, &r.id), &sleep_pid).await;
        assert_eq!(g.marker, "kept-on-disk", "{g:?}");
        assert_eq!(
            g.sleep, before.sleep,
            "the background process runs on: {g:?}"
        );
        let (addr, gateway, mac) = assigned(&pool, r.vmm_pid);
        assert_eq!(
            (g.addr.as_str(), g.mac.as_str()),
            (addr.as_str(), mac.as_str()),
            "{g:?}"
        );
        assert!(g.route.contains(&format!("via {gateway} ")), "{g:?}");
        assert_eq!(g.resolver, format!("nameserver {gateway}"), "{g:?}");
        assert!(
            g.machine_id.len() == 32 && g.machine_id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{g:?}"
        );
        assert!(
            g.date + 2 >= g.host_before && g.date <= g.host_after + 2,
            "guest clock off the host's: {g:?}"
        );
        ids.push(g.machine_id);
        addrs.push(g.addr);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "every vm has its own machine-id: {ids:?}");
    assert_ne!(addrs[1], addrs[2], "{addrs:?}");
    assert!(
        addrs[1] != addrs[0] || addrs[2] != addrs[0],
        "a resumed vm sits at another address than the snapshot's: {addrs:?}"
    );

    // Egress as leased: the allowed address and name, nothing else.
    let results = probe(
        &vsock_of(&pool, &r2.id),
        &[
            format!("{allowed}:80"),
            "named.capsa.test:80".into(),
            format!("{denied}:80"),
        ],
    )
    .await;
    assert_eq!(results[..2], ["ok", "ok"], "{results:?}");
    assert!(results[2].starts_with("err:"), "{results:?}");

    // The snapshot id is taken: another vm cannot be saved under it, and stays leased.
    let err = suspend(&mut c, &r1.id, "snap-1").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    let still = c
        .get_vm(GetVmRequest {
            vm_id: r1.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(still.state, VmState::Leased as i32);

    for r in [&r1, &r2] {
        c.release_vm(ReleaseVmRequest {
            vm_id: r.id.clone(),
        })
        .await
        .unwrap();
    }
    // Deleting gives the disk back, once.
    let delete = |id: &str| DeleteSnapshotRequest {
        snapshot_id: id.into(),
    };
    assert!(
        c.delete_snapshot(delete("snap-1"))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    assert!(
        !c.delete_snapshot(delete("snap-1"))
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    assert!(dir_names(&snaps).is_empty(), "{:?}", dir_names(&snaps));
    assert_eq!(disk_usage(&snaps), empty_usage);
    assert!(snapshots(&mut c).await.is_empty());
    let err = c
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: "snap-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// Asserts `r` failed with `code` and a message naming `field`.
fn refused<T>(r: Result<T, tonic::Status>, code: tonic::Code, field: &str) {
    let Err(err) = r else {
        panic!("{field}: expected {code:?}, got a success");
    };
    assert_eq!(err.code(), code, "{err:?}");
    assert!(err.message().contains(field), "{field}: {}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshot_requests_are_refused_with_the_field_named() {
    let pool = PoolUnderTest::start(&["--warm", "0", "--dns-upstream", "127.0.0.1:9"]).await;
    let mut c = pool.client().await;
    let engine = c
        .get_node_info(GetNodeInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .engine;

    for bad in ["", "Snap", "a_b", ".tmp-x", "a/b", &"a".repeat(65)] {
        let ia = tonic::Code::InvalidArgument;
        refused(
            suspend(&mut c, "vm-0000000000000000", bad).await,
            ia,
            "snapshot_id",
        );
        refused(
            resume(&mut c, resume_request(bad, "l-1", None)).await,
            ia,
            "snapshot_id",
        );
        let get = GetSnapshotRequest {
            snapshot_id: bad.into(),
        };
        refused(c.get_snapshot(get).await, ia, "snapshot_id");
        let delete = DeleteSnapshotRequest {
            snapshot_id: bad.into(),
        };
        refused(c.delete_snapshot(delete).await, ia, "snapshot_id");
    }
    refused(
        suspend(&mut c, "../x", "s").await,
        tonic::Code::InvalidArgument,
        "vm_id",
    );
    refused(
        resume(&mut c, resume_request("s", "", None)).await,
        tonic::Code::InvalidArgument,
        "lease_id",
    );
    refused(
        suspend(&mut c, "vm-0000000000000000", "s").await,
        tonic::Code::NotFound,
        "vm_id",
    );
    // An unknown snapshot, twice with the same lease: a failed resume does not use it up.
    for _ in 0..2 {
        refused(
            resume(&mut c, resume_request("nope", "l-1", None)).await,
            tonic::Code::NotFound,
            "snapshot_id",
        );
    }
    let get = GetSnapshotRequest {
        snapshot_id: "nope".into(),
    };
    refused(
        c.get_snapshot(get).await,
        tonic::Code::NotFound,
        "snapshot_id",
    );
    let delete = DeleteSnapshotRequest {
        snapshot_id: "nope".into(),
    };
    assert!(
        !c.delete_snapshot(delete)
            .await
            .unwrap()
            .into_inner()
            .deleted
    );

    // Snapshots this node cannot restore: another engine's, another template's.
    let snaps = snapshots_dir(&pool);
    for (id, engine, template) in [
        ("foreign", "cloud-hypervisor", "default"),
        ("other-template", engine.as_str(), "gpu"),
    ] {
        std::fs::create_dir(snaps.join(id)).unwrap();
        let sidecar = serde_json::json!({
            "format": 1, "vm_id": "vm-1", "template": template, "image_hash": "x",
            "vcpus": 1, "memory_mib": 512, "engine": engine, "create_time_ms": 1,
        });
        std::fs::write(snaps.join(id).join("capsa.json"), sidecar.to_string()).unwrap();
    }
    let listed: Vec<String> = snapshots(&mut c).await.into_iter().map(|s| s.id).collect();
    assert_eq!(listed, ["foreign", "other-template"]);
    refused(
        resume(&mut c, resume_request("foreign", "l-2", None)).await,
        tonic::Code::FailedPrecondition,
        "cloud-hypervisor",
    );
    refused(
        resume(&mut c, resume_request("other-template", "l-3", None)).await,
        tonic::Code::FailedPrecondition,
        "\"gpu\"",
    );
    assert!(list(&mut c).await.is_empty(), "no vm was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_killed_mid_suspend_leaves_no_partial_snapshot_and_keeps_the_complete_ones() {
    let args = ["--warm", "0", "--dns-upstream", "127.0.0.1:9"];
    let mut pool = PoolUnderTest::start(&args).await;
    let mut c = pool.client().await;
    let snaps = snapshots_dir(&pool);

    let vm = acquire(&mut c, "k-1", None).await;
    let (rc, out) = shell(&vsock_of(&pool, &vm.id), "echo kept > /root/marker").await;
    assert_eq!(rc, 0, "{out}");
    let keep = suspend(&mut c, &vm.id, "keep").await.unwrap();

    // A VM with memory worth writing (so the suspend takes a while), suspended, and
    // vm-pool killed while the snapshot is being written.
    let vm = resume(&mut c, resume_request("keep", "k-2", None))
        .await
        .unwrap();
    let (rc, out) = shell(
        &vsock_of(&pool, &vm.id),
        "head -c 96M /dev/urandom > /dev/shm/fill && echo filled",
    )
    .await;
    assert_eq!((rc, out.trim()), (0, "filled"), "{out}");
    let mut suspender = c.clone();
    let vm_id = vm.id.clone();
    let call = tokio::spawn(async move { suspend(&mut suspender, &vm_id, "cut").await });
    // Killed once the engine is writing into the temporary dir.
    let writing = || {
        dir_names(&snaps)
            .iter()
            .any(|n| n.starts_with(".tmp-cut-") && !dir_names(&snaps.join(n)).is_empty())
    };
    eventually!(writing(), 60);
    pool.crash().await;
    assert!(
        call.await.unwrap().is_err(),
        "the suspend cannot have answered: vm-pool was killed while writing it"
    );
    eventually!(!pid_alive(vm.vmm_pid), 30);

    pool.restart(&args).await;
    let mut c = pool.client().await;
    // Answered once start-up (and its clean-up) is done.
    assert_eq!(snapshots(&mut c).await, vec![keep.clone()]);
    assert_eq!(dir_names(&snaps), ["keep"], "no partial snapshot, no `cut`");
    assert!(pool.processes_of(&vm.id).is_empty());
    assert!(!pool.vms_dir().join(&vm.id).exists());
    assert!(list(&mut c).await.is_empty());

    // The complete snapshot survived the crash and still restores.
    let vm = resume(&mut c, resume_request("keep", "k-3", None))
        .await
        .unwrap();
    let (rc, out) = shell(&vsock_of(&pool, &vm.id), "cat /root/marker").await;
    assert_eq!((rc, out.trim()), (0, "kept"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_running_vm_keeps_it_running_and_restores_into_independent_copies() {
    // Room for the parent and two copies.
    let pool = PoolUnderTest::start(&["--warm", "0", "--capacity", "3"]).await;
    let mut c = pool.client().await;
    let parent = acquire(&mut c, "parent", None).await;
    let parent_vsock = vsock_of(&pool, &parent.id);
    let (rc, out) = shell(
        &parent_vsock,
        "echo before > /root/marker; sync; sleep 1000 </dev/null >/dev/null 2>&1 & echo $!",
    )
    .await;
    assert_eq!(rc, 0, "{out}");
    let sleep_pid = out.trim().to_owned();
    let parent_before = guest(&parent_vsock, &sleep_pid).await;

    let snapshot_of = |vm_id: &str, snapshot_id: &str| SnapshotVmRequest {
        vm_id: vm_id.into(),
        snapshot_id: snapshot_id.into(),
    };
    let snap = c
        .snapshot_vm(snapshot_of(&parent.id, "fork-1"))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap.id, "fork-1");
    assert!(snap.size_bytes > 0, "{snap:?}");
    // A retry returns the same snapshot and leaves the VM be.
    let again = c
        .snapshot_vm(snapshot_of(&parent.id, "fork-1"))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again, snap);

    // The parent still holds its lease and runs, with its process, and moves on.
    let vm = c
        .get_vm(GetVmRequest {
            vm_id: parent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(vm.state, VmState::Leased as i32, "{vm:?}");
    assert_eq!(vm.vmm_pid, parent.vmm_pid, "the same VMM process");
    let (rc, out) = shell(
        &parent_vsock,
        "echo after > /root/marker; sync; cat /root/marker",
    )
    .await;
    assert_eq!((rc, out.trim()), (0, "after"));

    // Two copies of the instant: the file as it was, the process running, each with an
    // identity of its own.
    let mut copies = Vec::new();
    for lease in ["copy-1", "copy-2"] {
        let vm = resume(&mut c, resume_request("fork-1", lease, None))
            .await
            .unwrap();
        assert_eq!(vm.state, VmState::Leased as i32, "{vm:?}");
        let vsock = vsock_of(&pool, &vm.id);
        let seen = guest(&vsock, &sleep_pid).await;
        assert_eq!(seen.marker, "before", "{seen:?}");
        assert!(seen.sleep.starts_with("sleep 1000"), "{seen:?}");
        assert_ne!(seen.machine_id, parent_before.machine_id, "{seen:?}");
        copies.push((vm, vsock, seen));
    }
    assert_ne!(copies[0].2.machine_id, copies[1].2.machine_id);
    assert_ne!(copies[0].0.id, copies[1].0.id);
    // They diverge: a write in one is seen neither by the other nor by the parent.
    let (rc, out) = shell(&copies[0].1, "echo copy-1 > /root/marker; sync").await;
    assert_eq!(rc, 0, "{out}");
    let (_, out) = shell(&copies[1].1, "cat /root/marker").await;
    assert_eq!(out.trim(), "before");
    let (_, out) = shell(&parent_vsock, "cat /root/marker").await;
    assert_eq!(out.trim(), "after");

    // A snapshot id already holding another VM's snapshot is refused, naming the field.
    let other = c
        .snapshot_vm(snapshot_of(&copies[1].0.id, "fork-1"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::AlreadyExists, "{other:?}");
    assert!(other.message().contains("snapshot_id"), "{other:?}");
    // A VM that is not leased here is NOT_FOUND.
    let missing = c
        .snapshot_vm(snapshot_of("vm-0000000000000000", "fork-2"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");

    for vm in [&parent, &copies[0].0, &copies[1].0] {
        c.release_vm(ReleaseVmRequest {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap();
    }
    let deleted = c
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: "fork-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    assert!(snapshots(&mut c).await.is_empty());
}
