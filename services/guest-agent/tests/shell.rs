//! The shell kernel through the real gRPC API: persistence, exit codes, interrupts of a
//! busy loop and of a foreground sleep, env and cwd.

mod common;

use capsa_proto::common::v1::{CompletionStatus as S, Language};
use common::{Agent, execute, secs, shell, spec};

#[tokio::test]
async fn cwd_exports_and_functions_persist() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let dir = agent.dir.path().display().to_string();
    let o = shell(
        &mut c,
        &format!("cd {dir}\nexport FOO=bar\nBAR=local\ngreet() {{ echo \"hi $1\"; }}"),
    )
    .await;
    assert_eq!((o.status(), o.completion().exit_code), (S::Ok, 0), "{o:?}");
    let o = shell(
        &mut c,
        "pwd; echo $FOO $BAR; greet you; sh -c 'echo child sees $FOO'",
    )
    .await;
    assert_eq!(
        o.stdout_text(),
        format!("{dir}\nbar local\nhi you\nchild sees bar\n")
    );
}

#[tokio::test]
async fn exit_codes_become_status() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let o = shell(&mut c, "true").await;
    assert_eq!((o.status(), o.completion().exit_code), (S::Ok, 0));
    let o = shell(&mut c, "echo oops >&2; false").await;
    assert_eq!((o.status(), o.completion().exit_code), (S::Error, 1));
    assert_eq!(String::from_utf8_lossy(&o.stderr), "oops\n");
    let o = shell(&mut c, "(exit 7)").await;
    assert_eq!((o.status(), o.completion().exit_code), (S::Error, 7));
    let o = shell(&mut c, "printf '\\x00\\xff'").await;
    assert_eq!(o.stdout, b"\x00\xff");
}

#[tokio::test]
async fn a_busy_loop_times_out_and_the_shell_keeps_its_state() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    shell(&mut c, "export KEPT=yes").await;
    let mut s = spec(Language::Shell, "while true; do :; done\necho not-reached");
    s.timeout = secs(1);
    let o = execute(&mut c, s).await;
    assert_eq!(o.status(), S::Timeout, "{o:?}");
    assert!(
        !o.completion().state_lost,
        "the INT trap unwinds the loop; no kill needed"
    );
    assert!(o.stdout.is_empty());
    assert_eq!(shell(&mut c, "echo $KEPT").await.stdout_text(), "yes\n");
}

#[tokio::test]
async fn a_foreground_sleep_and_nested_functions_are_interrupted() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    shell(&mut c, "export KEPT=yes").await;
    for code in [
        "sleep 100\necho not-reached",
        "f() { sleep 100; }\ng() { f; echo not-reached; }\ng\necho not-reached",
    ] {
        let mut s = spec(Language::Shell, code);
        s.timeout = secs(1);
        let o = execute(&mut c, s).await;
        assert_eq!(o.status(), S::Timeout, "{code}: {o:?}");
        assert!(!o.completion().state_lost, "{code}");
        assert!(o.stdout.is_empty(), "{code}: {}", o.stdout_text());
    }
    // A second interrupt works as well as the first.
    let mut s = spec(Language::Shell, "while true; do :; done");
    s.timeout = secs(1);
    assert_eq!(execute(&mut c, s).await.status(), S::Timeout);
    assert_eq!(shell(&mut c, "echo $KEPT").await.stdout_text(), "yes\n");
}

#[tokio::test]
async fn code_that_traps_sigint_is_killed_after_the_grace() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let mut s = spec(Language::Shell, "trap '' INT\nwhile true; do :; done");
    s.timeout = secs(1);
    let o = execute(&mut c, s).await;
    assert_eq!(o.status(), S::Timeout);
    assert!(o.completion().state_lost);
    assert_eq!(shell(&mut c, "echo back").await.stdout_text(), "back\n");
}

#[tokio::test]
async fn exit_ends_the_shell_kernel() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let o = shell(&mut c, "exit 3").await;
    assert_eq!((o.status(), o.completion().exit_code), (S::KernelDied, 3));
    assert!(o.completion().state_lost);
    let o = shell(&mut c, "echo again").await;
    assert_eq!((o.status(), o.stdout_text().as_str()), (S::Ok, "again\n"));
}

#[tokio::test]
async fn per_call_env_and_cwd_do_not_persist() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let mut s = spec(Language::Shell, "echo $ONLY_NOW $(pwd)");
    s.env.insert("ONLY_NOW".into(), "it's here".into());
    s.cwd = "/".into();
    let o = execute(&mut c, s).await;
    assert_eq!(o.stdout_text(), "it's here /\n");
    let o = shell(&mut c, "echo \"[$ONLY_NOW]\" $(pwd)").await;
    assert_eq!(
        o.stdout_text(),
        format!("[] {}\n", agent.workdir().display())
    );
}
