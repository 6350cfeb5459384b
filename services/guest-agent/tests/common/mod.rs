//! The agent as a plain process on Unix sockets, reached through a hybrid-vsock proxy the
//! way the executor reaches it in a VM, plus helpers to run code and collect its events.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;
use std::time::Duration;

use capsa_proto::agent::v1 as pb;
use capsa_proto::agent::v1::agent_service_client::AgentServiceClient;
use capsa_proto::common::v1 as common;
use capsa_test_support::{HybridVsockProxy, ServiceProcess};
use common::execute_event::Event;
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
        let process = ServiceProcess::start_with_env("capsa-agent", &args, env).await;
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

#[derive(Debug, Default)]
pub struct Outcome {
    pub events: Vec<Event>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub results: Vec<String>,
    pub errors: Vec<common::ExecuteError>,
    pub displays: Vec<common::DisplayData>,
    pub completion: common::Completion,
}

impl Outcome {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn status(&self) -> common::CompletionStatus {
        self.completion.status()
    }
}

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

/// Reads a stream to its end; the completion must be the last event and come exactly once.
pub async fn collect(mut stream: tonic::Streaming<pb::ExecuteResponse>) -> Outcome {
    let mut out = Outcome::default();
    let mut completion = None;
    let read_all = async {
        while let Some(msg) = stream.message().await.unwrap() {
            let event = msg.event.unwrap().event.unwrap();
            assert!(
                completion.is_none(),
                "event after the completion: {event:?}"
            );
            match &event {
                Event::Stdout(c) => out.stdout.extend_from_slice(&c.data),
                Event::Stderr(c) => out.stderr.extend_from_slice(&c.data),
                Event::Result(r) => out
                    .results
                    .push(String::from_utf8(r.data["text/plain"].to_vec()).unwrap()),
                Event::Error(e) => out.errors.push(e.clone()),
                Event::Display(d) => out.displays.push(d.clone()),
                Event::Completion(c) => completion = Some(c.clone()),
            }
            out.events.push(event);
        }
    };
    // A hang guard, not a timing assertion: every execute here ends far sooner.
    tokio::time::timeout(Duration::from_secs(120), read_all)
        .await
        .expect("execute stream hung");
    out.completion = completion.expect("the stream ended without a completion");
    out
}
