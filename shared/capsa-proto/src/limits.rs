//! The contract's limits, in one place: what a request may carry and how big one gRPC
//! message may be on every hop (client → session-manager → executor → guest agent and
//! back). session-manager, the executor, the guest agent and the CLI all read these
//! constants, so a request the public API accepts fits through every hop, and every event
//! the agent produces fits through every hop back.
//!
//! What must stay true (checked by the tests below):
//! - the largest request the public API accepts (code, env, cwd) fits in
//!   [`MAX_MESSAGE_BYTES`] with room to spare;
//! - a file chunk and an output chunk fit in one message;
//! - a Result or Display event whose data is at most [`MAX_EVENT_DATA_BYTES`] fits in one
//!   message: the agent cuts larger ones (see the guest agent's README), because a message
//!   over the limit would fail the whole Execute stream at the next hop.

use std::time::Duration;

/// Largest `code` of an Execute, in bytes.
pub const MAX_CODE_BYTES: usize = 1 << 20;

/// Output cap of an Execute whose `max_output_bytes` is 0. Stdout, stderr and the data of
/// Result and Display events count against it together.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 32 << 20;

/// Largest `max_output_bytes` an Execute may ask for.
pub const MAX_OUTPUT_BYTES: u64 = 1 << 30;

/// Largest data chunk of an upload or download, in either direction on every hop.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// Longest guest path (file paths, `cwd`), in bytes.
pub const MAX_PATH_BYTES: usize = 4096;

/// Most entries of an environment map (a session's env, an execute's env).
pub const MAX_ENV_ENTRIES: usize = 128;

/// Longest environment variable name, in bytes.
pub const MAX_ENV_NAME_BYTES: usize = 256;

/// Longest environment variable value, in bytes.
pub const MAX_ENV_VALUE_BYTES: usize = 32 << 10;

/// Execute timeout when the request sets none.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest execute timeout a request may set.
pub const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(3600);

/// Background processes (StartProcess) one session may have running at once.
pub const MAX_RUNNING_PROCESSES: usize = 32;

/// Process records (running and exited) the guest agent keeps per session; past it, the
/// oldest exited ones are forgotten (their ids become NOT_FOUND).
pub const MAX_PROCESS_RECORDS: usize = 128;

/// Terminals (OpenTerminal) one session may have open at once.
pub const MAX_TERMINALS: usize = 8;

/// Port connections (ConnectPort) one session may have open at once.
pub const MAX_PORT_CONNECTIONS: usize = 64;

/// Output ring of a background process when its spec sets none.
pub const DEFAULT_PROCESS_OUTPUT_BUFFER_BYTES: u64 = 1 << 20;

/// Largest output ring a process may ask for.
pub const MAX_PROCESS_OUTPUT_BUFFER_BYTES: u64 = 16 << 20;

/// Most arguments of a process or terminal command.
pub const MAX_PROCESS_ARGS: usize = 1024;

/// Command, arguments and stdin of a StartProcess together, in bytes.
pub const MAX_PROCESS_SPEC_BYTES: usize = 1 << 20;

/// Largest data of one stdin write, keystroke message or port message (each direction).
pub const MAX_STREAM_DATA_BYTES: usize = MAX_CHUNK_BYTES;

/// WaitProcess's wait when the request sets none.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait a WaitProcess may ask for.
pub const MAX_WAIT_TIMEOUT: Duration = Duration::from_secs(300);

/// Largest terminal, in rows and in columns.
pub const MAX_TERMINAL_DIMENSION: u32 = 1000;

/// Largest gRPC message, encoded, that any Capsa server or client sends or accepts: every
/// hop sets both its encode and its decode limit to this (tonic's own default decode limit
/// is 4 MiB, which a large trailing value or figure used to exceed mid-stream).
///
/// Each hop buffers a bounded number of messages per stream, so this times those buffers
/// bounds the memory one stream can hold; 8 MiB keeps that modest and is the limit the
/// public API has always had.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Room left in a message for everything that is not event data: the MIME keys, field tags
/// and lengths, and the response envelope.
const EVENT_FRAMING_BYTES: usize = 1 << 20;

/// Most data one Result or Display event carries: the sum over its MIME entries of
/// [`event_entry_bytes`]. The guest agent cuts an event past it (text is shortened, other
/// types are dropped) and says so in a marker on stderr.
pub const MAX_EVENT_DATA_BYTES: usize = MAX_MESSAGE_BYTES - EVENT_FRAMING_BYTES;

/// What one MIME entry of a Result or Display event counts against
/// [`MAX_EVENT_DATA_BYTES`]: its key, its value and a bound on its framing.
pub const fn event_entry_bytes(mime_len: usize, value_len: usize) -> usize {
    // Map entry: tag + length of the entry, tag + length of the key and of the value.
    const ENTRY_FRAMING: usize = 16;
    mime_len + value_len + ENTRY_FRAMING
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::v1 as common;
    use prost::Message as _;

    #[test]
    fn the_largest_public_execute_fits_in_one_message() {
        let req = crate::session::v1::ExecuteRequest {
            session_id: "s".repeat(128),
            code: "c".repeat(MAX_CODE_BYTES),
            env: (0..MAX_ENV_ENTRIES)
                .map(|i| {
                    let name = format!("{i:0>width$}", width = MAX_ENV_NAME_BYTES);
                    (name, "v".repeat(MAX_ENV_VALUE_BYTES))
                })
                .collect(),
            cwd: "/".repeat(MAX_PATH_BYTES),
            ..Default::default()
        };
        let executor = crate::executor::v1::ExecuteRequest {
            vm_id: "v".repeat(64),
            spec: Some(common::ExecuteSpec {
                code: req.code.clone(),
                env: req.env.clone(),
                cwd: req.cwd.clone(),
                ..Default::default()
            }),
        };
        assert!(
            req.encoded_len() < MAX_MESSAGE_BYTES,
            "{}",
            req.encoded_len()
        );
        assert!(executor.encoded_len() < MAX_MESSAGE_BYTES);
    }

    #[test]
    fn an_event_of_the_largest_data_fits_in_one_message() {
        // Many small entries are the worst case for framing per byte of data.
        let entries = 1000;
        let key = "application/x-".to_string() + &"k".repeat(50);
        let per_entry = MAX_EVENT_DATA_BYTES / entries - event_entry_bytes(key.len() + 4, 0);
        let data: std::collections::HashMap<String, prost::bytes::Bytes> = (0..entries)
            .map(|i| (format!("{key}{i:04}"), vec![0u8; per_entry].into()))
            .collect();
        let total: usize = data
            .iter()
            .map(|(k, v)| event_entry_bytes(k.len(), v.len()))
            .sum();
        assert!(total <= MAX_EVENT_DATA_BYTES);
        let display = crate::session::v1::ExecuteResponse {
            event: Some(common::ExecuteEvent {
                event: Some(common::execute_event::Event::Display(common::DisplayData {
                    data,
                })),
            }),
        };
        assert!(display.encoded_len() <= MAX_MESSAGE_BYTES);
        let one = common::ExecuteResult {
            data: [("text/plain".into(), vec![0u8; MAX_EVENT_DATA_BYTES].into())].into(),
        };
        assert!(one.encoded_len() + 64 <= MAX_MESSAGE_BYTES);
    }

    #[test]
    fn chunks_fit_and_bounds_are_ordered() {
        assert!(MAX_CHUNK_BYTES + 1024 <= MAX_MESSAGE_BYTES);
        assert!(DEFAULT_MAX_OUTPUT_BYTES <= MAX_OUTPUT_BYTES);
        assert!(DEFAULT_EXEC_TIMEOUT <= MAX_EXEC_TIMEOUT);
        assert!(MAX_EVENT_DATA_BYTES > 4 << 20);
    }
}
