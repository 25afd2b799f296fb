//! What a released home-card key and an exchange's ephemeral key are in the
//! HSM (real SoftHSM token): each does its one job, and nothing can read or
//! export it.

mod common;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use keybroker::exchange::{Ephemeral, Group, Point};
use keybroker::hsm::ops::{self, KekUse, Refusal};
use keybroker::passwords::Binding;

const FLAGS: [AttributeType; 8] = [
    AttributeType::Token,
    AttributeType::Sensitive,
    AttributeType::Extractable,
    AttributeType::Sign,
    AttributeType::Derive,
    AttributeType::Decrypt,
    AttributeType::Unwrap,
    AttributeType::Value,
];

/// The key's boolean attributes among [`FLAGS`]; panics if its value is
/// readable.
fn flags(s: &Session, key: ObjectHandle) -> impl Fn(AttributeType) -> Option<bool> {
    let attrs = s.get_attributes(key, &FLAGS).unwrap();
    assert!(
        !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
        "the private value is never returned"
    );
    move |want| {
        attrs.iter().find_map(|a| match (a, want) {
            (Attribute::Token(v), AttributeType::Token)
            | (Attribute::Sensitive(v), AttributeType::Sensitive)
            | (Attribute::Extractable(v), AttributeType::Extractable)
            | (Attribute::Sign(v), AttributeType::Sign)
            | (Attribute::Derive(v), AttributeType::Derive)
            | (Attribute::Decrypt(v), AttributeType::Decrypt)
            | (Attribute::Unwrap(v), AttributeType::Unwrap) => Some(*v),
            _ => None,
        })
    }
}

/// Asserts a sensitive, non-extractable session key whose only use is `only`.
fn assert_only(s: &Session, key: ObjectHandle, only: AttributeType) {
    let flag = flags(s, key);
    assert_eq!(flag(AttributeType::Token), Some(false), "a session object");
    assert_eq!(flag(AttributeType::Sensitive), Some(true));
    assert_eq!(flag(AttributeType::Extractable), Some(false));
    assert_eq!(flag(only), Some(true));
    for other in [
        AttributeType::Sign,
        AttributeType::Derive,
        AttributeType::Decrypt,
        AttributeType::Unwrap,
    ] {
        if other != only {
            assert_ne!(flag(other), Some(true), "{other:?}: it may only {only:?}");
        }
    }
}

#[test]
fn a_released_key_signs_and_cannot_be_read_or_exported() {
    let hsm = common::shared_hsm();
    let keys = hsm.key_handles().unwrap();
    let s = hsm.session().unwrap();
    let secret = Binding::new(64, 1)
        .unwrap()
        .card_secret(b"second", "bob")
        .unwrap();
    let (point, wrapped, verifier) =
        ops::generate_bound_user_key(&s, &keys, &secret.kek_data).unwrap();
    let key = ops::open_bound_user_key(&s, &keys, &secret.kek_data, &verifier, &wrapped)
        .unwrap()
        .expect("the right password opens it");

    assert_only(&s, key, AttributeType::Sign);
    assert!(
        s.wrap_key(&Mechanism::AesKeyWrapPad, keys.master_wrap, key)
            .is_err(),
        "not even wrapped under the master key"
    );

    let msg = b"transcript";
    let sig = ops::sign_p256(&s, key, msg).unwrap();
    assert!(keybroker::exchange::verify_signature(&point, msg, &sig));
    ops::destroy(&s, key).unwrap();
}

/// The release is bound to the second password: the HSM derives the key
/// that unwraps a home-card key from data only the right password gives
/// for that user, and only the HSM can tell whether data is right.
#[test]
fn a_bound_key_opens_only_with_its_users_second_password() {
    let hsm = common::shared_hsm();
    let keys = hsm.key_handles().unwrap();
    let s = hsm.session().unwrap();
    let b = Binding::new(64, 1).unwrap();
    let right = b.card_secret(b"second", "bob").unwrap();
    let (point, wrapped, verifier) =
        ops::generate_bound_user_key(&s, &keys, &right.kek_data).unwrap();
    let open = |data: &[u8; 32], verifier: &[u8; 32], blob: &[u8]| {
        ops::open_bound_user_key(&s, &keys, data, verifier, blob)
    };
    for (pw, user) in [(&b"guess"[..], "bob"), (b"second", "alice")] {
        let data = b.card_secret(pw, user).unwrap().kek_data;
        assert!(
            matches!(
                open(&data, &verifier, &wrapped).unwrap(),
                Err(Refusal::Password)
            ),
            "{user}: refused as a wrong password"
        );
        // Its own verifier, as someone with the PIN could make: the
        // verifier passes and the key still does not unwrap.
        let forged = ops::release_verifier(&s, keys.registry_mac, &data).unwrap();
        assert!(
            matches!(
                open(&data, &forged, &wrapped).unwrap(),
                Err(Refusal::Blob(_))
            ),
            "{user}"
        );
    }
    assert!(
        ops::unwrap_user_key(&s, keys.master_wrap, &wrapped).is_err(),
        "the master key alone opens nothing"
    );
    // The KEK can only unwrap and is never readable; the base only derives.
    let kek = ops::derive_kek(&s, keys.kek_base, &right.kek_data, KekUse::Unwrap).unwrap();
    assert_only(&s, kek, AttributeType::Unwrap);
    ops::destroy(&s, kek).unwrap();
    assert!(
        s.encrypt(&Mechanism::AesEcb, keys.kek_base, &[0; 16])
            .is_err()
    );

    // A blob from before the binding, wrapped again under the KEK inside
    // the HSM, opens the same key.
    let (old_point, legacy) = ops::generate_wrapped_user_key(&s, keys.master_wrap).unwrap();
    let (rewrapped, again) =
        ops::rewrap_legacy_user_key(&s, &keys, &right.kek_data, &legacy).unwrap();
    assert_eq!(
        again, verifier,
        "the verifier is of the password, not the blob"
    );
    for (point, blob) in [(&point, &wrapped), (&old_point, &rewrapped)] {
        let key = open(&right.kek_data, &verifier, blob)
            .unwrap()
            .expect("opens");
        let sig = ops::sign_p256(&s, key, b"t").unwrap();
        assert!(keybroker::exchange::verify_signature(point, b"t", &sig));
        ops::destroy(&s, key).unwrap();
    }
}

#[test]
fn an_ephemeral_exchange_key_only_derives_and_agrees_with_software() {
    let hsm = common::shared_hsm();
    let keys = hsm.key_handles().unwrap();
    let s = hsm.session().unwrap();
    let (point, private) = ops::generate_ephemeral(&s).unwrap();
    assert_only(&s, private, AttributeType::Derive);
    assert!(
        s.wrap_key(&Mechanism::AesKeyWrapPad, keys.master_wrap, private)
            .is_err(),
        "not even wrapped under the master key"
    );
    assert!(
        ops::sign_digest_p256(&s, private, &[1; 32]).is_err(),
        "it cannot sign"
    );

    // X from the HSM's ECDH equals X from the market's side in software.
    let mine = Point::new(Group::P256, &point).unwrap();
    let market = Ephemeral::generate(Group::P256);
    let t = [3u8; 32];
    let input = keybroker::exchange::x_input(&t, &market.public);
    let x = ops::derive_x(&s, private, market.public.as_bytes(), &input).unwrap();
    let theirs = market.x(&mine, &t, &market.public).unwrap();
    assert_eq!(x.as_slice(), &theirs[..]);
}

#[test]
fn the_module_locks_with_our_mutexes_under_concurrent_signing() {
    let hsm = common::shared_hsm();
    assert!(
        keybroker::hsm::locks::made() > 0,
        "SoftHSM made its mutexes through our callbacks"
    );
    let keys = hsm.key_handles().unwrap();
    let s = hsm.session().unwrap();
    let (point, wrapped) = ops::generate_wrapped_user_key(&s, keys.master_wrap).unwrap();
    let key = ops::unwrap_user_key(&s, keys.master_wrap, &wrapped).unwrap();
    // Four threads, each in its own session, sign with the one shared key
    // and make and destroy session objects: SoftHSM's session table and
    // the key's object are contended on our mutexes.
    std::thread::scope(|scope| {
        for i in 0..4u8 {
            let (hsm, point) = (&hsm, &point);
            scope.spawn(move || {
                let s = hsm.session().unwrap();
                for n in 0..150u8 {
                    let msg = [i, n];
                    let sig = ops::sign_p256(&s, key, &msg).unwrap();
                    assert!(keybroker::exchange::verify_signature(point, &msg, &sig));
                    let (_, private) = ops::generate_ephemeral(&s).unwrap();
                    ops::destroy(&s, private).unwrap();
                }
            });
        }
    });
    ops::destroy(&s, key).unwrap();
}

/// The two key holders behind `KeyOps`, the home card (SoftHSM, through a
/// broker HSM worker) and the deterministic software card of the
/// simulation, run the same exchange jobs to the same contract: T signed
/// with the user's key over the holder's own ephemeral, X agreed with the
/// market's side, and an ephemeral whose signature failed destroyed.
#[test]
fn both_key_holders_run_the_same_jobs_to_the_same_contract() {
    use keybroker::exchange::flow::KeyJob;
    use keybroker::exchange::keyops::{KeyDone, KeyOps, SoftCard};
    use keybroker::exchange::{Mode, Transcript, verify_signature, x_input};

    fn transcript() -> Transcript {
        Transcript {
            mode: Mode::Full,
            market: "m".into(),
            user: "bob".into(),
            cert_fingerprint: [1; 32],
            request_id: 3,
            ephemeral: Point::UNSET,
            time_ms: 9,
            nonce: [2; 16],
            binding: [4; 32],
        }
    }

    fn contract<O: KeyOps>(ops: &O, key: O::Key, public: &[u8])
    where
        O::Error: std::fmt::Debug,
    {
        let t = transcript();
        let KeyDone::KeygenSigned {
            point,
            private,
            digest,
            signature,
        } = KeyJob::KeygenSign {
            transcript: t.clone(),
        }
        .run(ops, key)
        .unwrap()
        else {
            panic!("not a keygen answer")
        };
        let mut signed = t;
        signed.ephemeral = point;
        assert_eq!(signed.digest(), digest);
        assert!(verify_signature(public, &signed.preimage(), &signature));
        let market = Ephemeral::generate(Group::P256);
        let KeyDone::Derived(x) = KeyJob::Derive {
            private,
            peer: market.public,
            input: x_input(&digest, &market.public),
        }
        .run(ops, key)
        .unwrap() else {
            panic!("not a derive answer")
        };
        let theirs = market.x(&point, &digest, &market.public).unwrap();
        assert_eq!(*x, *theirs);
    }

    let hsm = common::shared_hsm();
    let keys = hsm.key_handles().unwrap();
    let w = keybroker::broker::HsmWorker::new(hsm.clone(), keys).unwrap();
    let (public, wrapped) = ops::generate_wrapped_user_key(&w.session, keys.master_wrap).unwrap();
    let user = w.session_key(ops::unwrap_user_key(&w.session, keys.master_wrap, &wrapped).unwrap());
    contract(&w, user, &public);
    let card = SoftCard::new([7; 32], 1);
    contract(&card, 0, &card.public(0));
    assert_eq!(card.live(), 0);

    // A key from before a recovery is stale: the ephemeral made for the
    // job is destroyed, on the token as in the software card.
    let session_objects = |s: &Session| s.find_objects(&[Attribute::Token(false)]).unwrap().len();
    let before = session_objects(&w.session);
    let stale = keybroker::hsm::SessionKey {
        epoch: user.epoch + 1,
        ..user
    };
    let job = KeyJob::<keybroker::hsm::SessionKey>::KeygenSign {
        transcript: transcript(),
    };
    assert!(job.run(&w, stale).is_err());
    assert_eq!(session_objects(&w.session), before, "the ephemeral is gone");
    ops::destroy(&w.session, user.handle).unwrap();
}
