//! The release is bound to the second password, tested with the HSM in
//! this process as well: an attacker who has the registry file *and* the
//! HSM PIN can rewrite and reseal a row, and still releases nothing; a
//! registry from before the binding and the row MACs is sealed by
//! `keybroker init` and each key bound at its next release. Real binary,
//! SoftHSM token, SQLite file.

mod common;

use common::*;
use keybroker::hsm::ops;
use keybroker::passwords::{self, Binding, Stored};
use keybroker::proto::ErrorCode;
use keybroker::rowmac::Sealer;
use keybroker::store::Store;
use rusqlite::{Connection, params};
use std::sync::Mutex;

/// The tests share one data directory (the one whose token this process
/// loads); each takes its own users, one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn db(env: &Env) -> Connection {
    Connection::open(env.data().join("keybroker.db")).unwrap()
}

fn log_has(log: &std::path::Path, what: &str) {
    wait_until(what, TIMEOUT, || {
        std::fs::read_to_string(log).is_ok_and(|l| l.contains(what))
    });
}

#[test]
fn a_pin_holder_who_rewrites_and_reseals_a_row_releases_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (env, hsm) = shared_env();
    let bob = env.user("pin-bob");
    let log = env.dir.path().join("pin.log");
    let b = env.broker_logging(Some(&log));
    released(&b, &bob, "pin-bob").logout().unwrap();

    // The attacker: hashes of passwords of their own, a verifier made with
    // the HSM for the second one, and the row sealed again with the HSM.
    let keys = hsm.key_handles().unwrap();
    let s = hsm.session().unwrap();
    let store = Store::open_sealed(
        &env.data().join("keybroker.db"),
        Sealer::hsm(hsm.clone(), Default::default()).unwrap(),
    )
    .unwrap();
    let rewrite = |pw_release: &str| {
        db(env)
            .execute(
                "UPDATE users SET pw_access = ?1, pw_release = ?2, mac = NULL WHERE id = 'pin-bob'",
                params![passwords::hash(b"known-1", 64, 1).unwrap(), pw_release],
            )
            .unwrap();
        assert_eq!(store.seal_unsealed().unwrap(), ["users/pin-bob"]);
    };
    let binding = Binding::new(64, 1).unwrap();
    let secret = binding.card_secret(b"known-2", "pin-bob").unwrap();
    let verifier = ops::release_verifier(&s, keys.registry_mac, &secret.kek_data).unwrap();
    rewrite(&binding.encode(&verifier));

    // The first password gates the balance only, which whoever has the
    // database reads in the ledger anyway: that login goes through.
    let mut t = b.connect(&bob);
    t.login("pin-bob", b"known-1").unwrap();
    // The second opens nothing: the verifier passes, the key does not
    // unwrap under the KEK of a password that is not bob's.
    assert_eq!(refused(t.release(b"known-2")), ErrorCode::WrongPassword);
    log_has(
        &log,
        "the second password was accepted but the key did not unwrap",
    );

    // Nor as a row from before the binding (a PHC hash): the old path
    // checks the hash, then the key does not unwrap under the master key.
    rewrite(&passwords::hash(b"known-2", 64, 1).unwrap());
    assert_eq!(refused(t.release(b"known-2")), ErrorCode::WrongPassword);
    // Each attempt counted: the third locks the card.
    assert_eq!(refused(t.release(b"known-2")), ErrorCode::Locked);
}

#[test]
fn a_registry_from_before_the_binding_is_sealed_and_bound_at_the_next_release() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (env, hsm) = shared_env();
    let carol = env.user("old-carol");
    let (p1, p2) = pw("old-carol");
    let keys = hsm.key_handles().unwrap();
    let s = hsm.session().unwrap();

    // Carol's row as the version before left it: the key wrapped under
    // the plain master key, the second password a PHC hash; and no row of
    // the registry with a MAC.
    let (point, legacy) = ops::generate_wrapped_user_key(&s, keys.master_wrap).unwrap();
    let sql = db(env);
    sql.execute(
        "UPDATE users SET wrapped_key = ?1, public_key = ?2, pw_release = ?3 WHERE id = 'old-carol'",
        params![legacy, point, passwords::hash(p2.as_bytes(), 64, 1).unwrap()],
    )
    .unwrap();
    for table in keybroker::store::SEALED {
        sql.execute(
            &format!("UPDATE {table} SET mac = NULL, generation = 0"),
            [],
        )
        .unwrap();
    }
    let out = env.kb(&["check"]);
    assert!(!out.0.status.success(), "unsealed rows fail the check");

    // The upgrade: `init` seals the registry as it is, once.
    let out = env.kb(&["init"]).success().stdout();
    assert!(out.contains("sealed users/old-carol"), "{out}");
    assert!(out.contains("sealed meta/kb-user-ca"), "{out}");
    let report = env.kb(&["check"]).success().stdout();
    assert!(
        report.contains("note users/old-carol: key not yet bound"),
        "{report}"
    );
    assert!(
        !env.kb(&["init"]).success().stdout().contains("sealed"),
        "a sealed registry is never sealed again"
    );

    // The next release checks the hash, binds the key, and releases it.
    let b = env.broker();
    released(&b, &carol, "old-carol").logout().unwrap();
    let row: (Vec<u8>, String) = sql
        .query_row(
            "SELECT wrapped_key, pw_release FROM users WHERE id = 'old-carol'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_ne!(row.0, legacy);
    let Some(Stored::Bound(binding, verifier)) = passwords::stored(&row.1) else {
        panic!("not bound: {}", row.1)
    };
    let report = env.kb(&["check"]).success().stdout();
    assert!(!report.contains("old-carol: key not yet bound"), "{report}");

    // From now on only the second password opens it: here, in this
    // process, the same key as before (its signature verifies under the
    // old public point); the master key no longer does.
    let secret = binding.card_secret(p2.as_bytes(), "old-carol").unwrap();
    let key = ops::open_bound_user_key(&s, &keys, &secret.kek_data, &verifier, &row.0)
        .unwrap()
        .expect("opens");
    let sig = ops::sign_p256(&s, key, b"t").unwrap();
    assert!(keybroker::exchange::verify_signature(&point, b"t", &sig));
    ops::destroy(&s, key).unwrap();
    assert!(ops::unwrap_user_key(&s, keys.master_wrap, &row.0).is_err());

    // A broker with no key lingering releases through the binding.
    drop(b);
    let b = env.broker();
    let mut t = b.connect(&carol);
    t.login("old-carol", p1.as_bytes()).unwrap();
    assert_eq!(refused(t.release(b"nope")), ErrorCode::WrongPassword);
    t.release(p2.as_bytes()).unwrap();
}
