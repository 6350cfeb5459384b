//! The output ring of a background process: the newest `cap` bytes of stdout and stderr
//! together, addressed by offset (all bytes the process ever wrote to either, from 0), with
//! the stream of every byte kept as runs, so a reader gets chunks of one stream each.

use std::collections::VecDeque;

use bytes::Bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What [`Ring::read`] found at an offset.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// The ring no longer holds the offset; it starts at `to`.
    Dropped { to: u64 },
    /// Bytes of one stream starting at the offset asked for.
    Data { stream: Stream, data: Bytes },
    /// Nothing past the offset yet.
    CaughtUp,
    /// The offset is past everything written.
    Beyond,
}

pub struct Ring {
    cap: usize,
    bytes: VecDeque<u8>,
    /// Offset of `bytes[0]`; the end offset is `start + bytes.len()`.
    start: u64,
    /// Where each run of one stream begins, ascending; the first may begin before `start`.
    runs: VecDeque<(u64, Stream)>,
}

impl Ring {
    /// A ring keeping the newest `cap` bytes (at least 1).
    pub fn new(cap: usize) -> Ring {
        Ring {
            cap: cap.max(1),
            bytes: VecDeque::new(),
            start: 0,
            runs: VecDeque::new(),
        }
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    pub fn push(&mut self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.runs.back().map(|r| r.1) != Some(stream) {
            self.runs.push_back((self.end(), stream));
        }
        let new_end = self.end() + data.len() as u64;
        let new_start = self.start.max(new_end.saturating_sub(self.cap as u64));
        let drop = (new_start - self.start) as usize;
        let from_held = drop.min(self.bytes.len());
        self.bytes.drain(..from_held);
        // Data longer than the ring: only its tail goes in.
        self.bytes.extend(&data[drop - from_held..]);
        self.start = new_start;
        while self.runs.len() >= 2 && self.runs[1].0 <= self.start {
            self.runs.pop_front();
        }
    }

    /// At most `max` bytes from `from`, all of one stream.
    pub fn read(&self, from: u64, max: usize) -> Read {
        if from < self.start {
            return Read::Dropped { to: self.start };
        }
        let end = self.end();
        if from == end {
            return Read::CaughtUp;
        }
        if from > end {
            return Read::Beyond;
        }
        let i = self.runs.partition_point(|r| r.0 <= from) - 1;
        let run_end = self.runs.get(i + 1).map_or(end, |r| r.0);
        let n = ((run_end - from) as usize).min(max);
        let at = (from - self.start) as usize;
        let mut out = Vec::with_capacity(n);
        let (a, b) = self.bytes.as_slices();
        if at < a.len() {
            let take = n.min(a.len() - at);
            out.extend_from_slice(&a[at..at + take]);
            out.extend_from_slice(&b[..n - take]);
        } else {
            out.extend_from_slice(&b[at - a.len()..at - a.len() + n]);
        }
        Read::Data {
            stream: self.runs[i].1,
            data: out.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Stream::{Stderr, Stdout};

    fn data(r: &Ring, from: u64, max: usize) -> (Stream, Vec<u8>) {
        match r.read(from, max) {
            Read::Data { stream, data } => (stream, data.to_vec()),
            other => panic!("expected data at {from}, got {other:?}"),
        }
    }

    #[test]
    fn reads_follow_stream_runs_and_offsets() {
        let mut r = Ring::new(100);
        r.push(Stdout, b"abc");
        r.push(Stdout, b"de");
        r.push(Stderr, b"XY");
        r.push(Stdout, b"f");
        assert_eq!((r.start(), r.end()), (0, 8));
        assert_eq!(data(&r, 0, 64), (Stdout, b"abcde".to_vec()));
        assert_eq!(data(&r, 2, 2), (Stdout, b"cd".to_vec()));
        assert_eq!(data(&r, 5, 64), (Stderr, b"XY".to_vec()));
        assert_eq!(data(&r, 6, 64), (Stderr, b"Y".to_vec()));
        assert_eq!(data(&r, 7, 64), (Stdout, b"f".to_vec()));
        assert_eq!(r.read(8, 64), Read::CaughtUp);
        assert_eq!(r.read(9, 64), Read::Beyond);
    }

    #[test]
    fn old_bytes_are_dropped_and_reported() {
        let mut r = Ring::new(4);
        r.push(Stdout, b"abc");
        r.push(Stderr, b"de");
        assert_eq!((r.start(), r.end()), (1, 5));
        assert_eq!(r.read(0, 64), Read::Dropped { to: 1 });
        assert_eq!(data(&r, 1, 64), (Stdout, b"bc".to_vec()));
        assert_eq!(data(&r, 3, 64), (Stderr, b"de".to_vec()));
        // A write longer than the ring keeps its tail; the old stdout run is gone.
        r.push(Stdout, b"0123456789");
        assert_eq!((r.start(), r.end()), (11, 15));
        assert_eq!(r.read(5, 64), Read::Dropped { to: 11 });
        assert_eq!(data(&r, 11, 64), (Stdout, b"6789".to_vec()));
        assert_eq!(r.runs.len(), 1);
    }

    #[test]
    fn reads_across_the_deque_wrap_are_whole() {
        let mut r = Ring::new(8);
        for i in 0..50u8 {
            r.push(Stdout, &[i, i + 1, i + 2]);
            let end = r.end();
            let (_, got) = data(&r, r.start(), 64);
            assert_eq!(got.len() as u64, end - r.start());
            assert_eq!(*got.last().unwrap(), i + 2);
        }
    }
}
