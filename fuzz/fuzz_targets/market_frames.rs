//! Market-channel batches: both directions' decoders on arbitrary bytes,
//! and the stream splitter, never panic; decoded batches re-encode exactly.
#![no_main]

use keybroker::proto::market::{Splitter, decode_replies, decode_requests, encode_replies, encode_requests};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(reqs) = decode_requests(data) {
        let mut wire = Vec::new();
        encode_requests(reqs.iter(), &mut wire);
        assert_eq!(&wire[4..], data);
    }
    if let Ok(replies) = decode_replies(data) {
        let mut wire = Vec::new();
        encode_replies(&replies, &mut wire);
        assert_eq!(&wire[4..], data);
    }
    let mut s = Splitter::default();
    s.push(data);
    while let Ok(Some(frame)) = s.next_frame() {
        let _ = decode_requests(&frame);
    }
});
