//! Fixtures for session-manager's integration tests: a real redis-server, session-manager
//! replicas as real processes on :0, and node/metering doubles registered in Redis.
#![allow(dead_code)] // each test binary uses a different part of the fixtures

pub mod doubles;

use std::time::Duration;

use capsa_proto::session::v1 as pb;
use capsa_proto::session::v1::session_service_client::SessionServiceClient;
use capsa_store::{ApiKeyStore, NodeRecord, NodeRegistry, SessionStore, StoreConfig};
use capsa_test_support::{RedisServer, ServiceProcess};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use doubles::DoubleServer;

pub type Client = SessionServiceClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization` to every call (or nothing, for the missing-auth tests).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Fields drop in order: replicas first, Redis last.
pub struct Harness {
    pub replicas: Vec<ServiceProcess>,
    /// `--create-rate-per-sec` and `--create-burst` of replicas started from now on:
    /// unlimited in effect, since tests create sessions in bursts (the limit has its own test).
    pub create_limit: (f64, u32),
    /// More flags for replicas started from now on (e.g. `--default-egress`).
    pub extra_args: Vec<String>,
    pub node: DoubleServer,
    pub redis: RedisServer,
    pub key: String,
}

pub const NODE_ID: &str = "node-a";

/// `--node-grace-secs` of every replica: how long a silent, lapsed node is given.
pub const NODE_GRACE: Duration = Duration::from_secs(3);

impl Harness {
    /// Runs an admin command (`create-api-key`, `set-tenant-limits`, ...) of the
    /// session-manager binary against this harness' Redis.
    pub fn admin(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(capsa_test_support::workspace_binary(
            "capsa-session-manager",
        ))
        .args(args)
        .args(["--redis-url", &self.redis.url()])
        .output()
        .unwrap()
    }

    /// Redis, the doubles registered as node `node-a` (capacity 1000), `replicas`
    /// session-managers, and an API key of tenant `t1`.
    pub async fn start(replicas: usize) -> Harness {
        Self::start_with(replicas, true).await
    }

    pub async fn start_with(replicas: usize, register_node: bool) -> Harness {
        let redis = RedisServer::start();
        let node = DoubleServer::start().await;
        if register_node {
            register(&redis, &node, 1000, 0).await;
        }
        let mut h = Harness {
            replicas: Vec::new(),
            create_limit: (10_000.0, 10_000),
            extra_args: Vec::new(),
            node,
            redis,
            key: String::new(),
        };
        for _ in 0..replicas {
            h.add_replica().await;
        }
        h.key = h.new_key("t1").await;
        h
    }

    pub async fn add_replica(&mut self) {
        let args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            &self.redis.url(),
            "--metering-url",
            &self.node.url,
            "--reconcile-interval-ms",
            "300",
            "--claim-ttl-secs",
            "5",
            "--node-grace-secs",
            &NODE_GRACE.as_secs().to_string(),
            "--create-rate-per-sec",
            &self.create_limit.0.to_string(),
            "--create-burst",
            &self.create_limit.1.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(self.extra_args.iter().cloned())
        .collect();
        self.replicas
            .push(ServiceProcess::start("capsa-session-manager", &args).await);
    }

    pub async fn new_key(&self, tenant: &str) -> String {
        let keys = ApiKeyStore::new(capsa_store::connect(&self.redis.url()).await.unwrap());
        keys.create(tenant, "test").await.unwrap().plaintext
    }

    pub async fn store(&self) -> SessionStore {
        SessionStore::new(
            capsa_store::connect(&self.redis.url()).await.unwrap(),
            StoreConfig::default(),
        )
    }

    pub async fn keys(&self) -> ApiKeyStore {
        ApiKeyStore::new(capsa_store::connect(&self.redis.url()).await.unwrap())
    }

    pub async fn client(&self, i: usize) -> Client {
        self.client_with(i, Some(&format!("Bearer {}", self.key)))
            .await
    }

    pub async fn client_with(&self, i: usize, authorization: Option<&str>) -> Client {
        let channel = Channel::from_shared(self.replicas[i].url())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap();
        let bearer = Bearer(authorization.map(|a| a.parse().unwrap()));
        SessionServiceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(capsa_proto::limits::MAX_MESSAGE_BYTES)
    }
}

/// Registers the doubles as node `node-a` for an hour.
pub async fn register(redis: &RedisServer, node: &DoubleServer, capacity: u32, leased: u32) {
    register_for(redis, node, capacity, leased, Duration::from_secs(3600)).await
}

/// Registers the doubles as node `node-a` with a heartbeat that lapses after `ttl`.
pub async fn register_for(
    redis: &RedisServer,
    node: &DoubleServer,
    capacity: u32,
    leased: u32,
    ttl: Duration,
) {
    let reg = NodeRegistry::new(capsa_store::connect(&redis.url()).await.unwrap());
    let rec = NodeRecord {
        node_id: NODE_ID.into(),
        vmpool_url: node.url.clone(),
        executor_url: node.url.clone(),
        engine: "qemu-tcg".into(),
        capacity,
        leased,
        warm: 1,
        templates: vec!["default".into()],
        resources: None,
        heartbeat_ms: 0,
    };
    reg.heartbeat(&rec, ttl).await.unwrap();
}

pub fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

/// Creates a default session and returns it.
pub async fn create(client: &mut Client, lifetime_secs: Option<i64>) -> pb::Session {
    let req = pb::CreateSessionRequest {
        lifetime: lifetime_secs.and_then(secs),
        ..Default::default()
    };
    client
        .create_session(req)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
}

pub async fn get(client: &mut Client, id: &str) -> pb::Session {
    let req = pb::GetSessionRequest {
        session_id: id.into(),
    };
    client
        .get_session(req)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
}
