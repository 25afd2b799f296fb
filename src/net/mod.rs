//! Networking helpers shared by the broker and the market: rustls over
//! compio, listeners, the descriptor limit, per-source limits.

pub mod cores;
pub mod fds;
pub mod listen;
pub mod proxy;
pub mod sources;
pub mod tls_io;

use compio::net::{TcpListener, TcpStream};
use futures_util::StreamExt;
use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

/// The first pause after an accept that failed for want of resources; it
/// doubles on each failure in a row, up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// Failed accepts: one line a second for the whole process, with a count.
static ACCEPT_FAILED: crate::logs::Throttle = crate::logs::Throttle::new(Duration::from_secs(1));

/// Whether an accept error means the process or the kernel is out of
/// descriptors or memory: retrying at once would fail the same way.
fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts connections (multishot accept) and serves each in its own task,
/// holding at most `max` at once on this core; over the limit a connection
/// is closed before any work is spent on it.
///
/// When accept fails for want of descriptors (EMFILE, ENFILE) or memory,
/// the loop pauses, 5 ms at first and doubling to 100 ms, as Go's net/http
/// does: the pending connections wait in the kernel's backlog instead of
/// the loop spinning on the same error (103% CPU and 4.9 million log lines
/// in 15 s before). Failures are logged once a second with a count.
pub async fn accept_loop<F, Fut>(listener: TcpListener, live: Rc<Cell<usize>>, max: usize, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let mut incoming = listener.incoming();
    let mut backoff = BACKOFF_MIN;
    while let Some(accepted) = incoming.next().await {
        let stream = match accepted {
            Ok(s) => {
                backoff = BACKOFF_MIN;
                s
            }
            Err(e) => {
                let pause = out_of_resources(&e);
                if let Some(suppressed) = ACCEPT_FAILED.pass() {
                    tracing::warn!(error = %e, suppressed, pause_ms = if pause { backoff.as_millis() as u64 } else { 0 }, "accept failed");
                }
                crate::metrics::accept_failed();
                if pause {
                    compio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                continue;
            }
        };
        if live.get() >= max {
            drop(stream);
            crate::metrics::refused_connection();
            continue;
        }
        live.set(live.get() + 1);
        let live = live.clone();
        // Boxed where it is made: a connection's future is several KiB,
        // and spawning moved it by value through four frames (perf under
        // `resume`: 40% of the core threads' memcpy). Now a pointer moves.
        let fut = Box::pin(serve(stream));
        compio::runtime::spawn(async move {
            fut.await;
            live.set(live.get() - 1);
        })
        .detach();
    }
}
