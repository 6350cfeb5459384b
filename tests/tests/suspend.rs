//! Suspend and resume on real VMs through the public API: everything a session had is back
//! after a resume on a new VM (Python variables, the shell's state, files, a pip-installed
//! package, a background process, a correct clock, a working network with a new address),
//! nothing is billed while suspended, the snapshot's disk space goes when the session does,
//! and auto_suspend parks a session at its deadline for auto_resume to bring back.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsa_e2e::exec;
use capsa_e2e::{Client, Stack, StackOptions, disk_usage};
use capsa_proto::common::v1::{EgressPolicy, Language};
use capsa_proto::session::v1 as pb;
use capsa_test_support::eventually;

use capsa_e2e::exec::{python_stdout as py, shell_stdout as sh};

async fn get(c: &mut Client, sid: &str) -> pb::Session {
    c.get_session(pb::GetSessionRequest {
        session_id: sid.into(),
    })
    .await
    .expect("get session")
    .into_inner()
    .session
    .expect("a session")
}

async fn cpu_us(c: &mut Client, sid: &str) -> i64 {
    let usage = c
        .get_usage(pb::GetUsageRequest {
            session_id: sid.into(),
        })
        .await
        .expect("usage")
        .into_inner()
        .usage
        .expect("a usage");
    let cpu = usage.cpu_time.unwrap_or_default();
    cpu.seconds * 1_000_000 + i64::from(cpu.nanos) / 1000
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn a_resumed_session_has_everything_it_had_and_nothing_is_billed_between() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut c = stack.client(0).await;
    let s = c
        .create_session(pb::CreateSessionRequest {
            lifetime: Some(capsa_proto::time::duration(Duration::from_secs(1800))),
            egress: Some(EgressPolicy {
                allow_package_managers: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .session
        .unwrap();
    let snapshots = stack.vm_state_dir().join("snapshots");
    let disk_before = disk_usage(&snapshots);

    py(
        &mut c,
        &s.id,
        "x = 41\nimport random\nbefore = random.random()",
    )
    .await;
    sh(
        &mut c,
        &s.id,
        "cd /tmp && MARK=seven && echo kept > /root/kept.txt",
    )
    .await;
    sh(
        &mut c,
        &s.id,
        "pip install --no-cache-dir --disable-pip-version-check tabulate==0.9.0 >/root/pip.log 2>&1 || { cat /root/pip.log; exit 1; }",
    )
    .await;
    let sleeper = sh(&mut c, &s.id, "sleep 1000 >/dev/null 2>&1 & echo $!").await;
    let sleeper = sleeper.trim().to_string();
    let address_before = sh(&mut c, &s.id, "ip -4 -o addr show eth0 | awk '{print $4}'").await;
    // The image ships none; a restored guest gets its own.
    let machine_id_before = sh(&mut c, &s.id, "cat /etc/machine-id 2>/dev/null; true").await;
    let old_vmm = stack.vmm_pid(0, &s.vm_id).await;

    let suspended = c
        .suspend_session(pb::SuspendSessionRequest {
            session_id: s.id.clone(),
        })
        .await
        .expect("suspend")
        .into_inner()
        .session
        .unwrap();
    assert_eq!(suspended.status(), pb::SessionStatus::Suspended);
    assert_eq!(suspended.vm_id, "");
    assert!(suspended.snapshot_bytes > 0);
    assert!(
        !Path::new(&format!("/proc/{old_vmm}")).exists(),
        "the VMM {old_vmm} is gone"
    );
    let disk_suspended = disk_usage(&snapshots);
    assert!(
        disk_suspended > disk_before + (1 << 20),
        "the snapshot takes disk: {disk_before} -> {disk_suspended}"
    );
    // Nothing billed while suspended: cpu stands still over 5 s of metering samples.
    let cpu_at_suspend = cpu_us(&mut c, &s.id).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(cpu_us(&mut c, &s.id).await, cpu_at_suspend);
    // Without auto_resume, a call says how to bring it back.
    let refused = exec::try_run(&mut c, exec::request(&s.id, Language::Python, "x", 0))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("ResumeSession"),
        "{}",
        refused.message()
    );
    // Asleep for a while: the guest clock must be set right on resume.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let resumed = c
        .resume_session(pb::ResumeSessionRequest {
            session_id: s.id.clone(),
        })
        .await
        .expect("resume")
        .into_inner()
        .session
        .unwrap();
    assert_eq!(resumed.status(), pb::SessionStatus::Active);
    assert!(!resumed.vm_id.is_empty() && resumed.vm_id != s.vm_id);

    assert_eq!(py(&mut c, &s.id, "print(x + 1)").await.trim(), "42");
    assert_eq!(
        sh(&mut c, &s.id, "echo $MARK $(pwd)").await.trim(),
        "seven /tmp"
    );
    assert_eq!(sh(&mut c, &s.id, "cat /root/kept.txt").await.trim(), "kept");
    assert_eq!(
        py(
            &mut c,
            &s.id,
            "import tabulate\nprint(tabulate.__version__)"
        )
        .await
        .trim(),
        "0.9.0"
    );
    sh(&mut c, &s.id, &format!("kill -0 {sleeper}")).await;
    let guest_now: i64 = sh(&mut c, &s.id, "date +%s").await.trim().parse().unwrap();
    assert!(
        (guest_now - now_secs()).abs() <= 2,
        "guest clock {guest_now} vs host {}",
        now_secs()
    );
    // Its own identity: the new VM's network slot (vm-pool may hand out the freed slot
    // again, so the address may be the same; tests/suspend.rs of vm-pool checks it is the
    // new slot's), a new machine-id; and the network works from there.
    let address_after = sh(&mut c, &s.id, "ip -4 -o addr show eth0 | awk '{print $4}'").await;
    assert!(
        address_after.trim().ends_with("/30"),
        "{address_after:?} (was {address_before:?})"
    );
    let machine_id = sh(&mut c, &s.id, "cat /etc/machine-id").await;
    assert_eq!(machine_id.trim().len(), 32, "{machine_id:?}");
    assert_ne!(machine_id, machine_id_before);
    let resolved = py(
        &mut c,
        &s.id,
        "import socket\nprint(bool(socket.getaddrinfo('pypi.org', 443)))",
    )
    .await;
    assert_eq!(resolved.trim(), "True");
    // Billing carries on from where it was.
    assert!(cpu_us(&mut c, &s.id).await >= cpu_at_suspend);

    // A second suspend, then deleting the session deletes its snapshot.
    c.suspend_session(pb::SuspendSessionRequest {
        session_id: s.id.clone(),
    })
    .await
    .expect("suspend again");
    assert!(disk_usage(&snapshots) > disk_before + (1 << 20));
    let ended = c
        .delete_session(pb::DeleteSessionRequest {
            session_id: s.id.clone(),
        })
        .await
        .expect("delete")
        .into_inner()
        .session
        .unwrap();
    assert_eq!(ended.status(), pb::SessionStatus::Terminated);
    let disk_after = disk_usage(&snapshots);
    assert!(
        disk_after <= disk_before,
        "the snapshot's space is freed: {disk_before} -> {disk_suspended} -> {disk_after}"
    );
}

#[tokio::test]
async fn auto_suspend_parks_a_session_at_its_deadline_and_execute_brings_it_back() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut c = stack.client(0).await;
    let s = c
        .create_session(pb::CreateSessionRequest {
            lifetime: Some(capsa_proto::time::duration(Duration::from_secs(15))),
            auto_suspend: true,
            auto_resume: true,
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .session
        .unwrap();
    py(&mut c, &s.id, "kept = 'across the deadline'").await;
    eventually!(
        get(&mut c, &s.id).await.status() == pb::SessionStatus::Suspended,
        120
    );
    let parked = get(&mut c, &s.id).await;
    assert!(parked.expire_time.unwrap().seconds > s.expire_time.unwrap().seconds + 3600);
    // Execute resumes it first.
    assert_eq!(
        py(&mut c, &s.id, "print(kept)").await.trim(),
        "across the deadline"
    );
    let back = get(&mut c, &s.id).await;
    assert_eq!(back.status(), pb::SessionStatus::Active);
    assert_ne!(back.vm_id, s.vm_id);
    c.delete_session(pb::DeleteSessionRequest {
        session_id: s.id.clone(),
    })
    .await
    .expect("delete");
}
