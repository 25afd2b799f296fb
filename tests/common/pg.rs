//! The tests' PostgreSQL: the library's throwaway cluster
//! (`keybroker::wallet::pg_cluster`), one shared by the tests running at
//! the same time.

use keybroker::wallet::pg_cluster::PgCluster;
use std::sync::{Arc, Mutex, Weak};

/// The cluster, with the tests' panicking accessors.
pub struct PgServer(PgCluster);

impl PgServer {
    /// A libpq connection string for database `db`.
    pub fn url(&self, db: &str) -> String {
        self.0.url(db)
    }

    /// A fresh, empty database.
    pub fn new_db(&self, prefix: &str) -> String {
        self.0.new_db(prefix).expect("create database")
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
    let s = Arc::new(PgServer(
        PgCluster::start().expect("start the test PostgreSQL cluster"),
    ));
    *g = Arc::downgrade(&s);
    s
}
