//! `capsa process ...`: background processes in a session. Output is passed through as it
//! arrives (stdout to stdout, stderr to stderr, byte for byte); `wait` turns the process's
//! exit into this command's exit status, as a shell's `wait` does.

use std::io::Write as _;

use bytes::BytesMut;
use capsa_client::{Client, Error, ProcessEvent, ProcessExit, ProcessOptions, Signal};
use futures::StreamExt as _;
use serde_json::json;
use tokio::io::AsyncReadExt as _;

use crate::args::{
    EXIT_TIMEOUT, ProcessArg, ProcessCommand, ProcessKillArgs, ProcessLogsArgs, ProcessStartArgs,
    ProcessWaitArgs, ProcessWriteArgs, SessionArg, SignalName,
};
use crate::commands::{note, say};
use crate::error::{CliError, local};
use crate::render::with_bytes;
use crate::view;

/// What one read of this command's stdin may send at once, well under the 1 MiB a
/// WriteStdin carries: a pipe gives what it has, and it goes out without waiting for more.
const STDIN_CHUNK: usize = 64 << 10;

pub async fn run(client: &Client, command: ProcessCommand, json: bool) -> Result<u8, CliError> {
    match command {
        ProcessCommand::Start(a) => start(client, a, json).await,
        ProcessCommand::List(a) => list(client, a, json).await,
        ProcessCommand::Wait(a) => wait(client, a, json).await,
        ProcessCommand::Kill(a) => kill(client, a, json).await,
        ProcessCommand::Logs(a) => logs(client, a, json).await,
        ProcessCommand::Write(a) => write(client, a).await,
    }
}

async fn start(client: &Client, a: ProcessStartArgs, json: bool) -> Result<u8, CliError> {
    let mut command = a.command.into_iter();
    let program = command
        .next()
        .ok_or_else(|| CliError::Usage("no command: give it after `--`".into()))?;
    let options = ProcessOptions {
        env: a.env.into_iter().collect(),
        cwd: a.cwd,
        keep_stdin_open: a.keep_stdin,
        output_buffer_bytes: a.buffer_bytes,
        ..Default::default()
    };
    let info = client
        .session(&a.session)
        .start_process(program, command, options)
        .await?;
    if json {
        say(view::process_json(&info))?;
    } else {
        // Only the id on stdout, so `pid=$(capsa process start ...)` works.
        say(&info.process_id)?;
    }
    Ok(0)
}

async fn list(client: &Client, a: SessionArg, json: bool) -> Result<u8, CliError> {
    let processes = client.session(&a.session).list_processes().await?;
    if !json {
        say(view::PROCESS_HEADER)?;
    }
    for p in &processes {
        if json {
            say(view::process_json(p))?;
        } else {
            say(view::process_row(p))?;
        }
    }
    Ok(0)
}

async fn wait(client: &Client, a: ProcessWaitArgs, json: bool) -> Result<u8, CliError> {
    let ProcessArg { session, id } = a.process;
    let info = match client.session(&session).wait_process(&id, a.timeout).await {
        Ok(info) => info,
        // Still running is an answer, not a failure of the command: status 124, as
        // timeout(1) has it.
        Err(Error::DeadlineExceeded(message)) => {
            note(format!("capsa: {message}"));
            return Ok(EXIT_TIMEOUT);
        }
        Err(e) => return Err(e.into()),
    };
    let exit = ProcessExit {
        exit_code: info.exit_code,
        signal: info.signal,
    };
    if json {
        say(view::process_json(&info))?;
    } else if exit.signal > 0 {
        note(format!("capsa: {id} was ended by signal {}", exit.signal));
    } else {
        note(format!("capsa: {id} exited with status {}", exit.exit_code));
    }
    Ok(exit.shell_status())
}

fn signal(name: SignalName) -> Signal {
    match name {
        SignalName::Term => Signal::Term,
        SignalName::Kill => Signal::Kill,
        SignalName::Int => Signal::Int,
        SignalName::Hup => Signal::Hup,
    }
}

async fn kill(client: &Client, a: ProcessKillArgs, json: bool) -> Result<u8, CliError> {
    let ProcessArg { session, id } = a.process;
    let info = client
        .session(&session)
        .signal_process(&id, signal(a.signal))
        .await?;
    if json {
        say(view::process_json(&info))?;
    }
    Ok(0)
}

/// The JSON line of one attach event.
pub(crate) fn event_json(event: &ProcessEvent) -> serde_json::Value {
    match event {
        ProcessEvent::Stdout { offset, data } => {
            with_bytes(json!({"event": "stdout", "offset": offset}), data)
        }
        ProcessEvent::Stderr { offset, data } => {
            with_bytes(json!({"event": "stderr", "offset": offset}), data)
        }
        ProcessEvent::Dropped {
            from_offset,
            to_offset,
        } => json!({"event": "dropped", "from_offset": from_offset, "to_offset": to_offset}),
        ProcessEvent::Exit(e) => {
            json!({"event": "exit", "exit_code": e.exit_code, "signal": e.signal})
        }
    }
}

/// The note `capsa process logs` prints on stderr for output the ring no longer held.
pub(crate) fn dropped_note(from_offset: u64, to_offset: u64) -> String {
    format!(
        "capsa: [{} bytes of output dropped (offsets {from_offset}..{to_offset}): older than \
         the process's output buffer]",
        to_offset - from_offset
    )
}

async fn logs(client: &Client, a: ProcessLogsArgs, json: bool) -> Result<u8, CliError> {
    let ProcessArg { session, id } = a.process;
    let mut events = client
        .session(&session)
        .attach_process(&id, a.from, a.follow)
        .await?;
    while let Some(event) = events.next().await {
        let event = event?;
        if json {
            say(event_json(&event))?;
            continue;
        }
        match &event {
            ProcessEvent::Stdout { data, .. } => {
                let mut out = std::io::stdout().lock();
                out.write_all(data)
                    .and_then(|()| out.flush())
                    .map_err(local)?;
            }
            ProcessEvent::Stderr { data, .. } => {
                let mut err = std::io::stderr().lock();
                err.write_all(data)
                    .and_then(|()| err.flush())
                    .map_err(local)?;
            }
            ProcessEvent::Dropped {
                from_offset,
                to_offset,
            } => note(dropped_note(*from_offset, *to_offset)),
            // The exit is `capsa process wait`'s to report.
            ProcessEvent::Exit(_) => {}
        }
    }
    Ok(0)
}

async fn write(client: &Client, a: ProcessWriteArgs) -> Result<u8, CliError> {
    let ProcessArg { session, id } = a.process;
    let session = client.session(&session);
    let mut stdin = tokio::io::stdin();
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(STDIN_CHUNK);
        let n = stdin
            .read_buf(&mut buf)
            .await
            .map_err(|e| CliError::Local(format!("reading stdin: {e}")))?;
        if n == 0 {
            break;
        }
        session.write_stdin(&id, buf.split().freeze()).await?;
    }
    if a.close {
        session.close_stdin(&id).await?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn attach_events_as_json_lines() {
        let out = ProcessEvent::Stdout {
            offset: 7,
            data: Bytes::from_static(b"hi\n"),
        };
        assert_eq!(
            event_json(&out),
            json!({"event": "stdout", "offset": 7, "text": "hi\n"})
        );
        let err = ProcessEvent::Stderr {
            offset: 0,
            data: Bytes::from_static(&[0xff]),
        };
        assert_eq!(
            event_json(&err),
            json!({"event": "stderr", "offset": 0, "base64": "/w=="})
        );
        let exit = ProcessEvent::Exit(ProcessExit {
            exit_code: -1,
            signal: 9,
        });
        assert_eq!(
            event_json(&exit),
            json!({"event": "exit", "exit_code": -1, "signal": 9})
        );
        assert_eq!(
            dropped_note(100, 4196),
            "capsa: [4096 bytes of output dropped (offsets 100..4196): older than the \
             process's output buffer]"
        );
    }
}
