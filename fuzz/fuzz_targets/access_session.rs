//! The access session state machine driven by random event sequences:
//! frames from the terminal and check results in any order. Never panics,
//! and never reaches Released without a successful release check.
#![no_main]

use keybroker::proto::ErrorCode;
use keybroker::proto::access::{Frame, Message, Password};
use keybroker::proto::session::{AccessSession, Action};
use libfuzzer_sys::fuzz_target;

fn code(b: u8) -> Result<(), ErrorCode> {
    if b % 3 == 0 {
        Ok(())
    } else {
        Err(ErrorCode::ALL[usize::from(b) % ErrorCode::ALL.len()])
    }
}

fuzz_target!(|data: &[u8]| {
    let mut s = AccessSession::new([0; 32]);
    let mut release_ok = false;
    for (i, pair) in data.chunks(2).enumerate() {
        let (ev, arg) = (pair[0], *pair.get(1).unwrap_or(&0));
        let id = i as u32;
        let msg = match ev % 8 {
            0 => Message::Login {
                user: "u".into(),
                password: Password::new(vec![arg]),
            },
            1 => Message::Release {
                password: Password::new(vec![arg]),
            },
            2 => Message::Exchange { market: "m".into() },
            3 => Message::Ping,
            4 => Message::Logout,
            5 => {
                let _ = s.login_done(id, "u".into(), code(arg));
                continue;
            }
            6 => {
                let r = code(arg);
                let was = s.is_released();
                let _ = s.release_done(id, r);
                if s.is_released() && !was {
                    assert!(r.is_ok());
                    release_ok = true;
                }
                continue;
            }
            _ => {
                let _ = s.request_done(id, code(arg).map(|()| Message::Pong));
                continue;
            }
        };
        match s.handle(Frame { id, msg }) {
            Action::Exchange { .. } => assert!(s.is_released()),
            Action::CheckRelease { .. } => assert!(s.user().is_some()),
            _ => {}
        }
        if s.is_released() {
            assert!(release_ok);
        }
    }
});
