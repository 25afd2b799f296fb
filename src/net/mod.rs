//! Networking helpers shared by the broker and the market: rustls over
//! compio, and listeners.

pub mod cores;
pub mod listen;
pub mod proxy;
pub mod tls_io;

use compio::net::{TcpListener, TcpStream};
use futures_util::StreamExt;
use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;

/// Accepts connections (multishot accept) and serves each in its own task,
/// holding at most `max` at once on this core; over the limit a connection
/// is closed before any work is spent on it.
pub async fn accept_loop<F, Fut>(listener: TcpListener, live: Rc<Cell<usize>>, max: usize, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let mut incoming = listener.incoming();
    while let Some(accepted) = incoming.next().await {
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
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
