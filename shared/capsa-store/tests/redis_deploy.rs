//! How Redis is deployed for real, against real `redis-server`s: a password, TLS
//! (`rediss://`, the server's certificate from `deploy/scripts/certs.sh`), and Sentinel (one
//! master, one sentinel; and a failover followed by an open connection). Each server is
//! killed on drop, failure or not.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsa_test_support::free_port;
use redis::AsyncCommands as _;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redis-server` with `args`, once `port` accepts connections (30 s at most).
fn redis_server(dir: &Path, port: u16, args: &[&str]) -> Server {
    let child = Command::new("redis-server")
        .args(args)
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis on {port} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// A sentinel (its config in `dir`) watching the master on `master_port` as `capsa-master`,
/// with `extra` config lines.
fn sentinel(dir: &Path, port: u16, master_port: u16, password: &str, extra: &str) -> Server {
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\n\
             sentinel monitor capsa-master 127.0.0.1 {master_port} 1\n\
             sentinel auth-pass capsa-master {password}\n{extra}"
        ),
    )
    .unwrap();
    redis_server(dir, port, &[conf.to_str().unwrap(), "--sentinel"])
}

fn certs(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/scripts/certs.sh");
    let out = Command::new("bash").arg(script).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn set_get(url: &str) -> Result<String, capsa_store::StoreError> {
    let mut conn = capsa_store::connect(url).await?;
    let _: () = conn.set("{capsa}:deploy-test", "v").await?;
    Ok(conn.get("{capsa}:deploy-test").await?)
}

#[tokio::test]
async fn a_password_protected_redis_needs_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis_server(
        dir.path(),
        port,
        &["--port", &port.to_string(), "--requirepass", "pw-1"],
    );
    assert_eq!(
        set_get(&format!("redis://:pw-1@127.0.0.1:{port}/"))
            .await
            .unwrap(),
        "v"
    );
    for bad in [
        format!("redis://:wrong@127.0.0.1:{port}/"),
        format!("redis://127.0.0.1:{port}/"),
    ] {
        let err = set_get(&bad).await.expect_err(&bad);
        assert!(!format!("{err:?}").contains("wrong"), "{err:?}");
    }
}

#[tokio::test]
async fn rediss_checks_the_server_against_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    certs(&tls);
    let port = free_port();
    let file = |name: &str| tls.join(name).display().to_string();
    let _redis = redis_server(
        dir.path(),
        port,
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &file("public.pem"),
            "--tls-key-file",
            &file("public.key"),
            "--tls-ca-cert-file",
            &file("ca.pem"),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "pw-2",
        ],
    );
    let url = format!("rediss://:pw-2@127.0.0.1:{port}/");
    // Without the CA among the roots the server is not trusted; with it (the documented
    // SSL_CERT_FILE) it is. This test's process is its own (nextest), so the variable is ours.
    // SAFETY: no other thread of this test reads the environment meanwhile.
    unsafe { std::env::set_var("SSL_CERT_FILE", tls.join("public.pem")) };
    assert!(
        set_get(&url).await.is_err(),
        "a server outside the roots was trusted"
    );
    unsafe { std::env::set_var("SSL_CERT_FILE", tls.join("ca.pem")) };
    assert_eq!(set_get(&url).await.unwrap(), "v");
    // Plaintext to the TLS port fails.
    assert!(
        set_get(&format!("redis://:pw-2@127.0.0.1:{port}/"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn sentinel_urls_find_the_master() {
    let dir = tempfile::tempdir().unwrap();
    let master_port = free_port();
    let _master = redis_server(
        dir.path(),
        master_port,
        &["--port", &master_port.to_string(), "--requirepass", "pw-3"],
    );
    let sentinel_port = free_port();
    let _sentinel = sentinel(dir.path(), sentinel_port, master_port, "pw-3", "");
    let url = format!("redis+sentinel://:pw-3@127.0.0.1:{sentinel_port}/capsa-master");
    // The sentinel knows the master as soon as it has read its config.
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        match set_get(&url).await {
            Ok(v) => break v,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no master through the sentinel within 30 s: {e:?}"),
        }
    };
    assert_eq!(got, "v");
    // The write went to the master itself.
    let mut direct = capsa_store::connect(&format!("redis://:pw-3@127.0.0.1:{master_port}/"))
        .await
        .unwrap();
    let v: String = direct.get("{capsa}:deploy-test").await.unwrap();
    assert_eq!(v, "v");
    // An unknown master name is an error, not a hang.
    let unknown = format!("redis+sentinel://:pw-3@127.0.0.1:{sentinel_port}/nope");
    assert!(
        tokio::time::timeout(Duration::from_secs(30), set_get(&unknown))
            .await
            .expect("unknown master: no answer within 30 s")
            .is_err()
    );
}

/// `redis-cli -p port args...` stdout.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A failover (SENTINEL FAILOVER: the master demoted to a replica, its replica promoted) is
/// followed by the connection already open: its next writes land on the new master, with
/// no restart.
#[tokio::test]
async fn a_sentinel_failover_is_followed_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (master_port, replica_port, sentinel_port) = (free_port(), free_port(), free_port());
    let auth = ["--requirepass", "pw-4", "--masterauth", "pw-4"];
    let sub = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let _master = redis_server(
        &sub("a"),
        master_port,
        &[&["--port", &master_port.to_string()][..], &auth].concat(),
    );
    let _replica = redis_server(
        &sub("b"),
        replica_port,
        &[
            &["--port", &replica_port.to_string()][..],
            &auth,
            &["--replicaof", "127.0.0.1", &master_port.to_string()],
        ]
        .concat(),
    );
    let _sentinel = sentinel(
        &sub("s"),
        sentinel_port,
        master_port,
        "pw-4",
        "sentinel down-after-milliseconds capsa-master 2000\n\
         sentinel failover-timeout capsa-master 10000\n",
    );
    // The sentinel learns of the replica from the master's INFO (every 10 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cli(sentinel_port, &["SENTINEL", "REPLICAS", "capsa-master"])
        .contains(&replica_port.to_string())
    {
        assert!(
            Instant::now() < deadline,
            "the sentinel never saw the replica"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let url = format!("redis+sentinel://:pw-4@127.0.0.1:{sentinel_port}/capsa-master");
    let mut conn = capsa_store::connect(&url).await.unwrap();
    let _: () = conn.set("{capsa}:failover", "before").await.unwrap();

    // The sentinel refuses (NOGOODSLAVE) until it has seen the replica in sync.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = cli(sentinel_port, &["SENTINEL", "FAILOVER", "capsa-master"]);
        if reply.contains("OK") {
            break;
        }
        assert!(
            reply.contains("NOGOODSLAVE") && Instant::now() < deadline,
            "SENTINEL FAILOVER: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Writes through the same connection reach the promoted replica once the failover is
    // done (calls during it may fail, or land on the old master before its demotion);
    // watched for up to 60 s.
    // A value written after the replica became master reaches it only if the write went to
    // it (it no longer replicates anything).
    let deadline = Instant::now() + Duration::from_secs(60);
    for attempt in 0.. {
        let role = cli(replica_port, &["-a", "pw-4", "--no-auth-warning", "ROLE"]);
        let value = format!("after-{attempt}");
        let wrote: Result<(), _> = conn.set("{capsa}:failover", &value).await;
        let on_new_master = cli(
            replica_port,
            &["-a", "pw-4", "--no-auth-warning", "GET", "{capsa}:failover"],
        );
        if role.starts_with("master") && wrote.is_ok() && on_new_master.trim() == value {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 60 s: replica role {role:?}, write {wrote:?}, its value {on_new_master:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // And the old master, now a replica, is no longer written to.
    let old_role = cli(master_port, &["-a", "pw-4", "--no-auth-warning", "ROLE"]);
    assert!(old_role.starts_with("slave"), "old master: {old_role:?}");
    let v: String = conn.get("{capsa}:failover").await.unwrap();
    assert!(v.starts_with("after-"), "{v}");
}
