//! The syntax rules that the wire, the wallet and the CLI apply alike, in
//! one place: an id enrolled by `user add` is one the wallet takes, a mail
//! address accepted at enrolment is one a purchase can mail, and a key the
//! wire carries is one the ledger stores.

/// Longest user or market id, in bytes.
pub const MAX_ID: usize = 64;
/// Longest purchase idempotency key, in bytes (the wire's string bound).
pub const MAX_IDEMPOTENCY_KEY: usize = 64;
/// Longest mail address (RFC 5321's path limit, less the brackets).
pub const MAX_MAIL: usize = 254;

/// A user or market id: 1 to [`MAX_ID`] bytes of `[A-Za-z0-9._-]`.
pub fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Free text that may end up in mail headers: printable ASCII, at most
/// `max` bytes, empty only if `empty_ok`.
pub fn is_text(s: &str, max: usize, empty_ok: bool) -> bool {
    (empty_ok || !s.is_empty()) && s.len() <= max && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// A mail address the mailer can put in a header: one `@`, a non-empty
/// local part, a dot inside the domain, printable ASCII without spaces or
/// the header specials.
pub fn is_mail(s: &str) -> bool {
    let mut parts = s.split('@');
    let shape = match (parts.next(), parts.next(), parts.next()) {
        (Some(l), Some(d), None) => {
            !l.is_empty() && d.contains('.') && !d.starts_with('.') && !d.ends_with('.')
        }
        _ => false,
    };
    shape
        && s.len() <= MAX_MAIL
        && s.bytes()
            .all(|b| (0x21..0x7f).contains(&b) && !b"<>\"(),;:[]\\".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_id("alice") && is_id("m-1.eu_2") && is_id(&"a".repeat(64)));
        for bad in ["", "al ice", "älice", "a/b", &"a".repeat(65)] {
            assert!(!is_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn mail_addresses() {
        assert!(is_mail("alice@example.org"));
        for bad in [
            "alice",
            "@example.org",
            "alice@example",
            "alice@.org",
            "alice@example.",
            "a@b@c.org",
            "alice smith@example.org",
            "alice@exa\nmple.org",
            "<alice@example.org>",
        ] {
            assert!(!is_mail(bad), "{bad:?}");
        }
    }

    #[test]
    fn text() {
        assert!(is_text("order 42", 128, false));
        assert!(is_text("", 1, true) && !is_text("", 1, false));
        assert!(!is_text("tab\there", 128, false) && !is_text("toolong", 3, false));
    }
}
