//! What happens to VMMs when vm-pool dies abruptly.
//! - By default the kernel kills them with it (`PR_SET_PDEATHSIG`): nothing outlives it
//!   but their dirs and cgroups, which the next vm-pool on the same state dir removes.
//! - With `--orphan-vms-on-crash` they survive as orphans; the next vm-pool on the same
//!   state dir verifies they are ours, kills them and removes their dirs at start-up.

mod common;

use capsa_test_support::eventually;
use common::{PoolUnderTest, pid_alive, wait_warm};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reaps_the_orphans_of_a_crashed_pool() {
    let mut pool = PoolUnderTest::start(&["--warm", "1", "--orphan-vms-on-crash"]).await;
    let mut c = pool.client().await;
    wait_warm(&mut c, 1).await;
    let old = pool.vm_processes();
    assert_eq!(old.len(), 1, "one qemu per vm: {old:?}");
    let old_dirs: Vec<_> = std::fs::read_dir(pool.vms_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(old_dirs.len(), 1);

    pool.crash().await;
    // Orphaned, not dead: the VMMs outlive the pool.
    for &pid in &old {
        assert!(
            pid_alive(pid),
            "pid {pid} died with the pool; it should be an orphan"
        );
    }

    pool.restart(&["--warm", "0"]).await;
    eventually!(old.iter().all(|&pid| !pid_alive(pid)), 30);
    eventually!(old_dirs.iter().all(|d| !d.exists()), 30);
    assert!(pool.vm_processes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_vmms_die_with_a_crashed_pool() {
    let mut pool = PoolUnderTest::start(&["--warm", "1"]).await;
    let mut c = pool.client().await;
    wait_warm(&mut c, 1).await;
    let old = pool.vm_processes();
    assert_eq!(old.len(), 1, "one qemu per vm: {old:?}");
    // The VMs' cgroups, as each VM dir names them: dead VMMs leave them (and their dirs)
    // behind, for the next vm-pool on this state dir to remove.
    let mut old_cgroups = Vec::new();
    for dir in std::fs::read_dir(pool.vms_dir()).unwrap().flatten() {
        let text = std::fs::read_to_string(dir.path().join(capsa_vmm::layout::CGROUP)).unwrap();
        let id = dir.file_name().into_string().unwrap();
        old_cgroups.extend(capsa_vmm::cgroup::VmCgroup::from_file(&text, &id).dirs);
    }
    assert!(!old_cgroups.is_empty(), "each vm in a cgroup");
    assert!(old_cgroups.iter().all(|d| d.is_dir()));

    pool.crash().await;
    eventually!(old.iter().all(|&pid| !pid_alive(pid)), 30);

    pool.restart(&["--warm", "0"]).await;
    eventually!(old_cgroups.iter().all(|d| !d.exists()), 30);
    eventually!(std::fs::read_dir(pool.vms_dir()).unwrap().count() == 0, 30);
}
