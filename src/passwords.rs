//! Password hashing with argon2id. Slow by design: never call on a core
//! thread; the broker runs these in the auth pool.

use anyhow::{Result, anyhow};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Hashes `password` to a PHC string with the given cost.
pub fn hash(password: &[u8], m_kib: u32, t: u32) -> Result<String> {
    let params = Params::new(m_kib, t, 1, None).map_err(|e| anyhow!("argon2 params: {e}"))?;
    let mut salt = [0u8; 16];
    rand::fill(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow!("salt: {e}"))?;
    let phc = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
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

/// Reads a password from a file or, when `path` is "-", one line of stdin.
/// Trailing newline is dropped; empty passwords are refused.
pub fn read_secret(
    path: &str,
    stdin: &mut dyn std::io::BufRead,
) -> Result<zeroize::Zeroizing<String>> {
    let mut s = zeroize::Zeroizing::new(String::new());
    if path == "-" {
        stdin.read_line(&mut s)?;
    } else {
        *s = std::fs::read_to_string(path).map_err(|e| anyhow!("reading {path}: {e}"))?;
    }
    let trimmed = zeroize::Zeroizing::new(s.trim_end_matches(['\n', '\r']).to_owned());
    if trimmed.is_empty() {
        return Err(anyhow!("empty password from {path}"));
    }
    Ok(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            read_secret(p.to_str().unwrap(), &mut std::io::empty()).map(|s| s.to_string())
        };
        assert_eq!(read("secret\n").unwrap(), "secret");
        assert_eq!(read("secret\r\n\n").unwrap(), "secret");
        assert_eq!(read("secret").unwrap(), "secret");
        assert_eq!(read(" secret \t\n").unwrap(), " secret \t");
        assert_eq!(read("se\ncret\n").unwrap(), "se\ncret");
        assert!(read("\r\n").is_err(), "empty");
        let mut stdin = &b"first\nsecond\r\n"[..];
        assert_eq!(*read_secret("-", &mut stdin).unwrap(), "first");
        assert_eq!(*read_secret("-", &mut stdin).unwrap(), "second");
    }
}
