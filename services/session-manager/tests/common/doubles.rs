//! Test doubles of a node (VmPoolService + ExecutorService) and of MeteringService, served
//! in-process on 127.0.0.1:0. They count acquires and releases per VM, play scripted
//! Execute events, keep uploaded files in memory, and can be told to fail.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use capsa_proto::common::v1::{
    Completion, CompletionStatus, ExecuteEvent, FileInfo, OutputChunk, OutputStream, ProcessEvent,
    ProcessExit, ProcessInfo, ProcessKind, ProcessOutputChunk, ProcessState, TerminalOutput,
    UploadResult, Usage, execute_event, process_event, terminal_output,
};
use capsa_proto::executor::v1 as ex;
use capsa_proto::executor::v1::executor_service_server::{ExecutorService, ExecutorServiceServer};
use capsa_proto::metering::v1 as me;
use capsa_proto::metering::v1::metering_service_server::{MeteringService, MeteringServiceServer};
use capsa_proto::vmpool::v1 as vp;
use capsa_proto::vmpool::v1::vm_pool_service_server::{VmPoolService, VmPoolServiceServer};
use capsa_test_support::GrpcDouble;
use futures::Stream;
use sha2::{Digest as _, Sha256};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};

/// What the doubles saw and how they behave; tests read and set it directly.
#[derive(Default)]
pub struct State {
    pub vms: HashMap<String, vp::Vm>,
    /// lease id → AcquireVm calls.
    pub acquires: HashMap<String, u32>,
    /// vm id → ReleaseVm calls.
    pub releases: HashMap<String, u32>,
    /// When set, AcquireVm fails UNAVAILABLE with this message.
    pub fail_acquire: Option<String>,
    /// When set, AcquireVm takes this long (a cold boot).
    pub acquire_delay: Option<std::time::Duration>,
    /// lease id → the egress policy its AcquireVm carried.
    pub acquire_egress: HashMap<String, Option<capsa_proto::common::v1::EgressPolicy>>,
    /// Every SetEgressPolicy, in arrival order: (vm id, policy).
    pub egress_sets: Vec<(String, Option<capsa_proto::common::v1::EgressPolicy>)>,
    /// vm id → the policy the last successful SetEgressPolicy applied.
    pub egress_applied: HashMap<String, capsa_proto::common::v1::EgressPolicy>,
    /// When set, SetEgressPolicy fails UNAVAILABLE with this message.
    pub fail_set_egress: Option<String>,
    /// When set, SetEgressPolicy takes this long.
    pub set_egress_delay: Option<std::time::Duration>,
    /// SetEgressPolicy calls that arrived (counted before the delay).
    pub egress_arrivals: u32,
    /// vm id → env of ConfigureVm.
    pub configured: HashMap<String, HashMap<String, String>>,
    pub finalized: Vec<String>,
    /// VM ids ParkSession was called with.
    pub parked: Vec<String>,
    /// ListVms calls (each is one reconciler pass of one replica).
    pub list_calls: u32,
    /// When set, ListVms fails UNAVAILABLE: the node does not answer.
    pub silent: bool,
    /// Specs of every Execute, in arrival order.
    pub executes: Vec<ex::ExecuteRequest>,
    /// Code `fail-vm`: one stdout event, then the VM is FAILED and the stream UNAVAILABLE.
    /// Code `hold`: one stdout event, then wait for the client to go away.
    pub cancelled_executes: u32,
    /// (vm id, path) → contents.
    pub files: HashMap<(String, String), Vec<u8>>,
    /// (vm id, process id) → the process StartProcess started there ("p-<n>").
    pub processes: HashMap<(String, String), ProcessInfo>,
    /// vm id → what WriteStdin wrote to its processes, in order.
    pub stdin: HashMap<String, Vec<u8>>,
    /// Terminals and port connections the node holds open now.
    pub open_streams: u32,
    /// VMs whose socket the executor no longer finds (a VMM that just died): their file
    /// calls fail NOT_FOUND marked with `capsa_grpc::VM_GONE_METADATA`, as the executor's do.
    pub sockets_gone: std::collections::HashSet<String>,
    /// Snapshots SuspendVm wrote, by id.
    pub snapshots: HashMap<String, vp::Snapshot>,
    /// When set, SuspendVm fails UNAVAILABLE with this message (the VM keeps running).
    pub fail_suspend: Option<String>,
    /// When set, ResumeVm fails UNAVAILABLE with this message.
    pub fail_resume: Option<String>,
    /// Snapshot ids DeleteSnapshot was called with.
    pub deleted_snapshots: Vec<String>,
    next_vm: u32,
}

pub type Shared = Arc<Mutex<State>>;

#[derive(Clone)]
pub struct Doubles {
    pub state: Shared,
    pub held: Arc<Notify>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub fn vm(id: &str, lease: &str, state: vp::VmState) -> vp::Vm {
    vp::Vm {
        id: id.into(),
        template: "default".into(),
        state: state as i32,
        lease_id: lease.into(),
        engine: "qemu-tcg".into(),
        ..Default::default()
    }
}

fn ev(e: execute_event::Event) -> ex::ExecuteResponse {
    ex::ExecuteResponse {
        event: Some(ExecuteEvent { event: Some(e) }),
    }
}

fn info(path: &str, size: u64, mode: u32) -> FileInfo {
    FileInfo {
        path: path.into(),
        name: path.rsplit('/').next().unwrap_or_default().into(),
        r#type: capsa_proto::common::v1::FileType::Regular as i32,
        size,
        mode,
        modify_time: None,
    }
}

#[tonic::async_trait]
impl VmPoolService for Doubles {
    async fn acquire_vm(
        &self,
        req: Request<vp::AcquireVmRequest>,
    ) -> Result<Response<vp::AcquireVmResponse>, Status> {
        let req = req.into_inner();
        let delay = self.state.lock().unwrap().acquire_delay;
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut s = self.state.lock().unwrap();
        *s.acquires.entry(req.lease_id.clone()).or_default() += 1;
        s.acquire_egress
            .insert(req.lease_id.clone(), req.egress.clone());
        if let Some(msg) = &s.fail_acquire {
            return Err(Status::unavailable(msg.clone()));
        }
        if let Some(vm) = s.vms.values().find(|v| v.lease_id == req.lease_id) {
            return Ok(Response::new(vp::AcquireVmResponse {
                vm: Some(vm.clone()),
                warm_hit: true,
            }));
        }
        s.next_vm += 1;
        let mut v = vm(
            &format!("vm-{}", s.next_vm),
            &req.lease_id,
            vp::VmState::Leased,
        );
        // Like the real pool: the size asked for, else the template's (1 vCPU, 512 MiB).
        v.vcpus = if req.vcpus == 0 { 1 } else { req.vcpus };
        v.memory_mib = if req.memory_mib == 0 {
            512
        } else {
            req.memory_mib
        };
        s.vms.insert(v.id.clone(), v.clone());
        Ok(Response::new(vp::AcquireVmResponse {
            vm: Some(v),
            warm_hit: true,
        }))
    }

    async fn release_vm(
        &self,
        req: Request<vp::ReleaseVmRequest>,
    ) -> Result<Response<vp::ReleaseVmResponse>, Status> {
        let id = req.into_inner().vm_id;
        let mut s = self.state.lock().unwrap();
        *s.releases.entry(id.clone()).or_default() += 1;
        let released = s.vms.remove(&id).is_some();
        Ok(Response::new(vp::ReleaseVmResponse { released }))
    }

    async fn get_vm(
        &self,
        req: Request<vp::GetVmRequest>,
    ) -> Result<Response<vp::GetVmResponse>, Status> {
        let id = req.into_inner().vm_id;
        match self.state.lock().unwrap().vms.get(&id) {
            Some(v) => Ok(Response::new(vp::GetVmResponse {
                vm: Some(v.clone()),
            })),
            None => Err(Status::not_found(format!("vm {id} not found"))),
        }
    }

    async fn list_vms(
        &self,
        _: Request<vp::ListVmsRequest>,
    ) -> Result<Response<vp::ListVmsResponse>, Status> {
        let mut s = self.state.lock().unwrap();
        s.list_calls += 1;
        if s.silent {
            return Err(Status::unavailable("node double is silent"));
        }
        let vms = s.vms.values().cloned().collect();
        Ok(Response::new(vp::ListVmsResponse { vms }))
    }

    type WatchVmStream = BoxStream<vp::WatchVmResponse>;

    async fn watch_vm(
        &self,
        _: Request<vp::WatchVmRequest>,
    ) -> Result<Response<Self::WatchVmStream>, Status> {
        Err(Status::unimplemented("not used by session-manager"))
    }

    /// Zero counters taken now: enough for a real metering to sample the VM (its guest
    /// figures come from the executor).
    async fn get_vm_counters(
        &self,
        req: Request<vp::GetVmCountersRequest>,
    ) -> Result<Response<vp::GetVmCountersResponse>, Status> {
        let id = req.into_inner().vm_id;
        if !self.state.lock().unwrap().vms.contains_key(&id) {
            return Err(Status::not_found(format!("vm {id} not found")));
        }
        Ok(Response::new(vp::GetVmCountersResponse {
            sample_time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            ..Default::default()
        }))
    }

    async fn get_node_info(
        &self,
        _: Request<vp::GetNodeInfoRequest>,
    ) -> Result<Response<vp::GetNodeInfoResponse>, Status> {
        Err(Status::unimplemented("not used by session-manager"))
    }

    async fn set_egress_policy(
        &self,
        req: Request<vp::SetEgressPolicyRequest>,
    ) -> Result<Response<vp::SetEgressPolicyResponse>, Status> {
        let req = req.into_inner();
        let delay = {
            let mut s = self.state.lock().unwrap();
            s.egress_arrivals += 1;
            s.set_egress_delay
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut s = self.state.lock().unwrap();
        s.egress_sets.push((req.vm_id.clone(), req.egress.clone()));
        if let Some(msg) = &s.fail_set_egress {
            return Err(Status::unavailable(msg.clone()));
        }
        if !s.vms.contains_key(&req.vm_id) {
            return Err(Status::not_found(format!("vm {} not found", req.vm_id)));
        }
        s.egress_applied
            .insert(req.vm_id, req.egress.unwrap_or_default());
        Ok(Response::new(vp::SetEgressPolicyResponse {}))
    }

    async fn suspend_vm(
        &self,
        req: Request<vp::SuspendVmRequest>,
    ) -> Result<Response<vp::SuspendVmResponse>, Status> {
        let req = req.into_inner();
        let mut s = self.state.lock().unwrap();
        if let Some(snapshot) = s.snapshots.get(&req.snapshot_id) {
            return Ok(Response::new(vp::SuspendVmResponse {
                snapshot: Some(snapshot.clone()),
            }));
        }
        if let Some(msg) = &s.fail_suspend {
            return Err(Status::unavailable(msg.clone()));
        }
        let Some(vm) = s.vms.remove(&req.vm_id) else {
            return Err(Status::not_found(format!("vm {} not found", req.vm_id)));
        };
        let snapshot = vp::Snapshot {
            id: req.snapshot_id.clone(),
            template: vm.template,
            engine: vm.engine,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            size_bytes: 4096,
            ..Default::default()
        };
        s.snapshots.insert(req.snapshot_id, snapshot.clone());
        Ok(Response::new(vp::SuspendVmResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn snapshot_vm(
        &self,
        req: Request<vp::SnapshotVmRequest>,
    ) -> Result<Response<vp::SnapshotVmResponse>, Status> {
        let req = req.into_inner();
        let mut s = self.state.lock().unwrap();
        if let Some(snapshot) = s.snapshots.get(&req.snapshot_id) {
            return Ok(Response::new(vp::SnapshotVmResponse {
                snapshot: Some(snapshot.clone()),
            }));
        }
        if let Some(msg) = &s.fail_suspend {
            return Err(Status::unavailable(msg.clone()));
        }
        // Unlike SuspendVm, the VM runs on under its lease.
        let Some(vm) = s.vms.get(&req.vm_id) else {
            return Err(Status::not_found(format!("vm {} not found", req.vm_id)));
        };
        let snapshot = vp::Snapshot {
            id: req.snapshot_id.clone(),
            template: vm.template.clone(),
            engine: vm.engine.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            size_bytes: 4096,
            ..Default::default()
        };
        s.snapshots.insert(req.snapshot_id, snapshot.clone());
        Ok(Response::new(vp::SnapshotVmResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn resume_vm(
        &self,
        req: Request<vp::ResumeVmRequest>,
    ) -> Result<Response<vp::ResumeVmResponse>, Status> {
        let req = req.into_inner();
        let mut s = self.state.lock().unwrap();
        if let Some(msg) = &s.fail_resume {
            return Err(Status::unavailable(msg.clone()));
        }
        if let Some(vm) = s.vms.values().find(|v| v.lease_id == req.lease_id) {
            return Ok(Response::new(vp::ResumeVmResponse {
                vm: Some(vm.clone()),
            }));
        }
        if !s.snapshots.contains_key(&req.snapshot_id) {
            return Err(Status::not_found(format!(
                "snapshot {} not found",
                req.snapshot_id
            )));
        }
        s.next_vm += 1;
        let mut v = vm(
            &format!("vm-{}", s.next_vm),
            &req.lease_id,
            vp::VmState::Leased,
        );
        // A restored VM has the size of the VM it was saved from.
        let saved = &s.snapshots[&req.snapshot_id];
        (v.vcpus, v.memory_mib) = (saved.vcpus, saved.memory_mib);
        s.vms.insert(v.id.clone(), v.clone());
        s.acquire_egress.insert(req.lease_id, req.egress);
        Ok(Response::new(vp::ResumeVmResponse { vm: Some(v) }))
    }

    async fn get_snapshot(
        &self,
        req: Request<vp::GetSnapshotRequest>,
    ) -> Result<Response<vp::GetSnapshotResponse>, Status> {
        let id = req.into_inner().snapshot_id;
        match self.state.lock().unwrap().snapshots.get(&id) {
            Some(snapshot) => Ok(Response::new(vp::GetSnapshotResponse {
                snapshot: Some(snapshot.clone()),
            })),
            None => Err(Status::not_found(format!("snapshot {id} not found"))),
        }
    }

    async fn list_snapshots(
        &self,
        _: Request<vp::ListSnapshotsRequest>,
    ) -> Result<Response<vp::ListSnapshotsResponse>, Status> {
        let snapshots = self
            .state
            .lock()
            .unwrap()
            .snapshots
            .values()
            .cloned()
            .collect();
        Ok(Response::new(vp::ListSnapshotsResponse { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<vp::DeleteSnapshotRequest>,
    ) -> Result<Response<vp::DeleteSnapshotResponse>, Status> {
        let id = req.into_inner().snapshot_id;
        let mut s = self.state.lock().unwrap();
        s.deleted_snapshots.push(id.clone());
        let deleted = s.snapshots.remove(&id).is_some();
        Ok(Response::new(vp::DeleteSnapshotResponse { deleted }))
    }
}

#[tonic::async_trait]
impl ExecutorService for Doubles {
    async fn configure_vm(
        &self,
        req: Request<ex::ConfigureVmRequest>,
    ) -> Result<Response<ex::ConfigureVmResponse>, Status> {
        let req = req.into_inner();
        self.state
            .lock()
            .unwrap()
            .configured
            .insert(req.vm_id, req.env);
        Ok(Response::new(ex::ConfigureVmResponse {}))
    }

    type ExecuteStream = BoxStream<ex::ExecuteResponse>;

    async fn execute(
        &self,
        req: Request<ex::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let req = req.into_inner();
        let code = req
            .spec
            .as_ref()
            .map(|s| s.code.clone())
            .unwrap_or_default();
        let vm_id = req.vm_id.clone();
        self.state.lock().unwrap().executes.push(req);
        let (tx, rx) = mpsc::channel(4);
        let state = self.state.clone();
        let held = self.held.clone();
        tokio::spawn(async move {
            let out = |s: &str| {
                ev(execute_event::Event::Stdout(OutputChunk {
                    data: Bytes::from(s.to_string()),
                }))
            };
            match code.as_str() {
                "fail-vm" => {
                    let _ = tx.send(Ok(out("before"))).await;
                    if let Some(v) = state.lock().unwrap().vms.get_mut(&vm_id) {
                        v.state = vp::VmState::Failed as i32;
                        v.failure = "vmm exited".into();
                    }
                    let _ = tx
                        .send(Err(Status::unavailable("agent connection lost")))
                        .await;
                }
                "hold" => {
                    let _ = tx.send(Ok(out("started"))).await;
                    held.notify_one();
                    tx.closed().await;
                    state.lock().unwrap().cancelled_executes += 1;
                }
                _ => {
                    for i in 0..3 {
                        let _ = tx.send(Ok(out(&format!("line {i}\n")))).await;
                    }
                    let _ = tx
                        .send(Ok(ev(execute_event::Event::Stderr(OutputChunk {
                            data: Bytes::from_static(b"warn\n"),
                        }))))
                        .await;
                    let done = Completion {
                        status: CompletionStatus::Ok as i32,
                        output_bytes: 26,
                        ..Default::default()
                    };
                    let _ = tx
                        .send(Ok(ev(execute_event::Event::Completion(done))))
                        .await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn upload_file(
        &self,
        req: Request<Streaming<ex::UploadFileRequest>>,
    ) -> Result<Response<ex::UploadFileResponse>, Status> {
        let mut stream = req.into_inner();
        let Some(ex::UploadFileRequest {
            part: Some(ex::upload_file_request::Part::Header(h)),
        }) = stream.message().await?
        else {
            return Err(Status::invalid_argument("header first"));
        };
        let file = h.file.unwrap_or_default();
        let mut data = Vec::new();
        while let Some(msg) = stream.message().await? {
            match msg.part {
                Some(ex::upload_file_request::Part::Data(d)) => data.extend_from_slice(&d),
                _ => return Err(Status::invalid_argument("data only after the header")),
            }
        }
        let key = (h.vm_id, file.path.clone());
        let mut s = self.state.lock().unwrap();
        if file.no_overwrite && s.files.contains_key(&key) {
            return Err(Status::already_exists(format!("{} exists", file.path)));
        }
        let sha256 = hex::encode(Sha256::digest(&data));
        let mode = if file.mode == 0 { 0o644 } else { file.mode };
        let result = UploadResult {
            info: Some(info(&file.path, data.len() as u64, mode)),
            sha256,
        };
        s.files.insert(key, data);
        Ok(Response::new(ex::UploadFileResponse {
            result: Some(result),
        }))
    }

    type DownloadFileStream = BoxStream<ex::DownloadFileResponse>;

    async fn download_file(
        &self,
        req: Request<ex::DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        let req = req.into_inner();
        let data = self
            .state
            .lock()
            .unwrap()
            .files
            .get(&(req.vm_id, req.path.clone()))
            .cloned()
            .ok_or_else(|| Status::not_found(format!("{} not found", req.path)))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            use ex::download_file_response::Part;
            let first = ex::DownloadFileResponse {
                part: Some(Part::Info(info(&req.path, data.len() as u64, 0o644))),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            for chunk in data.chunks(1 << 20) {
                let msg = ex::DownloadFileResponse {
                    part: Some(Part::Data(Bytes::copy_from_slice(chunk))),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_files(
        &self,
        req: Request<ex::ListFilesRequest>,
    ) -> Result<Response<ex::ListFilesResponse>, Status> {
        let req = req.into_inner();
        let s = self.state.lock().unwrap();
        if s.sockets_gone.contains(&req.vm_id) {
            let mut status = Status::not_found(format!("vm {} not on this node", req.vm_id));
            status.metadata_mut().insert(
                capsa_grpc::VM_GONE_METADATA,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            return Err(status);
        }
        let files = s
            .files
            .iter()
            .filter(|((vm, p), _)| *vm == req.vm_id && p.starts_with(&req.path))
            .map(|((_, p), d)| info(p, d.len() as u64, 0o644))
            .collect();
        Ok(Response::new(ex::ListFilesResponse { files }))
    }

    async fn get_file_info(
        &self,
        req: Request<ex::GetFileInfoRequest>,
    ) -> Result<Response<ex::GetFileInfoResponse>, Status> {
        let req = req.into_inner();
        let s = self.state.lock().unwrap();
        let d = s
            .files
            .get(&(req.vm_id, req.path.clone()))
            .ok_or_else(|| Status::not_found(format!("{} not found", req.path)))?;
        Ok(Response::new(ex::GetFileInfoResponse {
            info: Some(info(&req.path, d.len() as u64, 0o644)),
        }))
    }

    async fn make_directory(
        &self,
        req: Request<ex::MakeDirectoryRequest>,
    ) -> Result<Response<ex::MakeDirectoryResponse>, Status> {
        let req = req.into_inner();
        let mut i = info(&req.path, 0, if req.mode == 0 { 0o755 } else { req.mode });
        i.r#type = capsa_proto::common::v1::FileType::Directory as i32;
        Ok(Response::new(ex::MakeDirectoryResponse { info: Some(i) }))
    }

    async fn remove_file(
        &self,
        req: Request<ex::RemoveFileRequest>,
    ) -> Result<Response<ex::RemoveFileResponse>, Status> {
        let req = req.into_inner();
        match self
            .state
            .lock()
            .unwrap()
            .files
            .remove(&(req.vm_id, req.path.clone()))
        {
            Some(_) => Ok(Response::new(ex::RemoveFileResponse {})),
            None => Err(Status::not_found(format!("{} not found", req.path))),
        }
    }

    async fn get_guest_stats(
        &self,
        _: Request<ex::GetGuestStatsRequest>,
    ) -> Result<Response<ex::GetGuestStatsResponse>, Status> {
        Err(Status::unimplemented("not used by session-manager"))
    }

    // Processes: kept per VM, so a process id is known only on the VM that started it.
    async fn start_process(
        &self,
        req: Request<ex::StartProcessRequest>,
    ) -> Result<Response<ex::StartProcessResponse>, Status> {
        let req = req.into_inner();
        let spec = req.spec.unwrap_or_default();
        let mut s = self.state.lock().unwrap();
        let n = s
            .processes
            .keys()
            .filter(|(vm, _)| *vm == req.vm_id)
            .count()
            + 1;
        let info = ProcessInfo {
            process_id: format!("p-{n}"),
            kind: ProcessKind::Background as i32,
            pid: 1000 + n as u32,
            command: spec.command,
            args: spec.args,
            state: ProcessState::Running as i32,
            stdin_open: spec.keep_stdin_open,
            ..Default::default()
        };
        s.processes
            .insert((req.vm_id, info.process_id.clone()), info.clone());
        Ok(Response::new(ex::StartProcessResponse {
            process: Some(info),
        }))
    }

    async fn list_processes(
        &self,
        req: Request<ex::ListProcessesRequest>,
    ) -> Result<Response<ex::ListProcessesResponse>, Status> {
        let vm_id = req.into_inner().vm_id;
        let s = self.state.lock().unwrap();
        let mut processes: Vec<ProcessInfo> = s
            .processes
            .iter()
            .filter(|((vm, _), _)| *vm == vm_id)
            .map(|(_, p)| p.clone())
            .collect();
        processes.sort_by(|a, b| a.process_id.cmp(&b.process_id));
        Ok(Response::new(ex::ListProcessesResponse { processes }))
    }

    /// Answers at once with the process as it is ("exited" once signalled).
    async fn wait_process(
        &self,
        req: Request<ex::WaitProcessRequest>,
    ) -> Result<Response<ex::WaitProcessResponse>, Status> {
        let req = req.into_inner();
        let process = self.process(&req.vm_id, &req.process_id)?;
        Ok(Response::new(ex::WaitProcessResponse {
            process: Some(process),
        }))
    }

    async fn signal_process(
        &self,
        req: Request<ex::SignalProcessRequest>,
    ) -> Result<Response<ex::SignalProcessResponse>, Status> {
        let req = req.into_inner();
        self.process(&req.vm_id, &req.process_id)?;
        let mut s = self.state.lock().unwrap();
        let p = s
            .processes
            .get_mut(&(req.vm_id, req.process_id))
            .expect("checked above");
        p.state = ProcessState::Exited as i32;
        p.exit_code = -1;
        p.signal = 15;
        Ok(Response::new(ex::SignalProcessResponse {
            process: Some(p.clone()),
        }))
    }

    async fn write_stdin(
        &self,
        req: Request<ex::WriteStdinRequest>,
    ) -> Result<Response<ex::WriteStdinResponse>, Status> {
        let req = req.into_inner();
        self.process(&req.vm_id, &req.process_id)?;
        self.state
            .lock()
            .unwrap()
            .stdin
            .entry(req.vm_id)
            .or_default()
            .extend_from_slice(&req.data);
        Ok(Response::new(ex::WriteStdinResponse {}))
    }

    type AttachProcessStream = BoxStream<ex::AttachProcessResponse>;

    /// The process's command line as its output, then its exit.
    async fn attach_process(
        &self,
        req: Request<ex::AttachProcessRequest>,
    ) -> Result<Response<Self::AttachProcessStream>, Status> {
        let req = req.into_inner();
        let p = self.process(&req.vm_id, &req.process_id)?;
        let event = |e| ex::AttachProcessResponse {
            event: Some(ProcessEvent { event: Some(e) }),
        };
        let events = vec![
            Ok(event(process_event::Event::Output(ProcessOutputChunk {
                stream: OutputStream::Stdout as i32,
                offset: req.from_offset,
                data: Bytes::from(format!("{} {}\n", p.command, p.args.join(" "))),
            }))),
            Ok(event(process_event::Event::Exit(ProcessExit {
                exit_code: 0,
                signal: 0,
            }))),
        ];
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }

    type OpenTerminalStream = BoxStream<ex::OpenTerminalResponse>;

    /// `opened`, then each keystroke message echoed as screen bytes (and a resize as
    /// "<rows>x<cols>"), then `exit` when the input ends. Held open until then.
    async fn open_terminal(
        &self,
        req: Request<Streaming<ex::OpenTerminalRequest>>,
    ) -> Result<Response<Self::OpenTerminalStream>, Status> {
        use ex::open_terminal_request::Part;
        let mut input = req.into_inner();
        let Some(ex::OpenTerminalRequest {
            part: Some(Part::Open(header)),
        }) = input.message().await?
        else {
            return Err(Status::invalid_argument("open first"));
        };
        let terminal = header.terminal.unwrap_or_default();
        let output = |part| {
            Ok(ex::OpenTerminalResponse {
                output: Some(TerminalOutput { part: Some(part) }),
            })
        };
        let (tx, rx) = mpsc::channel(4);
        let opened = ProcessInfo {
            process_id: "t-1".into(),
            kind: ProcessKind::Terminal as i32,
            command: terminal.command,
            state: ProcessState::Running as i32,
            ..Default::default()
        };
        let _ = tx.send(output(terminal_output::Part::Opened(opened))).await;
        let state = self.state.clone();
        state.lock().unwrap().open_streams += 1;
        tokio::spawn(async move {
            while let Ok(Some(msg)) = input.message().await {
                let echo = match msg.part {
                    Some(Part::Data(d)) => d,
                    Some(Part::Resize(r)) => Bytes::from(format!("{}x{}", r.rows, r.cols)),
                    _ => continue,
                };
                if tx
                    .send(output(terminal_output::Part::Data(echo)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let exit = ProcessExit {
                exit_code: 0,
                signal: 0,
            };
            let _ = tx.send(output(terminal_output::Part::Exit(exit))).await;
            state.lock().unwrap().open_streams -= 1;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ConnectPortStream = BoxStream<ex::ConnectPortResponse>;

    /// Port 1 refuses; any other echoes its input and ends when the input does.
    async fn connect_port(
        &self,
        req: Request<Streaming<ex::ConnectPortRequest>>,
    ) -> Result<Response<Self::ConnectPortStream>, Status> {
        use ex::connect_port_request::Part;
        let mut input = req.into_inner();
        let Some(ex::ConnectPortRequest {
            part: Some(Part::Open(header)),
        }) = input.message().await?
        else {
            return Err(Status::invalid_argument("open first"));
        };
        if header.port == 1 {
            return Err(Status::failed_precondition(
                "nothing listens on port 1 in the guest (connection refused)",
            ));
        }
        let (tx, rx) = mpsc::channel(4);
        let state = self.state.clone();
        state.lock().unwrap().open_streams += 1;
        tokio::spawn(async move {
            while let Ok(Some(msg)) = input.message().await {
                if let Some(Part::Data(data)) = msg.part
                    && tx.send(Ok(ex::ConnectPortResponse { data })).await.is_err()
                {
                    break;
                }
            }
            state.lock().unwrap().open_streams -= 1;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl Doubles {
    fn process(&self, vm_id: &str, id: &str) -> Result<ProcessInfo, Status> {
        self.state
            .lock()
            .unwrap()
            .processes
            .get(&(vm_id.to_string(), id.to_string()))
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no process {id}")))
    }
}

#[tonic::async_trait]
impl MeteringService for Doubles {
    async fn get_session_usage(
        &self,
        req: Request<me::GetSessionUsageRequest>,
    ) -> Result<Response<me::GetSessionUsageResponse>, Status> {
        let usage = Usage {
            memory_used_bytes: 42,
            ..Default::default()
        };
        Ok(Response::new(me::GetSessionUsageResponse {
            session_id: req.into_inner().session_id,
            tenant_id: String::new(),
            usage: Some(usage),
        }))
    }

    async fn get_tenant_usage(
        &self,
        req: Request<me::GetTenantUsageRequest>,
    ) -> Result<Response<me::GetTenantUsageResponse>, Status> {
        let total = Usage {
            memory_used_bytes: 7,
            ..Default::default()
        };
        Ok(Response::new(me::GetTenantUsageResponse {
            tenant_id: req.into_inner().tenant_id,
            total: Some(total),
        }))
    }

    async fn finalize_session(
        &self,
        req: Request<me::FinalizeSessionRequest>,
    ) -> Result<Response<me::FinalizeSessionResponse>, Status> {
        self.state
            .lock()
            .unwrap()
            .finalized
            .push(req.into_inner().session_id);
        Ok(Response::new(me::FinalizeSessionResponse {
            usage: None,
            record_appended: true,
        }))
    }

    async fn park_session(
        &self,
        req: Request<me::ParkSessionRequest>,
    ) -> Result<Response<me::ParkSessionResponse>, Status> {
        self.state
            .lock()
            .unwrap()
            .parked
            .push(req.into_inner().vm_id);
        Ok(Response::new(me::ParkSessionResponse { parked: true }))
    }
}

/// The doubles served on 127.0.0.1:0; stops serving on drop.
pub struct DoubleServer {
    pub doubles: Doubles,
    pub url: String,
    _server: GrpcDouble,
}

impl DoubleServer {
    pub async fn start() -> DoubleServer {
        let doubles = Doubles {
            state: Shared::default(),
            held: Arc::new(Notify::new()),
        };
        let server = GrpcDouble::start(
            Routes::new(VmPoolServiceServer::new(doubles.clone()))
                .add_service(ExecutorServiceServer::new(doubles.clone()))
                .add_service(MeteringServiceServer::new(doubles.clone())),
        )
        .await;
        DoubleServer {
            doubles,
            url: server.url(),
            _server: server,
        }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.doubles.state.lock().unwrap()
    }
}
