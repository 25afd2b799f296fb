//! The market's checks on each exchange, with real certificates and real
//! ECDSA signatures (the user key here is a software key standing in for a
//! released home-card key: the market sees the same bytes either way).

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use keybroker::exchange::{Ephemeral, Group, Mode, Point, Transcript};
use keybroker::market::{MarketConfig, MarketState, now_ms};
use keybroker::pki::{self, Usage};
use keybroker::proto::ErrorCode;
use keybroker::proto::market::ExchangeRequest;
use std::time::Duration;

struct User {
    key: EcdsaKeyPair,
    cert: Vec<u8>,
}

fn config(allowed: &[&str]) -> MarketConfig {
    toml::from_str(&format!(
        "id = \"m1\"\nlisten = \"127.0.0.1:0\"\ndirect_listen = \"127.0.0.1:0\"\nkey = \"k\"\ncert = \"c\"\n\
         broker_ca = \"b\"\nuser_ca = \"u\"\nallowed_users = {allowed:?}\nfreshness_ms = 30000\n"
    ))
    .unwrap()
}

fn setup() -> (Vec<u8>, rcgen::KeyPair) {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ca = pki::self_signed_ca("test user CA", &ca_key).unwrap();
    (ca, ca_key)
}

fn user(ca: &[u8], ca_key: &rcgen::KeyPair, name: &str) -> User {
    user_for(ca, ca_key, name, Usage::Signing)
}

fn user_for(ca: &[u8], ca_key: &rcgen::KeyPair, name: &str, usage: Usage) -> User {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
    let public = keybroker::hsm::signer::P256Public(key.public_key().as_ref().to_vec());
    let cert = pki::issue(
        ca,
        ca_key,
        &format!("user {name}"),
        &[],
        usage,
        Duration::from_secs(3600),
        &public,
    )
    .unwrap();
    User { key, cert }
}

fn request(
    u: &User,
    name: &str,
    binding: [u8; 32],
    time_ms: u64,
    nonce: [u8; 16],
) -> ExchangeRequest {
    request_in(Group::X25519, u, name, binding, time_ms, nonce).0
}

/// A signed request whose ephemeral key is in `group`, and that key.
fn request_in(
    group: Group,
    u: &User,
    name: &str,
    binding: [u8; 32],
    time_ms: u64,
    nonce: [u8; 16],
) -> (ExchangeRequest, Ephemeral, [u8; 32]) {
    let eph = Ephemeral::generate(group);
    let t = Transcript {
        mode: Mode::Full,
        market: "m1".into(),
        user: name.into(),
        cert_fingerprint: pki::fingerprint(&u.cert),
        request_id: 1,
        ephemeral: eph.public,
        time_ms,
        nonce,
        binding,
    };
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let signature = u.key.sign(&rng, &t.preimage()).unwrap().as_ref().to_vec();
    let req = ExchangeRequest {
        request_id: 1,
        mode: Mode::Full,
        user: name.into(),
        user_cert: u.cert.clone(),
        ephemeral: eph.public,
        time_ms,
        nonce,
        signature,
    };
    (req, eph, t.digest())
}

#[test]
fn the_market_answers_in_the_requesters_group_and_both_sides_agree_on_x() {
    let (ca, ca_key) = setup();
    let alice = user(&ca, &ca_key, "alice");
    let m = MarketState::new(config(&["*"]), &ca, "127.0.0.1:1".into()).unwrap();
    let now = now_ms();
    for (i, group) in [Group::P256, Group::X25519].into_iter().enumerate() {
        let (req, eph, t) = request_in(group, &alice, "alice", [1; 32], now, [20 + i as u8; 16]);
        let a = m.exchange(&req, [1; 32], now).unwrap();
        assert_eq!(a.ephemeral.group(), group);
        let mine = eph.x(&a.ephemeral, &t, &a.ephemeral).unwrap();
        let (theirs, user, _) = m.session(&a.session_id, now).unwrap();
        assert_eq!(*mine, *theirs);
        assert_eq!(user, "alice");
    }
    // The group is signed: the same key bytes relabelled are refused.
    let (mut req, _, _) = request_in(Group::X25519, &alice, "alice", [1; 32], now, [30; 16]);
    let key = req.ephemeral.as_bytes().to_vec();
    let mut long = vec![4u8];
    long.extend_from_slice(&key);
    long.extend_from_slice(&key);
    req.ephemeral = Point::new(Group::P256, &long).unwrap();
    assert_eq!(
        m.exchange(&req, [1; 32], now).map(|_| ()),
        Err(ErrorCode::BadSignature)
    );
}

#[test]
fn a_captured_exchange_replayed_is_refused() {
    let (ca, ca_key) = setup();
    let alice = user(&ca, &ca_key, "alice");
    let m = MarketState::new(config(&["*"]), &ca, "127.0.0.1:1".into()).unwrap();
    let now = now_ms();
    let req = request(&alice, "alice", [1; 32], now, [7; 16]);
    m.exchange(&req, [1; 32], now).expect("first time accepted");
    assert_eq!(m.exchange(&req, [1; 32], now), Err(ErrorCode::Replay));
    // Replayed over another market-channel connection: the binding differs.
    assert_eq!(m.exchange(&req, [2; 32], now), Err(ErrorCode::BadSignature));
    assert_eq!(m.session_count(), 1);
}

#[test]
fn forged_stale_foreign_and_unauthorised_exchanges_are_refused() {
    let (ca, ca_key) = setup();
    let alice = user(&ca, &ca_key, "alice");
    let bob = user(&ca, &ca_key, "bob");
    let m = MarketState::new(config(&["alice"]), &ca, "127.0.0.1:1".into()).unwrap();
    let now = now_ms();

    let mut forged = request(&alice, "alice", [1; 32], now, [1; 16]);
    forged.signature[10] ^= 1;
    assert_eq!(
        m.exchange(&forged, [1; 32], now),
        Err(ErrorCode::BadSignature)
    );

    let stale = request(&alice, "alice", [1; 32], now - 120_000, [2; 16]);
    assert_eq!(m.exchange(&stale, [1; 32], now), Err(ErrorCode::Stale));

    // Bob's certificate presented for alice.
    let mut swapped = request(&bob, "alice", [1; 32], now, [3; 16]);
    swapped.user = "alice".into();
    assert_eq!(
        m.exchange(&swapped, [1; 32], now),
        Err(ErrorCode::BadSignature)
    );

    // A certificate from another CA.
    let (other_ca, other_key) = setup();
    let mallory = user(&other_ca, &other_key, "alice");
    let req = request(&mallory, "alice", [1; 32], now, [4; 16]);
    assert_eq!(m.exchange(&req, [1; 32], now), Err(ErrorCode::BadSignature));

    let req = request(&bob, "bob", [1; 32], now, [5; 16]);
    assert_eq!(
        m.exchange(&req, [1; 32], now),
        Err(ErrorCode::UserNotAllowed)
    );

    // A refused request does not burn its nonce: the genuine one still works.
    let good = request(&alice, "alice", [1; 32], now, [1; 16]);
    m.exchange(&good, [1; 32], now).unwrap();
}

#[test]
fn expired_sessions_are_refused() {
    let (ca, ca_key) = setup();
    let alice = user(&ca, &ca_key, "alice");
    let m = MarketState::new(config(&["*"]), &ca, "127.0.0.1:1".into()).unwrap();
    let now = now_ms();
    let a = m
        .exchange(
            &request(&alice, "alice", [1; 32], now, [9; 16]),
            [1; 32],
            now,
        )
        .unwrap();
    assert!(m.session(&a.session_id, now).is_ok());
    assert_eq!(
        m.session(&a.session_id, a.expiry_ms).map(|_| ()),
        Err(ErrorCode::SessionExpired)
    );
    assert_eq!(
        m.session(&[0; 16], now).map(|_| ()),
        Err(ErrorCode::UnknownSession)
    );
}

#[test]
fn a_market_full_of_live_sessions_answers_busy_until_they_expire() {
    let (ca, ca_key) = setup();
    let alice = user(&ca, &ca_key, "alice");
    let mut cfg = config(&["*"]);
    cfg.max_sessions = 2;
    cfg.session_ttl_s = 1;
    let m = MarketState::new(cfg, &ca, "127.0.0.1:1".into()).unwrap();
    let now = now_ms();
    for n in 1..=2u8 {
        let req = request(&alice, "alice", [1; 32], now, [n; 16]);
        m.exchange(&req, [1; 32], now).expect("room for two");
    }
    let third = request(&alice, "alice", [1; 32], now, [3; 16]);
    assert_eq!(m.exchange(&third, [1; 32], now), Err(ErrorCode::Busy));
    assert_eq!(m.session_count(), 2);
    // Nonces are kept for twice the freshness window (60 s), sessions for
    // their 1 s lifetime: past both, the old entries make room.
    let later = now + 60_001;
    let fourth = request(&alice, "alice", [1; 32], later, [4; 16]);
    m.exchange(&fourth, [1; 32], later).expect("room again");
    assert_eq!(m.session_count(), 1);
}

#[test]
fn a_user_over_its_quota_loses_its_oldest_unused_session_and_no_one_elses_room() {
    let (ca, ca_key) = setup();
    let alice = user(&ca, &ca_key, "alice");
    let mallory = user(&ca, &ca_key, "mallory");
    let mut cfg = config(&["*"]);
    cfg.max_sessions = 6;
    cfg.max_sessions_per_user = 3;
    let m = MarketState::new(cfg, &ca, "127.0.0.1:1".into()).unwrap();
    let now = now_ms();
    // Five of mallory's, a millisecond apart: the quota keeps her last three.
    let ids: Vec<[u8; 16]> = (1..=5u8)
        .map(|n| {
            let t = now + u64::from(n);
            let req = request(&mallory, "mallory", [1; 32], t, [n; 16]);
            m.exchange(&req, [1; 32], t)
                .expect("within her quota")
                .session_id
        })
        .collect();
    assert_eq!(m.session_count(), 3);
    let t = now + 10;
    assert_eq!(
        m.session(&ids[0], t).map(|_| ()),
        Err(ErrorCode::UnknownSession)
    );
    // Her forgotten nonces cannot be replayed: stamped under her floor.
    let replay = request(&mallory, "mallory", [1; 32], now + 1, [1; 16]);
    assert_eq!(m.exchange(&replay, [1; 32], t), Err(ErrorCode::Stale));
    // The rest of the table is everyone else's.
    for n in 11..=13u8 {
        let req = request(&alice, "alice", [1; 32], t, [n; 16]);
        m.exchange(&req, [1; 32], t).expect("alice's room");
    }
    assert_eq!(m.session_count(), 6);
    // Sessions in use are kept: with all three of hers connected, she is busy.
    for id in &ids[2..] {
        m.count_connection(id, t).unwrap();
    }
    let more = request(&mallory, "mallory", [1; 32], t + 1, [20; 16]);
    assert_eq!(m.exchange(&more, [1; 32], t + 1), Err(ErrorCode::Busy));
}

#[test]
fn a_user_certificate_is_checked_at_the_time_the_market_is_given() {
    let (ca, ca_key) = setup();
    // Valid for an hour from now.
    let alice = user(&ca, &ca_key, "alice");
    let m = MarketState::new(config(&["*"]), &ca, "127.0.0.1:1".into()).unwrap();
    let later = now_ms() + 2 * 3600 * 1000;
    let req = request(&alice, "alice", [1; 32], later, [40; 16]);
    assert_eq!(
        m.exchange(&req, [1; 32], later).map(|_| ()),
        Err(ErrorCode::BadSignature),
        "past its notAfter at the market's now, whatever the wall clock says"
    );
}

#[test]
fn a_user_certificate_for_another_use_is_refused() {
    // The one X.509 check (webpki): a certificate of the user CA that
    // names a key usage must name document signing.
    let (ca, ca_key) = setup();
    let m = MarketState::new(config(&["*"]), &ca, "127.0.0.1:1".into()).unwrap();
    let now = now_ms();
    let tls = user_for(&ca, &ca_key, "alice", Usage::TlsServer);
    let req = request(&tls, "alice", [1; 32], now, [3; 16]);
    assert_eq!(m.exchange(&req, [1; 32], now), Err(ErrorCode::BadSignature));
    let signing = user_for(&ca, &ca_key, "alice", Usage::DocumentSigning);
    let req = request(&signing, "alice", [1; 32], now, [4; 16]);
    m.exchange(&req, [1; 32], now)
        .expect("document signing is a T signature's use");
}
