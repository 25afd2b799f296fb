//! The direct channel's Noise handshake: an arbitrary Hello never panics the
//! market and never completes without X, and an arbitrary HelloOk never
//! completes a terminal's handshake.
#![no_main]

use keybroker::proto::direct::{Hello, Initiator};
use libfuzzer_sys::fuzz_target;

const X: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = Hello::parse(data) {
        let mut out = Vec::new();
        assert!(hello.accept(&X, &mut out).is_err(), "a forged Hello passed");
        assert!(out.is_empty(), "a refused Hello was answered");
    }
    let mut hello = Vec::new();
    let sid = <[u8; 16]>::try_from(&data[..data.len().min(16)]).unwrap_or([1; 16]);
    let init = Initiator::start(&X, sid, &mut hello);
    assert!(init.finish(data).is_err(), "a forged HelloOk completed");
});
