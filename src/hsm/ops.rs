//! Key operations on one PKCS#11 session.
//!
//! Long-term keys are token objects, sensitive and never extractable. User
//! home-card keys are generated once, wrapped under the master key with
//! `AES_KEY_WRAP_PAD`, stored in the database, and unwrapped on release as
//! non-extractable session objects (see docs/DECISIONS.md, "home-card keys").

use super::{Ctx, HsmError, HsmResult};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

/// DER of the P-256 curve OID (1.2.840.10045.3.1.7), for `CKA_EC_PARAMS`.
pub const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

fn ec_pair(
    s: &Session,
    pub_t: &[Attribute],
    priv_t: &[Attribute],
) -> HsmResult<(ObjectHandle, ObjectHandle)> {
    s.generate_key_pair(&Mechanism::EccKeyPairGen, pub_t, priv_t)
        .op("C_GenerateKeyPair")
}

/// A long-term P-256 signing key as token objects under `label`.
pub fn generate_token_signing_key(s: &Session, label: &str) -> HsmResult<ObjectHandle> {
    let l = label.as_bytes().to_vec();
    let (_, private) = ec_pair(
        s,
        &[
            Attribute::Token(true),
            Attribute::Label(l.clone()),
            Attribute::EcParams(P256_PARAMS.to_vec()),
            Attribute::Verify(true),
        ],
        &[
            Attribute::Token(true),
            Attribute::Label(l),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ],
    )?;
    Ok(private)
}

/// The long-term AES-256 key that wraps home-card keys.
pub fn generate_master_wrap_key(s: &Session, label: &str) -> HsmResult<ObjectHandle> {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
        ],
    )
    .op("C_GenerateKey")
}

/// The long-term HMAC-SHA256 key (generic secret, 32 bytes) that chains
/// the wallet ledger's entries: sign and verify only, never extractable.
pub fn generate_hmac_key(s: &Session, label: &str) -> HsmResult<ObjectHandle> {
    s.generate_key(
        &Mechanism::GenericSecretKeyGen,
        &[
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(32.into()),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Verify(true),
        ],
    )
    .op("C_GenerateKey (generic secret)")
}

/// The uncompressed EC point (65 bytes) of the public key matching `private`.
pub fn public_point(s: &Session, label: &str) -> HsmResult<Vec<u8>> {
    let found = s
        .find_objects(&[
            Attribute::Token(true),
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .op("C_FindObjects")?;
    let key = *found
        .first()
        .ok_or(HsmError::Format("no public key for the label"))?;
    point_of(s, key)
}

fn point_of(s: &Session, public: ObjectHandle) -> HsmResult<Vec<u8>> {
    let attrs = s
        .get_attributes(public, &[AttributeType::EcPoint])
        .op("C_GetAttributeValue")?;
    match attrs.first() {
        Some(Attribute::EcPoint(p)) => unwrap_octet_string(p),
        _ => Err(HsmError::Format("no CKA_EC_POINT")),
    }
}

/// SoftHSM returns `CKA_EC_POINT` as a DER OCTET STRING around the point.
fn unwrap_octet_string(p: &[u8]) -> HsmResult<Vec<u8>> {
    match p {
        [0x04, 65, rest @ ..] if rest.len() == 65 => Ok(rest.to_vec()),
        [0x04, ..] if p.len() == 65 => Ok(p.to_vec()),
        _ => Err(HsmError::Format(
            "an EC point that is not uncompressed P-256",
        )),
    }
}

/// ECDSA P-256 over SHA-256 of `msg`, DER-encoded. The digest is computed
/// on the host: SoftHSM refuses `CKM_ECDSA_SHA256` and signs raw digests.
pub fn sign_p256(s: &Session, key: ObjectHandle, msg: &[u8]) -> HsmResult<Vec<u8>> {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg);
    sign_digest_p256(s, key, digest.as_ref())
}

/// ECDSA P-256 over a 32-byte digest, DER-encoded.
pub fn sign_digest_p256(s: &Session, key: ObjectHandle, digest: &[u8]) -> HsmResult<Vec<u8>> {
    let raw = s.sign(&Mechanism::Ecdsa, key, digest).op("C_Sign")?;
    raw_to_der(&raw)
}

/// `r ‖ s` (PKCS#11 form) to the DER `Ecdsa-Sig-Value` X.509 and TLS use.
pub fn raw_to_der(raw: &[u8]) -> HsmResult<Vec<u8>> {
    if raw.len() != 64 {
        return Err(HsmError::Format("an ECDSA signature that is not 64 bytes"));
    }
    let (r, s) = raw.split_at(32);
    Ok(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_bigint_bytes(r, true);
            w.next().write_bigint_bytes(s, true);
        })
    }))
}

/// A new home-card key: returns (public point, private key wrapped under
/// `master` with AES key wrap with padding). Nothing stays on the token.
pub fn generate_wrapped_user_key(
    s: &Session,
    master: ObjectHandle,
) -> HsmResult<(Vec<u8>, Vec<u8>)> {
    let (public, private) = ec_pair(
        s,
        &[
            Attribute::Token(false),
            Attribute::EcParams(P256_PARAMS.to_vec()),
            Attribute::Verify(true),
        ],
        &[
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::Sign(true),
        ],
    )?;
    let result = (|| {
        let point = point_of(s, public)?;
        let wrapped = s
            .wrap_key(&Mechanism::AesKeyWrapPad, master, private)
            .op("C_WrapKey")?;
        Ok((point, wrapped))
    })();
    let _ = s.destroy_object(public);
    let _ = s.destroy_object(private);
    result
}

/// Unwraps a home-card key into a non-extractable session object that can
/// only sign. The caller destroys it on logout.
///
/// `CKA_PRIVATE = false`, as for the ephemeral keys: SoftHSM keeps the value
/// of a private object encrypted under the token key and decrypts it (under
/// its global lock) on every signature, 6–7 µs of a 41 µs signature. A
/// session object is visible only to this process's own sessions, which are
/// all logged in, and it stays sensitive and unextractable
/// (docs/DECISIONS.md, "Home-card keys").
pub fn unwrap_user_key(
    s: &Session,
    master: ObjectHandle,
    wrapped: &[u8],
) -> HsmResult<ObjectHandle> {
    s.unwrap_key(
        &Mechanism::AesKeyWrapPad,
        master,
        wrapped,
        &[
            Attribute::Token(false),
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Private(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            // Explicit: SoftHSM defaults these to true.
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ],
    )
    .op("C_UnwrapKey")
}

/// An ephemeral P-256 key pair for ECDH, as session objects. Returns the
/// public point and the private handle, which may only derive; the public
/// object is gone already.
/// `CKA_PRIVATE = false` keeps SoftHSM off its global lock.
pub fn generate_ephemeral(s: &Session) -> HsmResult<(Vec<u8>, ObjectHandle)> {
    let (public, private) = ec_pair(
        s,
        &[
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::EcParams(P256_PARAMS.to_vec()),
        ],
        &[
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Derive(true),
            // SoftHSM turns these on unless told: the key only derives.
            Attribute::Sign(false),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
        ],
    )?;
    let point = point_of(s, public);
    let _ = s.destroy_object(public);
    match point {
        Ok(p) => Ok((p, private)),
        Err(e) => {
            let _ = s.destroy_object(private);
            Err(e)
        }
    }
}

/// X = HMAC-SHA256(key = ECDH(private, peer), data) with Z inside the HSM:
/// `ECDH1_DERIVE` (CKD_NULL) to a generic secret, then `SHA256_HMAC`. The
/// ephemeral private key and Z are destroyed either way.
pub fn derive_x(
    s: &Session,
    private: ObjectHandle,
    peer: &[u8],
    data: &[u8],
) -> HsmResult<zeroize::Zeroizing<Vec<u8>>> {
    use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
    let params = Ecdh1DeriveParams::new(EcKdf::null(), peer);
    let z = s.derive_key(
        &Mechanism::Ecdh1Derive(params),
        private,
        &[
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(32.into()),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ],
    );
    let _ = s.destroy_object(private);
    let z = z.op("C_DeriveKey (ECDH1)")?;
    let x = s
        .sign(&Mechanism::Sha256Hmac, z, data)
        .op("C_Sign (SHA256_HMAC)");
    let _ = s.destroy_object(z);
    Ok(zeroize::Zeroizing::new(x?))
}

pub fn destroy(s: &Session, key: ObjectHandle) -> HsmResult<()> {
    s.destroy_object(key).op("C_DestroyObject")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_signature_encoding_keeps_integers_positive() {
        let mut raw = [0u8; 64];
        raw[0] = 0x80; // high bit set: needs a leading zero in DER
        raw[63] = 1;
        let der = raw_to_der(&raw).unwrap();
        assert_eq!(der[0], 0x30);
        assert_eq!(&der[2..5], &[0x02, 33, 0x00]);
        assert!(raw_to_der(&raw[..63]).is_err());
    }

    #[test]
    fn ec_point_octet_string_is_unwrapped() {
        let mut p = vec![0x04, 65, 0x04];
        p.extend([1u8; 64]);
        assert_eq!(unwrap_octet_string(&p).unwrap().len(), 65);
        assert!(unwrap_octet_string(&[0x04, 3, 1, 2, 3]).is_err());
    }
}
