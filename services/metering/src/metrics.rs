//! Metering's own metrics, recorded on [`capsa_telemetry::meter`]. Names follow the
//! `capsa.<area>.<thing>` scheme of `capsa_telemetry::metrics`.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

/// Counter: samples stored in Redis.
pub const SAMPLES: &str = "capsa.metering.samples";
/// Counter: failed steps of sampling; attribute `stage` (registry, list_vms, session,
/// counters, guest_stats, store).
pub const SAMPLE_ERRORS: &str = "capsa.metering.sample_errors";
/// Counter: usage records appended; attribute `kind` (interim, final).
pub const RECORDS: &str = "capsa.metering.records";
/// Histogram (seconds): one sampling round over every node.
pub const ROUND_DURATION: &str = "capsa.metering.round.duration";

#[derive(Clone)]
pub struct Metrics {
    samples: Counter<u64>,
    errors: Counter<u64>,
    records: Counter<u64>,
    round: Histogram<f64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let meter = capsa_telemetry::meter();
        Metrics {
            samples: meter
                .u64_counter(SAMPLES)
                .with_description("samples stored")
                .build(),
            errors: meter
                .u64_counter(SAMPLE_ERRORS)
                .with_description("failed sampling steps, by stage")
                .build(),
            records: meter
                .u64_counter(RECORDS)
                .with_description("usage records appended, by kind")
                .build(),
            round: meter
                .f64_histogram(ROUND_DURATION)
                .with_unit("s")
                .with_description("one sampling round over every node")
                .build(),
        }
    }

    pub fn sample(&self) {
        self.samples.add(1, &[]);
    }

    pub fn error(&self, stage: &'static str) {
        self.errors.add(1, &[KeyValue::new("stage", stage)]);
    }

    pub fn record(&self, kind: &'static str) {
        self.records.add(1, &[KeyValue::new("kind", kind)]);
    }

    pub fn round(&self, seconds: f64) {
        self.round.record(seconds, &[]);
    }
}
