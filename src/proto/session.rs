//! The broker's side of one access-channel session, as a state machine.
//!
//! ```text
//!            Login ok                 Release ok
//! AwaitLogin ────────► LoggedIn{user} ──────────► Released{user}
//!     │  ▲ wrong password   │ ▲ wrong password       │
//!     └──┘                  └─┘                      │ Logout / fatal error
//!                                                    ▼
//!                                                 Closed
//! ```
//!
//! Frames go in through [`AccessSession::handle`]; checks that need the
//! password store or the HSM come out as [`Action::CheckLogin`] /
//! [`Action::CheckRelease`] and their results go back in through
//! [`AccessSession::login_done`] / [`AccessSession::release_done`]. At most
//! one check is in flight; the state machine never touches I/O.
//!
//! The broker feeds a frame only once the one before it is answered
//! (pipelined frames wait in the decoder), so the `busy` that
//! [`AccessSession::handle`] gives a frame arriving during a check guards
//! the state machine against another runtime; terminals never see it.
//! Their `busy` comes from a full bounded queue (docs/PROTOCOL.md §1.6).

use super::access::{Frame, Message, Password};
use super::code::ErrorCode;
use crate::proto::point::Point;

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    AwaitLogin,
    LoggedIn { user: String },
    Released { user: String },
    Closed,
}

/// What the runtime must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this frame and keep reading.
    Reply(Frame),
    /// Send this frame, then close the connection.
    Close(Frame),
    /// Check the first password of `user` for this terminal, then call
    /// [`AccessSession::login_done`].
    CheckLogin {
        id: u32,
        user: String,
        password: Password,
    },
    /// Check the second password and release the user's key, then call
    /// [`AccessSession::release_done`].
    CheckRelease {
        id: u32,
        user: String,
        password: Password,
    },
    /// Broker an exchange with `market` for the released user, then call
    /// [`AccessSession::exchange_done`]. `ephemeral` is the terminal's key
    /// in partial mode.
    Exchange {
        id: u32,
        user: String,
        market: String,
        ephemeral: Option<Point>,
    },
    /// A wallet operation for the user (purchase, cancel and top-up need
    /// the release; balance only the login), then call
    /// [`AccessSession::request_done`].
    Wallet {
        id: u32,
        user: String,
        call: Message,
    },
}

pub struct AccessSession {
    state: State,
    in_flight: bool,
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

impl AccessSession {
    /// `confirm` is the key-confirmation value derived from X' by the runtime.
    pub fn new(confirm: [u8; 32]) -> Self {
        Self {
            state: State::AwaitLogin,
            in_flight: false,
            confirm,
        }
    }

    /// The logged-in user, if any.
    pub fn user(&self) -> Option<&str> {
        match &self.state {
            State::LoggedIn { user } | State::Released { user } => Some(user),
            _ => None,
        }
    }

    pub fn is_released(&self) -> bool {
        matches!(self.state, State::Released { .. })
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Feeds one decoded frame from the terminal.
    pub fn handle(&mut self, frame: Frame) -> Action {
        let id = frame.id;
        if self.state == State::Closed {
            return error(id, ErrorCode::Unexpected, "session closed");
        }
        if self.in_flight && !matches!(frame.msg, Message::Ping | Message::Logout) {
            return error(id, ErrorCode::Busy, "a check is already in flight");
        }
        match (frame.msg, &self.state) {
            (Message::Ping, _) => Action::Reply(Frame {
                id,
                msg: Message::Pong,
            }),
            (Message::Logout, _) => {
                self.state = State::Closed;
                Action::Close(Frame {
                    id,
                    msg: Message::Bye,
                })
            }
            (Message::Login { user, password }, State::AwaitLogin) => {
                self.in_flight = true;
                Action::CheckLogin { id, user, password }
            }
            (Message::Login { .. }, _) => error(id, ErrorCode::Unexpected, "already logged in"),
            (Message::Release { password }, State::LoggedIn { user }) => {
                self.in_flight = true;
                Action::CheckRelease {
                    id,
                    user: user.clone(),
                    password,
                }
            }
            (Message::Release { .. }, State::AwaitLogin) => {
                error(id, ErrorCode::NotLoggedIn, "log in first")
            }
            (Message::Release { .. }, _) => error(id, ErrorCode::Unexpected, "already released"),
            (Message::Exchange { market }, State::Released { user }) => {
                self.in_flight = true;
                Action::Exchange {
                    id,
                    user: user.clone(),
                    market,
                    ephemeral: None,
                }
            }
            (Message::ExchangePartial { market, ephemeral }, State::Released { user }) => {
                self.in_flight = true;
                Action::Exchange {
                    id,
                    user: user.clone(),
                    market,
                    ephemeral: Some(ephemeral),
                }
            }
            (
                call @ (Message::Purchase { .. } | Message::Cancel { .. } | Message::TopUp { .. }),
                State::Released { user },
            )
            | (call @ Message::Balance, State::LoggedIn { user } | State::Released { user }) => {
                self.in_flight = true;
                Action::Wallet {
                    id,
                    user: user.clone(),
                    call,
                }
            }
            (
                Message::Exchange { .. }
                | Message::ExchangePartial { .. }
                | Message::Purchase { .. }
                | Message::Cancel { .. }
                | Message::TopUp { .. },
                State::LoggedIn { .. },
            ) => error(id, ErrorCode::NotReleased, "release first"),
            (
                Message::Exchange { .. }
                | Message::ExchangePartial { .. }
                | Message::Purchase { .. }
                | Message::Cancel { .. }
                | Message::TopUp { .. }
                | Message::Balance,
                _,
            ) => error(id, ErrorCode::NotLoggedIn, "log in first"),
            (_, _) => error(id, ErrorCode::Unexpected, "not a terminal message"),
        }
    }

    /// Result of an [`Action::CheckLogin`].
    pub fn login_done(&mut self, id: u32, user: String, result: Result<(), ErrorCode>) -> Action {
        self.in_flight = false;
        match result {
            Ok(()) => {
                self.state = State::LoggedIn { user };
                Action::Reply(Frame {
                    id,
                    msg: Message::LoginOk {
                        confirm: self.confirm,
                    },
                })
            }
            Err(code) => self.fail(id, code),
        }
    }

    /// Result of an [`Action::CheckRelease`].
    pub fn release_done(&mut self, id: u32, result: Result<(), ErrorCode>) -> Action {
        self.in_flight = false;
        match (result, &self.state) {
            (Ok(()), State::LoggedIn { user }) => {
                self.state = State::Released { user: user.clone() };
                Action::Reply(Frame {
                    id,
                    msg: Message::ReleaseOk,
                })
            }
            (Ok(()), _) => self.fail(id, ErrorCode::Internal),
            (Err(code), _) => self.fail(id, code),
        }
    }

    /// Result of an [`Action::Exchange`] or [`Action::Wallet`]: the answer to send.
    pub fn request_done(&mut self, id: u32, result: Result<Message, ErrorCode>) -> Action {
        self.in_flight = false;
        match result {
            Ok(msg) => Action::Reply(Frame { id, msg }),
            Err(ErrorCode::NotReleased) => {
                // The broker lost the released key (the HSM recovered from
                // a fault): the terminal must release again.
                if let State::Released { user } = &self.state {
                    self.state = State::LoggedIn { user: user.clone() };
                }
                self.fail(id, ErrorCode::NotReleased)
            }
            Err(code) => self.fail(id, code),
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

    #[test]
    fn happy_path_login_then_release() {
        let mut s = AccessSession::new([9; 32]);
        assert!(matches!(
            s.handle(login(1)),
            Action::CheckLogin { id: 1, .. }
        ));
        let a = s.login_done(1, "alice".into(), Ok(()));
        assert_eq!(
            a,
            Action::Reply(frame(1, Message::LoginOk { confirm: [9; 32] }))
        );
        assert_eq!(s.user(), Some("alice"));
        assert!(matches!(
            s.handle(release(2)),
            Action::CheckRelease { id: 2, .. }
        ));
        assert_eq!(
            s.release_done(2, Ok(())),
            Action::Reply(frame(2, Message::ReleaseOk))
        );
        assert!(s.is_released());
    }

    #[test]
    fn exchange_needs_release() {
        let mut s = AccessSession::new([0; 32]);
        let ex = || frame(4, Message::Exchange { market: "m".into() });
        assert_eq!(code_of(&s.handle(ex())), Some(ErrorCode::NotLoggedIn));
        s.handle(login(1));
        s.login_done(1, "alice".into(), Ok(()));
        assert_eq!(code_of(&s.handle(ex())), Some(ErrorCode::NotReleased));
        s.handle(release(2));
        s.release_done(2, Ok(()));
        assert!(matches!(
            s.handle(ex()),
            Action::Exchange {
                id: 4,
                ephemeral: None,
                ..
            }
        ));
        assert_eq!(
            s.request_done(4, Err(ErrorCode::MarketUnavailable)),
            Action::Reply(frame(
                4,
                Message::error(ErrorCode::MarketUnavailable, "market_unavailable")
            ))
        );
        assert!(s.is_released());
    }

    #[test]
    fn release_before_login_is_refused() {
        let mut s = AccessSession::new([0; 32]);
        assert_eq!(code_of(&s.handle(release(1))), Some(ErrorCode::NotLoggedIn));
    }

    #[test]
    fn wrong_password_keeps_session_open_and_locked_closes() {
        let mut s = AccessSession::new([0; 32]);
        s.handle(login(1));
        let a = s.login_done(1, "alice".into(), Err(ErrorCode::WrongPassword));
        assert!(matches!(a, Action::Reply(_)));
        assert_eq!(code_of(&a), Some(ErrorCode::WrongPassword));
        s.handle(login(2));
        let a = s.login_done(2, "alice".into(), Err(ErrorCode::Locked));
        assert!(matches!(a, Action::Close(_)));
        assert!(s.is_closed());
    }

    #[test]
    fn only_one_check_in_flight() {
        let mut s = AccessSession::new([0; 32]);
        s.handle(login(1));
        assert_eq!(code_of(&s.handle(login(2))), Some(ErrorCode::Busy));
        assert_eq!(
            s.handle(frame(3, Message::Ping)),
            Action::Reply(frame(3, Message::Pong))
        );
    }

    #[test]
    fn broker_messages_from_terminal_are_unexpected() {
        let mut s = AccessSession::new([0; 32]);
        assert_eq!(
            code_of(&s.handle(frame(1, Message::ReleaseOk))),
            Some(ErrorCode::Unexpected)
        );
    }

    #[test]
    fn second_login_is_unexpected() {
        let mut s = AccessSession::new([0; 32]);
        s.handle(login(1));
        s.login_done(1, "alice".into(), Ok(()));
        assert_eq!(code_of(&s.handle(login(2))), Some(ErrorCode::Unexpected));
    }

    #[test]
    fn logout_closes_with_bye() {
        let mut s = AccessSession::new([0; 32]);
        assert_eq!(
            s.handle(frame(5, Message::Logout)),
            Action::Close(frame(5, Message::Bye))
        );
        assert!(s.is_closed());
    }
}
