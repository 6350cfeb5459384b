//! Results and figures against the output cap and the contract's message limit: their
//! bytes count against `max_output_bytes` with stdout and stderr, and one larger than a
//! message is cut with a marker instead of failing the stream at the next hop.
//!
//! matplotlib is not installed on the test host: a stand-in `matplotlib.pyplot` with the
//! figure API the driver uses makes PNGs of a size the test sets (`plt.PNG_BYTES`).

mod common;

use capsa_proto::common::v1::CompletionStatus as S;
use capsa_proto::common::v1::Language;
use capsa_proto::limits::{MAX_EVENT_DATA_BYTES, MAX_MESSAGE_BYTES};
use common::{Agent, execute, python, spec};

/// Writes the stand-in under the agent's temp dir; returns code that imports it as `plt`.
fn fake_pyplot(agent: &Agent) -> String {
    let fake = agent.dir.path().join("fake");
    std::fs::create_dir_all(fake.join("matplotlib")).unwrap();
    std::fs::write(fake.join("matplotlib/__init__.py"), "").unwrap();
    std::fs::write(
        fake.join("matplotlib/pyplot.py"),
        "PNG_BYTES = 16\n_figs = {}\n\
class _Fig:\n    def savefig(self, buf, format):\n        buf.write(b'\\x89PNG' + b'p' * (PNG_BYTES - 4))\n\
def figure(num=None):\n    num = num or len(_figs) + 1\n    return _figs.setdefault(num, _Fig())\n\
def get_fignums(): return sorted(_figs)\n\
def close(which): _figs.clear()\n",
    )
    .unwrap();
    format!(
        "import sys\nsys.path.insert(0, {:?})\nimport matplotlib.pyplot as plt\n",
        fake.display().to_string()
    )
}

#[tokio::test]
async fn results_and_figures_count_against_the_output_cap() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let plt = fake_pyplot(&agent);

    // A trailing value past the cap: cut to the cap, then the usual marker.
    let mut s = spec(Language::Python, "'y' * 1_000_000");
    s.max_output_bytes = 1000;
    let o = execute(&mut c, s).await;
    assert_eq!(o.status(), S::Ok, "{o:?}");
    assert_eq!(o.results.len(), 1);
    assert_eq!(o.results[0].len(), 1000);
    assert!(o.results[0].starts_with("'yyy"));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "\n[capsa: output truncated after 1000 bytes]\n"
    );
    assert!(o.completion().output_truncated);
    assert_eq!(o.completion().output_bytes, 1_000_002);

    // Stdout first, then a figure that does not fit in what is left: the PNG is dropped
    // (half a PNG is no image) and nothing after the marker is forwarded.
    let code = format!("{plt}plt.PNG_BYTES = 600\nplt.figure()\nprint('a' * 499)\n'after'");
    let mut s = spec(Language::Python, &code);
    s.max_output_bytes = 1000;
    let o = execute(&mut c, s).await;
    assert_eq!(o.status(), S::Ok, "{o:?}");
    assert_eq!(o.stdout.len(), 500);
    assert_eq!(o.results, vec!["'after'"], "the result came first and fit");
    assert!(o.displays.is_empty(), "{:?}", o.displays.len());
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "\n[capsa: output truncated after 1000 bytes]\n"
    );
    assert!(o.completion().output_truncated);
    assert_eq!(o.completion().output_bytes, 500 + 7 + 600);

    // Under the cap everything counts and nothing is cut.
    let code = format!("{plt}plt.PNG_BYTES = 300\nplt.figure()\n'z' * 98");
    let mut s = spec(Language::Python, &code);
    s.max_output_bytes = 400;
    let o = execute(&mut c, s).await;
    assert_eq!(o.displays.len(), 1);
    assert_eq!(o.displays[0].data["image/png"].len(), 300);
    assert_eq!(o.results[0].len(), 100);
    assert!(o.stderr.is_empty() && !o.completion().output_truncated);
    assert_eq!(o.completion().output_bytes, 400);
}

#[tokio::test]
async fn a_value_or_figure_larger_than_a_message_is_cut_with_a_marker() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let plt = fake_pyplot(&agent);
    let big = MAX_MESSAGE_BYTES + 1_000_000;
    // The trailing value is sent first, then the open figures.
    let code = format!("{plt}plt.PNG_BYTES = {big}\nplt.figure()\n'w' * {big}\n");
    let o = python(&mut c, &code).await;
    assert_eq!(o.status(), S::Ok, "{o:?}");
    // The PNG is dropped whole; the text is cut to what fits in one message.
    assert!(o.displays.is_empty());
    assert_eq!(o.results.len(), 1);
    let kept = o.results[0].len();
    assert!(
        kept < MAX_EVENT_DATA_BYTES && kept > MAX_EVENT_DATA_BYTES - 1024,
        "{kept}"
    );
    assert!(o.results[0].starts_with("'www"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        stderr,
        format!(
            "\n[capsa: result cut to fit one message of {MAX_EVENT_DATA_BYTES} bytes: text/plain cut to {kept} of {} bytes]\n\
             \n[capsa: display data cut to fit one message of {MAX_EVENT_DATA_BYTES} bytes: image/png of {big} bytes dropped]\n",
            big + 2
        )
    );
    // Not the output cap: the stream goes on and the flag stays off.
    assert!(!o.completion().output_truncated);
    assert_eq!(o.completion().output_bytes, (2 * big + 2) as u64);
    assert_eq!(
        python(&mut c, "print('next')").await.stdout_text(),
        "next\n"
    );
}

#[tokio::test]
async fn an_exception_larger_than_a_message_is_cut_and_the_stream_survives() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let o = python(&mut c, "x = 1\nraise ValueError('e' * 10_000_000)").await;
    assert_eq!(o.status(), S::Error, "{:?}", o.completion);
    let e = &o.errors[0];
    assert_eq!(e.name, "ValueError");
    assert!(e.value.starts_with("eee") && e.value.ends_with(" [capsa: cut]"));
    let size = e.value.len() + e.traceback.iter().map(String::len).sum::<usize>();
    assert!(size <= MAX_EVENT_DATA_BYTES, "{size}");
    assert!(e.traceback.last().unwrap().starts_with("ValueError: eee"));
    assert_eq!(python(&mut c, "x").await.results, vec!["1"]);
}
