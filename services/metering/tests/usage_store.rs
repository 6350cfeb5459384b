//! `capsa_store::usage` against a real Redis, without metering in between: the sample and
//! finalize scripts under many concurrent callers and out-of-order samples, and trimming
//! the records stream below what every consumer group acknowledged.

use std::time::Duration;

use capsa_store::usage::{Applied, RECORDS_STREAM, Sample, Trimmed, UsageStore};
use capsa_test_support::RedisServer;

fn sample(session: &str, tenant: &str, step: u64) -> Sample {
    Sample {
        session_id: session.into(),
        tenant_id: tenant.into(),
        node_id: "n".into(),
        vm_id: format!("vm-{session}"),
        sample_ms: 1_700_000_000_000 + step as i64 * 1000,
        lease_ms: 1_700_000_000_000,
        cpu_time_us: step * 1_000_000,
        vmm_resident_bytes: 1000 + step,
        disk_read_bytes: step * 10,
        disk_write_bytes: step * 20,
        network_rx_bytes: step * 30,
        network_tx_bytes: step * 40,
        // Memory goes up then down: peak at step 10.
        memory_used_bytes: Some(if step <= 10 {
            step * 100
        } else {
            2000 - step * 100
        }),
        processes_running: Some(step as u32 % 4),
        terminals_open: Some(1),
    }
}

async fn stores(redis: &RedisServer, n: usize) -> Vec<UsageStore> {
    let mut out = Vec::new();
    for _ in 0..n {
        let conn = capsa_store::connect(&redis.url()).await.unwrap();
        out.push(UsageStore::new(conn, Duration::from_secs(3600)));
    }
    out
}

#[tokio::test]
async fn concurrent_out_of_order_samples_add_each_delta_once() {
    let redis = RedisServer::start();
    let stores = stores(&redis, 4).await;
    // Every step of two sessions, each applied twice, from four connections, in a scrambled
    // order: what two replicas racing for hours would produce.
    let mut work = Vec::new();
    for step in 1..=15u64 {
        for session in ["a", "b"] {
            for copy in 0..2 {
                work.push((session, (step * 7 + copy * 5) % 15 + 1));
            }
        }
    }
    let tasks = work.into_iter().enumerate().map(|(i, (session, step))| {
        let store = stores[i % stores.len()].clone();
        tokio::spawn(async move { store.apply_sample(&sample(session, "t", step), None).await })
    });
    for r in futures::future::join_all(tasks).await {
        assert_eq!(r.unwrap().unwrap(), Applied::Stored);
    }
    let a = stores[0].session("a").await.unwrap().unwrap();
    assert_eq!(a.usage.cpu_time_us, 15_000_000);
    assert_eq!(a.usage.disk_write_bytes, 300);
    assert_eq!(a.usage.uptime_ms, 15_000);
    assert_eq!(a.usage.memory_peak_bytes, 1000);
    // The gauge is the newest sample's (step 15), whatever order they arrived in.
    assert_eq!(
        (a.usage.memory_used_bytes, a.usage.vmm_resident_bytes),
        (500, 1015)
    );
    // So are the activity gauges (15 % 4 processes), and the tenant's are the sums.
    assert_eq!((a.usage.processes_running, a.usage.terminals_open), (3, 1));
    let t = stores[0].tenant("t").await.unwrap();
    assert_eq!((t.processes_running, t.terminals_open), (6, 2));
    assert_eq!(t.cpu_time_us, 30_000_000);
    assert_eq!(t.network_tx_bytes, 1200);
    assert_eq!(t.uptime_ms, 30_000);
    assert_eq!(t.memory_used_bytes, 1000);
    assert_eq!(t.vmm_resident_bytes, 2030);
    assert!(
        t.memory_peak_bytes >= 1000 && t.memory_peak_bytes <= 2000,
        "{t:?}"
    );
}

#[tokio::test]
async fn finalize_is_exactly_once_and_freezes_the_session() {
    let redis = RedisServer::start();
    let stores = stores(&redis, 3).await;
    stores[0]
        .apply_sample(&sample("s", "t", 3), None)
        .await
        .unwrap();
    assert_eq!(stores[0].open_sessions().await.unwrap(), ["s"]);
    let tasks = (0..30).map(|i| {
        let store = stores[i % 3].clone();
        tokio::spawn(async move { store.finalize("s", "t", 0).await })
    });
    let done: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(done.iter().filter(|d| d.appended).count(), 1);
    assert!(
        done.iter()
            .all(|d| d.usage.finalized && d.usage.usage.cpu_time_us == 3_000_000)
    );

    assert!(stores[0].open_sessions().await.unwrap().is_empty());
    let later = stores[1]
        .apply_sample(&sample("s", "t", 9), Some(Duration::from_millis(1)))
        .await;
    assert_eq!(later.unwrap(), Applied::Finalized);
    let t = stores[0].tenant("t").await.unwrap();
    assert_eq!(
        (t.cpu_time_us, t.memory_used_bytes, t.vmm_resident_bytes),
        (3_000_000, 0, 0)
    );
    assert_eq!(t.memory_peak_bytes, 300);
    // An ended session runs nothing: its processes leave the tenant's sum and its own.
    assert_eq!((t.processes_running, t.terminals_open), (0, 0));
    let s = stores[0].session("s").await.unwrap().unwrap();
    assert_eq!((s.usage.processes_running, s.usage.terminals_open), (0, 0));

    let mut conn = capsa_store::connect(&redis.url()).await.unwrap();
    let len: usize = redis::cmd("XLEN")
        .arg(RECORDS_STREAM)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 1);
    // Finalized usage is kept for the retention period only.
    let ttl: i64 = redis::cmd("PTTL")
        .arg("{capsa}:usage:session:s")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 3_600_000, "{ttl}");
}

#[tokio::test]
async fn interim_records_are_rate_limited_per_session() {
    let redis = RedisServer::start();
    let stores = stores(&redis, 2).await;
    let hour = Some(Duration::from_secs(3600));
    assert_eq!(
        stores[0]
            .apply_sample(&sample("s", "t", 1), hour)
            .await
            .unwrap(),
        Applied::Stored
    );
    // Once 1 ms of Redis' clock has passed, a caller with a 1 ms interval appends.
    let ms = Some(Duration::from_millis(1));
    capsa_test_support::eventually!(
        stores[0]
            .apply_sample(&sample("s", "t", 2), ms)
            .await
            .unwrap()
            == Applied::StoredWithRecord
    );
    let tasks = (0..20).map(|i| {
        let store = stores[i % 2].clone();
        tokio::spawn(async move { store.apply_sample(&sample("s", "t", 2), ms).await })
    });
    let applied: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    // Racing callers may land in later milliseconds and append again, but the guard is
    // checked and set atomically: never two records within one interval.
    let records = 1 + applied
        .iter()
        .filter(|a| **a == Applied::StoredWithRecord)
        .count();
    let mut conn = capsa_store::connect(&redis.url()).await.unwrap();
    let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(RECORDS_STREAM)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(raw.len(), records);
    let times: Vec<i64> = raw
        .iter()
        .map(|(_, f)| {
            let i = f.iter().position(|k| k == "record_ms").unwrap();
            f[i + 1].parse().unwrap()
        })
        .collect();
    for pair in times.windows(2) {
        assert!(pair[1] > pair[0], "one record per interval: {times:?}");
    }
    // With an interval that has not passed, nobody appends.
    let before = raw.len();
    stores[0]
        .apply_sample(&sample("s", "t", 3), hour)
        .await
        .unwrap();
    let len: usize = redis::cmd("XLEN")
        .arg(RECORDS_STREAM)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, before);
}

#[tokio::test]
async fn trimming_drops_only_what_every_consumer_group_acknowledged() {
    let redis = RedisServer::start();
    let store = stores(&redis, 1).await.remove(0);
    let mut conn = capsa_store::connect(&redis.url()).await.unwrap();
    assert_eq!(
        store.trim_acknowledged().await.unwrap(),
        Trimmed::Entries(0)
    );
    for i in 0..5 {
        store.finalize(&format!("s{i}"), "t", 1).await.unwrap();
    }
    let len = |mut conn: capsa_store::Connection| async move {
        redis::cmd("XLEN")
            .arg(RECORDS_STREAM)
            .query_async::<u64>(&mut conn)
            .await
            .unwrap()
    };
    // Nobody bills yet: nothing may go.
    assert_eq!(
        store.trim_acknowledged().await.unwrap(),
        Trimmed::NoConsumerGroup
    );
    assert_eq!(len(conn.clone()).await, 5);

    for group in ["billing", "audit"] {
        redis::cmd("XGROUP")
            .arg(&["CREATE", RECORDS_STREAM, group, "0"][..])
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    // Reads `count` entries for `group` and acknowledges the first `ack` of them.
    let read = |group: &'static str, count: usize, ack: usize| {
        let mut conn = conn.clone();
        async move {
            type Reply = Vec<(String, Vec<(String, Vec<String>)>)>;
            let r: Reply = redis::cmd("XREADGROUP")
                .arg(&["GROUP", group, "worker", "COUNT"][..])
                .arg(count)
                .arg(&["STREAMS", RECORDS_STREAM, ">"][..])
                .query_async(&mut conn)
                .await
                .unwrap();
            let ids: Vec<String> = r[0].1.iter().map(|(id, _)| id.clone()).collect();
            assert_eq!(ids.len(), count);
            if ack > 0 {
                redis::cmd("XACK")
                    .arg(RECORDS_STREAM)
                    .arg(group)
                    .arg(&ids[..ack])
                    .query_async::<u64>(&mut conn)
                    .await
                    .unwrap();
            }
            ids
        }
    };
    // billing: 5 delivered, 3 acknowledged (4th is its oldest pending);
    // audit: 2 delivered and acknowledged (it needs the 3rd next).
    let billing = read("billing", 5, 3).await;
    read("audit", 2, 2).await;
    assert_eq!(
        store.trim_acknowledged().await.unwrap(),
        Trimmed::Entries(2)
    );
    assert_eq!(len(conn.clone()).await, 3);

    read("audit", 3, 3).await;
    redis::cmd("XACK")
        .arg(RECORDS_STREAM)
        .arg("billing")
        .arg(&billing[3..])
        .query_async::<u64>(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        store.trim_acknowledged().await.unwrap(),
        Trimmed::Entries(3)
    );
    assert_eq!(len(conn.clone()).await, 0);
}

/// A suspended session: its VM's final sample, then parked (gauges leave the tenant, later
/// samples of that VM count for nothing), then a resumed VM whose counters start from zero
/// adds to what the session used before, and its uptime excludes the time suspended.
#[tokio::test]
async fn a_parked_vm_stops_counting_and_the_next_vm_adds_to_the_session() {
    let redis = RedisServer::start();
    let store = stores(&redis, 1).await.remove(0);
    let first = sample("s", "t", 5);
    assert_eq!(
        store.apply_sample(&first, None).await.unwrap(),
        Applied::Stored
    );
    assert!(store.park("s", "t", "vm-s").await.unwrap());
    assert!(!store.park("s", "t", "vm-s").await.unwrap(), "parked once");
    let parked = store.session("s").await.unwrap().unwrap();
    assert_eq!(parked.vm_id, "");
    assert_eq!(parked.usage.cpu_time_us, 5_000_000);
    assert_eq!(
        parked.usage.memory_used_bytes, 0,
        "a suspended session holds no memory"
    );
    let tenant = store.tenant("t").await.unwrap();
    assert_eq!(
        (tenant.memory_used_bytes, tenant.vmm_resident_bytes),
        (0, 0)
    );
    assert_eq!(tenant.cpu_time_us, 5_000_000);
    // A late sample of the parked VM is ignored.
    assert_eq!(
        store
            .apply_sample(&sample("s", "t", 9), None)
            .await
            .unwrap(),
        Applied::Parked
    );
    assert_eq!(
        store.session("s").await.unwrap().unwrap().usage.cpu_time_us,
        5_000_000
    );
    // Uptime stands still while suspended.
    assert_eq!(parked.uptime_at(i64::MAX / 2), parked.usage.uptime_ms);

    // The resumed VM, leased an hour later, 2 s into its life.
    let mut next = sample("s", "t", 2);
    next.vm_id = "vm-s2".into();
    next.lease_ms = first.sample_ms + 3_600_000;
    next.sample_ms = next.lease_ms + 2_000;
    assert_eq!(
        store.apply_sample(&next, None).await.unwrap(),
        Applied::Stored
    );
    let resumed = store.session("s").await.unwrap().unwrap();
    assert_eq!(resumed.vm_id, "vm-s2");
    assert_eq!(
        resumed.usage.cpu_time_us, 7_000_000,
        "5 s before plus 2 s now"
    );
    assert_eq!(resumed.usage.disk_write_bytes, 140);
    assert_eq!(
        resumed.usage.uptime_ms,
        5_000 + 2_000,
        "the hour suspended is not uptime"
    );
    assert_eq!(resumed.usage.memory_used_bytes, 200);
    let tenant = store.tenant("t").await.unwrap();
    assert_eq!(tenant.cpu_time_us, 7_000_000);
    assert_eq!(tenant.memory_used_bytes, 200);
    // Live uptime while the new VM runs counts from its lease.
    assert_eq!(resumed.uptime_at(next.lease_ms + 10_000), 5_000 + 10_000);
}
