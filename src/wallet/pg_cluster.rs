//! A throwaway PostgreSQL cluster for the tests (`tests/common/pg.rs`) and
//! the bench (`keybroker-bench --ledger postgres`), never for production:
//! `initdb` into a tempdir, `pg_ctl start` on a free loopback port with its
//! Unix socket in the tempdir, `pg_ctl stop` on drop (also on error or
//! panic), and the tempdir removed with it.
//!
//! The binaries are Debian's `postgresql` package (`make deps`): the newest
//! `/usr/lib/postgresql/<version>/bin`, or `$PG_BIN`.
//!
//! `initdb` refuses to run as root. As root, the tempdir is chowned to the
//! `postgres` system user (created by the Debian package) and the binaries
//! run through `runuser -u postgres`. The cluster's superuser is
//! `keybroker` with `trust` authentication, reachable only on 127.0.0.1
//! and the private socket directory; durability is PostgreSQL's default
//! (`fsync = on`, `synchronous_commit = on`).

use anyhow::{Context, Result, ensure};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// `$PG_BIN`, else the newest `/usr/lib/postgresql/<major>/bin`.
fn bin_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PG_BIN") {
        return PathBuf::from(p);
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .unwrap_or(15);
    PathBuf::from(format!("/usr/lib/postgresql/{newest}/bin"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A port nobody listens on at the moment, on 127.0.0.1.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running throwaway cluster; stopped and deleted on drop.
pub struct PgCluster {
    dir: tempfile::TempDir,
    pub port: u16,
    as_postgres: bool,
}

impl PgCluster {
    fn pg(&self, tool: &str) -> Command {
        let exe = bin_dir().join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `initdb` and `pg_ctl start`; returns once the server accepts
    /// connections.
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir().context("tempdir for the cluster")?;
        let as_postgres = is_root();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .context("chown")?;
            ensure!(ok.success(), "chown the cluster dir to postgres");
        }
        let s = Self {
            dir,
            port: free_port()?,
            as_postgres,
        };
        let out = s
            .pg("initdb")
            .arg("-D")
            .arg(s.data())
            .args(["-U", "keybroker", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .output()
            .context("initdb (is PostgreSQL installed? `make deps`)")?;
        ensure!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=50 -c shared_buffers=32MB",
            s.port,
            s.dir.path().display()
        );
        let out = s
            .pg("pg_ctl")
            .arg("-D")
            .arg(s.data())
            .arg("-l")
            .arg(s.dir.path().join("server.log"))
            .args(["-o", &opts, "-w", "-t", "60", "start"])
            .output()
            .context("pg_ctl start")?;
        ensure!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(s.dir.path().join("server.log")).unwrap_or_default()
        );
        Ok(s)
    }

    /// A libpq connection string for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=keybroker dbname={db}",
            self.port
        )
    }

    /// A fresh, empty database named `<prefix>_<pid>_<n>`.
    pub fn new_db(&self, prefix: &str) -> Result<String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .context("connect to the throwaway cluster")?;
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .context("create database")?;
        Ok(name)
    }

    /// The postmaster's pid (first line of `postmaster.pid`): its children
    /// are the backends, for CPU accounting.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .pg("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
