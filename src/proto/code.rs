//! Typed error codes carried in `Error` frames on the access channel.
//!
//! The numbers are the wire contract (docs/PROTOCOL.md, "Error codes"); never
//! renumber one. Each code says whose fault it is and whether the broker
//! closes the connection after sending it.

/// Error code sent to a terminal. `u16` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be parsed. Closes.
    Malformed = 1,
    /// The frame's length exceeds the limit. Closes.
    TooLarge = 2,
    /// The message is not allowed in the session's current state.
    Unexpected = 3,
    /// A bounded queue is full; retry later.
    Busy = 4,
    /// The broker failed internally; the operator has the details.
    Internal = 5,
    /// The peer stayed silent past the idle limit. Closes.
    Timeout = 6,
    /// No such user is enrolled.
    UnknownUser = 10,
    /// The password was wrong; the attempt was counted.
    WrongPassword = 11,
    /// The card is locked after too many failures; an admin must unlock. Closes.
    Locked = 12,
    /// The terminal certificate is enrolled for another user. Closes.
    WrongTerminal = 13,
    /// The terminal certificate is not (or no longer) enrolled. Closes.
    TerminalRevoked = 14,
    /// Login is required first.
    NotLoggedIn = 15,
    /// Release (second password) is required first.
    NotReleased = 16,
    /// The HSM did not answer; retry later.
    HsmUnavailable = 20,
    /// No market with that id is registered.
    UnknownMarket = 30,
    /// The market is down or unreachable; retry later.
    MarketUnavailable = 31,
    /// The market did not answer in time; retry later.
    MarketTimeout = 32,
    /// The market does not let this user trade there.
    UserNotAllowed = 33,
    /// The user's signature or certificate did not verify.
    BadSignature = 34,
    /// The exchange was seen before.
    Replay = 35,
    /// The exchange is too old or from the future.
    Stale = 36,
    /// The market failed internally.
    MarketInternal = 37,
    /// Too many exchanges in flight for this session.
    TooManyInFlight = 38,
    /// The wallet does not cover the amount; nothing changed.
    InsufficientFunds = 50,
    /// The currency is not one the wallet keeps.
    UnknownCurrency = 51,
    /// Zero, negative, too large or overflowing amount.
    InvalidAmount = 52,
    /// No such purchase decision.
    UnknownDecision = 53,
    /// The decision belongs to another user.
    NotYourDecision = 54,
    /// The decision was cancelled already.
    AlreadyCancelled = 55,
    /// The voucher was used already.
    VoucherUsed = 56,
    /// The voucher is forged, expired, malformed or for another user.
    BadVoucher = 57,
    /// The cancellation authorisation does not verify.
    BadAuthorisation = 58,
    /// A field is malformed (order reference, idempotency key, ...).
    InvalidInput = 59,
    /// Direct channel: no such session at the market.
    UnknownSession = 40,
    /// Direct channel: the session has expired. Closes.
    SessionExpired = 41,
    /// Direct channel: a record failed authentication or was out of order. Closes.
    BadRecord = 42,
    /// Direct channel: the Hello's handshake did not verify under the
    /// session's X. Closes.
    BadHandshake = 43,
    /// Direct channel: the session opened as many connections as the market
    /// allows. Closes.
    TooManyConnections = 44,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 38] = [
        Self::Malformed,
        Self::TooLarge,
        Self::Unexpected,
        Self::Busy,
        Self::Internal,
        Self::Timeout,
        Self::UnknownUser,
        Self::WrongPassword,
        Self::Locked,
        Self::WrongTerminal,
        Self::TerminalRevoked,
        Self::NotLoggedIn,
        Self::NotReleased,
        Self::HsmUnavailable,
        Self::UnknownMarket,
        Self::MarketUnavailable,
        Self::MarketTimeout,
        Self::UserNotAllowed,
        Self::BadSignature,
        Self::Replay,
        Self::Stale,
        Self::MarketInternal,
        Self::TooManyInFlight,
        Self::UnknownSession,
        Self::SessionExpired,
        Self::BadRecord,
        Self::BadHandshake,
        Self::TooManyConnections,
        Self::InsufficientFunds,
        Self::UnknownCurrency,
        Self::InvalidAmount,
        Self::UnknownDecision,
        Self::NotYourDecision,
        Self::AlreadyCancelled,
        Self::VoucherUsed,
        Self::BadVoucher,
        Self::BadAuthorisation,
        Self::InvalidInput,
    ];

    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| *c as u16 == v)
    }

    /// Whether the broker closes the connection after sending this code.
    pub fn closes(self) -> bool {
        matches!(
            self,
            Self::Malformed
                | Self::TooLarge
                | Self::Timeout
                | Self::Locked
                | Self::WrongTerminal
                | Self::TerminalRevoked
                | Self::SessionExpired
                | Self::BadRecord
                | Self::BadHandshake
                | Self::TooManyConnections
        )
    }

    /// Stable snake_case name, used in logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::Unexpected => "unexpected",
            Self::Busy => "busy",
            Self::Internal => "internal",
            Self::Timeout => "timeout",
            Self::UnknownUser => "unknown_user",
            Self::WrongPassword => "wrong_password",
            Self::Locked => "locked",
            Self::WrongTerminal => "wrong_terminal",
            Self::TerminalRevoked => "terminal_revoked",
            Self::NotLoggedIn => "not_logged_in",
            Self::NotReleased => "not_released",
            Self::HsmUnavailable => "hsm_unavailable",
            Self::UnknownMarket => "unknown_market",
            Self::MarketUnavailable => "market_unavailable",
            Self::MarketTimeout => "market_timeout",
            Self::UserNotAllowed => "user_not_allowed",
            Self::BadSignature => "bad_signature",
            Self::Replay => "replay",
            Self::Stale => "stale",
            Self::MarketInternal => "market_internal",
            Self::TooManyInFlight => "too_many_in_flight",
            Self::InsufficientFunds => "insufficient_funds",
            Self::UnknownCurrency => "unknown_currency",
            Self::InvalidAmount => "invalid_amount",
            Self::UnknownDecision => "unknown_decision",
            Self::NotYourDecision => "not_your_decision",
            Self::AlreadyCancelled => "already_cancelled",
            Self::VoucherUsed => "voucher_used",
            Self::BadVoucher => "bad_voucher",
            Self::BadAuthorisation => "bad_authorisation",
            Self::InvalidInput => "invalid_input",
            Self::UnknownSession => "unknown_session",
            Self::SessionExpired => "session_expired",
            Self::BadRecord => "bad_record",
            Self::BadHandshake => "bad_handshake",
            Self::TooManyConnections => "too_many_connections",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c as u16), Some(c));
        }
        let mut seen: Vec<u16> = ErrorCode::ALL.iter().map(|c| *c as u16).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), ErrorCode::ALL.len());
        assert_eq!(ErrorCode::from_u16(999), None);
    }
}
