//! The agent as a whole: session env in both kernels, stats, the echo server, shutdown.

mod common;

use std::time::Duration;

use capsa_proto::agent::v1 as pb;
use common::{Agent, python, shell};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test]
async fn configure_sets_env_in_both_kernels_running_or_not() {
    let agent = Agent::start_with(&["--prestart-python", "false"], &[]).await;
    let mut c = agent.client();
    // The shell kernel is running, the Python one is not started yet.
    assert_eq!(
        shell(&mut c, "echo \"[$SESSION_VAR]\"").await.stdout_text(),
        "[]\n"
    );
    let env = [("SESSION_VAR".to_string(), "one 'quoted' value".to_string())].into();
    c.configure(pb::ConfigureRequest { env }).await.unwrap();
    assert_eq!(
        shell(&mut c, "echo \"$SESSION_VAR\"").await.stdout_text(),
        "one 'quoted' value\n"
    );
    assert_eq!(
        python(&mut c, "import os\nos.environ['SESSION_VAR']")
            .await
            .results,
        vec!["\"one 'quoted' value\""]
    );
    // Now both are running: an update applies in place.
    let env = [("SESSION_VAR".to_string(), "two".to_string())].into();
    c.configure(pb::ConfigureRequest { env }).await.unwrap();
    assert_eq!(
        shell(&mut c, "echo $SESSION_VAR").await.stdout_text(),
        "two\n"
    );
    assert_eq!(
        python(&mut c, "import os\nos.environ['SESSION_VAR']")
            .await
            .results,
        vec!["'two'"]
    );
    // A restarted kernel starts with the session env too.
    shell(&mut c, "exit 1").await;
    assert_eq!(
        shell(&mut c, "echo $SESSION_VAR").await.stdout_text(),
        "two\n"
    );
}

#[tokio::test]
async fn stats_describe_the_machine() {
    let agent = Agent::start().await;
    let s = agent
        .client()
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        s.memory_total_bytes > 0
            && s.memory_used_bytes > 0
            && s.memory_used_bytes <= s.memory_total_bytes
    );
    assert!(s.process_count > 1, "{s:?}");
    assert!(s.uptime_ms > 0);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(s.kernel_release, release.trim());
}

#[tokio::test]
async fn the_echo_server_echoes() {
    let agent = Agent::start().await;
    let mut s = tokio::net::UnixStream::connect(&agent.echo_socket)
        .await
        .unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    let (_, n) = tokio::join!(write, read);
    assert_eq!(n.unwrap(), payload.len());
    assert_eq!(back, payload);
}

#[tokio::test]
async fn sigterm_stops_the_agent_and_its_kernels() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let o = python(&mut c, "import os\nos.getpid()").await;
    let py_pid: i32 = o.results[0].parse().unwrap();
    let o = shell(&mut c, "echo $$").await;
    let sh_pid: i32 = o.stdout_text().trim().parse().unwrap();
    let Agent { process, .. } = agent;
    let status = process.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "the agent exits 0 on SIGTERM: {status}");
    for pid in [py_pid, sh_pid] {
        capsa_test_support::eventually!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        );
    }
}

/// In a VM the agent's stderr is the serial console, where every byte costs the guest CPU:
/// by default no INFO reaches it (not the "execute finished" line of every Execute), and
/// `CAPSA_AGENT_CONSOLE_LOG=info` brings it back. The second Execute of each run cannot start
/// before the first one's line was written (one kernel runs one execute at a time, and the
/// line is written before it is free), so reading the log after it misses nothing.
#[tokio::test]
async fn the_console_gets_warnings_only_unless_asked_for_more() {
    for (env, lines_expected) in [
        (vec![], false),
        (vec![("CAPSA_AGENT_CONSOLE_LOG", "info")], true),
    ] {
        let log = tempfile::NamedTempFile::new().unwrap();
        let agent =
            Agent::start_logging(&[], &env, std::process::Stdio::from(log.reopen().unwrap())).await;
        let mut client = agent.client();
        for _ in 0..2 {
            python(&mut client, "x = 1").await.completion();
        }
        let console = std::fs::read_to_string(log.path()).unwrap();
        assert_eq!(
            console.contains("execute finished"),
            lines_expected,
            "{env:?}: {console}"
        );
        assert!(
            !console.contains('\u{1b}'),
            "no colour off a terminal: {console}"
        );
    }
}

/// The agent's children whose command line names Python (its Python kernel).
fn python_children(agent_pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{agent_pid}/task")).unwrap();
    let mut kids = Vec::new();
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("python") {
                kids.push(pid);
            }
        }
    }
    kids
}

/// The pre-started Python kernel is the one the first execute runs in, however long after
/// the start it comes. The kernel gets a parent-death signal, which follows the *thread*
/// that forked it: spawned from a thread that then ended, it would be killed at once and
/// the first execute would find its state lost.
#[tokio::test]
async fn the_prestarted_python_kernel_lives_until_its_first_execute() {
    let agent = Agent::start().await;
    let agent_pid = agent.process.pid();
    capsa_test_support::eventually!(python_children(agent_pid).len() == 1, 60);
    let kernel = python_children(agent_pid)[0];
    // Watched for 2 s: a kernel killed by its parent-death signal is gone well within it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(python_children(agent_pid), vec![kernel]);
    let out = python(&mut agent.client(), "import os\nprint(os.getpid())").await;
    assert_eq!(out.stdout_text(), format!("{kernel}\n"));
    assert!(!out.completion().state_lost, "{out:?}");
}
