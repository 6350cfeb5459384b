//! The whole Capsa stack as real processes on one machine, for end-to-end tests and the
//! execute benchmark: a `redis-server`, executor, vm-pool booting real VMs (the engine this
//! machine offers; software-emulated QEMU here), metering and session-manager, each on
//! `127.0.0.1:0`, plus a development API key. Everything stops when the [`Stack`] drops,
//! even when a test fails: vm-pool destroys its VMs on SIGTERM, and the process-group kill
//! in `ServiceProcess` is the backstop.

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
        }
    }
}

/// A running stack. Fields drop in declaration order: public API first, Redis last.
pub struct Stack {
    pub session_managers: Vec<ServiceProcess>,
    pub meterings: Vec<ServiceProcess>,
    pub vm_pool: ServiceProcess,
    pub executor: ServiceProcess,
    /// After vm-pool: removes its network however it ended.
    vm_network: VmNetworkGuard,
    pub redis: RedisServer,
    pub api_key: String,
    pub state_dir: tempfile::TempDir,
    /// Flags (but `--listen`) and environment the node services were started with, for
    /// their restarts.
    executor_args: Vec<String>,
    vm_pool_args: Vec<String>,
    env: Vec<(String, String)>,
}

/// vm-pool's network namespace (its veth and taps go with it) and its nftables table on the
/// host. vm-pool removes them when it stops and reaps them when it starts again on the same
/// state dir; a test stack is dropped with a SIGKILL and never restarted, so this removes them.
struct VmNetworkGuard {
    netns: String,
}

impl VmNetworkGuard {
    fn new() -> VmNetworkGuard {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        VmNetworkGuard {
            netns: format!("capsa-e2e-{}-{n}", std::process::id()),
        }
    }
}

impl Drop for VmNetworkGuard {
    fn drop(&mut self) {
        // Both are gone already after a graceful stop: their errors say only that.
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
    }
}

/// What [`Stack::stop`] leaves.
pub struct Stopped {
    /// How each service exited, in stop order.
    pub exits: Vec<(&'static str, std::process::ExitStatus)>,
    pub state_dir: tempfile::TempDir,
    /// Held until this drops, so a look at what vm-pool left of its network sees it all.
    vm_network: VmNetworkGuard,
}

impl Stopped {
    /// The network namespace vm-pool ran its VMs in (gone after a clean stop).
    pub fn vm_netns(&self) -> &str {
        &self.vm_network.netns
    }
}

pub type Client = SessionServiceClient<InterceptedService<Channel, Bearer>>;

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
        let vm_state = state_dir.path().join("vm-state");
        std::fs::create_dir_all(&vm_state).unwrap();
        let env: Vec<(&str, &str)> = opts
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let s = |p: &std::path::Path| p.display().to_string();

        let executor_args = args(&["--vm-state-dir", &s(&vm_state)]);
        let executor =
            ServiceProcess::start_with_env("capsa-executor", &listen("0", &executor_args), &env)
                .await;
        let vm_network = VmNetworkGuard::new();
        let mut vm_pool_args = args(&[
            "--netns",
            &vm_network.netns,
            "--state-dir",
            &s(&vm_state),
            "--image-dir",
            &s(&image),
            "--warm",
            &opts.warm.to_string(),
            "--redis-url",
            &redis.url(),
            "--node-id",
            "e2e-node",
            "--executor-url",
            &executor.url(),
        ]);
        vm_pool_args.extend(opts.vm_pool_args.iter().cloned());
        let vm_pool =
            ServiceProcess::start_with_env("capsa-vm-pool", &listen("0", &vm_pool_args), &env)
                .await;
        let mut meterings = Vec::new();
        for _ in 0..opts.metering_replicas {
            meterings.push(
                ServiceProcess::start_with_env(
                    "capsa-metering",
                    &args(&["--listen", "127.0.0.1:0", "--redis-url", &redis.url()]),
                    &env,
                )
                .await,
            );
        }
        let mut session_managers = Vec::new();
        for _ in 0..opts.replicas {
            session_managers.push(
                ServiceProcess::start_with_env(
                    "capsa-session-manager",
                    &args(&[
                        "--listen",
                        "127.0.0.1:0",
                        "--redis-url",
                        &redis.url(),
                        "--metering-url",
                        &meterings[0].url(),
                    ]),
                    &env,
                )
                .await,
            );
        }
        // vm-pool registers its node just after it starts listening; sessions created before
        // that are UNAVAILABLE ("no node is registered"), so the stack is ready only then.
        let nodes = capsa_store::NodeRegistry::new(
            capsa_store::connect(&redis.url())
                .await
                .expect("connect to redis"),
        );
        capsa_test_support::eventually!(matches!(nodes.get("e2e-node").await, Ok(Some(_))), 30);
        let api_key = create_api_key(&redis.url(), "e2e-tenant");
        Stack {
            session_managers,
            meterings,
            vm_pool,
            executor,
            vm_network,
            redis,
            api_key,
            state_dir,
            executor_args,
            vm_pool_args,
            env: opts.env,
        }
    }

    /// The network namespace vm-pool runs its VMs in (`--netns`).
    pub fn vm_netns(&self) -> &str {
        &self.vm_network.netns
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
        for (name, service) in services {
            exits.push((name, service.terminate(grace).await));
        }
        drop(self.redis);
        Stopped {
            exits,
            state_dir: self.state_dir,
            vm_network: self.vm_network,
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
        let channel = Channel::from_shared(self.session_managers[i].url())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap();
        let bearer = Bearer(format!("Bearer {key}").parse().unwrap());
        SessionServiceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(capsa_proto::limits::MAX_MESSAGE_BYTES)
    }

    /// Another tenant's key, for isolation tests.
    pub fn new_tenant_key(&self, tenant: &str) -> String {
        create_api_key(&self.redis.url(), tenant)
    }
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
    capsa_test_support::eventually!(
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')))
            .unwrap_or(true),
        10
    );
    // The freed port is in the ephemeral range: a client still dialling it (session-manager,
    // metering) can get it as its own source port for a moment (a TCP self-connect), and
    // the restarted service would then fail to bind. std binds with SO_REUSEADDR, as tokio
    // does, so connections of the dead process in TIME_WAIT do not count.
    let addr = service.addr().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = std::net::TcpListener::bind(&addr) {
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

/// A session with the defaults, created through `client`; panics if the create fails.
pub async fn create_default_session(client: &mut Client) -> capsa_proto::session::v1::Session {
    client
        .create_session(capsa_proto::session::v1::CreateSessionRequest::default())
        .await
        .expect("create session")
        .into_inner()
        .session
        .expect("a created session")
}
