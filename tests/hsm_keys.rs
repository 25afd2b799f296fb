//! What a released home-card key is in the HSM (real SoftHSM token): it
//! signs, and nothing can read or export it.

mod common;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType};
use keybroker::hsm::ops;

#[test]
fn a_released_key_signs_and_cannot_be_read_or_exported() {
    let hsm = common::shared_hsm();
    let keys = hsm.key_handles().unwrap();
    let s = hsm.session().unwrap();
    let (point, wrapped) = ops::generate_wrapped_user_key(&s, keys.master_wrap).unwrap();
    let key = ops::unwrap_user_key(&s, keys.master_wrap, &wrapped).unwrap();

    let attrs = s
        .get_attributes(
            key,
            &[
                AttributeType::Token,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Sign,
                AttributeType::Derive,
                AttributeType::Decrypt,
                AttributeType::Unwrap,
                AttributeType::Value,
            ],
        )
        .unwrap();
    let flag = |want: AttributeType| {
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
    };
    assert_eq!(flag(AttributeType::Token), Some(false), "a session object");
    assert_eq!(flag(AttributeType::Sensitive), Some(true));
    assert_eq!(flag(AttributeType::Extractable), Some(false));
    assert_eq!(flag(AttributeType::Sign), Some(true));
    for other in [
        AttributeType::Derive,
        AttributeType::Decrypt,
        AttributeType::Unwrap,
    ] {
        assert_ne!(flag(other), Some(true), "{other:?}: it may only sign");
    }
    assert!(
        !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
        "the private value is never returned"
    );
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
