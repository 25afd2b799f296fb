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
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 14] = [
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
