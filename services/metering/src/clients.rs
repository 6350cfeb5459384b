//! Calls to the nodes: each node's vm-pool (which VMs are leased, their host-side
//! counters) and executor (what the guest reports of itself). One lazily connecting
//! channel per URL, cached; every call carries the trace context and a deadline, so a
//! node that hangs costs one timeout, not a stuck sampling round.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use capsa_proto::executor::v1::GetGuestStatsRequest;
use capsa_proto::executor::v1::executor_service_client::ExecutorServiceClient;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use capsa_proto::vmpool::v1::{GetVmCountersRequest, GetVmRequest, ListVmsRequest, Vm, VmState};
use capsa_store::NodeRecord;
use capsa_store::usage::Sample;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::Error;

type Propagate = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
type VmPoolClient = VmPoolServiceClient<InterceptedService<Channel, Propagate>>;
type ExecutorClient = ExecutorServiceClient<InterceptedService<Channel, Propagate>>;

pub(crate) const VMPOOL: &str = "vm-pool";
const EXECUTOR: &str = "executor";

/// Who a leased VM's usage is booked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub session_id: String,
    pub tenant_id: String,
    /// Uptime counts from here when vm-pool does not say when it leased the VM (ms).
    pub fallback_lease_ms: i64,
}

/// A sample, and why the guest's part of it is missing, if it is.
#[derive(Debug)]
pub struct Reading {
    pub sample: Sample,
    pub guest_error: Option<Error>,
}

/// Channels to every node metering has talked to. Cheap to share behind an `Arc`.
pub struct NodeClients {
    channels: Mutex<HashMap<String, Channel>>,
    timeout: Duration,
    tls: capsa_grpc::tls::TlsArgs,
}

impl NodeClients {
    /// `timeout` bounds each call (and each connect).
    /// `tls`: mTLS to the node services (this process's certificate and the CA).
    pub fn new(timeout: Duration, tls: capsa_grpc::tls::TlsArgs) -> NodeClients {
        NodeClients {
            channels: Mutex::new(HashMap::new()),
            timeout,
            tls,
        }
    }

    fn channel(&self, service: &'static str, url: &str) -> Result<Channel, Error> {
        let mut channels = self.channels.lock().unwrap();
        if let Some(channel) = channels.get(url) {
            return Ok(channel.clone());
        }
        let identity = match service {
            VMPOOL => capsa_grpc::tls::identity::VM_POOL,
            _ => capsa_grpc::tls::identity::EXECUTOR,
        };
        let endpoint = self
            .tls
            .internal_endpoint(url, identity)
            .map_err(|e| Error::Node {
                service,
                url: url.to_owned(),
                code: tonic::Code::InvalidArgument,
                message: format!("bad url: {e}"),
            })?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        channels.insert(url.to_owned(), channel.clone());
        Ok(channel)
    }

    fn vmpool(&self, node: &NodeRecord) -> Result<VmPoolClient, Error> {
        let channel = self.channel(VMPOOL, &node.vmpool_url)?;
        Ok(VmPoolServiceClient::with_interceptor(
            channel,
            capsa_telemetry::propagate as Propagate,
        ))
    }

    fn executor(&self, node: &NodeRecord) -> Result<ExecutorClient, Error> {
        let channel = self.channel(EXECUTOR, &node.executor_url)?;
        Ok(ExecutorServiceClient::with_interceptor(
            channel,
            capsa_telemetry::propagate as Propagate,
        ))
    }

    /// Forgets the channels of every URL not in `keep` (nodes that left the registry).
    pub fn retain(&self, keep: &HashSet<&str>) {
        self.channels
            .lock()
            .unwrap()
            .retain(|url, _| keep.contains(url.as_str()));
    }

    /// The node's VMs in state LEASED that carry a lease id.
    #[tracing::instrument(skip_all, fields(node = %node.node_id))]
    pub async fn leased_vms(&self, node: &NodeRecord) -> Result<Vec<Vm>, Error> {
        let url = &node.vmpool_url;
        let vms = self
            .vmpool(node)?
            .list_vms(ListVmsRequest {})
            .await
            .map_err(|s| Error::node(VMPOOL, url, &s))?
            .into_inner()
            .vms;
        Ok(vms
            .into_iter()
            .filter(|vm| vm.state() == VmState::Leased && !vm.lease_id.is_empty())
            .collect())
    }

    /// One VM as its vm-pool describes it (NOT_FOUND once destroyed).
    pub async fn get_vm(&self, node: &NodeRecord, vm_id: &str) -> Result<Vm, Error> {
        let url = &node.vmpool_url;
        self.vmpool(node)?
            .get_vm(GetVmRequest {
                vm_id: vm_id.to_owned(),
            })
            .await
            .map_err(|s| Error::node(VMPOOL, url, &s))?
            .into_inner()
            .vm
            .ok_or_else(|| Error::Node {
                service: VMPOOL,
                url: url.clone(),
                code: tonic::Code::Internal,
                message: format!("GetVm({vm_id}) answered without a vm"),
            })
    }

    /// Reads `vm`'s counters from vm-pool, then, if `ask_guest` says so given the VMM's
    /// cpu time, its memory and processes from the guest (through the executor). The
    /// counters are required; the guest's figures are not (a busy or dying guest still has
    /// host-side counters worth keeping, and a sample without them keeps the last ones).
    #[tracing::instrument(skip_all, fields(node = %node.node_id, vm = %vm.id, session = %owner.session_id))]
    pub async fn read(
        &self,
        node: &NodeRecord,
        vm: &Vm,
        owner: &Owner,
        ask_guest: impl FnOnce(Duration) -> bool,
    ) -> Result<Reading, Error> {
        let mut vmpool = self.vmpool(node)?;
        let counters = vmpool
            .get_vm_counters(GetVmCountersRequest {
                vm_id: vm.id.clone(),
            })
            .await
            .map_err(|s| Error::node(VMPOOL, &node.vmpool_url, &s))?
            .into_inner();
        let vmm_cpu = counters
            .cpu_time
            .as_ref()
            .map_or(Duration::ZERO, |d| Duration::from_micros(duration_us(d)));
        let (guest, guest_error) = if ask_guest(vmm_cpu) {
            let asked = self
                .executor(node)?
                .get_guest_stats(GetGuestStatsRequest {
                    vm_id: vm.id.clone(),
                })
                .await;
            match asked {
                Ok(stats) => (Some(stats.into_inner()), None),
                Err(s) => (None, Some(Error::node(EXECUTOR, &node.executor_url, &s))),
            }
        } else {
            (None, None)
        };
        let memory_used_bytes = guest.as_ref().map(|stats| {
            bounded_guest_memory(
                stats.memory_used_bytes,
                u64::from(vm.memory_mib) << 20,
                counters.vmm_resident_bytes,
            )
        });
        let sample_ms = counters
            .sample_time
            .as_ref()
            .map_or_else(now_ms, timestamp_ms);
        let lease_ms = vm
            .lease_time
            .as_ref()
            .map(timestamp_ms)
            .filter(|&ms| ms > 0)
            .unwrap_or(owner.fallback_lease_ms);
        // The lease's own usage: the VM's boot and warm wait are the node's cost.
        let at_lease = counters.at_lease.unwrap_or_default();
        let since_lease = |now: u64, then: u64| now.saturating_sub(then);
        let sample = Sample {
            session_id: owner.session_id.clone(),
            tenant_id: owner.tenant_id.clone(),
            node_id: node.node_id.clone(),
            vm_id: vm.id.clone(),
            sample_ms,
            lease_ms,
            cpu_time_us: since_lease(
                counters.cpu_time.as_ref().map_or(0, duration_us),
                at_lease.cpu_time.as_ref().map_or(0, duration_us),
            ),
            vmm_resident_bytes: counters.vmm_resident_bytes,
            disk_read_bytes: since_lease(counters.disk_read_bytes, at_lease.disk_read_bytes),
            disk_write_bytes: since_lease(counters.disk_write_bytes, at_lease.disk_write_bytes),
            network_rx_bytes: since_lease(counters.network_rx_bytes, at_lease.network_rx_bytes),
            network_tx_bytes: since_lease(counters.network_tx_bytes, at_lease.network_tx_bytes),
            memory_used_bytes,
            processes_running: guest.as_ref().map(|stats| stats.processes_running),
            terminals_open: guest.as_ref().map(|stats| stats.terminals_open),
        };
        Ok(Reading {
            sample,
            guest_error,
        })
    }
}

/// The guest's own memory figure, bounded by what the host knows. Root in the guest can
/// report any number (it reads its own `/proc/meminfo`), but cannot use more than the VM's
/// memory (`vm_memory_bytes`; 0 when unknown) nor more than the host holds resident for the
/// VMM. Memory is billed from the host's figure; this one is information.
fn bounded_guest_memory(reported: u64, vm_memory_bytes: u64, vmm_resident_bytes: u64) -> u64 {
    let mut bounded = reported.min(vmm_resident_bytes);
    if vm_memory_bytes > 0 {
        bounded = bounded.min(vm_memory_bytes);
    }
    if bounded < reported {
        tracing::warn!(
            reported,
            bounded,
            vm_memory_bytes,
            vmm_resident_bytes,
            "guest reports more memory in use than the host holds for it"
        );
    }
    bounded
}

fn timestamp_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

fn duration_us(d: &prost_types::Duration) -> u64 {
    capsa_proto::time::from_duration(d)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// This process' clock, ms since the Unix epoch: only when vm-pool sent no sample time.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_times_convert() {
        assert_eq!(
            timestamp_ms(&prost_types::Timestamp {
                seconds: 2,
                nanos: 345_000_000
            }),
            2345
        );
        assert_eq!(
            duration_us(&prost_types::Duration {
                seconds: 1,
                nanos: 500_000
            }),
            1_000_500
        );
        assert_eq!(
            duration_us(&prost_types::Duration {
                seconds: -1,
                nanos: 0
            }),
            0
        );
    }

    #[test]
    fn a_bad_url_is_a_node_error() {
        let clients = NodeClients::new(Duration::from_secs(1), Default::default());
        let err = clients.channel(VMPOOL, "not a url").unwrap_err();
        assert!(err.to_string().contains("bad url"), "{err}");
    }
}
