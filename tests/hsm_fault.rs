//! The HSM fails and comes back while the broker runs: every HSM session
//! of the process is closed (`C_CloseAllSessions` on the real SoftHSM
//! token, through the admin listener's fault injection), which is what a
//! restarted HSM or a dropped network-HSM link leaves behind.
//!
//! A real network-HSM hop was tried first: Debian's p11-kit 0.24 RPC
//! (`p11-kit server` + `p11-kit-client.so`) refuses `CKM_AES_KEY_WRAP_PAD`
//! (its mechanism allow-list), so no release could cross it.

mod common;

use common::*;
use keybroker::proto::ErrorCode;
use std::time::Duration;

#[test]
fn hsm_sessions_lost_then_recovered_without_a_restart() {
    let (env, issuer) = wallet_env(None, "");
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace("[admin]\n", "[admin]\nfault_injection = true\n"),
    )
    .unwrap();
    let alice = env.user("alice");
    let bob = env.user("bob");
    let _m = env.market("m1", "*");
    let b = env.broker();
    let (_, a2) = pw("alice");
    let mut a = released(&b, &alice, "alice");
    a.top_up(&voucher(&env, &issuer, "alice", 1_000, "v1"), a2.as_bytes())
        .unwrap();
    a.exchange("m1").expect("exchange before the fault");
    a.purchase("m1", 100, "EUR", "before", "k1").unwrap();
    let mut bt = b.connect(&bob);
    bt.login("bob", pw("bob").0.as_bytes()).unwrap();

    assert_eq!(http(b.admin, "POST", "/fault/hsm-sessions").0, 200);

    // The worker finds its session lost, reopens it and tries again; but
    // Alice's key went with the old sessions, so she is told to release
    // again, never served by whatever her stale handle names now.
    assert_eq!(refused(a.exchange("m1")), ErrorCode::NotReleased);
    assert_eq!(
        refused(a.purchase("m1", 100, "EUR", "stale", "k2")),
        ErrorCode::NotReleased
    );
    wait_until("/readyz to be ready again", Duration::from_secs(20), || {
        get(b.admin, "/readyz").0 == 200
    });
    assert_eq!(get(b.admin, "/healthz").0, 200, "the process stayed up");

    // Releasing again works, and so does everything after it.
    a.release(a2.as_bytes()).expect("release after recovery");
    a.exchange("m1").expect("exchange after recovery");
    let (balance, _) = a.purchase("m1", 100, "EUR", "after", "k3").unwrap();
    assert_eq!(balance, 800);
    // A terminal that logged in before the fault and releases after it
    // never sees it.
    bt.release(pw("bob").1.as_bytes()).expect("bob's release");
    bt.exchange("m1").expect("bob's exchange");
    let audit = env.kb(&["wallet", "audit"]).success().stdout();
    assert!(audit.contains("audit ok"), "{audit}");
    let (_, metrics) = get(b.admin, "/metrics");
    assert!(
        metrics.contains("keybroker_hsm_up 1"),
        "the HSM gauge is back up"
    );
}
