//! The host side of the hybrid vsock handshake: what the VMM answers to `CONNECT <port>\n`.
//! Nothing may panic; at most `MAX_REPLY` bytes are read, however long the peer goes on
//! without a newline; success means exactly one `OK <decimal u32>\n` line was consumed,
//! leaving every byte after it to the guest stream.
#![no_main]

use std::pin::pin;
use std::task::{Context, Poll, Waker};

use capsa_vsock::{MAX_REPLY, ReplyError, read_reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // Reading from a byte slice never waits: one poll finishes the future.
    let Poll::Ready(result) =
        pin!(read_reply(&mut rest)).poll(&mut Context::from_waker(Waker::noop()))
    else {
        panic!("a read from a byte slice never waits");
    };
    let consumed = data.len() - rest.len();
    assert!(consumed <= MAX_REPLY, "{consumed} bytes read");
    let line = &data[..consumed];
    match result {
        Ok(port) => {
            let digits = line
                .strip_prefix(b"OK ")
                .and_then(|l| l.strip_suffix(b"\n"))
                .expect("an OK line was consumed");
            assert!(!digits.is_empty() && digits.iter().all(u8::is_ascii_digit));
            assert_eq!(
                std::str::from_utf8(digits).unwrap().parse::<u32>().unwrap(),
                port
            );
        }
        Err(ReplyError::Rejected(_)) => {
            // It stopped at a newline, at the end of the input, or at the bound.
            assert!(
                consumed == data.len() || line.ends_with(b"\n") || consumed == MAX_REPLY,
                "{line:?}"
            );
            assert!(!line[..consumed.saturating_sub(1)].contains(&b'\n'));
        }
        Err(ReplyError::Io(e)) => panic!("a byte slice cannot fail: {e}"),
    }
});
