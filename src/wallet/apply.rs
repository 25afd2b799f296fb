//! The writer's work: one group of requests in one transaction, and the
//! audit. Runs only on the ledger writer thread.
//!
//! ```text
//! run_group: BEGIN IMMEDIATE ─► for each request: checks (no writes) ─► writes
//!            ─► COMMIT ─► answers        (storage/MAC error: ROLLBACK, all get it)
//! append:    seq = head+1, prev_mac = head mac, mac = ChainMac(prev ‖ entry) ─► INSERT
//! ```

use super::chain::{GENESIS, entry_mac};
use super::ledger::Request;
use super::store::{NewMail, Scanned, Store};
use super::{
    Amount, AuditReport, CancelRequest, ChainMac, Currency, Decision, Entry, EntryKind, MAX_AMOUNT,
    PurchaseRequest, TopUpRequest, WalletError, WalletResult, check_id, check_mail, check_text,
    now_ms,
};
use std::collections::BTreeMap;

/// A decision id: 48 bits of milliseconds, then 80 random bits (the layout
/// of a UUIDv7), as 32 hex digits. Ids in time order land on the right edge
/// of the `decisions` B-tree and of the outbox's `message_id` index, so a
/// group commit dirties a few pages there instead of one random page per
/// purchase in each (every dirty page is a 4 KiB WAL frame).
fn new_decision_id() -> String {
    let mut b = [0u8; 16];
    let ms = u64::try_from(now_ms()).unwrap_or(0);
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
    /// The newest committed head this writer has seen (read or written).
    /// The chain may grow past it (other writers) but never lose it.
    known: (i64, [u8; 32]),
}

impl<S: Store> Writer<S> {
    pub(crate) fn new(
        store: S,
        mac: Box<dyn ChainMac>,
        currencies: Vec<Currency>,
    ) -> WalletResult<Self> {
        let mut w = Self {
            store,
            mac,
            currencies,
            head: (0, GENESIS),
            known: (0, GENESIS),
        };
        w.load_head()?;
        Ok(w)
    }

    /// Reads the chain head. A chain shorter than one already seen lost
    /// entries: appending to it would fork the history, so it is refused.
    fn load_head(&mut self) -> WalletResult<()> {
        let head = match self.store.head()? {
            None => (0, GENESIS),
            Some((seq, mac)) => (
                seq,
                mac.as_slice().try_into().map_err(|_| {
                    WalletError::Storage(format!("entry {seq}: MAC is not 32 bytes"))
                })?,
            ),
        };
        if head.0 < self.known.0 || (head.0 == self.known.0 && head.1 != self.known.1) {
            return Err(WalletError::Storage(format!(
                "the chain head went back from entry {} to {}: entries were removed; run the audit",
                self.known.0, head.0
            )));
        }
        self.head = head;
        self.known = head;
        Ok(())
    }

    /// Applies `group` in one transaction and answers every request.
    pub(crate) fn run_group(&mut self, group: &mut Vec<Request>) {
        let mut answers: Vec<Answer> = Vec::with_capacity(group.len());
        let mut audits = Vec::new();
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
        for reply in audits {
            reply.send(self.audit());
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
        check_text("idempotency key", &r.idempotency_key, 128, false)?;
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
        let id = new_decision_id();
        let now = now_ms();
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
            WalletError::Storage(format!("decision {}: bad currency", r.decision_id))
        })?;
        let after = self
            .store
            .balance_of(&r.user, &d.currency)?
            .checked_add(d.amount)
            .ok_or(WalletError::Overflow)?;
        let now = now_ms();
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
        let now = now_ms();
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
    /// entries, and compares with `accounts`. Reads one snapshot.
    pub(crate) fn audit(&mut self) -> WalletResult<AuditReport> {
        let mut a = Audit::new(self.mac.as_ref(), self.known);
        self.store.scan(&mut |s| match s {
            Scanned::Entry(e) => a.entry(e),
            Scanned::Account(user, currency, stored) => {
                a.account(user, currency, stored);
                Ok(())
            }
        })?;
        Ok(a.finish())
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
}

impl<'m> Audit<'m> {
    const MAX_PROBLEMS: usize = 100;

    fn new(mac: &'m dyn ChainMac, written: (i64, [u8; 32])) -> Self {
        Self {
            mac,
            written,
            written_seen: written.0 == 0,
            problems: Vec::new(),
            balances: BTreeMap::new(),
            prev: GENESIS,
            expect: 1,
            count: 0,
        }
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
        self.prev = e.mac;
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

    fn finish(mut self) -> AuditReport {
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
        AuditReport {
            entries: self.count,
            ok: self.problems.is_empty(),
            problems: self.problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_ids_are_time_ordered_and_unique() {
        let first = new_decision_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let ids: Vec<String> = (0..1000).map(|_| new_decision_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(check_id("decision", id).is_ok(), "{id}");
            assert!(*id > first, "{id} after {first}");
        }
        let unique: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        // The first 48 bits are the time in milliseconds.
        let ms = i64::from_str_radix(&first[..12], 16).unwrap();
        assert!((now_ms() - ms).abs() < 60_000);
    }
}
