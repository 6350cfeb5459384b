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
        for _attempt in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("temp dir for redis");
            let child = spawn(port, dir.path(), durable);
            let mut server = RedisServer {
                child,
                port,
                durable,
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
            self.child = spawn(self.port, self._dir.path(), self.durable);
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

/// `redis-server` on `port` with its data in `dir`.
fn spawn(port: u16, dir: &Path, durable: bool) -> Child {
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
