//! Key operations on one PKCS#11 session.
//!
//! Long-term keys are token objects, sensitive and never extractable. User
//! home-card keys are generated once, wrapped with `AES_KEY_WRAP_PAD` under
//! a key-encryption key the HSM derives from `kb-kek-base` and the user's
//! second password, stored in the database, and unwrapped on release as
//! non-extractable session objects (see docs/DECISIONS.md, "home-card
//! keys", and docs/SECURITY.md).
//!
//! ```text
//! second password ─argon2id─► K ─HMAC(K, label ‖ user)─► kek_data (32 bytes, in process)
//! kb-registry-mac ─SHA256_HMAC(VERIFIER_LABEL ‖ kek_data)─► verifier == the stored one? else wrong password
//! kb-kek-base ─AES_CBC_ENCRYPT_DATA(iv = KEK_IV, kek_data)─► KEK (session object, never out)
//! KEK ─AES_KEY_WRAP_PAD unwrap─► home-card key (sign only) ; KEK destroyed
//! ```

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

/// A long-term 32-byte secret token key under `label`: private,
/// sensitive, never extractable, allowed `uses` only.
fn generate_secret_key(
    s: &Session,
    label: &str,
    key_type: KeyType,
    uses: &[Attribute],
) -> HsmResult<ObjectHandle> {
    let mechanism = if key_type == KeyType::AES {
        Mechanism::AesKeyGen
    } else {
        Mechanism::GenericSecretKeyGen
    };
    let mut template = vec![
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(key_type),
        Attribute::ValueLen(32.into()),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
    ];
    template.extend_from_slice(uses);
    s.generate_key(&mechanism, &template).op("C_GenerateKey")
}

/// The long-term AES-256 key that wrapped home-card keys before they were
/// bound to the second password; it now only unwraps those, once each.
pub fn generate_master_wrap_key(s: &Session, label: &str) -> HsmResult<ObjectHandle> {
    generate_secret_key(
        s,
        label,
        KeyType::AES,
        &[Attribute::Wrap(true), Attribute::Unwrap(true)],
    )
}

/// The long-term AES-256 key the users' key-encryption keys are derived
/// from. It can only derive: no encryption, no wrapping, so the one thing
/// it gives a PIN holder is the KEK of data they already know.
pub fn generate_kek_base_key(s: &Session, label: &str) -> HsmResult<ObjectHandle> {
    generate_secret_key(
        s,
        label,
        KeyType::AES,
        &[
            Attribute::Derive(true),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
        ],
    )
}

/// The long-term HMAC-SHA256 key (generic secret, 32 bytes) that chains
/// the wallet ledger's entries, derives ticket keys, or seals registry
/// rows: sign and verify only, never extractable.
pub fn generate_hmac_key(s: &Session, label: &str) -> HsmResult<ObjectHandle> {
    generate_secret_key(
        s,
        label,
        KeyType::GENERIC_SECRET,
        &[Attribute::Sign(true), Attribute::Verify(true)],
    )
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

/// The CBC IV of the KEK derivation: a constant label, so that the same
/// base key derives nothing else under the same data.
pub const KEK_IV: [u8; 16] = *b"keybroker kek v1";

/// What a derived KEK may do: wrap (enrolment, migration) or unwrap
/// (release), never both.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KekUse {
    Wrap,
    Unwrap,
}

/// A user's key-encryption key: `AES_CBC_ENCRYPT_DATA` of `data` (32
/// bytes that only the user's second password yields, user id bound in)
/// under `base`, as an AES-256 session object that cannot leave the HSM.
/// The caller destroys it after its one use.
pub fn derive_kek(
    s: &Session,
    base: ObjectHandle,
    data: &[u8; 32],
    usage: KekUse,
) -> HsmResult<ObjectHandle> {
    use cryptoki::mechanism::ekdf::AesCbcDeriveParams;
    s.derive_key(
        &Mechanism::AesCbcEncryptData(AesCbcDeriveParams::new(KEK_IV, data)),
        base,
        &[
            Attribute::Token(false),
            // Short-lived: off SoftHSM's global lock, as the ephemerals.
            Attribute::Private(false),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Wrap(usage == KekUse::Wrap),
            Attribute::Unwrap(usage == KekUse::Unwrap),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Derive(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
        ],
    )
    .op("C_DeriveKey (AES_CBC_ENCRYPT_DATA)")
}

/// Runs `f` with a freshly derived KEK and destroys the KEK either way.
fn with_kek<R>(
    s: &Session,
    base: ObjectHandle,
    data: &[u8; 32],
    usage: KekUse,
    f: impl FnOnce(ObjectHandle) -> HsmResult<R>,
) -> HsmResult<R> {
    let kek = derive_kek(s, base, data, usage)?;
    let r = f(kek);
    let _ = s.destroy_object(kek);
    r
}

const VERIFIER_LABEL: &[u8] = b"keybroker release verifier v1";

/// The stored check of a second password: HMAC-SHA256 under `mac_key`
/// (`kb-registry-mac`) of the KEK data. Only the HSM can make or test one,
/// so a copy of the registry gives nothing to test guesses against, and
/// whoever can write it cannot make one for a password of their own. It
/// tells a wrong password from a blob the HSM refuses for another reason,
/// which a failed unwrap cannot (SoftHSM answers `CKR_GENERAL_ERROR` to both).
pub fn release_verifier(
    s: &Session,
    mac_key: ObjectHandle,
    data: &[u8; 32],
) -> HsmResult<[u8; 32]> {
    let input = zeroize::Zeroizing::new([VERIFIER_LABEL, data].concat());
    let tag = s
        .sign(&Mechanism::Sha256Hmac, mac_key, &input)
        .op("C_Sign (SHA256_HMAC, verifier)")?;
    tag.try_into()
        .map_err(|_| HsmError::Format("an HMAC-SHA256 that is not 32 bytes"))
}

/// A new home-card key bound to its second password: (public point, key
/// wrapped under the KEK of `data`, the verifier of `data`).
pub fn generate_bound_user_key(
    s: &Session,
    keys: &super::KeyHandles,
    data: &[u8; 32],
) -> HsmResult<(Vec<u8>, Vec<u8>, [u8; 32])> {
    let (point, wrapped) = with_kek(s, keys.kek_base, data, KekUse::Wrap, |kek| {
        generate_wrapped_user_key(s, kek)
    })?;
    Ok((
        point,
        wrapped,
        release_verifier(s, keys.registry_mac, data)?,
    ))
}

/// Why a home-card key did not open.
#[derive(Debug)]
pub enum Refusal {
    /// The second password was wrong: its data does not give the verifier.
    Password,
    /// The password gave the verifier, but the HSM refused the blob: the
    /// row was rewritten by someone with the HSM (a verifier for a password
    /// of theirs, not the user's key), or the HSM failed.
    Blob(HsmError),
}

/// `r`, a failure of the HSM's session kept as an error (to recover
/// from), any other as a refused blob.
pub fn refused_blob<T>(r: HsmResult<T>) -> HsmResult<Result<T, Refusal>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) if e.session_lost() => Err(e),
        Err(e) => Ok(Err(Refusal::Blob(e))),
    }
}

/// Releases a bound home-card key: if `data` gives `verifier`, its KEK
/// unwraps `wrapped` (as [`unwrap_user_key`]).
pub fn open_bound_user_key(
    s: &Session,
    keys: &super::KeyHandles,
    data: &[u8; 32],
    verifier: &[u8; 32],
    wrapped: &[u8],
) -> HsmResult<Result<ObjectHandle, Refusal>> {
    if !crate::crypto::ct_eq(&release_verifier(s, keys.registry_mac, data)?, verifier) {
        return Ok(Err(Refusal::Password));
    }
    refused_blob(with_kek(s, keys.kek_base, data, KekUse::Unwrap, |kek| {
        unwrap_user_key(s, kek, wrapped)
    }))
}

/// Migration: a blob wrapped under the plain master key (before release
/// was bound to the second password) wrapped again under the KEK of
/// `data`. The key is unwrapped as an extractable session object that can
/// do nothing else, wrapped, and destroyed; it never leaves the HSM.
pub fn rewrap_legacy_user_key(
    s: &Session,
    keys: &super::KeyHandles,
    data: &[u8; 32],
    legacy: &[u8],
) -> HsmResult<(Vec<u8>, [u8; 32])> {
    rewrap(s, keys, keys.master_wrap, legacy, data)
}

/// A home-card key wrapped again: the blob and the verifier of its binding.
pub type Rebound = (Vec<u8>, [u8; 32]);

/// A second-password change: if `old` gives `verifier`, the key its KEK
/// unwraps from `wrapped` is wrapped again under the KEK of `new`, inside
/// the HSM (as [`rewrap_legacy_user_key`]); returns the new blob and the
/// verifier of `new`.
pub fn rebind_user_key(
    s: &Session,
    keys: &super::KeyHandles,
    old: &[u8; 32],
    verifier: &[u8; 32],
    wrapped: &[u8],
    new: &[u8; 32],
) -> HsmResult<Result<Rebound, Refusal>> {
    if !crate::crypto::ct_eq(&release_verifier(s, keys.registry_mac, old)?, verifier) {
        return Ok(Err(Refusal::Password));
    }
    refused_blob(with_kek(s, keys.kek_base, old, KekUse::Unwrap, |kek| {
        rewrap(s, keys, kek, wrapped, new)
    }))
}

/// `blob`, unwrapped with `from` as an extractable session object that can
/// do nothing else, wrapped under the KEK of `data`, and destroyed; with
/// the verifier of `data`. The key never leaves the HSM.
fn rewrap(
    s: &Session,
    keys: &super::KeyHandles,
    from: ObjectHandle,
    blob: &[u8],
    data: &[u8; 32],
) -> HsmResult<(Vec<u8>, [u8; 32])> {
    let key = s
        .unwrap_key(
            &Mechanism::AesKeyWrapPad,
            from,
            blob,
            &[
                Attribute::Token(false),
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::Sign(false),
                Attribute::Decrypt(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
            ],
        )
        .op("C_UnwrapKey (to wrap again)")?;
    let r = with_kek(s, keys.kek_base, data, KekUse::Wrap, |kek| {
        s.wrap_key(&Mechanism::AesKeyWrapPad, kek, key)
            .op("C_WrapKey")
    });
    let _ = s.destroy_object(key);
    Ok((r?, release_verifier(s, keys.registry_mac, data)?))
}

/// A new home-card key: returns (public point, private key wrapped under
/// `wrapping` with AES key wrap with padding). Nothing stays on the token.
pub fn generate_wrapped_user_key(
    s: &Session,
    wrapping: ObjectHandle,
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
            .wrap_key(&Mechanism::AesKeyWrapPad, wrapping, private)
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
pub fn unwrap_user_key(s: &Session, kek: ObjectHandle, wrapped: &[u8]) -> HsmResult<ObjectHandle> {
    s.unwrap_key(
        &Mechanism::AesKeyWrapPad,
        kek,
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
