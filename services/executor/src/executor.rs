//! The executor's domain: Execute relays and the unary agent calls. Transport-free
//! (`grpc.rs` translates); each operation resolves the VM's link first, so a malformed id
//! or a VM on another host fails before anything is sent.
//!
//! An Execute returns its event stream at once; the task behind it waits for the kernel's
//! gate (see [`crate::agents`]), calls the agent under the time-to-first-event limit, then
//! relays with the idle and total limits. Waiting for the gate happens inside the stream
//! so an execute queued behind a long one does not trip its caller's own header deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use capsa_proto::agent::v1 as agent;
use capsa_proto::common::v1::{CompletionStatus, ExecuteEvent, ExecuteSpec, execute_event};
use opentelemetry::KeyValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::agents::{AgentClient, Agents};
use crate::config::Config;
use crate::error::{Error, Limit};
use crate::relay::{CHANNEL_CAPACITY, Outflow, Outlet, Relay, RelayEnd, outlet};
use crate::spec;

/// A stream of events (or one final error) for the client.
pub type EventStream = Outflow<ExecuteEvent>;

/// The limits the executor applies to the guest, from [`Config`].
#[derive(Debug, Clone)]
pub struct Limits {
    pub default_exec_timeout: Duration,
    pub first_event: Duration,
    pub idle: Duration,
    pub grace: Duration,
    pub call: Duration,
    /// Longest wait for the caller to take one item of a stream.
    pub stalled: Duration,
}

impl Limits {
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            default_exec_timeout: config.default_exec_timeout,
            first_event: config.first_event_timeout,
            idle: config.idle_timeout,
            grace: config.stream_grace,
            call: config.call_timeout,
            stalled: config.stalled_client_timeout,
        }
    }

    /// (idle, total) for an execute with this timeout. The guest's own timeout is
    /// authoritative and silent code is legitimate, so the idle limit never undercuts it:
    /// idle = max(configured idle, timeout + grace); total = timeout + grace.
    pub fn for_execute(&self, timeout: Duration) -> (Duration, Duration) {
        let total = timeout + self.grace;
        (self.idle.max(total), total)
    }
}

struct Metrics {
    execute_duration: opentelemetry::metrics::Histogram<f64>,
}

pub struct Executor {
    pub(crate) agents: Agents,
    pub(crate) limits: Limits,
    pub(crate) shutdown: CancellationToken,
    metrics: Metrics,
}

impl Executor {
    pub fn new(config: &Config, shutdown: CancellationToken) -> Arc<Executor> {
        let meter = capsa_telemetry::meter();
        Arc::new(Executor {
            agents: Agents::new(config.vm_state_dir.clone()),
            limits: Limits::from_config(config),
            shutdown,
            metrics: Metrics {
                execute_duration: meter
                    .f64_histogram("capsa.executor.execute.duration")
                    .with_unit("s")
                    .with_description("Execute streams relayed, from request to end")
                    .build(),
            },
        })
    }

    pub fn agents(&self) -> &Agents {
        &self.agents
    }

    /// Validates and starts relaying one execute; see the module doc for the sequence.
    pub fn execute(
        self: &Arc<Self>,
        vm_id: &str,
        spec: Option<ExecuteSpec>,
    ) -> Result<EventStream, Error> {
        let checked = spec::check(spec, self.limits.default_exec_timeout)?;
        let link = self.agents.get(vm_id)?;
        let (tx, rx) = outlet(CHANNEL_CAPACITY);
        let span = tracing::info_span!("execute", vm_id, language = ?checked.language, timeout = ?checked.timeout);
        let this = self.clone();
        tokio::spawn(
            async move {
                let started = Instant::now();
                let gate = link.gate(checked.language);
                let gate = tokio::select! {
                    guard = gate.lock_owned() => guard,
                    () = tx.closed() => return,
                    () = this.shutdown.cancelled() => {
                        tx.fail(Error::ShuttingDown);
                        return;
                    }
                };
                let mut client = link.client();
                let request = agent::ExecuteRequest {
                    spec: Some(checked.spec),
                };
                let call = tokio::select! {
                    r = tokio::time::timeout(this.limits.first_event, client.execute(request)) => r,
                    () = tx.closed() => return,
                };
                let upstream = match call {
                    Ok(Ok(response)) => response.into_inner(),
                    Ok(Err(status)) => {
                        let err = Error::from_agent(&link.vm_id, &status);
                        this.fail(&link.vm_id, tx, err).await;
                        return;
                    }
                    Err(_) => {
                        let err = Error::LimitExceeded {
                            vm_id: link.vm_id.clone(),
                            limit: Limit::FirstEvent,
                            after: this.limits.first_event,
                        };
                        this.fail(&link.vm_id, tx, err).await;
                        return;
                    }
                };
                let (idle, total) = this.limits.for_execute(checked.timeout);
                let relay = Relay {
                    vm_id: link.vm_id.clone(),
                    idle: Some(idle),
                    total: Some(total),
                    stalled: this.limits.stalled,
                    require_final: true,
                    gate: Some(gate),
                    shutdown: this.shutdown.clone(),
                };
                let mut status = None;
                let end = relay
                    .run(upstream, tx, |message: agent::ExecuteResponse| {
                        let event = message.event.unwrap_or_default();
                        let completion = match &event.event {
                            Some(execute_event::Event::Completion(c)) => Some(c.status()),
                            _ => None,
                        };
                        status = status.or(completion);
                        (event, completion.is_some())
                    })
                    .await;
                if end == RelayEnd::Failed {
                    this.agents.recheck(&link.vm_id);
                }
                let elapsed = started.elapsed();
                let status = status
                    .as_ref()
                    .map_or("none", CompletionStatus::as_str_name);
                tracing::info!(?end, status, ?elapsed, "execute relayed");
                this.metrics.execute_duration.record(
                    elapsed.as_secs_f64(),
                    &[
                        KeyValue::new("end", format!("{end:?}")),
                        KeyValue::new("status", status),
                    ],
                );
            }
            .instrument(span),
        );
        Ok(rx)
    }

    async fn fail<T>(&self, vm_id: &str, tx: Outlet<T>, err: Error) {
        tracing::warn!(vm_id, error = %err, "execute could not start");
        if err.is_transport() {
            self.agents.recheck(vm_id);
        }
        tx.fail(err);
    }

    /// One unary agent call under the call limit.
    pub(crate) async fn call<T, F, Fut>(&self, vm_id: &str, f: F) -> Result<T, Error>
    where
        F: FnOnce(AgentClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_within(vm_id, self.limits.call, f).await
    }

    /// One unary agent call that may take up to `limit` (a call that waits in the guest).
    pub(crate) async fn call_within<T, F, Fut>(
        &self,
        vm_id: &str,
        limit: Duration,
        f: F,
    ) -> Result<T, Error>
    where
        F: FnOnce(AgentClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let link = self.agents.get(vm_id)?;
        let result = match tokio::time::timeout(limit, f(link.client())).await {
            Ok(Ok(response)) => return Ok(response.into_inner()),
            Ok(Err(status)) => Error::from_agent(vm_id, &status),
            Err(_) => Error::LimitExceeded {
                vm_id: vm_id.to_owned(),
                limit: Limit::Call,
                after: limit,
            },
        };
        if result.is_transport() {
            self.agents.recheck(vm_id);
        }
        Err(result)
    }

    #[tracing::instrument(skip_all, fields(vm_id, entries = env.len()))]
    pub async fn configure(
        &self,
        vm_id: &str,
        env: std::collections::HashMap<String, String>,
    ) -> Result<(), Error> {
        spec::check_env("env", &env)?;
        self.call(vm_id, |mut c| async move {
            c.configure(agent::ConfigureRequest { env }).await
        })
        .await
        .map(|_| ())
    }

    #[tracing::instrument(skip(self))]
    pub async fn list_files(
        &self,
        vm_id: &str,
        path: String,
    ) -> Result<agent::ListFilesResponse, Error> {
        self.call(vm_id, |mut c| async move {
            c.list_files(agent::ListFilesRequest { path }).await
        })
        .await
    }

    #[tracing::instrument(skip(self))]
    pub async fn file_info(
        &self,
        vm_id: &str,
        path: String,
    ) -> Result<agent::GetFileInfoResponse, Error> {
        self.call(vm_id, |mut c| async move {
            c.get_file_info(agent::GetFileInfoRequest { path }).await
        })
        .await
    }

    #[tracing::instrument(skip(self))]
    pub async fn make_directory(
        &self,
        vm_id: &str,
        path: String,
        mode: u32,
    ) -> Result<agent::MakeDirectoryResponse, Error> {
        self.call(vm_id, |mut c| async move {
            c.make_directory(agent::MakeDirectoryRequest { path, mode })
                .await
        })
        .await
    }

    #[tracing::instrument(skip(self))]
    pub async fn remove_file(
        &self,
        vm_id: &str,
        path: String,
        recursive: bool,
    ) -> Result<(), Error> {
        self.call(vm_id, |mut c| async move {
            c.remove_file(agent::RemoveFileRequest { path, recursive })
                .await
        })
        .await
        .map(|_| ())
    }

    #[tracing::instrument(skip(self))]
    pub async fn guest_stats(&self, vm_id: &str) -> Result<agent::GetStatsResponse, Error> {
        self.call(vm_id, |mut c| async move {
            c.get_stats(agent::GetStatsRequest {}).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_never_undercuts_the_execute_timeout() {
        let limits = Limits {
            default_exec_timeout: Duration::from_secs(60),
            first_event: Duration::from_secs(30),
            idle: Duration::from_secs(60),
            grace: Duration::from_secs(15),
            call: Duration::from_secs(30),
            stalled: Duration::from_secs(30),
        };
        assert_eq!(
            limits.for_execute(Duration::from_secs(10)),
            (Duration::from_secs(60), Duration::from_secs(25))
        );
        assert_eq!(
            limits.for_execute(Duration::from_secs(600)),
            (Duration::from_secs(615), Duration::from_secs(615))
        );
    }
}
