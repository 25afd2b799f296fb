//! Market-channel frames (broker ⇄ market): batches of exchanges.
//!
//! ```text
//! broker: [ExchangeRequest; n] ─► encode_requests ─► one frame ─► market
//! market: one frame ─► decode_requests ─► verify each ─► [ExchangeReply; n] ─► one frame
//! ```
//!
//! A frame is `len:u32 | type:u8 | count:u16 | items`, byte-exact in
//! docs/PROTOCOL.md §2. Replies may come in any order; `request_id` matches
//! them up.

use super::code::ErrorCode;
use super::wire::{Put, Reader, WireError};
use crate::proto::point::{Mode, Point};

pub const TYPE_REQUESTS: u8 = 0x10;
pub const TYPE_REPLIES: u8 = 0x90;
/// Keepalive: the broker pings an idle channel, the market answers. Both
/// are a bare header with count 0.
pub const TYPE_PING: u8 = 0x11;
pub const TYPE_PONG: u8 = 0x91;
/// Most exchanges in one frame.
pub const MAX_BATCH: usize = 1024;
/// Largest market-channel frame.
pub const MAX_FRAME: usize = 4 << 20;
pub const MAX_CERT: usize = 4096;
pub const MAX_SIGNATURE: usize = 80;
pub const MAX_ENDPOINT: usize = 255;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeRequest {
    pub request_id: u64,
    pub mode: Mode,
    pub user: String,
    /// DER of the user's certificate, issued by the user CA.
    pub user_cert: Vec<u8>,
    pub ephemeral: Point,
    pub time_ms: u64,
    pub nonce: [u8; 16],
    /// ECDSA P-256 (DER) over the transcript, by the user's home-card key.
    pub signature: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub session_id: [u8; 16],
    pub ephemeral: Point,
    pub expiry_ms: u64,
    /// Where the terminal opens the direct channel.
    pub endpoint: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeReply {
    pub request_id: u64,
    pub result: Result<Accepted, ErrorCode>,
}

fn header(out: &mut Vec<u8>, ty: u8, count: usize) -> usize {
    let start = out.len();
    out.put_u32(0);
    out.put_u8(ty);
    out.put_u16(u16::try_from(count).expect("batch bounded by MAX_BATCH"));
    start
}

fn finish(out: &mut [u8], start: usize) {
    let len = u32::try_from(out.len() - start - 4).expect("frame fits u32");
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// A Ping or Pong frame: `len = 3 ‖ type ‖ count = 0`.
pub fn encode_keepalive(ty: u8, out: &mut Vec<u8>) {
    let start = header(out, ty, 0);
    finish(out, start);
}

/// Whether a complete frame (after `len`) is the keepalive `ty`.
pub fn is_keepalive(frame: &[u8], ty: u8) -> bool {
    frame == [ty, 0, 0]
}

pub fn encode_requests<'a>(
    reqs: impl ExactSizeIterator<Item = &'a ExchangeRequest>,
    out: &mut Vec<u8>,
) {
    let start = header(out, TYPE_REQUESTS, reqs.len());
    for r in reqs {
        out.put_u64(r.request_id);
        out.put_u8(r.mode as u8);
        out.put_bytes(r.user.as_bytes());
        out.put_bytes(&r.user_cert);
        r.ephemeral.put(out);
        out.put_u64(r.time_ms);
        out.extend_from_slice(&r.nonce);
        out.put_bytes(&r.signature);
    }
    finish(out, start);
}

pub fn encode_replies(replies: &[ExchangeReply], out: &mut Vec<u8>) {
    let start = header(out, TYPE_REPLIES, replies.len());
    for r in replies {
        out.put_u64(r.request_id);
        match &r.result {
            Ok(a) => {
                out.put_u16(0);
                out.extend_from_slice(&a.session_id);
                a.ephemeral.put(out);
                out.put_u64(a.expiry_ms);
                out.put_bytes(a.endpoint.as_bytes());
            }
            Err(code) => out.put_u16(*code as u16),
        }
    }
    finish(out, start);
}

/// The body of a complete frame (after `len`), checked for its type.
fn body<'a>(frame: &'a [u8], ty: u8) -> Result<(Reader<'a>, usize), WireError> {
    let mut r = Reader::new(frame);
    if r.u8("type")? != ty {
        return Err(WireError::Invalid("type"));
    }
    let count = r.u16("count")? as usize;
    if count == 0 || count > MAX_BATCH {
        return Err(WireError::Invalid("count"));
    }
    Ok((r, count))
}

pub fn decode_requests(frame: &[u8]) -> Result<Vec<ExchangeRequest>, WireError> {
    let (mut r, count) = body(frame, TYPE_REQUESTS)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let request_id = r.u64("request_id")?;
        let mode = Mode::from_u8(r.u8("mode")?).ok_or(WireError::Invalid("mode"))?;
        let user = r.str(super::access::MAX_USER, "user")?.to_owned();
        let user_cert = r.bytes(MAX_CERT, "user_cert")?.to_vec();
        let ephemeral = Point::read(&mut r, "ephemeral")?;
        let time_ms = r.u64("time")?;
        let nonce = r.array("nonce")?;
        let signature = r.bytes(MAX_SIGNATURE, "signature")?.to_vec();
        out.push(ExchangeRequest {
            request_id,
            mode,
            user,
            user_cert,
            ephemeral,
            time_ms,
            nonce,
            signature,
        });
    }
    r.finish()?;
    Ok(out)
}

pub fn decode_replies(frame: &[u8]) -> Result<Vec<ExchangeReply>, WireError> {
    let (mut r, count) = body(frame, TYPE_REPLIES)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let request_id = r.u64("request_id")?;
        let status = r.u16("status")?;
        let result = if status == 0 {
            Ok(Accepted {
                session_id: r.array("session_id")?,
                ephemeral: Point::read(&mut r, "ephemeral")?,
                expiry_ms: r.u64("expiry")?,
                endpoint: r.str(MAX_ENDPOINT, "endpoint")?.to_owned(),
            })
        } else {
            Err(ErrorCode::from_u16(status).ok_or(WireError::Invalid("status"))?)
        };
        out.push(ExchangeReply { request_id, result });
    }
    r.finish()?;
    Ok(out)
}

/// Splits a stream into market-channel frames (without the length prefix).
pub struct Splitter {
    buf: Vec<u8>,
}

impl Default for Splitter {
    fn default() -> Self {
        Self {
            buf: Vec::with_capacity(16 * 1024),
        }
    }
}

impl Splitter {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame body, if any. Oversized frames are an error.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(WireError::FieldTooLong("frame"));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_are_a_bare_header_and_no_batch() {
        let mut out = Vec::new();
        encode_keepalive(TYPE_PING, &mut out);
        assert_eq!(out, [0, 0, 0, 3, TYPE_PING, 0, 0]);
        assert!(is_keepalive(&out[4..], TYPE_PING));
        assert!(!is_keepalive(&out[4..], TYPE_PONG));
        // Not a batch: count 0 is refused by the batch decoders.
        assert!(decode_requests(&out[4..]).is_err());
    }

    fn req(id: u64) -> ExchangeRequest {
        ExchangeRequest {
            request_id: id,
            mode: Mode::Full,
            user: "alice".into(),
            user_cert: vec![1, 2, 3],
            ephemeral: Point::new(crate::proto::point::Group::X25519, &[4; 32]).unwrap(),
            time_ms: 99,
            nonce: [5; 16],
            signature: vec![6; 70],
        }
    }

    #[test]
    fn batches_round_trip_through_the_splitter() {
        let reqs = vec![req(1), req(2)];
        let replies = vec![
            ExchangeReply {
                request_id: 1,
                result: Ok(Accepted {
                    session_id: [7; 16],
                    ephemeral: Point::new(crate::proto::point::Group::P256, &[8; 65]).unwrap(),
                    expiry_ms: 1000,
                    endpoint: "127.0.0.1:1".into(),
                }),
            },
            ExchangeReply {
                request_id: 2,
                result: Err(ErrorCode::Replay),
            },
        ];
        let mut wire = Vec::new();
        encode_requests(reqs.iter(), &mut wire);
        encode_replies(&replies, &mut wire);
        let mut s = Splitter::default();
        for b in wire.chunks(7) {
            s.push(b);
        }
        assert_eq!(
            decode_requests(&s.next_frame().unwrap().unwrap()).unwrap(),
            reqs
        );
        assert_eq!(
            decode_replies(&s.next_frame().unwrap().unwrap()).unwrap(),
            replies
        );
        assert_eq!(s.next_frame().unwrap(), None);
    }

    #[test]
    fn bad_batches_are_refused() {
        assert!(decode_requests(&[TYPE_REQUESTS, 0, 0]).is_err()); // empty batch
        assert!(decode_requests(&[TYPE_REPLIES, 0, 1]).is_err()); // wrong type
        let mut wire = Vec::new();
        encode_requests([req(1)].iter(), &mut wire);
        wire.push(0);
        assert!(decode_requests(&wire[4..]).is_err()); // trailing byte
        let mut s = Splitter::default();
        s.push(&u32::MAX.to_be_bytes());
        assert!(s.next_frame().is_err());
    }
}
