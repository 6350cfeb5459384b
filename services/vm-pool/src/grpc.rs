//! gRPC adapter: translates `capsa.vmpool.v1` messages to pool calls and pool results back,
//! and every [`Error`] to a `Status` through `capsa_grpc::to_status`. No logic lives here.

use std::pin::Pin;

use capsa_proto::time::{duration, timestamp};
use capsa_proto::vmpool::v1 as pb;
use capsa_proto::vmpool::v1::vm_pool_service_server::VmPoolService;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::pool::Pool;
use crate::snapshots::SnapshotInfo;
use crate::vm::{VmInfo, VmState};

pub struct Service {
    pool: Pool,
    node_id: String,
}

impl Service {
    pub fn new(pool: Pool, node_id: String) -> Service {
        Service { pool, node_id }
    }
}

fn status(e: Error) -> Status {
    capsa_grpc::to_status(&e)
}

pub(crate) fn vm_to_proto(i: &VmInfo) -> pb::Vm {
    pb::Vm {
        id: i.id.clone(),
        template: i.template.clone(),
        vcpus: i.vcpus,
        memory_mib: i.memory_mib,
        state: match i.state {
            VmState::Booting => pb::VmState::Booting,
            VmState::Warm => pb::VmState::Warm,
            VmState::Leased => pb::VmState::Leased,
            VmState::Failed => pb::VmState::Failed,
            VmState::Destroyed => pb::VmState::Destroyed,
        } as i32,
        lease_id: i.lease_id.clone().unwrap_or_default(),
        engine: i.engine.as_str().to_owned(),
        vmm_pid: i.vmm_pid,
        boot_time: Some(timestamp(i.boot_time)),
        boot_duration: i.boot_duration.map(duration),
        lease_time: i.lease_time.map(timestamp),
        failure: i.failure.clone().unwrap_or_default(),
    }
}

fn snapshot_to_proto(s: SnapshotInfo) -> pb::Snapshot {
    pb::Snapshot {
        id: s.id,
        template: s.template,
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        engine: s.engine,
        size_bytes: s.size_bytes,
        create_time: Some(timestamp(s.create_time)),
    }
}

/// A request's policy, validated (errors name the field); unset is no egress.
fn egress_policy(
    message: Option<capsa_proto::common::v1::EgressPolicy>,
) -> Result<capsa_egress::EgressPolicy, Status> {
    match message {
        Some(m) => capsa_egress::proto::from_proto(m)
            .map_err(|e| status(Error::InvalidArgument(e.to_string()))),
        None => Ok(capsa_egress::EgressPolicy::none()),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchVmResponse, Status>> + Send>>;

#[tonic::async_trait]
impl VmPoolService for Service {
    async fn acquire_vm(
        &self,
        req: Request<pb::AcquireVmRequest>,
    ) -> Result<Response<pb::AcquireVmResponse>, Status> {
        let r = req.into_inner();
        let egress = egress_policy(r.egress)?;
        let (vm, warm_hit) = self
            .pool
            .acquire(&r.template, r.vcpus, r.memory_mib, &r.lease_id, egress)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::AcquireVmResponse {
            vm: Some(vm_to_proto(&vm)),
            warm_hit,
        }))
    }

    async fn release_vm(
        &self,
        req: Request<pb::ReleaseVmRequest>,
    ) -> Result<Response<pb::ReleaseVmResponse>, Status> {
        let released = self
            .pool
            .release(&req.into_inner().vm_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ReleaseVmResponse { released }))
    }

    async fn get_vm(
        &self,
        req: Request<pb::GetVmRequest>,
    ) -> Result<Response<pb::GetVmResponse>, Status> {
        let vm = self.pool.get(&req.into_inner().vm_id).map_err(status)?;
        Ok(Response::new(pb::GetVmResponse {
            vm: Some(vm_to_proto(&vm)),
        }))
    }

    async fn list_vms(
        &self,
        _: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let vms = self.pool.list().iter().map(vm_to_proto).collect();
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }

    type WatchVmStream = WatchStream;

    async fn watch_vm(
        &self,
        req: Request<pb::WatchVmRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let rx = self.pool.watch(&req.into_inner().vm_id).map_err(status)?;
        let closing = self.pool.closing();
        // The watch channel holds only the latest state, so a slow watcher skips
        // intermediate states instead of buffering them; the final one is always seen.
        let stream = futures::stream::unfold(
            (rx, closing, true, false),
            |(mut rx, closing, first, done)| async move {
                if done {
                    return None;
                }
                if !first {
                    tokio::select! {
                        changed = rx.changed() => changed.ok()?,
                        _ = closing.cancelled() => return None,
                    }
                }
                let info = rx.borrow_and_update().clone();
                let done = info.state == VmState::Destroyed;
                let item = Ok(pb::WatchVmResponse {
                    vm: Some(vm_to_proto(&info)),
                });
                Some((item, (rx, closing, false, done)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_vm_counters(
        &self,
        req: Request<pb::GetVmCountersRequest>,
    ) -> Result<Response<pb::GetVmCountersResponse>, Status> {
        let vm_id = req.into_inner().vm_id;
        let (c, at_lease) = self.pool.counters(&vm_id).await.map_err(status)?;
        Ok(Response::new(pb::GetVmCountersResponse {
            vm_id,
            cpu_time: Some(duration(c.cpu_time)),
            vmm_resident_bytes: c.vmm_resident_bytes,
            disk_read_bytes: c.disk_read_bytes,
            disk_write_bytes: c.disk_write_bytes,
            network_rx_bytes: c.network_rx_bytes,
            network_tx_bytes: c.network_tx_bytes,
            sample_time: c.sample_time.map(timestamp),
            at_lease: at_lease.map(|b| pb::CountersAtLease {
                cpu_time: Some(duration(b.cpu_time)),
                disk_read_bytes: b.disk_read_bytes,
                disk_write_bytes: b.disk_write_bytes,
                network_rx_bytes: b.network_rx_bytes,
                network_tx_bytes: b.network_tx_bytes,
            }),
        }))
    }

    async fn set_egress_policy(
        &self,
        req: Request<pb::SetEgressPolicyRequest>,
    ) -> Result<Response<pb::SetEgressPolicyResponse>, Status> {
        let r = req.into_inner();
        let egress = egress_policy(r.egress)?;
        self.pool
            .set_egress(&r.vm_id, egress)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SetEgressPolicyResponse {}))
    }

    async fn suspend_vm(
        &self,
        req: Request<pb::SuspendVmRequest>,
    ) -> Result<Response<pb::SuspendVmResponse>, Status> {
        let r = req.into_inner();
        let snapshot = self
            .pool
            .suspend(&r.vm_id, &r.snapshot_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SuspendVmResponse {
            snapshot: Some(snapshot_to_proto(snapshot)),
        }))
    }

    async fn snapshot_vm(
        &self,
        req: Request<pb::SnapshotVmRequest>,
    ) -> Result<Response<pb::SnapshotVmResponse>, Status> {
        let r = req.into_inner();
        let snapshot = self
            .pool
            .snapshot_running(&r.vm_id, &r.snapshot_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SnapshotVmResponse {
            snapshot: Some(snapshot_to_proto(snapshot)),
        }))
    }

    async fn resume_vm(
        &self,
        req: Request<pb::ResumeVmRequest>,
    ) -> Result<Response<pb::ResumeVmResponse>, Status> {
        let r = req.into_inner();
        let egress = egress_policy(r.egress)?;
        let vm = self
            .pool
            .resume(&r.snapshot_id, &r.lease_id, egress)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ResumeVmResponse {
            vm: Some(vm_to_proto(&vm)),
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let snapshot = self
            .pool
            .snapshot(&req.into_inner().snapshot_id)
            .map_err(status)?;
        Ok(Response::new(pb::GetSnapshotResponse {
            snapshot: Some(snapshot_to_proto(snapshot)),
        }))
    }

    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let snapshots = self.pool.snapshots().map_err(status)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: snapshots.into_iter().map(snapshot_to_proto).collect(),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let deleted = self
            .pool
            .delete_snapshot(&req.into_inner().snapshot_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteSnapshotResponse { deleted }))
    }

    async fn get_node_info(
        &self,
        _: Request<pb::GetNodeInfoRequest>,
    ) -> Result<Response<pb::GetNodeInfoResponse>, Status> {
        let counts = self.pool.counts();
        let engine = self.pool.engine();
        Ok(Response::new(pb::GetNodeInfoResponse {
            node_id: self.node_id.clone(),
            engine: engine.kind.as_str().to_owned(),
            engine_reason: engine.reason.clone(),
            leased: counts.leased,
            capacity: self.pool.capacity(),
            pools: counts
                .templates
                .into_iter()
                .map(|(template, warm, booting, target)| pb::TemplatePool {
                    template,
                    warm,
                    booting,
                    target,
                })
                .collect(),
        }))
    }
}
