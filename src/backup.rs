//! `keybroker backup DIR` and `keybroker restore DIR`: the databases, as
//! consistent online copies, and the config, with a manifest of their
//! SHA-256s.
//!
//! ```text
//! backup:  keybroker.db ─┐ SQLite online backup, one step:  ┌─► DIR/keybroker.db
//!          ledger.db ────┤ a snapshot; writers go on (WAL)  ├─► DIR/ledger.db
//!          config ───────┘ copied                           ├─► DIR/keybroker.toml
//!                                                           └─► DIR/MANIFEST.json (last, fsynced)
//! restore: MANIFEST.json ─► every SHA-256 checks ─► data-dir lock free (no broker runs)
//!          ─► each database written beside its place, fsynced, renamed over it
//!          ─► its old -wal/-shm removed ─► the caller records the restore (anchors)
//! ```
//!
//! What is not here, on purpose: the HSM token (it changes only at `init`
//! and holds the keys everything else is wrapped under: it is backed up
//! once, by its own procedure, docs/OPERATIONS.md), the PINs (kept apart
//! from both), and `ledger.anchors` (it must outlive any copy of the
//! ledger, or a cut tail would pass the audit).
//!
//! The two databases are copied one after the other, so the ledger may
//! hold a purchase whose user the registry copy lacks only if the user was
//! added between the two copies, which the audit does not mind: every
//! balance is the ledger's own. Each copy is one backup step (`-1`: all
//! pages), so it is a snapshot of one instant, with writers unblocked in
//! WAL mode; a stepwise copy would restart at every write and might never
//! finish under load.

use crate::config::{Config, LedgerBackend};
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "MANIFEST.json";
/// The data directory's lock: `serve` holds it, `restore` needs it free.
const LOCK: &str = "keybroker.lock";

#[derive(Serialize, Deserialize, Debug)]
pub struct Manifest {
    /// This format: 1.
    pub format: u32,
    /// The keybroker that wrote it.
    pub version: String,
    pub created_ms: i64,
    pub files: Vec<Copied>,
    /// Set when the ledger is PostgreSQL's, which this does not copy.
    pub ledger_elsewhere: Option<String>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Copied {
    /// Name in the backup directory.
    pub name: String,
    /// What it is: "registry", "ledger" or "config".
    pub role: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Writes a backup of the data directory `cfg` names into `dir` (made,
/// owner-only; it must be empty or absent). `config_file`: the file the
/// config came from, copied beside the databases.
pub fn backup(cfg: &Config, config_file: Option<&Path>, dir: &Path) -> Result<Manifest> {
    if dir.exists() {
        ensure!(
            std::fs::read_dir(dir)?.next().is_none(),
            "{} is not empty: a backup goes into a new directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = vec![copy_db(&cfg.db_path(), dir, "keybroker.db", "registry")?];
    let ledger_elsewhere = match cfg.wallet.backend {
        LedgerBackend::Sqlite => {
            files.push(copy_db(
                &cfg.path(&cfg.wallet.ledger),
                dir,
                "ledger.db",
                "ledger",
            )?);
            None
        }
        LedgerBackend::Postgres => Some(
            "the ledger is in PostgreSQL: back it up with pg_dump or PITR (docs/OPERATIONS.md)"
                .to_owned(),
        ),
    };
    if let Some(c) = config_file {
        let to = dir.join("keybroker.toml");
        std::fs::copy(c, &to).with_context(|| format!("copying {}", c.display()))?;
        files.push(described(&to, "keybroker.toml", "config")?);
    }
    let m = Manifest {
        format: 1,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        created_ms: crate::wallet::now_ms(),
        files,
        ledger_elsewhere,
    };
    // Last and durable: a directory with a manifest is a whole backup.
    write_synced(&dir.join(MANIFEST), &serde_json::to_vec_pretty(&m)?)?;
    sync_dir(dir)?;
    Ok(m)
}

/// Puts the databases of the backup in `dir` back into the data directory
/// `cfg` names, after checking every file against the manifest. Refused
/// under a running broker: the caller holds the data directory's lock.
/// Returns what was put back. The caller then records the restore in the
/// anchor file (`Ledger::restore`), so the audit accepts the older head.
pub fn restore(cfg: &Config, dir: &Path, _held: &DirLock) -> Result<Vec<PathBuf>> {
    let m: Manifest = serde_json::from_slice(
        &std::fs::read(dir.join(MANIFEST))
            .with_context(|| format!("{} has no {MANIFEST}: not a backup", dir.display()))?,
    )
    .context("reading the manifest")?;
    ensure!(m.format == 1, "backup format {} is unknown", m.format);
    for f in &m.files {
        let now = described(&dir.join(&f.name), &f.name, &f.role)?;
        ensure!(
            now.sha256 == f.sha256 && now.bytes == f.bytes,
            "{} does not match the manifest: the backup is damaged",
            f.name
        );
    }
    let mut put = Vec::new();
    for f in m.files.iter().filter(|f| f.role != "config") {
        let target = match f.role.as_str() {
            "registry" => cfg.db_path(),
            "ledger" => {
                ensure!(
                    cfg.wallet.backend == LedgerBackend::Sqlite,
                    "the backup has a SQLite ledger, but wallet.backend is not \"sqlite\""
                );
                cfg.path(&cfg.wallet.ledger)
            }
            other => bail!("the manifest names an unknown role {other:?}"),
        };
        put_back(&dir.join(&f.name), &target)?;
        put.push(target);
    }
    Ok(put)
}

/// One consistent copy of the SQLite database at `from`.
fn copy_db(from: &Path, dir: &Path, name: &str, role: &str) -> Result<Copied> {
    use rusqlite::{Connection, OpenFlags, backup::Backup};
    let src = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", from.display()))?;
    src.busy_timeout(std::time::Duration::from_secs(10))?;
    let to = dir.join(name);
    {
        let mut dst = Connection::open(&to)?;
        let b = Backup::new(&src, &mut dst)?;
        b.step(-1)
            .with_context(|| format!("copying {}", from.display()))?;
        drop(b);
        // A standalone file: no WAL beside it.
        dst.pragma_update(None, "journal_mode", "DELETE")?;
        let ok: String = dst.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        ensure!(
            ok == "ok",
            "the copy of {} fails its integrity check: {ok}",
            from.display()
        );
    }
    std::fs::File::open(&to)?.sync_all()?;
    described(&to, name, role)
}

/// A file's size and SHA-256, read in blocks: a ledger of gigabytes is
/// never held in memory whole.
fn described(path: &Path, name: &str, role: &str) -> Result<Copied> {
    use std::io::Read;
    let reading = || format!("reading {}", path.display());
    let mut f = std::fs::File::open(path).with_context(reading)?;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).with_context(reading)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(Copied {
        name: name.to_owned(),
        role: role.to_owned(),
        bytes,
        sha256: hex::encode(ctx.finish()),
    })
}

/// `from` over `target`, whole or not at all: a temporary file beside it,
/// fsynced, renamed; the old database's WAL and shared memory go with it.
fn put_back(from: &Path, target: &Path) -> Result<()> {
    let tmp = target.with_extension("restoring");
    std::fs::copy(from, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    for side in ["-wal", "-shm"] {
        let mut p = target.as_os_str().to_owned();
        p.push(side);
        match std::fs::remove_file(PathBuf::from(p)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    std::fs::rename(&tmp, target).with_context(|| format!("replacing {}", target.display()))?;
    sync_dir(target.parent().unwrap_or(Path::new(".")))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// A lock on the data directory: every broker serving from it holds it
/// shared (nodes of one host may share a directory), and a restore needs
/// it exclusive, so none is put back under a running broker. The kernel
/// drops it when the process ends, however it ends.
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// For `serve`: shared with other brokers, refused under a restore.
    pub fn serving(cfg: &Config) -> Result<Self> {
        Self::take(cfg, rustix::fs::FlockOperation::NonBlockingLockShared)
            .context("a restore is in progress on this data directory")
    }

    /// For `restore`: no broker may hold it.
    pub fn restoring(cfg: &Config) -> Result<Self> {
        Self::take(cfg, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .with_context(|| format!("a broker runs on {}: stop it first", cfg.data_dir.display()))
    }

    fn take(cfg: &Config, op: rustix::fs::FlockOperation) -> Result<Self> {
        let path = cfg.data_dir.join(LOCK);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        rustix::fs::flock(&f, op).with_context(|| format!("locking {}", path.display()))?;
        Ok(Self { _file: f })
    }
}
