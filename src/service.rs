//! What systemd is told (`Type=notify`, sd_notify(3) through the
//! `sd-notify` crate): READY once every core listens, RELOADING and READY
//! around a SIGHUP, STOPPING at SIGTERM, and WATCHDOG pings while every
//! core's event loop turns.
//!
//! ```text
//! core i ── every HEARTBEAT ──► beats[i] += 1
//! watchdog thread ── every WatchdogSec/2 ──► all beats moved? ── yes ─► WATCHDOG=1
//!                                                              └ no ──► no ping (systemd restarts
//!                                                                       the service after WatchdogSec)
//! ```
//!
//! Without `NOTIFY_SOCKET` (not under systemd, or `Type=simple`) every
//! call is a no-op. A wedged core (a blocking call on its io_uring thread,
//! a livelock) serves nobody while the process looks alive; the heartbeat
//! is what tells the two apart, and the restart is systemd's.

use sd_notify::NotifyState;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often each core proves its loop turns.
pub const HEARTBEAT: Duration = Duration::from_millis(500);

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "telling systemd failed");
    }
}

pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Before a reload; [`ready`] after it. MONOTONIC_USEC is what
/// `Type=notify-reload` (systemd 253+) matches the reload by.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// One counter per core, each bumped by its own core.
#[derive(Clone)]
pub struct Heartbeats(Arc<[AtomicU64]>);

impl Heartbeats {
    pub fn new(cores: usize) -> Self {
        Self((0..cores).map(|_| AtomicU64::new(0)).collect())
    }

    pub fn beat(&self, core: usize) {
        self.0[core].fetch_add(1, Ordering::Relaxed);
    }

    fn now(&self) -> Vec<u64> {
        self.0.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }
}

/// Pings systemd's watchdog while every core beats, if the unit set
/// `WatchdogSec=` (`WATCHDOG_USEC` for this process); otherwise nothing.
pub fn spawn_watchdog(beats: Heartbeats) -> std::io::Result<()> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) {
        return Ok(());
    }
    // Twice per period, and never faster than the cores beat.
    let every = (Duration::from_micros(usec) / 2).max(HEARTBEAT * 2);
    tracing::info!(
        interval_ms = every.as_millis() as u64,
        "systemd watchdog enabled"
    );
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut last = beats.now();
            let mut stalled_before = false;
            loop {
                std::thread::sleep(every);
                let now = beats.now();
                let stalled: Vec<usize> = (0..now.len()).filter(|&i| now[i] == last[i]).collect();
                if stalled.is_empty() {
                    notify(&[NotifyState::Watchdog]);
                } else if !stalled_before {
                    tracing::error!(cores = ?stalled, "core loop stalled: no watchdog ping, so systemd restarts the service");
                }
                stalled_before = !stalled.is_empty();
                last = now;
            }
        })?;
    Ok(())
}
