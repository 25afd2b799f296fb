//! aws-lc-rs under snow: the primitives of `Noise_NNpsk0_25519_AESGCM_SHA256`.
//!
//! ```text
//! snow (handshake pattern, symmetric state, HKDF, nonce counters)
//!   └─ AwsLcResolver ─► X25519 (agreement) · AES-256-GCM (aead) · SHA-256 (digest) · SystemRandom
//! ```
//!
//! snow's own RustCrypto backend does not build in the combination we need
//! (snow 0.10.0 with aes-gcm 0.10), and the appliance already trusts
//! aws-lc-rs for every other primitive. This is glue only: the Noise state
//! machine, its key schedule and its nonce handling stay snow's. Its output
//! is checked against an independent implementation (Python
//! `noiseprotocol`) through docs/vectors/direct.json.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::CryptoResolver;
use snow::types::{Cipher, Dh, Hash, Random};
use zeroize::Zeroizing;

const TAG: usize = 16;

pub struct AwsLcResolver;

impl CryptoResolver for AwsLcResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(Rng(SystemRandom::new())))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        matches!(choice, DHChoice::Curve25519).then(|| Box::new(X25519Dh::default()) as Box<dyn Dh>)
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        matches!(choice, HashChoice::SHA256).then(|| Box::new(Sha256::default()) as Box<dyn Hash>)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        matches!(choice, CipherChoice::AESGCM)
            .then(|| Box::new(AesGcm::default()) as Box<dyn Cipher>)
    }
}

struct Rng(SystemRandom);

impl Random for Rng {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill(dest).map_err(|_| snow::Error::Rng)
    }
}

/// An X25519 key pair; the private half is kept as bytes because snow asks
/// for it back (`privkey`) and sets fixed keys for test vectors (`set`).
#[derive(Default)]
struct X25519Dh {
    private: Zeroizing<[u8; 32]>,
    public: [u8; 32],
}

impl Dh for X25519Dh {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        self.private.copy_from_slice(privkey);
        let key = PrivateKey::from_private_key(&X25519, privkey).expect("32-byte X25519 key");
        let public = key.compute_public_key().expect("X25519 public key");
        self.public.copy_from_slice(public.as_ref());
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut k = Zeroizing::new([0u8; 32]);
        rng.try_fill_bytes(&mut k[..])?;
        self.set(&k[..]);
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.private[..]
    }

    /// Refuses a peer key that gives the all-zero secret (RFC 7748 §6.1),
    /// as aws-lc-rs does. snow passes the peer key in a buffer sized for
    /// its largest curve: the key is its first 32 bytes.
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let pubkey = pubkey.get(..32).ok_or(snow::Error::Dh)?;
        let key = PrivateKey::from_private_key(&X25519, &self.private[..])
            .map_err(|_| snow::Error::Dh)?;
        agreement::agree(
            &key,
            UnparsedPublicKey::new(&X25519, pubkey),
            snow::Error::Dh,
            |z| {
                out[..z.len()].copy_from_slice(z);
                Ok(())
            },
        )
    }
}

struct AesGcm {
    key: LessSafeKey,
}

impl Default for AesGcm {
    fn default() -> Self {
        Self {
            key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[0u8; 32]).expect("AES-256 key")),
        }
    }
}

/// Noise's AESGCM nonce: 32 zero bits, then the counter, big-endian
/// (Noise spec §12.4). The counter is snow's, never reused under one key.
fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(b)
}

impl Cipher for AesGcm {
    fn name(&self) -> &'static str {
        "AESGCM"
    }

    fn set(&mut self, key: &[u8; 32]) {
        self.key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("AES-256 key"));
    }

    fn encrypt(&self, n: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let len = plaintext.len();
        out[..len].copy_from_slice(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(n), Aad::from(authtext), &mut out[..len])
            .expect("AES-GCM seal");
        out[len..len + TAG].copy_from_slice(tag.as_ref());
        len + TAG
    }

    /// Opens in `out` when it has room for the tag too (`Channel::open`
    /// gives it), else through a copy.
    fn decrypt(
        &self,
        n: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let open = |buf: &mut [u8]| {
            self.key
                .open_in_place(nonce(n), Aad::from(authtext), buf)
                .map(|p| p.len())
                .map_err(|_| snow::Error::Decrypt)
        };
        if let Some(buf) = out.get_mut(..ciphertext.len()) {
            buf.copy_from_slice(ciphertext);
            return open(buf);
        }
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        let len = open(&mut buf)?;
        out.get_mut(..len)
            .ok_or(snow::Error::Decrypt)?
            .copy_from_slice(&buf[..len]);
        Ok(len)
    }
}

struct Sha256(digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Self(digest::Context::new(&digest::SHA256))
    }
}

impl Hash for Sha256 {
    fn name(&self) -> &'static str {
        "SHA256"
    }

    fn block_len(&self) -> usize {
        64
    }

    fn hash_len(&self) -> usize {
        32
    }

    fn reset(&mut self) {
        self.0 = digest::Context::new(&digest::SHA256);
    }

    fn input(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    fn result(&mut self, out: &mut [u8]) {
        let d = std::mem::replace(&mut self.0, digest::Context::new(&digest::SHA256)).finish();
        out[..32].copy_from_slice(d.as_ref());
    }
}
