//! Small symmetric helpers over aws-lc-rs.

use aws_lc_rs::hmac;

/// HMAC-SHA256.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&k);
    for p in parts {
        ctx.update(p);
    }
    ctx.sign().as_ref().try_into().expect("32 bytes")
}

/// The key confirmation in `LoginOk`: HMAC-SHA256(X', label).
pub fn confirm(xprime: &[u8]) -> [u8; 32] {
    hmac_sha256(xprime, &[crate::proto::CONFIRM_LABEL])
}

/// Constant-time equality.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}
