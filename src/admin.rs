//! The admin listener on its own thread: `/metrics` (Prometheus text),
//! `/healthz` (the process answers) and `/readyz` (the HSM answers and the
//! stores open). Never on a core thread, so a slow scrape cannot stall one.

use std::net::SocketAddr;
use std::sync::Arc;
use tiny_http::{Header, Response, Server};

pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;
/// `POST /fault/hsm-sessions`, when `admin.fault_injection` is on.
pub type Fault = Option<Arc<dyn Fn() -> Result<(), String> + Send + Sync>>;

/// Binds `addr` and serves until the process exits; returns the bound address.
pub fn start(addr: SocketAddr, ready: ReadyCheck, fault: Fault) -> anyhow::Result<SocketAddr> {
    let server = Server::http(addr).map_err(|e| anyhow::anyhow!("admin listener {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| anyhow::anyhow!("admin listener is not an IP socket"))?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let path = req.url().split('?').next().unwrap_or("").to_owned();
                let resp = match path.as_str() {
                    "/metrics" => Response::from_string(crate::metrics::render()).with_header(
                        Header::from_bytes("Content-Type", "text/plain; version=0.0.4")
                            .expect("valid header"),
                    ),
                    "/healthz" => Response::from_string("ok\n"),
                    "/readyz" => match ready() {
                        Ok(()) => Response::from_string("ready\n"),
                        Err(why) => Response::from_string(format!("not ready: {why}\n"))
                            .with_status_code(503),
                    },
                    "/fault/hsm-sessions" if *req.method() == tiny_http::Method::Post => {
                        match fault.as_ref().map(|f| f()) {
                            Some(Ok(())) => Response::from_string("injected\n"),
                            Some(Err(e)) => {
                                Response::from_string(format!("{e}\n")).with_status_code(500)
                            }
                            None => Response::from_string("not found\n").with_status_code(404),
                        }
                    }
                    _ => Response::from_string("not found\n").with_status_code(404),
                };
                let _ = req.respond(resp);
            }
        })?;
    Ok(bound)
}
