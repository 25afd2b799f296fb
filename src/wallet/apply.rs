//! The writer's work: one group of requests in one transaction, and the
//! audit. Runs only on the ledger writer thread.
//!
//! ```text
//! run_group: BEGIN IMMEDIATE ─► for each request: checks (no writes) ─► writes
//!            ─► COMMIT ─► answers        (storage/MAC error: ROLLBACK, all get it)
//! append:    seq = head+1, prev_mac = head mac, mac = ChainMac(prev ‖ entry) ─► INSERT
//! anchor:    committed head ahead of the newest anchor, interval passed ─► anchor file
//! audit:     anchor sources (first) ─► one snapshot of entries and accounts
//! ```

use super::anchor::{
    self, Anchor, AnchorConfig, AnchorFile, AnchorKind, Head, MAX_REASON, Pin, utc,
};
use super::chain::{GENESIS, entry_mac};
use super::ledger::Request;
use super::store::{NewMail, Scanned, Store};
use super::{
    Amount, AuditReport, CancelRequest, ChainMac, Currency, Decision, Entry, EntryKind, MAX_AMOUNT,
    PurchaseRequest, Restored, TopUpRequest, WalletError, WalletResult, check_id, check_mail,
    check_text,
};
use crate::clock::Clock;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A decision id: 48 bits of milliseconds, then 80 random bits (the layout
/// of a UUIDv7), as 32 hex digits. Ids in time order land on the right edge
/// of the `decisions` B-tree and of the outbox's `message_id` index, so a
/// group commit dirties a few pages there instead of one random page per
/// purchase in each (every dirty page is a 4 KiB WAL frame).
fn new_decision_id(now_ms: i64) -> String {
    let mut b = [0u8; 16];
    let ms = u64::try_from(now_ms).unwrap_or(0);
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    rand::fill(&mut b[6..]);
    hex::encode(b)
}

/// Storage and MAC failures abort the whole group; the rest are refusals
/// raised before any write.
fn is_fatal(e: &WalletError) -> bool {
    matches!(e, WalletError::Storage(_) | WalletError::Mac(_))
}

type Answer = Box<dyn FnOnce(Option<&WalletError>)>;

fn answer<T: 'static>(res: WalletResult<T>, reply: super::ledger::Reply<T>) -> Answer {
    Box::new(move |fatal| match fatal {
        Some(e) => reply.send(Err(e.clone())),
        None => reply.send(res),
    })
}

pub(crate) struct Writer<S> {
    store: S,
    mac: Box<dyn ChainMac>,
    currencies: Vec<Currency>,
    /// Last committed (or, inside a group, last appended) seq and MAC.
    head: (i64, [u8; 32]),
    /// The newest committed head this writer has seen (read, written or
    /// anchored). The chain may grow past it (other writers) but never
    /// lose it.
    known: (i64, [u8; 32]),
    anchor: Option<Anchoring>,
    /// What stamps entries, decisions and anchors.
    clock: Arc<dyn Clock>,
    /// Set at start when the anchors show that appending would fork or
    /// bless a damaged history; cleared by a restore.
    refuse: Option<String>,
}

/// The writer's side of the anchor file.
struct Anchoring {
    cfg: AnchorConfig,
    /// Open (and locked) only if this writer appends anchors.
    file: Option<AnchorFile>,
    /// The file's newest record whose MAC verifies: the next one links to it.
    last: Option<Anchor>,
    /// When this writer last tried to append one.
    tried: Option<Instant>,
}

impl Anchoring {
    /// The newest anchored head of shard 0 (seq 0 if none).
    fn anchored(&self) -> (i64, [u8; 32]) {
        self.last
            .as_ref()
            .and_then(|a| a.head(0))
            .map_or((0, GENESIS), |h| (h.seq, h.mac))
    }

    /// Appends a record of `head` after the file's newest one and logs
    /// it: a restore record with `restore = Some(reason)`, else a head
    /// record, which is skipped if the file holds this head or a later
    /// one already (another writer on the same file anchored it). Returns
    /// the newest record before, and the one written.
    fn append(
        &mut self,
        mac: &dyn ChainMac,
        restore: Option<&str>,
        head: (i64, [u8; 32]),
        now_ms: i64,
    ) -> WalletResult<(Option<Anchor>, Option<Anchor>)> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| WalletError::storage("the anchor file is not open for writing here"))?;
        let started = Instant::now();
        let (before, written) = file.append_with(mac, |newest| {
            let newest_head = newest.and_then(|n| n.head(0));
            let kind = match restore {
                Some(reason) => AnchorKind::Restore {
                    reason: reason.to_owned(),
                    supersedes: newest.map_or_else(Vec::new, |n| n.heads.clone()),
                },
                None if newest_head.is_some_and(|h| h.seq >= head.0) => return Ok(None),
                None => AnchorKind::Head,
            };
            let heads = vec![Head {
                shard: 0,
                seq: head.0,
                mac: head.1,
            }];
            let prev = newest.map_or(GENESIS, |n| n.mac);
            Anchor::seal(mac, kind, now_ms, prev, heads).map(Some)
        })?;
        // The second place: journald under systemd, out of reach of
        // whoever can write the database or the data directory.
        if let Some(w) = &written {
            let (line, us) = (w.to_line(), started.elapsed().as_micros());
            match &w.kind {
                AnchorKind::Head => {
                    tracing::info!(target: "audit", anchor = %line, us, "ledger anchor")
                }
                AnchorKind::Restore { reason, .. } => {
                    tracing::warn!(target: "audit", seq = head.0, reason = %reason, anchor = %line,
                        "ledger restore recorded")
                }
            }
        }
        self.last = written.clone().or_else(|| before.clone());
        Ok((before, written))
    }
}

impl<S: Store> Writer<S> {
    pub(crate) fn new(
        store: S,
        mac: Box<dyn ChainMac>,
        currencies: Vec<Currency>,
        anchor: Option<AnchorConfig>,
        clock: Arc<dyn Clock>,
    ) -> WalletResult<Self> {
        let mut w = Self {
            store,
            mac,
            currencies,
            clock,
            head: (0, GENESIS),
            known: (0, GENESIS),
            anchor: None,
            refuse: None,
        };
        w.load_head()?;
        if let Some(cfg) = anchor {
            w.open_anchors(cfg)?;
        }
        Ok(w)
    }

    /// Opens the anchor file (for appending, if this writer anchors) and
    /// learns its newest head. The writer refuses to append (see
    /// `load_head`), until `keybroker restore` records a restore, to a
    /// ledger that is behind that head (entries removed, or an older copy
    /// put back), and, if it anchors, to a ledger with entries but no
    /// anchor (the file removed or emptied): anchoring that ledger as it
    /// is would bless whatever was done to it. Reads, audits and the
    /// restore itself still work.
    fn open_anchors(&mut self, cfg: AnchorConfig) -> WalletResult<()> {
        let file = if cfg.write {
            Some(AnchorFile::open(&cfg.path)?)
        } else {
            None
        };
        let last = anchor::newest(&cfg.path, self.mac.as_ref())?;
        let a = Anchoring {
            cfg,
            file,
            last,
            tried: None,
        };
        let (seq, mac) = a.anchored();
        let file = a.cfg.path.display();
        let at = utc(a.last.as_ref().map_or(0, |l| l.t_ms));
        let head = self.known.0;
        let then = "run `keybroker wallet audit`, and `keybroker restore --reason` if a backup was put back on purpose";
        // The anchored entry itself, not only the head's seq: a ledger put
        // back and appended to by a writer that did not know the anchors
        // is ahead of them, and forked.
        let at_seq = if seq == 0 {
            Some(GENESIS.to_vec())
        } else {
            self.store.mac_at(seq)?
        };
        self.refuse = if at_seq.is_none() {
            Some(format!(
                "the ledger ends at entry {head}, behind entry {seq} anchored at {at} in {file}: entries were removed or an older copy put back; {then}"
            ))
        } else if at_seq.as_deref() != Some(&mac[..]) {
            Some(format!(
                "entry {seq} is not the entry anchored at {at} in {file}: the ledger was rolled back and appended to since; {then}"
            ))
        } else if a.cfg.write && a.last.is_none() && head > 0 {
            Some(format!(
                "the ledger has {head} entries but {file} holds no anchor: it was removed or emptied; if it is new (the first start with anchors, or a broker stopped before its first anchor), run `keybroker restore --reason`"
            ))
        } else {
            None
        };
        if let Some(why) = &self.refuse {
            tracing::error!(target: "audit", reason = %why, "the ledger writer refuses to append");
        }
        self.anchor = Some(a);
        Ok(())
    }

    /// Why this writer refuses to append, if it does (as of its start).
    pub(crate) fn refusing(&self) -> Option<String> {
        self.refuse.clone()
    }

    /// How long until the committed head must be anchored; `None` when
    /// it is anchored already (or this writer does not anchor).
    pub(crate) fn anchor_due_in(&self, now: Instant) -> Option<Duration> {
        let a = self.anchor.as_ref().filter(|a| a.file.is_some())?;
        if self.known.0 <= a.anchored().0 || self.refuse.is_some() {
            return None;
        }
        Some(a.tried.map_or(Duration::ZERO, |t| {
            (t + a.cfg.interval).saturating_duration_since(now)
        }))
    }

    /// Anchors the committed head if it is due.
    pub(crate) fn anchor_if_due(&mut self, now: Instant) {
        if self.anchor_due_in(now) == Some(Duration::ZERO) {
            self.anchor_now();
        }
    }

    /// Anchors the committed head if it is ahead of the newest anchor.
    /// `known` is always a head this writer saw in the chain (read or
    /// committed), so the record is true even if the chain has lost it
    /// since. A failure is logged and retried after the interval: the
    /// ledger keeps serving, the window grows, the log says so.
    pub(crate) fn anchor_now(&mut self) {
        let known = self.known;
        let Some(a) = self.anchor.as_mut().filter(|a| a.file.is_some()) else {
            return;
        };
        if known.0 <= a.anchored().0 || self.refuse.is_some() {
            return;
        }
        a.tried = Some(Instant::now());
        if let Err(e) = a.append(self.mac.as_ref(), None, known, self.clock.now_ms()) {
            tracing::error!(target: "audit", error = %e, seq = known.0,
                "anchoring the ledger head failed; retrying after wallet.anchor_interval_ms");
        }
    }

    /// Reads the chain head. A chain shorter than one already seen (or
    /// anchored) lost entries: appending to it would fork the history, so
    /// it is refused.
    fn load_head(&mut self) -> WalletResult<()> {
        if let Some(why) = &self.refuse {
            return Err(WalletError::storage(why.clone()));
        }
        let head = match self.store.head()? {
            None => (0, GENESIS),
            Some((seq, mac)) => (
                seq,
                mac.as_slice().try_into().map_err(|_| {
                    WalletError::storage(format!("entry {seq}: MAC is not 32 bytes"))
                })?,
            ),
        };
        if head.0 < self.known.0 || (head.0 == self.known.0 && head.1 != self.known.1) {
            return Err(WalletError::storage(format!(
                "the chain head went back from entry {} to {}: entries were removed or an older \
                 copy restored; run `keybroker wallet audit` (and `keybroker restore --reason` \
                 if a backup was put back on purpose)",
                self.known.0, head.0
            )));
        }
        self.head = head;
        self.known = head;
        Ok(())
    }

    /// Applies `group` in one transaction and answers every request.
    pub(crate) fn run_group(&mut self, group: &mut Vec<Request>) {
        let started = Instant::now();
        let mut answers: Vec<Answer> = Vec::with_capacity(group.len());
        let mut audits = Vec::new();
        let mut restores = Vec::new();
        // The head is re-read under the write lock: another writer (a second
        // process or node on the same ledger) may have appended since.
        let mut fatal = self
            .store
            .begin_write()
            .and_then(|()| self.load_head())
            .err();
        for req in group.drain(..) {
            match req {
                Request::Audit(reply) => audits.push(reply),
                Request::Restore(reason, reply) => restores.push((reason, reply)),
                Request::Purchase(r, reply) => {
                    let res = self.guarded(&fatal, |w| w.purchase(&r));
                    fatal = fatal.or_else(|| res.as_ref().err().filter(|e| is_fatal(e)).cloned());
                    answers.push(answer(res, reply));
                }
                Request::Cancel(r, reply) => {
                    let res = self.guarded(&fatal, |w| w.cancel(&r));
                    fatal = fatal.or_else(|| res.as_ref().err().filter(|e| is_fatal(e)).cloned());
                    answers.push(answer(res, reply));
                }
                Request::TopUp(r, reply) => {
                    let res = self.guarded(&fatal, |w| w.top_up(&r));
                    fatal = fatal.or_else(|| res.as_ref().err().filter(|e| is_fatal(e)).cloned());
                    answers.push(answer(res, reply));
                }
                Request::Outbox(u, reply) => {
                    let res = self.guarded(&fatal, |w| w.store.outbox_update(&u));
                    fatal = fatal.or_else(|| res.as_ref().err().cloned());
                    answers.push(answer(res, reply));
                }
            }
        }
        if fatal.is_none() && !answers.is_empty() {
            fatal = self.store.commit().err();
            if fatal.is_none() {
                self.known = self.head;
                // Here, so both stores (SQLite, PostgreSQL) are measured
                // alike: from taking the write lock to the durable commit.
                crate::metrics::ledger_commit(started.elapsed(), answers.len());
            }
        } else if fatal.is_none() {
            fatal = self.store.rollback().err();
        }
        if let Some(e) = &fatal {
            tracing::error!(error = %e, requests = answers.len(), "ledger group rolled back");
            let _ = self.store.rollback();
            if let Err(e) = self.load_head() {
                tracing::error!(error = %e, "reloading the chain head");
            }
        }
        for a in answers {
            a(fatal.as_ref());
        }
        // Before the audits: one asked for in the same group as the
        // first writes then sees them anchored.
        self.anchor_if_due(Instant::now());
        for reply in audits {
            reply.send(self.audit());
        }
        for (reason, reply) in restores {
            reply.send(self.restore(&reason));
        }
    }

    fn guarded<T>(
        &mut self,
        fatal: &Option<WalletError>,
        f: impl FnOnce(&mut Self) -> WalletResult<T>,
    ) -> WalletResult<T> {
        match fatal {
            Some(e) => Err(e.clone()),
            None => f(self),
        }
    }

    fn check_amount(&self, a: &Amount) -> WalletResult<()> {
        if !self.currencies.contains(&a.currency) {
            return Err(WalletError::UnknownCurrency);
        }
        if a.minor <= 0 || a.minor > MAX_AMOUNT {
            return Err(WalletError::InvalidAmount);
        }
        Ok(())
    }

    /// Chains and inserts `e`; fills in its seq and MACs.
    fn append(&mut self, mut e: Entry) -> WalletResult<Entry> {
        e.seq = self.head.0 + 1;
        e.prev_mac = self.head.1;
        e.mac = entry_mac(self.mac.as_ref(), &e, &e.prev_mac)?;
        self.store.insert_entry(&e)?;
        self.head = (e.seq, e.mac);
        Ok(e)
    }

    fn purchase(&mut self, r: &PurchaseRequest) -> WalletResult<Decision> {
        check_id("user", &r.user)?;
        check_id("market", &r.market)?;
        check_text("order reference", &r.order_ref, 128, true)?;
        check_text(
            "idempotency key",
            &r.idempotency_key,
            crate::syntax::MAX_IDEMPOTENCY_KEY,
            false,
        )?;
        check_mail(&r.mail_to)?;
        self.check_amount(&r.amount)?;
        if let Some(d) = self.store.decision_by_key(&r.user, &r.idempotency_key)? {
            return d.into_decision(&r.user);
        }
        let cur = r.amount.currency.as_str();
        let after = self
            .store
            .balance_of(&r.user, cur)?
            .checked_sub(r.amount.minor)
            .ok_or(WalletError::Overflow)?;
        if after < 0 {
            return Err(WalletError::InsufficientFunds);
        }
        let now = self.clock.now_ms();
        let id = new_decision_id(now);
        self.store.set_balance(&r.user, cur, after)?;
        let e = self.append(Entry {
            seq: 0,
            user: r.user.clone(),
            kind: EntryKind::Purchase,
            decision_id: id.clone(),
            amount: r.amount,
            balance_after: after,
            market: r.market.clone(),
            order_ref: r.order_ref.clone(),
            idempotency_key: r.idempotency_key.clone(),
            voucher_id: String::new(),
            created_ms: now,
            prev_mac: GENESIS,
            mac: GENESIS,
        })?;
        let d = Decision {
            id,
            seq: e.seq,
            user: r.user.clone(),
            market: r.market.clone(),
            amount: r.amount,
            order_ref: r.order_ref.clone(),
            balance_after: after,
            created_ms: now,
        };
        self.store.insert_decision(&d, &r.idempotency_key)?;
        let after_a = Amount {
            minor: after,
            ..r.amount
        };
        self.store.queue_mail(&NewMail {
            message_id: &format!("<decision-{}@keybroker>", d.id),
            user: &r.user,
            to: &r.mail_to,
            subject: &format!("keybroker: purchase of {} at {}", r.amount, r.market),
            body: &format!(
                "Your home card paid {} to market {}.\r\n\r\nDecision: {}\r\nOrder: {}\r\nBalance now: {after_a}\r\nLedger entry: {}\r\n",
                r.amount, r.market, d.id, r.order_ref, e.seq
            ),
            now,
        })?;
        Ok(d)
    }

    fn cancel(&mut self, r: &CancelRequest) -> WalletResult<Entry> {
        check_id("user", &r.user)?;
        check_text("decision id", &r.decision_id, 64, false)?;
        check_mail(&r.mail_to)?;
        let Some(d) = self.store.decision_by_id(&r.decision_id)? else {
            return Err(WalletError::UnknownDecision);
        };
        if d.user != r.user {
            return Err(WalletError::NotYourDecision);
        }
        if r.market.as_ref().is_some_and(|m| *m != d.market) {
            return Err(WalletError::BadAuthorisation);
        }
        if d.state != "active" {
            return Err(WalletError::AlreadyCancelled);
        }
        let currency = Currency::new(&d.currency).map_err(|_| {
            WalletError::storage(format!("decision {}: bad currency", r.decision_id))
        })?;
        let after = self
            .store
            .balance_of(&r.user, &d.currency)?
            .checked_add(d.amount)
            .ok_or(WalletError::Overflow)?;
        let now = self.clock.now_ms();
        self.store.mark_cancelled(&r.decision_id)?;
        self.store.set_balance(&r.user, &d.currency, after)?;
        let amount = Amount {
            minor: d.amount,
            currency,
        };
        let market = d.market;
        let e = self.append(Entry {
            seq: 0,
            user: r.user.clone(),
            kind: EntryKind::Cancel,
            decision_id: r.decision_id.clone(),
            amount,
            balance_after: after,
            market: market.clone(),
            order_ref: d.order_ref,
            idempotency_key: String::new(),
            voucher_id: String::new(),
            created_ms: now,
            prev_mac: GENESIS,
            mac: GENESIS,
        })?;
        let after_a = Amount {
            minor: after,
            currency,
        };
        self.store.queue_mail(&NewMail {
            message_id: &format!("<cancel-{}@keybroker>", r.decision_id),
            user: &r.user,
            to: &r.mail_to,
            subject: &format!("keybroker: purchase at {market} cancelled, {amount} refunded"),
            body: &format!(
                "Market {market} cancelled decision {}.\r\n\r\nRefunded: {amount}\r\nBalance now: {after_a}\r\nLedger entry: {}\r\n",
                r.decision_id, e.seq
            ),
            now,
        })?;
        Ok(e)
    }

    fn top_up(&mut self, r: &TopUpRequest) -> WalletResult<Entry> {
        check_id("user", &r.user)?;
        check_text("voucher id", &r.voucher_id, 64, false)?;
        check_mail(&r.mail_to)?;
        self.check_amount(&r.amount)?;
        if self.store.voucher_used(&r.voucher_id)? {
            return Err(WalletError::VoucherUsed);
        }
        let cur = r.amount.currency.as_str();
        let after = self
            .store
            .balance_of(&r.user, cur)?
            .checked_add(r.amount.minor)
            .ok_or(WalletError::Overflow)?;
        let now = self.clock.now_ms();
        self.store.set_balance(&r.user, cur, after)?;
        let e = self.append(Entry {
            seq: 0,
            user: r.user.clone(),
            kind: EntryKind::TopUp,
            decision_id: String::new(),
            amount: r.amount,
            balance_after: after,
            market: String::new(),
            order_ref: String::new(),
            idempotency_key: String::new(),
            voucher_id: r.voucher_id.clone(),
            created_ms: now,
            prev_mac: GENESIS,
            mac: GENESIS,
        })?;
        self.store.insert_voucher(&r.voucher_id, e.seq)?;
        let after_a = Amount {
            minor: after,
            ..r.amount
        };
        self.store.queue_mail(&NewMail {
            message_id: &format!("<topup-{}@keybroker>", r.voucher_id),
            user: &r.user,
            to: &r.mail_to,
            subject: &format!("keybroker: top-up of {}", r.amount),
            body: &format!(
                "Your home card was credited {}.\r\n\r\nVoucher: {}\r\nBalance now: {after_a}\r\nLedger entry: {}\r\n",
                r.amount, r.voucher_id, e.seq
            ),
            now,
        })?;
        Ok(e)
    }

    /// Re-verifies every MAC and link, recomputes every balance from the
    /// entries, compares with `accounts`, and checks the entries against
    /// the anchors. The anchors are read first, then one snapshot of the
    /// ledger: every head anchored was committed before, so a running
    /// writer's new anchors cannot make an honest ledger fail.
    pub(crate) fn audit(&mut self) -> WalletResult<AuditReport> {
        let anchors = match &self.anchor {
            Some(a) => Some(Anchors::read(
                &a.cfg,
                self.mac.as_ref(),
                self.clock.now_ms(),
            )?),
            None => None,
        };
        Ok(self.scan(anchors)?.0)
    }

    /// The audit of one snapshot, and the chain head it ended at.
    fn scan(&mut self, anchors: Option<Anchors>) -> WalletResult<(AuditReport, (i64, [u8; 32]))> {
        let mut a = Audit::new(self.mac.as_ref(), self.known, anchors);
        self.store.scan(&mut |s| match s {
            Scanned::Entry(e) => a.entry(e),
            Scanned::Account(user, currency, stored) => {
                a.account(user, currency, stored);
                Ok(())
            }
        })?;
        Ok(a.finish())
    }

    /// `keybroker restore`: audits the chain as it is (anchors aside: they
    /// are what a restore overrides), and if it verifies, appends a
    /// restore record pinning its head and superseding every record
    /// before. From then on this writer appends to that head.
    pub(crate) fn restore(&mut self, reason: &str) -> WalletResult<Restored> {
        check_text("restore reason", reason, MAX_REASON, false)?;
        if self.anchor.as_ref().is_none_or(|a| a.file.is_none()) {
            return Err(WalletError::storage(
                "no anchor file open for writing: nothing to record the restore in",
            ));
        }
        // The chain's own audit: the writer's memory of a longer chain
        // (`known`) is what is being overridden, so it is left out.
        let known = self.known;
        self.known = (0, GENESIS);
        let scanned = self.scan(None);
        self.known = known;
        let (audit, head) = scanned?;
        let Some(a) = self.anchor.as_mut() else {
            unreachable!("checked above")
        };
        if !audit.ok {
            return Ok(Restored {
                audit,
                record: None,
                superseded: a.last.clone(),
            });
        }
        let (superseded, record) =
            a.append(self.mac.as_ref(), Some(reason), head, self.clock.now_ms())?;
        self.known = head;
        self.refuse = None;
        Ok(Restored {
            audit,
            record,
            superseded,
        })
    }
}

/// What the anchor sources say the ledger must hold.
struct Anchors {
    pins: Vec<(Pin, bool)>,
    records: u64,
    problems: Vec<String>,
    notes: Vec<String>,
    file: String,
    file_exists: bool,
    /// Entries older than this (ms since the epoch) should be anchored.
    due_before_ms: i64,
    /// This writer anchors (and anchored before the audit): no other
    /// writer can have entries in flight, unanchored, on this file.
    strict: bool,
}

impl Anchors {
    /// Slack beyond the interval for a writer that is slow to anchor (an
    /// fsync, an HSM operation, a group in progress).
    const GRACE_MS: i64 = 5_000;

    fn read(cfg: &AnchorConfig, mac: &dyn ChainMac, now_ms: i64) -> WalletResult<Self> {
        let (sources, file_exists) = anchor::check_all(cfg, mac)?;
        let mut a = Self {
            pins: Vec::new(),
            records: 0,
            problems: Vec::new(),
            notes: Vec::new(),
            file: cfg.path.display().to_string(),
            file_exists,
            due_before_ms: now_ms
                - i64::try_from(cfg.interval.as_millis()).unwrap_or(i64::MAX / 2)
                - Self::GRACE_MS,
            strict: cfg.write,
        };
        for s in sources {
            a.records += s.records;
            a.problems.extend(s.problems);
            a.notes.extend(s.notes);
            a.pins.extend(s.pin.map(|p| (p, false)));
        }
        Ok(a)
    }

    /// The highest anchored seq.
    fn top(&self) -> i64 {
        self.pins.iter().map(|(p, _)| p.head.seq).max().unwrap_or(0)
    }
}

/// The audit's running state: the chain so far and the balances the
/// entries give.
struct Audit<'m> {
    mac: &'m dyn ChainMac,
    /// The newest head this writer knows: it must be in the chain.
    written: (i64, [u8; 32]),
    written_seen: bool,
    problems: Vec<String>,
    balances: BTreeMap<(String, String), i64>,
    prev: [u8; 32],
    expect: i64,
    count: u64,
    /// The last entry's seq.
    last_seq: i64,
    anchors: Option<Anchors>,
    /// The first entry after every anchored seq: (seq, created_ms).
    unanchored: Option<(i64, i64)>,
}

impl<'m> Audit<'m> {
    const MAX_PROBLEMS: usize = 100;

    fn new(mac: &'m dyn ChainMac, written: (i64, [u8; 32]), anchors: Option<Anchors>) -> Self {
        // A head the anchors pin already is checked there, with a better
        // message.
        let pinned = anchors.as_ref().is_some_and(|a| {
            a.pins
                .iter()
                .any(|(p, _)| (p.head.seq, p.head.mac) == written)
        });
        Self {
            mac,
            written,
            written_seen: written.0 == 0 || pinned,
            problems: Vec::new(),
            balances: BTreeMap::new(),
            prev: GENESIS,
            expect: 1,
            count: 0,
            last_seq: 0,
            anchors,
            unanchored: None,
        }
    }

    /// Checks `e` against every pinned head at its seq.
    fn pinned(&mut self, e: &Entry) {
        let Some(a) = self.anchors.as_mut() else {
            return;
        };
        let mut found = Vec::new();
        for (p, seen) in &mut a.pins {
            if p.head.seq == e.seq {
                *seen = true;
                if p.head.mac != e.mac {
                    found.push(format!(
                        "entry {} is not the entry anchored at {} ({}): the ledger was rolled back and rewritten after it",
                        e.seq,
                        utc(p.t_ms),
                        p.at
                    ));
                }
            }
        }
        if self.unanchored.is_none() && e.seq > a.top() {
            self.unanchored = Some((e.seq, e.created_ms));
        }
        for p in found {
            self.note(p);
        }
    }

    /// The anchors' findings once every entry is seen: a pinned head the
    /// ledger lacks is the gap that truncation or a rollback leaves.
    fn finish_anchors(&mut self) -> (u64, Vec<String>) {
        let Some(mut a) = self.anchors.take() else {
            return (0, Vec::new());
        };
        for p in std::mem::take(&mut a.problems) {
            self.note(p);
        }
        let last = self.last_seq;
        for (p, seen) in &a.pins {
            if !seen && p.head.seq > last {
                self.note(format!(
                    "the ledger ends at entry {last}, but entry {} was anchored at {} ({}): entries {}..={} are missing; its tail was removed or an older copy restored (if a backup was put back on purpose, run `keybroker restore --reason`)",
                    p.head.seq,
                    utc(p.t_ms),
                    p.at,
                    last + 1,
                    p.head.seq
                ));
            }
        }
        if let Some((seq, created)) = self.unanchored {
            let what = format!(
                "entries {seq}..={last} (the first of {}) are not anchored",
                utc(created)
            );
            let due = created < a.due_before_ms;
            if a.pins.is_empty() && (a.strict || due) {
                self.note(format!(
                    "{what}, and {} holds no anchor: it was {}, or the writer stopped before its first anchor; once you know which, `keybroker restore --reason` starts the anchors from this head",
                    a.file,
                    if a.file_exists { "emptied or replaced" } else { "removed" }
                ));
            } else if due {
                a.notes.push(format!(
                    "{what} yet: the writer stopped before anchoring them (starting it anchors them), or the newest records of the anchor file were removed"
                ));
            }
        }
        (a.records, a.notes)
    }

    fn note(&mut self, p: String) {
        if self.problems.len() < Self::MAX_PROBLEMS {
            self.problems.push(p);
        } else if self.problems.len() == Self::MAX_PROBLEMS {
            self.problems.push("more problems not listed".into());
        }
    }

    fn entry(&mut self, e: Result<Entry, String>) -> WalletResult<()> {
        self.count += 1;
        let e = match e {
            Ok(e) => e,
            Err(p) => {
                self.note(p);
                return Ok(());
            }
        };
        if e.seq != self.expect {
            self.note(format!("entry {}: expected seq {}", e.seq, self.expect));
        }
        self.expect = e.seq.saturating_add(1);
        if e.prev_mac != self.prev {
            self.note(format!(
                "entry {}: prev_mac does not link to the entry before",
                e.seq
            ));
        }
        if entry_mac(self.mac, &e, &e.prev_mac)? != e.mac {
            self.note(format!("entry {}: MAC mismatch (entry altered)", e.seq));
        }
        if e.seq == self.written.0 && e.mac == self.written.1 {
            self.written_seen = true;
        }
        self.pinned(&e);
        self.prev = e.mac;
        self.last_seq = e.seq;
        if e.amount.minor <= 0 {
            self.note(format!("entry {}: non-positive amount", e.seq));
        }
        let bal = self
            .balances
            .entry((e.user.clone(), e.amount.currency.as_str().to_owned()))
            .or_insert(0);
        let next = match e.kind {
            EntryKind::Purchase => bal.checked_sub(e.amount.minor),
            EntryKind::Cancel | EntryKind::TopUp => bal.checked_add(e.amount.minor),
        };
        let mut found = Vec::new();
        match next {
            Some(n) => *bal = n,
            None => found.push(format!("entry {}: balance overflows", e.seq)),
        }
        if *bal < 0 {
            found.push(format!("entry {}: balance below zero", e.seq));
        }
        if *bal != e.balance_after {
            found.push(format!(
                "entry {}: balance_after {} but entries give {}",
                e.seq, e.balance_after, bal
            ));
        }
        for p in found {
            self.note(p);
        }
        Ok(())
    }

    fn account(&mut self, user: String, currency: String, stored: i64) {
        let computed = self
            .balances
            .remove(&(user.clone(), currency.clone()))
            .unwrap_or(0);
        if stored != computed {
            self.note(format!(
                "account {user}/{currency}: stored balance {stored}, entries give {computed}"
            ));
        }
    }

    fn finish(mut self) -> (AuditReport, (i64, [u8; 32])) {
        let (anchors, notes) = self.finish_anchors();
        if !self.written_seen {
            self.note(format!(
                "the chain lacks entry {} as this writer last saw it",
                self.written.0
            ));
        }
        for ((user, cur), bal) in std::mem::take(&mut self.balances) {
            if bal != 0 {
                self.note(format!("account {user}/{cur}: missing, entries give {bal}"));
            }
        }
        let report = AuditReport {
            entries: self.count,
            ok: self.problems.is_empty(),
            problems: self.problems,
            anchors,
            notes,
        };
        (report, (self.last_seq, self.prev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_ids_are_time_ordered_and_unique() {
        let t = 1_780_000_000_000;
        let first = new_decision_id(t);
        let ids: Vec<String> = (0..1000).map(|i| new_decision_id(t + 1 + i / 10)).collect();
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(check_id("decision", id).is_ok(), "{id}");
            assert!(*id > first, "{id} after {first}");
        }
        let unique: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        // The first 48 bits are the time in milliseconds.
        assert_eq!(i64::from_str_radix(&first[..12], 16).unwrap(), t);
    }
}
