//! Test fixtures shared by every crate's integration tests. Each fixture starts a real
//! process or listener on an ephemeral port and stops it on drop, even when the test panics.
//!
//! - [`RedisServer`]: a `redis-server` with its own port and data dir; [`RedisCluster`]: three
//!   of them as a Redis Cluster.
//! - [`ServiceProcess`]: a Capsa service binary started with `--listen 127.0.0.1:0`; the
//!   address comes from the `CAPSA_LISTENING=<addr>` line every service prints once bound.
//! - [`GrpcDouble`]: in-test gRPC services on `127.0.0.1:0` whose handler panics fail the
//!   test that joins them.
//! - [`execute`]: reads an Execute stream (agent, executor or public API) into an
//!   [`execute::Outcome`].
//! - [`HybridVsockProxy`]: a hybrid-vsock endpoint in front of an agent running as a plain
//!   process (the test seam for the guest agent; VM tests use the real thing).
//! - [`inet::FakeInternet`]: a network namespace on 198.18.0.0/15 with HTTP hosts and a DNS
//!   zone, for tests of VM egress that must not leave this machine.
//! - [`eventually!`]: polls an async condition until it holds or a deadline passes.

pub mod execute;
mod grpc;
pub mod inet;
mod process;
mod redis;
mod vsock;

pub use grpc::GrpcDouble;
pub use process::{ServiceProcess, run_to_exit, run_to_exit_within, workspace_binary};
pub use redis::{RedisCluster, RedisServer, free_port};
pub use vsock::HybridVsockProxy;

/// Polls `$cond` (an async expression yielding `bool`) every 20 ms until it is true, or
/// panics after `$secs` seconds (default 10) with the condition's text.
#[macro_export]
macro_rules! eventually {
    ($cond:expr) => {
        $crate::eventually!($cond, 10)
    };
    ($cond:expr, $secs:expr) => {{
        let deadline = ::std::time::Instant::now() + ::std::time::Duration::from_secs($secs);
        loop {
            if $cond {
                break;
            }
            if ::std::time::Instant::now() > deadline {
                panic!("condition not met within {}s: {}", $secs, stringify!($cond));
            }
            ::tokio::time::sleep(::std::time::Duration::from_millis(20)).await;
        }
    }};
}
