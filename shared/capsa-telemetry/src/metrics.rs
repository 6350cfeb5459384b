//! The names of Capsa's metrics, in one place so services, the Collector config and the
//! Grafana dashboard (`deploy/observability/`) agree. OTLP names use dots; Prometheus (via
//! the Collector) shows them with underscores and unit suffixes, e.g.
//! `capsa_vm_acquire_duration_seconds_bucket`.
//!
//! Every histogram with unit `s` gets [`DURATION_BUCKETS_SECONDS`] (an SDK view installed by
//! [`crate::init`]), whatever the instrument asked for: the SDK's default boundaries are
//! millisecond-scale (0, 5, 10, 25 ... 10000), which puts every latency under 5 s in one
//! bucket.

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

/// Upper bucket bounds of every duration histogram, in seconds: from the few milliseconds of
/// a warm AcquireVm to the minutes a cold boot can take under TCG.
pub const DURATION_BUCKETS_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 15.0,
    20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
];
