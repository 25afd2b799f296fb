//! A throwaway PostgreSQL cluster (Debian's `postgresql` package: the
//! binaries of the newest `/usr/lib/postgresql/<version>/bin`, or `$PG_BIN`) for the
//! tests: `initdb` into a tempdir, `pg_ctl start` on a free loopback port
//! with its Unix socket in the tempdir, `pg_ctl stop` when the last user
//! drops it.
//!
//! `initdb` refuses to run as root. As root, the tempdir is chowned to the
//! `postgres` system user (created by the Debian package) and the binaries
//! run through `runuser -u postgres`. The cluster's superuser is
//! `keybroker` with `trust` authentication, reachable only on 127.0.0.1
//! and the private socket directory.

use super::relay::free_port;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

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

pub struct PgServer {
    dir: tempfile::TempDir,
    pub port: u16,
    as_postgres: bool,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PgServer {
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

    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let as_postgres = is_root();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(ok.success(), "chown the cluster dir to postgres");
        }
        let s = Self {
            dir,
            port: free_port(),
            as_postgres,
        };
        let out = s
            .pg("initdb")
            .arg("-D")
            .arg(s.data())
            .args(["-U", "keybroker", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("initdb (is PostgreSQL installed? `make deps`)");
        assert!(
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
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(s.dir.path().join("server.log")).unwrap_or_default()
        );
        s
    }

    /// A libpq connection string for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=keybroker dbname={db}",
            self.port
        )
    }

    /// A fresh, empty database.
    pub fn new_db(&self, prefix: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .expect("connect to the test cluster");
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        name
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .pg("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// The cluster, shared by the tests running at the same time; stopped
/// when the last of them drops its handle.
pub fn server() -> Arc<PgServer> {
    static SERVER: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
    let mut g = SERVER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = g.upgrade() {
        return s;
    }
    let s = Arc::new(PgServer::start());
    *g = Arc::downgrade(&s);
    s
}
