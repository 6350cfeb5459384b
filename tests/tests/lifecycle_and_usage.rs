//! Session lifecycle on real VMs (expiry, deletion, a VM that dies mid-execute) and the
//! usage numbers metering reports for real work in the guest.

use std::time::{Duration, Instant};

use capsa_e2e::exec::{self, python, shell};
use capsa_e2e::{Stack, StackOptions};
use capsa_proto::common::v1::Language;
use capsa_proto::session::v1::{
    CreateSessionRequest, DeleteSessionRequest, EndReason, GetSessionRequest, GetUsageRequest,
    SessionStatus,
};
use capsa_test_support::eventually;

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn expiry_and_deletion_destroy_the_vm() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut c = stack.client(0).await;
    let short = CreateSessionRequest {
        lifetime: Some(capsa_proto::time::duration(Duration::from_secs(10))),
        ..Default::default()
    };
    let s = c
        .create_session(short)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let pid = stack.vmm_pid(0, &s.vm_id).await;
    assert!(pid_alive(pid));
    // Watch the session from outside: it must leave ACTIVE within a second of its deadline
    // (the reaper's promise). Redis' clock and this test's are the same host clock.
    let expire = s.expire_time.unwrap();
    let expire = std::time::UNIX_EPOCH + Duration::new(expire.seconds as u64, expire.nanos as u32);
    let get = GetSessionRequest {
        session_id: s.id.clone(),
    };
    let left_active_at = loop {
        let got = c
            .get_session(get.clone())
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        if got.status() != SessionStatus::Active {
            break std::time::SystemTime::now();
        }
        assert!(
            std::time::SystemTime::now() < expire + Duration::from_secs(30),
            "never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let late = left_active_at.duration_since(expire).unwrap_or_default();
    // The 1 s promise, plus one 50 ms poll and a GetSession round trip.
    assert!(
        late <= Duration::from_millis(1200),
        "left ACTIVE {late:?} after its deadline"
    );
    eventually!(
        {
            let got = c
                .get_session(get.clone())
                .await
                .unwrap()
                .into_inner()
                .session
                .unwrap();
            got.status() == SessionStatus::Terminated
        },
        30
    );
    let ended = c
        .get_session(get.clone())
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(ended.end_reason(), EndReason::Expired);
    eventually!(!pid_alive(pid), 10);

    let s = capsa_e2e::create_default_session(&mut c).await;
    let pid = stack.vmm_pid(0, &s.vm_id).await;
    let deleted = c
        .delete_session(DeleteSessionRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(deleted.end_reason(), EndReason::Deleted);
    eventually!(!pid_alive(pid), 10);
    let err = exec::try_run(&mut c, exec::request(&s.id, Language::Python, "1", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("deleted") || err.message().contains("DELETED"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_vm_that_dies_mid_execute_ends_the_stream_and_the_session() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut c = stack.client(0).await;
    let s = capsa_e2e::create_default_session(&mut c).await;
    let pid = stack.vmm_pid(0, &s.vm_id).await;
    let mut stream = c
        .execute(exec::request(
            &s.id,
            Language::Python,
            "import time\nprint('up', flush=True)\ntime.sleep(600)",
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("first chunk");
    signal(pid, "KILL");
    let killed_at = Instant::now();
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("stream must end, not hang")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without an error"),
            Err(status) => break status,
        }
    };
    eprintln!("stream ended {:?} after the kill", killed_at.elapsed());
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    eventually!(
        {
            let got = c
                .get_session(GetSessionRequest {
                    session_id: s.id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .session
                .unwrap();
            got.status() == SessionStatus::Terminated && got.end_reason() == EndReason::VmFailed
        },
        15
    );
}

#[tokio::test]
async fn usage_reflects_cpu_memory_and_disk_work_and_the_final_record_is_written_once() {
    let stack = Stack::start(StackOptions {
        metering_replicas: 2,
        ..Default::default()
    })
    .await;
    let mut c = stack.client(0).await;
    let s = c
        .create_session(CreateSessionRequest {
            memory_mib: 1024,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let usage = |c: &mut capsa_e2e::Client| {
        let mut c = c.clone();
        let id = s.id.clone();
        async move {
            c.get_usage(GetUsageRequest { session_id: id })
                .await
                .unwrap()
                .into_inner()
                .usage
                .unwrap()
        }
    };
    eventually!(usage(&mut c).await.sample_time.is_some(), 30);

    let before = usage(&mut c).await;
    let cpu = |u: &capsa_proto::common::v1::Usage| {
        capsa_proto::time::from_duration(u.cpu_time.as_ref().unwrap()).unwrap()
    };
    let out = python(
        &mut c,
        &s.id,
        "import time\nt = time.process_time()\nwhile time.process_time() - t < 2: pass",
    )
    .await;
    assert!(out.errors.is_empty());
    eventually!(
        cpu(&usage(&mut c).await) >= cpu(&before) + Duration::from_millis(1500),
        30
    );

    let out = python(&mut c, &s.id, "blob = b'x' * (200 * 1024 * 1024)").await;
    assert!(out.errors.is_empty(), "{out:?}");
    eventually!(
        usage(&mut c).await.memory_used_bytes >= before.memory_used_bytes + 150_000_000,
        30
    );
    assert!(usage(&mut c).await.memory_peak_bytes >= usage(&mut c).await.memory_used_bytes);
    // Memory the guest frees goes back to the host (free page reporting): the VMM's
    // resident size falls again, while its peak keeps the high-water mark.
    let filled = usage(&mut c).await.vmm_resident_bytes;
    let out = python(&mut c, &s.id, "del blob").await;
    assert!(out.errors.is_empty(), "{out:?}");
    eventually!(
        usage(&mut c).await.vmm_resident_bytes + 120_000_000 <= filled,
        60
    );
    assert!(usage(&mut c).await.vmm_resident_peak_bytes >= filled);

    let out = shell(
        &mut c,
        &s.id,
        "dd if=/dev/urandom of=/root/disk.bin bs=1M count=64 conv=fsync status=none",
    )
    .await;
    assert_eq!(
        out.completion().exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually!(
        usage(&mut c).await.disk_write_bytes >= before.disk_write_bytes + 64 * 1024 * 1024,
        30
    );

    c.delete_session(DeleteSessionRequest {
        session_id: s.id.clone(),
    })
    .await
    .unwrap();
    // Two metering replicas ran; the stream holds exactly one final record for the session.
    let count_final = || {
        let script = "local n = 0 \
            for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do \
              local f, sid, kind = e[2], nil, nil \
              for i = 1, #f, 2 do \
                if f[i] == 'session_id' then sid = f[i + 1] elseif f[i] == 'kind' then kind = f[i + 1] end \
              end \
              if sid == ARGV[1] and kind == 'final' then n = n + 1 end \
            end return n";
        let out = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &stack.redis.port().to_string(),
                "EVAL",
                script,
                "1",
                "{capsa}:usage:records",
                &s.id,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .unwrap_or(0)
    };
    eventually!(count_final() >= 1, 15);
    // Give both replicas' loops time to (wrongly) append a second record before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count_final(), 1);
}

/// Sends `signal` (`STOP`, `CONT`, ...) to `pid` with kill(1).
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// A node that stalls (vm-pool stopped for 15 s; a long pause or a CPU-starved host looks
/// the same) misses its heartbeats, but its VMs are healthy: the session stays ACTIVE
/// and keeps its state. (Before the grace period it ended VM_FAILED within seconds.)
#[tokio::test]
async fn a_node_stalled_for_fifteen_seconds_keeps_its_sessions() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut c = stack.client(0).await;
    let s = capsa_e2e::create_default_session(&mut c).await;
    python(&mut c, &s.id, "x = 42").await;
    let nodes =
        capsa_store::NodeRegistry::new(capsa_store::connect(&stack.redis.url()).await.unwrap());

    let pool = stack.vm_pool.pid();
    signal(pool, "STOP");
    let stopped_at = Instant::now();
    // Resumed even if an assertion below fails, so the stack's teardown can stop it.
    struct Resume(u32);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &self.0.to_string()])
                .status();
        }
    }
    let resume = Resume(pool);
    eventually!(matches!(nodes.get("e2e-node").await, Ok(None)), 30);
    let get = GetSessionRequest {
        session_id: s.id.clone(),
    };
    // Watched for the whole stall.
    while stopped_at.elapsed() < Duration::from_secs(15) {
        let now = c
            .get_session(get.clone())
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        assert_eq!(now.status, SessionStatus::Active as i32, "{now:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(resume);
    eventually!(matches!(nodes.get("e2e-node").await, Ok(Some(_))), 30);
    let after = c
        .get_session(get)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(after.status, SessionStatus::Active as i32, "{after:?}");
    assert_eq!(
        python(&mut c, &s.id, "print(x)").await.stdout_text(),
        "42\n"
    );
}
