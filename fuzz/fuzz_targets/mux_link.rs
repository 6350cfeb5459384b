//! The host side of a QEMU VM's agent channel against whatever the guest writes: the guest
//! is untrusted, and its bytes reach the host's multiplexer (`capsa_vsock::mux`) as they
//! are. The input becomes a stream of frames (well formed or not, in any order, for any
//! stream, plus raw bytes), after one greeting so the link gets in step. Nothing may panic,
//! the link must end when the bytes do, and every stream must be gone with it.
#![no_main]

use std::io::Cursor;
use std::time::Duration;

use bytes::Bytes;
use capsa_vsock::mux::{Limits, Mux, Side, encode_frame};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fuzz_target!(|data: &[u8]| {
    let mut wire = Vec::new();
    // A greeting (kind 1): not a reply, generation 7.
    encode_frame(1, 0, &[0, 7, 0, 0, 0, 0, 0, 0, 0], &mut wire);
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        // Each item: the kind (its low nibble; 0 means raw bytes instead of a frame), one byte
        // of stream id, one byte of payload length, the payload.
        let (stream, tail) = tail.split_first().map_or((0, tail), |(s, t)| (*s, t));
        let (len, tail) = tail.split_first().map_or((0, tail), |(l, t)| (*l, t));
        let (payload, tail) = tail.split_at(usize::from(len).min(tail.len()));
        rest = tail;
        match op & 0x0f {
            0 => wire.extend_from_slice(payload),
            kind => encode_frame(kind, u32::from(stream), payload, &mut wire),
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let (mux, mut incoming) = Mux::start(
            Side::Host,
            Limits::HOST,
            Bytes::new(),
            Cursor::new(wire),
            tokio::io::sink(),
        );
        tokio::spawn(async move {
            while let Some(request) = incoming.recv().await {
                let mut stream = request.accept();
                tokio::spawn(async move {
                    let _ = stream.write_all(b"from the host").await;
                    let mut buf = [0u8; 4096];
                    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        // Time is paused: this only fails if the link never notices the end of its bytes.
        tokio::time::timeout(Duration::from_secs(3600), mux.closed())
            .await
            .expect("the link ends with its carrier");
        assert_eq!(mux.open_streams(), 0);
    });
});
