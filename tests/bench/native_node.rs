//! The node of `capsa-exec-bench --engine native`: Capsa's own path with no emulation. Redis,
//! metering, executor and session-manager run as real processes; vm-pool is replaced by
//! [`NativePool`], served in this process, whose "VM" is a guest agent running as a plain
//! host process (`capsa-agent --listen-unix`) behind a hybrid-vsock socket at the path the
//! executor dials, as a VMM would expose it. A bench seam only: the agent runs with the
//! host's network and files, so it runs nothing but the bench's own code, and this is no
//! product mode (vm-pool has no such engine).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use capsa_proto::common::v1::EgressPolicy;
use capsa_proto::time;
use capsa_proto::vmpool::v1 as vp;
use capsa_proto::vmpool::v1::vm_pool_service_server::{VmPoolService, VmPoolServiceServer};
use capsa_store::{ApiKeyStore, NodeRecord, NodeRegistry};
use capsa_test_support::{GrpcDouble, HybridVsockProxy, RedisServer, ServiceProcess};
use tonic::service::Routes;
use tonic::{Request, Response, Status};

/// The agent's raw echo port (beside gRPC on `capsa_vsock::AGENT_PORT`).
pub const ECHO_PORT: u32 = 1025;
pub const ENGINE: &str = "native";
const NODE_ID: &str = "native-bench";
const TEMPLATE: &str = "default";
/// Agents this node runs at once (the bench needs one).
const CAPACITY: u32 = 16;
const HEARTBEAT_TTL: Duration = Duration::from_secs(30);

/// Redis, metering, executor and session-manager as processes, and the in-process pool,
/// registered as node `native-bench`. Everything stops on drop, agents first.
pub struct NativeNode {
    pub session_manager: ServiceProcess,
    _metering: ServiceProcess,
    pub executor: ServiceProcess,
    heartbeat: tokio::task::JoinHandle<()>,
    pool_server: GrpcDouble,
    pool: NativePool,
    _redis: RedisServer,
    pub api_key: String,
    /// The executor's `--vm-state-dir`; each VM's hybrid-vsock socket is under it.
    pub state_dir: tempfile::TempDir,
}

impl NativeNode {
    pub async fn start() -> NativeNode {
        let redis = RedisServer::start();
        let state_dir = tempfile::Builder::new()
            .prefix("capsa-native-")
            .tempdir()
            .unwrap();
        let executor = ServiceProcess::start(
            "capsa-executor",
            &args(&[
                "--listen",
                "127.0.0.1:0",
                "--vm-state-dir",
                &state_dir.path().display().to_string(),
            ]),
        )
        .await;
        let pool = NativePool {
            state_dir: state_dir.path().to_owned(),
            vms: Arc::default(),
        };
        let pool_server =
            GrpcDouble::start(Routes::new(VmPoolServiceServer::new(pool.clone()))).await;
        let registry = NodeRegistry::new(
            capsa_store::connect(&redis.url())
                .await
                .expect("connect to redis"),
        );
        let record = NodeRecord {
            node_id: NODE_ID.into(),
            vmpool_url: pool_server.url(),
            executor_url: executor.url(),
            engine: ENGINE.into(),
            capacity: CAPACITY,
            leased: 0,
            warm: 0,
            templates: vec![TEMPLATE.into()],
            resources: None,
            heartbeat_ms: 0,
        };
        beat(&registry, &record, &pool).await;
        let heartbeat = {
            let pool = pool.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(HEARTBEAT_TTL / 3).await;
                    beat(&registry, &record, &pool).await;
                }
            })
        };
        let metering = ServiceProcess::start(
            "capsa-metering",
            &args(&["--listen", "127.0.0.1:0", "--redis-url", &redis.url()]),
        )
        .await;
        let session_manager = ServiceProcess::start(
            "capsa-session-manager",
            &args(&[
                "--listen",
                "127.0.0.1:0",
                "--redis-url",
                &redis.url(),
                "--metering-url",
                &metering.url(),
            ]),
        )
        .await;
        let keys = ApiKeyStore::new(capsa_store::connect(&redis.url()).await.unwrap());
        let api_key = keys
            .create("bench-tenant", "bench")
            .await
            .expect("create api key")
            .plaintext;
        NativeNode {
            session_manager,
            _metering: metering,
            executor,
            heartbeat,
            pool_server,
            pool,
            _redis: redis,
            api_key,
            state_dir,
        }
    }
}

impl NativeNode {
    /// The URL of the in-process VmPoolService.
    pub fn vmpool_url(&self) -> String {
        self.pool_server.url()
    }
}

impl Drop for NativeNode {
    fn drop(&mut self) {
        self.heartbeat.abort();
        // The server's connection tasks may still hold the pool: end its agents now.
        self.pool
            .vms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }
}

/// Writes the node's record with its current lease count.
async fn beat(registry: &NodeRegistry, record: &NodeRecord, pool: &NativePool) {
    let mut rec = record.clone();
    rec.leased = pool.vms.lock().unwrap().len() as u32;
    rec.heartbeat_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    registry
        .heartbeat(&rec, HEARTBEAT_TTL)
        .await
        .expect("register the native node");
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// VmPoolService whose VMs are host agents, one per lease, started on AcquireVm and killed on
/// ReleaseVm. No warm pool: every acquire starts an agent.
#[derive(Clone)]
pub struct NativePool {
    state_dir: PathBuf,
    vms: Arc<Mutex<HashMap<String, NativeVm>>>,
}

/// One leased agent. Dropping it kills the agent (its process group) and removes its
/// hybrid-vsock socket.
struct NativeVm {
    vm: vp::Vm,
    /// `/proc` counters of the agent when it was leased (right after it started).
    at_lease: Counters,
    agent: ServiceProcess,
    _proxy: HybridVsockProxy,
    /// The agent's sockets, HOME and working dir.
    _dir: tempfile::TempDir,
    socket_dir: PathBuf,
}

impl Drop for NativeVm {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.socket_dir);
    }
}

/// Whether `policy` admits nothing. The agent has the host's network, so the node cannot
/// enforce a policy that admits something; it refuses those instead of pretending.
fn admits_nothing(policy: Option<&EgressPolicy>) -> bool {
    policy.is_none_or(|p| {
        p.deny_all
            || (!p.allow_package_managers
                && p.allowed_domains.is_empty()
                && p.allowed_cidrs.is_empty())
    })
}

const EGRESS_REFUSED: &str = "egress: the native bench node runs agents on the host's network and \
                              cannot enforce a policy that admits anything";

/// CPU time and resident memory of the agent's process group (the agent and its kernels),
/// what a VMM's counters cover for a VM.
#[derive(Clone, Copy, Default)]
struct Counters {
    cpu: Duration,
    resident_bytes: u64,
}

fn counters(pgid: u32) -> Counters {
    let mut total = Counters::default();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return total;
    };
    let pids = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    for pid in pids.filter(|&pid| capsa_vmm::process_group(pid) == Some(pgid)) {
        // A process that ended in between simply counts no more.
        total.cpu += capsa_vmm::cpu_time(pid).unwrap_or_default();
        total.resident_bytes += capsa_vmm::resident_bytes(pid).unwrap_or(0);
    }
    total
}

impl NativePool {
    /// Starts an agent for `lease_id` behind its hybrid-vsock socket.
    async fn boot(&self, vm_id: &str, lease_id: &str) -> NativeVm {
        let started = Instant::now();
        let boot_time = SystemTime::now();
        let dir = tempfile::Builder::new()
            .prefix("capsa-native-agent-")
            .tempdir()
            .unwrap();
        let grpc = dir.path().join("agent.sock");
        let echo = dir.path().join("echo.sock");
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let s = |p: &Path| p.display().to_string();
        let agent = ServiceProcess::start_with_env(
            "capsa-agent",
            &args(&[
                "--listen-unix",
                &s(&grpc),
                "--echo-unix",
                &s(&echo),
                "--workdir",
                &s(&home),
            ]),
            // TMPDIR too: the agent's scratch dir goes in this dir, which is removed even
            // when the agent is killed.
            &[("HOME", &s(&home)), ("TMPDIR", &s(dir.path()))],
        )
        .await;
        let vm_socket = capsa_vsock::vm_socket_path(&self.state_dir, vm_id).expect("vm id");
        let socket_dir = vm_socket.parent().unwrap().to_owned();
        std::fs::create_dir_all(&socket_dir).unwrap();
        let proxy = HybridVsockProxy::start_ports(
            &vm_socket,
            &[(capsa_vsock::AGENT_PORT, &grpc), (ECHO_PORT, &echo)],
        );
        let at_lease = counters(agent.pid());
        let vm = vp::Vm {
            id: vm_id.into(),
            template: TEMPLATE.into(),
            vcpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_mib: u32::try_from(capsa_vmm::host_memory_mib()).unwrap_or(u32::MAX),
            state: vp::VmState::Leased as i32,
            lease_id: lease_id.into(),
            engine: ENGINE.into(),
            vmm_pid: agent.pid(),
            boot_time: Some(time::timestamp(boot_time)),
            boot_duration: Some(time::duration(started.elapsed())),
            lease_time: Some(time::timestamp(SystemTime::now())),
            failure: String::new(),
        };
        NativeVm {
            vm,
            at_lease,
            agent,
            _proxy: proxy,
            _dir: dir,
            socket_dir,
        }
    }

    fn leased_vm(&self, lease_id: &str) -> Option<vp::Vm> {
        let vms = self.vms.lock().unwrap();
        vms.values()
            .find(|v| v.vm.lease_id == lease_id)
            .map(|v| v.vm.clone())
    }
}

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl VmPoolService for NativePool {
    async fn acquire_vm(
        &self,
        req: Request<vp::AcquireVmRequest>,
    ) -> Result<Response<vp::AcquireVmResponse>, Status> {
        let req = req.into_inner();
        if req.lease_id.is_empty() {
            return Err(Status::invalid_argument("lease_id is required"));
        }
        if !req.template.is_empty() && req.template != TEMPLATE {
            return Err(Status::not_found(format!(
                "template: {:?} is not offered by the native bench node (only {TEMPLATE:?})",
                req.template
            )));
        }
        if !admits_nothing(req.egress.as_ref()) {
            return Err(Status::failed_precondition(EGRESS_REFUSED));
        }
        if let Some(vm) = self.leased_vm(&req.lease_id) {
            return Ok(Response::new(vp::AcquireVmResponse {
                vm: Some(vm),
                warm_hit: false,
            }));
        }
        if self.vms.lock().unwrap().len() >= CAPACITY as usize {
            return Err(Status::resource_exhausted(format!(
                "the native bench node runs at most {CAPACITY} agents"
            )));
        }
        // The lease id is unique per session, and so is a VM id made of it.
        let vm_id = format!("native-{}", req.lease_id);
        let booted = self.boot(&vm_id, &req.lease_id).await;
        let mut vms = self.vms.lock().unwrap();
        let vm = vms.entry(vm_id).or_insert(booted).vm.clone();
        Ok(Response::new(vp::AcquireVmResponse {
            vm: Some(vm),
            warm_hit: false,
        }))
    }

    async fn release_vm(
        &self,
        req: Request<vp::ReleaseVmRequest>,
    ) -> Result<Response<vp::ReleaseVmResponse>, Status> {
        let id = req.into_inner().vm_id;
        let gone = self.vms.lock().unwrap().remove(&id);
        let released = gone.is_some();
        drop(gone); // kills the agent, removes the socket
        Ok(Response::new(vp::ReleaseVmResponse { released }))
    }

    async fn get_vm(
        &self,
        req: Request<vp::GetVmRequest>,
    ) -> Result<Response<vp::GetVmResponse>, Status> {
        let id = req.into_inner().vm_id;
        match self.vms.lock().unwrap().get(&id) {
            Some(v) => Ok(Response::new(vp::GetVmResponse {
                vm: Some(v.vm.clone()),
            })),
            None => Err(Status::not_found(format!("vm_id: vm {id} not found"))),
        }
    }

    async fn list_vms(
        &self,
        _: Request<vp::ListVmsRequest>,
    ) -> Result<Response<vp::ListVmsResponse>, Status> {
        let vms = self.vms.lock().unwrap();
        Ok(Response::new(vp::ListVmsResponse {
            vms: vms.values().map(|v| v.vm.clone()).collect(),
        }))
    }

    type WatchVmStream = BoxStream<vp::WatchVmResponse>;

    async fn watch_vm(
        &self,
        _: Request<vp::WatchVmRequest>,
    ) -> Result<Response<Self::WatchVmStream>, Status> {
        Err(Status::unimplemented(
            "WatchVm: the native bench node does not offer it (nothing on the bench's path watches)",
        ))
    }

    async fn get_vm_counters(
        &self,
        req: Request<vp::GetVmCountersRequest>,
    ) -> Result<Response<vp::GetVmCountersResponse>, Status> {
        let id = req.into_inner().vm_id;
        let (pid, at_lease) = match self.vms.lock().unwrap().get(&id) {
            Some(v) => (v.agent.pid(), v.at_lease),
            None => return Err(Status::not_found(format!("vm_id: vm {id} not found"))),
        };
        let now = counters(pid);
        let cpu = |d: Duration| Some(time::duration(d));
        Ok(Response::new(vp::GetVmCountersResponse {
            vm_id: id,
            cpu_time: cpu(now.cpu),
            vmm_resident_bytes: now.resident_bytes,
            sample_time: Some(time::timestamp(SystemTime::now())),
            at_lease: Some(vp::CountersAtLease {
                cpu_time: cpu(at_lease.cpu),
                ..Default::default()
            }),
            // No disk or network of its own: the agent uses the host's.
            ..Default::default()
        }))
    }

    async fn get_node_info(
        &self,
        _: Request<vp::GetNodeInfoRequest>,
    ) -> Result<Response<vp::GetNodeInfoResponse>, Status> {
        Ok(Response::new(vp::GetNodeInfoResponse {
            node_id: NODE_ID.into(),
            engine: ENGINE.into(),
            engine_reason: "capsa-exec-bench --engine native: agents run as host processes".into(),
            leased: self.vms.lock().unwrap().len() as u32,
            capacity: CAPACITY,
            pools: Vec::new(),
        }))
    }

    async fn set_egress_policy(
        &self,
        req: Request<vp::SetEgressPolicyRequest>,
    ) -> Result<Response<vp::SetEgressPolicyResponse>, Status> {
        let req = req.into_inner();
        if !self.vms.lock().unwrap().contains_key(&req.vm_id) {
            return Err(Status::not_found(format!(
                "vm_id: vm {} not found",
                req.vm_id
            )));
        }
        if !admits_nothing(req.egress.as_ref()) {
            return Err(Status::failed_precondition(EGRESS_REFUSED));
        }
        Ok(Response::new(vp::SetEgressPolicyResponse {}))
    }

    async fn suspend_vm(
        &self,
        _: Request<vp::SuspendVmRequest>,
    ) -> Result<Response<vp::SuspendVmResponse>, Status> {
        Err(Status::unimplemented(NO_SNAPSHOTS))
    }

    async fn snapshot_vm(
        &self,
        _: Request<vp::SnapshotVmRequest>,
    ) -> Result<Response<vp::SnapshotVmResponse>, Status> {
        Err(Status::unimplemented(NO_SNAPSHOTS))
    }

    async fn resume_vm(
        &self,
        _: Request<vp::ResumeVmRequest>,
    ) -> Result<Response<vp::ResumeVmResponse>, Status> {
        Err(Status::unimplemented(NO_SNAPSHOTS))
    }

    async fn get_snapshot(
        &self,
        _: Request<vp::GetSnapshotRequest>,
    ) -> Result<Response<vp::GetSnapshotResponse>, Status> {
        Err(Status::unimplemented(NO_SNAPSHOTS))
    }

    async fn list_snapshots(
        &self,
        _: Request<vp::ListSnapshotsRequest>,
    ) -> Result<Response<vp::ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented(NO_SNAPSHOTS))
    }

    async fn delete_snapshot(
        &self,
        _: Request<vp::DeleteSnapshotRequest>,
    ) -> Result<Response<vp::DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented(NO_SNAPSHOTS))
    }
}

/// A host process cannot be saved and restored: the native bench node has no snapshots.
const NO_SNAPSHOTS: &str =
    "snapshots: the native bench node's agents are host processes, which it cannot suspend";
