//! Several nodes behind one Redis and two session-manager replicas, as a cluster runs:
//! 3 nodes (vm-pool + executor each, own node id, state dir and network namespace), one
//! warm VM each (2 cores of software emulation here).
//!
//! One test, in phases that build on each other (each needs booted VMs, the slow part):
//! 1. placement: 3 sessions created one after another land on 3 different nodes (equal
//!    nodes: each create takes the node with the most free memory and vCPUs, which is
//!    one without a session; the weighing itself is unit-tested in session-manager's
//!    `placement`);
//! 2. a node paused 5 s (SIGSTOP to its vm-pool and executor, then SIGCONT; grace 10 s)
//!    loses no session: watched ACTIVE for 20 s from the stop, and it executes after;
//! 3. `kill -9` of a node (its vm-pool's and executor's process groups; its VMMs die with
//!    vm-pool) ends its session VM_FAILED after the grace and within heartbeat TTL +
//!    grace + slack, while the sessions on the other nodes keep executing, and a new
//!    session goes to a live node;
//! 4. rolling restart of the two session-manager replicas while a client executes in a
//!    loop: every Execute either succeeds or fails UNAVAILABLE before any response, and
//!    the guest's own log shows each call ran exactly once (see `RoundRobin`).

use std::time::{Duration, Instant};

use capsa_e2e::exec::{self, python};
use capsa_e2e::{Client, Stack, StackOptions};
use capsa_proto::common::v1::{CompletionStatus, Language};
use capsa_proto::session::v1::{EndReason, GetSessionRequest, Session, SessionStatus};
use capsa_store::NodeRegistry;
use capsa_test_support::eventually;

/// `--node-grace-secs`: longer than the 5 s pause, short enough for the kill phase.
const GRACE: Duration = Duration::from_secs(10);
/// vm-pool's heartbeat TTL (`capsa_vm_pool::node::HEARTBEAT_TTL`).
const HEARTBEAT_TTL: Duration = Duration::from_secs(3);
const PAUSE: Duration = Duration::from_secs(5);

async fn get(client: &mut Client, id: &str) -> Session {
    client
        .get_session(GetSessionRequest {
            session_id: id.to_string(),
        })
        .await
        .expect("get session")
        .into_inner()
        .session
        .expect("a session")
}

/// Runs `print(<n>)`-style code and checks it printed `want`.
async fn executes(client: &mut Client, id: &str, code: &str, want: &str) {
    let out = python(client, id, code).await;
    assert_eq!(out.status(), CompletionStatus::Ok, "{out:?}");
    assert_eq!(out.stdout_text(), want, "{out:?}");
}

fn node_index(stack: &Stack, node_id: &str) -> usize {
    (0..stack.node_count())
        .find(|&i| stack.node_id(i) == node_id)
        .unwrap_or_else(|| panic!("no node {node_id}"))
}

/// A client of every replica, as a deployment's load balancer (a Kubernetes Service, an
/// L4/L7 balancer) gives one: each call goes to the next replica in turn, and a call that
/// fails UNAVAILABLE is retried on the next one, but only when retrying is safe:
/// - reads (GetSession) are safe to retry whenever they fail UNAVAILABLE;
/// - Execute is not idempotent (running code twice is not the same as once), so it is
///   retried only when it failed UNAVAILABLE before any response came (the call itself
///   failed: no connection, or the connection went away before the server answered),
///   never once its stream began. Whether such a call ran anyway is what the test checks
///   in the guest: each attempt appends its number to a list there.
struct RoundRobin {
    clients: Vec<Client>,
    next: usize,
    /// Per replica: Executes that succeeded on it.
    succeeded: Vec<u32>,
    /// Execute attempts that failed UNAVAILABLE before any response (then retried).
    unavailable: u32,
    /// Execute attempts that failed any other way: each one a failure no safe retry hides.
    other_failures: Vec<String>,
}

impl RoundRobin {
    fn pick(&mut self) -> (usize, &mut Client) {
        let i = self.next % self.clients.len();
        self.next += 1;
        (i, &mut self.clients[i])
    }

    /// GetSession, retried on UNAVAILABLE for up to a minute.
    async fn get(&mut self, id: &str) -> Session {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, client) = self.pick();
            let req = GetSessionRequest {
                session_id: id.to_string(),
            };
            match client.get_session(req).await {
                Ok(resp) => return resp.into_inner().session.expect("a session"),
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => panic!("GetSession failed with {s:?}"),
            }
        }
    }

    /// Runs `code` on `id` until one attempt completes, retrying (on the next replica)
    /// only attempts that failed UNAVAILABLE before any response; returns its stdout, or
    /// `None` after a failure no retry may hide (recorded).
    async fn execute(&mut self, id: &str, code: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (replica, client) = self.pick();
            let req = exec::request(id, Language::Python, code, 0);
            let stream = match client.execute(req).await {
                Ok(resp) => resp.into_inner(),
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    self.unavailable += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(s) => {
                    self.other_failures.push(format!("call: {s:?}"));
                    return None;
                }
            };
            let out = capsa_test_support::execute::collect(stream).await;
            if let Some(s) = &out.error {
                self.other_failures
                    .push(format!("stream: {s:?} after {out:?}"));
                return None;
            }
            if out.completion.as_ref().map(|c| c.status()) != Some(CompletionStatus::Ok) {
                self.other_failures.push(format!("completion: {out:?}"));
                return None;
            }
            self.succeeded[replica] += 1;
            return Some(out.stdout_text());
        }
    }
}

#[tokio::test]
async fn three_nodes_two_replicas() {
    let started = Instant::now();
    let mut stack = Stack::start(StackOptions {
        warm: 1,
        replicas: 2,
        nodes: 3,
        session_manager_args: vec![
            "--node-grace-secs".into(),
            GRACE.as_secs().to_string(),
            "--reconcile-interval-ms".into(),
            "500".into(),
        ],
        // Room for 4 default VMs (512 MiB + 320 MiB VMM overhead, 1 vCPU) per node.
        vm_pool_args: vec![
            "--capacity-memory-mib".into(),
            "3328".into(),
            "--capacity-vcpus".into(),
            "4".into(),
        ],
        ..Default::default()
    })
    .await;
    let registry = NodeRegistry::new(capsa_store::connect(&stack.redis.url()).await.unwrap());
    let mut c = stack.client(0).await;

    // 1. Placement. Each create waits until its node announced the lease (within 100 ms
    // of it): placement reads the heartbeats, and creates issued together, before their
    // leases are announced, may share a node (session-manager's `placement` says so).
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let s = capsa_e2e::create_default_session(&mut c).await;
        let on_node = sessions
            .iter()
            .filter(|o: &&Session| o.node_id == s.node_id)
            .count() as u32
            + 1;
        eventually!(
            registry
                .get(&s.node_id)
                .await
                .unwrap()
                .is_some_and(|n| n.leased >= on_node
                    && n.resources.is_some_and(|r| r.memory_mib == 3328
                        && r.vcpus == 4
                        // Its leased VMs (512 MiB + 320 MiB overhead, 1 vCPU each) are used.
                        && r.free_memory_mib <= 3328 - 832 * u64::from(on_node)
                        && r.free_vcpus <= 4 - on_node)),
            30
        );
        sessions.push(s);
    }
    let mut nodes: Vec<&str> = sessions.iter().map(|s| s.node_id.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "3 sessions on 3 equal nodes: {sessions:?}");
    let [s0, s1, s2] = [0, 1, 2].map(|i| sessions[i].id.clone());
    for (i, id) in [&s0, &s1, &s2].into_iter().enumerate() {
        executes(&mut c, id, &format!("x = {i}\nprint(x)"), &format!("{i}\n")).await;
    }
    eprintln!("placement done at {:?}", started.elapsed());

    // 2. Pause s1's node for 5 s: with a 10 s grace it loses nothing. Watched for twice
    // the grace from the stop: a node judged by one missed beat (TTL 3 s) would have its
    // session ended well within that.
    let paused = node_index(&stack, &sessions[1].node_id);
    let stopped_at = Instant::now();
    stack.pause_node(paused);
    let mut during_pause = 0;
    while stopped_at.elapsed() < PAUSE {
        // The other nodes serve meanwhile.
        executes(&mut c, &s0, "print(x)", "0\n").await;
        during_pause += 1;
        assert_eq!(get(&mut c, &s1).await.status(), SessionStatus::Active);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.resume_node(paused);
    executes(&mut c, &s1, "print(x)", "1\n").await;
    let watch = 2 * GRACE;
    while stopped_at.elapsed() < watch {
        let s = get(&mut c, &s1).await;
        assert_eq!(
            s.status(),
            SessionStatus::Active,
            "{:?} after the pause: {s:?}",
            stopped_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    executes(&mut c, &s1, "print(x)", "1\n").await;
    eprintln!(
        "pause: {during_pause} executes on another node during the {PAUSE:?} pause; s1 ACTIVE \
         for {watch:?} from the stop; done at {:?}",
        started.elapsed()
    );

    // 3. Kill s2's node. Its session ends VM_FAILED once the grace has passed, while the
    // sessions on the other nodes keep executing.
    let killed = node_index(&stack, &sessions[2].node_id);
    let vmm = stack.vmm_pid(killed, &sessions[2].vm_id).await;
    let killed_at = Instant::now();
    stack.kill_node(killed).await;
    // The VMM dies with its vm-pool (PDEATHSIG): a dead node is dead through and through.
    eventually!(!std::path::Path::new(&format!("/proc/{vmm}")).exists(), 30);
    let bound = HEARTBEAT_TTL + GRACE + Duration::from_secs(20);
    let mut while_dying = 0;
    let failed = loop {
        let s = get(&mut c, &s2).await;
        if s.status() != SessionStatus::Active {
            break s;
        }
        assert!(
            killed_at.elapsed() < bound,
            "s2 still ACTIVE {:?} after its node was killed",
            killed_at.elapsed()
        );
        executes(&mut c, &s0, "print(x)", "0\n").await;
        executes(&mut c, &s1, "print(x)", "1\n").await;
        while_dying += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let took = killed_at.elapsed();
    assert_eq!(failed.end_reason(), EndReason::VmFailed, "{failed:?}");
    assert!(
        failed.end_message.contains(&sessions[2].node_id),
        "{failed:?}"
    );
    // Not before the grace: the node's record lapses (TTL) and only then is it timed.
    assert!(
        took >= GRACE,
        "ended after {took:?}, within the {GRACE:?} grace"
    );
    let err = exec::try_run(&mut c, exec::request(&s2, Language::Python, "1", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let s3 = capsa_e2e::create_default_session(&mut c).await;
    assert_ne!(s3.node_id, sessions[2].node_id, "placed on the dead node");
    executes(&mut c, &s3.id, "print(3)", "3\n").await;
    eprintln!(
        "kill: s2 VM_FAILED {took:?} after the kill (TTL {HEARTBEAT_TTL:?} + grace {GRACE:?}); \
         {while_dying} rounds of executes on the 2 other nodes meanwhile; done at {:?}",
        started.elapsed()
    );

    // 4. Rolling restart under a client loop. Each iteration k runs `ran.append(k)` with a
    // short sleep (so some calls are in flight when a replica gets SIGTERM); at the end the
    // guest's `ran` must be exactly 0..n: every call ran once, none that failed UNAVAILABLE
    // ran (its retry would have appended k twice), none was cut short.
    executes(&mut c, &s0, "import time\nran = []\nprint(len(ran))", "0\n").await;
    let clients = vec![stack.client(0).await, stack.client(1).await];
    let mut rr = RoundRobin {
        clients,
        next: 0,
        succeeded: vec![0, 0],
        unavailable: 0,
        other_failures: Vec::new(),
    };
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let s0_loop = s0.clone();
    let s1_loop = s1.clone();
    let client_loop = tokio::spawn(async move {
        let mut k = 0u32;
        // Until the restarts are over, then a few more through both new replicas.
        let mut after_done = 0;
        while after_done < 6 {
            if *done_rx.borrow_and_update() {
                after_done += 1;
            }
            let code = format!("ran.append({k})\ntime.sleep(0.2)\nprint({k})");
            let Some(out) = rr.execute(&s0_loop, &code).await else {
                break;
            };
            assert_eq!(out, format!("{k}\n"));
            assert_eq!(rr.get(&s1_loop).await.status(), SessionStatus::Active);
            k += 1;
        }
        (k, rr)
    });
    let restart_started = Instant::now();
    let mut restarted_at = Vec::new();
    for i in 0..2 {
        // Let the loop run against both replicas first.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stack.restart_session_manager(i).await;
        // Healthy: it answers a real call (auth and store reads) before the next goes down.
        let mut fresh = None;
        eventually!(
            {
                if fresh.is_none() {
                    fresh = tokio::time::timeout(Duration::from_secs(5), stack.client(i))
                        .await
                        .ok();
                }
                match fresh.as_mut() {
                    Some(client) => client
                        .get_session(GetSessionRequest {
                            session_id: s0.clone(),
                        })
                        .await
                        .is_ok(),
                    None => false,
                }
            },
            60
        );
        restarted_at.push(restart_started.elapsed());
    }
    done_tx.send(true).unwrap();
    let (iterations, rr) = tokio::time::timeout(Duration::from_secs(180), client_loop)
        .await
        .expect("the client loop ends")
        .expect("the client loop");
    assert!(
        rr.other_failures.is_empty(),
        "failures a safe retry cannot hide: {:?}",
        rr.other_failures
    );
    let ran = python(&mut c, &s0, "print(ran)").await.stdout_text();
    let want: Vec<String> = (0..iterations).map(|k| k.to_string()).collect();
    assert_eq!(ran.trim(), format!("[{}]", want.join(", ")));
    assert!(
        rr.succeeded.iter().all(|&n| n >= 2),
        "both replicas served: {:?}",
        rr.succeeded
    );
    eprintln!(
        "rolling restart: {iterations} executes, per replica {:?}, {} UNAVAILABLE before any \
         response (retried), replicas back at {restarted_at:?}; test took {:?}",
        rr.succeeded,
        rr.unavailable,
        started.elapsed()
    );
}
