//! Direct-channel frames and records: arbitrary bytes never panic and never
//! open as a record without the key; a sealed record opens exactly once.
#![no_main]

use keybroker::proto::direct::{Channel, Decoder, RECORD, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut market = Channel::new(&[7; 32], [1; 16], Role::Market);
    let mut dec = Decoder::default();
    dec.push(data);
    while let Ok(Some((ty, payload))) = dec.next_frame() {
        if ty == RECORD {
            assert!(market.open(&payload).is_err(), "a forged record opened");
        }
    }
    // Round trip with the real key, payload taken from the input.
    let mut terminal = Channel::new(&[7; 32], [1; 16], Role::Terminal);
    let mut market = Channel::new(&[7; 32], [1; 16], Role::Market);
    let mut wire = Vec::new();
    let body = &data[..data.len().min(1024)];
    terminal.seal(body, &mut wire);
    let mut dec = Decoder::default();
    dec.push(&wire);
    let (_, payload) = dec.next_frame().unwrap().unwrap();
    assert_eq!(market.open(&payload).unwrap(), body);
    assert!(market.open(&payload).is_err(), "a replayed record opened");
});
