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
use super::{
    Amount, AuditReport, CancelRequest, ChainMac, Currency, Decision, Entry, EntryKind, MAX_AMOUNT,
    PurchaseRequest, TopUpRequest, WalletError, WalletResult, check_id, check_mail, check_text,
    now_ms,
};
use rusqlite::{Connection, OptionalExtension, Row, params};
use std::collections::BTreeMap;

pub(crate) const ENTRY_COLUMNS: &str = "seq, user, kind, decision_id, amount, currency, \
     balance_after, market, order_ref, idempotency_key, voucher_id, created_ms, prev_mac, mac";

/// Reads an entry; the inner error describes a row that cannot be one.
pub(crate) fn entry_from_row(r: &Row<'_>) -> rusqlite::Result<Result<Entry, String>> {
    let seq: i64 = r.get(0)?;
    let kind: String = r.get(2)?;
    let currency: String = r.get(5)?;
    let prev: Vec<u8> = r.get(12)?;
    let mac: Vec<u8> = r.get(13)?;
    let Some(kind) = EntryKind::parse(&kind) else {
        return Ok(Err(format!("entry {seq}: unknown kind {kind:?}")));
    };
    let Ok(currency) = Currency::new(&currency) else {
        return Ok(Err(format!("entry {seq}: bad currency {currency:?}")));
    };
    let (Ok(prev_mac), Ok(mac)) = (prev.as_slice().try_into(), mac.as_slice().try_into()) else {
        return Ok(Err(format!("entry {seq}: MAC is not 32 bytes")));
    };
    Ok(Ok(Entry {
        seq,
        user: r.get(1)?,
        kind,
        decision_id: r.get(3)?,
        amount: Amount {
            minor: r.get(4)?,
            currency,
        },
        balance_after: r.get(6)?,
        market: r.get(7)?,
        order_ref: r.get(8)?,
        idempotency_key: r.get(9)?,
        voucher_id: r.get(10)?,
        created_ms: r.get(11)?,
        prev_mac,
        mac,
    }))
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
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

pub(crate) struct Writer {
    conn: Connection,
    mac: Box<dyn ChainMac>,
    currencies: Vec<Currency>,
    /// Last committed (or, inside a group, last appended) seq and MAC.
    head: (i64, [u8; 32]),
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        mac: Box<dyn ChainMac>,
        currencies: Vec<Currency>,
    ) -> WalletResult<Self> {
        let mut w = Self {
            conn,
            mac,
            currencies,
            head: (0, GENESIS),
        };
        w.load_head()?;
        Ok(w)
    }

    fn load_head(&mut self) -> WalletResult<()> {
        let last: Option<(i64, Vec<u8>)> = self
            .conn
            .query_row(
                "SELECT seq, mac FROM entries ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        self.head = match last {
            None => (0, GENESIS),
            Some((seq, mac)) => (
                seq,
                mac.as_slice().try_into().map_err(|_| {
                    WalletError::Storage(format!("entry {seq}: MAC is not 32 bytes"))
                })?,
            ),
        };
        Ok(())
    }

    /// Applies `group` in one transaction and answers every request.
    pub(crate) fn run_group(&mut self, group: &mut Vec<Request>) {
        let mut answers: Vec<Answer> = Vec::with_capacity(group.len());
        let mut audits = Vec::new();
        // The head is re-read under the write lock: another writer (a second
        // process or node on the same ledger) may have appended since.
        let mut fatal = self
            .conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(WalletError::from)
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
            }
        }
        if fatal.is_none() && !answers.is_empty() {
            fatal = self
                .conn
                .execute_batch("COMMIT")
                .err()
                .map(WalletError::from);
        } else if fatal.is_none() {
            fatal = self
                .conn
                .execute_batch("ROLLBACK")
                .err()
                .map(WalletError::from);
        }
        if let Some(e) = &fatal {
            tracing::error!(error = %e, requests = answers.len(), "ledger group rolled back");
            let _ = self.conn.execute_batch("ROLLBACK");
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

    fn balance_of(&self, user: &str, currency: &str) -> WalletResult<i64> {
        let mut st = self
            .conn
            .prepare_cached("SELECT balance FROM accounts WHERE user = ?1 AND currency = ?2")?;
        Ok(st
            .query_row(params![user, currency], |r| r.get(0))
            .optional()?
            .unwrap_or(0))
    }

    fn set_balance(&self, user: &str, currency: &str, balance: i64) -> WalletResult<()> {
        let mut st = self.conn.prepare_cached(
            "INSERT INTO accounts (user, currency, balance) VALUES (?1, ?2, ?3)
             ON CONFLICT (user, currency) DO UPDATE SET balance = excluded.balance",
        )?;
        st.execute(params![user, currency, balance])?;
        Ok(())
    }

    /// Chains and inserts `e`; fills in its seq and MACs.
    fn append(&mut self, mut e: Entry) -> WalletResult<Entry> {
        e.seq = self.head.0 + 1;
        e.prev_mac = self.head.1;
        e.mac = entry_mac(self.mac.as_ref(), &e, &e.prev_mac)?;
        let mut st = self.conn.prepare_cached(&format!(
            "INSERT INTO entries ({ENTRY_COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
        ))?;
        st.execute(params![
            e.seq,
            e.user,
            e.kind.as_str(),
            e.decision_id,
            e.amount.minor,
            e.amount.currency.as_str(),
            e.balance_after,
            e.market,
            e.order_ref,
            e.idempotency_key,
            e.voucher_id,
            e.created_ms,
            &e.prev_mac[..],
            &e.mac[..],
        ])?;
        self.head = (e.seq, e.mac);
        Ok(e)
    }

    fn queue_mail(
        &self,
        message_id: &str,
        user: &str,
        to: &str,
        subject: &str,
        body: &str,
        now: i64,
    ) -> WalletResult<()> {
        let mut st = self.conn.prepare_cached(
            "INSERT INTO outbox (message_id, user, mail_to, subject, body, state, attempts, next_attempt_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, ?6)",
        )?;
        st.execute(params![message_id, user, to, subject, body, now])?;
        Ok(())
    }

    fn decision_by_key(&self, user: &str, key: &str) -> WalletResult<Option<Decision>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, seq, market, amount, currency, order_ref, balance_after, created_ms
             FROM decisions WHERE user = ?1 AND idempotency_key = ?2",
        )?;
        let row = st
            .query_row(params![user, key], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })
            .optional()?;
        let Some((id, seq, market, minor, cur, order_ref, balance_after, created_ms)) = row else {
            return Ok(None);
        };
        let currency = Currency::new(&cur)
            .map_err(|_| WalletError::Storage(format!("decision {id}: bad currency")))?;
        Ok(Some(Decision {
            id,
            seq,
            user: user.into(),
            market,
            amount: Amount { minor, currency },
            order_ref,
            balance_after,
            created_ms,
        }))
    }

    fn purchase(&mut self, r: &PurchaseRequest) -> WalletResult<Decision> {
        check_id("user", &r.user)?;
        check_id("market", &r.market)?;
        check_text("order reference", &r.order_ref, 128, true)?;
        check_text("idempotency key", &r.idempotency_key, 128, false)?;
        check_mail(&r.mail_to)?;
        self.check_amount(&r.amount)?;
        if let Some(d) = self.decision_by_key(&r.user, &r.idempotency_key)? {
            return Ok(d);
        }
        let cur = r.amount.currency.as_str();
        let after = self
            .balance_of(&r.user, cur)?
            .checked_sub(r.amount.minor)
            .ok_or(WalletError::Overflow)?;
        if after < 0 {
            return Err(WalletError::InsufficientFunds);
        }
        let id = random_id();
        let now = now_ms();
        self.set_balance(&r.user, cur, after)?;
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
        self.conn
            .prepare_cached(
                "INSERT INTO decisions (id, user, market, amount, currency, order_ref, idempotency_key, state, seq, balance_after, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'active', ?8, ?9, ?10)",
            )?
            .execute(params![
                id, r.user, r.market, r.amount.minor, cur, r.order_ref, r.idempotency_key, e.seq, after, now
            ])?;
        let after_a = Amount {
            minor: after,
            ..r.amount
        };
        self.queue_mail(
            &format!("<decision-{id}@keybroker>"),
            &r.user,
            &r.mail_to,
            &format!("keybroker: purchase of {} at {}", r.amount, r.market),
            &format!(
                "Your home card paid {} to market {}.\r\n\r\nDecision: {id}\r\nOrder: {}\r\nBalance now: {after_a}\r\nLedger entry: {}\r\n",
                r.amount, r.market, r.order_ref, e.seq
            ),
            now,
        )?;
        Ok(Decision {
            id,
            seq: e.seq,
            user: r.user.clone(),
            market: r.market.clone(),
            amount: r.amount,
            order_ref: r.order_ref.clone(),
            balance_after: after,
            created_ms: now,
        })
    }

    fn cancel(&mut self, r: &CancelRequest) -> WalletResult<Entry> {
        check_id("user", &r.user)?;
        check_text("decision id", &r.decision_id, 64, false)?;
        check_mail(&r.mail_to)?;
        let row: Option<(String, String, i64, String, String, String)> = self
            .conn
            .prepare_cached(
                "SELECT user, market, amount, currency, order_ref, state FROM decisions WHERE id = ?1",
            )?
            .query_row([&r.decision_id], |x| {
                Ok((x.get(0)?, x.get(1)?, x.get(2)?, x.get(3)?, x.get(4)?, x.get(5)?))
            })
            .optional()?;
        let Some((owner, market, minor, cur, order_ref, state)) = row else {
            return Err(WalletError::UnknownDecision);
        };
        if owner != r.user {
            return Err(WalletError::NotYourDecision);
        }
        if r.market.as_ref().is_some_and(|m| *m != market) {
            return Err(WalletError::BadAuthorisation);
        }
        if state != "active" {
            return Err(WalletError::AlreadyCancelled);
        }
        let currency = Currency::new(&cur).map_err(|_| {
            WalletError::Storage(format!("decision {}: bad currency", r.decision_id))
        })?;
        let after = self
            .balance_of(&r.user, &cur)?
            .checked_add(minor)
            .ok_or(WalletError::Overflow)?;
        let now = now_ms();
        self.conn
            .prepare_cached("UPDATE decisions SET state = 'cancelled' WHERE id = ?1")?
            .execute([&r.decision_id])?;
        self.set_balance(&r.user, &cur, after)?;
        let amount = Amount { minor, currency };
        let e = self.append(Entry {
            seq: 0,
            user: r.user.clone(),
            kind: EntryKind::Cancel,
            decision_id: r.decision_id.clone(),
            amount,
            balance_after: after,
            market: market.clone(),
            order_ref,
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
        self.queue_mail(
            &format!("<cancel-{}@keybroker>", r.decision_id),
            &r.user,
            &r.mail_to,
            &format!("keybroker: purchase at {market} cancelled, {amount} refunded"),
            &format!(
                "Market {market} cancelled decision {}.\r\n\r\nRefunded: {amount}\r\nBalance now: {after_a}\r\nLedger entry: {}\r\n",
                r.decision_id, e.seq
            ),
            now,
        )?;
        Ok(e)
    }

    fn top_up(&mut self, r: &TopUpRequest) -> WalletResult<Entry> {
        check_id("user", &r.user)?;
        check_text("voucher id", &r.voucher_id, 64, false)?;
        check_mail(&r.mail_to)?;
        self.check_amount(&r.amount)?;
        let used: Option<i64> = self
            .conn
            .prepare_cached("SELECT seq FROM vouchers_used WHERE voucher_id = ?1")?
            .query_row([&r.voucher_id], |x| x.get(0))
            .optional()?;
        if used.is_some() {
            return Err(WalletError::VoucherUsed);
        }
        let cur = r.amount.currency.as_str();
        let after = self
            .balance_of(&r.user, cur)?
            .checked_add(r.amount.minor)
            .ok_or(WalletError::Overflow)?;
        let now = now_ms();
        self.set_balance(&r.user, cur, after)?;
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
        self.conn
            .prepare_cached("INSERT INTO vouchers_used (voucher_id, seq) VALUES (?1, ?2)")?
            .execute(params![r.voucher_id, e.seq])?;
        let after_a = Amount {
            minor: after,
            ..r.amount
        };
        self.queue_mail(
            &format!("<topup-{}@keybroker>", r.voucher_id),
            &r.user,
            &r.mail_to,
            &format!("keybroker: top-up of {}", r.amount),
            &format!(
                "Your home card was credited {}.\r\n\r\nVoucher: {}\r\nBalance now: {after_a}\r\nLedger entry: {}\r\n",
                r.amount, r.voucher_id, e.seq
            ),
            now,
        )?;
        Ok(e)
    }

    /// Re-verifies every MAC and link, recomputes every balance from the
    /// entries, and compares with `accounts`. Reads one snapshot.
    pub(crate) fn audit(&self) -> WalletResult<AuditReport> {
        const MAX_PROBLEMS: usize = 100;
        let tx = self.conn.unchecked_transaction()?;
        let mut problems = Vec::new();
        let mut note = |p: String| {
            if problems.len() < MAX_PROBLEMS {
                problems.push(p);
            } else if problems.len() == MAX_PROBLEMS {
                problems.push("more problems not listed".into());
            }
        };
        let mut balances: BTreeMap<(String, String), i64> = BTreeMap::new();
        let mut prev = GENESIS;
        let mut expect = 1i64;
        let mut count = 0u64;
        {
            let mut st =
                tx.prepare(&format!("SELECT {ENTRY_COLUMNS} FROM entries ORDER BY seq"))?;
            let mut rows = st.query([])?;
            while let Some(row) = rows.next()? {
                count += 1;
                let e = match entry_from_row(row)? {
                    Ok(e) => e,
                    Err(p) => {
                        note(p);
                        continue;
                    }
                };
                if e.seq != expect {
                    note(format!("entry {}: expected seq {expect}", e.seq));
                }
                expect = e.seq.saturating_add(1);
                if e.prev_mac != prev {
                    note(format!(
                        "entry {}: prev_mac does not link to the entry before",
                        e.seq
                    ));
                }
                if entry_mac(self.mac.as_ref(), &e, &e.prev_mac)? != e.mac {
                    note(format!("entry {}: MAC mismatch (entry altered)", e.seq));
                }
                prev = e.mac;
                if e.amount.minor <= 0 {
                    note(format!("entry {}: non-positive amount", e.seq));
                }
                let bal = balances
                    .entry((e.user.clone(), e.amount.currency.as_str().to_owned()))
                    .or_insert(0);
                let next = match e.kind {
                    EntryKind::Purchase => bal.checked_sub(e.amount.minor),
                    EntryKind::Cancel | EntryKind::TopUp => bal.checked_add(e.amount.minor),
                };
                match next {
                    Some(n) => *bal = n,
                    None => note(format!("entry {}: balance overflows", e.seq)),
                }
                if *bal < 0 {
                    note(format!("entry {}: balance below zero", e.seq));
                }
                if *bal != e.balance_after {
                    note(format!(
                        "entry {}: balance_after {} but entries give {}",
                        e.seq, e.balance_after, bal
                    ));
                }
            }
        }
        if self.head.0 != 0 && (prev != self.head.1 || expect - 1 != self.head.0) {
            note(format!(
                "chain ends before the last written entry {}",
                self.head.0
            ));
        }
        {
            let mut st = tx.prepare("SELECT user, currency, balance FROM accounts")?;
            let mut rows = st.query([])?;
            while let Some(row) = rows.next()? {
                let key: (String, String) = (row.get(0)?, row.get(1)?);
                let stored: i64 = row.get(2)?;
                let computed = balances.remove(&key).unwrap_or(0);
                if stored != computed {
                    note(format!(
                        "account {}/{}: stored balance {stored}, entries give {computed}",
                        key.0, key.1
                    ));
                }
            }
        }
        for ((user, cur), bal) in balances {
            if bal != 0 {
                note(format!("account {user}/{cur}: missing, entries give {bal}"));
            }
        }
        tx.rollback()?;
        Ok(AuditReport {
            entries: count,
            ok: problems.is_empty(),
            problems,
        })
    }
}
