//! The names of Capsa's metrics, in one place so services, the Collector config and the
//! Grafana dashboard (`deploy/observability/`) agree. OTLP names use dots; Prometheus (via
//! the Collector) shows them with underscores and unit suffixes, e.g.
//! `capsa_vm_acquire_duration_seconds_bucket`.

/// Gauge: warm VMs waiting in the pool; attribute `template`.
pub const POOL_WARM_VMS: &str = "capsa.pool.warm_vms";
/// Histogram (seconds): AcquireVm latency; attribute `warm_hit` (`true`/`false`).
pub const VM_ACQUIRE_DURATION: &str = "capsa.vm.acquire.duration";
/// Histogram (seconds): VMM start to agent ready.
pub const VM_BOOT_DURATION: &str = "capsa.vm.boot.duration";
/// Histogram (seconds): one Execute, end to end as the serving process saw it; attributes
/// `service`, `language`, `status`.
pub const EXECUTE_DURATION: &str = "capsa.execute.duration";
/// Gauge: sessions in CREATING or ACTIVE.
pub const SESSIONS_ACTIVE: &str = "capsa.sessions.active";
/// Counter: errors returned to callers; attributes `service`, `code` (gRPC code name).
pub const GRPC_ERRORS: &str = "capsa.grpc.errors";
