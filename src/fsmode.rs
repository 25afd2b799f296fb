//! File modes of the data directory: owner-only, checked before use.
//!
//! ```text
//! init ─► umask 077 for the process (main) + data dir chmod 0700 ─► every file it makes is 0600
//! serve, CLI ─► check(cfg): data dir, registry (+ -wal, -shm), ledger, hsm dir, token dir,
//!               softhsm2.conf, PIN files
//!               group/world-writable ─► refuse, naming the path
//!               group/world-readable ─► warn, naming the path (a PIN file:
//!                                       refused when read, hsm::read_pin)
//!               unreadable           ─► "permission denied: PATH"
//! ```
//!
//! The registry holds every user's argon2id hashes (open to offline
//! guessing if read), the ledger every balance, the PIN files the HSM's
//! login, the token directory the keys; whoever may write softhsm2.conf
//! can point the broker at a token of their own. So, as ssh does with its
//! keys and PostgreSQL with its data directory, a path others may write is
//! refused and one others may read is reported. SQLite makes its `-wal`
//! and `-shm` files with the mode of the database, and SoftHSM its object
//! files under the process umask, so a 0600 database and umask 077 cover
//! the files the libraries create.

use crate::config::{Config, LedgerBackend};
use anyhow::{Result, bail};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The umask `main` sets before anything is created: owner-only files.
pub const UMASK: u32 = 0o077;

/// The SoftHSM token directory: `directories.tokendir` of the config file
/// the broker exports, else the one `init` makes.
pub fn token_dir(cfg: &Config) -> PathBuf {
    let default = cfg.data_dir.join("hsm").join("tokens");
    let conf = match std::env::var_os("SOFTHSM2_CONF") {
        Some(p) => PathBuf::from(p),
        None if !cfg.hsm.softhsm2_conf.as_os_str().is_empty() => cfg.path(&cfg.hsm.softhsm2_conf),
        None => return default,
    };
    std::fs::read_to_string(conf)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "directories.tokendir").then(|| PathBuf::from(v.trim()))
            })
        })
        .unwrap_or(default)
}

/// Every path of the data directory whose mode matters, that exists.
fn paths(cfg: &Config) -> Vec<PathBuf> {
    let db = cfg.db_path();
    let with = |p: &Path, suffix: &str| {
        let mut s = p.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    let mut out = vec![
        cfg.data_dir.clone(),
        cfg.data_dir.join("hsm"),
        token_dir(cfg),
        with(&db, "-wal"),
        with(&db, "-shm"),
        db,
        cfg.path(&cfg.hsm.pin_file),
        cfg.path(&cfg.hsm.so_pin_file),
    ];
    if !cfg.hsm.softhsm2_conf.as_os_str().is_empty() {
        out.push(cfg.path(&cfg.hsm.softhsm2_conf));
    }
    if cfg.wallet.backend == LedgerBackend::Sqlite {
        let ledger = cfg.path(&cfg.wallet.ledger);
        out.push(with(&ledger, "-wal"));
        out.push(with(&ledger, "-shm"));
        out.push(ledger);
    }
    out
}

/// What is wrong with `path`'s mode: Err to refuse, Ok(Some) to warn.
fn judge(path: &Path) -> Result<Option<String>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            bail!("permission denied: {}", path.display())
        }
        Err(e) => bail!("{}: {e}", path.display()),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "{} is writable by group or others (mode {mode:04o}): anyone who can \
             write it can change the broker's keys, users or money; run `chmod go-w {}`",
            path.display(),
            path.display()
        );
    }
    let readable = if meta.is_dir() {
        std::fs::read_dir(path).map(drop)
    } else {
        std::fs::File::open(path).map(drop)
    };
    if let Err(e) = readable
        && e.kind() == std::io::ErrorKind::PermissionDenied
    {
        bail!("permission denied: {}", path.display());
    }
    Ok((mode & 0o044 != 0).then(|| {
        format!(
            "{} is readable by group or others (mode {mode:04o}); run `chmod go-rwx {}`",
            path.display(),
            path.display()
        )
    }))
}

/// Refuses a data directory others may write; warns on what they may read.
pub fn check(cfg: &Config) -> Result<()> {
    for p in paths(cfg) {
        if let Some(warning) = judge(&p)? {
            tracing::warn!("{warning}");
        }
    }
    Ok(())
}

/// Makes `dir` (and its parents) and leaves `dir` mode 0700, whatever the
/// umask and whatever mode it had.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn writable_by_others_is_refused_readable_is_warned_private_passes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keybroker.db");
        std::fs::write(&f, b"x").unwrap();
        set(&f, 0o600);
        assert_eq!(judge(&f).unwrap(), None);
        set(&f, 0o640);
        assert!(judge(&f).unwrap().unwrap().contains("readable by group"));
        set(&f, 0o666);
        let e = judge(&f).unwrap_err().to_string();
        assert!(
            e.contains("keybroker.db is writable by group or others"),
            "{e}"
        );
        private_dir(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(judge(&dir.path().join("absent")).unwrap(), None);
    }
}
