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
        let init = std::sync::Arc::new(init);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for i in 0..threads {
            let rx = rx.clone();
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
                    while let Ok((queued, job)) = rx.recv() {
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
        Ok(Self { tx })
    }

    /// Runs `f` on a worker and awaits its result.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> R + Send + 'static,
    ) -> Result<R, PoolError> {
        let (otx, orx) = futures_channel::oneshot::channel();
        let job: Job<S> = Box::new(move |s| {
            let _ = otx.send(f(s));
        });
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
}
