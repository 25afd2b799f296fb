//! Bounded pools of blocking worker threads, each owning its own state
//! (an HSM session, a database connection).
//!
//! ```text
//! core thread ──try_send(job)──► bounded crossbeam channel ──► worker (own state)
//!      ▲                                                          │
//!      └──────────────── oneshot reply ◄──────────────────────────┘
//! ```
//!
//! A full queue is refused at once with [`PoolError::Busy`]: nothing queues
//! without limit and a core thread never waits for a slot.

use crossbeam_channel::{Sender, TrySendError, bounded};
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;
use thiserror::Error;

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum PoolError {
    #[error("queue full")]
    Busy,
    #[error("worker gone")]
    Gone,
}

pub struct Pool<S> {
    tx: Sender<(Instant, Job<S>)>,
}

impl<S> Clone for Pool<S> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

/// Starts `threads` workers that take jobs from `next` until it returns
/// None; `init(i)` builds worker `i`'s state on its own thread. Fails if
/// any worker cannot start.
fn spawn_workers<S: 'static, E: Send + 'static>(
    name: &'static str,
    threads: usize,
    init: impl Fn(usize) -> Result<S, E> + Send + Sync + 'static,
    next: impl Fn() -> Option<(Instant, Job<S>)> + Clone + Send + 'static,
) -> Result<(), E> {
    let init = std::sync::Arc::new(init);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for i in 0..threads {
        let next = next.clone();
        let init = init.clone();
        let ready = ready_tx.clone();
        std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || {
                let mut state = match init(i) {
                    Ok(s) => {
                        let _ = ready.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                drop(ready);
                while let Some((queued, job)) = next() {
                    crate::metrics::pool_wait(name, queued.elapsed());
                    job(&mut state);
                }
            })
            .expect("spawning pool thread");
    }
    drop(ready_tx);
    for _ in 0..threads {
        if let Ok(Err(e)) = ready_rx.recv() {
            return Err(e);
        }
    }
    Ok(())
}

/// A job that sends `f`'s result to the returned receiver.
fn job<S, R: Send + 'static>(
    f: impl FnOnce(&mut S) -> R + Send + 'static,
) -> (Job<S>, futures_channel::oneshot::Receiver<R>) {
    let (otx, orx) = futures_channel::oneshot::channel();
    let job: Job<S> = Box::new(move |s| {
        let _ = otx.send(f(s));
    });
    (job, orx)
}

impl<S: 'static> Pool<S> {
    /// Starts `threads` workers; `init(i)` builds worker `i`'s state on its
    /// own thread. Fails if any worker cannot start.
    pub fn start<E: Send + 'static>(
        name: &'static str,
        threads: usize,
        queue: usize,
        init: impl Fn(usize) -> Result<S, E> + Send + Sync + 'static,
    ) -> Result<Self, E> {
        let (tx, rx) = bounded::<(Instant, Job<S>)>(queue);
        spawn_workers(name, threads, init, move || rx.recv().ok())?;
        Ok(Self { tx })
    }

    /// Runs `f` on a worker and awaits its result.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> R + Send + 'static,
    ) -> Result<R, PoolError> {
        let (job, orx) = job(f);
        match self.tx.try_send((Instant::now(), job)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(PoolError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(PoolError::Gone),
        }
        orx.await.map_err(|_| PoolError::Gone)
    }

    /// Queues `f` without waiting for it.
    pub fn submit(&self, f: impl FnOnce(&mut S) + Send + 'static) -> Result<(), PoolError> {
        self.tx
            .try_send((Instant::now(), Box::new(f)))
            .map_err(|e| match e {
                TrySendError::Full(_) => PoolError::Busy,
                TrySendError::Disconnected(_) => PoolError::Gone,
            })
    }
}

/// A pool whose queue is split by key (the auth pool: by terminal) and
/// whose workers take the keys in turn, one job each.
///
/// ```text
/// core ──run(key, job)──► queue of key (≤ per_key; all ≤ max) ──┐
///                        turn: key A ─► key B ─► key C ─► key A ◄┘ worker takes the next key's oldest job
/// ```
///
/// With one FIFO, a terminal looping logins on 32 connections filled the
/// queue and every other login waited behind its backlog (97 ms → 1,127 ms).
/// Now a job waits for at most one job of each other key with work queued,
/// and a key over `per_key` is refused `busy` at once while the others go
/// on. The lock is held to push or pop one job, never while a job runs.
pub struct FairPool<K, S> {
    handle: Arc<FairHandle<K, S>>,
}

impl<K, S> Clone for FairPool<K, S> {
    fn clone(&self) -> Self {
        Self {
            handle: self.handle.clone(),
        }
    }
}

/// Closes the queue when the last [`FairPool`] goes, so the workers end.
struct FairHandle<K, S>(Arc<FairQueue<K, S>>);

impl<K, S> Drop for FairHandle<K, S> {
    fn drop(&mut self) {
        lock(&self.0.turns).closed = true;
        self.0.ready.notify_all();
    }
}

struct FairQueue<K, S> {
    turns: Mutex<Turns<K, S>>,
    ready: Condvar,
    max: usize,
    per_key: usize,
}

struct Turns<K, S> {
    queues: HashMap<K, VecDeque<(Instant, Job<S>)>>,
    /// Keys with a job queued, in the order they are served.
    turn: VecDeque<K>,
    queued: usize,
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<K, S> FairQueue<K, S>
where
    K: Hash + Eq + Copy,
{
    fn push(&self, key: K, job: Job<S>) -> Result<(), PoolError> {
        let mut t = lock(&self.turns);
        if t.closed {
            return Err(PoolError::Gone);
        }
        if t.queued >= self.max {
            return Err(PoolError::Busy);
        }
        let q = t.queues.entry(key).or_default();
        if q.len() >= self.per_key {
            return Err(PoolError::Busy);
        }
        let first = q.is_empty();
        q.push_back((Instant::now(), job));
        if first {
            t.turn.push_back(key);
        }
        t.queued += 1;
        drop(t);
        self.ready.notify_one();
        Ok(())
    }

    fn next(&self) -> Option<(Instant, Job<S>)> {
        let mut t = lock(&self.turns);
        loop {
            if let Some(key) = t.turn.pop_front() {
                let q = t.queues.get_mut(&key).expect("a key in turn has a queue");
                let job = q.pop_front().expect("a key in turn has a job");
                if q.is_empty() {
                    t.queues.remove(&key);
                } else {
                    t.turn.push_back(key);
                }
                t.queued -= 1;
                return Some(job);
            }
            if t.closed {
                return None;
            }
            t = self.ready.wait(t).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl<K, S> FairPool<K, S>
where
    K: Hash + Eq + Copy + Send + 'static,
    S: 'static,
{
    /// As [`Pool::start`]; at most `max` jobs queued in all, `per_key` for
    /// one key.
    pub fn start<E: Send + 'static>(
        name: &'static str,
        threads: usize,
        max: usize,
        per_key: usize,
        init: impl Fn(usize) -> Result<S, E> + Send + Sync + 'static,
    ) -> Result<Self, E> {
        let q = Arc::new(FairQueue {
            turns: Mutex::new(Turns {
                queues: HashMap::new(),
                turn: VecDeque::new(),
                queued: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            max,
            per_key,
        });
        let worker = q.clone();
        spawn_workers(name, threads, init, move || worker.next())?;
        Ok(Self {
            handle: Arc::new(FairHandle(q)),
        })
    }

    /// Runs `f` on a worker in `key`'s turn and awaits its result.
    pub async fn run<R: Send + 'static>(
        &self,
        key: K,
        f: impl FnOnce(&mut S) -> R + Send + 'static,
    ) -> Result<R, PoolError> {
        let (job, orx) = job(f);
        self.handle.0.push(key, job)?;
        orx.await.map_err(|_| PoolError::Gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_jobs_on_worker_state_and_refuses_when_full() {
        let pool: Pool<u64> = Pool::start("t", 1, 1, |i| Ok::<_, ()>(i as u64 + 40)).unwrap();
        let (got_tx, got_rx) = crossbeam_channel::bounded(1);
        pool.submit(move |s| got_tx.send(*s + 2).unwrap()).unwrap();
        assert_eq!(got_rx.recv(), Ok(42));
        // Block the worker, fill the queue of one, then the next is Busy.
        let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
        let p = pool.clone();
        let (started_tx, started_rx) = crossbeam_channel::bounded(1);
        let _ = p.tx.try_send((
            Instant::now(),
            Box::new(move |_| {
                started_tx.send(()).unwrap();
                gate_rx.recv().unwrap();
            }),
        ));
        started_rx.recv().unwrap();
        let _ = p.tx.try_send((Instant::now(), Box::new(|_| {})));
        let busy = futures_util::FutureExt::now_or_never(p.run(|_| ()));
        assert_eq!(busy, Some(Err(PoolError::Busy)));
        gate_tx.send(()).unwrap();
    }

    #[test]
    fn init_failure_is_reported() {
        let r: Result<Pool<()>, &str> = Pool::start("t", 2, 1, |_| Err("no session"));
        assert_eq!(r.err(), Some("no session"));
    }

    #[test]
    fn a_fair_pool_serves_keys_in_turn_and_refuses_a_key_over_its_share() {
        let pool: FairPool<u8, Vec<u8>> =
            FairPool::start("t", 1, 16, 3, |_| Ok::<_, ()>(Vec::new())).unwrap();
        // Hold the only worker, then queue 3 jobs of key 1 and 1 of key 2.
        let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
        let (started_tx, started_rx) = crossbeam_channel::bounded(1);
        pool.handle
            .0
            .push(
                0,
                Box::new(move |_| {
                    started_tx.send(()).unwrap();
                    gate_rx.recv().unwrap();
                }),
            )
            .unwrap();
        started_rx.recv().unwrap();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        for key in [1u8, 1, 1, 2] {
            let done = done_tx.clone();
            pool.handle
                .0
                .push(
                    key,
                    Box::new(move |order: &mut Vec<u8>| {
                        order.push(key);
                        done.send(order.clone()).unwrap();
                    }),
                )
                .unwrap();
        }
        // Key 1 has its 3; a 4th is refused, key 2 is not.
        let busy = futures_util::FutureExt::now_or_never(pool.run(1, |_| ()));
        assert_eq!(busy, Some(Err(PoolError::Busy)));
        gate_tx.send(()).unwrap();
        let mut order = Vec::new();
        for _ in 0..4 {
            order = done_rx.recv().unwrap();
        }
        // Key 2 went second, not behind key 1's backlog.
        assert_eq!(order, vec![1, 2, 1, 1]);
    }
}
