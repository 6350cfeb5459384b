//! Service binaries as child processes. Every Capsa service prints `CAPSA_LISTENING=<addr>`
//! on stdout once its listener is bound, so tests start them on `127.0.0.1:0` with no fixed
//! ports and no sleeps.

use std::path::PathBuf;
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// Path of a binary built in this workspace's target dir (`target/<profile>/<name>`), found
/// from the running executable: a test (`target/<profile>/deps/<test>`) or a bench binary
/// (`target/<profile>/<bench>`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().expect("target/<profile>")
    } else {
        dir
    };
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo nextest run --workspace` (or build it first)",
        path.display()
    );
    path
}

/// Runs workspace binary `name` to its exit and returns its status and output; for
/// start-up failures (exit codes, messages). Panics if it still runs after 60 s (it is
/// then killed).
pub async fn run_to_exit(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    run_to_exit_within(name, args, env, Duration::from_secs(60)).await
}

/// [`run_to_exit`] for a longer run (a bench on real VMs): panics if it still runs after
/// `limit` (it is then killed).
pub async fn run_to_exit_within(
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> Output {
    let mut cmd = Command::new(workspace_binary(name));
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{name} {args:?} still runs after {limit:?}"))
        .unwrap_or_else(|e| panic!("run {name}: {e}"))
}

/// A running service; killed (SIGKILL to its process group) on drop.
pub struct ServiceProcess {
    child: Child,
    addr: String,
    name: String,
}

impl ServiceProcess {
    /// Starts workspace binary `name` with `args` (which should include
    /// `--listen 127.0.0.1:0`) and waits up to 60 s for its `CAPSA_LISTENING=` line.
    pub async fn start(name: &str, args: &[String]) -> ServiceProcess {
        Self::start_with_env(name, args, &[]).await
    }

    /// Like [`ServiceProcess::start`], with extra environment variables.
    pub async fn start_with_env(
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> ServiceProcess {
        Self::start_with_stderr(name, args, env, Stdio::inherit()).await
    }

    /// Like [`ServiceProcess::start_with_env`], with the service's stderr sent to `stderr`
    /// (a file, for a test that reads what the service logged).
    pub async fn start_with_stderr(
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> ServiceProcess {
        let mut cmd = Command::new(workspace_binary(name));
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .process_group(0);
        // If the test process dies without unwinding (killed by a timeout or Ctrl-C), the
        // service gets SIGTERM from the kernel, so vm-pool still destroys its VMs.
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.strip_prefix("CAPSA_LISTENING=") {
                    return Some(addr.trim().to_string());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("{name} exited or never printed CAPSA_LISTENING="));
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServiceProcess {
            child,
            addr,
            name: name.to_string(),
        }
    }

    /// The bound address, e.g. `127.0.0.1:41234`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://<addr>`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Sends SIGTERM and returns the exit status once the process has exited; panics if it
    /// is still running after `grace` (it is then killed, with its process group).
    pub async fn terminate(mut self, grace: Duration) -> ExitStatus {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) with a pid we own; no memory is touched.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.unwrap_or_else(|e| panic!("wait for {}: {e}", self.name)),
            Err(_) => panic!("{} ignored SIGTERM for {grace:?}", self.name),
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // The whole group: a service's own children (VMMs) must not outlive a test.
            // SAFETY: kill(2) on our child's process group.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
    }
}
