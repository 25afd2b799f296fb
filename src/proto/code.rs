//! Typed error codes carried in `Error` frames on the access channel.
//!
//! The numbers are the wire contract (docs/PROTOCOL.md, "Error codes"); never
//! renumber one. Each code says whose fault it is and whether the broker
//! closes the connection after sending it.

/// Error code sent to a terminal. `u16` on the wire; its name is the
/// variant's in snake_case (strum), which the tests hold to PROTOCOL.md.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    strum::VariantArray,
    strum::IntoStaticStr,
    strum::FromRepr,
)]
#[strum(serialize_all = "snake_case")]
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
    /// Every code, in declaration order.
    pub const ALL: &'static [ErrorCode] = <Self as strum::VariantArray>::VARIANTS;

    pub fn from_u16(v: u16) -> Option<Self> {
        Self::from_repr(v)
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
        self.into()
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
        for &c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c as u16), Some(c));
        }
        // The names the wire docs and metric labels use.
        assert_eq!(ErrorCode::TooManyInFlight.name(), "too_many_in_flight");
        assert_eq!(
            ErrorCode::HsmUnavailable.to_string(),
            "hsm_unavailable (20)"
        );
        assert_eq!(ErrorCode::ALL.len(), 38);
        let mut seen: Vec<u16> = ErrorCode::ALL.iter().map(|c| *c as u16).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), ErrorCode::ALL.len());
        assert_eq!(ErrorCode::from_u16(999), None);
    }

    /// Every code is a row of PROTOCOL.md's table, number and name.
    #[test]
    fn the_spec_lists_every_code() {
        let spec = include_str!("../../docs/PROTOCOL.md");
        for &c in ErrorCode::ALL {
            let row = format!("| {} | {} |", c as u16, c.name());
            assert!(spec.contains(&row), "PROTOCOL.md has no row {row}");
        }
    }
}
