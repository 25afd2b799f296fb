//! One core's accept loop and the life of one terminal connection.
//!
//! ```text
//! accept ─► TLS handshake (timeout) ─► X' = exporter ─► read frames (idle timeout)
//!        ─► AccessSession::handle ─► Action ─► auth pool / HSM pool ─► reply
//! ```

use super::auth::Which;
use super::{Shared, ms};
use crate::net::tls_io::TlsIo;
use crate::pool::PoolError;
use crate::proto::access::{Frame, FrameDecoder, Message, encode};
use crate::proto::session::{AccessSession, Action};
use crate::proto::{ErrorCode, XPRIME_LABEL, XPRIME_LEN};
use compio::net::{TcpListener, TcpStream};
use cryptoki::object::ObjectHandle;
use futures_util::StreamExt;
use rustls::ServerConnection;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use zeroize::Zeroizing;

struct Core {
    shared: Arc<Shared>,
    conns: Cell<usize>,
}

pub(super) fn run_core(
    index: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let rt = super::core_runtime()?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        let core = Rc::new(Core {
            shared,
            conns: Cell::new(0),
        });
        let max = core.shared.cfg.broker.max_connections_per_core;
        let mut incoming = listener.incoming();
        while let Some(accepted) = incoming.next().await {
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(core = index, error = %e, "accept failed");
                    continue;
                }
            };
            if core.conns.get() >= max {
                // Over the limit: close before any TLS work is spent.
                drop(stream);
                crate::metrics::refused_connection();
                continue;
            }
            core.conns.set(core.conns.get() + 1);
            let core = core.clone();
            compio::runtime::spawn(async move {
                serve(&core, stream).await;
                core.conns.set(core.conns.get() - 1);
            })
            .detach();
        }
        Ok(())
    })
}

/// A released home-card key, destroyed in the HSM when the session ends.
struct ReleasedKey {
    handle: ObjectHandle,
    shared: Arc<Shared>,
}

impl Drop for ReleasedKey {
    fn drop(&mut self) {
        let h = self.handle;
        if self
            .shared
            .hsm_pool
            .submit(move |w| {
                if let Err(e) = crate::hsm::ops::destroy(&w.session, h) {
                    tracing::warn!(error = %e, "destroying a released key failed");
                }
            })
            .is_err()
        {
            tracing::warn!("HSM queue full: a released key stays until its worker session closes");
        }
    }
}

struct Conn {
    io: TlsIo<ServerConnection>,
    out: Vec<u8>,
    fingerprint: [u8; 32],
    released: Option<ReleasedKey>,
}

impl Conn {
    async fn send(&mut self, frame: &Frame) -> bool {
        if let Message::Error { code, .. } = &frame.msg {
            crate::metrics::error(*code);
        }
        self.out.clear();
        encode(frame, &mut self.out);
        self.io.send(&self.out).await.is_ok()
    }
}

fn pool_code(e: PoolError) -> ErrorCode {
    match e {
        PoolError::Busy => ErrorCode::Busy,
        PoolError::Gone => ErrorCode::Internal,
    }
}

async fn serve(core: &Core, stream: TcpStream) {
    let shared = &core.shared;
    let cfg = &shared.cfg.broker;
    let conn = match ServerConnection::new(shared.tls.clone()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "TLS session setup failed");
            return;
        }
    };
    let mut io = TlsIo::new(stream, conn);
    match compio::time::timeout(ms(cfg.handshake_timeout_ms), io.handshake()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            return;
        }
    }
    let Some(fingerprint) = io
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| crate::pki::fingerprint(c))
    else {
        return; // rustls already required a client certificate
    };
    let mut xprime = Zeroizing::new([0u8; XPRIME_LEN]);
    if io
        .conn
        .export_keying_material(&mut *xprime, XPRIME_LABEL, None)
        .is_err()
    {
        return;
    }
    let confirm = crate::crypto::confirm(&*xprime);
    let mut session = AccessSession::new(confirm);
    let mut decoder = FrameDecoder::new(cfg.max_frame);
    let mut c = Conn {
        io,
        out: Vec::with_capacity(256),
        fingerprint,
        released: None,
    };
    let mut buf = vec![0u8; 4096];
    loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let action = session.handle(frame);
                    if !perform(shared, &mut session, &mut c, action).await {
                        c.io.close().await;
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let code = e.code();
                    c.send(&Frame {
                        id: 0,
                        msg: Message::error(code, e.to_string()),
                    })
                    .await;
                    c.io.close().await;
                    return;
                }
            }
        }
        let read = compio::time::timeout(ms(cfg.idle_timeout_ms), c.io.read_some(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => decoder.push(&buf[..n]),
            Err(_) => {
                c.send(&Frame {
                    id: 0,
                    msg: Message::error(ErrorCode::Timeout, "idle"),
                })
                .await;
                c.io.close().await;
                return;
            }
        }
    }
}

/// Carries out `action` and what follows from it. False: close.
async fn perform(
    shared: &Arc<Shared>,
    session: &mut AccessSession,
    c: &mut Conn,
    action: Action,
) -> bool {
    let mut next = Some(action);
    while let Some(action) = next.take() {
        match action {
            Action::Reply(f) => {
                if !c.send(&f).await {
                    return false;
                }
            }
            Action::Close(f) => {
                c.send(&f).await;
                return false;
            }
            Action::CheckLogin { id, user, password } => {
                let fp = c.fingerprint;
                let u = user.clone();
                let r = shared
                    .auth
                    .run(move |w| w.check(Which::Access, &fp, &u, &password).map(drop))
                    .await
                    .unwrap_or_else(|e| Err(pool_code(e)));
                if r.is_ok() {
                    tracing::info!(user, "login");
                }
                next = Some(session.login_done(id, user, r));
            }
            Action::CheckRelease { id, user, password } => {
                let r = release(shared, c, &user, password).await;
                if r.is_ok() {
                    tracing::info!(user, "released");
                }
                next = Some(session.release_done(id, r));
            }
        }
    }
    true
}

async fn release(
    shared: &Arc<Shared>,
    c: &mut Conn,
    user: &str,
    password: crate::proto::access::Password,
) -> Result<(), ErrorCode> {
    let fp = c.fingerprint;
    let u = user.to_owned();
    let wrapped = shared
        .auth
        .run(move |w| w.check(Which::Release, &fp, &u, &password))
        .await
        .map_err(pool_code)??;
    let handle = shared
        .hsm_pool
        .run(move |w| crate::hsm::ops::unwrap_user_key(&w.session, w.keys.master_wrap, &wrapped))
        .await
        .map_err(pool_code)?
        .map_err(|e| {
            tracing::error!(error = %e, "releasing the home-card key failed");
            ErrorCode::HsmUnavailable
        })?;
    c.released = Some(ReleasedKey {
        handle,
        shared: shared.clone(),
    });
    Ok(())
}
