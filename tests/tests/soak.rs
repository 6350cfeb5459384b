//! The chaos soak: create / execute / end cycles on the whole stack while VMMs are
//! SIGKILLed and the executor, vm-pool and Redis crash and come back. Bounded: it runs
//! `CAPSA_SOAK_CYCLES` cycles (default 30; `deploy/scripts/soak.sh` runs 300) and stops.
//!
//! Each cycle creates a session that will either be deleted or left to expire, sets
//! `x = <n>` and reads it back, then applies one chaos action (a seeded shuffle of a bag
//! holding each action, so every 6 cycles see every kind; `CAPSA_SOAK_SEED` replays a run):
//! - none;
//! - kill -9 of the session's VMM: the session ends VM_FAILED, calls fail, never answer;
//! - executor crash + restart on the same address: the session stays ACTIVE, `x` is kept;
//! - vm-pool crash + restart on the same state dir (with `--orphan-vms-on-crash`, so its
//!   VMMs outlive it): the new one reaps them, so every ACTIVE session on the node ends
//!   VM_FAILED;
//! - Redis crash, 0 to 5 s down, restart (append-only file, fsync always): nothing
//!   acknowledged is lost, the session stays ACTIVE with its deadline, `x` is kept.
//!
//! Calls are retried on UNAVAILABLE (and RESOURCE_EXHAUSTED for creates) for a restart
//! window; any other error, a hang, or a wrong answer is a failure. Failures are collected,
//! not fatal at once, so one run reports them all. At the end every session must be
//! TERMINATED with the expected end reason, and nothing may be left: no VMM process, VM
//! dir, vsock socket or overlay beyond the warm VMs vm-pool lists (none at all once the
//! stack is stopped), no tap, and in Redis only the retained
//! record and usage of each ended session (both expiring), no stale member in the expiry
//! zset, the tenant's active set, the node's session set or the open-usage set.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsa_e2e::exec::{self, Outcome};
use capsa_e2e::{Client, Stack, StackOptions};
use capsa_proto::common::v1::Language;
use capsa_proto::session::v1::{
    CreateSessionRequest, DeleteSessionRequest, EndReason, GetSessionRequest, ListSessionsRequest,
    Session, SessionStatus,
};
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use capsa_proto::vmpool::v1::{GetVmRequest, ListVmsRequest, Vm, VmState};
use tonic::Code;

const TENANT: &str = "e2e-tenant";
const NODE: &str = "e2e-node";
/// How long a call may keep failing UNAVAILABLE across a restart (TCG, two shared cores).
const RETRY_WINDOW: Duration = Duration::from_secs(90);
/// Longest any one call may take before it counts as a hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Lifetimes: long enough for a cycle when deleted, short when left to expire.
const DELETED_LIFETIME: Duration = Duration::from_secs(180);
const EXPIRING_LIFETIME: Duration = Duration::from_secs(20);
/// A session whose deadline falls this close to the moment its VM is lost may end EXPIRED
/// instead of VM_FAILED: detection (VMM exit, reconciler pass) takes a few seconds.
const RACE_MARGIN: Duration = Duration::from_secs(6);
/// How long ended sessions may take to reach TERMINATED: a teardown that met a restarting
/// vm-pool is re-claimed after the claim TTL (30 s).
const SETTLE_WINDOW: Duration = Duration::from_secs(180);
/// A run with this many failures stops cycling and goes to the final checks.
const MAX_FAILURES: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Chaos {
    None,
    KillVmm,
    RestartExecutor,
    RestartVmPool,
    RestartRedis,
}

impl Chaos {
    /// One bag: every action once, VMM kills twice (the commonest failure in production).
    const BAG: [Chaos; 6] = [
        Chaos::None,
        Chaos::KillVmm,
        Chaos::KillVmm,
        Chaos::RestartExecutor,
        Chaos::RestartVmPool,
        Chaos::RestartRedis,
    ];

    fn name(self) -> &'static str {
        match self {
            Chaos::None => "none",
            Chaos::KillVmm => "kill -9 vmm",
            Chaos::RestartExecutor => "executor restart",
            Chaos::RestartVmPool => "vm-pool restart",
            Chaos::RestartRedis => "redis restart",
        }
    }
}

/// SplitMix64: tiny, seedable, good enough to pick actions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Delete,
    Expire,
}

/// A session the soak created, and the end reasons it may rightly end with.
struct Tracked {
    id: String,
    cycle: u32,
    vm_id: String,
    ending: Ending,
    expire_time: SystemTime,
    expected: Vec<EndReason>,
    /// Why `expected` is what it is, for the failure message.
    because: String,
    /// Seen leave ACTIVE already: its end reason is fixed, no later chaos can change it.
    ended: bool,
}

#[derive(Default)]
struct Leaks {
    vmm_processes: Vec<String>,
    vm_dirs: Vec<String>,
    vsock_sockets: usize,
    overlays: usize,
    taps: Vec<String>,
    redis_keys: Vec<String>,
    vms_not_warm: Vec<String>,
}

impl Leaks {
    fn total(&self) -> usize {
        self.vmm_processes.len()
            + self.vm_dirs.len()
            + self.vsock_sockets
            + self.overlays
            + self.taps.len()
            + self.redis_keys.len()
            + self.vms_not_warm.len()
    }

    fn row(&self) -> String {
        format!(
            "vmm_processes={} vm_dirs={} vsock_sockets={} overlays={} taps={} redis_keys={} vms_not_warm={}",
            self.vmm_processes.len(),
            self.vm_dirs.len(),
            self.vsock_sockets,
            self.overlays,
            self.taps.len(),
            self.redis_keys.len(),
            self.vms_not_warm.len()
        )
    }

    fn details(&self) -> Vec<String> {
        let mut out = Vec::new();
        let lists = [
            ("vmm process", &self.vmm_processes),
            ("vm dir", &self.vm_dirs),
            ("tap", &self.taps),
            ("redis key", &self.redis_keys),
            ("vm not warm", &self.vms_not_warm),
        ];
        for (what, items) in lists {
            out.extend(items.iter().map(|i| format!("leaked {what}: {i}")));
        }
        out
    }
}

struct Soak {
    stack: Stack,
    client: Client,
    rng: Rng,
    sessions: Vec<Tracked>,
    failures: Vec<String>,
    chaos_counts: BTreeMap<Chaos, u32>,
    /// How the sessions ended, as listed at the end.
    end_reasons: BTreeMap<String, u32>,
}

/// Kills (SIGKILL) every VMM and helper still pointing into the state dir when the test
/// ends, also by a panic: with `--orphan-vms-on-crash` they do not die with vm-pool.
struct Backstop(PathBuf);

impl Drop for Backstop {
    fn drop(&mut self) {
        for (pid, _, _) in vmm_processes(&self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

#[tokio::test]
async fn chaos_soak_leaves_nothing_behind() {
    let cycles: u32 = std::env::var("CAPSA_SOAK_CYCLES")
        .ok()
        .map(|v| v.parse().expect("CAPSA_SOAK_CYCLES: a number"))
        .unwrap_or(30);
    let seed: u64 = std::env::var("CAPSA_SOAK_SEED")
        .ok()
        .map(|v| v.parse().expect("CAPSA_SOAK_SEED: a number"))
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("soak: seed {seed} cycles {cycles} (replay with CAPSA_SOAK_SEED={seed})");
    let started = Instant::now();
    let taps_before = links();

    // One warm VM: VMs are what a cycle costs (TCG boots take tens of seconds), and a
    // vm-pool restart throws the warm ones away.
    let stack = Stack::start(StackOptions {
        warm: 1,
        durable_redis: true,
        vm_pool_args: vec!["--orphan-vms-on-crash".into()],
        ..Default::default()
    })
    .await;
    let state_dir = stack.vm_state_dir();
    let _backstop = Backstop(state_dir.clone());
    let client = stack.client(0).await;
    let mut soak = Soak {
        stack,
        client,
        rng: Rng(seed),
        sessions: Vec::new(),
        failures: Vec::new(),
        chaos_counts: BTreeMap::new(),
        end_reasons: BTreeMap::new(),
    };

    let mut bag = Vec::new();
    let mut done = 0;
    for n in 1..=cycles {
        if bag.is_empty() {
            bag = Chaos::BAG.to_vec();
            soak.rng.shuffle(&mut bag);
        }
        let chaos = bag.pop().expect("refilled above");
        *soak.chaos_counts.entry(chaos).or_default() += 1;
        let t = Instant::now();
        if let Err(e) = soak.cycle(n, chaos).await {
            soak.failures
                .push(format!("cycle {n} ({}): {e}", chaos.name()));
        }
        eprintln!(
            "soak: cycle {n}/{cycles} {} took {:.1}s",
            chaos.name(),
            t.elapsed().as_secs_f64()
        );
        done = n;
        if soak.failures.len() >= MAX_FAILURES {
            eprintln!("soak: {MAX_FAILURES} failures, stopping early");
            break;
        }
    }

    soak.settle().await;
    // The reconciler releases what ended sessions left on the node on its next passes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut running = loop {
        let leaks = soak.leaks_while_running(&taps_before).await;
        if leaks.total() == 0 || Instant::now() > deadline {
            break leaks;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    // Redis' view is checked last among the running checks: teardowns finish before it.
    running.redis_keys = soak.redis_leaks().await;
    let Soak {
        stack,
        mut failures,
        chaos_counts,
        end_reasons,
        ..
    } = soak;
    let stopped_stack = stack.stop().await;
    failures.extend(
        stopped_stack
            .exits
            .iter()
            .filter(|(_, status)| !status.success())
            .map(|(name, status)| format!("{name} exited with {status} after SIGTERM")),
    );
    let mut stopped = leaks_after_stop(&state_dir, &taps_before);
    stopped
        .taps
        .extend(network_leaks(stopped_stack.vm_netns(), None, &taps_before));
    drop(stopped_stack); // removes the state dir, now that it has been looked at

    let mut summary = vec![
        ("seed".to_string(), seed.to_string()),
        ("cycles".into(), format!("{done}/{cycles}")),
        (
            "duration".into(),
            format!("{:.0}s", started.elapsed().as_secs_f64()),
        ),
    ];
    for (chaos, count) in &chaos_counts {
        summary.push((format!("chaos: {}", chaos.name()), count.to_string()));
    }
    let end_reasons = end_reasons
        .iter()
        .map(|(reason, n)| format!("{reason}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    summary.push(("end reasons".into(), end_reasons));
    summary.push(("failures".into(), failures.len().to_string()));
    summary.push(("leaks while running".into(), running.row()));
    summary.push(("leaks after stop".into(), stopped.row()));
    eprintln!("soak: ---- summary ----");
    for (label, value) in &summary {
        eprintln!("soak: {label:<24}{value}");
    }
    for line in failures
        .iter()
        .chain(running.details().iter())
        .chain(stopped.details().iter())
    {
        eprintln!("soak: {line}");
    }
    assert!(
        failures.is_empty() && running.total() == 0 && stopped.total() == 0,
        "soak failed (seed {seed}): {} failures, {} leaks while running, {} after stop; see the lines above",
        failures.len(),
        running.total(),
        stopped.total()
    );
}

impl Soak {
    async fn cycle(&mut self, n: u32, chaos: Chaos) -> Result<(), String> {
        let ending = if self.rng.below(3) == 0 {
            Ending::Expire
        } else {
            Ending::Delete
        };
        let lifetime = match ending {
            Ending::Delete => DELETED_LIFETIME,
            Ending::Expire => EXPIRING_LIFETIME,
        };
        let session = self.create(lifetime).await?;
        let id = session.id.clone();
        let expected = match ending {
            Ending::Delete => EndReason::Deleted,
            Ending::Expire => EndReason::Expired,
        };
        self.sessions.push(Tracked {
            id: id.clone(),
            cycle: n,
            vm_id: session.vm_id.clone(),
            ending,
            expire_time: to_system_time(session.expire_time.as_ref()),
            expected: vec![expected],
            because: format!("{ending:?} and no chaos reached it"),
            ended: false,
        });
        let value = self.rng.below(1_000_000_000);
        let Some(set) = self.run_alive(&id, &format!("x = {value}")).await? else {
            return Ok(()); // expired meanwhile (checked in run_alive)
        };
        if !set.errors.is_empty() {
            return Err(format!("x = {value} raised {:?}", set.errors));
        }
        self.check_x(&id, value).await?;

        match chaos {
            Chaos::None => {}
            Chaos::KillVmm => self.kill_vmm(&id).await?,
            Chaos::RestartExecutor => {
                self.stack.restart_executor().await;
                self.check_x(&id, value).await?;
            }
            Chaos::RestartVmPool => self.restart_vm_pool(&id).await?,
            Chaos::RestartRedis => {
                // Up to 5 s down: past the node heartbeat's 3 s TTL, as a real restart is.
                let down = Duration::from_millis(self.rng.below(5000));
                self.stack.restart_redis(down);
                let after = self.get(&id).await?;
                let deadline = to_system_time(after.expire_time.as_ref());
                let tracked = self.tracked(&id);
                if after.status() == SessionStatus::Active && deadline != tracked.expire_time {
                    return Err(format!(
                        "session {id}: deadline changed across the redis restart: {:?} -> {deadline:?}",
                        tracked.expire_time
                    ));
                }
                self.check_x(&id, value).await?;
            }
        }

        if ending == Ending::Delete {
            let deleted = self
                .retrying("DeleteSession", false, |mut c| {
                    let id = id.clone();
                    async move {
                        c.delete_session(DeleteSessionRequest { session_id: id })
                            .await
                            .map(|r| r.into_inner().session)
                    }
                })
                .await?
                .ok_or("DeleteSession returned no session")?;
            let tracked = self.tracked(&id);
            let ended = matches!(
                deleted.status(),
                SessionStatus::Terminating | SessionStatus::Terminated
            );
            if !ended || !tracked.expected.contains(&deleted.end_reason()) {
                return Err(format!(
                    "DeleteSession({id}) returned {:?}/{:?}, expected TERMINATING or TERMINATED with {:?} ({})",
                    deleted.status(),
                    deleted.end_reason(),
                    tracked.expected,
                    tracked.because
                ));
            }
            self.tracked_mut(&id).ended = true;
        }
        Ok(())
    }

    /// SIGKILLs the session's VMM: calls must fail, the session must end VM_FAILED.
    async fn kill_vmm(&mut self, id: &str) -> Result<(), String> {
        let vm_id = self.tracked(id).vm_id.clone();
        let vm = self.get_vm(&vm_id).await?;
        if vm.vmm_pid == 0 {
            return Err(format!("vm {vm_id} has no vmm pid: {vm:?}"));
        }
        kill(vm.vmm_pid);
        let killed_at = SystemTime::now();
        self.expect_vm_lost(id, killed_at, "its VMM was SIGKILLed");
        wait_until(Duration::from_secs(10), || !pid_alive(vm.vmm_pid))
            .await
            .map_err(|_| format!("vmm {} survived SIGKILL", vm.vmm_pid))?;
        self.expect_dead(id).await
    }

    /// Crashes vm-pool and starts it again: it must reap every VMM the old one left, and
    /// every session whose VM was on it ends VM_FAILED.
    async fn restart_vm_pool(&mut self, id: &str) -> Result<(), String> {
        let before = self.list_vms().await?;
        let mut active = Vec::new();
        for t in self.sessions.iter().filter(|t| !t.ended) {
            let s = self.get(&t.id).await?;
            if s.status() == SessionStatus::Active {
                active.push(t.id.clone());
            }
        }
        self.stack.restart_vm_pool().await;
        let up_at = SystemTime::now();
        for sid in &active {
            self.expect_vm_lost(sid, up_at, "its vm-pool crashed and was restarted");
        }
        for vm in &before {
            let pid = vm.vmm_pid;
            if pid > 0 {
                wait_until(Duration::from_secs(30), || !pid_alive(pid))
                    .await
                    .map_err(|_| {
                        format!(
                            "vmm {pid} of vm {} survived the vm-pool restart (not reaped)",
                            vm.id
                        )
                    })?;
            }
        }
        self.expect_dead(id).await
    }

    /// The session lost its VM at `at`: it must end VM_FAILED, or EXPIRED if its deadline
    /// was within the detection margin of `at`.
    fn expect_vm_lost(&mut self, id: &str, at: SystemTime, why: &str) {
        let t = self.tracked_mut(id);
        if t.expire_time <= at + RACE_MARGIN && t.ending == Ending::Expire {
            t.expected = vec![EndReason::VmFailed, EndReason::Expired];
            t.because = format!("{why} within {RACE_MARGIN:?} of its deadline");
        } else {
            t.expected = vec![EndReason::VmFailed];
            t.because = why.to_string();
        }
    }

    /// After the session's VM is gone: Execute must fail (never answer), and the session
    /// must reach TERMINATED with an expected reason.
    async fn expect_dead(&mut self, id: &str) -> Result<(), String> {
        let req = exec::request(id, Language::Python, "print(x)", 0);
        let mut c = self.client.clone();
        match tokio::time::timeout(CALL_TIMEOUT, exec::try_run(&mut c, req)).await {
            Err(_) => return Err(format!("Execute on {id} with its VM gone hung")),
            Ok(Ok(out)) => {
                return Err(format!(
                    "Execute on {id} answered with its VM gone: {:?}",
                    out.stdout_text()
                ));
            }
            Ok(Err(s)) if matches!(s.code(), Code::Unavailable | Code::FailedPrecondition) => {}
            Ok(Err(s)) => {
                return Err(format!(
                    "Execute on {id} with its VM gone: {:?} {}",
                    s.code(),
                    s.message()
                ));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.get(id).await?;
            if s.status() == SessionStatus::Terminated {
                self.tracked_mut(id).ended = true;
                let t = self.tracked(id);
                return if t.expected.contains(&s.end_reason()) {
                    Ok(())
                } else {
                    Err(format!(
                        "session {id} ended {:?} ({}), expected {:?} ({})",
                        s.end_reason(),
                        s.end_message,
                        t.expected,
                        t.because
                    ))
                };
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "session {id} still {:?} 60s after its VM was lost",
                    s.status()
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `print(x)` must print `value`.
    async fn check_x(&mut self, id: &str, value: u64) -> Result<(), String> {
        let Some(out) = self.run_alive(id, "print(x)").await? else {
            return Ok(());
        };
        if out.stdout_text() != format!("{value}\n") || !out.errors.is_empty() {
            return Err(format!(
                "print(x) in {id} gave {:?} (errors {:?}), expected {value}",
                out.stdout_text(),
                out.errors
            ));
        }
        Ok(())
    }

    /// Runs `code` in a session that should be alive, retrying UNAVAILABLE. `None` when
    /// the session rightly expired meanwhile (it was left to expire and its deadline
    /// passed): then nothing more is asked of it.
    async fn run_alive(&mut self, id: &str, code: &str) -> Result<Option<Outcome>, String> {
        let req = exec::request(id, Language::Python, code, 0);
        let result = self
            .retrying("Execute", false, |mut c| {
                let req = req.clone();
                async move { exec::try_run(&mut c, req).await }
            })
            .await;
        match result {
            Ok(out) => Ok(Some(out)),
            Err(e) => {
                let s = self.get(id).await?;
                let t = self.tracked(id);
                if t.ending == Ending::Expire
                    && s.end_reason() == EndReason::Expired
                    && SystemTime::now() >= t.expire_time
                {
                    Ok(None)
                } else {
                    Err(format!(
                        "{code:?} in {id}: {e}; session {:?}/{:?} {}",
                        s.status(),
                        s.end_reason(),
                        s.end_message
                    ))
                }
            }
        }
    }

    async fn create(&mut self, lifetime: Duration) -> Result<Session, String> {
        self.retrying("CreateSession", true, |mut c| async move {
            c.create_session(CreateSessionRequest {
                lifetime: Some(capsa_proto::time::duration(lifetime)),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().session)
        })
        .await?
        .ok_or_else(|| "CreateSession returned no session".to_string())
    }

    async fn get(&self, id: &str) -> Result<Session, String> {
        self.retrying("GetSession", false, |mut c| {
            let id = id.to_string();
            async move {
                c.get_session(GetSessionRequest { session_id: id })
                    .await
                    .map(|r| r.into_inner().session)
            }
        })
        .await?
        .ok_or_else(|| format!("GetSession({id}) returned no session"))
    }

    /// `call` on a clone of the client, retried while it fails UNAVAILABLE (or
    /// RESOURCE_EXHAUSTED with `busy_ok`) for at most [`RETRY_WINDOW`]; each try is
    /// bounded by [`CALL_TIMEOUT`].
    async fn retrying<T, F, Fut>(&self, what: &str, busy_ok: bool, call: F) -> Result<T, String>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + RETRY_WINDOW;
        let mut pause = Duration::from_millis(250);
        loop {
            let status = match tokio::time::timeout(CALL_TIMEOUT, call(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(s)) => s,
                Err(_) => return Err(format!("{what} hung for {CALL_TIMEOUT:?}")),
            };
            let retriable = status.code() == Code::Unavailable
                || (busy_ok && status.code() == Code::ResourceExhausted);
            if !retriable || Instant::now() > deadline {
                return Err(format!("{what}: {:?} {}", status.code(), status.message()));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    async fn vm_pool(&self) -> Result<VmPoolServiceClient<tonic::transport::Channel>, String> {
        VmPoolServiceClient::connect(self.stack.vm_pool.url())
            .await
            .map_err(|e| format!("connect to vm-pool: {e}"))
    }

    async fn get_vm(&self, vm_id: &str) -> Result<Vm, String> {
        self.vm_pool()
            .await?
            .get_vm(GetVmRequest {
                vm_id: vm_id.into(),
            })
            .await
            .map_err(|s| format!("GetVm({vm_id}): {:?} {}", s.code(), s.message()))?
            .into_inner()
            .vm
            .ok_or_else(|| format!("GetVm({vm_id}) returned no vm"))
    }

    async fn list_vms(&self) -> Result<Vec<Vm>, String> {
        Ok(self
            .vm_pool()
            .await?
            .list_vms(ListVmsRequest {})
            .await
            .map_err(|s| format!("ListVms: {:?} {}", s.code(), s.message()))?
            .into_inner()
            .vms)
    }

    fn tracked(&self, id: &str) -> &Tracked {
        self.sessions.iter().find(|t| t.id == id).expect("tracked")
    }

    fn tracked_mut(&mut self, id: &str) -> &mut Tracked {
        self.sessions
            .iter_mut()
            .find(|t| t.id == id)
            .expect("tracked")
    }

    /// Waits until every session of the tenant is TERMINATED, then checks each tracked
    /// one's end reason; sessions the soak does not know of are failures too.
    async fn settle(&mut self) {
        let deadline = Instant::now() + SETTLE_WINDOW;
        let all = loop {
            match self.list_all().await {
                Ok(all) => {
                    let open = all
                        .iter()
                        .filter(|s| s.status() != SessionStatus::Terminated)
                        .count();
                    if open == 0 || Instant::now() > deadline {
                        break all;
                    }
                }
                Err(e) if Instant::now() > deadline => {
                    self.failures.push(format!("cannot list sessions: {e}"));
                    return;
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let mut seen = BTreeSet::new();
        for s in &all {
            seen.insert(s.id.clone());
            let reason = s.end_reason().as_str_name();
            let reason = reason.strip_prefix("END_REASON_").unwrap_or(reason);
            *self.end_reasons.entry(reason.to_lowercase()).or_default() += 1;
            let Some(t) = self.sessions.iter().find(|t| t.id == s.id) else {
                // A create that failed UNAVAILABLE (and was retried) may have left its
                // session behind: it must have ended CREATE_FAILED.
                let create_failed = s.status() == SessionStatus::Terminated
                    && s.end_reason() == EndReason::CreateFailed;
                if !create_failed {
                    self.failures.push(format!(
                        "session {} was never returned by a create, yet is {:?}/{:?} {}",
                        s.id,
                        s.status(),
                        s.end_reason(),
                        s.end_message
                    ));
                }
                continue;
            };
            if s.status() != SessionStatus::Terminated {
                self.failures.push(format!(
                    "session {} (cycle {}) still {:?} {:?} after {SETTLE_WINDOW:?}: {}",
                    s.id,
                    t.cycle,
                    s.status(),
                    s.end_reason(),
                    s.end_message
                ));
            } else if !t.expected.contains(&s.end_reason()) {
                self.failures.push(format!(
                    "session {} (cycle {}) ended {:?} ({}), expected {:?} ({})",
                    s.id,
                    t.cycle,
                    s.end_reason(),
                    s.end_message,
                    t.expected,
                    t.because
                ));
            }
        }
        for t in self.sessions.iter().filter(|t| !seen.contains(&t.id)) {
            self.failures.push(format!(
                "session {} (cycle {}) is not listed",
                t.id, t.cycle
            ));
        }
    }

    async fn list_all(&self) -> Result<Vec<Session>, String> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .retrying("ListSessions", false, |mut c| {
                    let token = token.clone();
                    async move {
                        c.list_sessions(ListSessionsRequest {
                            page_size: 1000,
                            page_token: token,
                            ..Default::default()
                        })
                        .await
                        .map(|r| r.into_inner())
                    }
                })
                .await?;
            all.extend(page.sessions);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            token = page.next_page_token;
        }
    }

    /// Leaks while the stack runs: everything beyond the warm VMs vm-pool lists.
    async fn leaks_while_running(&mut self, taps_before: &BTreeSet<String>) -> Leaks {
        let mut leaks = Leaks::default();
        let vms = match self.list_vms().await {
            Ok(vms) => vms,
            Err(e) => {
                self.failures.push(e);
                return leaks;
            }
        };
        let mut live = BTreeSet::new();
        for vm in &vms {
            if vm.state == VmState::Warm as i32 || vm.state == VmState::Booting as i32 {
                live.insert(vm.id.clone());
            } else {
                leaks.vms_not_warm.push(format!(
                    "{} {:?} lease {:?} {}",
                    vm.id,
                    vm.state(),
                    vm.lease_id,
                    vm.failure
                ));
            }
        }
        let state_dir = self.stack.vm_state_dir();
        count_leaks(&state_dir, &live, taps_before, &mut leaks);
        leaks.taps.extend(network_leaks(
            self.stack.vm_netns(),
            Some(live.len()),
            taps_before,
        ));
        for t in &self.sessions {
            if state_dir.join("vms").join(&t.vm_id).exists() && !live.contains(&t.vm_id) {
                // Counted above already; named here for the diagnosis.
                eprintln!(
                    "soak: vm dir of ended session {} (cycle {}) remains",
                    t.id, t.cycle
                );
            }
        }
        leaks
    }

    /// Redis keys that outlive what they describe. Metering finalizes usage of sessions
    /// whose finalize call failed on its own schedule, so this polls for a while.
    async fn redis_leaks(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let leaks = self.redis_leaks_now();
            if leaks.is_empty() || Instant::now() > deadline {
                return leaks;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn redis_leaks_now(&self) -> Vec<String> {
        let port = self.stack.redis.port();
        let ids: BTreeSet<&str> = self.sessions.iter().map(|t| t.id.as_str()).collect();
        let mut leaks = Vec::new();
        for key in redis(port, &["--scan", "--pattern", "{capsa}:*"]) {
            let member_sets = [
                "{capsa}:sessions:expiry".to_string(),
                format!("{{capsa}}:tenant:{TENANT}:active"),
                format!("{{capsa}}:nodesessions:{NODE}"),
                "{capsa}:usage:open".to_string(),
            ];
            if member_sets.contains(&key) {
                let members = match redis(port, &["TYPE", &key]).first().map(String::as_str) {
                    Some("zset") => redis(port, &["ZRANGE", &key, "0", "-1"]),
                    _ => redis(port, &["SMEMBERS", &key]),
                };
                // Every session has ended: none may still be a member.
                leaks.extend(members.iter().map(|m| format!("{key} still holds {m}")));
                continue;
            }
            let Some(id) = ids.iter().find(|id| key.contains(**id)) else {
                continue; // not a session's key (api keys, nodes, tenant totals, streams)
            };
            let retained = key == format!("{{capsa}}:session:{id}")
                || key == format!("{{capsa}}:usage:session:{id}");
            if !retained {
                leaks.push(format!("{key} (of ended session {id})"));
                continue;
            }
            let ttl: i64 = redis(port, &["PTTL", &key])
                .first()
                .and_then(|t| t.parse().ok())
                .unwrap_or(-2);
            // -2: gone meanwhile (fine); -1: kept forever (a leak).
            if ttl == -1 {
                leaks.push(format!("{key} has no TTL though session {id} ended"));
            }
        }
        leaks
    }
}

/// Leaks once the stack is stopped: nothing of any VM may remain.
fn leaks_after_stop(state_dir: &Path, taps_before: &BTreeSet<String>) -> Leaks {
    let mut leaks = Leaks::default();
    count_leaks(state_dir, &BTreeSet::new(), taps_before, &mut leaks);
    leaks
}

/// VMM processes, VM dirs (with their vsock sockets and overlays) of VMs not in `live`,
/// and taps that were not there before the test.
fn count_leaks(
    state_dir: &Path,
    live: &BTreeSet<String>,
    taps_before: &BTreeSet<String>,
    leaks: &mut Leaks,
) {
    for (pid, vm_id, program) in vmm_processes(state_dir) {
        if !live.contains(&vm_id) {
            leaks
                .vmm_processes
                .push(format!("pid {pid} {program} of vm {vm_id}"));
        }
    }
    if let Ok(dirs) = std::fs::read_dir(state_dir.join("vms")) {
        for dir in dirs.flatten() {
            let name = dir.file_name().to_string_lossy().into_owned();
            if live.contains(&name) {
                continue;
            }
            let path = dir.path();
            // Names from capsa_vmm::layout.
            leaks.vsock_sockets += usize::from(path.join("vsock.sock").exists());
            leaks.overlays += usize::from(path.join("overlay.qcow2").exists());
            leaks.vm_dirs.push(path.display().to_string());
        }
    }
    // VM taps live in vm-pool's namespace ([`network_leaks`]); in the host's only its veth
    // (`cvh…`, checked after the stop), so any other new tap-like link is a leak.
    leaks.taps = links()
        .into_iter()
        .filter(|l| !taps_before.contains(l))
        .filter(|l| l.starts_with("tap") || l.starts_with("capsa") || l.starts_with("vm"))
        .collect();
}

/// What is left of vm-pool's network in namespace `netns`: with `live` VMs running, taps
/// beyond one per live VM; once stopped (`None`), the namespace itself, its nftables table
/// and a host-side veth that was not there before the test.
fn network_leaks(netns: &str, live: Option<usize>, links_before: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    match live {
        Some(live) => {
            let listed = std::process::Command::new("ip")
                .args(["-n", netns, "-o", "link", "show"])
                .output()
                .expect("ip link show");
            let taps: Vec<String> = String::from_utf8_lossy(&listed.stdout)
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .map(|name| name.split('@').next().unwrap_or(name).to_string())
                .filter(|name| name.starts_with("vmtap"))
                .collect();
            if taps.len() > live {
                out.push(format!(
                    "{} taps in {netns} for {live} live vms: {taps:?}",
                    taps.len()
                ));
            }
        }
        None => {
            if Path::new("/run/netns").join(netns).exists() {
                out.push(format!("network namespace {netns}"));
            }
            let table = std::process::Command::new("nft")
                .args(["list", "table", "inet", netns])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("nft list table");
            if table.success() {
                out.push(format!("nftables table inet {netns}"));
            }
            out.extend(
                links()
                    .into_iter()
                    .filter(|l| l.starts_with("cvh") && !links_before.contains(l))
                    .map(|l| format!("host veth {l}")),
            );
        }
    }
    out
}

/// (pid, vm id, program) of every VMM or helper whose command line points into
/// `<state_dir>/vms/`.
fn vmm_processes(state_dir: &Path) -> Vec<(u32, String, String)> {
    let prefix = format!("{}/vms/", state_dir.display());
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let program = argv
            .first()
            .and_then(|a| Path::new(a).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ours = ["qemu-system", "cloud-hypervisor"]
            .iter()
            .any(|p| program.contains(p));
        if !ours {
            continue;
        }
        let vm_id = argv.iter().find_map(|a| {
            let rest = &a[a.find(&prefix)? + prefix.len()..];
            Some(rest.split('/').next().unwrap_or(rest).to_string())
        });
        if let Some(vm_id) = vm_id {
            out.push((pid, vm_id, program));
        }
    }
    out
}

/// Names of this network namespace's links (what `ip -o link` lists).
fn links() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .expect("read /sys/class/net")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// `redis-cli -p <port> <args>`, its output lines.
fn redis(port: u16, args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

fn to_system_time(t: Option<&prost_types::Timestamp>) -> SystemTime {
    let t = t.expect("a timestamp");
    UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32)
}

fn kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL {pid}");
}

fn pid_alive(pid: u32) -> bool {
    // A zombie is dead: only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Polls `cond` every 100 ms for at most `within`.
async fn wait_until(within: Duration, cond: impl Fn() -> bool) -> Result<(), ()> {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() > deadline {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
