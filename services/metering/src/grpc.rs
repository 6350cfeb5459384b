//! The gRPC adapter: proto requests to [`Ledger`] calls, store usage to proto `Usage`,
//! errors to `Status` through `capsa_grpc::to_status`. No decisions are made here.

use std::time::Duration;

use capsa_proto::common::v1 as common;
use capsa_proto::metering::v1::metering_service_server::MeteringService;
use capsa_proto::metering::v1::{
    FinalizeSessionRequest, FinalizeSessionResponse, GetSessionUsageRequest,
    GetSessionUsageResponse, GetTenantUsageRequest, GetTenantUsageResponse, ParkSessionRequest,
    ParkSessionResponse,
};
use capsa_proto::time;
use capsa_store::usage::Usage;
use tonic::{Request, Response, Status};

use crate::ledger::Ledger;

pub struct MeteringGrpc {
    ledger: Ledger,
}

impl MeteringGrpc {
    pub fn new(ledger: Ledger) -> MeteringGrpc {
        MeteringGrpc { ledger }
    }
}

/// Store numbers to the proto message; a never-sampled usage has no sample time.
pub fn to_proto(u: &Usage) -> common::Usage {
    common::Usage {
        cpu_time: Some(time::duration(Duration::from_micros(u.cpu_time_us))),
        memory_used_bytes: u.memory_used_bytes,
        memory_peak_bytes: u.memory_peak_bytes,
        vmm_resident_peak_bytes: u.vmm_resident_peak_bytes,
        vmm_resident_bytes: u.vmm_resident_bytes,
        network_rx_bytes: u.network_rx_bytes,
        network_tx_bytes: u.network_tx_bytes,
        disk_read_bytes: u.disk_read_bytes,
        disk_write_bytes: u.disk_write_bytes,
        uptime: Some(time::duration(Duration::from_millis(u.uptime_ms))),
        sample_time: (u.sample_ms > 0).then(|| time::timestamp_ms(u.sample_ms)),
        processes_running: u.processes_running,
        terminals_open: u.terminals_open,
    }
}

#[tonic::async_trait]
impl MeteringService for MeteringGrpc {
    async fn get_session_usage(
        &self,
        request: Request<GetSessionUsageRequest>,
    ) -> Result<Response<GetSessionUsageResponse>, Status> {
        let session_id = request.into_inner().session_id;
        let (tenant_id, usage) = self
            .ledger
            .session_usage(&session_id)
            .await
            .map_err(|e| capsa_grpc::to_status(&e))?;
        Ok(Response::new(GetSessionUsageResponse {
            session_id,
            tenant_id,
            usage: Some(to_proto(&usage)),
        }))
    }

    async fn get_tenant_usage(
        &self,
        request: Request<GetTenantUsageRequest>,
    ) -> Result<Response<GetTenantUsageResponse>, Status> {
        let tenant_id = request.into_inner().tenant_id;
        let total = self
            .ledger
            .tenant_usage(&tenant_id)
            .await
            .map_err(|e| capsa_grpc::to_status(&e))?;
        Ok(Response::new(GetTenantUsageResponse {
            tenant_id,
            total: Some(to_proto(&total)),
        }))
    }

    async fn finalize_session(
        &self,
        request: Request<FinalizeSessionRequest>,
    ) -> Result<Response<FinalizeSessionResponse>, Status> {
        let session_id = request.into_inner().session_id;
        let done = self
            .ledger
            .finalize(&session_id)
            .await
            .map_err(|e| capsa_grpc::to_status(&e))?;
        Ok(Response::new(FinalizeSessionResponse {
            usage: Some(to_proto(&done.usage.usage)),
            record_appended: done.appended,
        }))
    }

    async fn park_session(
        &self,
        request: Request<ParkSessionRequest>,
    ) -> Result<Response<ParkSessionResponse>, Status> {
        let req = request.into_inner();
        let parked = self
            .ledger
            .park(&req.session_id, &req.vm_id)
            .await
            .map_err(|e| capsa_grpc::to_status(&e))?;
        Ok(Response::new(ParkSessionResponse { parked }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_converts_units() {
        let u = Usage {
            cpu_time_us: 1_500_000,
            uptime_ms: 2_250,
            sample_ms: 0,
            network_rx_bytes: 4_096,
            network_tx_bytes: 512,
            processes_running: 3,
            terminals_open: 1,
            ..Usage::default()
        };
        let p = to_proto(&u);
        assert_eq!((p.network_rx_bytes, p.network_tx_bytes), (4_096, 512));
        assert_eq!((p.processes_running, p.terminals_open), (3, 1));
        assert_eq!(
            p.cpu_time,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(
            p.uptime,
            Some(prost_types::Duration {
                seconds: 2,
                nanos: 250_000_000
            })
        );
        assert_eq!(p.sample_time, None);
    }
}
