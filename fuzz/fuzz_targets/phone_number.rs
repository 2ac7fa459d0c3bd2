//! 電話番号 (phone number): `PhoneNumber::parse` (R-L2, strict) and
//! `PhoneNumber::from_caller` (what exchanges send), on arbitrary strings.
#![no_main]

use engine::phone::{PhoneNumber, PhoneNumberError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    check_parse(input);
    check_from_caller(input);
});

/// R-L2, restated here rather than borrowed from the engine: half-width digits only,
/// starting with 0 but not 00 (Japan's international prefix), 10 or 11 of them.
fn is_r_l2(s: &str) -> bool {
    (10..=11).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) && s.starts_with('0') && !s.starts_with("00")
}

fn check_parse(input: &str) {
    let parsed = PhoneNumber::parse(input);
    assert_eq!(parsed.is_ok(), is_r_l2(input), "parse({input:?}) = {parsed:?}");
    assert_eq!(input.parse::<PhoneNumber>(), parsed, "FromStr differs from parse");
    match parsed {
        Ok(n) => {
            // Parsing keeps the digits as given, so it is idempotent and round-trips
            // through the string forms the store and the mail use.
            assert_eq!(n.as_str(), input);
            assert_eq!(n.to_string(), input);
            assert_eq!(PhoneNumber::parse(n.as_str()), Ok(n));
            let json = serde_json::to_string(&n).expect("a number serialises");
            assert_eq!(serde_json::from_str::<PhoneNumber>(&json).ok(), Some(n), "serde round trip of {json}");
        }
        Err(e) => {
            // Checked in this order, so the first broken rule is the one reported.
            assert_eq!(input.is_empty(), e == PhoneNumberError::Empty, "{input:?}: {e}");
            assert!(!e.to_string().is_empty());
        }
    }
}

fn check_from_caller(input: &str) {
    let Some(n) = PhoneNumber::from_caller(input) else { return };
    let s = n.as_str();
    assert!(callnotify_fuzz::is_caller_form(s), "from_caller({input:?}) = {s:?}, not a normalised number");
    assert!(!s.starts_with("00"), "from_caller({input:?}) = {s:?} starts with the international prefix");
    // A normalised number normalises to itself.
    assert_eq!(PhoneNumber::from_caller(s), Some(n), "from_caller is not idempotent on {input:?}");
    // The two parsers agree on R-L2 input, which is what lets decode turn a called
    // number into a subscriber's number.
    if is_r_l2(input) {
        assert_eq!(PhoneNumber::parse(input), Ok(n), "parse and from_caller disagree on {input:?}");
    }
}
