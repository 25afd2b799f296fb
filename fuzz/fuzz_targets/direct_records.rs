//! Direct-channel frames and records: arbitrary bytes never panic and never
//! open as a record without the connection's keys; a sealed record opens
//! exactly once.
#![no_main]

use keybroker::proto::direct::{Channel, Decoder, Hello, Initiator, RECORD};
use libfuzzer_sys::fuzz_target;

const X: [u8; 32] = [7; 32];
const SID: [u8; 16] = [1; 16];

fn pair() -> (Channel, Channel) {
    let mut hello = Vec::new();
    let init = Initiator::start(&X, SID, &mut hello);
    let mut ok = Vec::new();
    let market = Hello::parse(&hello[5..]).unwrap().accept(&X, &mut ok).unwrap();
    (init.finish(&ok[5..]).unwrap(), market)
}

fuzz_target!(|data: &[u8]| {
    let (_, mut market) = pair();
    let mut dec = Decoder::default();
    dec.push(data);
    while let Ok(Some((ty, payload))) = dec.next_frame() {
        if ty == RECORD {
            assert!(market.open(&payload).is_err(), "a forged record opened");
        }
    }
    // Round trip with the real keys, payload taken from the input.
    let (mut terminal, mut market) = pair();
    let mut wire = Vec::new();
    let body = &data[..data.len().min(1024)];
    terminal.seal(body, &mut wire);
    let mut dec = Decoder::default();
    dec.push(&wire);
    let (_, payload) = dec.next_frame().unwrap().unwrap();
    assert_eq!(market.open(&payload).unwrap(), body);
    assert!(market.open(&payload).is_err(), "a replayed record opened");
});
