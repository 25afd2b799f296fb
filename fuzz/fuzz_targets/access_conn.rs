//! The connection's core (`proto::conn::ConnCore`) driven by arbitrary
//! plaintext, cut at arbitrary points, with timer expiries, revocations and
//! the results of what it asked for in between. Never panics; what it
//! sends is always whole frames; it hands out one Work at a time and
//! nothing while one is out; once it closes it stays closed.
#![no_main]

use keybroker::proto::ErrorCode;
use keybroker::proto::access::{FrameDecoder, Message};
use keybroker::proto::conn::{Action, ConnCore, Timeouts, Work};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

const TIMEOUTS: Timeouts = Timeouts {
    idle: Duration::from_secs(30),
    frame: Duration::from_secs(3),
};

fn whole_frames(bytes: &[u8]) {
    let mut d = FrameDecoder::new(1 << 20);
    d.push(bytes);
    while d.next_frame().expect("the broker sends valid frames").is_some() {}
    assert_eq!(d.pending(), 0, "the broker sent part of a frame");
}

fn result(b: u8) -> Result<(), ErrorCode> {
    if b % 3 == 0 {
        Ok(())
    } else {
        Err(ErrorCode::ALL[usize::from(b) % ErrorCode::ALL.len()])
    }
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut c = ConnCore::<u8>::new([0; 32], 512, TIMEOUTS);
    let mut work: Option<Work> = None;
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let arg = rest.first().copied().unwrap_or(0);
        match op % 8 {
            0..=3 => {
                let n = usize::from(arg).min(rest.len());
                let (bytes, tail) = rest.split_at(n);
                rest = tail;
                c.handle_bytes(bytes);
            }
            4 => {
                now += Duration::from_millis(u64::from(arg) * 100);
                c.handle_timeout(now);
            }
            5 => c.handle_revoked(),
            _ => {
                let r = result(arg).map_err(Into::into);
                match work.take() {
                    Some(Work::CheckLogin { check, .. }) => c.login_done(check, r),
                    Some(Work::CheckRelease { check, .. }) => {
                        c.release_done(check, r.map(|()| arg))
                    }
                    Some(Work::Exchange { req, .. }) => {
                        assert!(c.is_released(), "an exchange without the release");
                        c.request_done(req, r.map(|()| Message::Pong))
                    }
                    Some(Work::Wallet { req, .. }) => {
                        assert_eq!(c.user(), Some(req.user()));
                        c.request_done(req, r.map(|()| Message::Pong))
                    }
                    None => {}
                }
            }
        }
        loop {
            match c.poll_action(now) {
                Action::Work(w) => {
                    assert!(work.is_none(), "two Works out at once");
                    work = Some(w);
                }
                Action::Send => {
                    whole_frames(c.out());
                    c.sent();
                }
                Action::Close => {
                    whole_frames(c.out());
                    c.sent();
                    assert_eq!(c.poll_action(now), Action::Close, "closed stays closed");
                    return;
                }
                Action::Read { until } => {
                    assert!(until > now && until <= now + TIMEOUTS.idle);
                    break;
                }
                Action::Wait => {
                    assert!(work.is_some(), "waits with nothing out");
                    break;
                }
            }
        }
        while c.poll_event().is_some() {}
    }
});
