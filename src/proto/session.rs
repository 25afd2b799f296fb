//! The broker's side of one access-channel session, as a state machine.
//!
//! ```text
//! AwaitLogin ─Login─► CheckingLogin ─ok─► LoggedIn{user} ─Release─► CheckingRelease ─ok─► Released{user, key}
//!     ▲                    │ refused        │    ▲    ▲                    │ refused         │     ▲
//!     └────────────────────┘        Balance │    │    └────────────────────┘         request │     │ answered
//!                                           ▼    │ answered                                  ▼     │
//!                                    Serving{user, no key}                           Serving{user, key}
//!                                        (answered not_released: the key goes, back to LoggedIn)
//! any state ── Logout / a fatal error ──► Closed
//! ```
//!
//! Frames go in through [`AccessSession::handle`]; checks that need the
//! password store or the HSM come out as [`Work::CheckLogin`] /
//! [`Work::CheckRelease`] and their results go back in through
//! [`AccessSession::login_done`] / [`AccessSession::release_done`], each
//! with the proof ([`LoginCheck`], [`ReleaseCheck`], [`Request`]) that the
//! session handed out: the runtime cannot make one, so a result it was not
//! asked for, or for another user, does not compile. At most one check is
//! in flight; the state machine never touches I/O. The released key is
//! the session's (`K`, the broker's `Released`), held by the states that
//! have one, so it cannot outlive the release or be kept twice.
//!
//! The broker feeds a frame only once the one before it is answered
//! (pipelined frames wait in the decoder), so the `busy` that
//! [`AccessSession::handle`] gives a frame arriving during a check guards
//! the state machine against another runtime; terminals never see it.
//! Their `busy` comes from a full bounded queue (docs/PROTOCOL.md §1.6).

use super::access::{Frame, Message, Password};
use super::code::ErrorCode;
use crate::proto::point::Point;

/// One state per step; a check or request in flight is a state of its
/// own, so there is no flag beside the state to keep in step with it. The
/// released key `K` lives in the states that have one and nowhere else:
/// it goes when the session leaves them.
enum State<K> {
    AwaitLogin,
    CheckingLogin,
    LoggedIn {
        user: String,
    },
    CheckingRelease {
        user: String,
    },
    Released {
        user: String,
        key: K,
    },
    /// A request of a logged-in (balance) or released user is out.
    Serving {
        user: String,
        key: Option<K>,
    },
    Closed,
}

/// Proof that the session asked for a login check: only the session makes
/// one, and [`AccessSession::login_done`] takes it back. So a result cannot
/// arrive unasked, twice, or for a user the terminal did not name.
#[derive(Debug, PartialEq, Eq)]
pub struct LoginCheck {
    id: u32,
    user: String,
}

/// Proof that the session asked for a release check, for its user.
#[derive(Debug, PartialEq, Eq)]
pub struct ReleaseCheck {
    id: u32,
    user: String,
}

/// Proof that the session handed out a request (exchange or wallet call).
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    id: u32,
    user: String,
}

macro_rules! proof {
    ($t:ty) => {
        impl $t {
            /// The frame id the answer goes to.
            pub fn id(&self) -> u32 {
                self.id
            }
            /// The user the session is about.
            pub fn user(&self) -> &str {
                &self.user
            }
        }
    };
}
proof!(LoginCheck);
proof!(ReleaseCheck);
proof!(Request);

/// What the runtime must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this frame and keep reading.
    Reply(Frame),
    /// Send this frame, then close the connection.
    Close(Frame),
    /// Run this, then hand its result back.
    Work(Work),
}

/// A check or request the session asks for; its result goes back through
/// the matching `*_done` with the proof it carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Work {
    /// Check the first password of the user for this terminal, then call
    /// [`AccessSession::login_done`] with `check`.
    CheckLogin {
        check: LoginCheck,
        password: Password,
    },
    /// Check the second password and release the user's key, then call
    /// [`AccessSession::release_done`] with `check` and the key.
    CheckRelease {
        check: ReleaseCheck,
        password: Password,
    },
    /// Broker an exchange with `market` for the released user (its key:
    /// [`AccessSession::released`]), then call
    /// [`AccessSession::request_done`]. `ephemeral` is the terminal's key
    /// in partial mode.
    Exchange {
        req: Request,
        market: String,
        ephemeral: Option<Point>,
    },
    /// A wallet operation for the user (purchase, cancel and top-up need
    /// the release; balance only the login), then call
    /// [`AccessSession::request_done`].
    Wallet { req: Request, call: Message },
}

pub struct AccessSession<K> {
    state: State<K>,
    confirm: [u8; 32],
}

fn error(id: u32, code: ErrorCode, detail: &str) -> Action {
    let frame = Frame {
        id,
        msg: Message::error(code, detail),
    };
    if code.closes() {
        Action::Close(frame)
    } else {
        Action::Reply(frame)
    }
}

impl<K> AccessSession<K> {
    /// `confirm` is the key-confirmation value derived from X' by the runtime.
    pub fn new(confirm: [u8; 32]) -> Self {
        Self {
            state: State::AwaitLogin,
            confirm,
        }
    }

    /// The logged-in user, if any.
    pub fn user(&self) -> Option<&str> {
        match &self.state {
            State::LoggedIn { user }
            | State::CheckingRelease { user }
            | State::Released { user, .. }
            | State::Serving { user, .. } => Some(user),
            _ => None,
        }
    }

    /// The released key, while the session has one.
    pub fn released(&self) -> Option<&K> {
        match &self.state {
            State::Released { key, .. } | State::Serving { key: Some(key), .. } => Some(key),
            _ => None,
        }
    }

    pub fn is_released(&self) -> bool {
        self.released().is_some()
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    fn waiting(&self) -> bool {
        matches!(
            self.state,
            State::CheckingLogin | State::CheckingRelease { .. } | State::Serving { .. }
        )
    }

    /// Feeds one decoded frame from the terminal.
    pub fn handle(&mut self, frame: Frame) -> Action {
        let id = frame.id;
        if self.is_closed() {
            return error(id, ErrorCode::Unexpected, "session closed");
        }
        if self.waiting() && !matches!(frame.msg, Message::Ping | Message::Logout) {
            return error(id, ErrorCode::Busy, "a check is already in flight");
        }
        match frame.msg {
            Message::Ping => Action::Reply(Frame {
                id,
                msg: Message::Pong,
            }),
            Message::Logout => {
                self.state = State::Closed;
                Action::Close(Frame {
                    id,
                    msg: Message::Bye,
                })
            }
            Message::Login { user, password } => match self.state {
                State::AwaitLogin => {
                    self.state = State::CheckingLogin;
                    Action::Work(Work::CheckLogin {
                        check: LoginCheck { id, user },
                        password,
                    })
                }
                _ => error(id, ErrorCode::Unexpected, "already logged in"),
            },
            Message::Release { password } => match &self.state {
                State::LoggedIn { user } => {
                    let user = user.clone();
                    self.state = State::CheckingRelease { user: user.clone() };
                    Action::Work(Work::CheckRelease {
                        check: ReleaseCheck { id, user },
                        password,
                    })
                }
                State::AwaitLogin => error(id, ErrorCode::NotLoggedIn, "log in first"),
                _ => error(id, ErrorCode::Unexpected, "already released"),
            },
            msg @ (Message::Exchange { .. }
            | Message::ExchangePartial { .. }
            | Message::Purchase { .. }
            | Message::Cancel { .. }
            | Message::TopUp { .. }
            | Message::Balance) => self.request(id, msg),
            _ => error(id, ErrorCode::Unexpected, "not a terminal message"),
        }
    }

    /// A request frame: needs the login, and all but balance the release.
    fn request(&mut self, id: u32, msg: Message) -> Action {
        let needs_release = !matches!(msg, Message::Balance);
        let (user, key) = match std::mem::replace(&mut self.state, State::Closed) {
            State::Released { user, key } => (user, Some(key)),
            State::LoggedIn { user } if !needs_release => (user, None),
            other => {
                let logged_in = matches!(other, State::LoggedIn { .. });
                self.state = other;
                return if logged_in {
                    error(id, ErrorCode::NotReleased, "release first")
                } else {
                    error(id, ErrorCode::NotLoggedIn, "log in first")
                };
            }
        };
        let req = Request {
            id,
            user: user.clone(),
        };
        self.state = State::Serving { user, key };
        Action::Work(match msg {
            Message::Exchange { market } => Work::Exchange {
                req,
                market,
                ephemeral: None,
            },
            Message::ExchangePartial { market, ephemeral } => Work::Exchange {
                req,
                market,
                ephemeral: Some(ephemeral),
            },
            call => Work::Wallet { req, call },
        })
    }

    /// Result of a [`Work::CheckLogin`].
    pub fn login_done(&mut self, check: LoginCheck, result: Result<(), ErrorCode>) -> Action {
        if !matches!(self.state, State::CheckingLogin) {
            // Logged out meanwhile: the result has no session to go to.
            return self.fail(check.id, ErrorCode::Unexpected);
        }
        match result {
            Ok(()) => {
                self.state = State::LoggedIn { user: check.user };
                Action::Reply(Frame {
                    id: check.id,
                    msg: Message::LoginOk {
                        confirm: self.confirm,
                    },
                })
            }
            Err(code) => {
                self.state = State::AwaitLogin;
                self.fail(check.id, code)
            }
        }
    }

    /// Result of a [`Work::CheckRelease`]: the released key, or why not.
    pub fn release_done(&mut self, check: ReleaseCheck, result: Result<K, ErrorCode>) -> Action {
        let State::CheckingRelease { user } = std::mem::replace(&mut self.state, State::Closed)
        else {
            return self.fail(check.id, ErrorCode::Unexpected);
        };
        match result {
            Ok(key) => {
                self.state = State::Released { user, key };
                Action::Reply(Frame {
                    id: check.id,
                    msg: Message::ReleaseOk,
                })
            }
            Err(code) => {
                self.state = State::LoggedIn { user };
                self.fail(check.id, code)
            }
        }
    }

    /// Result of a [`Work::Exchange`] or [`Work::Wallet`]: the answer to send.
    pub fn request_done(&mut self, req: Request, result: Result<Message, ErrorCode>) -> Action {
        let State::Serving { user, key } = std::mem::replace(&mut self.state, State::Closed) else {
            return self.fail(req.id, ErrorCode::Unexpected);
        };
        self.state = match (key, &result) {
            // The broker lost the released key (the HSM recovered from a
            // fault): it goes, and the terminal must release again.
            (_, Err(ErrorCode::NotReleased)) | (None, _) => State::LoggedIn { user },
            (Some(key), _) => State::Released { user, key },
        };
        match result {
            Ok(msg) => Action::Reply(Frame { id: req.id, msg }),
            Err(code) => self.fail(req.id, code),
        }
    }

    fn fail(&mut self, id: u32, code: ErrorCode) -> Action {
        if code.closes() {
            self.state = State::Closed;
        }
        error(id, code, code.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: u32, msg: Message) -> Frame {
        Frame { id, msg }
    }

    fn login(id: u32) -> Frame {
        frame(
            id,
            Message::Login {
                user: "alice".into(),
                password: Password::new(b"pw1".to_vec()),
            },
        )
    }

    fn release(id: u32) -> Frame {
        frame(
            id,
            Message::Release {
                password: Password::new(b"pw2".to_vec()),
            },
        )
    }

    fn code_of(a: &Action) -> Option<ErrorCode> {
        match a {
            Action::Reply(f) | Action::Close(f) => match &f.msg {
                Message::Error { code, .. } => Some(*code),
                _ => None,
            },
            _ => None,
        }
    }

    type Session = AccessSession<&'static str>;

    fn login_check(s: &mut Session, id: u32) -> LoginCheck {
        match s.handle(login(id)) {
            Action::Work(Work::CheckLogin { check, .. }) => check,
            other => panic!("{other:?}"),
        }
    }

    fn release_check(s: &mut Session, id: u32) -> ReleaseCheck {
        match s.handle(release(id)) {
            Action::Work(Work::CheckRelease { check, .. }) => check,
            other => panic!("{other:?}"),
        }
    }

    fn released() -> Session {
        let mut s = Session::new([0; 32]);
        let c = login_check(&mut s, 1);
        s.login_done(c, Ok(()));
        let c = release_check(&mut s, 2);
        s.release_done(c, Ok("key"));
        s
    }

    #[test]
    fn happy_path_login_then_release() {
        let mut s = Session::new([9; 32]);
        let c = login_check(&mut s, 1);
        assert_eq!((c.id(), c.user()), (1, "alice"));
        let a = s.login_done(c, Ok(()));
        assert_eq!(
            a,
            Action::Reply(frame(1, Message::LoginOk { confirm: [9; 32] }))
        );
        assert_eq!(s.user(), Some("alice"));
        let c = release_check(&mut s, 2);
        assert_eq!(c.user(), "alice");
        assert_eq!(
            s.release_done(c, Ok("key")),
            Action::Reply(frame(2, Message::ReleaseOk))
        );
        assert_eq!(s.released(), Some(&"key"));
    }

    #[test]
    fn exchange_needs_release() {
        let mut s = Session::new([0; 32]);
        let ex = || frame(4, Message::Exchange { market: "m".into() });
        assert_eq!(code_of(&s.handle(ex())), Some(ErrorCode::NotLoggedIn));
        let c = login_check(&mut s, 1);
        s.login_done(c, Ok(()));
        assert_eq!(code_of(&s.handle(ex())), Some(ErrorCode::NotReleased));
        let c = release_check(&mut s, 2);
        s.release_done(c, Ok("key"));
        let Action::Work(Work::Exchange {
            req,
            ephemeral: None,
            ..
        }) = s.handle(ex())
        else {
            panic!("no exchange")
        };
        assert_eq!((req.id(), req.user()), (4, "alice"));
        // The key stays with the request in flight.
        assert_eq!(s.released(), Some(&"key"));
        assert_eq!(
            s.request_done(req, Err(ErrorCode::MarketUnavailable)),
            Action::Reply(frame(
                4,
                Message::error(ErrorCode::MarketUnavailable, "market_unavailable")
            ))
        );
        assert!(s.is_released());
    }

    #[test]
    fn a_key_the_broker_lost_goes_with_the_release() {
        let mut s = released();
        let Action::Work(Work::Wallet { req, .. }) = s.handle(frame(3, Message::Balance)) else {
            panic!()
        };
        s.request_done(req, Err(ErrorCode::NotReleased));
        assert_eq!(s.released(), None);
        assert_eq!(s.user(), Some("alice"));
        let c = release_check(&mut s, 4);
        s.release_done(c, Ok("again"));
        assert_eq!(s.released(), Some(&"again"));
    }

    #[test]
    fn balance_needs_only_the_login_and_leaves_no_key() {
        let mut s = Session::new([0; 32]);
        let c = login_check(&mut s, 1);
        s.login_done(c, Ok(()));
        let Action::Work(Work::Wallet { req, .. }) = s.handle(frame(3, Message::Balance)) else {
            panic!()
        };
        s.request_done(req, Ok(Message::Pong));
        assert!(!s.is_released());
        assert_eq!(s.user(), Some("alice"));
    }

    #[test]
    fn release_before_login_is_refused() {
        let mut s = Session::new([0; 32]);
        assert_eq!(code_of(&s.handle(release(1))), Some(ErrorCode::NotLoggedIn));
    }

    #[test]
    fn a_failed_release_keeps_the_login_and_no_key() {
        let mut s = Session::new([0; 32]);
        let c = login_check(&mut s, 1);
        s.login_done(c, Ok(()));
        let c = release_check(&mut s, 2);
        let a = s.release_done(c, Err(ErrorCode::WrongPassword));
        assert_eq!(code_of(&a), Some(ErrorCode::WrongPassword));
        assert!(!s.is_released());
        assert!(matches!(
            s.handle(release(3)),
            Action::Work(Work::CheckRelease { .. })
        ));
    }

    #[test]
    fn wrong_password_keeps_session_open_and_locked_closes() {
        let mut s = Session::new([0; 32]);
        let c = login_check(&mut s, 1);
        let a = s.login_done(c, Err(ErrorCode::WrongPassword));
        assert!(matches!(a, Action::Reply(_)));
        assert_eq!(code_of(&a), Some(ErrorCode::WrongPassword));
        let c = login_check(&mut s, 2);
        let a = s.login_done(c, Err(ErrorCode::Locked));
        assert!(matches!(a, Action::Close(_)));
        assert!(s.is_closed());
    }

    #[test]
    fn only_one_check_in_flight() {
        let mut s = Session::new([0; 32]);
        let _c = login_check(&mut s, 1);
        assert_eq!(code_of(&s.handle(login(2))), Some(ErrorCode::Busy));
        assert_eq!(
            s.handle(frame(3, Message::Ping)),
            Action::Reply(frame(3, Message::Pong))
        );
    }

    #[test]
    fn a_result_after_logout_opens_nothing() {
        let mut s = Session::new([0; 32]);
        let c = login_check(&mut s, 1);
        s.handle(frame(2, Message::Logout));
        let a = s.login_done(c, Ok(()));
        assert_eq!(code_of(&a), Some(ErrorCode::Unexpected));
        assert!(s.is_closed() && s.user().is_none());
    }

    #[test]
    fn broker_messages_from_terminal_are_unexpected() {
        let mut s = Session::new([0; 32]);
        assert_eq!(
            code_of(&s.handle(frame(1, Message::ReleaseOk))),
            Some(ErrorCode::Unexpected)
        );
    }

    #[test]
    fn second_login_or_release_is_unexpected() {
        let mut s = released();
        assert_eq!(code_of(&s.handle(login(3))), Some(ErrorCode::Unexpected));
        assert_eq!(code_of(&s.handle(release(4))), Some(ErrorCode::Unexpected));
    }

    #[test]
    fn logout_closes_with_bye() {
        let mut s = Session::new([0; 32]);
        assert_eq!(
            s.handle(frame(5, Message::Logout)),
            Action::Close(frame(5, Message::Bye))
        );
        assert!(s.is_closed());
    }
}
