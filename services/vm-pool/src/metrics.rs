//! vm-pool's metrics (names from `capsa_telemetry::metrics`): warm VMs per template,
//! AcquireVm latency by warm hit, and start latency (VMM start to agent ready) by source:
//! `boot`, or `restore` from a snapshot (which includes the agent's Reidentify).

use std::time::Duration;

use capsa_telemetry::metrics as names;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Gauge, Histogram};

#[derive(Clone)]
pub(crate) struct Metrics {
    warm: Gauge<u64>,
    acquire: Histogram<f64>,
    boot: Histogram<f64>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let meter = capsa_telemetry::meter();
        Metrics {
            warm: meter
                .u64_gauge(names::POOL_WARM_VMS)
                .with_description("warm VMs waiting in the pool")
                .build(),
            acquire: meter
                .f64_histogram(names::VM_ACQUIRE_DURATION)
                .with_unit("s")
                .with_description("AcquireVm latency")
                .build(),
            boot: meter
                .f64_histogram(names::VM_BOOT_DURATION)
                .with_unit("s")
                .with_description("VMM start to agent ready, by source (boot, restore)")
                .build(),
        }
    }

    pub fn warm(&self, template: &str, count: usize) {
        self.warm.record(
            count as u64,
            &[KeyValue::new("template", template.to_owned())],
        );
    }

    pub fn acquired(&self, took: Duration, warm_hit: bool) {
        self.acquire.record(
            took.as_secs_f64(),
            &[KeyValue::new("warm_hit", warm_hit.to_string())],
        );
    }

    /// `source`: "boot" or "restore".
    pub fn booted(&self, took: Duration, source: &'static str) {
        self.boot
            .record(took.as_secs_f64(), &[KeyValue::new("source", source)]);
    }
}
