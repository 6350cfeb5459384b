//! A real `redis-server` per test: port 0 is not supported by Redis, so a free port is
//! found by binding and releasing it, then confirmed by the server's own readiness.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`; killed and its data dir removed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    durable: bool,
    cluster: bool,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` (from `$CAPSA_REDIS_SERVER` or `PATH`) on a free loopback port.
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// Like [`RedisServer::start`], with an append-only file fsynced on every write, so a
    /// [`RedisServer::restart`] (a SIGKILL) loses nothing the server acknowledged.
    pub fn start_durable() -> RedisServer {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> RedisServer {
        Self::start_as(durable, false)
    }

    fn start_as(durable: bool, cluster: bool) -> RedisServer {
        for _attempt in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("temp dir for redis");
            let child = spawn(port, dir.path(), durable, cluster);
            let mut server = RedisServer {
                child,
                port,
                durable,
                cluster,
                _dir: dir,
            };
            if server.wait_ready(Duration::from_secs(10)) {
                return server;
            }
        }
        panic!("redis-server did not come up after 5 attempts");
    }

    /// Kills the server with SIGKILL (a crash, no save), leaves it down for `down`, and
    /// starts it again on the same port and data dir; a durable server reloads its
    /// append-only file. Blocks the calling thread meanwhile.
    pub fn restart(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        // The port is free once the old server is reaped; another process may take it in
        // between, which only a retry can tell.
        for _attempt in 0..5 {
            self.child = spawn(self.port, self._dir.path(), self.durable, self.cluster);
            if self.wait_ready(Duration::from_secs(30)) {
                return;
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("redis-server did not come back on port {}", self.port);
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        self._dir.path()
    }

    fn wait_ready(&mut self, timeout: Duration) -> bool {
        use std::io::{Read, Write};
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false; // exited: most likely the port was taken meanwhile
            }
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let mut buf = [0u8; 7];
                // Anything but PONG (`-LOADING` while an append-only file loads): ask again.
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of three masters (no replicas: the slots are what the tests need), each a
/// [`RedisServer`]; every server is killed on drop.
pub struct RedisCluster {
    servers: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers and joins them (`redis-cli --cluster create`),
    /// once every node reports `cluster_state:ok` (60 s at most).
    pub fn start() -> RedisCluster {
        let servers: Vec<RedisServer> =
            (0..3).map(|_| RedisServer::start_as(false, true)).collect();
        let cli = std::env::var("CAPSA_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into());
        let out = Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(servers.iter().map(|s| format!("127.0.0.1:{}", s.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cli} (install redis-tools): {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        for s in &servers {
            loop {
                let info = Command::new(&cli)
                    .args(["-p", &s.port.to_string(), "CLUSTER", "INFO"])
                    .output()
                    .expect("redis-cli CLUSTER INFO");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster node on {} is not ok after 60 s",
                    s.port
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        RedisCluster { servers }
    }

    /// `redis+cluster://127.0.0.1:<port>,...` (capsa-store's cluster URL).
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// The ports of its servers.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.iter().map(|s| s.port).collect()
    }
}

/// `redis-server` on `port` with its data in `dir`.
fn spawn(port: u16, dir: &Path, durable: bool, cluster: bool) -> Child {
    let bin = std::env::var("CAPSA_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let mut cmd = Command::new(&bin);
    // Dies with the test process even when that one is killed without unwinding.
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let aof: &[&str] = if durable {
        &["--appendonly", "yes", "--appendfsync", "always"]
    } else {
        &["--appendonly", "no"]
    };
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ])
    .args(aof)
    .args(["--protected-mode", "no"])
    .args(if cluster {
        &["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"][..]
    } else {
        &[][..]
    })
    // As deployed: a memory limit, and never evict session state.
    .args(["--maxmemory", "512mb", "--maxmemory-policy", "noeviction"])
    .arg("--dir")
    .arg(dir)
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap_or_else(|e| panic!("cannot start {bin} (install redis-server): {e}"))
}

/// A TCP port free on 127.0.0.1 right now (for servers that cannot listen on port 0).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
