//! Sans-IO protocol core: frame codecs and session state machines.
//!
//! ```text
//! runtime (broker/conn.rs) ── bytes ──► conn::ConnCore ─► access::FrameDecoder ─► session::AccessSession
//!                          ◄── bytes ── conn::ConnCore ◄─ access::encode ◄─ Action
//!                          ◄── Work (checks, exchanges, wallet calls) / *_done ──►
//! ```
//!
//! Nothing in this module touches a socket, a clock, the HSM or the ledger,
//! so it can be unit-tested by feeding bytes and fuzzed.

pub mod access;
pub mod code;
pub mod conn;
pub mod direct;
pub mod link;
pub mod market;
mod noise;
pub mod point;
pub mod session;
pub mod wire;

pub use code::ErrorCode;

/// TLS exporter label (RFC 8446 §7.5) of X'confirm, the key of the
/// confirmation in `LoginOk` and of nothing else. With [`WRAP_KEY_LABEL`]
/// and the frame format, the whole contract with any TLS 1.3 terminal stack.
pub const CONFIRM_KEY_LABEL: &[u8] = b"EXPORTER-keybroker-x-prime-confirm";
/// TLS exporter label of X'wrap, the AES-256 key that wraps X in
/// `ExchangeOk` and does nothing else. A label apart from the confirmation
/// key's, so the value sent in `LoginOk` is never computed under the key
/// that protects X.
pub const WRAP_KEY_LABEL: &[u8] = b"EXPORTER-keybroker-x-prime-wrap";
/// Length of each X' key in bytes.
pub const XPRIME_LEN: usize = 32;
/// HMAC-SHA256 label for the key confirmation sent in `LoginOk`.
pub const CONFIRM_LABEL: &[u8] = b"keybroker x-prime confirm v1";
