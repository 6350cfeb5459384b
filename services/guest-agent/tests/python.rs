//! The Python kernel through the real gRPC API: persistence, streaming, errors, timeouts,
//! kernel death, output cap, binary output, figures, env and cwd, disconnects.

mod common;

use capsa_proto::agent::v1 as pb;
use capsa_proto::common::v1::{CompletionStatus as S, Language};
use common::{Agent, execute, python, secs, spec};

#[tokio::test]
async fn variables_persist_and_trailing_expressions_are_results() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let o = python(&mut c, "x = 42").await;
    assert_eq!(o.status(), S::Ok);
    assert!(o.results.is_empty() && o.stdout.is_empty(), "{o:?}");
    let o = python(&mut c, "x").await;
    assert_eq!(o.results, vec!["42"]);
    let o = python(&mut c, "print(x)").await;
    assert_eq!(o.stdout_text(), "42\n");
    assert_eq!((o.status(), o.completion().exit_code), (S::Ok, 0));
    assert!(o.results.is_empty(), "print returns None: no result");
    let o = python(
        &mut c,
        "import math\ndef f(n):\n    return n * 2\nf(x) + math.floor(0.5)",
    )
    .await;
    assert_eq!(o.results, vec!["84"]);
    assert!(o.completion().wall_time.is_some() && o.completion().cpu_time.is_some());
    assert!(o.completion().interpreter_time.is_some());
    // LANGUAGE_UNSPECIFIED is Python.
    let o = execute(&mut c, spec(Language::Unspecified, "'py'")).await;
    assert_eq!(o.results, vec!["'py'"]);
}

#[tokio::test]
async fn output_streams_while_the_code_runs() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let go = agent.dir.path().join("go");
    // The code cannot finish until the test has seen its first line: if output were held
    // back until the end, this would time out instead.
    let code = format!(
        "import os, time\nprint('first', flush=True)\nwhile not os.path.exists({go:?}):\n    time.sleep(0.01)\nprint('second')"
    );
    let mut s = spec(Language::Python, &code);
    s.timeout = secs(60);
    let mut stream = c
        .execute(pb::ExecuteRequest { spec: Some(s) })
        .await
        .unwrap()
        .into_inner();
    // print() may write "first" and "\n" separately: read chunks until the line is whole.
    let mut seen = Vec::new();
    while !seen.ends_with(b"first\n") {
        match stream
            .message()
            .await
            .unwrap()
            .unwrap()
            .event
            .unwrap()
            .event
            .unwrap()
        {
            capsa_proto::common::v1::execute_event::Event::Stdout(chunk) => {
                seen.extend_from_slice(&chunk.data)
            }
            other => panic!("expected stdout while the code waits, got {other:?}"),
        }
    }
    assert_eq!(seen, b"first\n");
    std::fs::write(&go, b"").unwrap();
    let rest = common::collect(stream).await;
    assert_eq!(rest.stdout_text(), "second\n");
    assert_eq!(rest.status(), S::Ok);
}

#[tokio::test]
async fn an_exception_is_reported_and_state_survives() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    python(&mut c, "x = 42").await;
    let o = python(&mut c, "print('before')\n1 / 0").await;
    assert_eq!((o.status(), o.completion().exit_code), (S::Error, 1));
    assert_eq!(o.stdout_text(), "before\n");
    let e = &o.errors[0];
    assert_eq!(e.name, "ZeroDivisionError");
    assert_eq!(e.value, "division by zero");
    assert!(
        e.traceback.iter().any(|l| l.contains("1 / 0")),
        "{:?}",
        e.traceback
    );
    // Output comes before the error, the error before the completion.
    assert!(matches!(
        o.events.last(),
        Some(capsa_proto::common::v1::execute_event::Event::Completion(_))
    ));
    let o = python(&mut c, "def broken(:\n  pass").await;
    assert_eq!(o.errors[0].name, "SyntaxError");
    assert_eq!(python(&mut c, "x").await.results, vec!["42"]);
}

#[tokio::test]
async fn a_timeout_interrupts_and_keeps_state() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    python(&mut c, "x = 7").await;
    let mut s = spec(Language::Python, "while True:\n    pass");
    s.timeout = secs(1);
    let o = execute(&mut c, s).await;
    assert_eq!(o.status(), S::Timeout, "{o:?}");
    assert!(!o.completion().state_lost);
    assert!(
        o.completion().message.contains("timed out"),
        "{}",
        o.completion().message
    );
    assert_eq!(o.errors[0].name, "KeyboardInterrupt");
    let o = python(&mut c, "print(x)").await;
    assert_eq!(o.stdout_text(), "7\n");
    assert!(!o.completion().state_lost);
}

#[tokio::test]
async fn code_that_ignores_sigint_is_killed_and_the_kernel_restarts() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    python(&mut c, "x = 7").await;
    let code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(300)";
    let mut s = spec(Language::Python, code);
    s.timeout = secs(1);
    let o = execute(&mut c, s).await;
    assert_eq!(o.status(), S::Timeout, "{o:?}");
    assert!(o.completion().state_lost);
    let o = python(&mut c, "x").await;
    assert_eq!(o.errors[0].name, "NameError");
    assert!(
        o.completion().state_lost,
        "the first execute on the new kernel says so too"
    );
    assert!(!python(&mut c, "1").await.completion().state_lost);
}

#[tokio::test]
async fn a_kernel_that_dies_is_reported_and_replaced() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    python(&mut c, "x = 1").await;
    let o = python(&mut c, "import os\nprint('bye', flush=True)\nos._exit(3)").await;
    assert_eq!(o.status(), S::KernelDied, "{o:?}");
    assert_eq!(o.completion().exit_code, 3);
    assert!(o.completion().state_lost);
    assert_eq!(o.stdout_text(), "bye\n");
    let o = python(&mut c, "print('fresh')").await;
    assert_eq!((o.status(), o.stdout_text().as_str()), (S::Ok, "fresh\n"));
    assert!(o.completion().state_lost);
    let o = python(
        &mut c,
        "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)",
    )
    .await;
    assert_eq!(o.status(), S::KernelDied);
    assert!(
        o.completion().message.contains("SIGSEGV"),
        "{}",
        o.completion().message
    );
    assert_eq!(python(&mut c, "2 + 2").await.results, vec!["4"]);
}

#[tokio::test]
async fn output_past_the_cap_is_cut_with_a_marker() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let mut s = spec(
        Language::Python,
        "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1000)\nprint('done', file=sys.stderr)",
    );
    s.max_output_bytes = 5000;
    let o = execute(&mut c, s).await;
    assert_eq!(o.status(), S::Ok);
    assert_eq!(o.stdout, vec![b'x'; 5000]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "\n[capsa: output truncated after 5000 bytes]\n"
    );
    assert!(o.completion().output_truncated);
    assert_eq!(o.completion().output_bytes, 100_000 + 5);
    // Lots of output under the default cap goes through whole, in chunks.
    let o = python(&mut c, "import sys\nsys.stdout.write('y' * 3_000_000)").await;
    assert_eq!(o.stdout.len(), 3_000_000);
    assert!(!o.completion().output_truncated);
}

#[tokio::test]
async fn stdout_written_before_stderr_is_delivered_first() {
    // Two pipes carry no order between them. When both have data the agent reads stdout
    // first, so what the code wrote to stdout before stderr never arrives after it (and
    // counts against the output cap first).
    use capsa_proto::common::v1::execute_event::Event;
    let agent = Agent::start().await;
    let mut c = agent.client();
    for _ in 0..20 {
        let o = python(
            &mut c,
            "import sys\nsys.stdout.write('out')\nsys.stderr.write('err')",
        )
        .await;
        let order: Vec<&str> = o
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Stdout(_) => Some("stdout"),
                Event::Stderr(_) => Some("stderr"),
                _ => None,
            })
            .collect();
        assert_eq!(order, ["stdout", "stderr"]);
    }
}

#[tokio::test]
async fn past_the_cap_the_pipes_are_still_drained() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    python(&mut c, "x = 'kept'").await;
    let mut s = spec(Language::Python, "while True:\n    print('z' * 1000)");
    s.max_output_bytes = 10_000;
    s.timeout = secs(1);
    let o = execute(&mut c, s).await;
    assert_eq!(o.status(), S::Timeout);
    assert!(o.completion().output_truncated);
    assert_eq!(o.stdout.len(), 10_000);
    // Far more than the cap plus a pipe's worth was read and dropped: the writer never
    // blocked on a full pipe.
    assert!(
        o.completion().output_bytes > 1_000_000,
        "{}",
        o.completion().output_bytes
    );
    assert_eq!(python(&mut c, "x").await.results, vec!["'kept'"]);
}

#[tokio::test]
async fn binary_output_is_not_mangled() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let o = python(&mut c, "import sys\nsys.stdout.buffer.write(bytes(range(256)))\nsys.stderr.buffer.write(b'\\xff\\x00\\n')").await;
    assert_eq!(o.stdout, (0..=255u8).collect::<Vec<_>>());
    assert_eq!(o.stderr, b"\xff\x00\n");
}

#[tokio::test]
async fn open_figures_come_back_as_png_display_data() {
    // matplotlib is not installed on the test host: a stand-in with pyplot's figure API
    // checks the driver's figure path here; the VM tests use the real matplotlib.
    let agent = Agent::start().await;
    let mut c = agent.client();
    let fake = agent.dir.path().join("fake");
    std::fs::create_dir_all(fake.join("matplotlib")).unwrap();
    std::fs::write(fake.join("matplotlib/__init__.py"), "").unwrap();
    std::fs::write(
        fake.join("matplotlib/pyplot.py"),
        "_figs = {}\n\
class _Fig:\n    def __init__(self, n): self.n = n\n    def savefig(self, buf, format):\n        assert format == 'png'\n        buf.write(b'\\x89PNG fake %d' % self.n)\n\
def figure(num=None):\n    num = num or len(_figs) + 1\n    return _figs.setdefault(num, _Fig(num))\n\
def get_fignums(): return sorted(_figs)\n\
def close(which): _figs.clear()\n",
    )
    .unwrap();
    let code = format!(
        "import sys, os\nsys.path.insert(0, {:?})\nimport matplotlib.pyplot as plt\nplt.figure(); plt.figure()\nprint(os.environ['MPLBACKEND'])",
        fake.display().to_string()
    );
    let o = python(&mut c, &code).await;
    assert_eq!(o.status(), S::Ok, "{o:?}");
    assert_eq!(o.stdout_text(), "Agg\n");
    let pngs: Vec<_> = o
        .displays
        .iter()
        .map(|d| d.data["image/png"].to_vec())
        .collect();
    assert_eq!(
        pngs,
        vec![b"\x89PNG fake 1".to_vec(), b"\x89PNG fake 2".to_vec()]
    );
    // Figures are closed after they are sent.
    assert!(python(&mut c, "1").await.displays.is_empty());
}

#[tokio::test]
async fn per_call_env_and_cwd_do_not_persist() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let other = agent.dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let mut s = spec(
        Language::Python,
        "import os\nprint(os.environ['ONLY_NOW'], os.getcwd())",
    );
    s.env.insert("ONLY_NOW".into(), "yes".into());
    s.cwd = other.display().to_string();
    let o = execute(&mut c, s).await;
    assert_eq!(o.stdout_text(), format!("yes {}\n", other.display()));
    let o = python(
        &mut c,
        "import os\nprint(os.environ.get('ONLY_NOW'), os.getcwd())",
    )
    .await;
    assert_eq!(
        o.stdout_text(),
        format!("None {}\n", agent.workdir().display())
    );
}

#[tokio::test]
async fn a_client_that_goes_away_interrupts_the_code() {
    // With an hour-long default timeout, only the disconnect can stop the loop in time
    // for the next execute.
    let agent = Agent::start_with(&["--default-timeout-secs", "3600"], &[]).await;
    let mut c = agent.client();
    let code = "try:\n    print('started', flush=True)\n    while True:\n        pass\nexcept KeyboardInterrupt:\n    caught = True\n    raise";
    let mut stream = c
        .execute(pb::ExecuteRequest {
            spec: Some(spec(Language::Python, code)),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(format!("{first:?}").contains("started"));
    drop(stream);
    let o = python(&mut c, "caught").await;
    assert_eq!(o.results, vec!["True"]);
    assert!(!o.completion().state_lost);
}

#[tokio::test]
async fn executes_on_one_kernel_run_in_arrival_order() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let go = agent.dir.path().join("go");
    let code = format!(
        "import os, time\nprint('a', flush=True)\nwhile not os.path.exists({go:?}):\n    time.sleep(0.01)\nx = 'set by a'"
    );
    let mut a = c
        .execute(pb::ExecuteRequest {
            spec: Some(spec(Language::Python, &code)),
        })
        .await
        .unwrap()
        .into_inner();
    a.message().await.unwrap().unwrap(); // a is running
    // The handler answers once b is queued, so b is in line behind a from here on.
    let mut c2 = agent.client();
    let b = c2
        .execute(pb::ExecuteRequest {
            spec: Some(spec(Language::Python, "x")),
        })
        .await
        .unwrap()
        .into_inner();
    // A shell execute does not wait for the Python kernel.
    assert_eq!(
        common::shell(&mut c, "echo independent")
            .await
            .stdout_text(),
        "independent\n"
    );
    std::fs::write(&go, b"").unwrap();
    assert_eq!(common::collect(a).await.status(), S::Ok);
    assert_eq!(common::collect(b).await.results, vec!["'set by a'"]);
}

#[tokio::test]
async fn bad_requests_are_rejected_naming_the_field() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let big = "#".repeat(1024 * 1024 + 1);
    let err = c
        .execute(pb::ExecuteRequest {
            spec: Some(spec(Language::Python, &big)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("`code`"), "{}", err.message());
    let mut s = spec(Language::Python, "1");
    s.cwd = "relative/dir".into();
    let err = c
        .execute(pb::ExecuteRequest { spec: Some(s) })
        .await
        .unwrap_err();
    assert!(err.message().contains("`cwd`"), "{}", err.message());
    let err = c
        .configure(pb::ConfigureRequest {
            env: [("BAD NAME".to_string(), "1".to_string())].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("`env`"), "{}", err.message());
}

#[tokio::test]
async fn a_corrupted_event_pipe_is_survived_or_ends_the_kernel() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    // A malformed line is logged and skipped.
    let o = python(&mut c, "import os\nos.write(4, b'not json\\n')\nx = 1").await;
    assert_eq!(o.status(), S::Ok, "{o:?}");
    // An endless line would grow the agent's buffer without bound: the kernel is killed.
    let o = python(&mut c, "import os\nos.write(4, b'x' * (65 * 1024 * 1024))").await;
    assert_eq!(o.status(), S::KernelDied, "{o:?}");
    assert!(o.completion().state_lost);
    assert!(
        o.completion().message.contains("malformed"),
        "{}",
        o.completion().message
    );
    assert_eq!(python(&mut c, "'ok'").await.results, vec!["'ok'"]);
}
