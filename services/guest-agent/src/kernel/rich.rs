//! Fitting a Result or Display event (MIME type → bytes) into what may still be sent: the
//! room left under the execute's output cap, and one gRPC message
//! ([`capsa_proto::limits::MAX_EVENT_DATA_BYTES`]).
//!
//! Large values are cut, not split into several events: a client reads one Result or
//! Display event as one whole value per MIME type, and a split PNG would look like two
//! broken images to every client written against the contract so far. So entries are taken
//! in order (`text/plain` first, then by MIME type); one that fits is kept whole, a text one
//! that does not is shortened at a character boundary, and any other (an image: half a PNG
//! is no image) is dropped. What was cut is reported so the caller can say so in a marker.

use std::collections::HashMap;

use bytes::Bytes;
use capsa_proto::limits::event_entry_bytes;

/// One MIME entry that did not fit whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub mime: String,
    /// Bytes of the value that were kept (0: dropped).
    pub kept: usize,
    pub total: usize,
}

/// What fitted, and what was cut to get there.
#[derive(Debug, Default)]
pub struct Fitted {
    pub data: HashMap<String, Bytes>,
    /// Bytes of the values kept: what counts against the output cap.
    pub value_bytes: u64,
    pub cuts: Vec<Cut>,
}

/// Fits `data` into `cap_room` bytes of values and `message_room` bytes of entries (as
/// [`event_entry_bytes`] counts them).
pub fn fit(data: HashMap<String, Bytes>, cap_room: u64, message_room: usize) -> Fitted {
    let mut entries: Vec<(String, Bytes)> = data.into_iter().collect();
    entries.sort_by(|(a, _), (b, _)| (a != "text/plain", a).cmp(&(b != "text/plain", b)));
    let mut out = Fitted::default();
    let (mut cap_room, mut message_room) = (cap_room, message_room);
    for (mime, value) in entries {
        let whole = event_entry_bytes(mime.len(), value.len());
        if value.len() as u64 <= cap_room && whole <= message_room {
            cap_room -= value.len() as u64;
            message_room -= whole;
            out.value_bytes += value.len() as u64;
            out.data.insert(mime, value);
            continue;
        }
        let total = value.len();
        let room = (cap_room.min(usize::MAX as u64) as usize)
            .min(message_room.saturating_sub(event_entry_bytes(mime.len(), 0)));
        let kept = if is_text(&mime) {
            utf8_prefix(&value, room)
        } else {
            0
        };
        if kept > 0 {
            cap_room -= kept as u64;
            message_room -= event_entry_bytes(mime.len(), kept);
            out.value_bytes += kept as u64;
            out.data.insert(mime.clone(), value.slice(..kept));
        }
        out.cuts.push(Cut { mime, kept, total });
    }
    out
}

/// Types whose prefix is still readable as what it is.
fn is_text(mime: &str) -> bool {
    mime.starts_with("text/") || mime == "application/json" || mime.ends_with("+json")
}

/// The longest prefix of `value` of at most `max` bytes that does not end inside a UTF-8
/// sequence (bytes that are not UTF-8 at all are cut at `max`).
fn utf8_prefix(value: &[u8], max: usize) -> usize {
    if value.len() <= max {
        return value.len();
    }
    let mut end = max;
    // A UTF-8 sequence is at most 4 bytes: look back at most 3 for a boundary.
    for _ in 0..3 {
        if end == 0 || value[end] & 0xC0 != 0x80 {
            break;
        }
        end -= 1;
    }
    if std::str::from_utf8(&value[..end]).is_ok() {
        end
    } else {
        max
    }
}

/// Says what was cut, for the marker on stderr.
pub fn describe(cuts: &[Cut]) -> String {
    cuts.iter()
        .map(|c| match c.kept {
            0 => format!("{} of {} bytes dropped", c.mime, c.total),
            kept => format!("{} cut to {kept} of {} bytes", c.mime, c.total),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Fits an uncaught exception into `room` bytes: its value and traceback lines are cut at a
/// character boundary with a marker, and when the lines are still too many the earliest
/// go first (the end of a traceback says where it failed). Returns whether anything was cut.
pub fn fit_error(
    name: &mut String,
    value: &mut String,
    traceback: &mut Vec<String>,
    room: usize,
) -> bool {
    // Field tag and length of each string.
    const FRAMING: usize = 8;
    let size = |name: &String, value: &String, tb: &Vec<String>| {
        name.len() + value.len() + tb.iter().map(|l| l.len() + FRAMING).sum::<usize>()
    };
    if size(name, value, traceback) + 2 * FRAMING <= room {
        return false;
    }
    let share = room / 4;
    cut_str(name, 1024);
    cut_str(value, share);
    for line in traceback.iter_mut() {
        cut_str(line, share);
    }
    let mut dropped = 0;
    while size(name, value, traceback) + 2 * FRAMING + 64 > room && !traceback.is_empty() {
        traceback.remove(0);
        dropped += 1;
    }
    if dropped > 0 {
        traceback.insert(0, format!("[capsa: {dropped} earlier traceback lines cut]"));
    }
    true
}

/// Shortens `s` to at most `max` bytes, marker included, at a character boundary.
fn cut_str(s: &mut String, max: usize) {
    const MARKER: &str = " [capsa: cut]";
    if s.len() <= max {
        return;
    }
    let mut end = max.saturating_sub(MARKER.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(MARKER);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(entries: &[(&str, &[u8])]) -> HashMap<String, Bytes> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v)))
            .collect()
    }

    #[test]
    fn what_fits_is_kept_whole() {
        let f = fit(
            data(&[("text/plain", b"42"), ("image/png", b"png")]),
            5,
            1000,
        );
        assert_eq!(f.data.len(), 2);
        assert_eq!(f.value_bytes, 5);
        assert!(f.cuts.is_empty());
    }

    #[test]
    fn text_is_shortened_and_images_are_dropped() {
        let f = fit(
            data(&[("text/plain", b"abcdef"), ("image/png", b"\x89PNG....")]),
            4,
            1000,
        );
        assert_eq!(f.data["text/plain"], Bytes::from_static(b"abcd"));
        assert!(!f.data.contains_key("image/png"));
        assert_eq!(f.value_bytes, 4);
        assert_eq!(
            describe(&f.cuts),
            "text/plain cut to 4 of 6 bytes; image/png of 8 bytes dropped"
        );
    }

    #[test]
    fn the_message_limit_counts_keys_and_framing() {
        let room = event_entry_bytes("text/plain".len(), 10);
        let f = fit(data(&[("text/plain", &[b'x'; 20])]), u64::MAX, room);
        assert_eq!(f.data["text/plain"].len(), 10);
        // A smaller entry after one that was dropped still fits.
        let f = fit(
            data(&[("image/png", &[0; 100]), ("image/svg+xml", b"<svg/>")]),
            u64::MAX,
            event_entry_bytes("image/svg+xml".len(), 50),
        );
        assert_eq!(f.data.keys().collect::<Vec<_>>(), ["image/svg+xml"]);
        assert_eq!(f.cuts.len(), 1);
    }

    #[test]
    fn text_is_not_cut_inside_a_character() {
        let f = fit(data(&[("text/plain", "aé€".as_bytes())]), 4, 1000);
        assert_eq!(f.data["text/plain"], Bytes::from("aé"));
        assert_eq!(utf8_prefix(b"\xff\xfe\xfd", 2), 2);
    }

    #[test]
    fn no_room_keeps_nothing() {
        let f = fit(data(&[("text/plain", b"abc")]), 0, 1000);
        assert!(f.data.is_empty());
        assert_eq!(f.cuts[0].kept, 0);
    }

    #[test]
    fn an_error_is_cut_to_the_room() {
        let (mut name, mut value) = ("ValueError".to_string(), "é".repeat(1000));
        let mut tb: Vec<String> = (0..100)
            .map(|i| format!("line {i} {}", "x".repeat(50)))
            .collect();
        assert!(!fit_error(&mut name, &mut value, &mut tb.clone(), 100_000));
        assert!(fit_error(&mut name, &mut value, &mut tb, 2000));
        assert!(
            value.len() <= 500 && value.ends_with(" [capsa: cut]"),
            "{value}"
        );
        assert!(tb[0].starts_with("[capsa: ") && tb.last().unwrap().starts_with("line 99 "));
        let total = name.len() + value.len() + tb.iter().map(|l| l.len() + 8).sum::<usize>();
        assert!(total <= 2000, "{total}");
    }
}
