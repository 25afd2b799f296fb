//! Log lines reach their file through one writer thread that batches them
//! in time.
//!
//! ```text
//! core thread: format line ─► lock, append to the buffer, unlock (a wake only if it was empty)
//! log-writer:  wait for a line ─► linger LINGER ─► swap the buffer ─► one write(2)
//! ```
//!
//! tracing-appender's non-blocking writer, used before, hands each line
//! over a channel and writes whenever its queue runs empty. Under load that
//! is a futex wake from the core thread, a context switch of the writer and
//! a write(2) for almost every audit line: perf under the exchange bench put
//! 5% of the broker's CPU in it. Here a line costs the core thread a short
//! uncontended lock and a copy; the writer wakes once per batch.
//!
//! Nothing is dropped: above `CAP` queued bytes a logging thread waits for
//! the writer. A line is on its way to the file at most `LINGER` after it
//! was logged; [`Logs::flush`] (on SIGTERM and SIGINT) and dropping
//! [`Logs`] write out everything queued. A SIGKILL loses what is queued;
//! the ledger, not the log, is the durable record of money.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer collects lines after the first of a batch.
pub const LINGER: Duration = Duration::from_millis(5);
/// Queued bytes above which the writer stops lingering.
const HIGH: usize = 64 * 1024;
/// Queued bytes above which a logging thread waits.
const CAP: usize = 4 * 1024 * 1024;

struct Queue {
    buf: Vec<u8>,
    closed: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    /// Signalled when the queue becomes non-empty, passes `HIGH`, or closes.
    ready: Condvar,
    /// Signalled when the writer has taken the queue.
    drained: Condvar,
    /// The file; held while a batch is written, so batches keep their order.
    out: Mutex<Box<dyn Write + Send>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked while logging leaves whole lines behind.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Writes out whatever is queued now, in order with the writer thread.
    fn write_queued(&self, spare: &mut Vec<u8>) {
        let mut out = lock(&self.out);
        std::mem::swap(&mut lock(&self.queue).buf, spare);
        self.drained.notify_all();
        if !spare.is_empty() {
            // Nowhere to report a failing log file; the lines are gone.
            let _ = out.write_all(spare).and_then(|()| out.flush());
            spare.clear();
        }
    }

    fn run(&self) {
        let mut spare = Vec::with_capacity(HIGH);
        loop {
            let mut q = lock(&self.queue);
            while q.buf.is_empty() && !q.closed {
                q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.buf.is_empty() {
                return;
            }
            if !q.closed && q.buf.len() < HIGH {
                q = self
                    .ready
                    .wait_timeout(q, LINGER)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            drop(q);
            self.write_queued(&mut spare);
        }
    }
}

/// The `MakeWriter` handed to tracing-subscriber.
#[derive(Clone)]
pub struct Batched(Arc<Inner>);

/// The writer thread; dropping it writes out the queue and stops it.
pub struct Logs {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the `log-writer` thread over `out`.
pub fn start(out: impl Write + Send + 'static) -> io::Result<(Batched, Logs)> {
    let inner = Arc::new(Inner {
        queue: Mutex::new(Queue {
            buf: Vec::with_capacity(HIGH),
            closed: false,
        }),
        ready: Condvar::new(),
        drained: Condvar::new(),
        out: Mutex::new(Box::new(out)),
    });
    let worker = inner.clone();
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || worker.run())?;
    Ok((
        Batched(inner.clone()),
        Logs {
            inner,
            thread: Some(thread),
        },
    ))
}

impl Logs {
    /// Writes out every line queued so far, from any thread.
    pub fn flush(&self) {
        self.inner.write_queued(&mut Vec::new());
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        lock(&self.inner.queue).closed = true;
        self.inner.ready.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.flush();
    }
}

/// One event's writer. tracing-subscriber formats a whole line and hands it
/// over in one `write_all`, so a line is appended whole.
pub struct LineWriter<'a>(&'a Inner);

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let inner = self.0;
        let mut q = lock(&inner.queue);
        while q.buf.len() >= CAP && !q.closed {
            q = inner.drained.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.closed {
            // After the writer stopped (process exit): write through.
            drop(q);
            let mut out = lock(&inner.out);
            out.write_all(line)?;
            out.flush()?;
            return Ok(line.len());
        }
        let before = q.buf.len();
        q.buf.extend_from_slice(line);
        let wake = before == 0 || (before < HIGH && q.buf.len() >= HIGH);
        drop(q);
        if wake {
            inner.ready.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Batched {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.0)
    }
}

/// Lets one log line of a cause through per interval and counts the ones
/// held back, so a cause that repeats (accept failing with EMFILE, a scan's
/// refused handshakes) writes a line an interval, not a line an event: the
/// 4.9 million identical warnings (498 MB in 15 s) of an accept loop out of
/// descriptors become one line a second, each with the count since the last.
///
/// ```text
/// static EMFILE: Throttle = Throttle::new(Duration::from_secs(1));
/// if let Some(suppressed) = EMFILE.pass() { tracing::warn!(suppressed, "accept failed"); }
/// ```
pub struct Throttle {
    every_ms: u64,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new(every: Duration) -> Self {
        Self {
            every_ms: every.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log now, saying `n` lines were held back since the last.
    pub fn pass(&self) -> Option<u64> {
        self.pass_at(crate::limits::mono_ms())
    }

    fn pass_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + self.every_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// A [`Throttle`] per key (a source address and a cause), for one thread.
/// At most `max` keys are followed; a line for a key beyond them goes
/// through `others`, one throttle for them all, so a scan from many
/// addresses is bounded too: at most `max` lines an interval plus one.
pub struct KeyedThrottle<K> {
    every_ms: u64,
    max: usize,
    keys: std::collections::HashMap<K, (u64, u64)>,
    others: Throttle,
}

impl<K: std::hash::Hash + Eq> KeyedThrottle<K> {
    pub fn new(every: Duration, max: usize) -> Self {
        Self {
            every_ms: every.as_millis() as u64,
            max,
            keys: std::collections::HashMap::new(),
            others: Throttle::new(every),
        }
    }

    /// As [`Throttle::pass`], for `key`.
    pub fn pass(&mut self, key: K, now_ms: u64) -> Option<u64> {
        if self.keys.len() >= self.max && !self.keys.contains_key(&key) {
            // Keys whose interval passed with nothing held back hold no state.
            self.keys
                .retain(|_, (next, held)| *next > now_ms || *held > 0);
            if self.keys.len() >= self.max {
                return self.others.pass_at(now_ms);
            }
        }
        let (next, held) = self.keys.entry(key).or_insert((0, 0));
        if now_ms >= *next {
            *next = now_ms + self.every_ms;
            return Some(std::mem::take(held));
        }
        *held += 1;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tracing_subscriber::fmt::MakeWriter;

    /// A file stand-in the test can read while the writer holds it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).clone()).unwrap()
        }
    }

    #[test]
    fn every_line_arrives_whole_and_in_order_per_thread() {
        let sink = Sink::default();
        let (w, logs) = start(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        // Longer than HIGH in total many times over, so the
                        // early wake and the cap both take part.
                        let line = format!("t{t} line {i} {}\n", "x".repeat(i % 300));
                        w.make_writer().write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(logs);
        let text = sink.text();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let mut f = line.split(' ');
            let t: usize = f.next().unwrap()[1..].parse().unwrap();
            assert_eq!(f.next(), Some("line"));
            let i: usize = f.next().unwrap().parse().unwrap();
            assert_eq!(i, next[t], "thread {t}: a line is missing or out of order");
            assert_eq!(f.next().unwrap().len(), i % 300, "a line was cut");
            next[t] += 1;
        }
        assert_eq!(next, [20_000; 4]);
    }

    #[test]
    fn a_line_is_written_within_the_linger_without_a_flush() {
        let sink = Sink::default();
        let (w, _logs) = start(sink.clone()).unwrap();
        w.make_writer().write_all(b"one line\n").unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while !sink.text().contains("one line") {
            assert!(Instant::now() < until, "the line never reached the file");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn flush_writes_the_queue_at_once() {
        let sink = Sink::default();
        let (w, logs) = start(sink.clone()).unwrap();
        // Hold the file so the writer cannot take this line on its own.
        let held = lock(&logs.inner.out);
        w.make_writer().write_all(b"queued\n").unwrap();
        drop(held);
        logs.flush();
        assert_eq!(sink.text(), "queued\n");
    }

    #[test]
    fn a_throttle_passes_one_line_an_interval_with_the_count_held_back() {
        let t = Throttle::new(Duration::from_secs(1));
        assert_eq!(t.pass_at(10), Some(0));
        for ms in 11..1010 {
            assert_eq!(t.pass_at(ms), None);
        }
        assert_eq!(t.pass_at(1010), Some(999));
        assert_eq!(t.pass_at(1011), None);
    }

    #[test]
    fn keyed_throttles_are_apart_and_bounded() {
        let mut k = KeyedThrottle::new(Duration::from_secs(10), 2);
        assert_eq!(k.pass("a", 0), Some(0));
        assert_eq!(k.pass("b", 0), Some(0));
        assert_eq!(k.pass("a", 1), None);
        // A third key goes through the shared throttle of the others.
        assert_eq!(k.pass("c", 2), Some(0));
        assert_eq!(k.pass("d", 3), None);
        assert_eq!(k.pass("a", 10_000), Some(1));
        // Once b's interval passed with nothing held, its place is free.
        assert_eq!(k.pass("e", 20_001), Some(0));
    }
}
