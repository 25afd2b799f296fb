//! Networking helpers shared by the broker and the market: rustls over
//! compio, and listeners.

pub mod listen;
pub mod tls_io;
