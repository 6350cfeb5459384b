//! Fixtures for metering's integration tests: a fake node (vm-pool + executor doubles on
//! one tonic server on :0, answering with counters the test scripts), sessions in a real
//! Redis, metering replicas as real processes, and readers of the usage-record stream.
//! Everything stops on drop, even when a test panics.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use capsa_proto::executor::v1 as ex;
use capsa_proto::executor::v1::executor_service_server::{ExecutorService, ExecutorServiceServer};
use capsa_proto::metering::v1::metering_service_client::MeteringServiceClient;
use capsa_proto::metering::v1::{GetSessionUsageRequest, GetTenantUsageRequest};
use capsa_proto::vmpool::v1 as vp;
use capsa_proto::vmpool::v1::vm_pool_service_server::{VmPoolService, VmPoolServiceServer};
use capsa_store::{NewSession, NodeRecord, NodeRegistry, SessionStore, StoreConfig, Transition};
use capsa_test_support::{RedisServer, ServiceProcess};
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

pub const MIB: u64 = 1024 * 1024;

/// Host and guest numbers of one fake VM, as the test sets them.
#[derive(Debug, Clone, Default)]
pub struct VmState {
    pub lease_id: String,
    pub lease_ms: i64,
    pub cpu: Duration,
    pub vmm_resident_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    /// `None`: GetGuestStats fails.
    pub memory_used_bytes: Option<u64>,
    /// What GetGuestStats reports of background processes and terminals.
    pub processes_running: u32,
    pub terminals_open: u32,
    /// What vm-pool reports as the counters at lease time.
    pub at_lease: Option<vp::CountersAtLease>,
}

#[derive(Clone, Default)]
struct Shared {
    vms: Arc<Mutex<HashMap<String, VmState>>>,
    counter_calls: Arc<AtomicUsize>,
    /// GetVmCounters never answers (a hung node).
    hang: Arc<AtomicBool>,
}

/// vm-pool and executor doubles for one node.
pub struct FakeNode {
    pub node_id: String,
    pub url: String,
    shared: Shared,
    _server: capsa_test_support::GrpcDouble,
}

impl FakeNode {
    pub async fn start(node_id: &str) -> FakeNode {
        let shared = Shared::default();
        let server = capsa_test_support::GrpcDouble::start(
            tonic::service::Routes::new(VmPoolServiceServer::new(shared.clone()))
                .add_service(ExecutorServiceServer::new(shared.clone())),
        )
        .await;
        FakeNode {
            node_id: node_id.into(),
            url: server.url(),
            shared,
            _server: server,
        }
    }

    pub fn record(&self) -> NodeRecord {
        NodeRecord {
            node_id: self.node_id.clone(),
            vmpool_url: self.url.clone(),
            executor_url: self.url.clone(),
            engine: "fake".into(),
            capacity: 100,
            leased: 0,
            warm: 0,
            templates: vec!["default".into()],
            resources: None,
            heartbeat_ms: 1,
        }
    }

    /// Adds or replaces a VM.
    pub fn set_vm(&self, vm_id: &str, state: VmState) {
        self.shared.vms.lock().unwrap().insert(vm_id.into(), state);
    }

    /// Changes a VM's numbers in place.
    pub fn update(&self, vm_id: &str, f: impl FnOnce(&mut VmState)) {
        f(self
            .shared
            .vms
            .lock()
            .unwrap()
            .get_mut(vm_id)
            .expect("known vm"));
    }

    /// The VM is destroyed: vm-pool no longer lists or knows it.
    pub fn remove_vm(&self, vm_id: &str) {
        self.shared.vms.lock().unwrap().remove(vm_id);
    }

    /// From now on GetVmCounters never answers.
    pub fn hang(&self) {
        self.shared.hang.store(true, Ordering::SeqCst);
    }

    /// How many GetVmCounters calls were answered (to wait for sampling rounds).
    pub fn counter_calls(&self) -> usize {
        self.shared.counter_calls.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` more GetVmCounters calls have been answered.
    pub async fn wait_for_samples(&self, n: usize) {
        let target = self.counter_calls() + n;
        capsa_test_support::eventually!(self.counter_calls() >= target);
    }
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    capsa_proto::time::timestamp_ms(ms)
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

impl Shared {
    fn vm(&self, vm_id: &str) -> Result<VmState, Status> {
        self.vms
            .lock()
            .unwrap()
            .get(vm_id)
            .cloned()
            .ok_or_else(|| Status::not_found("no such vm"))
    }
}

fn proto_vm(id: &str, s: &VmState) -> vp::Vm {
    vp::Vm {
        id: id.into(),
        state: vp::VmState::Leased as i32,
        lease_id: s.lease_id.clone(),
        engine: "fake".into(),
        lease_time: Some(timestamp(s.lease_ms)),
        ..Default::default()
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl VmPoolService for Shared {
    async fn acquire_vm(
        &self,
        _: Request<vp::AcquireVmRequest>,
    ) -> Result<Response<vp::AcquireVmResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn release_vm(
        &self,
        _: Request<vp::ReleaseVmRequest>,
    ) -> Result<Response<vp::ReleaseVmResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_vm(
        &self,
        r: Request<vp::GetVmRequest>,
    ) -> Result<Response<vp::GetVmResponse>, Status> {
        let id = r.into_inner().vm_id;
        let vm = self.vm(&id)?;
        Ok(Response::new(vp::GetVmResponse {
            vm: Some(proto_vm(&id, &vm)),
        }))
    }
    async fn list_vms(
        &self,
        _: Request<vp::ListVmsRequest>,
    ) -> Result<Response<vp::ListVmsResponse>, Status> {
        let vms = self.vms.lock().unwrap();
        let mut list: Vec<vp::Vm> = vms.iter().map(|(id, s)| proto_vm(id, s)).collect();
        // A warm VM: never sampled, since no session holds it.
        list.push(vp::Vm {
            id: "warm-1".into(),
            state: vp::VmState::Warm as i32,
            ..Default::default()
        });
        Ok(Response::new(vp::ListVmsResponse { vms: list }))
    }
    type WatchVmStream = BoxStream<vp::WatchVmResponse>;
    async fn watch_vm(
        &self,
        _: Request<vp::WatchVmRequest>,
    ) -> Result<Response<Self::WatchVmStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_vm_counters(
        &self,
        r: Request<vp::GetVmCountersRequest>,
    ) -> Result<Response<vp::GetVmCountersResponse>, Status> {
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let id = r.into_inner().vm_id;
        let s = self.vm(&id)?;
        self.counter_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(vp::GetVmCountersResponse {
            vm_id: id,
            cpu_time: Some(capsa_proto::time::duration(s.cpu)),
            vmm_resident_bytes: s.vmm_resident_bytes,
            disk_read_bytes: s.disk_read_bytes,
            disk_write_bytes: s.disk_write_bytes,
            network_rx_bytes: s.network_rx_bytes,
            network_tx_bytes: s.network_tx_bytes,
            sample_time: Some(timestamp(now_ms())),
            at_lease: s.at_lease,
        }))
    }
    async fn get_node_info(
        &self,
        _: Request<vp::GetNodeInfoRequest>,
    ) -> Result<Response<vp::GetNodeInfoResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_egress_policy(
        &self,
        _: Request<vp::SetEgressPolicyRequest>,
    ) -> Result<Response<vp::SetEgressPolicyResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn suspend_vm(
        &self,
        _: Request<vp::SuspendVmRequest>,
    ) -> Result<Response<vp::SuspendVmResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn resume_vm(
        &self,
        _: Request<vp::ResumeVmRequest>,
    ) -> Result<Response<vp::ResumeVmResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn snapshot_vm(
        &self,
        _: Request<vp::SnapshotVmRequest>,
    ) -> Result<Response<vp::SnapshotVmResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_snapshot(
        &self,
        _: Request<vp::GetSnapshotRequest>,
    ) -> Result<Response<vp::GetSnapshotResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_snapshots(
        &self,
        _: Request<vp::ListSnapshotsRequest>,
    ) -> Result<Response<vp::ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_snapshot(
        &self,
        _: Request<vp::DeleteSnapshotRequest>,
    ) -> Result<Response<vp::DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

#[tonic::async_trait]
impl ExecutorService for Shared {
    async fn configure_vm(
        &self,
        _: Request<ex::ConfigureVmRequest>,
    ) -> Result<Response<ex::ConfigureVmResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type ExecuteStream = BoxStream<ex::ExecuteResponse>;
    async fn execute(
        &self,
        _: Request<ex::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn upload_file(
        &self,
        _: Request<tonic::Streaming<ex::UploadFileRequest>>,
    ) -> Result<Response<ex::UploadFileResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type DownloadFileStream = BoxStream<ex::DownloadFileResponse>;
    async fn download_file(
        &self,
        _: Request<ex::DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_files(
        &self,
        _: Request<ex::ListFilesRequest>,
    ) -> Result<Response<ex::ListFilesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_file_info(
        &self,
        _: Request<ex::GetFileInfoRequest>,
    ) -> Result<Response<ex::GetFileInfoResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn make_directory(
        &self,
        _: Request<ex::MakeDirectoryRequest>,
    ) -> Result<Response<ex::MakeDirectoryResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn remove_file(
        &self,
        _: Request<ex::RemoveFileRequest>,
    ) -> Result<Response<ex::RemoveFileResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_guest_stats(
        &self,
        r: Request<ex::GetGuestStatsRequest>,
    ) -> Result<Response<ex::GetGuestStatsResponse>, Status> {
        let s = self.vm(&r.into_inner().vm_id)?;
        let used = s
            .memory_used_bytes
            .ok_or_else(|| Status::unavailable("guest silent"))?;
        Ok(Response::new(ex::GetGuestStatsResponse {
            memory_total_bytes: 1024 * MIB,
            memory_used_bytes: used,
            process_count: 3,
            uptime_ms: 1000,
            processes_running: s.processes_running,
            terminals_open: s.terminals_open,
        }))
    }
    async fn start_process(
        &self,
        _: Request<ex::StartProcessRequest>,
    ) -> Result<Response<ex::StartProcessResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_processes(
        &self,
        _: Request<ex::ListProcessesRequest>,
    ) -> Result<Response<ex::ListProcessesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn wait_process(
        &self,
        _: Request<ex::WaitProcessRequest>,
    ) -> Result<Response<ex::WaitProcessResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn signal_process(
        &self,
        _: Request<ex::SignalProcessRequest>,
    ) -> Result<Response<ex::SignalProcessResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn write_stdin(
        &self,
        _: Request<ex::WriteStdinRequest>,
    ) -> Result<Response<ex::WriteStdinResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type AttachProcessStream = BoxStream<ex::AttachProcessResponse>;
    async fn attach_process(
        &self,
        _: Request<ex::AttachProcessRequest>,
    ) -> Result<Response<Self::AttachProcessStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type OpenTerminalStream = BoxStream<ex::OpenTerminalResponse>;
    async fn open_terminal(
        &self,
        _: Request<tonic::Streaming<ex::OpenTerminalRequest>>,
    ) -> Result<Response<Self::OpenTerminalStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type ConnectPortStream = BoxStream<ex::ConnectPortResponse>;
    async fn connect_port(
        &self,
        _: Request<tonic::Streaming<ex::ConnectPortRequest>>,
    ) -> Result<Response<Self::ConnectPortStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Redis, the node registry and the session store.
pub struct World {
    pub redis: RedisServer,
    pub conn: capsa_store::Connection,
    pub sessions: SessionStore,
    pub registry: NodeRegistry,
}

impl World {
    pub async fn start() -> World {
        let redis = RedisServer::start();
        let conn = capsa_store::connect(&redis.url()).await.unwrap();
        World {
            sessions: SessionStore::new(conn.clone(), StoreConfig::default()),
            registry: NodeRegistry::new(conn.clone()),
            conn,
            redis,
        }
    }

    pub async fn register(&self, node: &FakeNode) {
        self.registry
            .heartbeat(&node.record(), Duration::from_secs(600))
            .await
            .unwrap();
    }

    /// A session of `tenant`, created and (if `vm` is given) active on `node`'s `vm`.
    pub async fn session(&self, id: &str, tenant: &str, on: Option<(&FakeNode, &str)>) {
        let new = NewSession {
            id: id.into(),
            tenant_id: tenant.into(),
            template: "default".into(),
            vcpus: 1,
            memory_mib: 512,
            env_names: Vec::new(),
            metadata: BTreeMap::new(),
            lifetime: Duration::from_secs(3600),
            egress: capsa_egress::EgressPolicy::none(),
            auto_suspend: false,
            auto_resume: false,
            source_snapshot_id: String::new(),
            parent_session_id: String::new(),
        };
        assert!(matches!(
            self.sessions.create(&new, 1000).await.unwrap(),
            capsa_store::Created::Ok(_)
        ));
        if let Some((node, vm)) = on {
            let t = self
                .sessions
                .activate(
                    id,
                    &node.node_id,
                    &capsa_store::VmShape {
                        id: vm,
                        vcpus: 1,
                        memory_mib: 512,
                    },
                )
                .await
                .unwrap();
            assert!(matches!(t, Transition::Won(_)), "{t:?}");
        }
    }

    /// Starts a metering replica with `args` added to listen/redis.
    pub async fn metering(&self, args: &[&str]) -> ServiceProcess {
        let mut all: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--redis-url".into(),
            self.redis.url(),
            // The fake node's cpu times stand still while the tests change its guest's
            // figures: ask the guest every round, as for a busy VM.
            "--guest-idle-interval".into(),
            "1ms".into(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        ServiceProcess::start("capsa-metering", &all).await
    }

    /// Ends a session the way session-manager's teardown does, minus FinalizeSession.
    pub async fn end_session(&self, id: &str) {
        let t = self
            .sessions
            .begin_end(id, capsa_store::EndReason::Deleted, "", None)
            .await;
        assert!(matches!(t.unwrap(), Transition::Won(_)));
        let t = self.sessions.finish_end(id, "").await;
        assert!(matches!(t.unwrap(), Transition::Won(_)));
    }

    /// Every record of the usage stream: (entry id, fields).
    pub async fn records(&self) -> Vec<(String, BTreeMap<String, String>)> {
        let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(capsa_store::usage::RECORDS_STREAM)
            .arg("-")
            .arg("+")
            .query_async(&mut self.conn.clone())
            .await
            .unwrap();
        raw.into_iter()
            .map(|(id, flat)| (id, pairs(&flat)))
            .collect()
    }

    /// Records of one session and kind.
    pub async fn records_of(&self, session: &str, kind: &str) -> Vec<BTreeMap<String, String>> {
        self.records()
            .await
            .into_iter()
            .map(|(_, f)| f)
            .filter(|f| f["session_id"] == session && f["kind"] == kind)
            .collect()
    }
}

pub fn pairs(flat: &[String]) -> BTreeMap<String, String> {
    flat.chunks_exact(2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .collect()
}

pub async fn client(p: &ServiceProcess) -> MeteringServiceClient<Channel> {
    MeteringServiceClient::connect(p.url()).await.unwrap()
}

pub fn secs(d: &Option<prost_types::Duration>) -> f64 {
    let d = d.as_ref().expect("duration set");
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

pub fn cpu_us(d: &Option<prost_types::Duration>) -> u64 {
    let d = d.as_ref().expect("duration set");
    d.seconds as u64 * 1_000_000 + d.nanos as u64 / 1000
}

pub type Client = MeteringServiceClient<Channel>;

/// A leased VM of session `lease`, leased 10 s ago.
pub fn vm(lease: &str, cpu_ms: u64, memory: Option<u64>) -> VmState {
    VmState {
        lease_id: lease.into(),
        lease_ms: now_ms() - 10_000,
        cpu: Duration::from_millis(cpu_ms),
        vmm_resident_bytes: 512 * MIB,
        memory_used_bytes: memory,
        ..VmState::default()
    }
}

/// The session's cpu time in µs; 0 while metering does not know the session.
pub async fn session_cpu_us(c: &mut Client, id: &str) -> u64 {
    let req = GetSessionUsageRequest {
        session_id: id.into(),
    };
    match c.get_session_usage(req).await {
        Ok(r) => cpu_us(&r.into_inner().usage.unwrap().cpu_time),
        Err(_) => 0,
    }
}

pub async fn tenant(c: &mut Client, id: &str) -> capsa_proto::common::v1::Usage {
    let req = GetTenantUsageRequest {
        tenant_id: id.into(),
    };
    c.get_tenant_usage(req)
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap()
}
