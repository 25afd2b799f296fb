//! The crypto floor, measured in a child process of the same run
//! (`keybroker-bench floor`), single-threaded, in thread CPU time.
//!
//! Each item is timed in 7 batches sized to ~`batch_ms` of CPU; the figure
//! is the median batch's CPU per op, `spread_pct` the half range of the
//! middle five batches relative to it.

use crate::transport::Shape;
use anyhow::{Context, Result};
use cpu_time::{ProcessTime, ThreadTime};
use keybroker::broker::tls::{RotatingCert, provider, server_config};
use keybroker::exchange::{self, Ephemeral, Group};
use keybroker::hsm::{Hsm, ops};
use keybroker::proto::direct;
use keybroker::terminal::TerminalConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConnection, RootCertStore, ServerConnection};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

struct Item {
    us: f64,
    spread_pct: f64,
    iterations: u64,
}

/// Times `f` (which returns the CPU time to count for one op, or None to
/// count the whole call).
fn measure(batch_ms: u64, mut f: impl FnMut() -> Option<Duration>) -> Item {
    let mut one = || {
        let t = ThreadTime::now();
        let counted = f();
        counted.unwrap_or_else(|| t.elapsed())
    };
    // Calibrate.
    let mut cal = Duration::ZERO;
    let mut k = 0u32;
    while k < 10 && (k < 2 || cal < Duration::from_millis(20)) {
        cal += one();
        k += 1;
    }
    let per = cal.as_secs_f64() / f64::from(k);
    let n = ((batch_ms as f64 / 1000.0) / per.max(1e-7)).clamp(3.0, 200_000.0) as u64;
    let mut batches: Vec<f64> = (0..7)
        .map(|_| {
            let mut sum = Duration::ZERO;
            for _ in 0..n {
                sum += one();
            }
            sum.as_secs_f64() * 1e6 / n as f64
        })
        .collect();
    batches.sort_by(f64::total_cmp);
    let med = batches[3];
    Item {
        us: med,
        spread_pct: (batches[5] - batches[1]) / 2.0 / med * 100.0,
        iterations: n * 7,
    }
}

/// Blocking clients of the transport floor: the session scenarios' peak
/// is at 16 to 32 workers.
const TRANSPORT_CLIENTS: usize = 32;

/// A transport item: server CPU per op, the median of its windows.
fn transport_json(m: &crate::transport::Measured) -> Value {
    json!({
        "cpu_us_per_op": m.us,
        "ops_per_cpu_s": 1e6 / m.us,
        "spread_pct": m.spread_pct,
        "clients": TRANSPORT_CLIENTS,
        "server_threads": crate::transport::SERVER_THREADS,
    })
}

fn item_json(i: &Item) -> Value {
    json!({
        "cpu_us_per_op": i.us,
        "ops_per_cpu_s": 1e6 / i.us,
        "spread_pct": i.spread_pct,
        "iterations": i.iterations,
    })
}

/// Moves TLS bytes between an in-memory client and server until both are
/// quiet; returns the server's CPU time.
fn pump(c: &mut ClientConnection, s: &mut ServerConnection) -> Result<Duration> {
    let mut server = Duration::ZERO;
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let mut moved = false;
        while c.wants_write() {
            buf.clear();
            c.write_tls(&mut buf)?;
            let t = ThreadTime::now();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd)?;
                s.process_new_packets()?;
            }
            server += t.elapsed();
            moved = true;
        }
        while s.wants_write() {
            buf.clear();
            let t = ThreadTime::now();
            s.write_tls(&mut buf)?;
            server += t.elapsed();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd)?;
                c.process_new_packets()?;
            }
            moved = true;
        }
        if !moved {
            return Ok(server);
        }
    }
}

/// One handshake; the server-side CPU (connection set-up, handshake,
/// tickets, X' export).
fn handshake(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
    want_resumed: bool,
) -> Result<Duration> {
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut c = ClientConnection::new(client.clone(), name)?;
    let t = ThreadTime::now();
    let mut s = ServerConnection::new(server.clone())?;
    let mut cpu = t.elapsed();
    cpu += pump(&mut c, &mut s)?;
    anyhow::ensure!(
        !c.is_handshaking() && !s.is_handshaking(),
        "handshake stalled"
    );
    let resumed = c.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    anyhow::ensure!(
        resumed == want_resumed,
        "resumed = {resumed}, wanted {want_resumed}"
    );
    let t = ThreadTime::now();
    std::hint::black_box(keybroker::crypto::AccessKeys::export(&*s)?);
    cpu += t.elapsed();
    Ok(cpu)
}

/// What one thread waking another costs here, in CPU per wake-up: two
/// threads pass a byte back and forth over two pipes, wherever the
/// scheduler puts them. No floor counts it, but every hop between the
/// terminal, the broker and the market pays one or two wake-ups when the
/// other side sleeps, and on a VM whose idle CPUs halt each is dear
/// (docs/BENCH.md, "Wake-ups").
fn wakeup(batch_ms: u64) -> Result<Item> {
    let (mut ping_r, mut ping_w) = std::io::pipe()?;
    let (mut pong_r, mut pong_w) = std::io::pipe()?;
    let peer = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        while matches!(ping_r.read(&mut b), Ok(1)) {
            if pong_w.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut b = [0u8; 1];
    let item = measure(batch_ms, || {
        let t = ProcessTime::now();
        ping_w.write_all(b"x").expect("ping");
        pong_r.read_exact(&mut b).expect("pong");
        Some(t.elapsed() / 2)
    });
    drop(ping_w);
    let _ = peer.join();
    Ok(item)
}

/// Runs every floor item against the bench's data dir and returns JSON.
pub fn run(config: &Path, terminal_dir: &Path, user: &str, quick: bool) -> Result<Value> {
    let batch_ms = if quick { 30 } else { 120 };
    let cfg = keybroker::config::Config::load(Some(config), None)?;
    let hsm = Arc::new(Hsm::open(&cfg).context("opening the HSM")?);
    let keys = hsm.key_handles()?;
    let s = hsm.session()?;
    let sealer = keybroker::rowmac::Sealer::hsm(hsm.clone(), Default::default())?;
    let store = keybroker::store::Store::open_sealed(&cfg.db_path(), sealer)?;
    let rec = store.user_get(user)?.context("bench user missing")?;
    // The release: the second password's argon2id and the KEK it gives.
    let (first, second) = crate::env::passwords(user);
    let Some(keybroker::passwords::Stored::Bound(binding, verifier)) =
        keybroker::passwords::stored(&rec.pw_release)
    else {
        anyhow::bail!("the bench user's key is not bound to its second password");
    };
    let secret = binding.card_secret(second.as_bytes(), user)?;
    let open = || {
        ops::open_bound_user_key(&s, &keys, &secret.kek_data, &verifier, &rec.wrapped_key)?
            .map_err(|r| anyhow::anyhow!("the bench user's key does not open: {r:?}"))
    };
    let user_key = open()?;

    let digest = [7u8; 32];
    // The bench's software exchanges are X25519; SoftHSM's are P-256.
    let peer = Ephemeral::generate(Group::X25519);
    let peer_p256 = Ephemeral::generate(Group::P256);
    let t = [9u8; 32];
    let wrap_key = [3u8; 32];
    let x = [5u8; 32];

    let sign = measure(batch_ms, || {
        ops::sign_digest_p256(&s, user_key, &digest).expect("HSM sign");
        None
    });
    let ecdh_sw = measure(batch_ms, || {
        let e = Ephemeral::generate(Group::X25519);
        std::hint::black_box(e.x(&peer.public, &t, &peer.public).expect("ECDH"));
        None
    });
    let ecdh_hsm = measure(batch_ms, || {
        let (_point, private) = ops::generate_ephemeral(&s).expect("HSM keygen");
        let data = exchange::x_input(&t, &peer_p256.public);
        let point = peer_p256.public.as_bytes();
        std::hint::black_box(ops::derive_x(&s, private, point, &data).expect("HSM derive"));
        None
    });
    let wrap = measure(batch_ms, || {
        std::hint::black_box(exchange::wrap(&wrap_key, &x));
        None
    });
    let unwrap_user = measure(batch_ms, || {
        let h = open().expect("unwrap");
        ops::destroy(&s, h).expect("destroy");
        None
    });

    // Market share: verify the user's signature, ECDH, HMAC to X, for a
    // software (X25519) exchange.
    let preimage = vec![1u8; 250];
    let sig = ops::sign_p256(&s, user_key, &preimage)?;
    anyhow::ensure!(
        exchange::verify_signature(&rec.public_key, &preimage, &sig),
        "user signature does not verify"
    );
    let market = measure(batch_ms, || {
        assert!(exchange::verify_signature(&rec.public_key, &preimage, &sig));
        let e = Ephemeral::generate(Group::X25519);
        std::hint::black_box(e.x(&peer.public, &t, &e.public).expect("ECDH"));
        None
    });
    // Terminal share: unwrap X, the direct channel's handshake (the
    // initiator's half) and one sealed record. The market's half of the
    // handshake runs in between, uncounted here, counted in `direct_market`.
    let wrapped = exchange::wrap(&wrap_key, &x);
    let sid = [1u8; 16];
    let terminal = measure(batch_ms, || {
        let t0 = ThreadTime::now();
        let x = exchange::unwrap(&wrap_key, &wrapped).expect("unwrap");
        let mut hello = Vec::with_capacity(80);
        let init = direct::Initiator::start(&x, sid, &mut hello);
        let mut counted = t0.elapsed();
        let mut ok = Vec::with_capacity(64);
        let _m = direct::Hello::parse(&hello[5..])
            .and_then(|h| h.accept(&x, &mut ok))
            .expect("market half");
        let t1 = ThreadTime::now();
        let mut ch = init.finish(&ok[5..]).expect("handshake");
        let mut out = Vec::with_capacity(128);
        ch.seal(b"bench quote", &mut out);
        std::hint::black_box(out);
        counted += t1.elapsed();
        Some(counted)
    });
    // The market's half of one direct connection, before and after the
    // per-connection handshake (issue 20), in this same run: v1 derived two
    // AES-GCM keys from X by HKDF (no per-connection randomness); v2 is the
    // Noise NNpsk0 responder. Each then opens one request and seals one answer.
    let (direct_v1, direct_market) = direct_market_floor(batch_ms, &x);
    ops::destroy(&s, user_key)?;
    // The password check (reported apart from the session figures): one
    // argon2id verification with the user's stored hash and parameters.
    let argon = measure(batch_ms.max(200), || {
        assert!(keybroker::passwords::verify(
            first.as_bytes(),
            &rec.pw_access
        ));
        None
    });
    // The second password's: one argon2id run to K, then its two HMACs.
    let argon_release = measure(batch_ms.max(200), || {
        std::hint::black_box(
            binding
                .card_secret(second.as_bytes(), user)
                .expect("argon2id"),
        );
        None
    });

    // TLS: the broker's own server config (client auth against the real
    // terminal CA, tickets), a P-256 server key like the broker's, and a
    // real enrolled terminal as client.
    let provider = provider();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&kp)?;
    let signing = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            kp.serialize_der(),
        )))?;
    let ck = Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    ));
    let ca_pem = std::fs::read_to_string(cfg.pki_dir().join("terminal-ca.pem"))?;
    let ca_der = keybroker::pki::read_cert_pem(&ca_pem)?;
    let server = server_config(
        provider,
        &ca_der,
        Arc::new(RotatingCert::new(ck)),
        rustls::crypto::aws_lc_rs::Ticketer::new()?,
    )?;
    let read = |f: &str| std::fs::read(terminal_dir.join(f));
    let certs: Vec<CertificateDer<'static>> = keybroker::pki::certs_pem(&read("terminal.crt")?)?;
    let key = keybroker::pki::private_key_pem(&read("terminal.key")?)?;
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone())?;
    let tc = TerminalConfig::new(roots, Some((certs, key)))?;
    let full_client = crate::ops::no_resume(&tc).client;
    let resume_client = crate::ops::own_tickets(&tc).client;
    handshake(&resume_client, &server, false)?;
    let tls_full = measure(batch_ms, || {
        Some(handshake(&full_client, &server, false).expect("full handshake"))
    });
    let tls_resumed = measure(batch_ms, || {
        Some(handshake(&resume_client, &server, true).expect("resumed handshake"))
    });

    let wake = wakeup(batch_ms)?;
    // The loopback transport, beside the crypto (transport.rs).
    let ms = Duration::from_millis;
    let (warm, window, windows) = if quick {
        (ms(200), ms(250), 3)
    } else {
        (ms(300), ms(600), 5)
    };
    let tcp_session =
        crate::transport::measure(Shape::Session, TRANSPORT_CLIENTS, warm, window, windows)?;
    let tcp_round_trip =
        crate::transport::measure(Shape::RoundTrip, TRANSPORT_CLIENTS, warm, window, windows)?;

    let sw = sign.us + ecdh_sw.us + wrap.us;
    let hw = sign.us + ecdh_hsm.us + wrap.us;
    // The user's key is unwrapped once per user, not per session (a user's
    // sessions share it, docs/DECISIONS.md), so it is reported as an item,
    // not counted in the per-session floor. The handshake is the broker's own
    // server config: a returning terminal's chain was verified before and is
    // remembered, its CertificateVerify is checked every time (as here).
    let connect = tls_full.us;
    let per = |us: f64, parts: &str| json!({"cpu_us_per_op": us, "ops_per_cpu_s": 1e6 / us, "parts": parts});
    Ok(json!({
        "items": {
            "hsm_sign_user_key": item_json(&sign),
            "ecdh_software_x25519_keygen_agree_hmac": item_json(&ecdh_sw),
            "ecdh_hsm_p256_keygen_derive_hmac": item_json(&ecdh_hsm),
            "wrap_x_aes_kwp": item_json(&wrap),
            "hsm_unwrap_user_key_and_destroy": item_json(&unwrap_user),
            "tls13_full_handshake_client_auth_server_side": item_json(&tls_full),
            "tls13_resumed_handshake_server_side": item_json(&tls_resumed),
            "market_verify_ecdh_x25519_hmac": item_json(&market),
            "terminal_unwrap_handshake_seal": item_json(&terminal),
            "direct_market_side_v1_hkdf_keys": item_json(&direct_v1),
            "direct_market_side_noise_nnpsk0": item_json(&direct_market),
            "argon2id_password_check": item_json(&argon),
            "argon2id_release_secret": item_json(&argon_release),
            "thread_wakeup_process_cpu": item_json(&wake),
            "loopback_tcp_session_server_side": transport_json(&tcp_session),
            "loopback_tcp_round_trip_server_side": transport_json(&tcp_round_trip),
        },
        "floors": {
            "exchange_software": per(sw, "hsm_sign_user_key + ecdh_software_x25519_keygen_agree_hmac + wrap_x_aes_kwp"),
            "exchange_hsm": per(hw, "hsm_sign_user_key + ecdh_hsm_p256_keygen_derive_hmac + wrap_x_aes_kwp"),
            "exchange_partial": per(sign.us, "hsm_sign_user_key"),
            "connect": per(connect, "tls13_full_handshake_client_auth_server_side (a returning terminal: chain remembered, CertificateVerify checked; argon2id excluded, reported apart; hsm_unwrap_user_key_and_destroy once per user)"),
            "resume": per(tls_resumed.us, "tls13_resumed_handshake_server_side (argon2id excluded, reported apart)"),
            "market_share": per(market.us, "market_verify_ecdh_x25519_hmac"),
            "terminal_share": per(terminal.us, "terminal_unwrap_handshake_seal"),
            "direct_market": per(direct_market.us, "direct_market_side_noise_nnpsk0"),
        },
        // Not the floor_ratio's denominator: what the broker could reach
        // on this machine's loopback with no code of its own at all.
        "with_transport": {
            "connect": per(connect + tcp_session.us, "floors.connect + loopback_tcp_session_server_side"),
            "resume": per(tls_resumed.us + tcp_session.us, "floors.resume + loopback_tcp_session_server_side"),
            "exchange_software": per(sw + tcp_round_trip.us, "floors.exchange_software + loopback_tcp_round_trip_server_side (the market link's batched share not counted)"),
            "exchange_hsm": per(hw + tcp_round_trip.us, "floors.exchange_hsm + loopback_tcp_round_trip_server_side (the market link's batched share not counted)"),
        }
    }))
}

/// The market's CPU for one direct connection with one request: the v1
/// key schedule (kept here only as the "before" of the measurement) and the
/// Noise handshake that replaced it.
fn direct_market_floor(batch_ms: u64, x: &[u8; 32]) -> (Item, Item) {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
    let sid = [1u8; 16];
    let v1_key = |info: &[u8]| {
        let prk = Salt::new(HKDF_SHA256, &sid).extract(x);
        let info = [info];
        let okm = prk.expand(&info, &AES_256_GCM).expect("HKDF");
        LessSafeKey::new(UnboundKey::from(okm))
    };
    let request = b"bench quote";
    // v1 had no per-connection state, so one sealed request served every
    // connection (the replay issue 20 closed): seal it once, outside.
    let mut sealed = request.to_vec();
    let tag = v1_key(b"keybroker direct c2s v1")
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(&sid),
            &mut sealed,
        )
        .expect("seal");
    sealed.extend_from_slice(tag.as_ref());
    let v1 = measure(batch_ms, || {
        let (c2s, s2c) = (
            v1_key(b"keybroker direct c2s v1"),
            v1_key(b"keybroker direct s2c v1"),
        );
        let mut rec = sealed.clone();
        let mut answer = c2s
            .open_in_place(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(&sid),
                &mut rec,
            )
            .expect("open")
            .to_vec();
        let tag = s2c
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(&sid),
                &mut answer,
            )
            .expect("seal");
        answer.extend_from_slice(tag.as_ref());
        std::hint::black_box(answer);
        None
    });
    let v2 = measure(batch_ms, || {
        let mut hello = Vec::with_capacity(80);
        let init = direct::Initiator::start(x, sid, &mut hello);
        let t = ThreadTime::now();
        let mut ok = Vec::with_capacity(64);
        let mut m = direct::Hello::parse(&hello[5..])
            .and_then(|h| h.accept(x, &mut ok))
            .expect("market half");
        let mut counted = t.elapsed();
        let mut t_side = init.finish(&ok[5..]).expect("handshake");
        let mut rec = Vec::with_capacity(64);
        t_side.seal(request, &mut rec);
        let t = ThreadTime::now();
        let plain = m.open(&rec[5..]).expect("open");
        let mut answer = Vec::with_capacity(64);
        m.seal(&plain, &mut answer);
        std::hint::black_box(answer);
        counted += t.elapsed();
        Some(counted)
    });
    (v1, v2)
}
