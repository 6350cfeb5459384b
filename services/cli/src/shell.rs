//! `capsa shell`: an interactive terminal in a session, like `ssh host`.
//!
//! When stdin is a terminal it is put in raw mode for the duration (every key, Ctrl-C and
//! Ctrl-D included, goes to the guest's PTY, whose line discipline does the job control),
//! and a guard restores it on every way out: the program's exit, an error, a panic, or
//! SIGTERM / SIGHUP / SIGINT / SIGQUIT to this process. The remote terminal starts with the
//! local window's size and follows it on SIGWINCH. Stdin is read on a thread of its own,
//! since a blocking read cannot be cancelled and would otherwise hold the runtime up at exit.

use std::io::{IsTerminal as _, Read as _, Write as _};

use bytes::Bytes;
use capsa_client::proto::limits::MAX_TERMINAL_DIMENSION;
use capsa_client::{Client, Terminal, TerminalEvent, TerminalOptions};
use futures::StreamExt as _;
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::args::ShellArgs;
use crate::error::{CliError, local};

/// The size a terminal gets when this process has none to measure (stdin and stdout piped).
const DEFAULT_SIZE: (u32, u32) = (24, 80);

pub async fn shell(client: &Client, a: ShellArgs) -> Result<u8, CliError> {
    let (rows, cols) = window_size().unwrap_or(DEFAULT_SIZE);
    let mut command = a.command.into_iter();
    let options = TerminalOptions {
        command: command.next(),
        args: command.collect(),
        env: a.env.into_iter().collect(),
        cwd: a.cwd,
        rows,
        cols,
        term: a.term,
    };
    let terminal = client.session(&a.session).open_terminal(options).await?;
    // Raw only once the terminal is open, so a refusal prints on a terminal in its usual
    // mode; the guard is dropped before the caller prints any error.
    let _raw = if std::io::stdin().is_terminal() {
        Some(RawMode::enable()?)
    } else {
        None
    };
    relay(terminal).await
}

/// Copies keystrokes in and screen bytes out until the program exits; returns its status.
async fn relay(terminal: Terminal) -> Result<u8, CliError> {
    let Terminal {
        input, mut output, ..
    } = terminal;
    let (keys_tx, mut keys_rx) = mpsc::channel::<Bytes>(16);
    std::thread::spawn(move || read_stdin(keys_tx));
    // Keystrokes go out from a task of their own, so a slow send never holds up the screen.
    let keys_input = input.clone();
    tokio::spawn(async move {
        while let Some(keys) = keys_rx.recv().await {
            if keys_input.write(keys).await.is_err() {
                // The call has ended; the output says how.
                break;
            }
        }
        // Local EOF (piped input) leaves the terminal to its program: the `input` kept
        // below holds the stream open until it exits.
    });
    let mut winch = signal(SignalKind::window_change()).map_err(local)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(local)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(local)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(local)?;
    let mut quit = signal(SignalKind::quit()).map_err(local)?;
    loop {
        tokio::select! {
            event = output.next() => match event {
                Some(Ok(TerminalEvent::Data(data))) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&data).and_then(|()| out.flush()).map_err(local)?;
                }
                Some(Ok(TerminalEvent::Exit(exit))) => return Ok(exit.shell_status()),
                Some(Err(e)) => return Err(e.into()),
                None => {
                    return Err(CliError::Local(
                        "the terminal ended without its program's exit status".into(),
                    ));
                }
            },
            _ = winch.recv() => {
                if let Some((rows, cols)) = window_size() {
                    // A failure means the call ended; the output says how.
                    let _ = input.resize(rows, cols).await;
                }
            }
            // Returning drops the input, which hangs the remote terminal up, and the raw
            // mode guard, which restores the local one. Statuses as a shell reports them.
            _ = hangup.recv() => return Ok(128 + 1),
            _ = interrupt.recv() => return Ok(128 + 2),
            _ = quit.recv() => return Ok(128 + 3),
            _ = terminate.recv() => return Ok(128 + 15),
        }
    }
}

/// Blocking reads of stdin, sent on as they come, until EOF, an error, or nobody listens.
fn read_stdin(keys: mpsc::Sender<Bytes>) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 4096];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if keys
                    .blocking_send(Bytes::copy_from_slice(&buf[..n]))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// The local window's rows and columns (from stdout, else stdin, else stderr), capped at
/// what a remote terminal may have; `None` when none is a terminal.
fn window_size() -> Option<(u32, u32)> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO, libc::STDERR_FILENO] {
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which is valid for
        // it; on a descriptor that is no terminal it fails and writes nothing.
        let got = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) };
        if got == 0 && size.ws_row > 0 && size.ws_col > 0 {
            let cap = |n: u16| u32::from(n).min(MAX_TERMINAL_DIMENSION);
            return Some((cap(size.ws_row), cap(size.ws_col)));
        }
    }
    None
}

/// Stdin's terminal in raw mode while this lives; its settings before are restored on drop.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enable() -> Result<RawMode, CliError> {
        let stdin = std::io::stdin();
        let failed = |e: nix::Error| CliError::Local(format!("cannot set the terminal: {e}"));
        let saved = tcgetattr(&stdin).map_err(failed)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).map_err(failed)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // TCSADRAIN: the screen bytes written so far reach the terminal in raw mode first.
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSADRAIN, &self.saved);
    }
}
