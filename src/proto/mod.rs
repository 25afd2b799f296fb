//! Sans-IO protocol core: frame codecs and session state machines.
//!
//! ```text
//! runtime (broker/, terminal/) ── bytes ──► access::FrameDecoder ──► session::AccessSession
//!                              ◄── bytes ── access::encode ◄── Action
//! ```
//!
//! Nothing in this module touches a socket, a clock, the HSM or the ledger,
//! so it can be unit-tested by feeding bytes and fuzzed.

pub mod access;
pub mod code;
pub mod direct;
pub mod market;
mod noise;
pub mod session;
pub mod wire;

pub use code::ErrorCode;

/// TLS exporter label for X' (RFC 8446 §7.5). The whole contract with any
/// TLS 1.3 terminal stack, together with the frame format.
pub const XPRIME_LABEL: &[u8] = b"EXPORTER-keybroker-x-prime";
/// Length of X' in bytes (an AES-256 key).
pub const XPRIME_LEN: usize = 32;
/// HMAC-SHA256 label for the key confirmation sent in `LoginOk`.
pub const CONFIRM_LABEL: &[u8] = b"keybroker x-prime confirm v1";
