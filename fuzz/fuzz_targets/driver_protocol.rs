//! The guest agent's side of the kernel driver protocol: the event pipe's framing
//! (`LineBuffer`) and the Python and shell event parsers. The first byte sets the line
//! bound (small, so short inputs reach it), the second the size of each read, the rest is
//! what the driver wrote. Nothing may panic; no line over the bound is returned and no more
//! than the bound is held between reads; the lines taken are exactly the input's.
#![no_main]

use capsa_guest_agent::kernel::{DriverEvent, Language, LineBuffer, parse_event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [max, read, stream @ ..] = data else {
        return;
    };
    let (max, read) = (usize::from(*max), usize::from(*read % 64) + 1);
    let mut lines = LineBuffer::new(max);
    let mut taken: Vec<u8> = Vec::new();
    let mut fed = 0;
    'reads: for chunk in stream.chunks(read) {
        lines.extend(chunk);
        fed += chunk.len();
        loop {
            match lines.next_line() {
                Ok(Some(line)) => {
                    assert!(line.len() <= max && !line.contains(&b'\n'));
                    parse(&line);
                    taken.extend_from_slice(&line);
                    taken.push(b'\n');
                }
                Ok(None) => {
                    assert!(lines.buffered() <= max, "{} held", lines.buffered());
                    break;
                }
                Err(_) => {
                    // Only a line that really is over the bound is refused.
                    let pending = &stream[taken.len()..fed];
                    let len = pending.iter().position(|&b| b == b'\n');
                    assert!(len.unwrap_or(pending.len()) > max, "{pending:?}");
                    break 'reads;
                }
            }
        }
    }
    assert!(stream.starts_with(&taken));
    // The parsers also see the whole input as one line: longer and newline-free or not.
    parse(stream);
});

fn parse(line: &[u8]) {
    if let Ok(DriverEvent::Done(done)) = parse_event(Language::Python, line) {
        assert!(
            done.cpu.is_some(),
            "the Python driver measures its CPU time"
        );
    }
    if let Ok(DriverEvent::Done(done)) = parse_event(Language::Shell, line) {
        assert_eq!(done.ok, done.exit_code == 0);
        assert!(done.cpu.is_none());
    }
}
