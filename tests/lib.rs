//! The whole Capsa stack as real processes on one machine, for end-to-end tests and the
//! execute benchmark: a `redis-server`, executor, vm-pool booting real VMs (the engine this
//! machine offers; software-emulated QEMU here), metering and session-manager, each on
//! `127.0.0.1:0`, plus a development API key. Everything stops when the [`Stack`] drops,
//! even when a test fails: vm-pool destroys its VMs on SIGTERM, and the process-group kill
//! in `ServiceProcess` is the backstop.
//!
//! With [`StackOptions::nodes`] above 1 it runs several nodes, as a cluster would: each a
//! vm-pool + executor pair with its own node id, state dir and network namespace, all
//! registered in the one Redis the session-manager replicas share. Node 0 is the one the
//! single-node fields and methods (`vm_pool`, `executor`, `vm_state_dir`, ...) name; the
//! `node*` methods, [`Stack::kill_node`] and [`Stack::pause_node`] take any node's index.

use std::path::PathBuf;
use std::time::Duration;

use capsa_proto::session::v1::session_service_client::SessionServiceClient;
use capsa_proto::vmpool::v1::ListVmsRequest;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use capsa_test_support::{RedisServer, ServiceProcess, workspace_binary};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The guest image the VMs boot: `$CAPSA_IMAGE_DIR`, else the newest one built into
/// `$CAPSA_CACHE_DIR/images/current` (the test command builds it first).
pub fn image_dir() -> PathBuf {
    let dir = std::env::var_os("CAPSA_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("CAPSA_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/cache/capsa"));
            cache.join("images/current")
        });
    assert!(
        dir.join("manifest.json").exists(),
        "no guest image at {} (build it with deploy/guest/build-image.sh, which \
         deploy/scripts/test.sh runs first)",
        dir.display()
    );
    dir
}

/// Options for [`Stack::start`].
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Warm VMs vm-pool keeps booted.
    pub warm: u32,
    /// Session-manager replicas.
    pub replicas: usize,
    /// Metering replicas.
    pub metering_replicas: usize,
    /// Extra environment for every service (e.g. OTLP settings).
    pub env: Vec<(String, String)>,
    /// Redis with an append-only file fsynced on every write, so [`Stack::restart_redis`]
    /// loses nothing it acknowledged.
    pub durable_redis: bool,
    /// Extra vm-pool flags (e.g. `--orphan-vms-on-crash`).
    pub vm_pool_args: Vec<String>,
    /// mTLS between the services, with the certificates `deploy/scripts/certs.sh` wrote to
    /// this dir (the public API stays plaintext).
    pub tls_dir: Option<PathBuf>,
    /// Nodes (vm-pool + executor pairs), at least 1.
    pub nodes: usize,
    /// Extra session-manager flags (e.g. `--node-grace-secs`), for every replica.
    pub session_manager_args: Vec<String>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            warm: 1,
            replicas: 1,
            metering_replicas: 1,
            env: Vec::new(),
            durable_redis: false,
            vm_pool_args: Vec::new(),
            tls_dir: None,
            nodes: 1,
            session_manager_args: Vec::new(),
        }
    }
}

/// The node id of node `i`: node 0 keeps the single-node stack's id.
fn node_id(i: usize) -> String {
    match i {
        0 => "e2e-node".to_string(),
        i => format!("e2e-node-{i}"),
    }
}

/// The state dir of node `i`'s VMs, under the stack's state dir.
fn node_state_dir(root: &std::path::Path, i: usize) -> PathBuf {
    match i {
        0 => root.join("vm-state"),
        i => root.join(format!("vm-state-{i}")),
    }
}

/// A node: node 0's processes become the stack's `vm_pool` and `executor`, the others
/// stay in one of these.
struct Node {
    vm_pool: ServiceProcess,
    executor: ServiceProcess,
    /// After vm-pool, as in [`Stack`].
    cleanup: NodeCleanup,
}

/// A running stack. Fields drop in declaration order: public API first, Redis last.
pub struct Stack {
    pub session_managers: Vec<ServiceProcess>,
    pub meterings: Vec<ServiceProcess>,
    /// Node 0's.
    pub vm_pool: ServiceProcess,
    pub executor: ServiceProcess,
    /// After vm-pool: removes its network, VM dirs and cgroups however it ended.
    cleanup: NodeCleanup,
    /// Nodes 1 and up.
    extra_nodes: Vec<Node>,
    pub redis: RedisServer,
    pub api_key: String,
    pub state_dir: tempfile::TempDir,
    /// Flags (but `--listen`) and environment the node services were started with, for
    /// their restarts.
    executor_args: Vec<String>,
    vm_pool_args: Vec<String>,
    session_manager_args: Vec<String>,
    env: Vec<(String, String)>,
}

/// What a node's vm-pool leaves when it is SIGKILLed: its network namespace (its veth and
/// taps go with it), its nftables table on the host, and its VMs' dirs and cgroups (the
/// VMMs die with vm-pool, but their cgroups stay). vm-pool removes all of it when it stops
/// and reaps it when it starts again on the same state dir; a test stack is dropped with a
/// SIGKILL and never restarted, so this removes it.
struct NodeCleanup {
    netns: String,
    /// `<state dir>/vms`: the dirs `capsa_vmm::orphans::reap` works from.
    vms_dir: PathBuf,
}

impl NodeCleanup {
    fn new(vm_state: &std::path::Path) -> NodeCleanup {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        NodeCleanup {
            netns: format!("capsa-e2e-{}-{n}", std::process::id()),
            vms_dir: vm_state.join("vms"),
        }
    }
}

impl Drop for NodeCleanup {
    fn drop(&mut self) {
        // All of it is gone already after a graceful stop: the errors say only that.
        for cmd in [
            vec!["ip", "netns", "delete", &self.netns],
            vec!["nft", "delete", "table", "inet", &self.netns],
        ] {
            let _ = std::process::Command::new(cmd[0])
                .args(&cmd[1..])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        // On a thread of its own: this may drop inside the test's runtime, which cannot
        // block on another.
        let vms_dir = self.vms_dir.clone();
        let reaped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime for the reap")
                .block_on(capsa_vmm::orphans::reap(&vms_dir))
        })
        .join();
        if let Ok(Err(e)) = reaped {
            eprintln!(
                "cannot remove what vm-pool left in {}: {e}",
                self.vms_dir.display()
            );
        }
    }
}

/// What [`Stack::stop`] leaves.
pub struct Stopped {
    /// How each service exited, in stop order.
    pub exits: Vec<(&'static str, std::process::ExitStatus)>,
    /// Held until this drops, so a look at what vm-pool left sees it all.
    cleanup: NodeCleanup,
    /// The other nodes', likewise.
    _extra_cleanups: Vec<NodeCleanup>,
    /// Last: the cleanups read the VM dirs in it.
    pub state_dir: tempfile::TempDir,
}

impl Stopped {
    /// The network namespace vm-pool ran its VMs in (gone after a clean stop).
    pub fn vm_netns(&self) -> &str {
        &self.cleanup.netns
    }
}

pub type Client = SessionServiceClient<InterceptedService<Channel, Bearer>>;

/// A client of the session-manager at `url` that authenticates with `key`, on the current
/// runtime (for a client driven from a runtime of its own; [`Stack::client`] otherwise).
pub async fn connect_client(url: &str, key: &str) -> Client {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let bearer = Bearer(format!("Bearer {key}").parse().unwrap());
    SessionServiceClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(capsa_proto::limits::MAX_MESSAGE_BYTES)
}

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

impl Stack {
    pub async fn start(opts: StackOptions) -> Stack {
        let image = image_dir();
        let redis = if opts.durable_redis {
            RedisServer::start_durable()
        } else {
            RedisServer::start()
        };
        let state_dir = tempfile::Builder::new()
            .prefix("capsa-e2e-")
            .tempdir()
            .unwrap();
        let env: Vec<(&str, &str)> = opts
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let tls = |service: &str| tls_flags(opts.tls_dir.as_deref(), service);
        assert!(opts.nodes >= 1, "a stack has at least one node");
        let mut nodes = Vec::new();
        for i in 0..opts.nodes {
            nodes.push(start_node(i, &opts, state_dir.path(), &image, &redis.url(), &env).await);
        }
        let mut nodes = nodes.into_iter();
        let (first, executor_args, vm_pool_args) = nodes.next().expect("node 0");
        let extra_nodes: Vec<Node> = nodes.map(|(node, _, _)| node).collect();
        let mut meterings = Vec::new();
        for _ in 0..opts.metering_replicas {
            meterings.push(
                ServiceProcess::start_with_env(
                    "capsa-metering",
                    &[
                        args(&["--listen", "127.0.0.1:0", "--redis-url", &redis.url()]),
                        tls("metering"),
                    ]
                    .concat(),
                    &env,
                )
                .await,
            );
        }
        let mut session_manager_args = args(&[
            "--redis-url",
            &redis.url(),
            "--metering-url",
            &internal_url(opts.tls_dir.as_deref(), &meterings[0]),
        ]);
        session_manager_args.extend(tls("session-manager"));
        session_manager_args.extend(opts.session_manager_args.iter().cloned());
        let mut session_managers = Vec::new();
        for _ in 0..opts.replicas {
            session_managers.push(
                ServiceProcess::start_with_env(
                    "capsa-session-manager",
                    &listen("0", &session_manager_args),
                    &env,
                )
                .await,
            );
        }
        // vm-pool registers its node just after it starts listening; sessions created before
        // that are UNAVAILABLE ("no node is registered"), so the stack is ready only then.
        let registry = capsa_store::NodeRegistry::new(
            capsa_store::connect(&redis.url())
                .await
                .expect("connect to redis"),
        );
        for i in 0..opts.nodes {
            let id = node_id(i);
            capsa_test_support::eventually!(matches!(registry.get(&id).await, Ok(Some(_))), 30);
        }
        let api_key = create_api_key(&redis.url(), "e2e-tenant");
        Stack {
            session_managers,
            meterings,
            vm_pool: first.vm_pool,
            executor: first.executor,
            cleanup: first.cleanup,
            extra_nodes,
            redis,
            api_key,
            state_dir,
            executor_args,
            vm_pool_args,
            session_manager_args,
            env: opts.env,
        }
    }

    /// How many nodes the stack runs.
    pub fn node_count(&self) -> usize {
        1 + self.extra_nodes.len()
    }

    /// Node `i`'s id in the registry (and in its sessions' `node_id`).
    pub fn node_id(&self, i: usize) -> String {
        assert!(i < self.node_count(), "no node {i}");
        node_id(i)
    }

    /// Node `i`'s vm-pool and executor.
    pub fn node(&self, i: usize) -> (&ServiceProcess, &ServiceProcess) {
        match i {
            0 => (&self.vm_pool, &self.executor),
            i => {
                let n = &self.extra_nodes[i - 1];
                (&n.vm_pool, &n.executor)
            }
        }
    }

    /// The PID of the VMM behind `vm_id` on node `node` (0: the single-node stack's).
    pub async fn vmm_pid(&self, node: usize, vm_id: &str) -> u32 {
        let mut pool = VmPoolServiceClient::connect(self.node(node).0.url())
            .await
            .unwrap();
        let vm = pool
            .get_vm(capsa_proto::vmpool::v1::GetVmRequest {
                vm_id: vm_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .vm
            .unwrap();
        assert!(vm.vmm_pid > 0);
        vm.vmm_pid
    }

    /// Kills node `i` as a host failure would: SIGKILL to the process groups of its vm-pool
    /// and executor (its VMMs die with vm-pool: they run with PDEATHSIG unless
    /// `--orphan-vms-on-crash`). Returns once both are dead. Its network namespace stays
    /// until the stack drops.
    pub async fn kill_node(&self, i: usize) {
        let (vm_pool, executor) = self.node(i);
        for service in [vm_pool, executor] {
            signal_group(service, "-KILL");
        }
        for service in [vm_pool, executor] {
            wait_dead(service.pid()).await;
        }
    }

    /// Stops node `i` (SIGSTOP to its vm-pool's and executor's process groups), as a frozen
    /// or starved host: it neither beats nor answers. Its VMs, in process groups of their
    /// own, keep running. [`Stack::resume_node`] undoes it; a stopped node dropped with the
    /// stack is still killed.
    pub fn pause_node(&self, i: usize) {
        let (vm_pool, executor) = self.node(i);
        for service in [vm_pool, executor] {
            signal_group(service, "-STOP");
        }
    }

    /// SIGCONT to what [`Stack::pause_node`] stopped.
    pub fn resume_node(&self, i: usize) {
        let (vm_pool, executor) = self.node(i);
        for service in [vm_pool, executor] {
            signal_group(service, "-CONT");
        }
    }

    /// Restarts session-manager replica `i` as a rolling update does: SIGTERM (it reports
    /// NOT_SERVING, stops accepting and lets in-flight calls finish; panics if it still runs
    /// after a minute or exits unsuccessfully), then the same binary and flags on the same
    /// address. Returns once the new process listens; whether it serves yet is the
    /// caller's to check.
    pub async fn restart_session_manager(&mut self, i: usize) {
        let addr = self.session_managers[i].addr().to_string();
        let port = addr.rsplit(':').next().expect("host:port").to_string();
        let old = self.session_managers.remove(i);
        let status = old.terminate(Duration::from_secs(60)).await;
        assert!(
            status.success(),
            "session-manager {i} exited with {status} on SIGTERM"
        );
        wait_port_free(&addr).await;
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let again = ServiceProcess::start_with_env(
            "capsa-session-manager",
            &listen(&port, &self.session_manager_args),
            &env,
        )
        .await;
        self.session_managers.insert(i, again);
    }

    /// The network namespace vm-pool runs its VMs in (`--netns`).
    pub fn vm_netns(&self) -> &str {
        &self.cleanup.netns
    }

    /// The state dir vm-pool keeps its VMs in (`<it>/vms/<vm id>/`).
    pub fn vm_state_dir(&self) -> PathBuf {
        self.state_dir.path().join("vm-state")
    }

    /// Kills the executor with SIGKILL (a crash) and starts it again on the same address,
    /// where vm-pool's node record tells session-manager to find it.
    pub async fn restart_executor(&mut self) {
        let addr = self.executor.addr().to_string();
        crash(&self.executor).await;
        self.executor = self
            .start_again("capsa-executor", &addr, &self.executor_args)
            .await;
    }

    /// Kills vm-pool with SIGKILL (a crash; its VMMs, in process groups of their own,
    /// outlive it when it runs with `--orphan-vms-on-crash`) and starts it again on the same
    /// address and state dir. Returns once it answers ListVms: by then it has reaped what
    /// the old one left and registered the node.
    pub async fn restart_vm_pool(&mut self) {
        let addr = self.vm_pool.addr().to_string();
        crash(&self.vm_pool).await;
        self.vm_pool = self
            .start_again("capsa-vm-pool", &addr, &self.vm_pool_args)
            .await;
        let url = self.vm_pool.url();
        capsa_test_support::eventually!(
            {
                let listed = async {
                    VmPoolServiceClient::connect(url.clone())
                        .await
                        .ok()?
                        .list_vms(ListVmsRequest {})
                        .await
                        .ok()
                };
                tokio::time::timeout(Duration::from_secs(5), listed)
                    .await
                    .ok()
                    .flatten()
                    .is_some()
            },
            120
        );
    }

    /// Stops every service with SIGTERM, public API first and Redis last, so vm-pool
    /// destroys its VMs itself (with `--orphan-vms-on-crash` a SIGKILL would leave them);
    /// panics if one is still running after a minute. The state dir is kept (in the
    /// result) for a look at what is left.
    pub async fn stop(self) -> Stopped {
        let mut exits = Vec::new();
        let grace = Duration::from_secs(60);
        let named = |name: &'static str| move |s| (name, s);
        let services = self
            .session_managers
            .into_iter()
            .map(named("capsa-session-manager"))
            .chain(self.meterings.into_iter().map(named("capsa-metering")))
            .chain([
                ("capsa-vm-pool", self.vm_pool),
                ("capsa-executor", self.executor),
            ]);
        let mut extra_cleanups = Vec::new();
        let mut extra_services = Vec::new();
        for node in self.extra_nodes {
            extra_services.push(("capsa-vm-pool", node.vm_pool));
            extra_services.push(("capsa-executor", node.executor));
            extra_cleanups.push(node.cleanup);
        }
        for (name, service) in services.chain(extra_services) {
            exits.push((name, service.terminate(grace).await));
        }
        drop(self.redis);
        Stopped {
            exits,
            state_dir: self.state_dir,
            cleanup: self.cleanup,
            _extra_cleanups: extra_cleanups,
        }
    }

    /// Kills Redis with SIGKILL, leaves it down for `down` and starts it again on the same
    /// port and data dir; with `durable_redis` it comes back with everything it
    /// acknowledged. Blocks the thread meanwhile (the services are other processes).
    pub fn restart_redis(&mut self, down: Duration) {
        self.redis.restart(down);
    }

    async fn start_again(&self, name: &str, addr: &str, flags: &[String]) -> ServiceProcess {
        let port = addr.rsplit(':').next().expect("host:port");
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        ServiceProcess::start_with_env(name, &listen(port, flags), &env).await
    }

    /// A client of replica `i`, authenticated as this stack's tenant.
    pub async fn client(&self, i: usize) -> Client {
        self.client_with_key(i, &self.api_key).await
    }

    pub async fn client_with_key(&self, i: usize, key: &str) -> Client {
        connect_client(&self.session_managers[i].url(), key).await
    }

    /// Another tenant's key, for isolation tests.
    pub fn new_tenant_key(&self, tenant: &str) -> String {
        create_api_key(&self.redis.url(), tenant)
    }
}

/// `--tls-cert/--tls-key/--tls-ca` of `service` from a `certs.sh` dir, or nothing.
pub fn tls_flags(dir: Option<&std::path::Path>, service: &str) -> Vec<String> {
    let Some(dir) = dir else { return Vec::new() };
    let file = |name: String| dir.join(name).display().to_string();
    vec![
        "--tls-cert".into(),
        file(format!("{service}.pem")),
        "--tls-key".into(),
        file(format!("{service}.key")),
        "--tls-ca".into(),
        file("ca.pem".into()),
    ]
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `--listen 127.0.0.1:<port>` followed by `flags`.
fn listen(port: &str, flags: &[String]) -> Vec<String> {
    let mut all = args(&["--listen", &format!("127.0.0.1:{port}")]);
    all.extend(flags.iter().cloned());
    all
}

/// SIGKILLs `service` (the process only, as a crash would) and waits until it is dead
/// (a zombie: its parent, this test, has not reaped it) and its port can be bound again.
/// Its `ServiceProcess` is dropped later; the pid cannot be reused before that reaps it.
async fn crash(service: &ServiceProcess) {
    let pid = service.pid();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -KILL {pid}");
    wait_dead(pid).await;
    wait_port_free(service.addr()).await;
}

/// Sends `signal` (as `kill` spells it, e.g. `-STOP`) to `service`'s process group.
fn signal_group(service: &ServiceProcess, signal: &str) {
    let group = format!("-{}", service.pid());
    let sent = std::process::Command::new("kill")
        .args([signal, "--", &group])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill {signal} -- {group}");
}

/// Waits until `pid` is dead: a zombie (its parent, this test, has not reaped it) or gone.
async fn wait_dead(pid: u32) {
    capsa_test_support::eventually!(
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')))
            .unwrap_or(true),
        10
    );
}

/// Waits until `addr`, the port of a service that just died, can be bound again.
async fn wait_port_free(addr: &str) {
    // The freed port is in the ephemeral range: a client still dialling it (session-manager,
    // metering) can get it as its own source port for a moment (a TCP self-connect), and
    // the restarted service would then fail to bind. std binds with SO_REUSEADDR, as tokio
    // does, so connections of the dead process in TIME_WAIT do not count.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = std::net::TcpListener::bind(addr) {
        if std::time::Instant::now() > deadline {
            let port = addr.rsplit(':').next().unwrap_or_default();
            let holders = std::process::Command::new("ss")
                .args(["-tanp", &format!("( sport = :{port} )")])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            panic!("{addr} still taken 30s after its service died ({e}):\n{holders}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The URL another service dials `p` at: https:// under mTLS.
fn internal_url(tls_dir: Option<&std::path::Path>, p: &ServiceProcess) -> String {
    match tls_dir {
        Some(_) => p.url().replacen("http://", "https://", 1),
        None => p.url(),
    }
}

/// Starts node `i`: its executor, then its vm-pool on its own state dir and network
/// namespace. Returns the node and the flags (but `--listen`) of its executor and vm-pool.
async fn start_node(
    i: usize,
    opts: &StackOptions,
    root: &std::path::Path,
    image: &std::path::Path,
    redis_url: &str,
    env: &[(&str, &str)],
) -> (Node, Vec<String>, Vec<String>) {
    let vm_state = node_state_dir(root, i);
    std::fs::create_dir_all(&vm_state).unwrap();
    let s = |p: &std::path::Path| p.display().to_string();
    let tls = |service: &str| tls_flags(opts.tls_dir.as_deref(), service);
    let mut executor_args = args(&["--vm-state-dir", &s(&vm_state)]);
    executor_args.extend(tls("executor"));
    let executor =
        ServiceProcess::start_with_env("capsa-executor", &listen("0", &executor_args), env).await;
    let cleanup = NodeCleanup::new(&vm_state);
    let mut vm_pool_args = args(&[
        "--netns",
        &cleanup.netns,
        "--state-dir",
        &s(&vm_state),
        "--image-dir",
        &s(image),
        "--warm",
        &opts.warm.to_string(),
        "--redis-url",
        redis_url,
        "--node-id",
        &node_id(i),
        "--executor-url",
        &internal_url(opts.tls_dir.as_deref(), &executor),
    ]);
    vm_pool_args.extend(tls("vm-pool"));
    vm_pool_args.extend(opts.vm_pool_args.iter().cloned());
    let vm_pool =
        ServiceProcess::start_with_env("capsa-vm-pool", &listen("0", &vm_pool_args), env).await;
    let node = Node {
        vm_pool,
        executor,
        cleanup,
    };
    (node, executor_args, vm_pool_args)
}

fn create_api_key(redis_url: &str, tenant: &str) -> String {
    let out = std::process::Command::new(workspace_binary("capsa-session-manager"))
        .args([
            "create-api-key",
            "--redis-url",
            redis_url,
            "--tenant",
            tenant,
            "--name",
            "e2e",
        ])
        .output()
        .expect("run capsa-session-manager create-api-key");
    assert!(
        out.status.success(),
        "create-api-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub mod exec;
pub mod otlp;

/// A session with the defaults, created through `client`; panics if the create fails.
pub async fn create_default_session(client: &mut Client) -> capsa_proto::session::v1::Session {
    create_session(
        client,
        capsa_proto::session::v1::CreateSessionRequest::default(),
    )
    .await
}

/// A session that lives `lifetime`, for runs that outlast the default lifetime (benches, the
/// density test); panics if the create fails.
pub async fn create_session_living(
    client: &mut Client,
    lifetime: Duration,
) -> capsa_proto::session::v1::Session {
    let request = capsa_proto::session::v1::CreateSessionRequest {
        lifetime: Some(capsa_proto::time::duration(lifetime)),
        ..Default::default()
    };
    create_session(client, request).await
}

async fn create_session(
    client: &mut Client,
    request: capsa_proto::session::v1::CreateSessionRequest,
) -> capsa_proto::session::v1::Session {
    client
        .create_session(request)
        .await
        .expect("create session")
        .into_inner()
        .session
        .expect("a created session")
}

/// The interpreter of the Python test venv (`$CAPSA_PYTHON`); panics, naming the script that
/// builds it, when unset: a Python suite never skips silently.
pub fn test_python() -> String {
    std::env::var("CAPSA_PYTHON").unwrap_or_else(|_| {
        panic!(
            "CAPSA_PYTHON is not set: it names the interpreter of the Python test venv; run \
             `export CAPSA_PYTHON=$(deploy/scripts/python-env.sh | tail -n1)` \
             (deploy/scripts/test.sh does this)"
        )
    })
}

/// SIGKILLs a process group on drop, so nothing a suite started outlives a failed or
/// timed-out test.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // Fails harmlessly (ESRCH) when the group is already gone.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Runs `$CAPSA_PYTHON -m pytest <args> -q -p no:cacheprovider` from the repository root
/// with `env`, in its own process group (killed on return), and panics with its whole output
/// when it fails or still runs after `timeout`. Output goes to a file so that it can be shown
/// even when the run is cut off.
pub async fn run_pytest(args: &[&str], env: &[(&str, String)], timeout: Duration) {
    let python = test_python();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = tokio::process::Command::new(&python);
    cmd.args(["-m", "pytest"])
        .args(args)
        .args(["-q", "-p", "no:cacheprovider"])
        .current_dir(root)
        .envs(env.iter().map(|(k, v)| (k, v)))
        // Nothing written into the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(std::process::Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .process_group(0)
        .kill_on_drop(true);
    let started = std::time::Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("run {python} (CAPSA_PYTHON): {e}"));
    let _group = ProcessGroup(child.id().expect("pytest's pid"));
    let status = tokio::time::timeout(timeout, child.wait()).await;
    let output = std::fs::read_to_string(log.path()).unwrap_or_default();
    match status {
        Ok(Ok(status)) if status.success() => {
            let summary = output
                .lines()
                .rfind(|l| l.contains(" passed"))
                .unwrap_or_default();
            println!(
                "pytest: {summary} ({:.0?} with the stack up)",
                started.elapsed()
            );
        }
        Ok(Ok(status)) => panic!("pytest failed ({status}):\n{output}"),
        Ok(Err(e)) => panic!("waiting for pytest: {e}\n{output}"),
        Err(_) => panic!("pytest still runs after {timeout:?}; its output:\n{output}"),
    }
}

/// Bytes allocated under `dir`, recursively (0 when it does not exist): what snapshots and
/// VM dirs really take on disk (sparse files count what they use).
pub fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
