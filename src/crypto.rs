//! Small symmetric helpers over aws-lc-rs, and X', the access channel's
//! keys.

use crate::proto::{CONFIRM_KEY_LABEL, CONFIRM_LABEL, WRAP_KEY_LABEL, XPRIME_LEN};
use aws_lc_rs::hmac;
use zeroize::Zeroizing;

/// HMAC-SHA256.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&k);
    for p in parts {
        ctx.update(p);
    }
    ctx.sign().as_ref().try_into().expect("32 bytes")
}

/// X', the keys a terminal and the broker share once their TLS 1.3
/// handshake is done (docs/PROTOCOL.md §1.2): two TLS exporter values under
/// two labels, so each key has one use. `confirm_key` keys only the
/// confirmation in `LoginOk`; `wrap_key` only wraps X (AES-KWP).
pub struct AccessKeys {
    confirm_key: Zeroizing<[u8; XPRIME_LEN]>,
    wrap_key: Zeroizing<[u8; XPRIME_LEN]>,
}

impl AccessKeys {
    /// Both keys from a connection whose handshake is complete, on either
    /// side: the broker and the terminal get the same two values.
    pub fn export<D>(conn: &rustls::ConnectionCommon<D>) -> Result<Self, rustls::Error> {
        let mut confirm_key = Zeroizing::new([0; XPRIME_LEN]);
        let mut wrap_key = Zeroizing::new([0; XPRIME_LEN]);
        conn.export_keying_material(&mut *confirm_key, CONFIRM_KEY_LABEL, None)?;
        conn.export_keying_material(&mut *wrap_key, WRAP_KEY_LABEL, None)?;
        Ok(Self {
            confirm_key,
            wrap_key,
        })
    }

    /// The keys from the two exporter values, as another TLS stack (or a
    /// test vector) gives them.
    pub fn from_exporter_values(confirm_key: [u8; XPRIME_LEN], wrap_key: [u8; XPRIME_LEN]) -> Self {
        Self {
            confirm_key: Zeroizing::new(confirm_key),
            wrap_key: Zeroizing::new(wrap_key),
        }
    }

    /// The key confirmation in `LoginOk`: HMAC-SHA256(confirm_key, label).
    pub fn confirm(&self) -> [u8; 32] {
        hmac_sha256(&*self.confirm_key, &[CONFIRM_LABEL])
    }

    /// The AES-256 key that wraps X for this connection.
    pub fn wrap_key(&self) -> &[u8; XPRIME_LEN] {
        &self.wrap_key
    }
}

/// Constant-time equality.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}
