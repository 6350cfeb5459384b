//! Metrics that mean something: a real stack exports to an OTLP receiver run by this test,
//! and the executor's Execute histogram, after an Execute this test timed itself, has
//! second-scale buckets of which the one holding that Execute straddles the measured
//! latency (the SDK's default millisecond-scale boundaries would put it in (0, 5]); every
//! service says which instance it is (`service.instance.id`), distinct across replicas.

use std::time::Instant;

use capsa_e2e::otlp::Receiver;
use capsa_e2e::{Stack, StackOptions, exec};
use capsa_telemetry::metrics::DURATION_BUCKETS_SECONDS;
use capsa_test_support::eventually;

/// How long the timed Execute sleeps in the guest.
const SLEEP: f64 = 1.2;

#[tokio::test]
async fn execute_histogram_buckets_straddle_a_measured_latency() {
    let (receiver, otlp) = Receiver::start("127.0.0.1:0").await;
    let stack = Stack::start(StackOptions {
        replicas: 2,
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), otlp),
            // Export every second instead of every minute.
            (
                "OTEL_METRIC_EXPORT_INTERVAL".to_string(),
                "1000".to_string(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let mut c = stack.client(0).await;
    let sid = capsa_e2e::create_default_session(&mut c).await.id;

    let metric = "capsa.executor.execute.duration";
    let executes = |n: u64| {
        receiver
            .histogram("capsa-executor", metric)
            .is_some_and(|p| p.count >= n)
    };
    // The first Execute starts the guest's Python kernel (seconds under TCG): not timed.
    exec::python(&mut c, &sid, "print(1)").await;
    eventually!(executes(1), 60);
    let before = receiver.histogram("capsa-executor", metric).unwrap();
    assert_eq!(before.count, 1, "{before:?}");

    let started = Instant::now();
    let out = exec::python(
        &mut c,
        &sid,
        &format!("import time\ntime.sleep({SLEEP})\nprint('slept')"),
    )
    .await;
    let measured = started.elapsed().as_secs_f64();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "slept",
        "{out:?}"
    );
    eventually!(executes(2), 60);
    let p = receiver.histogram("capsa-executor", metric).unwrap();
    assert_eq!(p.explicit_bounds, DURATION_BUCKETS_SECONDS, "{p:?}");
    assert_eq!(p.count, 2, "two Executes ran: {p:?}");
    // Cumulative: what the timed Execute added is the difference from `before`.
    let recorded = p.sum.unwrap() - before.sum.unwrap();
    assert!(
        (SLEEP..=measured).contains(&recorded),
        "the executor saw {recorded} s; the guest slept {SLEEP} s and the client measured {measured} s"
    );
    let gained: Vec<usize> = (0..p.bucket_counts.len())
        .filter(|&i| p.bucket_counts[i] > before.bucket_counts[i])
        .collect();
    assert_eq!(gained.len(), 1, "{before:?}\n{p:?}");
    // The bucket that counted it: (bounds[i-1], bounds[i]].
    let i = gained[0];
    let lower = if i == 0 {
        0.0
    } else {
        p.explicit_bounds[i - 1]
    };
    let upper = p.explicit_bounds.get(i).copied().unwrap_or(f64::INFINITY);
    eprintln!(
        "client measured {measured:.3} s, executor recorded {recorded:.3} s, bucket ({lower}, {upper}]"
    );
    assert!(
        lower < recorded && recorded <= upper,
        "bucket ({lower}, {upper}] does not hold {recorded}"
    );
    assert!(
        lower < measured && upper >= SLEEP,
        "bucket ({lower}, {upper}] does not straddle the measured {SLEEP}..{measured} s"
    );
    // Second-scale resolution: a bounded bucket at most 2.5 times as wide as its lower bound
    // (the SDK's defaults would have counted it in (0, 5]).
    assert!(
        lower > 0.0 && upper / lower <= 2.5,
        "bucket ({lower}, {upper}] is too coarse"
    );

    // vm-pool's AcquireVm histogram has the same boundaries.
    eventually!(
        receiver
            .histogram("capsa-vm-pool", "capsa.vm.acquire.duration")
            .is_some(),
        30
    );
    let acquire = receiver
        .histogram("capsa-vm-pool", "capsa.vm.acquire.duration")
        .unwrap();
    assert_eq!(acquire.explicit_bounds, DURATION_BUCKETS_SECONDS);

    // Every exporting process names its instance; the two session-manager replicas differ.
    eventually!(
        receiver
            .instances()
            .iter()
            .filter(|(s, _)| s == "capsa-session-manager")
            .count()
            >= 2,
        30
    );
    let instances = receiver.instances();
    assert!(
        instances
            .iter()
            .all(|(s, id)| !s.is_empty() && !id.is_empty()),
        "{instances:?}"
    );
    for service in ["capsa-executor", "capsa-vm-pool", "capsa-metering"] {
        assert!(
            instances.iter().any(|(s, _)| s == service),
            "{service} exported nothing: {instances:?}"
        );
    }
    drop(stack);
}
