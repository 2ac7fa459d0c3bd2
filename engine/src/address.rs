//! 送信先メールアドレス (destination address): the address syntax of R-N3.
//!
//! The rule is stricter than RFC 5321 on purpose: it is what the original settings site
//! accepts, so a subscriber's address behaves the same here as it did there.

use std::fmt;

/// A destination address that passed R-N3.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DestinationAddress(String);

/// Why an address was refused; worded for the subscriber who typed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// A character outside ASCII (R-N3 allows none): most often the input method left
    /// in full-width mode, `＠` included.
    #[error("the address may contain only half-width (ASCII) characters: {0:?}")]
    NotHalfWidth(char),
    #[error("the address must contain exactly one @")]
    AtCount,
    #[error("@ must not be the first or last character")]
    AtAtEdge,
    #[error("the part before @ may contain only 0-9 A-Z a-z and _ . - ! $ % ' * + / ? ^ #: {0:?}")]
    LocalChar(char),
    #[error("the part after @ may contain only 0-9 A-Z a-z - and .: {0:?}")]
    DomainChar(char),
    #[error("the part after @ must not end with a dot")]
    DomainEndsWithDot,
    #[error("the address may be at most {MAX_LEN} characters long (RFC 5321); it has {0}")]
    TooLong(usize),
    #[error("the part before @ may be at most {MAX_LOCAL_LEN} characters long (RFC 5321); it has {0}")]
    LocalTooLong(usize),
}

/// The longest address a mail server takes in `RCPT TO` (RFC 5321 §4.5.3.1.3: a path of
/// 256 octets, angle brackets included).
pub const MAX_LEN: usize = 254;
/// The longest local part (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_LEN: usize = 64;

impl DestinationAddress {
    /// Parses an address by R-N3: exactly one `@`, neither first nor last; local part of
    /// `0-9 A-Z a-z _ . - ! $ % ' * + / ? ^ #`; domain of `0-9 A-Z a-z - .`, not ending
    /// with `.`; and no longer than RFC 5321 lets a mail server take it: 254
    /// characters in all, 64 before the `@`.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        // First: a full-width `＠` is no `@`, and the lengths below count bytes.
        if let Some(c) = input.chars().find(|c| !c.is_ascii()) {
            return Err(AddressError::NotHalfWidth(c));
        }
        if input.matches('@').count() != 1 {
            return Err(AddressError::AtCount);
        }
        if input.len() > MAX_LEN {
            return Err(AddressError::TooLong(input.len()));
        }
        let (local, domain) = input.split_once('@').expect("one @ is present");
        if local.is_empty() || domain.is_empty() {
            return Err(AddressError::AtAtEdge);
        }
        if local.len() > MAX_LOCAL_LEN {
            return Err(AddressError::LocalTooLong(local.len()));
        }
        if let Some(c) = local.chars().find(|&c| !is_local_char(c)) {
            return Err(AddressError::LocalChar(c));
        }
        if let Some(c) = domain.chars().find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '.')) {
            return Err(AddressError::DomainChar(c));
        }
        if domain.ends_with('.') {
            return Err(AddressError::DomainEndsWithDot);
        }
        Ok(Self(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_local_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.-!$%'*+/?^#".contains(c)
}

impl fmt::Display for DestinationAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DestinationAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DestinationAddress({})", self.0)
    }
}

impl serde::Serialize for DestinationAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for DestinationAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(|e| serde::de::Error::custom(format!("address {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// R-N3 allows half-width characters only: an address typed in full width is refused
    /// as such, not as one without an `@` (its `＠` is full-width) or as one too long
    /// (the limit counted bytes, the message characters: "64 at most, it has 22").
    #[test]
    fn r_n3_an_address_typed_in_full_width_is_refused_as_full_width() {
        assert_eq!(DestinationAddress::parse("ｔａｒｏ＠ｅｘａｍｐｌｅ．ｊｐ"), Err(AddressError::NotHalfWidth('ｔ')));
        let wide = format!("{}@example.jp", "ａ".repeat(22));
        assert_eq!(DestinationAddress::parse(&wide), Err(AddressError::NotHalfWidth('ａ')));
        assert_eq!(DestinationAddress::parse("taro＠example.jp"), Err(AddressError::NotHalfWidth('＠')));
    }

    #[test]
    fn r_n3_accepts_the_allowed_characters() {
        for ok in ["a@example.jp", "a.b_c-d!$%'*+/?^#@mail-1.example.jp", "0@0"] {
            assert!(DestinationAddress::parse(ok).is_ok(), "{ok}");
        }
    }

    /// A 10 MB address used to be stored, and every CDR for its number sent a 10 MB
    /// `RCPT TO`: addresses are now as long as RFC 5321 allows, no longer.
    #[test]
    fn r_n3_addresses_longer_than_rfc_5321_allows_are_refused() {
        let domain = format!("{}.jp", "d".repeat(MAX_LEN - 64 - 1 - 3));
        let longest = format!("{}@{domain}", "l".repeat(64));
        assert_eq!(longest.len(), MAX_LEN);
        assert!(DestinationAddress::parse(&longest).is_ok());
        assert_eq!(DestinationAddress::parse(&format!("{longest}x")), Err(AddressError::TooLong(255)));
        let three_hundred = format!("a@{}.jp", "x".repeat(295));
        assert_eq!(DestinationAddress::parse(&three_hundred), Err(AddressError::TooLong(300)));
        assert_eq!(
            DestinationAddress::parse(&format!("{}@example.jp", "l".repeat(65))),
            Err(AddressError::LocalTooLong(65))
        );
    }

    #[test]
    fn r_n3_refuses_each_broken_rule() {
        use AddressError::*;
        let cases = [
            ("a.example.jp", AtCount),
            ("a@b@example.jp", AtCount),
            ("@example.jp", AtAtEdge),
            ("a@", AtAtEdge),
            ("a b@example.jp", LocalChar(' ')),
            ("あ@example.jp", NotHalfWidth('あ')),
            ("a@exämple.jp", NotHalfWidth('ä')),
            ("a@exa_mple.jp", DomainChar('_')),
            ("a@example.jp.", DomainEndsWithDot),
        ];
        for (input, want) in cases {
            assert_eq!(DestinationAddress::parse(input), Err(want), "{input}");
        }
    }
}
