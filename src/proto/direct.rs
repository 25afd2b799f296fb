//! Direct channel (terminal ⇄ market): AES-256-GCM records keyed from X.
//!
//! ```text
//! terminal ─Hello{session id}─► market ─HelloOk | Alert{code}─► terminal
//! then Record{seq, AES-256-GCM(key_dir, nonce = 0^4 ‖ seq, aad = sid ‖ dir ‖ seq)} both ways
//! key_c2s, key_s2c = HKDF-SHA256(salt = session id, ikm = X, info = "keybroker direct c2s|s2c v1")
//! ```
//!
//! Each direction's sequence starts at 0 and must arrive in order: a
//! replayed, reordered, dropped or forged record is refused and the channel
//! ends. Frames are `type:u8 | len:u32 | payload` (docs/PROTOCOL.md §3).

use super::code::ErrorCode;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
use thiserror::Error;

pub const HELLO: u8 = 0x01;
pub const HELLO_OK: u8 = 0x02;
pub const ALERT: u8 = 0x03;
pub const RECORD: u8 = 0x04;
/// Largest payload of a direct frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;
const TAG: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DirectError {
    #[error("frame too large")]
    TooLarge,
    #[error("malformed frame")]
    Malformed,
    #[error("record out of order: expected {expected}, got {got}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("record failed authentication")]
    Forged,
}

impl DirectError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge => ErrorCode::TooLarge,
            Self::Malformed => ErrorCode::Malformed,
            Self::OutOfOrder { .. } | Self::Forged => ErrorCode::BadRecord,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Terminal,
    Market,
}

fn key(x: &[u8; 32], session_id: &[u8; 16], info: &[u8]) -> LessSafeKey {
    let prk = Salt::new(HKDF_SHA256, session_id).extract(x);
    let info = [info];
    let okm = prk.expand(&info, &AES_256_GCM).expect("HKDF length");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// One end of a direct channel.
pub struct Channel {
    session_id: [u8; 16],
    send: LessSafeKey,
    recv: LessSafeKey,
    send_dir: u8,
    send_seq: u64,
    recv_seq: u64,
}

impl Channel {
    pub fn new(x: &[u8; 32], session_id: [u8; 16], role: Role) -> Self {
        let c2s = key(x, &session_id, b"keybroker direct c2s v1");
        let s2c = key(x, &session_id, b"keybroker direct s2c v1");
        let (send, recv, send_dir) = match role {
            Role::Terminal => (c2s, s2c, 0),
            Role::Market => (s2c, c2s, 1),
        };
        Self {
            session_id,
            send,
            recv,
            send_dir,
            send_seq: 0,
            recv_seq: 0,
        }
    }

    fn aad(&self, dir: u8, seq: u64) -> [u8; 25] {
        let mut a = [0u8; 25];
        a[..16].copy_from_slice(&self.session_id);
        a[16] = dir;
        a[17..].copy_from_slice(&seq.to_be_bytes());
        a
    }

    fn nonce(seq: u64) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&seq.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }

    /// Appends a Record frame carrying `plaintext`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) {
        assert!(
            plaintext.len() + 8 + TAG <= MAX_PAYLOAD,
            "payload bounded by caller"
        );
        let seq = self.send_seq;
        self.send_seq += 1;
        let aad = self.aad(self.send_dir, seq);
        out.push(RECORD);
        out.extend_from_slice(&((8 + plaintext.len() + TAG) as u32).to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .send
            .seal_in_place_separate_tag(Self::nonce(seq), Aad::from(aad), &mut out[start..])
            .expect("sealing");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens the payload of a Record frame.
    pub fn open(&mut self, payload: &[u8]) -> Result<Vec<u8>, DirectError> {
        if payload.len() < 8 + TAG {
            return Err(DirectError::Malformed);
        }
        let seq = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
        if seq != self.recv_seq {
            return Err(DirectError::OutOfOrder {
                expected: self.recv_seq,
                got: seq,
            });
        }
        let aad = self.aad(1 - self.send_dir, seq);
        let mut buf = payload[8..].to_vec();
        let plain = self
            .recv
            .open_in_place(Self::nonce(seq), Aad::from(aad), &mut buf)
            .map_err(|_| DirectError::Forged)?
            .len();
        buf.truncate(plain);
        self.recv_seq += 1;
        Ok(buf)
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

    fn pair() -> (Channel, Channel) {
        let x = [3u8; 32];
        let sid = [4u8; 16];
        (
            Channel::new(&x, sid, Role::Terminal),
            Channel::new(&x, sid, Role::Market),
        )
    }

    fn payload(wire: &[u8]) -> Vec<u8> {
        let mut d = Decoder::default();
        d.push(wire);
        let (ty, p) = d.next_frame().unwrap().unwrap();
        assert_eq!(ty, RECORD);
        p
    }

    #[test]
    fn records_flow_both_ways() {
        let (mut t, mut m) = pair();
        for i in 0..3u8 {
            let mut w = Vec::new();
            t.seal(&[i; 10], &mut w);
            assert_eq!(m.open(&payload(&w)).unwrap(), vec![i; 10]);
            let mut w = Vec::new();
            m.seal(b"ok", &mut w);
            assert_eq!(t.open(&payload(&w)).unwrap(), b"ok");
        }
    }

    #[test]
    fn replay_reorder_forgery_and_reflection_are_refused() {
        let (mut t, mut m) = pair();
        let (mut r0, mut r1) = (Vec::new(), Vec::new());
        t.seal(b"first", &mut r0);
        t.seal(b"second", &mut r1);
        assert!(matches!(
            m.open(&payload(&r1)),
            Err(DirectError::OutOfOrder { .. })
        ));
        m.open(&payload(&r0)).unwrap();
        assert!(matches!(
            m.open(&payload(&r0)),
            Err(DirectError::OutOfOrder { .. })
        ));
        let mut forged = payload(&r1);
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(m.open(&forged), Err(DirectError::Forged));
        // A terminal's own record reflected back to it does not open.
        let (mut t2, _) = pair();
        let mut w = Vec::new();
        t2.seal(b"x", &mut w);
        let (mut t3, _) = pair();
        assert_eq!(t3.open(&payload(&w)), Err(DirectError::Forged));
        // Another X does not open.
        let mut other = Channel::new(&[9; 32], [4; 16], Role::Market);
        let mut w = Vec::new();
        Channel::new(&[3; 32], [4; 16], Role::Terminal).seal(b"x", &mut w);
        assert_eq!(other.open(&payload(&w)), Err(DirectError::Forged));
    }

    #[test]
    fn decoder_refuses_junk() {
        let mut d = Decoder::default();
        d.push(&[0x77, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(DirectError::Malformed));
        let mut d = Decoder::default();
        d.push(&[RECORD, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.next_frame(), Err(DirectError::TooLarge));
    }
}
