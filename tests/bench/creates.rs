//! Creates under load (issue 14), against one node of real VMs. Two rounds:
//!
//! - **Burst** (`--creates N`): N clients at once each create a session and run `print(1)`
//!   in it, against a warm pool filled to N first. Reported: the p50 and p99 of create +
//!   first Execute as each client sees it, their ratio, the fewest warm VMs the node
//!   reported while the burst ran (sampled every 100 ms) and how long the refill took to get
//!   the pool back to N.
//! - **Steady arrivals** (`--arrivals M`): the node's boot rate is measured first (W warm
//!   VMs booted from nothing, timed from before the stack starts, so the rate is on the
//!   low side), then M clients arrive one by one at a fraction of that rate
//!   (`--arrival-share`, default 0.5), each creating a session, running `print(1)` and
//!   keeping the session. Reported: both rates, the latencies, and the fewest warm VMs
//!   while they arrived: the refill keeps up when that never reaches 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use capsa_e2e::{Stack, StackOptions, connect_client, create_session_living, exec};
use capsa_proto::session::v1::DeleteSessionRequest;
use capsa_proto::vmpool::v1::GetNodeInfoRequest;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use tokio::task::JoinHandle;

use crate::{ms, percentile};

/// How long the pool gets to boot its warm VMs before a round, and to refill after it.
const FILL_LIMIT: Duration = Duration::from_secs(30 * 60);
const WARM_POLL: Duration = Duration::from_millis(100);
/// The clients' sessions live through the round and the refill after it (the default
/// lifetime, 5 minutes, is shorter than a refill of 50 under TCG).
const SESSION_LIFETIME: Duration = Duration::from_secs(2 * 3600);

type PoolClient = VmPoolServiceClient<tonic::transport::Channel>;

pub struct Figures {
    pub concurrency: u32,
    pub latencies: Vec<Duration>,
    pub warm_min: u32,
    pub refill: Duration,
}

pub struct ArrivalFigures {
    pub arrivals: u32,
    pub warm: u32,
    /// VMs per second the node booted while filling its pool from nothing.
    pub boot_rate: f64,
    /// Clients per second that arrived.
    pub arrival_rate: f64,
    pub latencies: Vec<Duration>,
    pub warm_min: u32,
}

/// Warm VMs of the default template on the node.
async fn warm(pool: &mut PoolClient) -> u32 {
    pool.get_node_info(GetNodeInfoRequest {})
        .await
        .expect("node info")
        .into_inner()
        .pools
        .iter()
        .find(|p| p.template == "default")
        .map_or(0, |p| p.warm)
}

/// Waits until the node holds `n` warm VMs; how long that took from `since`.
async fn wait_warm(pool: &mut PoolClient, n: u32, since: Instant) -> Duration {
    while warm(pool).await < n {
        assert!(
            since.elapsed() < FILL_LIMIT,
            "the pool did not reach {n} warm VMs within {FILL_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    since.elapsed()
}

/// One node with a warm pool of `warm` and room for `room` VMs and sessions of one tenant.
async fn start_stack(warm: u32, room: u32) -> (Stack, PoolClient) {
    let room_flag = room.to_string();
    let flag = |k: &str, v: String| [k.to_string(), v];
    // Overcommitted as in the density test: idle VMs hold far less than their reservation.
    let vm_pool_args = [
        flag("--capacity", room_flag.clone()),
        flag("--capacity-memory-mib", (room * (512 + 320)).to_string()),
        flag("--capacity-vcpus", room_flag.clone()),
    ]
    .concat();
    let session_manager_args = [
        flag("--max-sessions-per-tenant", room_flag.clone()),
        flag("--create-rate-per-sec", "1000".into()),
        flag("--create-burst", room_flag.clone()),
        // One tenant runs them all: its Executes may be that many streams at once.
        flag("--max-streams-per-tenant", room_flag),
    ]
    .concat();
    let stack = Stack::start(StackOptions {
        warm,
        vm_pool_args,
        session_manager_args,
        ..Default::default()
    })
    .await;
    let pool = VmPoolServiceClient::connect(stack.vm_pool.url())
        .await
        .expect("connect to vm-pool");
    (stack, pool)
}

/// Samples the warm count every [`WARM_POLL`] into a running minimum until told to stop.
struct WarmWatch {
    min: Arc<AtomicU32>,
    over: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl WarmWatch {
    fn start(mut pool: PoolClient, start_at: u32) -> WarmWatch {
        let min = Arc::new(AtomicU32::new(start_at));
        let over = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (min, over) = (min.clone(), over.clone());
            async move {
                while !over.load(Ordering::Relaxed) {
                    min.fetch_min(warm(&mut pool).await, Ordering::Relaxed);
                    tokio::time::sleep(WARM_POLL).await;
                }
            }
        });
        WarmWatch { min, over, task }
    }

    /// The fewest warm VMs seen.
    async fn stop(self) -> u32 {
        self.over.store(true, Ordering::Relaxed);
        self.task.await.expect("the warm watcher");
        self.min.load(Ordering::Relaxed)
    }
}

/// A client arriving: creates a session and runs `print(1)` in it; how long both took, and
/// the session (kept until the round ends).
fn arrive(url: String, key: String) -> JoinHandle<(Duration, String)> {
    tokio::spawn(async move {
        let mut client = connect_client(&url, &key).await;
        let started = Instant::now();
        let session = create_session_living(&mut client, SESSION_LIFETIME).await;
        let out = exec::python_stdout(&mut client, &session.id, "print(1)").await;
        let took = started.elapsed();
        assert_eq!(out, "1\n");
        (took, session.id)
    })
}

/// Waits for every client: how long each took, and its session.
async fn join(clients: Vec<JoinHandle<(Duration, String)>>) -> Vec<(Duration, String)> {
    futures::future::join_all(clients)
        .await
        .into_iter()
        .map(|done| done.expect("a client task"))
        .collect()
}

/// Deletes the clients' sessions; their latencies.
async fn delete_sessions(stack: &Stack, outcomes: Vec<(Duration, String)>) -> Vec<Duration> {
    let mut client = stack.client(0).await;
    let mut latencies = Vec::new();
    for (took, id) in outcomes {
        client
            .delete_session(DeleteSessionRequest { session_id: id })
            .await
            .expect("delete session");
        latencies.push(took);
    }
    latencies
}

/// VMs the node has room for in a burst of `n`: the n leased VMs beside a full refill of n
/// warm ones (and a margin), or the refill could never finish while the clients' sessions live.
fn burst_room(n: u32) -> u32 {
    2 * n + 4
}

pub async fn run(n: u32) -> Figures {
    let (stack, mut pool) = start_stack(n, burst_room(n)).await;
    let filled = wait_warm(&mut pool, n, Instant::now()).await;
    eprintln!("{n} warm VMs after {:.0} s", filled.as_secs_f64());

    let watch = WarmWatch::start(pool.clone(), n);
    let (url, key) = (stack.session_managers[0].url(), stack.api_key.clone());
    let burst: Vec<_> = (0..n).map(|_| arrive(url.clone(), key.clone())).collect();
    let outcomes = join(burst).await;
    // Every client is done; the refill runs with their sessions still alive.
    let refilled = wait_warm(&mut pool, n, Instant::now()).await;
    let warm_min = watch.stop().await;
    let latencies = delete_sessions(&stack, outcomes).await;
    stack.stop().await;
    Figures {
        concurrency: n,
        latencies,
        warm_min,
        refill: refilled,
    }
}

/// The steady-arrival round: `arrivals` clients against a pool of `warm`, arriving at
/// `share` of the node's measured boot rate.
pub async fn run_arrivals(arrivals: u32, warm: u32, share: f64) -> ArrivalFigures {
    let since = Instant::now();
    let (stack, mut pool) = start_stack(warm, warm + arrivals + 4).await;
    let filled = wait_warm(&mut pool, warm, since).await;
    let boot_rate = f64::from(warm) / filled.as_secs_f64();
    let arrival_rate = boot_rate * share;
    let gap = Duration::from_secs_f64(1.0 / arrival_rate);
    eprintln!(
        "{warm} warm VMs after {:.0} s ({boot_rate:.3} boots/s); a client every {:.1} s",
        filled.as_secs_f64(),
        gap.as_secs_f64()
    );

    let watch = WarmWatch::start(pool.clone(), warm);
    let (url, key) = (stack.session_managers[0].url(), stack.api_key.clone());
    let first = tokio::time::Instant::now();
    let mut clients = Vec::new();
    for i in 0..arrivals {
        tokio::time::sleep_until(first + gap * i).await;
        clients.push(arrive(url.clone(), key.clone()));
    }
    // Watched until the last client has its session and output.
    let outcomes = join(clients).await;
    let warm_min = watch.stop().await;
    let latencies = delete_sessions(&stack, outcomes).await;
    stack.stop().await;
    ArrivalFigures {
        arrivals,
        warm,
        boot_rate,
        arrival_rate,
        latencies,
        warm_min,
    }
}

/// Prints one two-column table.
fn table(title: &str, rows: &[(&str, String)]) {
    println!();
    println!("| {title:<55} | {:>9} |", "value");
    println!("|{:-<57}|{:->10}:|", "", "");
    for (what, value) in rows {
        println!("| {what:<55} | {value:>9} |");
    }
}

fn p50_p99_ratio(latencies: &[Duration]) -> (Duration, Duration, f64) {
    let (p50, p99) = (percentile(latencies, 50.0), percentile(latencies, 99.0));
    (p50, p99, p99.as_secs_f64() / p50.as_secs_f64().max(1e-9))
}

/// The burst's table and, with `json`, the JSON line.
pub fn report(f: &Figures, json: bool) {
    let (p50, p99, ratio) = p50_p99_ratio(&f.latencies);
    let title = format!(
        "{} concurrent CreateSession + print(1), warm pool of {}",
        f.concurrency, f.concurrency
    );
    let refill = format!("refill back to {} warm (s)", f.concurrency);
    table(
        &title,
        &[
            ("p50 (ms)", format!("{:.0}", ms(p50))),
            ("p99 (ms)", format!("{:.0}", ms(p99))),
            ("p99 / p50", format!("{ratio:.2}")),
            ("fewest warm VMs during the burst", f.warm_min.to_string()),
            (refill.as_str(), format!("{:.1}", f.refill.as_secs_f64())),
        ],
    );
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

/// The steady-arrival table and, with `json`, the JSON line.
pub fn report_arrivals(f: &ArrivalFigures, json: bool) {
    let (p50, p99, ratio) = p50_p99_ratio(&f.latencies);
    let title = format!(
        "{} clients arriving one by one, warm pool of {}",
        f.arrivals, f.warm
    );
    table(
        &title,
        &[
            (
                "node boot rate (VMs/s, filling the pool)",
                format!("{:.3}", f.boot_rate),
            ),
            ("arrival rate (clients/s)", format!("{:.3}", f.arrival_rate)),
            ("create + print(1) p50 (ms)", format!("{:.0}", ms(p50))),
            ("create + print(1) p99 (ms)", format!("{:.0}", ms(p99))),
            ("p99 / p50", format!("{ratio:.2}")),
            ("fewest warm VMs while they arrived", f.warm_min.to_string()),
        ],
    );
    if json {
        let figures = serde_json::json!({
            "arrivals": f.arrivals,
            "arrivals_warm_pool": f.warm,
            "arrivals_boot_rate_per_s": f.boot_rate,
            "arrivals_rate_per_s": f.arrival_rate,
            "arrivals_p50_ms": ms(p50),
            "arrivals_p99_ms": ms(p99),
            "arrivals_p99_p50_ratio": ratio,
            "arrivals_warm_min": f.warm_min,
        });
        println!("{figures}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_leaves_room_for_its_refill() {
        for n in [1, 2, 5, 20, 50] {
            assert!(
                burst_room(n) >= 2 * n,
                "{n} leased + {n} warm in {}",
                burst_room(n)
            );
        }
    }
}
