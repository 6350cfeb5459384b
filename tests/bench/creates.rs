//! Creates under load (issue 14): N clients at once each create a session and run
//! `print(1)` in it, against one node whose warm pool was filled to N first. Reported: the
//! p50 and p99 of create + first Execute as each client sees it, their ratio, and the
//! fewest warm VMs the node reported while the burst ran (sampled every 100 ms) and how
//! long the refill took to get the pool back to N.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use capsa_e2e::{Stack, StackOptions, connect_client, exec};
use capsa_proto::session::v1::{CreateSessionRequest, DeleteSessionRequest};
use capsa_proto::vmpool::v1::GetNodeInfoRequest;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;

use crate::{ms, percentile};

/// How long the pool gets to boot N warm VMs before the burst, and to refill after it.
const FILL_LIMIT: Duration = Duration::from_secs(30 * 60);
const WARM_POLL: Duration = Duration::from_millis(100);

pub struct Figures {
    pub concurrency: u32,
    pub latencies: Vec<Duration>,
    pub warm_min: u32,
    pub refill: Duration,
}

/// Warm VMs of the default template on the node.
async fn warm(pool: &mut VmPoolServiceClient<tonic::transport::Channel>) -> u32 {
    pool.get_node_info(GetNodeInfoRequest {})
        .await
        .expect("node info")
        .into_inner()
        .pools
        .iter()
        .find(|p| p.template == "default")
        .map_or(0, |p| p.warm)
}

async fn wait_warm(pool: &mut VmPoolServiceClient<tonic::transport::Channel>, n: u32) -> Duration {
    let started = Instant::now();
    while warm(pool).await < n {
        assert!(
            started.elapsed() < FILL_LIMIT,
            "the pool did not reach {n} warm VMs within {FILL_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    started.elapsed()
}

pub async fn run(n: u32) -> Figures {
    let room = (n + 4).to_string();
    let flag = |k: &str, v: String| [k.to_string(), v];
    // Overcommitted as in the density test: idle VMs hold far less than their reservation.
    let vm_pool_args = [
        flag("--capacity", room.clone()),
        flag("--capacity-memory-mib", ((n + 4) * (512 + 320)).to_string()),
        flag("--capacity-vcpus", room.clone()),
    ]
    .concat();
    let session_manager_args = [
        flag("--max-sessions-per-tenant", room.clone()),
        flag("--create-rate-per-sec", "1000".into()),
        flag("--create-burst", room.clone()),
        // One tenant runs all N: its Executes are N streams at once.
        flag("--max-streams-per-tenant", room),
    ]
    .concat();
    let stack = Stack::start(StackOptions {
        warm: n,
        vm_pool_args,
        session_manager_args,
        ..Default::default()
    })
    .await;
    let mut pool = VmPoolServiceClient::connect(stack.vm_pool.url())
        .await
        .expect("connect to vm-pool");
    let filled = wait_warm(&mut pool, n).await;
    eprintln!("{n} warm VMs after {:.0} s", filled.as_secs_f64());

    let warm_min = Arc::new(AtomicU32::new(n));
    let burst_over = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let (warm_min, burst_over, mut pool) = (warm_min.clone(), burst_over.clone(), pool.clone());
        async move {
            while !burst_over.load(Ordering::Relaxed) {
                warm_min.fetch_min(warm(&mut pool).await, Ordering::Relaxed);
                tokio::time::sleep(WARM_POLL).await;
            }
        }
    });
    let (url, key) = (stack.session_managers[0].url(), stack.api_key.clone());
    let burst = (0..n).map(|_| {
        let (url, key) = (url.clone(), key.clone());
        tokio::spawn(async move {
            let mut client = connect_client(&url, &key).await;
            let started = Instant::now();
            let session = client
                .create_session(CreateSessionRequest::default())
                .await
                .expect("create session")
                .into_inner()
                .session
                .expect("a session");
            let out = exec::python_stdout(&mut client, &session.id, "print(1)").await;
            let took = started.elapsed();
            assert_eq!(out, "1\n");
            (took, session.id)
        })
    });
    let mut latencies = Vec::new();
    let mut sessions = Vec::new();
    for done in futures::future::join_all(burst).await {
        let (took, id) = done.expect("a client task");
        latencies.push(took);
        sessions.push(id);
    }
    let refilled = wait_warm(&mut pool, n).await;
    burst_over.store(true, Ordering::Relaxed);
    watcher.await.expect("the warm watcher");
    let mut client = stack.client(0).await;
    for id in sessions {
        client
            .delete_session(DeleteSessionRequest { session_id: id })
            .await
            .expect("delete session");
    }
    stack.stop().await;
    Figures {
        concurrency: n,
        latencies,
        warm_min: warm_min.load(Ordering::Relaxed),
        refill: refilled,
    }
}

/// The table and, with `json`, the JSON line.
pub fn report(f: &Figures, json: bool) {
    let (p50, p99) = (
        percentile(&f.latencies, 50.0),
        percentile(&f.latencies, 99.0),
    );
    let ratio = p99.as_secs_f64() / p50.as_secs_f64().max(1e-9);
    let title = format!(
        "{} concurrent CreateSession + print(1), warm pool of {}",
        f.concurrency, f.concurrency
    );
    let refill = format!("refill back to {} warm (s)", f.concurrency);
    println!();
    println!("| {title:<55} | {:>9} |", "value");
    println!("|{:-<57}|{:->10}:|", "", "");
    for (what, value) in [
        ("p50 (ms)", format!("{:.0}", ms(p50))),
        ("p99 (ms)", format!("{:.0}", ms(p99))),
        ("p99 / p50", format!("{ratio:.2}")),
        ("fewest warm VMs during the burst", f.warm_min.to_string()),
        (refill.as_str(), format!("{:.1}", f.refill.as_secs_f64())),
    ] {
        println!("| {what:<55} | {value:>9} |");
    }
    if json {
        let figures = serde_json::json!({
            "creates_concurrency": f.concurrency,
            "create_exec_p50_ms": ms(p50),
            "create_exec_p99_ms": ms(p99),
            "create_exec_p99_p50_ratio": ratio,
            "creates_warm_min": f.warm_min,
            "creates_refill_s": f.refill.as_secs_f64(),
        });
        println!("{figures}");
    }
}
