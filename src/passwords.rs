//! Password hashing with argon2id. Slow by design: never call on a core
//! thread; the broker runs these in the auth pool.
//!
//! The first password is stored as a PHC hash and checked against it. The
//! second password is bound to the home-card key it releases
//! (docs/SECURITY.md): the raw argon2id output K, which only the right
//! password gives, yields the data the HSM derives the user's
//! key-encryption key from. The registry keeps the argon2id parameters,
//! the salt, and a verifier the HSM made from that data under its
//! `kb-registry-mac` ([`Binding`]). No one can test a guess without the
//! HSM: not against the verifier, not against the wrapped key.
//!
//! ```text
//! password, salt ─argon2id (one run)─► K ─┬─ HMAC(K, KEK_LABEL ‖ user)   ─► kek_data ─► HSM: verifier, KEK
//!                                         └─ HMAC(K, PROOF_LABEL ‖ user) ─► proof key ─HMAC(·, blob)─► proof
//! ```
//!
//! The proof stays in the broker's memory: it lets a later release of the
//! same user take the key already released without the HSM.

use anyhow::{Result, anyhow};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Hashes `password` to a PHC string with the given cost.
pub fn hash(password: &[u8], m_kib: u32, t: u32) -> Result<String> {
    let mut salt = [0u8; 16];
    rand::fill(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow!("salt: {e}"))?;
    let phc = argon2(m_kib, t)?
        .hash_password(password, &salt)
        .map_err(|e| anyhow!("argon2: {e}"))?;
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC string (its own parameters apply).
pub fn verify(password: &[u8], phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| Argon2::default().verify_password(password, &h).is_ok())
        .unwrap_or(false)
}

/// The parameters and salt a second password is bound with. Stored with
/// its verifier as `$kb-bound-v1$m=..,t=..,p=1$<salt>$<verifier>` (PHC
/// syntax; the algorithm is argon2id v19).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    m_kib: u32,
    t: u32,
    salt: [u8; 16],
}

/// What the registry holds for a second password.
pub enum Stored<'a> {
    /// A PHC hash: a registry from before the binding, whose key is still
    /// wrapped under the plain master key until its next release.
    Hash(&'a str),
    /// A binding and the verifier the HSM made for it.
    Bound(Binding, [u8; 32]),
}

/// The PHC identifier of a bound second password.
const BOUND_ID: &str = "kb-bound-v1";

const KEK_LABEL: &[u8] = b"keybroker home-card kek v1";
const PROOF_LABEL: &[u8] = b"keybroker release proof v1";

/// What one right (or wrong) second password gives for one user.
pub struct CardSecret {
    /// The data the HSM derives the user's KEK from.
    pub kek_data: zeroize::Zeroizing<[u8; 32]>,
    proof_key: zeroize::Zeroizing<[u8; 32]>,
}

impl CardSecret {
    /// Stands for "this password opens this blob" once an unwrap has
    /// shown it, so a later release of the same user can take the key
    /// already released. One-way: it opens nothing, and is never stored.
    pub fn proof(&self, wrapped: &[u8]) -> [u8; 32] {
        crate::crypto::hmac_sha256(&*self.proof_key, &[wrapped])
    }
}

fn argon2(m_kib: u32, t: u32) -> Result<Argon2<'static>> {
    let params = Params::new(m_kib, t, 1, None).map_err(|e| anyhow!("argon2 params: {e}"))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

impl Binding {
    /// A fresh salt with the given cost.
    pub fn new(m_kib: u32, t: u32) -> Result<Self> {
        argon2(m_kib, t)?;
        let mut salt = [0u8; 16];
        rand::fill(&mut salt);
        Ok(Self { m_kib, t, salt })
    }

    /// A fresh salt with the cost of the PHC hash `phc`: a second password
    /// stored before the binding keeps its cost when it is bound.
    pub fn like(phc: &str) -> Result<Self> {
        let h = PasswordHash::new(phc).map_err(|e| anyhow!("PHC hash: {e}"))?;
        let p = Params::try_from(&h).map_err(|e| anyhow!("argon2 params: {e}"))?;
        Self::new(p.m_cost(), p.t_cost())
    }

    /// The registry's text for this binding and its `verifier`.
    pub fn encode(&self, verifier: &[u8; 32]) -> String {
        use argon2::password_hash::Encoding::B64;
        let b64 = |b: &[u8]| {
            let mut buf = [0u8; 64];
            B64.encode(b, &mut buf).map(str::to_owned).expect("fits")
        };
        format!(
            "${BOUND_ID}$m={},t={},p=1${}${}",
            self.m_kib,
            self.t,
            b64(&self.salt),
            b64(verifier)
        )
    }

    /// One argon2id run over `password`, then two HMACs of its output K
    /// with `user` bound in: the KEK data, and the key of the proofs.
    pub fn card_secret(&self, password: &[u8], user: &str) -> Result<CardSecret> {
        let mut k = zeroize::Zeroizing::new([0u8; 32]);
        argon2(self.m_kib, self.t)?
            .hash_password_into(password, &self.salt, &mut *k)
            .map_err(|e| anyhow!("argon2: {e}"))?;
        let user_len = (user.len() as u32).to_be_bytes();
        let bound = |label: &[u8]| {
            zeroize::Zeroizing::new(crate::crypto::hmac_sha256(
                &*k,
                &[label, &user_len, user.as_bytes()],
            ))
        };
        Ok(CardSecret {
            kek_data: bound(KEK_LABEL),
            proof_key: bound(PROOF_LABEL),
        })
    }
}

/// Reads a stored second password: a binding, a PHC hash, or neither.
pub fn stored(text: &str) -> Option<Stored<'_>> {
    let phc = PasswordHash::new(text).ok()?;
    match phc.algorithm.as_str() {
        "argon2id" if phc.hash.is_some() => return Some(Stored::Hash(text)),
        BOUND_ID => {}
        _ => return None,
    }
    let int = |name| phc.params.get_decimal(name);
    let (m_kib, t) = (int("m")?, int("t")?);
    let mut salt = [0u8; 16];
    let decoded = phc.salt?.decode_b64(&mut salt).ok()?;
    let verifier = <[u8; 32]>::try_from(phc.hash?.as_bytes()).ok()?;
    (decoded.len() == 16 && int("p") == Some(1) && argon2(m_kib, t).is_ok())
        .then_some(Stored::Bound(Binding { m_kib, t, salt }, verifier))
}

/// Where a secret named `-` comes from. On a terminal it is read without
/// echo, so it does not stay on the screen or in a recording of the
/// session; from a pipe (scripts, tests) one line at a time, as before.
pub struct Stdin<'a> {
    lines: &'a mut dyn std::io::BufRead,
    tty: bool,
}

impl<'a> Stdin<'a> {
    /// `tty`: whether the process's stdin is a terminal.
    pub fn new(lines: &'a mut dyn std::io::BufRead, tty: bool) -> Self {
        Self { lines, tty }
    }

    /// Lines of a pipe (or of a test's bytes), never a terminal.
    pub fn piped(lines: &'a mut dyn std::io::BufRead) -> Self {
        Self::new(lines, false)
    }
}

/// Reads the secret `what` from a file or, when `path` is "-", from
/// stdin: prompted for without echo on a terminal, else one line.
/// Trailing newline is dropped; empty passwords are refused.
pub fn read_secret(
    path: &str,
    what: &str,
    stdin: &mut Stdin<'_>,
) -> Result<zeroize::Zeroizing<String>> {
    let mut s = zeroize::Zeroizing::new(String::new());
    if path == "-" && stdin.tty {
        *s = rpassword::prompt_password(format!("{what}: "))
            .map_err(|e| anyhow!("reading the {what} from the terminal: {e}"))?;
    } else if path == "-" {
        stdin.lines.read_line(&mut s)?;
    } else {
        *s = std::fs::read_to_string(path).map_err(|e| anyhow!("reading {path}: {e}"))?;
    }
    let trimmed = zeroize::Zeroizing::new(s.trim_end_matches(['\n', '\r']).to_owned());
    if trimmed.is_empty() {
        let from = if path == "-" { "stdin" } else { path };
        return Err(anyhow!("empty {what} from {from}"));
    }
    Ok(trimmed)
}

/// A new password shorter than the configured floor
/// (`auth.min_password_len`), or longer than a Login frame carries.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("the {what} is too short: {got} of at least {min} characters (auth.min_password_len)")]
    TooShort {
        what: &'static str,
        got: usize,
        min: usize,
    },
    #[error("the {what} is too long: {got} of at most {max} bytes a login carries")]
    TooLong {
        what: &'static str,
        got: usize,
        max: usize,
    },
}

/// The policy a new password meets, at `user add` and at every change:
/// length only, as NIST SP 800-63B §5.1.1.2 asks (at least 8 characters,
/// no composition rules). Characters, not bytes, so a password in another
/// script is not favoured or penalised by its encoding.
pub fn check_policy(what: &'static str, password: &str, min: usize) -> Result<(), PolicyError> {
    let got = password.chars().count();
    if got < min {
        return Err(PolicyError::TooShort { what, got, min });
    }
    let max = crate::proto::access::MAX_PASSWORD;
    if password.len() > max {
        return Err(PolicyError::TooLong {
            what,
            got: password.len(),
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_round_trips_and_binds_password_user_and_blob() {
        let b = Binding::new(64, 1).unwrap();
        let text = b.encode(&[9; 32]);
        let Some(Stored::Bound(back, verifier)) = stored(&text) else {
            panic!("{text} is not read back as a binding")
        };
        assert_eq!((&back, verifier), (&b, [9; 32]));
        assert!(stored(&text.replace("p=1", "p=2")).is_none());
        let phc = hash(b"pw", 64, 1).unwrap();
        assert!(matches!(stored(&phc), Some(Stored::Hash(_))));
        let like = Binding::like(&phc).unwrap();
        assert_eq!((like.m_kib, like.t), (64, 1));
        assert_ne!(like.salt, b.salt);
        assert!(stored("not a hash").is_none());
        let s = b.card_secret(b"pw", "bob").unwrap();
        let again = back.card_secret(b"pw", "bob").unwrap();
        assert_eq!(*s.kek_data, *again.kek_data);
        assert_eq!(s.proof(b"blob"), again.proof(b"blob"));
        assert_ne!(s.proof(b"blob"), s.proof(b"blob2"));
        assert_ne!(s.proof(b""), *s.kek_data, "two labels, two values");
        for (pw, user) in [(&b"pX"[..], "bob"), (b"pw", "bob2")] {
            let o = b.card_secret(pw, user).unwrap();
            assert_ne!(o.proof(b"blob"), s.proof(b"blob"), "{user}");
            assert_ne!(*o.kek_data, *s.kek_data, "{user}");
        }
        let other_salt = Binding::new(64, 1).unwrap();
        assert_ne!(
            *other_salt.card_secret(b"pw", "bob").unwrap().kek_data,
            *s.kek_data
        );
    }

    #[test]
    fn hash_then_verify() {
        let h = hash(b"correct horse", 64, 1).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify(b"correct horse", &h));
        assert!(!verify(b"wrong", &h));
        assert!(!verify(b"x", "not a hash"));
    }

    /// README, "Password files": trailing CR and LF go, nothing else does.
    #[test]
    fn password_files_lose_only_their_trailing_newlines() {
        let dir = tempfile::tempdir().unwrap();
        let read = |text: &str| {
            let p = dir.path().join("pw");
            std::fs::write(&p, text).unwrap();
            read_secret(
                p.to_str().unwrap(),
                "password",
                &mut Stdin::piped(&mut std::io::empty()),
            )
            .map(|s| s.to_string())
        };
        assert_eq!(read("secret\n").unwrap(), "secret");
        assert_eq!(read("secret\r\n\n").unwrap(), "secret");
        assert_eq!(read("secret").unwrap(), "secret");
        assert_eq!(read(" secret \t\n").unwrap(), " secret \t");
        assert_eq!(read("se\ncret\n").unwrap(), "se\ncret");
        assert!(read("\r\n").is_err(), "empty");
        let mut lines = &b"first\nsecond\r\n"[..];
        let mut stdin = Stdin::piped(&mut lines);
        assert_eq!(*read_secret("-", "password", &mut stdin).unwrap(), "first");
        assert_eq!(*read_secret("-", "password", &mut stdin).unwrap(), "second");
        let e = read_secret("-", "second password", &mut stdin).unwrap_err();
        assert_eq!(e.to_string(), "empty second password from stdin");
    }

    #[test]
    fn the_policy_counts_characters_and_names_its_floor() {
        assert_eq!(check_policy("first password", "alice-first", 8), Ok(()));
        assert_eq!(
            check_policy("p", "\u{e9}\u{e9}\u{e9}\u{e9}", 4),
            Ok(()),
            "4 characters, 8 bytes"
        );
        let e = check_policy("first password", "x", 8).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the first password is too short: 1 of at least 8 characters (auth.min_password_len)"
        );
        let long = "x".repeat(crate::proto::access::MAX_PASSWORD + 1);
        assert!(matches!(
            check_policy("p", &long, 8),
            Err(PolicyError::TooLong { .. })
        ));
    }
}
