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
}

impl DestinationAddress {
    /// Parses an address by R-N3: exactly one `@`, neither first nor last; local part of
    /// `0-9 A-Z a-z _ . - ! $ % ' * + / ? ^ #`; domain of `0-9 A-Z a-z - .`, not ending
    /// with `.`.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        if input.matches('@').count() != 1 {
            return Err(AddressError::AtCount);
        }
        let (local, domain) = input.split_once('@').expect("one @ is present");
        if local.is_empty() || domain.is_empty() {
            return Err(AddressError::AtAtEdge);
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

    #[test]
    fn r_n3_accepts_the_allowed_characters() {
        for ok in ["a@example.jp", "a.b_c-d!$%'*+/?^#@mail-1.example.jp", "0@0"] {
            assert!(DestinationAddress::parse(ok).is_ok(), "{ok}");
        }
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
            ("あ@example.jp", LocalChar('あ')),
            ("a@exa_mple.jp", DomainChar('_')),
            ("a@example.jp.", DomainEndsWithDot),
        ];
        for (input, want) in cases {
            assert_eq!(DestinationAddress::parse(input), Err(want), "{input}");
        }
    }
}
