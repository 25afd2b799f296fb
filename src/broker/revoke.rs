//! Revocation on a running broker: a terminal revoked, or its user removed,
//! loses its open sessions within a poll period, on every node.
//!
//! ```text
//! CLI / other node ─► registry: UPDATE/DELETE terminals ─► trigger ─► revocations log
//!                                                                        │ poll (250 ms)
//! watcher thread ◄───────────────────────────────────────────────────────┘
//!   ├─► Revoked: fingerprint set + epoch (atomic) ◄── every frame: one load
//!   └─► each core: batch ─► Live ─► wakes that terminal's idle connections
//! ```
//!
//! Login already reads the registry, so a revoked terminal never starts a
//! session, resumed from a ticket or not. What it could keep is a session
//! opened before: nothing on the frame path reads the registry (a query per
//! frame would cost more than the frame). The log is what makes the
//! change cheap to see: the triggers in `store.rs` append to it whoever
//! revokes, and each node polls it with one index seek, so the nodes
//! sharing a registry need no channel between them. A revocation is rare
//! and its log entry tiny, so the log is never pruned.
//!
//! Two paths end a session. Before serving a frame a connection compares the
//! epoch it last checked with [`Revoked`]'s, one atomic load; only when it
//! moved does it look its fingerprint up. A connection waiting for the
//! terminal's next frame reads nothing, so its core also wakes it: every
//! connection registers its fingerprint in its core's [`Live`], and the
//! watcher hands each core the fingerprints it found.

use crate::store::Store;
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often each node reads the revocation log: well inside the second
/// a revocation may take, at a few microseconds of one thread per poll.
pub const POLL: Duration = Duration::from_millis(250);

/// Fingerprints found in one poll, as handed to each core.
pub type Batch = Arc<[[u8; 32]]>;

/// The terminals revoked while this broker runs, shared by every core.
#[derive(Default)]
pub struct Revoked {
    /// Bumped after every change to `set`.
    epoch: AtomicU64,
    set: RwLock<HashSet<[u8; 32]>>,
}

impl Revoked {
    /// Whether terminal `fp` is revoked. `seen` is the epoch the caller
    /// checked last (0 at first); while it is current this is one atomic
    /// load, and it is moved on only when `fp` is clear.
    pub fn check(&self, seen: &mut u64, fp: &[u8; 32]) -> bool {
        let now = self.epoch.load(Ordering::Acquire);
        if now == *seen {
            return false;
        }
        let revoked = self
            .set
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(fp);
        if !revoked {
            *seen = now;
        }
        revoked
    }

    fn add(&self, fps: &[[u8; 32]]) {
        self.set
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(fps.iter().copied());
        self.epoch.fetch_add(1, Ordering::Release);
    }
}

/// An open connection's terminal, and the sender that wakes the connection
/// when that terminal is revoked.
type Waiting = ([u8; 32], oneshot::Sender<()>);

/// One core's open connections, by a number of the core's own.
#[derive(Default)]
pub struct Live {
    next: Cell<u64>,
    conns: RefCell<HashMap<u64, Waiting>>,
}

/// A connection's place in [`Live`], given up when dropped.
pub struct Registered<'a> {
    live: &'a Live,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.live.conns.borrow_mut().remove(&self.id);
    }
}

impl Live {
    /// Registers a connection of terminal `fp`; the receiver completes when
    /// the terminal is revoked.
    pub fn register(&self, fp: [u8; 32]) -> (Registered<'_>, oneshot::Receiver<()>) {
        let id = self.next.get();
        self.next.set(id + 1);
        let (tx, rx) = oneshot::channel();
        self.conns.borrow_mut().insert(id, (fp, tx));
        (Registered { live: self, id }, rx)
    }

    /// Wakes the connections of every terminal in each batch the watcher
    /// sends this core. Runs on the core for as long as the core does.
    pub async fn listen(self: Rc<Self>, mut batches: mpsc::UnboundedReceiver<Batch>) {
        while let Some(batch) = batches.next().await {
            let set: HashSet<&[u8; 32]> = batch.iter().collect();
            // A pass over the core's connections per batch: revocations are
            // rare, connections many, so no second index is kept for them.
            let mut conns = self.conns.borrow_mut();
            let hit: Vec<u64> = conns
                .iter()
                .filter(|(_, (fp, _))| set.contains(fp))
                .map(|(id, _)| *id)
                .collect();
            for id in hit {
                if let Some((_, tx)) = conns.remove(&id) {
                    let _ = tx.send(());
                }
            }
        }
    }
}

/// Starts the thread that polls the revocation log of the registry at
/// `db`, records what it finds in `revoked` and tells every core.
pub fn spawn_watcher(
    db: PathBuf,
    revoked: Arc<Revoked>,
    cores: Vec<mpsc::UnboundedSender<Batch>>,
) -> anyhow::Result<()> {
    let store = Store::open(&db)?;
    let mut head = store.revocations_head()?;
    std::thread::Builder::new()
        .name("revocations".into())
        .spawn(move || {
            loop {
                std::thread::sleep(POLL);
                let found = match store.revocations_since(head) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::error!(error = %e, "reading the revocation log failed; retrying");
                        continue;
                    }
                };
                let Some(&(last, _)) = found.last() else {
                    continue;
                };
                head = last;
                let batch: Batch = found.iter().map(|(_, fp)| *fp).collect();
                for fp in batch.iter() {
                    tracing::info!(target: "audit", terminal = %hex::encode(fp), "terminal revoked: ending its sessions");
                }
                revoked.add(&batch);
                for core in &cores {
                    let _ = core.unbounded_send(batch.clone());
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_is_clear_until_the_fingerprint_is_added() {
        let r = Revoked::default();
        let mut seen = 0;
        assert!(!r.check(&mut seen, &[1; 32]));
        r.add(&[[2; 32]]);
        assert!(!r.check(&mut seen, &[1; 32]));
        assert_eq!(seen, 1);
        r.add(&[[1; 32]]);
        assert!(r.check(&mut seen, &[1; 32]));
        // A revoked terminal stays revoked however often it asks.
        assert!(r.check(&mut seen, &[1; 32]));
    }

    #[test]
    fn listen_wakes_only_the_revoked_terminals_connections() {
        let rt = compio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let live = Rc::new(Live::default());
            let (a1, mut wa1) = live.register([1; 32]);
            let (_a2, wa2) = live.register([1; 32]);
            let (_b, mut wb) = live.register([2; 32]);
            drop(a1);
            let (tx, rx) = mpsc::unbounded();
            let task = compio::runtime::spawn(live.clone().listen(rx));
            tx.unbounded_send(Arc::from([[1; 32]])).unwrap();
            wa2.await.unwrap();
            // The dropped registration was gone already: its sender with it.
            assert!(wa1.try_recv().is_err());
            assert_eq!(wb.try_recv(), Ok(None));
            assert_eq!(live.conns.borrow().len(), 1);
            drop(tx);
            task.await.unwrap();
        });
    }
}
