//! Fixtures for vm-pool's integration tests: the guest image, a vm-pool process on
//! `127.0.0.1:0` with its own state dir, and process accounting. Whatever happens, a
//! [`PoolUnderTest`] leaves no VMM behind: on drop it kills vm-pool and reaps every VMM
//! pointing into its state dir, then its network namespace, veth and nftables table.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use capsa_proto::common::v1::EgressPolicy;
use capsa_proto::vmpool::v1::vm_pool_service_client::VmPoolServiceClient;
use capsa_proto::vmpool::v1::{AcquireVmRequest, GetNodeInfoRequest, ListVmsRequest, Vm, VmState};
use capsa_test_support::ServiceProcess;
use tonic::transport::Channel;

/// Generous: software-emulated boots on a 2-core machine shared with other test binaries.
pub const BOOT_WAIT_SECS: u64 = 300;

/// vm-pool's own bound on one boot, as in production (its default): healthy boots take 4 to
/// 15 s here even on saturated cores, and a boot that hangs (its agent up, its health check
/// never answered over vsock: seen about once in a few hundred boots) must fail and be
/// replaced well within [`BOOT_WAIT_SECS`], not hold a pool slot for all of it.
pub const BOOT_TIMEOUT_SECS: u64 = 60;

pub fn image_dir() -> PathBuf {
    let dir = std::env::var_os("CAPSA_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache =
                std::env::var_os("CAPSA_CACHE_DIR").unwrap_or_else(|| "/var/cache/capsa".into());
            PathBuf::from(cache).join("images/current")
        });
    assert!(
        dir.join("manifest.json").is_file(),
        "no guest image at {}: build it first (cargo build --release -p capsa-guest-agent && \
         deploy/guest/build-image.sh --agent target/release/capsa-agent) or set CAPSA_IMAGE_DIR",
        dir.display()
    );
    dir
}

pub struct PoolUnderTest {
    pub process: Option<ServiceProcess>,
    pub state: tempfile::TempDir,
}

impl PoolUnderTest {
    /// Starts vm-pool with `extra` args on a fresh state dir.
    pub async fn start(extra: &[&str]) -> PoolUnderTest {
        let state = tempfile::Builder::new()
            .prefix("capsa-vmpool-test-")
            .tempdir()
            .unwrap();
        let process = Some(start_process(state.path(), extra).await);
        PoolUnderTest { process, state }
    }

    /// Starts another vm-pool on the same state dir (after the previous one was killed).
    pub async fn restart(&mut self, extra: &[&str]) {
        assert!(self.process.is_none(), "kill the previous process first");
        self.process = Some(start_process(self.state.path(), extra).await);
    }

    pub fn process(&self) -> &ServiceProcess {
        self.process.as_ref().expect("vm-pool running")
    }

    pub async fn client(&self) -> VmPoolServiceClient<Channel> {
        VmPoolServiceClient::connect(self.process().url())
            .await
            .unwrap()
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.state.path().join("vms")
    }

    /// SIGKILLs vm-pool alone (not its process group), as a crash would.
    pub async fn crash(&mut self) {
        let p = self.process.take().expect("vm-pool running");
        let pid = p.pid();
        // SAFETY: kill(2) on the vm-pool process this fixture started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        capsa_test_support::eventually!(!pid_alive(pid), 10);
        // Dropping the handle kills its (now empty) process group; the VMMs have their own.
        drop(p);
    }

    /// The names of this vm-pool's network objects (its default, from the state dir).
    pub fn net_names(&self) -> capsa_vm_pool::net::Names {
        capsa_vm_pool::net::Names::new(&capsa_vm_pool::net::Names::default_netns(self.state.path()))
    }

    /// VMM processes pointing into this state dir.
    pub fn vm_processes(&self) -> Vec<u32> {
        vm_processes(&self.vms_dir())
    }

    /// The processes of one VM (its VMM), whatever else the pool runs.
    pub fn processes_of(&self, vm_id: &str) -> Vec<u32> {
        vm_processes(&self.vms_dir().join(vm_id))
    }
}

impl Drop for PoolUnderTest {
    fn drop(&mut self) {
        drop(self.process.take());
        let vms = self.vms_dir();
        let names = self.net_names();
        // A fresh thread: Drop may run inside the test's runtime, which cannot block on
        // another.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            if let Ok(reaped) = rt.block_on(capsa_vmm::orphans::reap(&vms))
                && !reaped.killed.is_empty()
            {
                eprintln!(
                    "test cleanup killed leftover vm processes {:?}",
                    reaped.killed
                );
            }
            // After the VMMs: a namespace lives as long as a process in it.
            if let Err(e) = rt.block_on(capsa_vm_pool::net::reap(&names)) {
                eprintln!("test cleanup could not remove the vm network: {e}");
            }
        })
        .join();
    }
}

async fn start_process(state: &Path, extra: &[&str]) -> ServiceProcess {
    start_process_with_env(state, extra, &[]).await
}

pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Live processes named like a VMM whose arguments point into `vms_dir`.
pub fn vm_processes(vms_dir: &Path) -> Vec<u32> {
    let prefix = format!("{}/", vms_dir.display());
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let name = args
                .first()
                .map(|a| a.rsplit('/').next().unwrap_or("").to_owned())
                .unwrap_or_default();
            (name.starts_with("qemu-system") || name == "cloud-hypervisor")
                && args.iter().any(|a| a.contains(&prefix))
                && pid_alive(pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Waits until the pool reports `n` warm VMs of the default template.
pub async fn wait_warm(client: &mut VmPoolServiceClient<Channel>, n: u32) {
    capsa_test_support::eventually!(
        {
            let info = client
                .get_node_info(GetNodeInfoRequest {})
                .await
                .unwrap()
                .into_inner();
            info.pools
                .iter()
                .any(|p| p.template == "default" && p.warm >= n)
        },
        BOOT_WAIT_SECS
    );
}

/// Leases a VM of the default template under `lease`, with `egress` (none: the node's
/// default).
pub async fn acquire(
    client: &mut VmPoolServiceClient<Channel>,
    lease: &str,
    egress: Option<EgressPolicy>,
) -> Vm {
    client
        .acquire_vm(AcquireVmRequest {
            lease_id: lease.into(),
            egress,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap()
}

pub async fn list(client: &mut VmPoolServiceClient<Channel>) -> Vec<Vm> {
    client
        .list_vms(ListVmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vms
}

pub async fn warm_vms(client: &mut VmPoolServiceClient<Channel>) -> Vec<Vm> {
    list(client)
        .await
        .into_iter()
        .filter(|v| v.state == VmState::Warm as i32)
        .collect()
}

impl PoolUnderTest {
    /// Like [`PoolUnderTest::start`], with extra environment variables for vm-pool.
    pub async fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> PoolUnderTest {
        let state = tempfile::Builder::new()
            .prefix("capsa-vmpool-test-")
            .tempdir()
            .unwrap();
        let process = Some(start_process_with_env(state.path(), extra, env).await);
        PoolUnderTest { process, state }
    }
}

async fn start_process_with_env(
    state: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> ServiceProcess {
    let image = image_dir();
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--state-dir".into(),
        state.display().to_string(),
        "--image-dir".into(),
        image.display().to_string(),
        "--max-concurrent-boots".into(),
        "2".into(),
        "--boot-timeout-secs".into(),
        BOOT_TIMEOUT_SECS.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    ServiceProcess::start_with_env("capsa-vm-pool", &args, env).await
}

/// File descriptors process `pid` holds.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Runs `code` in the guest's shell through its agent; returns (exit code, stdout+stderr).
/// `on_output` sees the output so far after every chunk (e.g. to act mid-run).
pub async fn shell_with(
    vsock: &Path,
    code: &str,
    mut on_output: impl AsyncFnMut(&str),
) -> (i32, String) {
    use capsa_proto::agent::v1::ExecuteRequest;
    use capsa_proto::agent::v1::agent_service_client::AgentServiceClient;
    use capsa_proto::common::v1::{ExecuteSpec, Language, execute_event};
    let channel = capsa_vsock::channel(vsock.to_owned(), capsa_vsock::AGENT_PORT);
    let mut agent = AgentServiceClient::new(channel);
    let mut stream = agent
        .execute(ExecuteRequest {
            spec: Some(ExecuteSpec {
                language: Language::Shell as i32,
                code: code.into(),
                // Generous: the isolation test fills the guest's disk under TCG.
                timeout: Some(prost_types::Duration {
                    seconds: 900,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = String::new();
    while let Some(msg) = stream.message().await.unwrap() {
        match msg.event.and_then(|e| e.event) {
            Some(execute_event::Event::Stdout(c) | execute_event::Event::Stderr(c)) => {
                out.push_str(&String::from_utf8_lossy(&c.data));
                on_output(&out).await;
            }
            Some(execute_event::Event::Completion(c)) => return (c.exit_code, out),
            _ => {}
        }
    }
    panic!("execute ended without a completion: {out}");
}

pub async fn shell(vsock: &Path, code: &str) -> (i32, String) {
    shell_with(vsock, code, async |_: &str| {}).await
}
