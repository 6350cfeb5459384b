//! The agent as a plain process on Unix sockets, reached through a hybrid-vsock proxy the
//! way the executor reaches it in a VM, plus helpers to run code and collect its events.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use capsa_proto::agent::v1 as pb;
use capsa_proto::agent::v1::agent_service_client::AgentServiceClient;
use capsa_proto::common::v1 as common;
use capsa_test_support::{HybridVsockProxy, ServiceProcess};
use tonic::transport::Channel;

pub struct Agent {
    pub process: ServiceProcess,
    proxy: HybridVsockProxy,
    pub dir: tempfile::TempDir,
    pub echo_socket: PathBuf,
}

impl Agent {
    pub async fn start() -> Agent {
        Agent::start_with(&[], &[]).await
    }

    pub async fn start_with(extra: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start_logging(extra, env, Stdio::inherit()).await
    }

    /// [`Agent::start_with`], with the agent's stderr (a VM's serial console) sent to `stderr`.
    pub async fn start_logging(extra: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let grpc = dir.path().join("agent.sock");
        let echo_socket = dir.path().join("echo.sock");
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let mut args: Vec<String> = vec![
            "--listen-unix".into(),
            grpc.display().to_string(),
            "--echo-unix".into(),
            echo_socket.display().to_string(),
            "--workdir".into(),
            work.display().to_string(),
            "--interrupt-grace-ms".into(),
            "1000".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        // A home of its own: a login bash in a test terminal must not run this machine's
        // dotfiles (a pyenv init there once hung every terminal test on a stale lock).
        let home = work.display().to_string();
        // A temp dir of its own too: the agent's scratch dir goes there, and a test that
        // ends by killing the agent (no chance to remove it) leaves nothing in /tmp.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let tmp = tmp.display().to_string();
        let mut env_with_home = vec![("HOME", home.as_str()), ("TMPDIR", tmp.as_str())];
        env_with_home.extend_from_slice(env);
        let process =
            ServiceProcess::start_with_stderr("capsa-agent", &args, &env_with_home, stderr).await;
        assert_eq!(process.addr(), format!("unix:{}", grpc.display()));
        let proxy = HybridVsockProxy::start(&dir.path().join("vm.vsock"), 1024, &grpc);
        Agent {
            process,
            proxy,
            dir,
            echo_socket,
        }
    }

    pub fn workdir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn client(&self) -> AgentServiceClient<Channel> {
        AgentServiceClient::new(capsa_vsock::channel(
            self.proxy.socket_path().to_owned(),
            1024,
        ))
        .max_decoding_message_size(capsa_proto::limits::MAX_MESSAGE_BYTES)
    }
}

pub use capsa_test_support::execute::Outcome;

pub fn spec(language: common::Language, code: &str) -> common::ExecuteSpec {
    common::ExecuteSpec {
        language: language as i32,
        code: code.into(),
        ..Default::default()
    }
}

pub fn secs(s: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s as i64,
        nanos: 0,
    })
}

pub async fn execute(
    client: &mut AgentServiceClient<Channel>,
    spec: common::ExecuteSpec,
) -> Outcome {
    let stream = client
        .execute(pb::ExecuteRequest { spec: Some(spec) })
        .await
        .unwrap()
        .into_inner();
    collect(stream).await
}

pub async fn python(client: &mut AgentServiceClient<Channel>, code: &str) -> Outcome {
    execute(client, spec(common::Language::Python, code)).await
}

pub async fn shell(client: &mut AgentServiceClient<Channel>, code: &str) -> Outcome {
    execute(client, spec(common::Language::Shell, code)).await
}

/// Reads a stream to its end; it must end cleanly, with exactly one completion, last.
pub async fn collect(stream: tonic::Streaming<pb::ExecuteResponse>) -> Outcome {
    // A hang guard, not a timing assertion: every execute here ends far sooner.
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        capsa_test_support::execute::collect(stream),
    )
    .await
    .expect("execute stream hung");
    if let Some(status) = &out.error {
        panic!("execute failed: {status:?}");
    }
    out.completion();
    out
}
