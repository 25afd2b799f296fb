//! Money moves once (claims 4 and 5) against the real reference market and
//! broker: a receipt is accepted once, a cancel is authorised only for an
//! undelivered order the market has seen, and the broker never signs a
//! receipt for a refunded decision nor accepts an authorisation made with
//! the wrong key, for the wrong time or the wrong user.

mod common;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use common::*;
use keybroker::cancel_auth::{CancelAuth, MAX_LIFETIME_MS, SignedCancel};
use keybroker::proto::ErrorCode;
use keybroker::receipt::SignedReceipt;
use keybroker::terminal::{Direct, Terminal};
use std::path::Path;
use std::time::Duration;

fn decision_of(receipt: &[u8]) -> String {
    SignedReceipt::decode(receipt).unwrap().receipt.decision_id
}

fn direct(t: &mut Terminal, market: &str) -> Direct {
    Direct::connect(&t.exchange(market).unwrap(), TIMEOUT).unwrap()
}

fn refusal(r: Result<impl std::fmt::Debug, keybroker::terminal::TerminalError>) -> String {
    r.unwrap_err().to_string()
}

/// Signs `auth` with the key in `dir/KEY.key` and attaches `dir/KEY.crt`,
/// as a market (or someone holding one of its keys) would.
fn sign_with(dir: &Path, key: &str, auth: CancelAuth) -> Vec<u8> {
    let pem = pem::parse(std::fs::read_to_string(dir.join(format!("{key}.key"))).unwrap()).unwrap();
    let k = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pem.contents()).unwrap();
    let cert = keybroker::pki::read_cert_pem(
        &std::fs::read_to_string(dir.join(format!("{key}.crt"))).unwrap(),
    )
    .unwrap();
    let signature = k
        .sign(&SystemRandom::new(), &auth.body())
        .unwrap()
        .as_ref()
        .to_vec();
    SignedCancel {
        auth,
        signature,
        cert,
    }
    .encode()
}

#[test]
fn a_buyer_cannot_keep_the_goods_and_the_money() {
    let (env, issuer) = wallet_env(None, "");
    let alice = env.user("alice");
    let _m1 = env.market_with("m1", "*", "delivery_delay_s = 1\n", None);
    let _m2 = env.market_with("m2", "*", "receipt_max_age_s = 1\n", None);
    let b = env.broker();
    let (_, p2) = pw("alice");
    let mut t = released(&b, &alice, "alice");
    t.top_up(
        &voucher(&env, &issuer, "alice", 10_000, "v1"),
        p2.as_bytes(),
    )
    .unwrap();

    // Buy, present the receipt (the goods go out after 1 s), wait.
    let (_, receipt) = t.purchase("m1", 1_000, "EUR", "o1", "k1").unwrap();
    let decision = decision_of(&receipt);
    let mut d = direct(&mut t, "m1");
    assert_eq!(d.present_receipt(&receipt).unwrap(), decision);
    std::thread::sleep(Duration::from_millis(1_300));
    // Delivered: no cancel, and the receipt is not accepted again, on this
    // connection or on another session's.
    assert!(refusal(d.cancel_authorisation(&decision)).contains("CANCEL REFUSED delivered"));
    assert!(refusal(d.present_receipt(&receipt)).contains("RECEIPT REFUSED already presented"));
    let mut other = released(&b, &alice, "alice");
    assert!(
        refusal(direct(&mut other, "m1").present_receipt(&receipt))
            .contains("RECEIPT REFUSED already presented")
    );
    assert_eq!(t.balance().unwrap(), vec![("EUR".to_owned(), 9_000)]);

    // A cancel for a decision the market never saw: refused, nothing signed.
    assert!(refusal(d.cancel_authorisation("0123456789abcdef")).contains("unknown decision"));
    // Nor one it has not seen a receipt for (the broker knows it, the
    // market does not).
    let (_, unseen) = t.purchase("m1", 100, "EUR", "o2", "k2").unwrap();
    assert!(refusal(d.cancel_authorisation(&decision_of(&unseen))).contains("unknown decision"));

    // Cancel in time, refund once; the refunded decision's receipt is then
    // refused, and a retried purchase gets no fresh receipt.
    let (after, r3) = t.purchase("m1", 500, "EUR", "o3", "k3").unwrap();
    let d3 = decision_of(&r3);
    d.present_receipt(&r3).unwrap();
    let auth = d.cancel_authorisation(&d3).unwrap();
    assert_eq!(t.cancel(&d3, auth).unwrap(), after + 500);
    assert!(refusal(d.present_receipt(&r3)).contains("RECEIPT REFUSED"));
    assert_eq!(
        refused(t.purchase("m1", 500, "EUR", "o3", "k3")),
        ErrorCode::AlreadyCancelled
    );
    // The market re-issues an authorisation for a cancelled order (the
    // terminal may have lost it); the broker refunds once whatever it sees.
    let again = d.cancel_authorisation(&d3).unwrap();
    assert_eq!(refused(t.cancel(&d3, again)), ErrorCode::AlreadyCancelled);

    // An expired receipt (m2 takes receipts up to 1 s old).
    let (_, old) = t.purchase("m2", 100, "EUR", "o4", "k4").unwrap();
    std::thread::sleep(Duration::from_millis(1_300));
    assert!(
        refusal(direct(&mut t, "m2").present_receipt(&old)).contains("RECEIPT REFUSED expired")
    );
}

#[test]
fn the_broker_refunds_only_on_a_fresh_authorisation_by_the_cancel_key() {
    let (env, issuer) = wallet_env(None, "");
    let alice = env.user("alice");
    let bob = env.user("bob");
    let _m = env.market("m1", "*");
    let mdir = env.dir.path().join("markets/m1");
    let b = env.broker();
    let (_, p2) = pw("alice");
    let mut t = released(&b, &alice, "alice");
    t.top_up(&voucher(&env, &issuer, "alice", 1_000, "v1"), p2.as_bytes())
        .unwrap();
    let (_, receipt) = t.purchase("m1", 300, "EUR", "o", "k").unwrap();
    let decision = decision_of(&receipt);
    direct(&mut t, "m1").present_receipt(&receipt).unwrap();

    let now = keybroker::market::now_ms();
    let auth = |user: &str, expiry_ms| CancelAuth {
        decision_id: decision.clone(),
        market: "m1".into(),
        user: user.into(),
        nonce: [9; 16],
        expiry_ms,
    };
    // Signed with the market's TLS key (its certificate lacks the
    // document-signing EKU): refused.
    let tls = sign_with(&mdir, "market", auth("alice", now + 60_000));
    assert_eq!(
        refused(t.cancel(&decision, tls)),
        ErrorCode::BadAuthorisation
    );
    // By the cancel key, but expired, or valid for longer than the broker
    // accepts, or made out to bob: refused.
    for a in [
        auth("alice", now - 1),
        auth("alice", now + MAX_LIFETIME_MS + 60_000),
        auth("bob", now + 60_000),
    ] {
        let signed = sign_with(&mdir, "cancel", a);
        assert_eq!(
            refused(t.cancel(&decision, signed)),
            ErrorCode::BadAuthorisation
        );
    }
    let mut tb = released(&b, &bob, "bob");
    let for_bob = sign_with(&mdir, "cancel", auth("bob", now + 60_000));
    assert_eq!(
        refused(tb.cancel(&decision, for_bob)),
        ErrorCode::NotYourDecision
    );
    // Junk where the authorisation goes.
    assert_eq!(
        refused(t.cancel(&decision, vec![0; 40])),
        ErrorCode::BadAuthorisation
    );
    // A genuine one refunds.
    let good = sign_with(&mdir, "cancel", auth("alice", now + 60_000));
    assert_eq!(t.cancel(&decision, good).unwrap(), 1_000);
}
