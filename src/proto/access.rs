//! Access-channel frames (terminal ⇄ broker), byte-exact per docs/PROTOCOL.md.
//!
//! ```text
//! bytes in ─► FrameDecoder::push ─► FrameDecoder::next ─► Frame ─► session state machine
//! Frame ─► encode ─► bytes out
//! ```
//!
//! A frame is `len:u32 | type:u8 | id:u32 | body`, where `len` counts
//! `type`, `id` and `body`. Nothing here touches a socket, a clock or the HSM.

use super::code::ErrorCode;
use super::market::MAX_ENDPOINT;
use super::wire::{Put, Reader, WireError};
use crate::proto::point::{Point, WRAPPED_LEN};
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

/// Longest user id, in bytes.
pub const MAX_USER: usize = crate::syntax::MAX_ID;
/// Longest password, in bytes.
pub const MAX_PASSWORD: usize = 256;
/// Longest error detail, in bytes.
pub const MAX_DETAIL: usize = 512;
/// Longest order reference, in bytes.
pub const MAX_REF: usize = 128;
/// Longest certificate, voucher or receipt, in bytes.
pub const MAX_BLOB: usize = 4096;
/// Longest DER ECDSA signature, in bytes.
pub const MAX_SIGNATURE: usize = 80;
/// Largest encoded cancel authorisation (`cancel_auth`): its body, a
/// signature and a certificate.
pub const MAX_AUTHORISATION: usize = 512 + MAX_SIGNATURE + MAX_BLOB + 6;
/// Most balances in one answer.
pub const MAX_BALANCES: usize = 64;
/// Bytes before the body: `len`, `type`, `id`.
pub const HEADER: usize = 9;
/// Default cap on `len`; the broker's `max_frame` setting may lower it.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024;

/// A password as it travels: zeroized on drop and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub Zeroizing<Vec<u8>>);

impl Password {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(Zeroizing::new(bytes.into()))
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Terminal → broker: first password (type 0x01).
    Login { user: String, password: Password },
    /// Terminal → broker: second password (type 0x02).
    Release { password: Password },
    /// Terminal → broker: end the session (type 0x03).
    Logout,
    /// Terminal → broker: liveness probe (type 0x04).
    Ping,
    /// Terminal → broker: agree a key X with `market`, full proxy (type 0x05).
    Exchange { market: String },
    /// Terminal → broker: partial proxy; the terminal brings its own
    /// ephemeral key and the broker only signs (type 0x06).
    ExchangePartial { market: String, ephemeral: Point },
    /// Terminal → broker: debit the wallet for a purchase (type 0x07).
    Purchase {
        market: String,
        amount_minor: i64,
        currency: [u8; 3],
        order_ref: String,
        idempotency_key: String,
    },
    /// Terminal → broker: cancel a decision with the market's authorisation
    /// (type 0x08).
    Cancel {
        decision_id: String,
        /// The market's encoded `cancel_auth::SignedCancel`.
        authorisation: Vec<u8>,
    },
    /// Terminal → broker: top up with a voucher and the second password (type 0x09).
    TopUp {
        voucher: Vec<u8>,
        password: Password,
    },
    /// Terminal → broker: the wallet's balances (type 0x0A).
    Balance,
    /// Broker → terminal: access granted; `confirm` proves both hold X' (type 0x81).
    LoginOk { confirm: [u8; 32] },
    /// Broker → terminal: authority released for this session (type 0x82).
    ReleaseOk,
    /// Broker → terminal: answer to Logout; the broker then closes (type 0x83).
    Bye,
    /// Broker → terminal: answer to Ping (type 0x84).
    Pong,
    /// Broker → terminal: X agreed with the market, wrapped under X' (type 0x85).
    ExchangeOk {
        session_id: [u8; 16],
        expiry_ms: u64,
        endpoint: String,
        wrapped_x: [u8; WRAPPED_LEN],
    },
    /// Broker → terminal: the market's half of a partial exchange (type 0x86).
    PartialOk {
        session_id: [u8; 16],
        expiry_ms: u64,
        endpoint: String,
        market_ephemeral: Point,
        transcript: [u8; 32],
    },
    /// Broker → terminal: the purchase decision and its receipt signed by
    /// the home-card key (type 0x87).
    PurchaseOk {
        balance_after: i64,
        receipt: Vec<u8>,
    },
    /// Broker → terminal: a wallet change done (cancel, top-up) (type 0x88).
    WalletOk { balance_after: i64 },
    /// Broker → terminal: balances by currency (type 0x8A).
    BalanceOk { balances: Vec<([u8; 3], i64)> },
    /// Broker → terminal: typed failure (type 0xFF).
    Error { code: ErrorCode, detail: String },
}

impl Message {
    pub fn type_byte(&self) -> u8 {
        match self {
            Self::Login { .. } => 0x01,
            Self::Release { .. } => 0x02,
            Self::Logout => 0x03,
            Self::Ping => 0x04,
            Self::Exchange { .. } => 0x05,
            Self::ExchangePartial { .. } => 0x06,
            Self::Purchase { .. } => 0x07,
            Self::Cancel { .. } => 0x08,
            Self::TopUp { .. } => 0x09,
            Self::Balance => 0x0A,
            Self::PurchaseOk { .. } => 0x87,
            Self::WalletOk { .. } => 0x88,
            Self::BalanceOk { .. } => 0x8A,
            Self::ExchangeOk { .. } => 0x85,
            Self::PartialOk { .. } => 0x86,
            Self::LoginOk { .. } => 0x81,
            Self::ReleaseOk => 0x82,
            Self::Bye => 0x83,
            Self::Pong => 0x84,
            Self::Error { .. } => 0xFF,
        }
    }

    pub fn error(code: ErrorCode, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        Self::Error { code, detail }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Chosen by the terminal; echoed in the answer.
    pub id: u32,
    pub msg: Message,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("malformed frame: {0}")]
    Malformed(#[from] WireError),
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::Malformed,
        }
    }
}

/// A frame that cannot be handled, with the id its answer echoes.
///
/// The id is the frame's own whenever its header (`len`, `type`, `id`) was
/// read, so a terminal that pipelines knows which request was refused; it is
/// 0 only when the header itself is cut short (`len` < 5).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{error}")]
pub struct BadFrame {
    pub id: u32,
    pub error: FrameError,
}

impl BadFrame {
    pub fn code(&self) -> ErrorCode {
        self.error.code()
    }

    /// The `Error` frame that answers it; the broker then closes.
    pub fn answer(&self) -> Frame {
        Frame {
            id: self.id,
            msg: Message::error(self.code(), self.error.to_string()),
        }
    }
}

/// Appends the encoding of `frame` to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.put_u32(0);
    out.put_u8(frame.msg.type_byte());
    out.put_u32(frame.id);
    match &frame.msg {
        Message::Login { user, password } => {
            out.put_bytes(user.as_bytes());
            out.put_bytes(password.expose());
        }
        Message::Release { password } => out.put_bytes(password.expose()),
        Message::LoginOk { confirm } => out.extend_from_slice(confirm),
        Message::Exchange { market } => out.put_bytes(market.as_bytes()),
        Message::ExchangePartial { market, ephemeral } => {
            out.put_bytes(market.as_bytes());
            ephemeral.put(out);
        }
        Message::ExchangeOk {
            session_id,
            expiry_ms,
            endpoint,
            wrapped_x,
        } => {
            out.extend_from_slice(session_id);
            out.put_u64(*expiry_ms);
            out.put_bytes(endpoint.as_bytes());
            out.extend_from_slice(wrapped_x);
        }
        Message::PartialOk {
            session_id,
            expiry_ms,
            endpoint,
            market_ephemeral,
            transcript,
        } => {
            out.extend_from_slice(session_id);
            out.put_u64(*expiry_ms);
            out.put_bytes(endpoint.as_bytes());
            market_ephemeral.put(out);
            out.extend_from_slice(transcript);
        }
        Message::Error { code, detail } => {
            out.put_u16(*code as u16);
            out.put_bytes(detail.as_bytes());
        }
        Message::Purchase {
            market,
            amount_minor,
            currency,
            order_ref,
            idempotency_key,
        } => {
            out.put_bytes(market.as_bytes());
            out.put_u64(*amount_minor as u64);
            out.extend_from_slice(currency);
            out.put_bytes(order_ref.as_bytes());
            out.put_bytes(idempotency_key.as_bytes());
        }
        Message::Cancel {
            decision_id,
            authorisation,
        } => {
            out.put_bytes(decision_id.as_bytes());
            out.put_bytes(authorisation);
        }
        Message::TopUp { voucher, password } => {
            out.put_bytes(voucher);
            out.put_bytes(password.expose());
        }
        Message::PurchaseOk {
            balance_after,
            receipt,
        } => {
            out.put_u64(*balance_after as u64);
            out.put_bytes(receipt);
        }
        Message::WalletOk { balance_after } => out.put_u64(*balance_after as u64),
        Message::BalanceOk { balances } => {
            out.put_u16(u16::try_from(balances.len()).expect("balances bounded by currencies"));
            for (c, v) in balances {
                out.extend_from_slice(c);
                out.put_u64(*v as u64);
            }
        }
        Message::Logout
        | Message::Ping
        | Message::ReleaseOk
        | Message::Bye
        | Message::Pong
        | Message::Balance => {}
    }
    let len = u32::try_from(out.len() - start - 4).expect("frame fits u32");
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Decodes one frame body (`type | id | body`, without the length).
pub fn decode_body(body: &[u8]) -> Result<Frame, BadFrame> {
    let mut r = Reader::new(body);
    let (ty, id) = match (r.u8("type"), r.u32("id")) {
        (Ok(ty), Ok(id)) => (ty, id),
        _ => {
            return Err(BadFrame {
                id: 0,
                error: WireError::Truncated("header").into(),
            });
        }
    };
    decode_message(ty, r)
        .map(|msg| Frame { id, msg })
        .map_err(|error| BadFrame { id, error })
}

/// The message of type `ty` in the rest of a frame, consumed exactly.
fn decode_message(ty: u8, mut r: Reader<'_>) -> Result<Message, FrameError> {
    let msg = match ty {
        0x01 => {
            let user = id_str(&mut r, "user")?;
            let password = Password::new(r.bytes(MAX_PASSWORD, "password")?);
            Message::Login { user, password }
        }
        0x02 => Message::Release {
            password: Password::new(r.bytes(MAX_PASSWORD, "password")?),
        },
        0x03 => Message::Logout,
        0x04 => Message::Ping,
        0x05 => Message::Exchange {
            market: id_str(&mut r, "market")?,
        },
        0x06 => Message::ExchangePartial {
            market: id_str(&mut r, "market")?,
            ephemeral: Point::read(&mut r, "ephemeral")?,
        },
        0x85 => Message::ExchangeOk {
            session_id: r.array("session_id")?,
            expiry_ms: r.u64("expiry")?,
            endpoint: r.str(MAX_ENDPOINT, "endpoint")?.to_owned(),
            wrapped_x: r.array("wrapped_x")?,
        },
        0x86 => Message::PartialOk {
            session_id: r.array("session_id")?,
            expiry_ms: r.u64("expiry")?,
            endpoint: r.str(MAX_ENDPOINT, "endpoint")?.to_owned(),
            market_ephemeral: Point::read(&mut r, "market_ephemeral")?,
            transcript: r.array("transcript")?,
        },
        0x81 => Message::LoginOk {
            confirm: r.array("confirm")?,
        },
        0x82 => Message::ReleaseOk,
        0x83 => Message::Bye,
        0x84 => Message::Pong,
        0x07 => Message::Purchase {
            market: id_str(&mut r, "market")?,
            amount_minor: r.u64("amount")? as i64,
            currency: r.array("currency")?,
            order_ref: r.str(MAX_REF, "order_ref")?.to_owned(),
            idempotency_key: id_str(&mut r, "idempotency_key")?,
        },
        0x08 => Message::Cancel {
            decision_id: id_str(&mut r, "decision_id")?,
            authorisation: r.bytes(MAX_AUTHORISATION, "authorisation")?.to_vec(),
        },
        0x09 => Message::TopUp {
            voucher: r.bytes(MAX_BLOB, "voucher")?.to_vec(),
            password: Password::new(r.bytes(MAX_PASSWORD, "password")?),
        },
        0x0A => Message::Balance,
        0x87 => Message::PurchaseOk {
            balance_after: r.u64("balance")? as i64,
            receipt: r.bytes(MAX_BLOB, "receipt")?.to_vec(),
        },
        0x88 => Message::WalletOk {
            balance_after: r.u64("balance")? as i64,
        },
        0x8A => {
            let n = r.u16("count")? as usize;
            if n > MAX_BALANCES {
                return Err(WireError::FieldTooLong("balances").into());
            }
            let mut balances = Vec::with_capacity(n);
            for _ in 0..n {
                balances.push((r.array("currency")?, r.u64("balance")? as i64));
            }
            Message::BalanceOk { balances }
        }
        0xFF => {
            let raw = r.u16("code")?;
            let code = ErrorCode::from_u16(raw).ok_or(WireError::Invalid("code"))?;
            let detail = r.str(MAX_DETAIL, "detail")?.to_owned();
            Message::Error { code, detail }
        }
        other => return Err(FrameError::UnknownType(other)),
    };
    r.finish()?;
    Ok(msg)
}

/// A non-empty id (user or market) of at most [`MAX_USER`] bytes.
fn id_str(r: &mut Reader<'_>, what: &'static str) -> Result<String, WireError> {
    let s = r.str(MAX_USER, what)?;
    if s.is_empty() {
        return Err(WireError::Invalid(what));
    }
    Ok(s.to_owned())
}

/// Splits a byte stream into frames. Holds at most one frame plus one read.
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max_frame: usize,
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: Vec::with_capacity(1024),
            start: 0,
            max_frame,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.zeroize();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held but not yet returned as frames.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next frame's length field, once its 4 bytes have arrived.
    fn next_len(&self) -> Option<usize> {
        let head = self.buf.get(self.start..self.start + 4)?;
        Some(u32::from_be_bytes(head.try_into().expect("4 bytes")) as usize)
    }

    /// The next frame's id, once its whole header has arrived.
    fn next_id(&self) -> Option<u32> {
        let id = self.buf.get(self.start + 5..self.start + HEADER)?;
        Some(u32::from_be_bytes(id.try_into().expect("4 bytes")))
    }

    /// Whether [`FrameDecoder::next_frame`] would return something now: a
    /// complete frame, or an error.
    pub fn ready(&self) -> bool {
        self.next_len().is_some_and(|len| {
            len < HEADER - 4
                || (len > self.max_frame && self.pending() >= HEADER)
                || self.pending() >= 4 + len
        })
    }

    /// The next complete frame, `None` if more bytes are needed. A
    /// [`BadFrame`] is final: the stream cannot be resynchronised.
    ///
    /// A `len` above the limit is refused as soon as the header is in, so
    /// the answer can echo the id, and before any of the body is buffered.
    /// A `len` too short to hold a header is refused at once, with id 0.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, BadFrame> {
        let Some(len) = self.next_len() else {
            return Ok(None);
        };
        if len < HEADER - 4 {
            return Err(BadFrame {
                id: 0,
                error: WireError::Truncated("header").into(),
            });
        }
        if len > self.max_frame {
            let Some(id) = self.next_id() else {
                return Ok(None);
            };
            return Err(BadFrame {
                id,
                error: FrameError::TooLarge {
                    len,
                    max: self.max_frame,
                },
            });
        }
        if self.pending() < 4 + len {
            return Ok(None);
        }
        let avail = &self.buf[self.start..];
        let frame = decode_body(&avail[4..4 + len]);
        // The frame may carry a password: its bytes do not outlive it.
        self.buf[self.start..self.start + 4 + len].zeroize();
        self.start += 4 + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > self.max_frame {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        frame.map(Some)
    }
}

impl Drop for FrameDecoder {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::point::Group;

    fn samples() -> Vec<Frame> {
        let msgs = vec![
            Message::Login {
                user: "alice".into(),
                password: Password::new(b"first".to_vec()),
            },
            Message::Release {
                password: Password::new(b"second".to_vec()),
            },
            Message::Logout,
            Message::Ping,
            Message::LoginOk { confirm: [7; 32] },
            Message::ReleaseOk,
            Message::Bye,
            Message::Pong,
            Message::Exchange {
                market: "m1".into(),
            },
            Message::Purchase {
                market: "m1".into(),
                amount_minor: -5,
                currency: *b"EUR",
                order_ref: "order 1".into(),
                idempotency_key: "k1".into(),
            },
            Message::Cancel {
                decision_id: "d1".into(),
                authorisation: vec![1, 2, 3],
            },
            Message::TopUp {
                voucher: vec![9; 10],
                password: Password::new(b"pw".to_vec()),
            },
            Message::Balance,
            Message::PurchaseOk {
                balance_after: 100,
                receipt: vec![4; 20],
            },
            Message::WalletOk { balance_after: 7 },
            Message::BalanceOk {
                balances: vec![(*b"EUR", 5), (*b"USD", 0)],
            },
            Message::ExchangePartial {
                market: "m1".into(),
                ephemeral: Point::new(Group::X25519, &[4; 32]).unwrap(),
            },
            Message::ExchangeOk {
                session_id: [1; 16],
                expiry_ms: 77,
                endpoint: "127.0.0.1:9".into(),
                wrapped_x: [2; 40],
            },
            Message::PartialOk {
                session_id: [1; 16],
                expiry_ms: 77,
                endpoint: "127.0.0.1:9".into(),
                market_ephemeral: Point::new(Group::P256, &[3; 65]).unwrap(),
                transcript: [5; 32],
            },
            Message::error(ErrorCode::Locked, "card locked"),
        ];
        msgs.into_iter()
            .enumerate()
            .map(|(i, msg)| Frame { id: i as u32, msg })
            .collect()
    }

    #[test]
    fn every_message_round_trips_byte_by_byte() {
        let mut wire = Vec::new();
        for f in samples() {
            encode(&f, &mut wire);
        }
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        for b in &wire {
            dec.push(std::slice::from_ref(b));
            loop {
                let ready = dec.ready();
                let Some(f) = dec.next_frame().unwrap() else {
                    assert!(!ready);
                    break;
                };
                assert!(ready);
                got.push(f);
            }
        }
        assert_eq!(got, samples());
        assert_eq!(dec.pending(), 0);
    }

    #[test]
    fn login_encoding_is_byte_exact() {
        let mut wire = Vec::new();
        let f = Frame {
            id: 0x0102_0304,
            msg: Message::Login {
                user: "ab".into(),
                password: Password::new(b"xyz".to_vec()),
            },
        };
        encode(&f, &mut wire);
        assert_eq!(
            wire,
            [
                0, 0, 0, 14, 0x01, 1, 2, 3, 4, 0, 2, b'a', b'b', 0, 3, b'x', b'y', b'z'
            ]
        );
    }

    #[test]
    fn oversized_frame_is_refused_once_its_header_is_in() {
        let mut dec = FrameDecoder::new(100);
        dec.push(&1000u32.to_be_bytes());
        assert!(!dec.ready(), "the id has not arrived yet");
        assert_eq!(dec.next_frame(), Ok(None));
        dec.push(&[0x05, 0, 0, 0]);
        assert_eq!(dec.next_frame(), Ok(None));
        dec.push(&[7]);
        assert!(dec.ready(), "an error to report is ready too");
        let err = dec.next_frame().expect_err("too large");
        assert_eq!(
            err,
            BadFrame {
                id: 7,
                error: FrameError::TooLarge {
                    len: 1000,
                    max: 100
                }
            }
        );
        assert_eq!(err.answer().id, 7);
        assert_eq!(err.code(), ErrorCode::TooLarge);
    }

    #[test]
    fn malformed_frames_are_typed_and_echo_the_id_once_the_header_is_in() {
        let cases: Vec<(Vec<u8>, u32)> = vec![
            (vec![0, 0, 0, 1, 0x01], 0),                   // shorter than a header
            (vec![0, 0, 0, 4, 0x01, 0, 0, 0], 0),          // still shorter than a header
            (vec![0, 0, 0, 5, 0x42, 0, 0, 0, 1], 1),       // unknown type
            (vec![0, 0, 0, 7, 0x01, 0, 0, 0, 2, 0, 9], 2), // user length past the end
            (vec![0, 0, 0, 6, 0x03, 0, 0, 0, 3, 0], 3),    // trailing byte
            (vec![0, 0, 0, 11, 0xFF, 0, 0, 0, 4, 3, 231, 0, 0, 0, 0], 4), // unknown code 999
        ];
        for (wire, id) in cases {
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
            dec.push(&wire);
            assert!(dec.ready(), "{wire:?}");
            let err = dec.next_frame().expect_err("must fail");
            assert_eq!(err.code(), ErrorCode::Malformed, "{wire:?}");
            assert_eq!(err.id, id, "{wire:?}");
            let answer = err.answer();
            assert_eq!(answer.id, id);
            assert!(matches!(
                answer.msg,
                Message::Error {
                    code: ErrorCode::Malformed,
                    ..
                }
            ));
        }
    }

    #[test]
    fn passwords_never_print() {
        let p = Password::new(b"hunter2".to_vec());
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
