//! Noisy neighbours: five hostile sessions on one node (a fork bomb, a memory filler, a disk
//! filler, a stdout flood and 5000 vsock connections to the host) next to a quiet one.
//! Nothing on the node fails: every quiet Execute succeeds within a generous bound, the
//! quiet session stays ACTIVE, and the node still creates and runs new sessions afterwards.
//!
//! The quiet session's `Execute('pass')` median is printed with its ratio to the quiet
//! baseline (the target is 1.25x), split into the agent's own time in the guest and the rest.
//! The test runs alone (see `.config/nextest.toml`), each median is taken over ten seconds on
//! a node with no boot under way, and the hostile clients run on a runtime of their own. The
//! ratio is not asserted, because on this 2-core TCG machine the measurement's own noise is
//! of the target's size:
//! - with no hostile workload at all the second median came out 1.33x the first;
//! - one host process spinning on one of the two cores doubled the baseline (14 to 31 ms),
//!   almost all of it on the host's path (services, the agent channel's bridge, the VMM), where an
//!   Execute wakes a chain of threads that each queue behind the busy core;
//! - with the five workloads: 1.22x to 1.62x (guest-side time within 20 %), each workload
//!   alone 1.05x (stdout flood) to 1.29x (fork bomb).
//!
//! A longer slice for demoted VMs' threads (EEVDF `sched_runtime`, so wakers preempt them)
//! and an eight-times lower batch weight were tried and did not move the figures.
//! Before vm-pool demoted CPU-bound sessions (`capsa_vmm::cpu_balance`) it was 2.1x to 4.0x;
//! beside the rest of the suite, 7.5x.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use capsa_e2e::{Client, Stack, StackOptions, exec};
use capsa_proto::common::v1::Language;
use capsa_proto::session::v1 as pb;
use capsa_proto::vmpool::v1::GetNodeInfoRequest;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use capsa_test_support::eventually;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// Executes per median: enough that one slow outlier does not move it.
const SAMPLES: usize = 41;
const SAMPLE_GAP: Duration = Duration::from_millis(250);
/// How long each noisy workload runs (its Execute timeout); the noisy measurement fits in it.
const NOISE_SECS: u64 = 240;

/// An OTLP receiver that accepts and drops everything: the guests' telemetry relay needs a
/// collector at the other end for the vsock flood to reach it.
struct Sink;

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        _request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn median_pass(c: &mut Client, sid: &str) -> Medians {
    let mut took = Vec::with_capacity(SAMPLES);
    let mut guest = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        // Spread over seconds: the hostile workloads come in bursts (a flood's Execute ends
        // at the output limit, the memory filler at the OOM killer), and a median over one
        // instant would measure whichever burst it fell in.
        tokio::time::sleep(SAMPLE_GAP).await;
        let t = Instant::now();
        let out = exec::python(c, sid, "pass").await;
        assert_eq!(
            out.status(),
            capsa_proto::common::v1::CompletionStatus::Ok,
            "{out:?}"
        );
        took.push(t.elapsed());
        let in_guest = out.completion().wall_time.as_ref().expect("wall_time");
        guest.push(capsa_proto::time::from_duration(in_guest).unwrap());
    }
    took.sort();
    guest.sort();
    Medians {
        end_to_end: took[SAMPLES / 2],
        in_guest: guest[SAMPLES / 2],
    }
}

/// Execute('pass') medians: as the client sees it, and the agent's own wall time in the guest
/// (what is left is the host's path: services, vsock, the VMM's device emulation).
#[derive(Debug, Clone, Copy)]
struct Medians {
    end_to_end: Duration,
    in_guest: Duration,
}

/// Waits until every pool of the node is full with no boot under way.
async fn settle(stack: &Stack) {
    let mut pool = VmPoolServiceClient::connect(stack.vm_pool.url())
        .await
        .unwrap();
    eventually!(
        {
            let info = pool
                .get_node_info(GetNodeInfoRequest::default())
                .await
                .unwrap()
                .into_inner();
            info.pools
                .iter()
                .all(|p| p.booting == 0 && p.warm >= p.target)
        },
        300
    );
}

/// The hostile workloads, each one long Execute (shell) in its own session.
fn workloads() -> Vec<(&'static str, Language, String)> {
    vec![
        ("fork bomb", Language::Shell, "bomb() { bomb | bomb & }; bomb; sleep 600".into()),
        (
            "memory filler",
            Language::Shell,
            // Each round grows until the guest's OOM killer or MemoryError stops it.
            "while true; do python3 -c 'a = []\nwhile True: a.append(bytearray(8 << 20))'; done"
                .into(),
        ),
        (
            "disk filler",
            Language::Shell,
            "i=0; while true; do i=$((i+1)); dd if=/dev/zero of=/root/fill.$i bs=1M count=1024 \
             status=none || echo full; sync; done"
                .into(),
        ),
        (
            "stdout flood",
            Language::Python,
            "line = 'x' * 4095\nwhile True: print(line)".into(),
        ),
        (
            "vsock flood",
            Language::Python,
            // Connections to the host's telemetry port (CID 2), held open; refused ones are
            // counted and retried so the pressure stays on.
            "import socket, time\nheld, refused = [], 0\nwhile len(held) < 5000 and refused < 100000:\n    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n    try:\n        s.connect((2, 4317)); held.append(s)\n    except OSError:\n        refused += 1; s.close()\nprint('held', len(held), 'refused', refused, flush=True)\ntime.sleep(600)"
                .into(),
        ),
    ]
}

#[tokio::test]
async fn hostile_sessions_do_not_slow_a_quiet_one_or_break_the_node() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let _collector = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Sink))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let stack = Stack::start(StackOptions {
        warm: 2,
        env: vec![("OTEL_EXPORTER_OTLP_ENDPOINT".into(), otlp)],
        ..Default::default()
    })
    .await;
    let mut quiet_client = stack.client(0).await;
    let quiet = capsa_e2e::create_default_session(&mut quiet_client)
        .await
        .id;
    exec::python(&mut quiet_client, &quiet, "pass").await; // warm the interpreter's caches
    // The baseline is taken on a quiet node: the pool's refill after the lease is done.
    settle(&stack).await;
    let baseline = median_pass(&mut quiet_client, &quiet).await;

    // Every hostile session first, then all workloads at once, each with its own client on a
    // runtime of its own: other tenants are other processes, and their floods must not queue
    // in the quiet client's event loop.
    let mut noisy = Vec::new();
    for (name, language, code) in workloads() {
        let sid = capsa_e2e::create_default_session(&mut quiet_client)
            .await
            .id;
        noisy.push((name, sid, language, code));
    }
    let noise_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (name, sid, language, code) in noisy {
        let stop = stop.clone();
        let url = stack.session_managers[0].url();
        let key = stack.api_key.clone();
        tasks.push(noise_runtime.spawn(async move {
            let mut c = capsa_e2e::connect_client(&url, &key).await;
            // Repeat the workload while the measurement runs (a flood's Execute ends when it
            // reaches the output limit; the others end at their timeout).
            while !stop.load(Ordering::Relaxed) {
                let req = exec::request(&sid, language, &code, NOISE_SECS * 1000);
                match exec::try_run(&mut c, req).await {
                    Ok(_) => {}
                    // The hostile session may wreck its own VM; that is its business.
                    Err(status) => {
                        eprintln!("{name}: {status:?}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }));
    }
    // Let the workloads reach full pressure (they ramp in seconds) and the pool refill the
    // five leases: the neighbours, not the node's own boots, are what is measured.
    tokio::time::sleep(Duration::from_secs(20)).await;
    settle(&stack).await;
    let noisy = median_pass(&mut quiet_client, &quiet).await;
    stop.store(true, Ordering::Relaxed);
    let ratio = noisy.end_to_end.as_secs_f64() / baseline.end_to_end.as_secs_f64();
    eprintln!(
        "Execute('pass') median: quiet {:?} (in the guest {:?}), with 5 hostile neighbours \
         {:?} (in the guest {:?}): {ratio:.2}x; target 1.25x",
        baseline.end_to_end, baseline.in_guest, noisy.end_to_end, noisy.in_guest
    );
    // Generous: the node still answers a quiet session promptly.
    assert!(
        noisy.end_to_end < Duration::from_secs(2),
        "the quiet session's Execute('pass') median is {noisy:?} beside the hostile ones"
    );

    // End the hostile sessions (their Executes then end too).
    let mut admin = stack.client(0).await;
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        if let Err(e) = t.await
            && !e.is_cancelled()
        {
            panic!("a workload task failed: {e}");
        }
    }
    noise_runtime.shutdown_background();
    let sessions = admin
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sessions;
    for s in sessions.iter().filter(|s| s.id != quiet) {
        let _ = admin
            .delete_session(pb::DeleteSessionRequest {
                session_id: s.id.clone(),
            })
            .await;
    }

    // Nothing on the node failed: the quiet session is ACTIVE and works, and a new session
    // is created and runs code.
    let q = admin
        .get_session(pb::GetSessionRequest {
            session_id: quiet.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(q.status, pb::SessionStatus::Active as i32, "{q:?}");
    let out = exec::python(&mut quiet_client, &quiet, "print(6 * 7)").await;
    assert_eq!(out.stdout_text(), "42\n");
    let fresh = capsa_e2e::create_default_session(&mut admin).await.id;
    let out = exec::python(&mut admin, &fresh, "print('fine')").await;
    assert_eq!(out.stdout_text(), "fine\n");
}
