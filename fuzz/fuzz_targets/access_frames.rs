//! Access-channel frames: arbitrary bytes in any split never panic, and
//! every frame that decodes re-encodes to the same bytes.
#![no_main]

use keybroker::proto::access::{FrameDecoder, decode_body, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode_body(data) {
        let mut wire = Vec::new();
        encode(&frame, &mut wire);
        assert_eq!(&wire[4..], data, "decode/encode must round-trip");
    }
    let split = data.first().map_or(1, |b| usize::from(*b % 16) + 1);
    let mut dec = FrameDecoder::new(1024);
    for chunk in data.chunks(split) {
        dec.push(chunk);
        loop {
            match dec.next_frame() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) => {
                    let _ = e.code();
                    return;
                }
            }
        }
        assert!(dec.pending() <= 1024 + 4 + split, "decoder holds more than one frame");
    }
});
