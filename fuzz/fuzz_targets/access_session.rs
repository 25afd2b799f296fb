//! The access session state machine driven by random event sequences:
//! frames from the terminal, and the results of the checks it asked for
//! delivered late, after other frames or never. Never panics, never
//! reaches Released without a successful release check, and only the
//! session's own proofs carry results back (the types see to that).
#![no_main]

use keybroker::proto::ErrorCode;
use keybroker::proto::access::{Frame, Message, Password};
use keybroker::proto::session::{
    AccessSession, Action, LoginCheck, ReleaseCheck, Request, Work,
};
use libfuzzer_sys::fuzz_target;

fn code(b: u8) -> Result<(), ErrorCode> {
    if b % 3 == 0 {
        Ok(())
    } else {
        Err(ErrorCode::ALL[usize::from(b) % ErrorCode::ALL.len()])
    }
}

/// What the session asked for and has no answer to yet.
enum Asked {
    Login(LoginCheck),
    Release(ReleaseCheck),
    Request(Request),
}

fuzz_target!(|data: &[u8]| {
    let mut s = AccessSession::<u8>::new([0; 32]);
    let mut asked = None;
    let mut release_ok = false;
    for (i, pair) in data.chunks(2).enumerate() {
        let (ev, arg) = (pair[0], *pair.get(1).unwrap_or(&0));
        let id = i as u32;
        let msg = match ev % 7 {
            0 => Message::Login {
                user: "u".into(),
                password: Password::new(vec![arg]),
            },
            1 => Message::Release {
                password: Password::new(vec![arg]),
            },
            2 => Message::Exchange { market: "m".into() },
            3 => Message::Balance,
            4 => Message::Ping,
            5 => Message::Logout,
            _ => {
                let r = code(arg);
                let was = s.is_released();
                let _ = match asked.take() {
                    Some(Asked::Login(c)) => s.login_done(c, r),
                    Some(Asked::Release(c)) => s.release_done(c, r.map(|()| arg)),
                    Some(Asked::Request(q)) => s.request_done(q, r.map(|()| Message::Pong)),
                    None => continue,
                };
                if s.is_released() && !was {
                    assert!(r.is_ok());
                    release_ok = true;
                }
                continue;
            }
        };
        match s.handle(Frame { id, msg }) {
            Action::Work(Work::CheckLogin { check, .. }) => asked = Some(Asked::Login(check)),
            Action::Work(Work::CheckRelease { check, .. }) => {
                assert_eq!(s.user(), Some(check.user()));
                asked = Some(Asked::Release(check));
            }
            Action::Work(Work::Exchange { req, .. }) => {
                assert!(s.is_released());
                asked = Some(Asked::Request(req));
            }
            Action::Work(Work::Wallet { req, .. }) => {
                assert_eq!(s.user(), Some(req.user()));
                asked = Some(Asked::Request(req));
            }
            _ => {}
        }
        if s.is_released() {
            assert!(release_ok);
        }
    }
});
