//! [`GroupLedger`]: one writer thread doing group commit, one read
//! connection for balances and history, over any [`Store`]:
//! [`SqliteLedger`] (embedded) or [`super::pg::PgLedger`] (shared server).
//!
//! ```text
//! purchase / cancel / top_up ──try_send──► bounded queue (full → Busy)
//!                                             │
//!                         writer: recv one, then take all queued (≤ group_max)
//!                                 BEGIN IMMEDIATE; apply each in order; COMMIT (one fsync)
//!                                 then answer each caller (oneshot or blocking channel)
//! balance / history ──► read connection (WAL: never blocks the writer)
//! audit ──► writer queue (runs between groups, with the writer's HSM session)
//! anchor ─► after a commit, or on a timer when no commit comes: the head,
//!           MAC'd by the HSM, appended to the anchor file (wallet::anchor)
//! ```
//!
//! Requests of one group are applied one after the other, so two
//! submissions of the same idempotency key in one group still debit once:
//! the second sees the first's decision. A business refusal (insufficient
//! funds, cancelled already, ...) changes nothing because every check runs
//! before the first write. A storage or MAC failure rolls the whole group
//! back and every caller in it gets the error: nothing of it is durable.

use super::anchor::AnchorConfig;
use super::apply::Writer;
use super::mailer::{Outbox, OutboxUpdate, Outgoing};
use super::sqlite::SqliteStore;
use super::store::Store;
use super::{
    Amount, AuditReport, CancelRequest, ChainMac, Currency, DEFAULT_CURRENCIES, Decision, Entry,
    Ledger, Pending, PurchaseRequest, Restored, TopUpRequest, WalletError, WalletResult,
};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};
use futures_channel::oneshot;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

#[derive(Clone, Debug)]
pub struct LedgerConfig {
    /// Requests waiting for the writer; beyond this callers get `Busy`.
    pub queue: usize,
    /// Most requests committed in one transaction.
    pub group_max: usize,
    /// Accepted currency codes.
    pub currencies: Vec<String>,
    /// Where the chain's head is anchored; `None` (unit tests, benches of
    /// the writer alone): nowhere, and the audit catches edits only.
    pub anchor: Option<AnchorConfig>,
    /// What stamps entries, decisions and anchors: the host's, or the
    /// simulation's.
    pub clock: Arc<dyn crate::clock::Clock>,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            queue: 8192,
            group_max: 512,
            currencies: DEFAULT_CURRENCIES
                .iter()
                .map(|(c, _)| (*c).to_owned())
                .collect(),
            anchor: None,
            clock: crate::clock::system(),
        }
    }
}

/// Where an answer goes: a future on a core thread, or a blocked caller.
pub(crate) enum Reply<T> {
    Async(oneshot::Sender<WalletResult<T>>),
    Sync(Sender<WalletResult<T>>),
}

impl<T> Reply<T> {
    pub(crate) fn send(self, r: WalletResult<T>) {
        // A caller that went away no longer wants the answer.
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(r);
            }
            Reply::Sync(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

pub(crate) enum Request {
    Purchase(PurchaseRequest, Reply<Decision>),
    Cancel(CancelRequest, Reply<Entry>),
    TopUp(TopUpRequest, Reply<Entry>),
    Audit(Reply<AuditReport>),
    Restore(String, Reply<Restored>),
    Outbox(OutboxUpdate, Reply<()>),
}

/// A ledger over the store `S`. Dropping it lets the writer finish what is
/// queued and stop.
pub struct GroupLedger<S> {
    tx: Option<Sender<Request>>,
    reader: Mutex<S>,
    writer: Option<JoinHandle<()>>,
    refusing: Option<String>,
}

/// The embedded ledger: one SQLite file.
pub type SqliteLedger = GroupLedger<SqliteStore>;

/// Builds the chain MAC on the writer thread (an HSM session is per thread).
pub type MacFactory = Box<dyn FnOnce() -> WalletResult<Box<dyn ChainMac>> + Send>;

impl SqliteLedger {
    /// Opens (creating if needed) the ledger at `path` and starts the
    /// writer. `mac` runs on the writer thread.
    pub fn open(path: &Path, cfg: LedgerConfig, mac: MacFactory) -> WalletResult<Self> {
        let path = path.to_path_buf();
        Self::start(cfg, mac, move || SqliteStore::open(&path))
    }
}

impl<S: Store> GroupLedger<S> {
    /// Starts the writer on a store from `open` (called on the writer
    /// thread, then again for the reader). `mac` runs on the writer thread.
    pub fn start(
        cfg: LedgerConfig,
        mac: MacFactory,
        open: impl Fn() -> WalletResult<S> + Send + Sync + 'static,
    ) -> WalletResult<Self> {
        let mut currencies = Vec::with_capacity(cfg.currencies.len());
        for c in &cfg.currencies {
            currencies.push(Currency::new(c)?);
        }
        let open = std::sync::Arc::new(open);
        let (tx, rx) = bounded::<Request>(cfg.queue.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let group_max = cfg.group_max.max(1);
        let open_w = open.clone();
        let anchor = cfg.anchor.clone();
        let clock = cfg.clock.clone();
        let writer = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                match open_w().and_then(|s| Writer::new(s, mac()?, currencies, anchor, clock)) {
                    Ok(w) => {
                        let _ = ready_tx.send(Ok(w.refusing()));
                        writer_loop(w, &rx, group_max);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| WalletError::storage(format!("spawning the ledger writer: {e}")))?;
        let refusing = ready_rx
            .recv()
            .map_err(|_| WalletError::storage("ledger writer died at start"))??;
        let reader = open()?;
        Ok(Self {
            tx: Some(tx),
            reader: Mutex::new(reader),
            writer: Some(writer),
            refusing,
        })
    }

    /// Queues `req`; if it cannot be queued, answers it with the reason.
    fn submit(&self, req: Request) {
        let Some(tx) = &self.tx else {
            return fail(req, WalletError::storage("ledger closed"));
        };
        match tx.try_send(req) {
            Ok(()) => {}
            Err(TrySendError::Full(r)) => fail(r, WalletError::Busy),
            Err(TrySendError::Disconnected(r)) => {
                fail(r, WalletError::storage("ledger writer gone"))
            }
        }
    }

    fn pending<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Pending<T> {
        let (tx, rx) = oneshot::channel();
        self.submit(make(Reply::Async(tx)));
        rx
    }

    fn blocking<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> WalletResult<T> {
        let (tx, rx) = bounded(1);
        self.submit(make(Reply::Sync(tx)));
        rx.recv()
            .map_err(|_| WalletError::storage("ledger writer gone"))?
    }

    /// The outbox of this ledger for its mailer: due rows are read on
    /// `read`, and the mailer's marks go through the writer, in its next
    /// group. SQLite drops every other connection's page cache when one
    /// connection commits, so a mailer committing its own marks made the
    /// writer read its B-tree pages back after each of them.
    pub fn outbox<R: Outbox>(self: &Arc<Self>, read: R) -> LedgerOutbox<S, R> {
        LedgerOutbox {
            ledger: self.clone(),
            read,
        }
    }

    /// Applies `u` in the writer's next group. Waits for room in the
    /// queue instead of failing with `Busy`: a mark lost here would send
    /// the message again.
    fn outbox_update(&self, u: OutboxUpdate) -> WalletResult<()> {
        let gone = || WalletError::storage("ledger writer gone");
        let tx = self.tx.as_ref().ok_or_else(gone)?;
        let (rtx, rrx) = bounded(1);
        tx.send(Request::Outbox(u, Reply::Sync(rtx)))
            .map_err(|_| gone())?;
        rrx.recv().map_err(|_| gone())?
    }

    fn read<T>(&self, f: impl FnOnce(&mut S) -> WalletResult<T>) -> WalletResult<T> {
        let mut c = self
            .reader
            .lock()
            .map_err(|_| WalletError::storage("reader lock poisoned"))?;
        f(&mut c)
    }
}

/// Answers a request that never reached the writer.
fn fail(req: Request, e: WalletError) {
    match req {
        Request::Purchase(_, r) => r.send(Err(e)),
        Request::Cancel(_, r) => r.send(Err(e)),
        Request::TopUp(_, r) => r.send(Err(e)),
        Request::Audit(r) => r.send(Err(e)),
        Request::Restore(_, r) => r.send(Err(e)),
        Request::Outbox(_, r) => r.send(Err(e)),
    }
}

/// Groups until the ledger is dropped. While the head is ahead of the
/// newest anchor, the wait for work is bounded by the anchor's due time,
/// so a head stays unanchored at most `anchor_interval` even when no
/// further commit comes; the last head is anchored on the way out.
fn writer_loop<S: Store>(mut w: Writer<S>, rx: &Receiver<Request>, group_max: usize) {
    let mut group = Vec::with_capacity(group_max);
    loop {
        let first = match w.anchor_due_in(std::time::Instant::now()) {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(wait) => rx.recv_timeout(wait),
        };
        match first {
            Ok(r) => {
                group.push(r);
                while group.len() < group_max {
                    match rx.try_recv() {
                        Ok(r) => group.push(r),
                        Err(_) => break,
                    }
                }
                w.run_group(&mut group);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                w.anchor_now();
                return;
            }
        }
        w.anchor_if_due(std::time::Instant::now());
    }
}

/// See [`GroupLedger::outbox`].
pub struct LedgerOutbox<S, R> {
    ledger: Arc<GroupLedger<S>>,
    read: R,
}

impl<S: Store, R: Outbox> Outbox for LedgerOutbox<S, R> {
    fn due(&mut self, now: i64, limit: usize) -> WalletResult<Vec<Outgoing>> {
        self.read.due(now, limit)
    }
    fn mark_sent(&mut self, ids: &[i64]) -> WalletResult<()> {
        self.ledger.outbox_update(OutboxUpdate::Sent(ids.to_vec()))
    }
    fn defer(&mut self, failed: i64, rest: &[i64], next: i64) -> WalletResult<()> {
        self.ledger.outbox_update(OutboxUpdate::Defer {
            failed,
            rest: rest.to_vec(),
            next,
        })
    }
    fn pending(&mut self) -> WalletResult<usize> {
        self.read.pending()
    }
}

impl<S> Drop for GroupLedger<S> {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

impl<S: Store> Ledger for GroupLedger<S> {
    fn purchase_async(&self, req: PurchaseRequest) -> Pending<Decision> {
        self.pending(|r| Request::Purchase(req, r))
    }
    fn cancel_async(&self, req: CancelRequest) -> Pending<Entry> {
        self.pending(|r| Request::Cancel(req, r))
    }
    fn top_up_async(&self, req: TopUpRequest) -> Pending<Entry> {
        self.pending(|r| Request::TopUp(req, r))
    }
    fn purchase(&self, req: PurchaseRequest) -> WalletResult<Decision> {
        self.blocking(|r| Request::Purchase(req, r))
    }
    fn cancel(&self, req: CancelRequest) -> WalletResult<Entry> {
        self.blocking(|r| Request::Cancel(req, r))
    }
    fn top_up(&self, req: TopUpRequest) -> WalletResult<Entry> {
        self.blocking(|r| Request::TopUp(req, r))
    }

    fn balance(&self, user: &str) -> WalletResult<Vec<Amount>> {
        let rows = self.read(|s| s.balances(user))?;
        let mut out = Vec::with_capacity(rows.len());
        for (c, minor) in rows {
            out.push(Amount {
                minor,
                currency: Currency::new(&c)
                    .map_err(|_| WalletError::storage(format!("bad currency {c:?} stored")))?,
            });
        }
        Ok(out)
    }

    fn history(&self, user: &str) -> WalletResult<Vec<Entry>> {
        let rows = self.read(|s| s.history(user))?;
        rows.into_iter()
            .map(|r| r.map_err(WalletError::storage))
            .collect()
    }

    fn audit(&self) -> WalletResult<AuditReport> {
        self.blocking(Request::Audit)
    }

    fn restore(&self, reason: &str) -> WalletResult<Restored> {
        self.blocking(|r| Request::Restore(reason.to_owned(), r))
    }

    fn refusing(&self) -> Option<String> {
        self.refusing.clone()
    }
}
