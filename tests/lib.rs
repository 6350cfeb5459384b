//! The whole Capsa stack as real processes on one machine, for end-to-end tests and the
//! execute benchmark: a `redis-server`, executor, vm-pool booting real VMs (the engine this
//! machine offers; software-emulated QEMU here), metering and session-manager, each on
//! `127.0.0.1:0`, plus a development API key. Everything stops when the [`Stack`] drops,
//! even when a test fails: vm-pool destroys its VMs on SIGTERM, and the process-group kill
//! in `ServiceProcess` is the backstop.

use std::path::PathBuf;
use std::time::Duration;

use capsa_proto::session::v1::session_service_client::SessionServiceClient;
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
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            warm: 1,
            replicas: 1,
            metering_replicas: 1,
            env: Vec::new(),
        }
    }
}

/// A running stack. Fields drop in declaration order: public API first, Redis last.
pub struct Stack {
    pub session_managers: Vec<ServiceProcess>,
    pub meterings: Vec<ServiceProcess>,
    pub vm_pool: ServiceProcess,
    pub executor: ServiceProcess,
    pub redis: RedisServer,
    pub api_key: String,
    pub state_dir: tempfile::TempDir,
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
        let redis = RedisServer::start();
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

        let executor = ServiceProcess::start_with_env(
            "capsa-executor",
            &args(&["--listen", "127.0.0.1:0", "--vm-state-dir", &s(&vm_state)]),
            &env,
        )
        .await;
        let vm_pool = ServiceProcess::start_with_env(
            "capsa-vm-pool",
            &args(&[
                "--listen",
                "127.0.0.1:0",
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
            ]),
            &env,
        )
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
            redis,
            api_key,
            state_dir,
        }
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
