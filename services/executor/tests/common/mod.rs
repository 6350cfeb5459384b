//! Fixtures for the executor's integration tests: a node (a temp vm-pool state dir and a
//! real `capsa-executor` process on :0), VMs on it whose hybrid vsock socket is a
//! `HybridVsockProxy` in front of either the real guest agent (`capsa-agent` as a plain
//! process on a Unix socket) or an in-test agent double, and small Execute helpers.
#![allow(dead_code)] // each test binary uses its own subset

pub mod fake_agent;

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsa_proto::common::v1::{ExecuteSpec, Language};
use capsa_proto::executor::v1::executor_service_client::ExecutorServiceClient;
use capsa_proto::executor::v1::{ExecuteRequest, ExecuteResponse};
use capsa_test_support::{HybridVsockProxy, ServiceProcess};
use tonic::transport::Channel;

/// A host: vm-pool's state dir plus a running executor configured with it.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub executor: ServiceProcess,
}

impl Node {
    pub async fn start(extra_args: &[&str]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--vm-state-dir".to_string(),
            dir.path().display().to_string(),
        ];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let executor = ServiceProcess::start("capsa-executor", &args).await;
        Node { dir, executor }
    }

    /// A client with the contract's message limit, as session-manager's.
    pub async fn client(&self) -> ExecutorServiceClient<Channel> {
        ExecutorServiceClient::connect(self.executor.url())
            .await
            .unwrap()
            .max_decoding_message_size(capsa_proto::limits::MAX_MESSAGE_BYTES)
    }

    /// Where vm-pool would put `vm_id`'s socket; its directory is created.
    pub fn vm_socket(&self, vm_id: &str) -> PathBuf {
        let path = capsa_vsock::vm_socket_path(self.dir.path(), vm_id).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        path
    }

    /// Puts a VM `vm_id` on this node whose agent listens on the Unix socket `agent`.
    pub fn add_vm(&self, vm_id: &str, agent: &Path) -> HybridVsockProxy {
        HybridVsockProxy::start(&self.vm_socket(vm_id), capsa_vsock::AGENT_PORT, agent)
    }

    /// The executor's resident memory in bytes (VmRSS).
    pub fn executor_rss(&self) -> u64 {
        rss_of(self.executor.pid())
    }
}

pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// The real guest agent as a plain process serving gRPC on a Unix socket.
pub struct RealAgent {
    pub process: ServiceProcess,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl RealAgent {
    pub async fn start() -> RealAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let args = vec!["--listen-unix".to_string(), socket.display().to_string()];
        // The agent's scratch dir goes inside the test's dir: a killed agent cannot remove it.
        let tmp = dir.path().display().to_string();
        let process =
            ServiceProcess::start_with_env("capsa-agent", &args, &[("TMPDIR", tmp.as_str())]).await;
        RealAgent {
            process,
            socket,
            _dir: dir,
        }
    }
}

pub fn python(code: &str) -> ExecuteSpec {
    ExecuteSpec {
        language: Language::Python as i32,
        code: code.into(),
        ..Default::default()
    }
}

pub fn shell(code: &str) -> ExecuteSpec {
    ExecuteSpec {
        language: Language::Shell as i32,
        code: code.into(),
        ..Default::default()
    }
}

pub fn with_timeout(mut spec: ExecuteSpec, timeout: Duration) -> ExecuteSpec {
    spec.timeout = Some(capsa_proto::time::duration(timeout));
    spec
}

pub async fn start_execute(
    client: &mut ExecutorServiceClient<Channel>,
    vm_id: &str,
    spec: ExecuteSpec,
) -> tonic::Streaming<ExecuteResponse> {
    client
        .execute(ExecuteRequest {
            vm_id: vm_id.into(),
            spec: Some(spec),
        })
        .await
        .expect("execute accepted")
        .into_inner()
}

/// Everything one execute produced, in order, and how it ended.
pub use capsa_test_support::execute::{Outcome as Run, collect};

pub async fn run(
    client: &mut ExecutorServiceClient<Channel>,
    vm_id: &str,
    spec: ExecuteSpec,
) -> Run {
    let stream = start_execute(client, vm_id, spec).await;
    let run = collect(stream).await;
    if let Some(status) = &run.error {
        panic!("execute failed: {status:?}");
    }
    run
}
