//! The exchange's public values as they go on the wire: its mode, the
//! ECDH group, an ephemeral public key, and the wrapped X's length. Here,
//! below both the wire formats and `exchange`'s cryptography, because both
//! use them (`exchange` re-exports them).

use crate::proto::wire::{Put, Reader, WireError};

/// Length of an uncompressed P-256 point, the longest public key.
pub const MAX_POINT_LEN: usize = 65;
/// Length of X wrapped with AES-KWP (32 + 8).
pub const WRAPPED_LEN: usize = 40;

/// Who does the ECDH with the market.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// The broker (full proxy): it learns X and wraps it for the terminal.
    Full = 0,
    /// The terminal (partial proxy, claim 8): the broker only signs.
    Partial = 1,
}

impl Mode {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Full),
            1 => Some(Self::Partial),
            _ => None,
        }
    }
}

/// The ECDH group of an exchange's two ephemeral keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Group {
    /// NIST P-256, uncompressed points (65 bytes): what an HSM can derive with.
    P256 = 0,
    /// X25519 (RFC 7748), 32-byte u-coordinates: the faster one in software.
    X25519 = 1,
}

impl Group {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::P256),
            1 => Some(Self::X25519),
            _ => None,
        }
    }

    pub fn point_len(self) -> usize {
        match self {
            Self::P256 => 65,
            Self::X25519 => 32,
        }
    }
}

/// An ephemeral public key and its group. On the wire: `group:u8` then the
/// key, whose length the group fixes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Point {
    group: Group,
    bytes: [u8; MAX_POINT_LEN],
}

impl std::fmt::Debug for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Point({:?}, {} bytes)",
            self.group,
            self.group.point_len()
        )
    }
}

impl Point {
    /// A placeholder until a key is made: no valid key of any group, so an
    /// exchange that sent it would fail its ECDH.
    pub const UNSET: Point = Point {
        group: Group::P256,
        bytes: [0; MAX_POINT_LEN],
    };

    /// `None` unless `key` has the group's length. Whether it is a valid
    /// point is checked where it is used, by the ECDH.
    pub fn new(group: Group, key: &[u8]) -> Option<Self> {
        if key.len() != group.point_len() {
            return None;
        }
        let mut bytes = [0u8; MAX_POINT_LEN];
        bytes[..key.len()].copy_from_slice(key);
        Some(Self { group, bytes })
    }

    pub fn group(&self) -> Group {
        self.group
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.group.point_len()]
    }

    pub fn put(&self, out: &mut Vec<u8>) {
        out.put_u8(self.group as u8);
        out.extend_from_slice(self.as_bytes());
    }

    pub fn read(r: &mut Reader<'_>, what: &'static str) -> Result<Self, WireError> {
        let group = Group::from_u8(r.u8(what)?).ok_or(WireError::Invalid(what))?;
        let key = r.take(group.point_len(), what)?;
        Ok(Self::new(group, key).expect("length fixed by the group"))
    }
}
