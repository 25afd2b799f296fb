//! The mailer: drains the ledger's outbox to an SMTP relay, or to a
//! Maildir when no relay is configured.
//!
//! ```text
//! ledger writer ──INSERT outbox (same transaction as the money)──► outbox (pending)
//! mailer thread ──every poll: rows with next_attempt_ms ≤ now──► transport
//!     accepted ──► UPDATE … state='sent': SMTP at once, per message;
//!                  Maildir per round, once one syncfs made its files durable
//!     refused  ──► attempts+1, next_attempt_ms = now + min·2^attempts (capped)
//! ```
//!
//! Delivery is at-least-once with a stable id: a row is marked sent only
//! after the transport accepted it, so a crash between the two sends it
//! again, with the same `Message-ID` (`<decision-…@keybroker>`,
//! `<cancel-…@keybroker>`, `<topup-…@keybroker>`), which lets the receiver
//! or the user recognise the duplicate. Nothing is lost: a pending row
//! stays pending across restarts and relay outages.
//!
//! The outbox is an [`Outbox`]: the SQLite file ([`Mailer::start`]) or a
//! PostgreSQL ledger ([`crate::wallet::pg::PgOutbox`], where the mailers
//! of several nodes claim rows so each goes out from one node).

use super::{WalletError, WalletResult, now_ms, schema, smtp};
use crossbeam_channel::{RecvTimeoutError, Sender, bounded};
use lettre::Message;
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use rusqlite::{Connection, params};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Why a message was not handed over. The outbox keeps it either way;
/// the kind says whether a later round can do better, and the error below
/// stays as the source.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("{which} address: {source}")]
    Address {
        which: &'static str,
        #[source]
        source: lettre::address::AddressError,
    },
    #[error("building the message: {0}")]
    Build(#[source] lettre::error::Error),
    #[error("the message is not 7-bit text")]
    NotText,
    #[error("SMTP {stage}: {source}")]
    Smtp {
        stage: &'static str,
        #[source]
        source: lettre::transport::smtp::Error,
    },
    #[error("Maildir {dir}: {source}")]
    Maildir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl MailError {
    /// Whether a later round may deliver the message: the relay was down
    /// or answered a transient 4xx, or the disk failed. An address the
    /// relay refuses for good (5xx), or a message that cannot be built,
    /// will not go better; it is still kept, backed off, for the operator.
    pub fn retryable(&self) -> bool {
        match self {
            MailError::Smtp { source, .. } => !source.is_permanent(),
            MailError::Maildir { .. } => true,
            MailError::Address { .. } | MailError::Build(_) | MailError::NotText => false,
        }
    }

    fn maildir(dir: &Path) -> impl Fn(std::io::Error) -> Self + Copy + '_ {
        move |source| MailError::Maildir {
            dir: dir.to_owned(),
            source,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Transport {
    /// Plain SMTP to a relay on loopback (no TLS: the relay is local).
    Smtp { host: String, port: u16 },
    /// A Maildir (`tmp/`, `new/`, `cur/`), created if missing.
    Maildir(PathBuf),
}

#[derive(Clone, Debug)]
pub struct MailerConfig {
    pub transport: Transport,
    /// The `From:` address.
    pub from: String,
    /// How often the outbox is looked at.
    pub poll: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Most rows taken per round.
    pub batch: usize,
    /// SMTP connect and command timeout.
    pub timeout: Duration,
}

impl MailerConfig {
    pub fn new(transport: Transport) -> Self {
        Self {
            transport,
            from: "keybroker <keybroker@localhost>".into(),
            poll: Duration::from_millis(250),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            batch: 64,
            timeout: Duration::from_secs(10),
        }
    }

    /// `min · 2^(attempts-1)`, at most `max`.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(20);
        self.backoff_min
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// A running mailer thread. Dropping it (or [`Mailer::stop`]) stops it
/// after the current round.
pub struct Mailer {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Mailer {
    /// Drains the outbox of the SQLite ledger at `db`.
    pub fn start(db: &Path, cfg: MailerConfig) -> WalletResult<Self> {
        let conn = schema::open(db)?;
        // A "sent" mark lost to a power cut (not to a crash: WAL keeps it)
        // only re-sends a message under its stable Message-ID; an fsync per
        // message would cost more than it protects.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(WalletError::from)?;
        Self::start_outbox(conn, cfg)
    }

    /// Drains the outbox of a running SQLite ledger (file `db`): the
    /// mailer reads on a connection of its own and the ledger's writer
    /// applies its marks.
    pub fn start_ledger(
        ledger: &std::sync::Arc<super::SqliteLedger>,
        db: &Path,
        cfg: MailerConfig,
    ) -> WalletResult<Self> {
        Self::start_outbox(ledger.outbox(schema::open(db)?), cfg)
    }

    /// Drains any outbox.
    pub fn start_outbox(mut outbox: impl Outbox, cfg: MailerConfig) -> WalletResult<Self> {
        let sender = Sender_::new(&cfg)?;
        let (stop_tx, stop_rx) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("mailer".into())
            .spawn(move || {
                loop {
                    loop {
                        match drain_once(&mut outbox, &sender, &cfg, now_ms()) {
                            Ok(n) if n >= cfg.batch => continue,
                            Ok(_) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "mailer round failed");
                                break;
                            }
                        }
                    }
                    match outbox.pending() {
                        Ok(n) => crate::metrics::mail_pending(n),
                        Err(e) => tracing::warn!(error = %e, "counting the outbox"),
                    }
                    match stop_rx.recv_timeout(cfg.poll) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            })
            .map_err(|e| WalletError::storage(format!("spawning the mailer: {e}")))?;
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.try_send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Mailer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How many mails wait in the outbox of the ledger at `db`.
pub fn outbox_pending(db: &Path) -> WalletResult<usize> {
    schema::open(db)?.pending()
}

/// One outbox row on its way out.
pub struct Outgoing {
    pub id: i64,
    pub message_id: String,
    pub to: String,
    pub subject: String,
    pub body: String,
    pub attempts: u32,
}

/// What the mailer changes on outbox rows.
#[derive(Clone, Debug)]
pub enum OutboxUpdate {
    /// The transport accepted these.
    Sent(Vec<i64>),
    /// The transport refused `failed` (one more attempt) and `rest` was not
    /// tried: all wait until `next`.
    Defer {
        failed: i64,
        rest: Vec<i64>,
        next: i64,
    },
}

/// Where the mailer finds its mail.
pub trait Outbox: Send + 'static {
    /// Pending rows due at `now`, longest due first, at most `limit`. In
    /// the order of the partial index on pending rows, so a round reads
    /// `limit` rows however many were ever sent (ordering by `id` alone
    /// scanned the whole table: 430 µs of CPU per mail with 100,000 rows).
    fn due(&mut self, now: i64, limit: usize) -> WalletResult<Vec<Outgoing>>;
    /// The transport accepted `ids`: marks them sent, in one transaction.
    fn mark_sent(&mut self, ids: &[i64]) -> WalletResult<()>;
    /// The transport refused `failed` (one more attempt) and `rest` was not
    /// tried: all wait until `next`.
    fn defer(&mut self, failed: i64, rest: &[i64], next: i64) -> WalletResult<()>;
    /// How many rows wait.
    fn pending(&mut self) -> WalletResult<usize>;
}

/// `u` in a transaction of its own, on a ledger file the mailer writes to
/// itself ([`Mailer::start`]).
fn update_own(c: &Connection, u: &OutboxUpdate) -> WalletResult<()> {
    let t = c.unchecked_transaction()?;
    super::sqlite::update_outbox(&t, u)?;
    t.commit()?;
    Ok(())
}

impl Outbox for Connection {
    fn due(&mut self, now: i64, limit: usize) -> WalletResult<Vec<Outgoing>> {
        let mut st = self.prepare_cached(
            "SELECT id, message_id, mail_to, subject, body, attempts FROM outbox
             WHERE state = 'pending' AND next_attempt_ms <= ?1
             ORDER BY next_attempt_ms, id LIMIT ?2",
        )?;
        let rows = st.query_map(
            params![now, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                Ok(Outgoing {
                    id: r.get(0)?,
                    message_id: r.get(1)?,
                    to: r.get(2)?,
                    subject: r.get(3)?,
                    body: r.get(4)?,
                    attempts: u32::try_from(r.get::<_, i64>(5)?).unwrap_or(u32::MAX),
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn mark_sent(&mut self, ids: &[i64]) -> WalletResult<()> {
        update_own(self, &OutboxUpdate::Sent(ids.to_vec()))
    }

    fn defer(&mut self, failed: i64, rest: &[i64], next: i64) -> WalletResult<()> {
        update_own(
            self,
            &OutboxUpdate::Defer {
                failed,
                rest: rest.to_vec(),
                next,
            },
        )
    }

    fn pending(&mut self) -> WalletResult<usize> {
        let n: i64 = self.query_row(
            "SELECT count(*) FROM outbox WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

/// The transport, built once.
enum Sender_ {
    Smtp {
        host: String,
        port: u16,
        timeout: Duration,
    },
    Maildir(PathBuf),
}

/// One round of deliveries: the SMTP session opens at the first message
/// and closes with the round.
struct Round<'a> {
    tx: &'a Sender_,
    session: Option<smtp::Session>,
    /// Maildir: rows written but not yet in `new/`, published by `finish`.
    staged: Vec<(i64, Staged)>,
}

/// A Maildir message written but not yet delivered.
struct Staged {
    name: String,
    /// An unnamed file (`O_TMPFILE` in `tmp/`), linked into `new/` at
    /// publication; `None`: a file named `tmp/<name>`, renamed instead.
    file: Option<std::fs::File>,
    /// Time spent writing it; its delivery time adds the round's publication.
    took: Duration,
}

static MAILDIR_SEQ: AtomicU64 = AtomicU64::new(0);

impl Sender_ {
    fn new(cfg: &MailerConfig) -> WalletResult<Self> {
        match &cfg.transport {
            Transport::Smtp { host, port } => Ok(Sender_::Smtp {
                host: host.clone(),
                port: *port,
                timeout: cfg.timeout,
            }),
            Transport::Maildir(dir) => {
                for sub in ["tmp", "new", "cur"] {
                    std::fs::create_dir_all(dir.join(sub)).map_err(|e| {
                        WalletError::storage(format!("creating {}: {e}", dir.display()))
                    })?;
                }
                Ok(Sender_::Maildir(dir.clone()))
            }
        }
    }

    fn round(&self) -> Round<'_> {
        Round {
            tx: self,
            session: None,
            staged: Vec::new(),
        }
    }
}

impl Round<'_> {
    /// Sends `m`: `Ok(true)` when the relay accepted it, `Ok(false)` when
    /// it is staged for [`Round::finish`].
    fn send(&mut self, from: &str, m: &Outgoing) -> Result<bool, MailError> {
        let from: Mailbox = from.parse().map_err(|source| MailError::Address {
            which: "From",
            source,
        })?;
        let to: Mailbox = m.to.parse().map_err(|source| MailError::Address {
            which: "To",
            source,
        })?;
        let msg = Message::builder()
            .from(from.clone())
            .to(to.clone())
            .subject(m.subject.clone())
            .message_id(Some(m.message_id.clone()))
            .header(ContentType::TEXT_PLAIN)
            .body(m.body.clone())
            .map_err(MailError::Build)?;
        match self.tx {
            Sender_::Smtp {
                host,
                port,
                timeout,
            } => {
                let session = match &mut self.session {
                    Some(s) => s,
                    None => self
                        .session
                        .insert(smtp::Session::connect(host, *port, *timeout)?),
                };
                let sent = session.send(&from.email, &to.email, &msg.formatted());
                if sent.is_err() {
                    self.session = None;
                }
                sent.map(|()| true)
            }
            Sender_::Maildir(dir) => {
                let started = std::time::Instant::now();
                let mut staged = stage_maildir(dir, &msg.formatted())?;
                staged.took = started.elapsed();
                self.staged.push((m.id, staged));
                Ok(false)
            }
        }
    }

    /// Ends the round; returns the staged rows now delivered.
    fn finish(self) -> Vec<i64> {
        if let Some(s) = self.session {
            s.quit();
        }
        let Sender_::Maildir(dir) = self.tx else {
            return Vec::new();
        };
        if self.staged.is_empty() {
            return Vec::new();
        }
        let started = std::time::Instant::now();
        let done = publish_maildir(dir, &self.staged).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "Maildir delivery failed; the round is retried");
            0
        });
        // A message is handed over once it is durable in new/: its own
        // write plus the round's one sync and link.
        let publish = started.elapsed();
        for (_, s) in &self.staged[..done] {
            crate::metrics::mail_delivered(s.took + publish);
        }
        for _ in done..self.staged.len() {
            crate::metrics::mail_failed();
        }
        self.staged[..done].iter().map(|(id, _)| *id).collect()
    }
}

/// Maildir delivery, first half: the message written, not yet synced.
/// It is an unnamed file in `tmp/` where the file system allows it: no
/// directory entry to create and remove again, and nothing left in `tmp/`
/// by a crash (about 40% of a Maildir message's kernel time was its `tmp/`
/// entry).
fn stage_maildir(dir: &Path, bytes: &[u8]) -> Result<Staged, MailError> {
    use rustix::fs::{Mode, OFlags};
    let now = crate::clock::now();
    let mut r = [0u8; 6];
    rand::fill(&mut r);
    let name = format!(
        "{}.M{}P{}Q{}R{}.keybroker",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        MAILDIR_SEQ.fetch_add(1, Ordering::Relaxed),
        hex::encode(r)
    );
    let io = MailError::maildir(dir);
    let tmp = dir.join("tmp");
    let anon = rustix::fs::open(
        &tmp,
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    );
    let Ok(fd) = anon else {
        // No O_TMPFILE on this file system: a named file in tmp/.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp.join(&name))
            .and_then(|mut f| f.write_all(bytes))
            .map_err(io)?;
        return Ok(Staged {
            name,
            file: None,
            took: Duration::ZERO,
        });
    };
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes).map_err(io)?;
    Ok(Staged {
        name,
        file: Some(f),
        took: Duration::ZERO,
    })
}

/// Maildir delivery, second half, for a whole round: one `syncfs` makes
/// every staged file durable (an fsync per message cost about 350 µs of
/// CPU each), then each is linked (or renamed) into `new/`, relative to
/// the directories' descriptors, and `new/` is synced. Returns how many
/// were delivered, in order.
fn publish_maildir(dir: &Path, staged: &[(i64, Staged)]) -> Result<usize, MailError> {
    use rustix::fs::{AtFlags, CWD, linkat, renameat};
    let io = MailError::maildir(dir);
    let tmp = std::fs::File::open(dir.join("tmp")).map_err(io)?;
    let new = std::fs::File::open(dir.join("new")).map_err(io)?;
    rustix::fs::syncfs(&tmp).map_err(|e| io(e.into()))?;
    for (i, (_, s)) in staged.iter().enumerate() {
        let done = match &s.file {
            // Linking an unnamed file by its /proc path needs no privilege
            // (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH).
            Some(f) => {
                use std::os::fd::AsRawFd;
                let proc_path = format!("/proc/self/fd/{}", f.as_raw_fd());
                linkat(
                    CWD,
                    proc_path.as_str(),
                    &new,
                    s.name.as_str(),
                    AtFlags::SYMLINK_FOLLOW,
                )
            }
            None => renameat(&tmp, s.name.as_str(), &new, s.name.as_str()),
        };
        if let Err(e) = done {
            tracing::warn!(error = %io(e.into()), "Maildir delivery stopped");
            return Ok(i);
        }
    }
    new.sync_all().map_err(io)?;
    Ok(staged.len())
}

/// One round: sends the due rows, marks the accepted ones sent and backs
/// off the rest. After a refusal the rest of the round is deferred too, so
/// a dead relay costs one attempt per round. Returns the rows looked at.
fn drain_once(
    c: &mut dyn Outbox,
    tx: &Sender_,
    cfg: &MailerConfig,
    now: i64,
) -> WalletResult<usize> {
    let due = c.due(now, cfg.batch)?;
    let mut round = tx.round();
    // Each message a relay accepted is marked at once, before the next one
    // goes, so a crash re-sends at most the one message in flight
    // (with the same Message-ID), not the whole round. Maildir messages
    // are marked once the round's files are durable: a crash in between
    // leaves them in the Maildir and queued, delivered again under the
    // same Message-ID.
    for (i, m) in due.iter().enumerate() {
        let started = std::time::Instant::now();
        match round.send(&cfg.from, m) {
            Ok(true) => {
                crate::metrics::mail_delivered(started.elapsed());
                if let Err(e) = c.mark_sent(&[m.id]) {
                    let _ = round.finish();
                    return Err(e);
                }
            }
            Ok(false) => {}
            Err(e) => {
                crate::metrics::mail_failed();
                let attempts = m.attempts.saturating_add(1);
                tracing::warn!(message_id = %m.message_id, attempts, error = %e, retry = e.retryable(), "mail not accepted");
                let delay = i64::try_from(cfg.backoff(attempts).as_millis()).unwrap_or(i64::MAX);
                let rest: Vec<i64> = due[i + 1..].iter().map(|m| m.id).collect();
                c.defer(m.id, &rest, now.saturating_add(delay))?;
                break;
            }
        }
    }
    let staged = round.finish();
    if !staged.is_empty() {
        c.mark_sent(&staged)?;
    }
    Ok(due.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let c = MailerConfig::new(Transport::Maildir(PathBuf::new()));
        assert_eq!(c.backoff(1), Duration::from_secs(1));
        assert_eq!(c.backoff(2), Duration::from_secs(2));
        assert_eq!(c.backoff(4), Duration::from_secs(8));
        assert_eq!(c.backoff(9), Duration::from_secs(256));
        assert_eq!(c.backoff(10), Duration::from_secs(300));
        assert_eq!(c.backoff(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn maildir_gets_each_pending_row_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("l.db");
        let mut c = schema::open(&db).unwrap();
        c.execute_batch(schema::SCHEMA).unwrap();
        for i in 0..3 {
            c.execute(
                "INSERT INTO outbox (message_id, user, mail_to, subject, body, state, attempts, next_attempt_ms, created_ms)
                 VALUES (?1, 'alice', 'alice@example.org', 's', 'b', 'pending', 0, 0, 0)",
                [format!("<m{i}@keybroker>")],
            )
            .unwrap();
        }
        let md = dir.path().join("Maildir");
        let cfg = MailerConfig::new(Transport::Maildir(md.clone()));
        let tx = Sender_::new(&cfg).unwrap();
        assert_eq!(drain_once(&mut c, &tx, &cfg, 1).unwrap(), 3);
        assert_eq!(drain_once(&mut c, &tx, &cfg, 2).unwrap(), 0);
        assert_eq!(outbox_pending(&db).unwrap(), 0);
        let files: Vec<_> = std::fs::read_dir(md.join("new")).unwrap().collect();
        assert_eq!(files.len(), 3);
        assert_eq!(std::fs::read_dir(md.join("tmp")).unwrap().count(), 0);
        let text = std::fs::read_to_string(files[0].as_ref().unwrap().path()).unwrap();
        assert!(text.contains("Message-ID: <m"), "{text}");
    }

    /// A relay that is not there is worth another round, and says which
    /// connect failed; an address that does not parse never is.
    #[test]
    fn a_dead_relay_is_retryable_and_a_bad_address_is_not() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let Err(e) = smtp::Session::connect("127.0.0.1", port, Duration::from_secs(1)) else {
            panic!("nothing listens there")
        };
        assert!(e.retryable(), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        let bad = "not an address"
            .parse::<Mailbox>()
            .map_err(|source| MailError::Address {
                which: "To",
                source,
            })
            .unwrap_err();
        assert!(!bad.retryable());
    }
}
