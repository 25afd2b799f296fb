//! The registered markets on a running broker, kept in step with the
//! registry: `market add` and `market remove` take effect within a poll,
//! on every node, without a restart.
//!
//! ```text
//! CLI / other node ─► registry: markets table
//!                        │ poll (500 ms, or at once on SIGHUP)
//! watcher thread ─► Markets{map, epoch} ◄── each core: epoch moved? drop the links of
//!                                           removed or changed markets, dial the new ones
//! ```
//!
//! A link of a removed market is dropped: it takes no new exchanges, and
//! the batch it has in flight finishes (the link task ends once its queue
//! is empty and every sender is gone). A market whose endpoint or CA
//! changed gets a new link with the new trust anchor. A market row that
//! fails its MAC check (`rowmac`) counts as removed. Each poll checks every
//! row; a row unchanged since its last check costs a digest, no HSM call.

use super::link::MarketInfo;
use crate::store::{MarketRecord, Store};
use anyhow::{Context, Result};
use rustls::crypto::CryptoProvider;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often each node reads the markets table (a few rows).
pub const POLL: Duration = Duration::from_millis(500);

pub type Map = HashMap<String, Arc<MarketInfo>>;

/// The markets every core sees, and a counter bumped on every change.
#[derive(Default)]
pub struct Markets {
    map: RwLock<Arc<Map>>,
    epoch: AtomicU64,
}

impl Markets {
    pub fn get(&self, id: &str) -> Option<Arc<MarketInfo>> {
        self.snapshot().get(id).cloned()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.snapshot().contains_key(id)
    }

    pub fn snapshot(&self) -> Arc<Map> {
        self.map.read().expect("markets lock").clone()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn replace(&self, map: Map) {
        *self.map.write().expect("markets lock") = Arc::new(map);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// What a market's link needs: its TLS client config with the registered
/// CA as the only trust anchor, and the broker's own rotating certificate.
pub struct Builder {
    pub provider: Arc<CryptoProvider>,
    pub resolver: Arc<super::tls::RotatingCert>,
}

impl Builder {
    pub fn info(&self, m: &MarketRecord) -> Result<MarketInfo> {
        let host = m
            .endpoint
            .rsplit_once(':')
            .map_or(m.endpoint.as_str(), |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(MarketInfo {
            server_name: rustls::pki_types::ServerName::try_from(host.to_owned())
                .with_context(|| format!("market {} endpoint host", m.id))?,
            client: super::tls::market_client(
                self.provider.clone(),
                &m.ca_pem,
                self.resolver.clone(),
            )
            .with_context(|| format!("market {} CA", m.id))?,
            id: m.id.clone(),
            endpoint: m.endpoint.clone(),
            ca_pem: m.ca_pem.clone(),
        })
    }

    /// The map for `records`, keeping `old`'s entry where a market is
    /// unchanged (so its links stay). A market that cannot be used (a bad
    /// endpoint or CA) is left out, logged when it starts failing
    /// (`unusable` remembers which do, so a poll does not repeat it); the
    /// others still serve.
    pub fn map(
        &self,
        records: Vec<MarketRecord>,
        old: &Map,
        unusable: &mut HashSet<String>,
    ) -> Map {
        let mut map = Map::with_capacity(records.len());
        let mut failing = HashSet::new();
        for m in records {
            if let Some(o) = old
                .get(&m.id)
                .filter(|o| o.endpoint == m.endpoint && o.ca_pem == m.ca_pem)
            {
                map.insert(m.id, o.clone());
                continue;
            }
            match self.info(&m) {
                Ok(info) => {
                    crate::metrics::market_known(&m.id);
                    map.insert(m.id, Arc::new(info));
                }
                Err(e) => {
                    if !unusable.contains(&m.id) {
                        tracing::error!(market = %m.id, error = %format!("{e:#}"), "market not usable; left out");
                    }
                    failing.insert(m.id);
                }
            }
        }
        *unusable = failing;
        map
    }
}

/// The rows of `store`'s markets that pass their check. A row that fails
/// is left out, as if removed (exchanges to it get `unknown_market`), with
/// an audit line when it starts failing (`refused` remembers which do).
fn checked(store: &Store, refused: &mut HashSet<String>) -> Result<Vec<MarketRecord>> {
    let mut ok = Vec::new();
    let mut bad = HashSet::new();
    for row in store.market_list()? {
        match row {
            Ok(m) => ok.push(m),
            Err(b) => {
                if !refused.contains(&b.key) {
                    tracing::error!(target: "audit", table = b.table, key = %b.key, why = %b.why,
                        "market row refused: it fails its check; left out (keybroker check)");
                }
                bad.insert(b.key);
            }
        }
    }
    *refused = bad;
    Ok(ok)
}

/// Reads the registry (`store`, sealed) every [`POLL`], or at once when
/// `now` is signalled, and publishes each change.
pub fn spawn_watcher(
    store: Store,
    markets: Arc<Markets>,
    builder: Builder,
    now: crossbeam_channel::Receiver<()>,
) -> Result<()> {
    let (mut refused, mut unusable) = (HashSet::new(), HashSet::new());
    // The first read is synchronous, so the cores dial every market at start.
    markets.replace(builder.map(checked(&store, &mut refused)?, &Map::new(), &mut unusable));
    std::thread::Builder::new()
        .name("markets".into())
        .spawn(move || {
            loop {
                match checked(&store, &mut refused) {
                    Ok(records) => {
                        let old = markets.snapshot();
                        let new = builder.map(records, &old, &mut unusable);
                        if changed(&old, &new) {
                            log_change(&old, &new);
                            markets.replace(new);
                        }
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "reading the markets"),
                }
                if let Err(crossbeam_channel::RecvTimeoutError::Disconnected) =
                    now.recv_timeout(POLL)
                {
                    // The reload sender is gone: keep polling on the clock.
                    std::thread::sleep(POLL);
                }
            }
        })?;
    Ok(())
}

fn changed(old: &Map, new: &Map) -> bool {
    old.len() != new.len()
        || new
            .iter()
            .any(|(id, m)| !old.get(id).is_some_and(|o| Arc::ptr_eq(o, m)))
}

fn log_change(old: &Map, new: &Map) {
    for (id, m) in new {
        match old.get(id) {
            None => tracing::info!(market = %id, endpoint = %m.endpoint, "market added"),
            Some(o) if !Arc::ptr_eq(o, m) => {
                tracing::info!(market = %id, endpoint = %m.endpoint, "market changed")
            }
            _ => {}
        }
    }
    for id in old.keys().filter(|id| !new.contains_key(*id)) {
        tracing::info!(market = %id, "market removed: no new exchanges; those in flight finish");
    }
}
