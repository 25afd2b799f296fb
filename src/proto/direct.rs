//! Direct channel (terminal ⇄ market): a Noise `NNpsk0` handshake keyed by
//! X, then Noise transport messages. Sans-IO: bytes in, bytes out.
//!
//! ```text
//! terminal                                               market
//! Hello{session id ‖ noise1 = e, AEAD_psk(empty)}   ──►  look up X by session id
//!                                                        (unknown / expired / over the cap: Alert)
//!                          ◄──  HelloOk{noise2 = e, ee, AEAD(empty)}
//! Record{noise transport message} ⇄ Record{...}          (keys from X *and* both ephemerals)
//! ```
//!
//! Protocol name `Noise_NNpsk0_25519_AESGCM_SHA256`, prologue
//! `"keybroker direct v2" ‖ session id`, PSK = X. Security argument
//! (docs/PROTOCOL.md §3.2): every connection's traffic keys mix X with two
//! fresh X25519 ephemerals, one from each side, so no two connections share
//! a key, a recorded flight is worthless on a new connection, and each
//! direction's nonce is Noise's counter from 0 under its own key.
//! Requests travel only after the handshake: the Hello carries no data.

use super::code::ErrorCode;
use thiserror::Error;

pub const HELLO: u8 = 0x01;
pub const HELLO_OK: u8 = 0x02;
pub const ALERT: u8 = 0x03;
pub const RECORD: u8 = 0x04;
/// The Noise protocol name; a terminal in another language builds its
/// handshake from this string (e.g. Python `noiseprotocol`).
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Prologue prefix; the session id follows it.
pub const PROLOGUE_LABEL: &[u8] = b"keybroker direct v2";
/// Largest Noise message, and so the largest payload of a direct frame.
pub const MAX_PAYLOAD: usize = 65_535;
/// Noise's AEAD tag.
const TAG: usize = 16;
/// Largest plaintext of one record.
pub const MAX_PLAINTEXT: usize = MAX_PAYLOAD - TAG;
/// A handshake message: an X25519 key and the tag of an empty payload.
pub const NOISE_HELLO_LEN: usize = 32 + TAG;
/// Hello payload: session id and the first handshake message.
pub const HELLO_LEN: usize = 16 + NOISE_HELLO_LEN;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DirectError {
    #[error("frame too large")]
    TooLarge,
    #[error("malformed frame")]
    Malformed,
    #[error("handshake failed: the peer does not hold this session's X")]
    Handshake,
    #[error("record failed authentication (forged, replayed, reordered or lost)")]
    BadRecord,
}

impl DirectError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge => ErrorCode::TooLarge,
            Self::Malformed => ErrorCode::Malformed,
            Self::Handshake => ErrorCode::BadHandshake,
            Self::BadRecord => ErrorCode::BadRecord,
        }
    }
}

fn prologue(session_id: &[u8; 16]) -> Vec<u8> {
    [PROLOGUE_LABEL, session_id].concat()
}

fn builder<'a>(x: &'a [u8; 32], prologue: &'a [u8]) -> snow::Builder<'a> {
    let params = NOISE_PARAMS.parse().expect("valid Noise name");
    snow::Builder::with_resolver(params, Box::new(super::noise::AwsLcResolver))
        .psk(0, x)
        .and_then(|b| b.prologue(prologue))
        .expect("a PSK and a prologue are valid for NNpsk0")
}

fn build(
    x: &[u8; 32],
    session_id: &[u8; 16],
    ephemeral: Option<&[u8; 32]>,
    initiator: bool,
) -> snow::HandshakeState {
    let prologue = prologue(session_id);
    let mut b = builder(x, &prologue);
    if let Some(e) = ephemeral {
        b = b.fixed_ephemeral_key_for_testing_only(e);
    }
    let hs = if initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    };
    hs.expect("NNpsk0 with a PSK builds")
}

/// The terminal's half of a handshake, between Hello and HelloOk.
pub struct Initiator {
    hs: snow::HandshakeState,
}

impl Initiator {
    /// Starts a handshake for the session `session_id` keyed by `x`, and
    /// appends the Hello frame to `out`.
    pub fn start(x: &[u8; 32], session_id: [u8; 16], out: &mut Vec<u8>) -> Self {
        Self::start_with(x, session_id, None, out)
    }

    /// As [`Initiator::start`] with a fixed ephemeral private key: only for
    /// the test vectors (docs/vectors/), never on a live connection.
    pub fn start_with(
        x: &[u8; 32],
        session_id: [u8; 16],
        ephemeral: Option<&[u8; 32]>,
        out: &mut Vec<u8>,
    ) -> Self {
        let mut hs = build(x, &session_id, ephemeral, true);
        let mut msg = [0u8; NOISE_HELLO_LEN];
        let n = hs.write_message(&[], &mut msg).expect("first message");
        debug_assert_eq!(n, NOISE_HELLO_LEN);
        out.push(HELLO);
        out.extend_from_slice(&(HELLO_LEN as u32).to_be_bytes());
        out.extend_from_slice(&session_id);
        out.extend_from_slice(&msg);
        Self { hs }
    }

    /// Completes the handshake with the payload of the market's HelloOk.
    pub fn finish(mut self, hello_ok: &[u8]) -> Result<Channel, DirectError> {
        if hello_ok.len() != NOISE_HELLO_LEN {
            return Err(DirectError::Malformed);
        }
        let mut empty = [0u8; 0];
        self.hs
            .read_message(hello_ok, &mut empty)
            .map_err(|_| DirectError::Handshake)?;
        Channel::from(self.hs)
    }
}

/// A Hello's session id and handshake message, split so the market can look
/// up X before it touches the handshake.
pub struct Hello<'a> {
    pub session_id: [u8; 16],
    noise: &'a [u8],
}

impl<'a> Hello<'a> {
    pub fn parse(payload: &'a [u8]) -> Result<Self, DirectError> {
        if payload.len() != HELLO_LEN {
            return Err(DirectError::Malformed);
        }
        let (sid, noise) = payload.split_at(16);
        Ok(Self {
            session_id: sid.try_into().expect("16 bytes"),
            noise,
        })
    }

    /// The market's side: checks that the terminal holds X, and appends
    /// HelloOk to `out`. Nothing is appended on failure.
    pub fn accept(&self, x: &[u8; 32], out: &mut Vec<u8>) -> Result<Channel, DirectError> {
        self.accept_with(x, None, out)
    }

    /// As [`Hello::accept`] with a fixed ephemeral key: test vectors only.
    pub fn accept_with(
        &self,
        x: &[u8; 32],
        ephemeral: Option<&[u8; 32]>,
        out: &mut Vec<u8>,
    ) -> Result<Channel, DirectError> {
        let mut hs = build(x, &self.session_id, ephemeral, false);
        let mut empty = [0u8; 0];
        hs.read_message(self.noise, &mut empty)
            .map_err(|_| DirectError::Handshake)?;
        let mut msg = [0u8; NOISE_HELLO_LEN];
        let n = hs.write_message(&[], &mut msg).expect("second message");
        debug_assert_eq!(n, NOISE_HELLO_LEN);
        let channel = Channel::from(hs)?;
        frame(HELLO_OK, &msg, out);
        Ok(channel)
    }
}

/// One end of an established direct channel.
pub struct Channel {
    transport: snow::TransportState,
}

impl Channel {
    fn from(hs: snow::HandshakeState) -> Result<Self, DirectError> {
        hs.into_transport_mode()
            .map(|transport| Self { transport })
            .map_err(|_| DirectError::Handshake)
    }

    /// Appends a Record frame carrying `plaintext` (at most
    /// [`MAX_PLAINTEXT`] bytes; callers bound it).
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) {
        assert!(
            plaintext.len() <= MAX_PLAINTEXT,
            "payload bounded by caller"
        );
        let len = plaintext.len() + TAG;
        out.push(RECORD);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        let start = out.len();
        out.resize(start + len, 0);
        let n = self
            .transport
            .write_message(plaintext, &mut out[start..])
            .expect("sealing a bounded record");
        debug_assert_eq!(n, len);
    }

    /// Opens the payload of a Record frame. Any failure ends the channel:
    /// the next record would be checked against the wrong counter anyway.
    pub fn open(&mut self, payload: &[u8]) -> Result<Vec<u8>, DirectError> {
        if payload.len() < TAG {
            return Err(DirectError::Malformed);
        }
        // Room for the tag too, so the AEAD opens in place.
        let mut plain = vec![0u8; payload.len()];
        let n = self
            .transport
            .read_message(payload, &mut plain)
            .map_err(|_| DirectError::BadRecord)?;
        plain.truncate(n);
        Ok(plain)
    }
}

/// Appends a non-record frame.
pub fn frame(ty: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(ty);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Splits a byte stream into `(type, payload)` frames.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet framed.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    pub fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, DirectError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let ty = self.buf[0];
        if !matches!(ty, HELLO | HELLO_OK | ALERT | RECORD) {
            return Err(DirectError::Malformed);
        }
        let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(DirectError::TooLarge);
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let payload = self.buf[5..5 + len].to_vec();
        self.buf.drain(..5 + len);
        Ok(Some((ty, payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: [u8; 32] = [3; 32];
    const SID: [u8; 16] = [4; 16];

    fn one(wire: &[u8]) -> (u8, Vec<u8>) {
        let mut d = Decoder::default();
        d.push(wire);
        d.next_frame().unwrap().unwrap()
    }

    fn pair() -> (Channel, Channel) {
        let mut w = Vec::new();
        let i = Initiator::start(&X, SID, &mut w);
        let (_, hello) = one(&w);
        let mut ok = Vec::new();
        let m = Hello::parse(&hello).unwrap().accept(&X, &mut ok).unwrap();
        let (ty, p) = one(&ok);
        assert_eq!(ty, HELLO_OK);
        (i.finish(&p).unwrap(), m)
    }

    #[test]
    fn records_flow_both_ways() {
        let (mut t, mut m) = pair();
        for i in 0..3u8 {
            let mut w = Vec::new();
            t.seal(&[i; 10], &mut w);
            assert_eq!(m.open(&one(&w).1).unwrap(), vec![i; 10]);
            let mut w = Vec::new();
            m.seal(b"ok", &mut w);
            assert_eq!(t.open(&one(&w).1).unwrap(), b"ok");
        }
    }

    #[test]
    fn replay_reorder_forgery_and_reflection_are_refused() {
        let (mut t, mut m) = pair();
        let (mut r0, mut r1) = (Vec::new(), Vec::new());
        t.seal(b"first", &mut r0);
        t.seal(b"second", &mut r1);
        assert_eq!(m.open(&one(&r1).1), Err(DirectError::BadRecord));
        let (mut t, mut m) = pair();
        let mut r0 = Vec::new();
        t.seal(b"first", &mut r0);
        m.open(&one(&r0).1).unwrap();
        assert_eq!(m.open(&one(&r0).1), Err(DirectError::BadRecord));
        let (mut t, mut m) = pair();
        let mut w = Vec::new();
        t.seal(b"x", &mut w);
        let mut forged = one(&w).1;
        forged[0] ^= 1;
        assert_eq!(m.open(&forged), Err(DirectError::BadRecord));
        // A terminal's own record reflected back to it does not open.
        let (mut t, _) = pair();
        let mut w = Vec::new();
        t.seal(b"x", &mut w);
        assert_eq!(t.open(&one(&w).1), Err(DirectError::BadRecord));
    }

    #[test]
    fn each_connection_has_its_own_keys() {
        // The same plaintext at the same position on two connections of one
        // session: unrelated ciphertexts, and neither opens on the other.
        let (mut t1, mut m1) = pair();
        let (mut t2, mut m2) = pair();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        t1.seal(b"pay 10", &mut a);
        t2.seal(b"pay 10", &mut b);
        assert_ne!(a, b);
        assert_eq!(m2.open(&one(&a).1), Err(DirectError::BadRecord));
        assert_eq!(m1.open(&one(&b).1), Err(DirectError::BadRecord));
    }

    #[test]
    fn a_replayed_hello_gives_a_channel_the_replayer_cannot_use() {
        let mut w = Vec::new();
        let i = Initiator::start(&X, SID, &mut w);
        let (_, hello) = one(&w);
        let mut ok = Vec::new();
        let _first = Hello::parse(&hello).unwrap().accept(&X, &mut ok).unwrap();
        // The replay is accepted by the market, which answers with a fresh
        // ephemeral; the original terminal's state cannot finish with it
        // twice, and a record from the first run does not open here.
        let mut ok2 = Vec::new();
        let mut second = Hello::parse(&hello).unwrap().accept(&X, &mut ok2).unwrap();
        assert_ne!(ok, ok2);
        let mut t = i.finish(&one(&ok).1).unwrap();
        let mut rec = Vec::new();
        t.seal(b"pay 10", &mut rec);
        assert_eq!(second.open(&one(&rec).1), Err(DirectError::BadRecord));
    }

    #[test]
    fn wrong_x_or_session_id_fails_the_handshake() {
        let mut w = Vec::new();
        let _ = Initiator::start(&X, SID, &mut w);
        let (_, hello) = one(&w);
        let mut out = Vec::new();
        let h = Hello::parse(&hello).unwrap();
        assert!(matches!(
            h.accept(&[9; 32], &mut out),
            Err(DirectError::Handshake)
        ));
        assert!(out.is_empty());
        let mut moved = hello.clone();
        moved[0] ^= 1;
        assert!(matches!(
            Hello::parse(&moved).unwrap().accept(&X, &mut out),
            Err(DirectError::Handshake)
        ));
        assert!(matches!(
            Hello::parse(&hello[..20]),
            Err(DirectError::Malformed)
        ));
    }

    #[test]
    fn decoder_refuses_junk() {
        let mut d = Decoder::default();
        d.push(&[0x77, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(DirectError::Malformed));
        let mut d = Decoder::default();
        d.push(&[RECORD, 0, 1, 0, 0]);
        assert_eq!(d.next_frame(), Err(DirectError::TooLarge));
    }
}
