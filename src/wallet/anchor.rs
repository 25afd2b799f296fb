//! Anchors: the ledger's head, MAC'd by the HSM and kept outside the
//! database, so that the audit catches a removed tail or an older copy of
//! the ledger, not only edits.
//!
//! ```text
//! writer: COMMIT ─► head moved, ≥ anchor_interval since the last anchor (or the timer fires)
//!           ─► Anchor { kind, t_ms, prev, heads: [(shard, seq, mac)] }
//!           ─► mac = C_Sign(SHA256_HMAC, kb-ledger-mac, canonical(anchor)) in the HSM
//!           ─► one JSON line appended to wallet.anchor_file (O_APPEND, fsync)
//!           ─► the same line as an audit log line (journald under systemd)
//! audit:  every record's MAC and link ─► the newest live head of each source
//!           ─► the ledger must hold that entry with that MAC (else: the gap, named)
//! restore: a deliberate `keybroker restore --reason`: a restore record
//!           supersedes every record before it and pins the restored head
//! ```
//!
//! The chain makes every entry depend on all before it, so one pinned
//! `(seq, mac)` fixes the whole history up to `seq`: a ledger that lacks
//! the entry, or carries another MAC there, lost or rewrote entries.
//!
//! `heads` is a list of `(shard, seq, mac)` so that one record can bind
//! every shard's head once the ledger has a chain per shard (issue 25);
//! today there is one chain, shard 0.
//!
//! Security: the anchor MAC is made by the HSM on every record, with the
//! ledger's own key, never with a key held in memory. Its input starts with
//! a length-prefixed domain label (first byte 0x00), so it can never equal
//! a day-key derivation input (which starts with `keybroker ledger day
//! key`); entries are MAC'd with the day keys, other keys. Who can write the
//! database or the anchor file but cannot use the token can delete records
//! or the whole file, but cannot make one. docs/DECISIONS.md, "Ledger
//! anchors", has the rest of the argument; docs/OPERATIONS.md states the
//! window and the threat model.

use super::chain::{GENESIS, put_str};
use super::{ChainMac, WalletError, WalletResult, check_text};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

const DOMAIN: &[u8] = b"keybroker ledger anchor v1";

/// Most heads one record binds (shards).
pub const MAX_HEADS: usize = 1024;
/// Longest reason of a restore record.
pub const MAX_REASON: usize = 200;
/// Longest record line: 1024 heads of about 100 bytes, and the rest.
const MAX_LINE: usize = 128 * 1024;
/// How far back from the end the writer looks for the newest record.
const TAIL: u64 = 2 * MAX_LINE as u64;

/// One chain's head: the last entry's seq and MAC (seq 0 and
/// [`GENESIS`] for an empty chain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub shard: u32,
    pub seq: i64,
    pub mac: [u8; 32],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnchorKind {
    /// The writer's periodic record of the committed head.
    Head,
    /// An operator's `keybroker restore`: the heads are the restored
    /// ledger's, `supersedes` the newest heads anchored before.
    Restore {
        reason: String,
        supersedes: Vec<Head>,
    },
}

/// One record of the anchor file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub kind: AnchorKind,
    /// When it was made, ms since the epoch.
    pub t_ms: i64,
    /// The MAC of the record before it in the same file ([`GENESIS`] for
    /// the first): removing or reordering records breaks the links.
    pub prev: [u8; 32],
    /// Sorted by shard, one per shard.
    pub heads: Vec<Head>,
    pub mac: [u8; 32],
}

fn put_heads(out: &mut Vec<u8>, heads: &[Head]) {
    out.extend_from_slice(&(heads.len() as u32).to_be_bytes());
    for h in heads {
        out.extend_from_slice(&h.shard.to_be_bytes());
        out.extend_from_slice(&h.seq.to_be_bytes());
        out.extend_from_slice(&h.mac);
    }
}

impl Anchor {
    /// Builds and MACs a record. `heads` must be sorted by shard, unique.
    pub fn seal(
        m: &dyn ChainMac,
        kind: AnchorKind,
        t_ms: i64,
        prev: [u8; 32],
        heads: Vec<Head>,
    ) -> WalletResult<Self> {
        let mut a = Self {
            kind,
            t_ms,
            prev,
            heads,
            mac: GENESIS,
        };
        a.check().map_err(|_| WalletError::InvalidInput("anchor"))?;
        a.mac = m.anchor_mac(&a.mac_input())?;
        Ok(a)
    }

    /// What the MAC covers: the domain label, then every field in a fixed
    /// order, integers big-endian, lists and strings length-prefixed. A
    /// head record has an empty `supersedes` and reason.
    pub fn mac_input(&self) -> Vec<u8> {
        let (kind, reason, supersedes): (u8, &str, &[Head]) = match &self.kind {
            AnchorKind::Head => (1, "", &[]),
            AnchorKind::Restore { reason, supersedes } => (2, reason, supersedes),
        };
        let mut out = Vec::with_capacity(
            96 + DOMAIN.len() + reason.len() + 44 * (self.heads.len() + supersedes.len()),
        );
        put_str(&mut out, DOMAIN);
        out.push(kind);
        out.extend_from_slice(&self.t_ms.to_be_bytes());
        out.extend_from_slice(&self.prev);
        put_heads(&mut out, &self.heads);
        put_heads(&mut out, supersedes);
        put_str(&mut out, reason.as_bytes());
        out
    }

    pub fn verify(&self, m: &dyn ChainMac) -> WalletResult<bool> {
        Ok(m.anchor_mac(&self.mac_input())? == self.mac)
    }

    /// The head of `shard`, if the record binds it.
    pub fn head(&self, shard: u32) -> Option<Head> {
        self.heads.iter().find(|h| h.shard == shard).copied()
    }

    fn check(&self) -> Result<(), String> {
        let sorted = |hs: &[Head]| {
            hs.len() <= MAX_HEADS
                && hs.iter().all(|h| h.seq >= 0)
                && hs.windows(2).all(|w| w[0].shard < w[1].shard)
        };
        if self.heads.is_empty() || !sorted(&self.heads) {
            return Err("heads must be 1 to 1024, sorted by shard, seq >= 0".into());
        }
        if let AnchorKind::Restore { reason, supersedes } = &self.kind {
            if !sorted(supersedes) {
                return Err("supersedes must be sorted by shard".into());
            }
            check_text("restore reason", reason, MAX_REASON, false)
                .map_err(|_| "the reason must be 1 to 200 printable ASCII characters")?;
        }
        Ok(())
    }

    /// The record as one line of JSON (no newline). The key `kb_anchor`
    /// comes first, so the record can be found inside a log line.
    pub fn to_line(&self) -> String {
        let (kind, reason, supersedes) = match &self.kind {
            AnchorKind::Head => ("head", None, None),
            AnchorKind::Restore { reason, supersedes } => (
                "restore",
                Some(reason.clone()),
                Some(supersedes.iter().map(WireHead::from).collect()),
            ),
        };
        let w = Wire {
            kb_anchor: 1,
            kind: kind.into(),
            t_ms: self.t_ms,
            prev: hex::encode(self.prev),
            heads: self.heads.iter().map(WireHead::from).collect(),
            reason,
            supersedes,
            mac: hex::encode(self.mac),
        };
        // A struct of strings and integers always serialises.
        serde_json::to_string(&w).unwrap_or_default()
    }

    /// Parses a record line (checks its form, not its MAC).
    pub fn parse(line: &str) -> Result<Self, String> {
        if line.len() > MAX_LINE {
            return Err("longer than a record can be".into());
        }
        let w: Wire = serde_json::from_str(line).map_err(|e| e.to_string())?;
        Self::from_wire(w)
    }

    fn from_wire(w: Wire) -> Result<Self, String> {
        if w.kb_anchor != 1 {
            return Err(format!("unknown record version {}", w.kb_anchor));
        }
        let heads = |hs: Vec<WireHead>| -> Result<Vec<Head>, String> {
            hs.into_iter().map(Head::try_from).collect()
        };
        let kind = match (w.kind.as_str(), w.reason, w.supersedes) {
            ("head", None, None) => AnchorKind::Head,
            ("restore", Some(reason), Some(s)) => AnchorKind::Restore {
                reason,
                supersedes: heads(s)?,
            },
            (k, _, _) => return Err(format!("bad record of kind {k:?}")),
        };
        let a = Self {
            kind,
            t_ms: w.t_ms,
            prev: mac32(&w.prev)?,
            heads: heads(w.heads)?,
            mac: mac32(&w.mac)?,
        };
        a.check()?;
        Ok(a)
    }
}

/// The JSON form of a record.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    kb_anchor: u32,
    kind: String,
    t_ms: i64,
    prev: String,
    heads: Vec<WireHead>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    supersedes: Option<Vec<WireHead>>,
    mac: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireHead {
    shard: u32,
    seq: i64,
    mac: String,
}

impl From<&Head> for WireHead {
    fn from(h: &Head) -> Self {
        Self {
            shard: h.shard,
            seq: h.seq,
            mac: hex::encode(h.mac),
        }
    }
}

impl TryFrom<WireHead> for Head {
    type Error = String;
    fn try_from(w: WireHead) -> Result<Self, String> {
        Ok(Self {
            shard: w.shard,
            seq: w.seq,
            mac: mac32(&w.mac)?,
        })
    }
}

fn mac32(s: &str) -> Result<[u8; 32], String> {
    let v = hex::decode(s).map_err(|_| "a MAC is not hex".to_string())?;
    v.try_into().map_err(|_| "a MAC is not 32 bytes".into())
}

/// The record inside a log line: a text line whose last field is
/// `anchor={"kb_anchor":1,...}`, or a JSON log line (`--json-logs`) whose
/// `fields.anchor` holds the record as a string. `None`: no record there.
pub fn record_in_log_line(line: &str) -> Option<Result<Anchor, String>> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        if v.get("kb_anchor").is_some() {
            return Some(Anchor::parse(line));
        }
        let inner = v.pointer("/fields/anchor")?.as_str()?;
        return Some(Anchor::parse(inner));
    }
    let at = line.find("{\"kb_anchor\":")?;
    let mut it = serde_json::Deserializer::from_str(&line[at..]).into_iter::<Wire>();
    Some(match it.next()? {
        Ok(w) => Anchor::from_wire(w),
        Err(e) => Err(e.to_string()),
    })
}

/// A time as `2024-05-01T12:34:56.789Z` (UTC), for messages.
pub fn utc(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil from days (H. Hinnant), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

/// Where and how often a writer anchors, and what the audit reads.
#[derive(Clone, Debug)]
pub struct AnchorConfig {
    /// The append-only anchor file.
    pub path: PathBuf,
    /// Longest time a committed head stays unanchored while the writer
    /// runs. Default 1 s.
    pub interval: Duration,
    /// Whether this writer appends anchors (the broker) or only checks
    /// them (`keybroker wallet ...`, which must not take the file from a
    /// running broker).
    pub write: bool,
    /// Further places holding records that the audit checks too, e.g.
    /// the audit log (`journalctl -o cat -u keybroker > FILE`).
    pub logs: Vec<PathBuf>,
}

impl AnchorConfig {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            interval: Duration::from_millis(1000),
            write: true,
            logs: Vec::new(),
        }
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> WalletError {
    WalletError::Storage(super::Cause::of(
        format!("{what} {}: {e}", path.display()),
        e,
        false,
    ))
}

/// The anchor file, open for appending. Several writers may share one
/// (broker processes on one SQLite file, on one host): each append holds
/// an exclusive `flock` while it reads the newest record, links to it and
/// writes, so the records stay one linked sequence whose heads never go
/// back.
pub(crate) struct AnchorFile {
    file: File,
    path: PathBuf,
}

impl AnchorFile {
    /// Opens (creating, mode 0600) `path` for appending. `O_APPEND` only,
    /// never a truncation: a file made `chattr +a` works.
    pub(crate) fn open(path: &Path) -> WalletResult<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let existed = path.exists();
        let file = std::fs::OpenOptions::new()
            .append(true)
            .read(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io_err("opening the anchor file", path, e))?;
        if !existed {
            // The new name must survive a crash as well as the records.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io_err("syncing the directory of", path, e))?;
            }
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Under the file's lock: finds the newest record whose MAC verifies,
    /// lets `make` build the next one from it (or decline), and appends
    /// that as one line with one write(2), then fsyncs. Returns the newest
    /// record before, and the one written.
    pub(crate) fn append_with(
        &mut self,
        m: &dyn ChainMac,
        make: impl FnOnce(Option<&Anchor>) -> WalletResult<Option<Anchor>>,
    ) -> WalletResult<(Option<Anchor>, Option<Anchor>)> {
        use rustix::fs::{FlockOperation, flock};
        let path = &self.path;
        flock(&self.file, FlockOperation::LockExclusive)
            .map_err(|e| io_err("locking", path, e.into()))?;
        let r = (|| {
            let before = newest_in(&self.file, path, m)?;
            let Some(a) = make(before.as_ref())? else {
                return Ok((before, None));
            };
            let len = self
                .file
                .metadata()
                .map_err(|e| io_err("reading", path, e))?
                .len();
            let mut line = String::with_capacity(256);
            if len > 0
                && last_byte(&self.file, len).map_err(|e| io_err("reading", path, e))? != b'\n'
            {
                // A line torn by a crash stays a line of its own.
                line.push('\n');
            }
            line.push_str(&a.to_line());
            line.push('\n');
            (&self.file)
                .write_all(line.as_bytes())
                .and_then(|()| self.file.sync_data())
                .map_err(|e| io_err("appending to", path, e))?;
            Ok((before, Some(a)))
        })();
        let _ = flock(&self.file, FlockOperation::Unlock);
        r
    }
}

/// The lines of `r`, each cut at [`MAX_LINE`] bytes (the rest of a longer
/// line is skipped) and decoded lossily: a hostile file can neither
/// exhaust memory nor stop the audit with bytes that are not UTF-8.
fn bounded_lines(mut r: impl BufRead) -> impl Iterator<Item = std::io::Result<String>> {
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut line = Vec::new();
        loop {
            let buf = match r.fill_buf() {
                Ok(b) => b,
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
            };
            if buf.is_empty() {
                done = true;
                return (!line.is_empty()).then(|| Ok(String::from_utf8_lossy(&line).into_owned()));
            }
            let (used, end) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            let room = (MAX_LINE + 1).saturating_sub(line.len());
            line.extend_from_slice(&buf[..(used - usize::from(end)).min(room)]);
            r.consume(used);
            if end {
                return Some(Ok(String::from_utf8_lossy(&line).into_owned()));
            }
        }
    })
}

fn last_byte(f: &File, len: u64) -> std::io::Result<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, len - 1)?;
    Ok(b[0])
}

/// The newest record of `path` whose MAC verifies, if any.
pub(crate) fn newest(path: &Path, m: &dyn ChainMac) -> WalletResult<Option<Anchor>> {
    match File::open(path) {
        Ok(f) => newest_in(&f, path, m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("opening", path, e)),
    }
}

/// The newest record of `f` whose MAC verifies. Reads only the file's
/// end unless no valid record is there.
fn newest_in(f: &File, path: &Path, m: &dyn ChainMac) -> WalletResult<Option<Anchor>> {
    use std::os::unix::fs::FileExt;
    let err = |e| io_err("reading", path, e);
    let len = f.metadata().map_err(err)?.len();
    let start = len.saturating_sub(TAIL);
    let mut buf = vec![0u8; usize::try_from(len - start).unwrap_or(0)];
    f.read_exact_at(&mut buf, start).map_err(err)?;
    let tail: Vec<String> = bounded_lines(&buf[..])
        .skip(usize::from(start > 0))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    for line in tail.iter().rev() {
        if let Ok(a) = Anchor::parse(line)
            && a.verify(m)?
        {
            return Ok(Some(a));
        }
    }
    if start == 0 {
        return Ok(None);
    }
    let mut found = None;
    let whole = BufReader::new(File::open(path).map_err(|e| io_err("opening", path, e))?);
    for line in bounded_lines(whole) {
        if let Ok(a) = Anchor::parse(&line.map_err(err)?)
            && a.verify(m)?
        {
            found = Some(a);
        }
    }
    Ok(found)
}

/// The ledger entry a source says must exist.
#[derive(Clone, Debug)]
pub(crate) struct Pin {
    pub head: Head,
    pub t_ms: i64,
    /// `FILE line N`, for messages.
    pub at: String,
}

/// What one source of records showed.
pub(crate) struct SourceFindings {
    /// The newest live head of shard 0, if the source has one.
    pub pin: Option<Pin>,
    /// When the newest valid restore record of the source was made.
    pub restored_ms: Option<i64>,
    pub records: u64,
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

const MAX_LISTED: usize = 20;

fn push_bounded(v: &mut Vec<String>, s: String) {
    if v.len() < MAX_LISTED {
        v.push(s);
    } else if v.len() == MAX_LISTED {
        v.push("more not listed".into());
    }
}

/// Checks every record of one source, in order:
/// - a line that is not a record is noted (a write torn by a crash leaves
///   one; it gives an attacker nothing that deleting a line would not);
/// - a record whose MAC fails is a problem (forged or altered);
/// - in the anchor file (`strict`), each record must link to the one
///   before and no head may go back: records were removed or reordered;
///   a log may lose lines, so there these are not checked;
/// - a valid restore record supersedes everything before it: what was
///   found there becomes a note, and the restored head is the pin.
///
/// The pin is the live record with the highest seq.
pub(crate) fn check_source(
    name: &str,
    lines: &mut dyn Iterator<Item = std::io::Result<String>>,
    from_log: bool,
    m: &dyn ChainMac,
) -> WalletResult<SourceFindings> {
    let strict = !from_log;
    let mut f = SourceFindings {
        pin: None,
        restored_ms: None,
        records: 0,
        problems: Vec::new(),
        notes: Vec::new(),
    };
    // Problems since the newest restore record; they become notes if a
    // later restore record supersedes them.
    let mut open: Vec<String> = Vec::new();
    let mut last_mac: Option<[u8; 32]> = None;
    for (i, line) in lines.enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| {
            WalletError::Storage(super::Cause::of(format!("reading {name}: {e}"), e, false))
        })?;
        let parsed = if from_log {
            match record_in_log_line(&line) {
                None => continue,
                Some(r) => r,
            }
        } else {
            Anchor::parse(&line)
        };
        let a = match parsed {
            Ok(a) => a,
            Err(e) => {
                push_bounded(
                    &mut f.notes,
                    format!(
                        "{name} line {n}: not an anchor record ({e}); a write torn by a crash leaves one"
                    ),
                );
                continue;
            }
        };
        if !a.verify(m)? {
            push_bounded(
                &mut open,
                format!("{name} line {n}: the anchor's MAC does not verify (forged or altered)"),
            );
            continue;
        }
        f.records += 1;
        let at = format!("{name} line {n}");
        let Some(head) = a.head(0) else {
            push_bounded(&mut open, format!("{at}: binds no head of shard 0"));
            continue;
        };
        if let AnchorKind::Restore { reason, .. } = &a.kind {
            if !open.is_empty() {
                push_bounded(
                    &mut f.notes,
                    format!(
                        "{} finding(s) before {at} are superseded by the restore of {} ({reason:?})",
                        open.len(),
                        utc(a.t_ms)
                    ),
                );
                open.clear();
            }
            f.pin = Some(Pin {
                head,
                t_ms: a.t_ms,
                at,
            });
            f.restored_ms = Some(a.t_ms);
            last_mac = Some(a.mac);
            continue;
        }
        if strict && a.prev != last_mac.unwrap_or(GENESIS) {
            push_bounded(
                &mut open,
                format!(
                    "{at}: does not follow the record before it (records removed or reordered)"
                ),
            );
        }
        last_mac = Some(a.mac);
        match &f.pin {
            Some(p) if p.head.seq > head.seq => {
                if strict {
                    push_bounded(
                        &mut open,
                        format!(
                            "{at}: the anchored head went back from entry {} to {} without a restore record",
                            p.head.seq, head.seq
                        ),
                    );
                }
            }
            _ => {
                f.pin = Some(Pin {
                    head,
                    t_ms: a.t_ms,
                    at,
                })
            }
        }
    }
    f.problems = open;
    Ok(f)
}

/// Reads every source of `cfg` and checks it. A missing anchor file is
/// no problem by itself: the audit decides, from the ledger, whether
/// records should be there. A restore record supersedes the records made
/// before it in every source: a log does not see the restore that the
/// operator ran in a shell, and need not.
pub(crate) fn check_all(
    cfg: &AnchorConfig,
    m: &dyn ChainMac,
) -> WalletResult<(Vec<SourceFindings>, bool)> {
    let (mut sources, file_exists) = read_all(cfg, m)?;
    let restored = sources.iter().filter_map(|s| s.restored_ms).max();
    for s in &mut sources {
        if let (Some(r), Some(p)) = (restored, &s.pin)
            && p.t_ms < r
        {
            s.notes.push(format!(
                "{}: entry {} anchored at {} is superseded by the restore of {}",
                p.at,
                p.head.seq,
                utc(p.t_ms),
                utc(r)
            ));
            s.pin = None;
        }
    }
    Ok((sources, file_exists))
}

fn read_all(cfg: &AnchorConfig, m: &dyn ChainMac) -> WalletResult<(Vec<SourceFindings>, bool)> {
    let mut out = Vec::new();
    let mut file_exists = true;
    let sources = std::iter::once((&cfg.path, false)).chain(cfg.logs.iter().map(|p| (p, true)));
    for (path, from_log) in sources {
        let name = path.display().to_string();
        match File::open(path) {
            Ok(f) => {
                let mut lines = bounded_lines(BufReader::new(f));
                out.push(check_source(&name, &mut lines, from_log, m)?);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !from_log => {
                file_exists = false;
            }
            Err(e) => return Err(io_err("opening", path, e)),
        }
    }
    Ok((out, file_exists))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wallet::SoftChainMac;

    fn head(seq: i64, b: u8) -> Vec<Head> {
        vec![Head {
            shard: 0,
            seq,
            mac: [b; 32],
        }]
    }

    fn chain(m: &dyn ChainMac, seqs: &[i64]) -> Vec<Anchor> {
        let mut prev = GENESIS;
        seqs.iter()
            .map(|&s| {
                let a =
                    Anchor::seal(m, AnchorKind::Head, 1000 + s, prev, head(s, s as u8)).unwrap();
                prev = a.mac;
                a
            })
            .collect()
    }

    fn check(m: &dyn ChainMac, lines: &[String]) -> SourceFindings {
        let mut it = lines.iter().cloned().map(Ok);
        check_source("f", &mut it, false, m).unwrap()
    }

    #[test]
    fn records_round_trip_and_every_field_is_covered() {
        let m = SoftChainMac::new(b"k");
        let a = Anchor::seal(&m, AnchorKind::Head, 5, [7; 32], head(3, 9)).unwrap();
        assert_eq!(Anchor::parse(&a.to_line()).unwrap(), a);
        assert!(a.to_line().starts_with("{\"kb_anchor\":1,"));
        let r = Anchor::seal(
            &m,
            AnchorKind::Restore {
                reason: "backup of Monday".into(),
                supersedes: head(9, 1),
            },
            6,
            a.mac,
            head(3, 9),
        )
        .unwrap();
        assert_eq!(Anchor::parse(&r.to_line()).unwrap(), r);
        type Change = Box<dyn Fn(&mut Anchor)>;
        let changes: Vec<Change> = vec![
            Box::new(|a| a.t_ms += 1),
            Box::new(|a| a.prev[0] ^= 1),
            Box::new(|a| a.heads[0].seq += 1),
            Box::new(|a| a.heads[0].mac[5] ^= 1),
            Box::new(|a| a.heads[0].shard = 1),
            Box::new(|a| {
                a.kind = AnchorKind::Restore {
                    reason: "x".into(),
                    supersedes: vec![],
                }
            }),
        ];
        for (i, c) in changes.iter().enumerate() {
            let mut b = a.clone();
            c(&mut b);
            assert!(!b.verify(&m).unwrap(), "change {i}");
        }
        let mut b = r.clone();
        if let AnchorKind::Restore { reason, .. } = &mut b.kind {
            reason.push('!');
        }
        assert!(!b.verify(&m).unwrap());
        assert!(!a.verify(&SoftChainMac::new(b"other")).unwrap());
    }

    #[test]
    fn anchor_and_entry_inputs_never_meet() {
        // The day-key input starts with the label itself, an anchor's
        // with its length: 0x00, never 'k'.
        let m = SoftChainMac::new(b"k");
        let a = Anchor::seal(&m, AnchorKind::Head, 5, GENESIS, head(3, 9)).unwrap();
        assert_eq!(a.mac_input()[0], 0);
    }

    #[test]
    fn malformed_records_are_refused() {
        let m = SoftChainMac::new(b"k");
        let ok = Anchor::seal(&m, AnchorKind::Head, 5, GENESIS, head(3, 9))
            .unwrap()
            .to_line();
        for bad in [
            ok.replace("\"kb_anchor\":1", "\"kb_anchor\":2"),
            ok.replace("\"kind\":\"head\"", "\"kind\":\"restore\""),
            ok.replace("\"seq\":3", "\"seq\":-3"),
            ok.replace(
                "\"heads\":[{\"shard\":0,\"seq\":3,",
                "\"heads\":[],\"x\":[{\"shard\":0,\"seq\":3,",
            ),
            ok.replace("\"mac\":\"", "\"mac\":\"00"),
            ok[..ok.len() - 3].to_string(),
            format!("{ok}{ok}"),
        ] {
            assert!(Anchor::parse(&bad).is_err(), "{bad}");
        }
        // A reason that could break a mail header or a log line.
        assert!(
            Anchor::seal(
                &m,
                AnchorKind::Restore {
                    reason: "a\nb".into(),
                    supersedes: vec![]
                },
                5,
                GENESIS,
                head(3, 9)
            )
            .is_err()
        );
    }

    #[test]
    fn a_source_pins_its_newest_head_and_names_removed_records() {
        let m = SoftChainMac::new(b"k");
        let lines: Vec<String> = chain(&m, &[1, 4, 9]).iter().map(Anchor::to_line).collect();
        let f = check(&m, &lines);
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        assert_eq!((f.records, f.pin.unwrap().head.seq), (3, 9));
        // A record removed from the middle breaks the next one's link.
        let f = check(&m, &[lines[0].clone(), lines[2].clone()]);
        assert!(
            f.problems[0].contains("line 2: does not follow"),
            "{:?}",
            f.problems
        );
        // The first record removed: the new first does not start the file.
        assert!(!check(&m, &lines[1..]).problems.is_empty());
        // A torn line is a note; the records around it still link.
        let torn = vec![
            lines[0].clone(),
            lines[1][..20].to_string(),
            lines[1].clone(),
        ];
        let f = check(&m, &torn);
        assert!(f.problems.is_empty() && f.notes.len() == 1, "{:?}", f.notes);
        // A forged record (another key) is a problem, not a pin.
        let other = SoftChainMac::new(b"attacker");
        let forged = chain(&other, &[1, 4, 9, 20]);
        let mut with = lines.clone();
        with.push(forged[3].to_line());
        let f = check(&m, &with);
        assert_eq!(f.pin.unwrap().head.seq, 9);
        assert!(f.problems[0].contains("MAC does not verify"));
    }

    #[test]
    fn a_restore_record_supersedes_what_came_before() {
        let m = SoftChainMac::new(b"k");
        let recs = chain(&m, &[1, 4, 9]);
        let mut lines: Vec<String> = vec![recs[0].to_line(), recs[2].to_line()];
        let r = Anchor::seal(
            &m,
            AnchorKind::Restore {
                reason: "restored Monday's backup".into(),
                supersedes: recs[2].heads.clone(),
            },
            2000,
            recs[2].mac,
            head(4, 4),
        )
        .unwrap();
        lines.push(r.to_line());
        let f = check(&m, &lines);
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        assert!(
            f.notes[0].contains("superseded by the restore"),
            "{:?}",
            f.notes
        );
        assert_eq!(f.pin.unwrap().head.seq, 4);
        // After it, records link to it again and may not go back.
        let next = Anchor::seal(&m, AnchorKind::Head, 2001, r.mac, head(6, 6)).unwrap();
        let back = Anchor::seal(&m, AnchorKind::Head, 2002, next.mac, head(5, 5)).unwrap();
        lines.push(next.to_line());
        lines.push(back.to_line());
        let f = check(&m, &lines);
        assert!(
            f.problems[0].contains("went back from entry 6 to 5"),
            "{:?}",
            f.problems
        );
    }

    #[test]
    fn records_are_found_in_log_lines() {
        let m = SoftChainMac::new(b"k");
        let a = &chain(&m, &[7])[0];
        let text = format!(
            "2025-01-01T00:00:00.000000Z  INFO audit: ledger anchor anchor={}",
            a.to_line()
        );
        assert_eq!(record_in_log_line(&text).unwrap().unwrap(), *a);
        let json = serde_json::json!({
            "timestamp": "x", "level": "INFO",
            "fields": {"message": "ledger anchor", "anchor": a.to_line()},
            "target": "audit"
        })
        .to_string();
        assert_eq!(record_in_log_line(&json).unwrap().unwrap(), *a);
        assert!(record_in_log_line("INFO login user=alice").is_none());
        assert!(record_in_log_line("{\"fields\":{\"message\":\"login\"}}").is_none());
        // In a log, lost lines are no problem: no link is checked there.
        let recs = chain(&m, &[1, 4, 9]);
        let lines = [recs[0].to_line(), "noise".into(), recs[2].to_line()];
        let mut it = lines.iter().cloned().map(Ok);
        let f = check_source("log", &mut it, true, &m).unwrap();
        assert!(f.problems.is_empty() && f.notes.is_empty());
        assert_eq!(f.pin.unwrap().head.seq, 9);
    }

    #[test]
    fn utc_formats_civil_time() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
    }
}
