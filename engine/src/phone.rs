//! 電話番号 (phone number): the R-L2 form every number takes inside the engine.
//!
//! Numbers arrive in many shapes (`+81 3-1234-5678`, `0312345678`, `anonymous`); they
//! are parsed once at the edge into [`PhoneNumber`], a small `Copy` value that hashes
//! fast and never allocates, so the hot path can key caches and compare with it.

use std::fmt;
use std::str::FromStr;

/// Longest digit string a [`PhoneNumber`] holds: `010` + an E.164 number (≤ 15 digits).
const MAX_DIGITS: usize = 18;

/// A phone number as half-width digits starting with `0`, no hyphen (R-L2).
///
/// Subscribers' numbers are national numbers of 10 or 11 digits ([`PhoneNumber::parse`]).
/// A caller may also be abroad; its number is then written as Japan dials it, `010` +
/// country code + number ([`PhoneNumber::from_caller`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PhoneNumber {
    /// How many of `digits` are used.
    len: u8,
    /// ASCII digits; unused bytes stay zero so derived `Eq`/`Hash` are exact.
    digits: [u8; MAX_DIGITS],
}

/// Why a string is not a phone number; shown to whoever typed or sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneNumberError {
    #[error("phone number is empty")]
    Empty,
    #[error("phone number may contain only half-width digits 0-9 (no hyphen): {0:?}")]
    NotDigits(String),
    #[error("phone number must start with 0 (national form, e.g. 0312345678): {0:?}")]
    NoLeadingZero(String),
    #[error("phone number must not start with 00, the international prefix (national form, e.g. 0312345678): {0:?}")]
    InternationalPrefix(String),
    #[error("phone number must have 10 or 11 digits, {len} given: {input:?}")]
    Length { len: usize, input: String },
}

/// `81` followed by a national number without its trunk `0` (nine or ten digits), or
/// with it (the slip `+81 03…` is taken too).
fn is_e164_japan(digits: &[u8]) -> bool {
    match digits.strip_prefix(b"81".as_slice()) {
        Some(national) if national.first() == Some(&b'0') => (10..=11).contains(&national.len()),
        Some(national) => (9..=10).contains(&national.len()),
        None => false,
    }
}

impl PhoneNumber {
    /// Parses a subscriber's national number strictly: digits only, leading `0`, 10 or 11
    /// digits (R-L2). Used for provisioning, settings and called numbers.
    pub fn parse(input: &str) -> Result<Self, PhoneNumberError> {
        let bytes = input.as_bytes();
        if bytes.is_empty() {
            return Err(PhoneNumberError::Empty);
        }
        if !bytes.iter().all(u8::is_ascii_digit) {
            return Err(PhoneNumberError::NotDigits(input.to_owned()));
        }
        if bytes[0] != b'0' {
            return Err(PhoneNumberError::NoLeadingZero(input.to_owned()));
        }
        if bytes.get(1) == Some(&b'0') {
            return Err(PhoneNumberError::InternationalPrefix(input.to_owned()));
        }
        if !(10..=11).contains(&bytes.len()) {
            return Err(PhoneNumberError::Length { len: bytes.len(), input: input.to_owned() });
        }
        Ok(Self::from_digits(bytes))
    }

    /// Normalises a number as exchanges send it (caller or called) to R-L2 form:
    /// spaces, hyphens and parentheses are dropped, `+81`/`0081` (or `81` and a national
    /// number, E.164 without its `+`) become `0`, another
    /// `+CC`/`00CC` becomes `010CC` (how Japan dials abroad). Returns `None` when no
    /// plausible number remains (empty, letters, too long).
    pub fn from_caller(input: &str) -> Option<Self> {
        let mut buf = [0u8; MAX_DIGITS + 4];
        let mut len = 0;
        let mut plus = false;
        for &b in input.as_bytes() {
            match b {
                b'0'..=b'9' if len < buf.len() => {
                    buf[len] = b;
                    len += 1;
                }
                // Before the first digit, after any space or parenthesis: `(+81) 90-…`.
                b'+' if len == 0 && !plus => plus = true,
                b' ' | b'-' | b'(' | b')' | b'.' => {}
                _ => return None,
            }
        }
        let digits = &buf[..len];
        let international = if plus {
            Some(digits)
        } else if is_e164_japan(digits) {
            // E.164 without its `+`, as SIP trunks often send it: no national number
            // starts with 8, so `81` and nine or ten digits can only be Japan's code.
            Some(digits)
        } else {
            digits.strip_prefix(b"00".as_slice()).filter(|rest| rest.first().is_some_and(|&d| d != b'0'))
        };
        // Room for "010" in front of every digit `buf` can hold.
        let mut out = [0u8; MAX_DIGITS + 7];
        let normal: &[u8] = match international {
            Some(rest) => match rest.strip_prefix(b"81".as_slice()) {
                // `+81 3…` drops the trunk `0`; `+81 03…` is a common slip.
                Some(national) if national.first() == Some(&b'0') => national,
                Some(national) => {
                    out[0] = b'0';
                    out[1..1 + national.len()].copy_from_slice(national);
                    &out[..1 + national.len()]
                }
                None => {
                    out[..3].copy_from_slice(b"010");
                    out[3..3 + rest.len()].copy_from_slice(rest);
                    &out[..3 + rest.len()]
                }
            },
            None => digits,
        };
        // Short numbers (110, 0120…) and national numbers start with 0 or 1; fewer than
        // three digits is noise, not a number. `00` left over is an international prefix
        // with nothing plausible after it (`000…`, `+81 00…`), not a national number.
        match normal.len() {
            3..=MAX_DIGITS if (normal[0] == b'0' || normal[0] == b'1') && !normal.starts_with(b"00") => {
                Some(Self::from_digits(normal))
            }
            _ => None,
        }
    }

    fn from_digits(bytes: &[u8]) -> Self {
        let mut digits = [0u8; MAX_DIGITS];
        digits[..bytes.len()].copy_from_slice(bytes);
        Self { len: bytes.len() as u8, digits }
    }

    /// The number as its digit string, e.g. `"0312345678"`.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever stored.
        std::str::from_utf8(&self.digits[..self.len as usize]).expect("digits are ASCII")
    }
}

impl FromStr for PhoneNumber {
    type Err = PhoneNumberError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber({})", self.as_str())
    }
}

impl serde::Serialize for PhoneNumber {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for PhoneNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r_l2_accepts_national_numbers_of_10_or_11_digits() {
        assert_eq!(PhoneNumber::parse("0312345678").unwrap().as_str(), "0312345678");
        assert_eq!(PhoneNumber::parse("09012345678").unwrap().as_str(), "09012345678");
    }

    #[test]
    fn r_l2_rejects_hyphens_short_long_and_non_zero_numbers() {
        assert!(matches!(PhoneNumber::parse("03-1234-5678"), Err(PhoneNumberError::NotDigits(_))));
        assert!(matches!(PhoneNumber::parse("031234567"), Err(PhoneNumberError::Length { len: 9, .. })));
        assert!(matches!(PhoneNumber::parse("090123456789"), Err(PhoneNumberError::Length { .. })));
        assert!(matches!(PhoneNumber::parse("3312345678"), Err(PhoneNumberError::NoLeadingZero(_))));
        // 00 is Japan's international prefix: no national number starts with it.
        assert!(matches!(PhoneNumber::parse("0012345678"), Err(PhoneNumberError::InternationalPrefix(_))));
        assert!(matches!(PhoneNumber::parse("０３１２３４５６７８"), Err(PhoneNumberError::NotDigits(_))));
        assert_eq!(PhoneNumber::parse(""), Err(PhoneNumberError::Empty));
    }

    #[test]
    fn caller_numbers_are_normalised_to_r_l2_form() {
        let n = |s| PhoneNumber::from_caller(s).map(|p| p.to_string());
        assert_eq!(n("+819011112222").as_deref(), Some("09011112222"));
        assert_eq!(n("+81 3-1234-5678").as_deref(), Some("0312345678"));
        assert_eq!(n("00819011112222").as_deref(), Some("09011112222"));
        assert_eq!(n("090-1111-2222").as_deref(), Some("09011112222"));
        assert_eq!(n("+14155550100").as_deref(), Some("01014155550100"));
        assert_eq!(n("110").as_deref(), Some("110"));
        assert_eq!(n("anonymous"), None);
        assert_eq!(n(""), None);
        assert_eq!(n("12"), None);
        // Found by fuzzing: these once gave numbers that normalised differently again.
        assert_eq!(n("+81 00-1234-5678"), None);
        assert_eq!(n("0001234567"), None);
        assert_eq!(n("0012345678").as_deref(), Some("01012345678"), "a call abroad (00 + country 1)");
        assert_eq!(n("1234567890123456789012345"), None);
    }

    /// R-N5, R-M2: a `+` after a space or a parenthesis, before any digit, is the
    /// international prefix too (`(+81) 90-1111-2222`, ` +819011112222`): such a caller
    /// was 表示圏外, a designated caller written so never matched, and a called number
    /// written so was dead-lettered. A `+` after a digit is still no number.
    #[test]
    fn r_n5_a_plus_after_a_space_or_parenthesis_is_the_international_prefix() {
        let n = |s| PhoneNumber::from_caller(s).map(|p| p.to_string());
        assert_eq!(n(" +819011112222").as_deref(), Some("09011112222"));
        assert_eq!(n("(+81) 90-1111-2222").as_deref(), Some("09011112222"));
        assert_eq!(n("81+9011112222"), None);
        assert_eq!(n("++819011112222"), None);
    }

    #[test]
    fn r_l2_r_n5_e164_numbers_sent_without_their_plus_are_japanese_numbers() {
        // SIP trunks send `819011112222` for +81 90-1111-2222: a designated caller (R-N5)
        // must match, and a called number must find its subscriber.
        let n = |s| PhoneNumber::from_caller(s).map(|p| p.to_string());
        assert_eq!(n("819011112222").as_deref(), Some("09011112222"));
        assert_eq!(n("81312345678").as_deref(), Some("0312345678"));
        assert_eq!(n("810312345678").as_deref(), Some("0312345678"));
        // Too short or too long for a national number after 81: not taken for one.
        assert_eq!(n("8112345"), None);
        assert_eq!(n("81901111222233"), None);
    }

    #[test]
    fn serde_round_trips_as_a_digit_string() {
        let n = PhoneNumber::parse("0312345678").unwrap();
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(json, "\"0312345678\"");
        assert_eq!(serde_json::from_str::<PhoneNumber>(&json).unwrap(), n);
        assert!(serde_json::from_str::<PhoneNumber>("\"03-1234\"").is_err());
    }
}
