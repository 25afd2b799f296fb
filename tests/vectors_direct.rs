//! docs/vectors/direct.json: one direct-channel handshake and one request
//! and answer, with fixed X, session id and ephemeral keys. The encoders
//! must reproduce every byte and the decoders must accept them; an
//! independent Noise implementation (Python `noiseprotocol`,
//! docs/vectors/check_direct.py) reproduces them too.
//!
//! Regenerate (only when the protocol changes on purpose):
//! `KEYBROKER_WRITE_VECTORS=1 cargo test --test vectors_direct`.

use keybroker::proto::direct::{self, Decoder, Hello, Initiator};
use serde_json::{Value, json};
use std::path::Path;

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/vectors/direct.json");

fn fixed(byte: u8) -> [u8; 32] {
    std::array::from_fn(|i| byte.wrapping_add(i as u8))
}

/// Computes every field of the vector from the inputs alone.
fn compute() -> Value {
    let x = fixed(0x10);
    let session_id: [u8; 16] = std::array::from_fn(|i| 0xA0 + i as u8);
    let (e_terminal, e_market) = (fixed(0x40), fixed(0x80));
    let request = b"RECEIPT 0".to_vec();
    let answer = b"market m1 to alice: hello".to_vec();

    let mut hello = Vec::new();
    let init = Initiator::start_with(&x, session_id, Some(&e_terminal), &mut hello);
    let mut hello_ok = Vec::new();
    let mut market = Hello::parse(&hello[5..])
        .unwrap()
        .accept_with(&x, Some(&e_market), &mut hello_ok)
        .unwrap();
    let mut terminal = init.finish(&hello_ok[5..]).unwrap();
    let mut record_c2s = Vec::new();
    terminal.seal(&request, &mut record_c2s);
    let mut record_s2c = Vec::new();
    market.seal(&answer, &mut record_s2c);
    json!({
        "description": "Direct channel (docs/PROTOCOL.md §3): Noise_NNpsk0_25519_AESGCM_SHA256, prologue = \"keybroker direct v2\" || session_id, psk = X. Frames are type:u8 || len:u32 || payload. The ephemeral keys are fixed here only; a live connection draws them at random.",
        "noise_protocol": direct::NOISE_PARAMS,
        "x": hex::encode(x),
        "session_id": hex::encode(session_id),
        "prologue": hex::encode([direct::PROLOGUE_LABEL, &session_id].concat()),
        "terminal_ephemeral_private": hex::encode(e_terminal),
        "market_ephemeral_private": hex::encode(e_market),
        "hello_frame": hex::encode(&hello),
        "hello_ok_frame": hex::encode(&hello_ok),
        "request_plaintext": hex::encode(&request),
        "record_c2s_0": hex::encode(&record_c2s),
        "answer_plaintext": hex::encode(&answer),
        "record_s2c_0": hex::encode(&record_s2c),
    })
}

fn field(v: &Value, k: &str) -> Vec<u8> {
    hex::decode(v[k].as_str().unwrap_or_else(|| panic!("{k} missing"))).unwrap()
}

#[test]
fn the_code_reproduces_the_direct_channel_vector() {
    let computed = compute();
    if std::env::var_os("KEYBROKER_WRITE_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&computed).unwrap();
        std::fs::write(FILE, text + "\n").unwrap();
    }
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(FILE).unwrap()).unwrap();
    assert_eq!(
        stored, computed,
        "the encoders no longer produce docs/vectors/direct.json"
    );

    // The decoders accept the stored bytes: the market side opens the
    // terminal's record and the terminal side opens the market's.
    let (x, sid) = (
        <[u8; 32]>::try_from(field(&stored, "x")).unwrap(),
        <[u8; 16]>::try_from(field(&stored, "session_id")).unwrap(),
    );
    let frames = |k: &str| {
        let mut d = Decoder::default();
        d.push(&field(&stored, k));
        let f = d.next_frame().unwrap().unwrap();
        assert_eq!(d.pending(), 0, "{k}: trailing bytes");
        f
    };
    let (ty, hello) = frames("hello_frame");
    assert_eq!(ty, direct::HELLO);
    let parsed = Hello::parse(&hello).unwrap();
    assert_eq!(parsed.session_id, sid);
    let e_market = <[u8; 32]>::try_from(field(&stored, "market_ephemeral_private")).unwrap();
    let mut ok = Vec::new();
    let mut market = parsed.accept_with(&x, Some(&e_market), &mut ok).unwrap();
    let (_, record) = frames("record_c2s_0");
    assert_eq!(
        market.open(&record).unwrap(),
        field(&stored, "request_plaintext")
    );
    let e_terminal = <[u8; 32]>::try_from(field(&stored, "terminal_ephemeral_private")).unwrap();
    let init = Initiator::start_with(&x, sid, Some(&e_terminal), &mut Vec::new());
    let (ty, hello_ok) = frames("hello_ok_frame");
    assert_eq!(ty, direct::HELLO_OK);
    let mut terminal = init.finish(&hello_ok).unwrap();
    let (_, record) = frames("record_s2c_0");
    assert_eq!(
        terminal.open(&record).unwrap(),
        field(&stored, "answer_plaintext")
    );
}

/// The same vector from an implementation that shares no code with ours.
#[test]
fn an_independent_noise_implementation_reproduces_the_vector() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/vectors/check_direct.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(FILE)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
