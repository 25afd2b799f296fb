//! Test vectors (docs/vectors/, docs/PROTOCOL.md Appendix A): the code's
//! encoders reproduce every committed output byte for byte, its decoders
//! accept them and its verifiers accept the signatures.
//!
//! ```text
//! cargo test --test vectors                                  check every file
//! cargo test --test vectors -- --ignored regenerate          write them anew
//! VECTORS=login,voucher cargo test --test vectors -- --ignored regenerate
//! ```
//!
//! A new topic is a [`Topic`] (inputs, outputs, accept), one line in
//! [`TOPICS`] and one `#[test]` calling its `check`.

#[path = "vectors/hexjson.rs"]
mod hexjson;

use aws_lc_rs::agreement::{ECDH_P256, PrivateKey};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use hexjson::{Fields, Topic};
use keybroker::cancel_auth::{CancelAuth, SignedCancel};
use keybroker::crypto::AccessKeys;
use keybroker::exchange::{self, Ephemeral, Group, Mode, Point, Transcript};
use keybroker::pki::{self, Usage};
use keybroker::proto::access::{DEFAULT_MAX_FRAME, Frame, FrameDecoder, Message, Password, encode};
use keybroker::proto::market::{self, Accepted, ExchangeReply, ExchangeRequest};
use keybroker::proto::{CONFIRM_KEY_LABEL, CONFIRM_LABEL, ErrorCode, WRAP_KEY_LABEL};
use keybroker::wallet::voucher::{self, Signed, Voucher};
use keybroker::wallet::{Amount, WalletError};
use std::time::SystemTime;

const TOPICS: &[&Topic] = &[
    &LOGIN,
    &EXCHANGE_FULL_X25519,
    &EXCHANGE_FULL_P256,
    &EXCHANGE_PARTIAL_X25519,
    &WRAP,
    &VOUCHER,
    &CANCEL,
];

#[test]
fn login() {
    LOGIN.check();
}

#[test]
fn exchange_full_x25519() {
    EXCHANGE_FULL_X25519.check();
}

#[test]
fn exchange_full_p256() {
    EXCHANGE_FULL_P256.check();
}

#[test]
fn exchange_partial_x25519() {
    EXCHANGE_PARTIAL_X25519.check();
}

#[test]
fn wrap() {
    WRAP.check();
}

#[test]
fn voucher() {
    VOUCHER.check();
}

#[test]
fn cancel() {
    CANCEL.check();
}

/// Rewrites the files; `$VECTORS` (names without `.json`, comma-separated)
/// limits it to some, so the others keep their signatures.
#[test]
#[ignore = "writes docs/vectors/: run it on purpose"]
fn regenerate() {
    let only = std::env::var("VECTORS").ok();
    for t in TOPICS {
        let name = t.file.trim_end_matches(".json");
        if only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|n| n == name))
        {
            t.write();
        }
    }
}

// ---- shared helpers ----

/// A fixed 32-byte value: SHA-256 of "keybroker test vector " ‖ `name`, so
/// every key and nonce here has a name and nobody picked its bits.
fn fixed(name: &str) -> [u8; 32] {
    exchange::sha256(format!("keybroker test vector {name}").as_bytes())
}

fn fixed16(name: &str) -> [u8; 16] {
    fixed(name)[..16].try_into().expect("16 bytes")
}

/// The uncompressed point of a P-256 private scalar.
fn p256_public(scalar: &[u8]) -> Vec<u8> {
    let k = PrivateKey::from_private_key(&ECDH_P256, scalar).expect("a P-256 scalar");
    k.compute_public_key()
        .expect("public key")
        .as_ref()
        .to_vec()
}

/// An ECDSA P-256 signing key from its scalar.
fn p256_signer(scalar: &[u8]) -> EcdsaKeyPair {
    EcdsaKeyPair::from_private_key_and_public_key(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        scalar,
        &p256_public(scalar),
    )
    .expect("a P-256 key")
}

fn sign(scalar: &[u8], msg: &[u8]) -> Vec<u8> {
    let sig = p256_signer(scalar).sign(&SystemRandom::new(), msg);
    sig.expect("ECDSA signature").as_ref().to_vec()
}

fn frame(id: u64, msg: Message) -> Vec<u8> {
    let mut out = Vec::new();
    let id = u32::try_from(id).expect("a u32 frame id");
    encode(&Frame { id, msg }, &mut out);
    out
}

/// The one access-channel frame `bytes` hold, decoded.
fn decode_frame(bytes: &[u8]) -> Frame {
    let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
    d.push(bytes);
    let f = d
        .next_frame()
        .expect("the frame decodes")
        .expect("a whole frame");
    assert_eq!(d.pending(), 0, "one frame, nothing after it");
    f
}

/// The one market-channel frame `bytes` hold, without its length.
fn market_frame(bytes: &[u8]) -> Vec<u8> {
    let mut s = market::Splitter::default();
    s.push(bytes);
    let f = s
        .next_frame()
        .expect("a market frame")
        .expect("a whole frame");
    assert_eq!(s.next_frame(), Ok(None), "one frame, nothing after it");
    f
}

fn str_of(label: &[u8]) -> &str {
    std::str::from_utf8(label).expect("ASCII label")
}

// ---- login (§1.2 to §1.5) ----

const LOGIN: Topic = Topic {
    file: "login.json",
    title: "An access-channel login and release, with X' given as the two exporter values",
    spec: "docs/PROTOCOL.md §1.2, §1.3, §1.4",
    notes: &[
        "confirm_key and wrap_key stand for the TLS exporter values under confirm_key_label and wrap_key_label (no context, 32 bytes); a real session gets fresh ones from its handshake.",
        "The terminal sends login_frame and release_frame (together, if it pipelines) and gets login_ok_frame then release_ok_frame; it checks that LoginOk carries confirm.",
        "wrong_password_frame is the broker's answer to login_frame had the password been wrong: the id is echoed, detail is the code's name.",
    ],
    inputs: login_inputs,
    outputs: login_outputs,
    accept: login_accept,
};

fn login_inputs() -> Fields {
    let mut i = Fields::default();
    i.put_int("login_id", 1);
    i.put_text("user", "alice");
    i.put_text("access_password", "alice-access-pw");
    i.put_int("release_id", 2);
    i.put_text("release_password", "alice-release-pw");
    i.put_bytes("confirm_key", &fixed("x-prime-confirm"));
    i.put_bytes("wrap_key", &fixed("x-prime-wrap"));
    i
}

/// The login's messages, by frame.
fn login_messages(i: &Fields) -> [(&'static str, u64, Message); 5] {
    let keys = AccessKeys::from_exporter_values(i.array("confirm_key"), i.array("wrap_key"));
    let (login, release) = (i.uint("login_id"), i.uint("release_id"));
    [
        (
            "login_frame",
            login,
            Message::Login {
                user: i.text("user"),
                password: Password::new(i.text("access_password")),
            },
        ),
        (
            "release_frame",
            release,
            Message::Release {
                password: Password::new(i.text("release_password")),
            },
        ),
        (
            "login_ok_frame",
            login,
            Message::LoginOk {
                confirm: keys.confirm(),
            },
        ),
        ("release_ok_frame", release, Message::ReleaseOk),
        (
            "wrong_password_frame",
            login,
            Message::error(ErrorCode::WrongPassword, ErrorCode::WrongPassword.name()),
        ),
    ]
}

fn login_outputs(i: &Fields) -> Fields {
    let mut o = Fields::default();
    o.put_text("confirm_key_label", str_of(CONFIRM_KEY_LABEL));
    o.put_text("wrap_key_label", str_of(WRAP_KEY_LABEL));
    o.put_text("confirm_label", str_of(CONFIRM_LABEL));
    let keys = AccessKeys::from_exporter_values(i.array("confirm_key"), i.array("wrap_key"));
    o.put_bytes("confirm", &keys.confirm());
    for (name, id, msg) in login_messages(i) {
        o.put_bytes(name, &frame(id, msg));
    }
    o
}

fn login_accept(i: &Fields, o: &Fields) {
    for (name, id, msg) in login_messages(i) {
        assert_eq!(
            decode_frame(&o.bytes(name)),
            Frame { id: id as u32, msg },
            "{name}"
        );
    }
    let keys = AccessKeys::from_exporter_values(i.array("confirm_key"), i.array("wrap_key"));
    assert!(keybroker::crypto::ct_eq(
        &o.bytes("confirm"),
        &keys.confirm()
    ));
}

// ---- exchanges (§1.3, §1.7, §2.2, §2.3) ----

const EXCHANGE_NOTES: &[&str] = &[
    "The requester is the broker in full mode (mode 0) and the terminal in partial mode (mode 1); the market answers in the requester's group (0 P-256, 1 X25519).",
    "Private keys: P-256 as the 32-byte big-endian scalar, X25519 as the 32 bytes of RFC 7748. user_private_key is the user's home-card key; user_cert is issued for it by user_ca_cert (CN \"user alice\"); both are valid from 2025-01-01 to 2125-01-01, time_ms is 2026-01-01T00:00:00Z.",
    "signature is ECDSA-P256 over SHA-256(preimage), DER; ECDSA is randomised, so a new signature differs but verifies the same.",
    "binding stands for the market channel's exporter value (EXPORTER-keybroker-market-binding); wrap_key for X'wrap of the access channel.",
    "access_request_frame and access_answer_frame travel on the access channel, market_request_frame and market_reply_frame on the market channel, each a whole frame with its length.",
];

/// An exchange's file: the same fields in each, for another group or mode.
const fn exchange_topic(file: &'static str, title: &'static str, inputs: fn() -> Fields) -> Topic {
    Topic {
        file,
        title,
        spec: "docs/PROTOCOL.md §1.3, §1.7, §2.2, §2.3",
        notes: EXCHANGE_NOTES,
        inputs,
        outputs: exchange_outputs,
        accept: exchange_accept,
    }
}

const EXCHANGE_FULL_X25519: Topic = exchange_topic(
    "exchange_full_x25519.json",
    "A full-proxy exchange in X25519 (kx = \"software\"): the broker does the ECDH and wraps X",
    || exchange_inputs(Group::X25519, Mode::Full),
);

const EXCHANGE_FULL_P256: Topic = exchange_topic(
    "exchange_full_p256.json",
    "A full-proxy exchange in P-256 (kx = \"hsm\"): the broker does the ECDH and wraps X",
    || exchange_inputs(Group::P256, Mode::Full),
);

const EXCHANGE_PARTIAL_X25519: Topic = exchange_topic(
    "exchange_partial_x25519.json",
    "A partial-proxy exchange in X25519: the terminal does the ECDH, the broker only signs",
    || exchange_inputs(Group::X25519, Mode::Partial),
);

/// The exchanges' time: 2026-01-01T00:00:00Z.
const TIME_MS: i64 = 1_767_225_600_000;

/// A user CA and a certificate it issued for the user key, both valid from
/// 2025-01-01 to 2125-01-01, so around [`TIME_MS`] and long after.
fn user_certs(user_scalar: &[u8]) -> (Vec<u8>, Vec<u8>) {
    issued(
        "user CA key",
        "keybroker user CA",
        "user alice",
        Usage::Signing,
        user_scalar,
    )
}

/// A CA (its key named `ca_key_name`) and a leaf it issued for the P-256
/// key `scalar`, both valid from 2025-01-01 to 2125-01-01.
fn issued(
    ca_key_name: &str,
    ca_cn: &str,
    cn: &str,
    usage: Usage,
    scalar: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let ca_scalar = fixed(ca_key_name);
    let pkcs8 = p256_signer(&ca_scalar).to_pkcs8v1().expect("PKCS#8");
    let ca_key = rcgen::KeyPair::try_from(pkcs8.as_ref()).expect("CA key");
    let (from, to) = (
        rcgen::date_time_ymd(2025, 1, 1),
        rcgen::date_time_ymd(2125, 1, 1),
    );
    let mut params = pki::ca_params(ca_cn);
    (params.not_before, params.not_after) = (from, to);
    let ca = params
        .self_signed(&ca_key)
        .expect("CA certificate")
        .der()
        .to_vec();
    let leaf = keybroker::hsm::signer::P256Public(p256_public(scalar));
    let validity = (SystemTime::from(from), SystemTime::from(to));
    let cert = pki::issue_valid(&ca, &ca_key, cn, &[], usage, validity, &leaf);
    (ca, cert.expect("leaf certificate"))
}

fn ephemeral_private(group: Group, name: &str) -> Vec<u8> {
    let b = fixed(name);
    assert!(Ephemeral::from_private_bytes_for_vectors(group, &b).is_some());
    b.to_vec()
}

fn exchange_inputs(group: Group, mode: Mode) -> Fields {
    let mut i = Fields::default();
    i.put_int("frame_id", 3);
    i.put_int("mode", mode as u8);
    i.put_int("group", group as u8);
    i.put_text("market", "m1");
    i.put_text("user", "alice");
    let user_key = fixed("user key");
    i.put_bytes("user_private_key", &user_key);
    let (ca, cert) = user_certs(&user_key);
    i.put_bytes("user_ca_cert", &ca);
    i.put_bytes("user_cert", &cert);
    i.put_int("request_id", (1i64 << 48) | 42);
    i.put_int("time_ms", TIME_MS);
    i.put_bytes("nonce", &fixed16("nonce"));
    i.put_bytes("binding", &fixed("market-channel binding"));
    i.put_bytes(
        "requester_ephemeral_private",
        &ephemeral_private(group, "requester ephemeral"),
    );
    i.put_bytes(
        "market_ephemeral_private",
        &ephemeral_private(group, "market ephemeral"),
    );
    i.put_bytes("session_id", &fixed16("session id"));
    i.put_int("expiry_ms", TIME_MS + 300_000);
    i.put_text("endpoint", "127.0.0.1:8444");
    if mode == Mode::Full {
        i.put_bytes("wrap_key", &fixed("x-prime-wrap"));
    }
    let preimage = Parts::new(&i).transcript.preimage();
    i.put_bytes("signature", &sign(&user_key, &preimage));
    i
}

/// An exchange's values as the code's types, from the inputs.
struct Parts {
    id: u64,
    mode: Mode,
    requester: Ephemeral,
    market: Ephemeral,
    transcript: Transcript,
    session_id: [u8; 16],
    expiry_ms: u64,
    endpoint: String,
}

impl Parts {
    /// Everything but the signature, which is made over `transcript`.
    fn new(i: &Fields) -> Self {
        let group = Group::from_u8(i.int("group") as u8).expect("a group");
        let mode = Mode::from_u8(i.int("mode") as u8).expect("a mode");
        let eph = |name| {
            Ephemeral::from_private_bytes_for_vectors(group, &i.bytes(name)).expect("a private key")
        };
        let requester = eph("requester_ephemeral_private");
        let transcript = Transcript {
            mode,
            market: i.text("market"),
            user: i.text("user"),
            cert_fingerprint: exchange::sha256(&i.bytes("user_cert")),
            request_id: i.uint("request_id"),
            ephemeral: requester.public,
            time_ms: i.uint("time_ms"),
            nonce: i.array("nonce"),
            binding: i.array("binding"),
        };
        let (session_id, expiry_ms) = (i.array("session_id"), i.uint("expiry_ms"));
        Self {
            id: i.uint("frame_id"),
            mode,
            requester,
            market: eph("market_ephemeral_private"),
            transcript,
            session_id,
            expiry_ms,
            endpoint: i.text("endpoint"),
        }
    }

    fn digest(&self) -> [u8; 32] {
        self.transcript.digest()
    }

    fn x(&self) -> [u8; 32] {
        let m = &self.market.public;
        *self.requester.x(m, &self.digest(), m).expect("X")
    }

    /// The terminal's request on the access channel.
    fn access_request(&self) -> Message {
        let market = self.transcript.market.clone();
        match self.mode {
            Mode::Full => Message::Exchange { market },
            Mode::Partial => Message::ExchangePartial {
                market,
                ephemeral: self.requester.public,
            },
        }
    }

    fn market_request(&self, i: &Fields) -> ExchangeRequest {
        ExchangeRequest {
            request_id: self.transcript.request_id,
            mode: self.mode,
            user: self.transcript.user.clone(),
            user_cert: i.bytes("user_cert"),
            ephemeral: self.requester.public,
            time_ms: self.transcript.time_ms,
            nonce: self.transcript.nonce,
            signature: i.bytes("signature"),
        }
    }

    fn market_reply(&self) -> ExchangeReply {
        ExchangeReply {
            request_id: self.transcript.request_id,
            result: Ok(Accepted {
                session_id: self.session_id,
                ephemeral: self.market.public,
                expiry_ms: self.expiry_ms,
                endpoint: self.endpoint.clone(),
            }),
        }
    }

    /// The broker's answer on the access channel.
    fn access_answer(&self, i: &Fields) -> Message {
        let (session_id, expiry_ms, endpoint) =
            (self.session_id, self.expiry_ms, self.endpoint.clone());
        match self.mode {
            Mode::Full => Message::ExchangeOk {
                session_id,
                expiry_ms,
                endpoint,
                wrapped_x: exchange::wrap(&i.array("wrap_key"), &self.x()),
            },
            Mode::Partial => Message::PartialOk {
                session_id,
                expiry_ms,
                endpoint,
                market_ephemeral: self.market.public,
                transcript: self.digest(),
            },
        }
    }
}

fn point_bytes(p: &Point) -> Vec<u8> {
    let mut out = Vec::new();
    p.put(&mut out);
    out
}

fn exchange_outputs(i: &Fields) -> Fields {
    let p = Parts::new(i);
    let mut o = Fields::default();
    o.put_bytes(
        "user_public_key",
        &p256_public(&i.bytes("user_private_key")),
    );
    o.put_bytes(
        "requester_ephemeral_point",
        &point_bytes(&p.requester.public),
    );
    o.put_bytes("market_ephemeral_point", &point_bytes(&p.market.public));
    o.put_bytes("access_request_frame", &frame(p.id, p.access_request()));
    o.put_bytes("cert_fingerprint", &p.transcript.cert_fingerprint);
    o.put_bytes("preimage", &p.transcript.preimage());
    o.put_bytes("transcript", &p.digest());
    let mut req = Vec::new();
    market::encode_requests([p.market_request(i)].iter(), &mut req);
    o.put_bytes("market_request_frame", &req);
    let mut reply = Vec::new();
    market::encode_replies(&[p.market_reply()], &mut reply);
    o.put_bytes("market_reply_frame", &reply);
    let z = p.requester.shared_secret_for_vectors(&p.market.public);
    o.put_bytes("z", &z.expect("Z"));
    o.put_bytes(
        "x_hmac_message",
        &exchange::x_input(&p.digest(), &p.market.public),
    );
    o.put_bytes("x", &p.x());
    if p.mode == Mode::Full {
        o.put_bytes("wrapped_x", &exchange::wrap(&i.array("wrap_key"), &p.x()));
    }
    o.put_bytes("access_answer_frame", &frame(p.id, p.access_answer(i)));
    o
}

fn exchange_accept(i: &Fields, o: &Fields) {
    let p = Parts::new(i);
    // The user certificate carries the user key and chains to the user CA.
    let (ca_der, cert_der) = (i.bytes("user_ca_cert"), i.bytes("user_cert"));
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).expect("CA certificate");
    let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).expect("user certificate");
    cert.verify_signature(Some(ca.public_key()))
        .expect("issued by the user CA");
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok());
    assert_eq!(cn, Some("user alice"));
    let user_public = o.bytes("user_public_key");
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        &user_public[..]
    );
    assert!(
        exchange::verify_signature(&user_public, &o.bytes("preimage"), &i.bytes("signature")),
        "the signature verifies over the preimage"
    );
    // Every frame decodes to what was encoded.
    let f = decode_frame(&o.bytes("access_request_frame"));
    assert_eq!((f.id, f.msg), (p.id as u32, p.access_request()));
    let req = market::decode_requests(&market_frame(&o.bytes("market_request_frame")));
    assert_eq!(req.expect("requests decode"), vec![p.market_request(i)]);
    let reply = market::decode_replies(&market_frame(&o.bytes("market_reply_frame")));
    assert_eq!(reply.expect("replies decode"), vec![p.market_reply()]);
    let f = decode_frame(&o.bytes("access_answer_frame"));
    assert_eq!((f.id, f.msg), (p.id as u32, p.access_answer(i)));
    // The market's side of the ECDH gives the same X.
    let m = &p.market.public;
    let market_x = p.market.x(&p.requester.public, &p.digest(), m).expect("X");
    assert_eq!(&market_x[..], &o.bytes("x")[..]);
    if p.mode == Mode::Full {
        let x = exchange::unwrap(&i.array("wrap_key"), &o.bytes("wrapped_x"));
        assert_eq!(&x.expect("unwraps")[..], &o.bytes("x")[..]);
    }
}

// ---- wrapped X (§1.7) ----

const WRAP: Topic = Topic {
    file: "wrap.json",
    title: "X wrapped under X'wrap: AES-256 key wrap with padding (RFC 5649)",
    spec: "docs/PROTOCOL.md §1.2, §1.7",
    notes: &[
        "RFC 5649 is deterministic: the same wrap_key and x always give the same 40 bytes.",
        "Unwrapping wrapped_x under any other key (confirm_key among them) fails the integrity check.",
    ],
    inputs: wrap_inputs,
    outputs: wrap_outputs,
    accept: wrap_accept,
};

fn wrap_inputs() -> Fields {
    let mut i = Fields::default();
    i.put_bytes("wrap_key", &fixed("x-prime-wrap"));
    i.put_bytes("x", &fixed("x"));
    i.put_bytes("confirm_key", &fixed("x-prime-confirm"));
    i
}

fn wrap_outputs(i: &Fields) -> Fields {
    let mut o = Fields::default();
    o.put_bytes(
        "wrapped_x",
        &exchange::wrap(&i.array("wrap_key"), &i.array("x")),
    );
    o
}

fn wrap_accept(i: &Fields, o: &Fields) {
    let wrapped = o.bytes("wrapped_x");
    let x = exchange::unwrap(&i.array("wrap_key"), &wrapped).expect("unwraps");
    assert_eq!(&x[..], &i.bytes("x")[..]);
    assert!(exchange::unwrap(&i.array("confirm_key"), &wrapped).is_none());
    let mut bent = wrapped.clone();
    bent[39] ^= 1;
    assert!(exchange::unwrap(&i.array("wrap_key"), &bent).is_none());
}

// ---- voucher and top-up (§1.8) ----

const VOUCHER: Topic = Topic {
    file: "voucher.json",
    title: "A top-up voucher signed by the issuer key, and the TopUp that spends it",
    spec: "docs/PROTOCOL.md §1.3, §1.8",
    notes: &[
        "issuer_spki is the DER SubjectPublicKeyInfo that `keybroker voucher keygen` writes, as PEM (PUBLIC KEY), to issuer.pub; wallet.voucher_issuer names that file.",
        "signature is ECDSA-P256 over SHA-256(body), DER; ECDSA is randomised, so a new signature differs but verifies the same.",
        "The voucher is valid while now_ms < expiry_ms; wallet_ok_frame is the broker's answer to topup_frame for a wallet that held nothing before.",
    ],
    inputs: voucher_inputs,
    outputs: voucher_outputs,
    accept: voucher_accept,
};

fn voucher_of(i: &Fields) -> Voucher {
    let currency = i.text("currency");
    Voucher {
        id: i.array("voucher_id"),
        user: i.text("user"),
        amount: Amount::new(i.int("amount_minor"), &currency).expect("an amount"),
        expiry_ms: i.int("expiry_ms"),
    }
}

fn voucher_inputs() -> Fields {
    let mut i = Fields::default();
    let issuer = fixed("voucher issuer key");
    i.put_bytes("issuer_private_key", &issuer);
    i.put_bytes("voucher_id", &fixed16("voucher id"));
    i.put_text("user", "alice");
    i.put_int("amount_minor", 5000);
    i.put_text("currency", "EUR");
    i.put_int("expiry_ms", 4_102_444_800_000i64);
    i.put_bytes("signature", &sign(&issuer, &voucher_of(&i).body()));
    i.put_int("frame_id", 5);
    i.put_text("release_password", "alice-release-pw");
    i
}

fn signed_voucher(i: &Fields) -> Signed {
    Signed {
        voucher: voucher_of(i),
        signature: i.bytes("signature"),
    }
}

fn topup_messages(i: &Fields) -> [(&'static str, Message); 2] {
    let v = voucher_of(i);
    [
        (
            "topup_frame",
            Message::TopUp {
                voucher: signed_voucher(i).encode(),
                password: Password::new(i.text("release_password")),
            },
        ),
        (
            "wallet_ok_frame",
            Message::WalletOk {
                balance_after: v.amount.minor,
            },
        ),
    ]
}

fn voucher_outputs(i: &Fields) -> Fields {
    let mut o = Fields::default();
    let issuer = p256_signer(&i.bytes("issuer_private_key"));
    o.put_bytes("issuer_public_key", issuer.public_key().as_ref());
    let spki = aws_lc_rs::encoding::AsDer::as_der(issuer.public_key()).expect("SPKI");
    o.put_bytes("issuer_spki", spki.as_ref());
    o.put_bytes("body", &voucher_of(i).body());
    o.put_bytes("voucher", &signed_voucher(i).encode());
    for (name, msg) in topup_messages(i) {
        o.put_bytes(name, &frame(i.uint("frame_id"), msg));
    }
    o
}

fn voucher_accept(i: &Fields, o: &Fields) {
    let bytes = o.bytes("voucher");
    let expiry = i.int("expiry_ms");
    for key in [o.bytes("issuer_spki"), o.bytes("issuer_public_key")] {
        assert_eq!(voucher::verify(&key, &bytes, expiry - 1), Ok(voucher_of(i)));
        assert_eq!(
            voucher::verify(&key, &bytes, expiry),
            Err(WalletError::BadVoucher("expired"))
        );
    }
    assert_eq!(Signed::decode(&bytes), Ok(signed_voucher(i)));
    for (name, msg) in topup_messages(i) {
        let f = decode_frame(&o.bytes(name));
        assert_eq!((f.id, f.msg), (i.uint("frame_id") as u32, msg), "{name}");
    }
}

// ---- cancellation authorisation and Cancel (§1.8, §1.9) ----

const CANCEL: Topic = Topic {
    file: "cancel.json",
    title: "A market's cancellation authorisation (v2) and the Cancel that carries it",
    spec: "docs/PROTOCOL.md §1.3, §1.8, §1.9, §3.1",
    notes: &[
        "cancel_private_key is the market's cancel-signing key (P-256 scalar), not its TLS key; cancel_cert is issued for it by market_ca_cert with CN \"market m1\" and the extended key usage id-kp-documentSigning (1.3.6.1.5.5.7.3.36); both are valid from 2025-01-01 to 2125-01-01.",
        "signature is ECDSA-P256 over SHA-256(body), DER; ECDSA is randomised, so a new signature differs but verifies the same.",
        "expiry_ms is absolute (Unix ms); the broker accepts the authorisation while now_ms < expiry_ms <= now_ms + 900000. direct_answer is the reference market's plaintext answer to the direct-channel request \"CANCEL \" || decision_id.",
        "wallet_ok_frame is the broker's answer to cancel_frame when the refund leaves balance_after.",
    ],
    inputs: cancel_inputs,
    outputs: cancel_outputs,
    accept: cancel_accept,
};

fn cancel_auth_of(i: &Fields) -> CancelAuth {
    CancelAuth {
        decision_id: i.text("decision_id"),
        market: i.text("market"),
        user: i.text("user"),
        nonce: i.array("nonce"),
        expiry_ms: i.uint("expiry_ms"),
    }
}

fn cancel_inputs() -> Fields {
    let mut i = Fields::default();
    let key = fixed("market cancel key");
    i.put_bytes("cancel_private_key", &key);
    let (ca, cert) = issued(
        "market CA key",
        "market m1 CA",
        "market m1",
        Usage::DocumentSigning,
        &key,
    );
    i.put_bytes("market_ca_cert", &ca);
    i.put_bytes("cancel_cert", &cert);
    i.put_text("decision_id", "019b7a3c2e0047a1b2c3d4e5f6a7b8c9");
    i.put_text("market", "m1");
    i.put_text("user", "alice");
    i.put_bytes("nonce", &fixed16("cancel nonce"));
    i.put_int("expiry_ms", TIME_MS + 300_000);
    i.put_bytes("signature", &sign(&key, &cancel_auth_of(&i).body()));
    i.put_int("frame_id", 7);
    i.put_int("balance_after", 10_000);
    i
}

fn signed_cancel(i: &Fields) -> SignedCancel {
    SignedCancel {
        auth: cancel_auth_of(i),
        signature: i.bytes("signature"),
        cert: i.bytes("cancel_cert"),
    }
}

fn cancel_messages(i: &Fields) -> [(&'static str, Message); 2] {
    [
        (
            "cancel_frame",
            Message::Cancel {
                decision_id: i.text("decision_id"),
                authorisation: signed_cancel(i).encode(),
            },
        ),
        (
            "wallet_ok_frame",
            Message::WalletOk {
                balance_after: i.int("balance_after"),
            },
        ),
    ]
}

fn cancel_outputs(i: &Fields) -> Fields {
    let mut o = Fields::default();
    let key = p256_signer(&i.bytes("cancel_private_key"));
    o.put_bytes("cancel_public_key", key.public_key().as_ref());
    o.put_bytes("body", &cancel_auth_of(i).body());
    let auth = signed_cancel(i).encode();
    o.put_bytes("authorisation", &auth);
    let mut answer = b"CANCEL-AUTH ".to_vec();
    keybroker::proto::wire::Put::put_bytes(&mut answer, &auth);
    o.put_bytes("direct_answer", &answer);
    for (name, msg) in cancel_messages(i) {
        o.put_bytes(name, &frame(i.uint("frame_id"), msg));
    }
    o
}

fn cancel_accept(i: &Fields, o: &Fields) {
    let signed = SignedCancel::decode(&o.bytes("authorisation")).expect("decodes");
    assert_eq!(signed, signed_cancel(i));
    assert!(signed.verify(&o.bytes("cancel_public_key")));
    let mut other = signed.clone();
    other.auth.user = "bob".into();
    assert!(!other.verify(&o.bytes("cancel_public_key")));
    // The certificate passes the broker's check, with the EKU it requires.
    let at = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_millis(
        TIME_MS as u64,
    ));
    let usage = webpki::KeyUsage::required(keybroker::cancel_auth::EKU_DOCUMENT_SIGNING);
    pki::verify_issued(
        &i.bytes("cancel_cert"),
        &i.bytes("market_ca_cert"),
        usage,
        at,
    )
    .expect("the cancel certificate verifies");
    assert!(
        pki::verify_issued(
            &i.bytes("cancel_cert"),
            &i.bytes("market_ca_cert"),
            webpki::KeyUsage::server_auth(),
            at
        )
        .is_err(),
        "a cancel certificate is not a TLS certificate"
    );
    for (name, msg) in cancel_messages(i) {
        let f = decode_frame(&o.bytes(name));
        assert_eq!((f.id, f.msg), (i.uint("frame_id") as u32, msg), "{name}");
    }
}
