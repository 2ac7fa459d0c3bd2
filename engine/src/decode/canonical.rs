//! callnotify's own CDR format: one JSON object per message.
//!
//! ```json
//! {"call_id":"c-1","called":"0312345678","caller":"09011112222","presentation":"allowed",
//!  "started_at":"2026-11-24T10:00:00+09:00","answered_at":null,
//!  "ended_at":"2026-11-24T10:00:31+09:00","outcome":"no_answer"}
//! ```
//!
//! Exchanges that can be configured to write this format should; it is the only one that
//! carries the presentation (非通知 / 表示圏外 / 公衆電話) explicitly. Unknown fields are
//! ignored so exchanges may add their own.

use std::borrow::Cow;

use serde::Deserialize;

use super::{called_number, flat_object, parse_object, rfc3339, CallEvent, Caller, DecodeError, Outcome, Scalar};
use crate::phone::PhoneNumber;

/// The fields this decoder reads, each as a [`Scalar`] so type errors name the field.
#[derive(Deserialize, Default, Debug, PartialEq)]
#[serde(default, bound(deserialize = "'de: 'a"))]
struct Doc<'a> {
    call_id: Scalar<'a>,
    called: Scalar<'a>,
    caller: Scalar<'a>,
    presentation: Scalar<'a>,
    started_at: Scalar<'a>,
    answered_at: Scalar<'a>,
    ended_at: Scalar<'a>,
    outcome: Scalar<'a>,
}

/// `presentation` values. Required: defaulting to `allowed` would show a number the
/// caller withheld whenever an exchange forgot the field (R-N7).
pub(super) const PRESENTATIONS: &[(&str, Presentation)] = &[
    ("allowed", Presentation::Allowed),
    ("withheld", Presentation::Withheld),
    ("unavailable", Presentation::Unavailable),
    ("payphone", Presentation::Payphone),
];

/// `outcome` values: the snake_case names of [`Outcome`].
const OUTCOMES: &[(&str, Outcome)] = &[
    ("answered", Outcome::Answered),
    ("no_answer", Outcome::NoAnswer),
    ("busy", Outcome::Busy),
    ("forwarded", Outcome::Forwarded),
    ("cancelled", Outcome::Cancelled),
    ("rejected", Outcome::Rejected),
    ("failed", Outcome::Failed),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Presentation {
    Allowed,
    Withheld,
    Unavailable,
    Payphone,
}

/// The document as exchanges write it ([`flat_object`]); `None` for serde to parse.
fn flat_doc(payload: &[u8]) -> Option<Doc<'_>> {
    let mut doc = Doc::default();
    let mut seen = 0u8;
    let flat = flat_object(payload, |key, value| {
        let (bit, slot) = match key {
            "call_id" => (0, &mut doc.call_id),
            "called" => (1, &mut doc.called),
            "caller" => (2, &mut doc.caller),
            "presentation" => (3, &mut doc.presentation),
            "started_at" => (4, &mut doc.started_at),
            "answered_at" => (5, &mut doc.answered_at),
            "ended_at" => (6, &mut doc.ended_at),
            "outcome" => (7, &mut doc.outcome),
            // Ignored, as serde does.
            _ => return true,
        };
        // A field given twice: serde's error says so.
        if seen & 1 << bit != 0 {
            return false;
        }
        seen |= 1 << bit;
        *slot = value.map_or(Scalar::Absent, |v| Scalar::Str(Cow::Borrowed(v)));
        true
    });
    flat.then_some(doc)
}

pub(super) fn decode(payload: &[u8]) -> Result<CallEvent<'_>, DecodeError> {
    let doc = match flat_doc(payload) {
        Some(doc) => doc,
        None => parse_object("canonical", payload)?,
    };

    let call_id = doc.call_id.into_text("call_id")?.ok_or(DecodeError::Missing { field: "call_id" })?;
    if call_id.trim().is_empty() {
        return Err(DecodeError::invalid("call_id", "empty"));
    }
    let called = called_number(doc.called.required("called")?)?;
    let presentation = lookup(PRESENTATIONS, "presentation", doc.presentation.required("presentation")?)?;
    let caller = caller(presentation, doc.caller.text("caller")?);
    let started_at = rfc3339("started_at", doc.started_at.required("started_at")?)?;
    let answered_at = match doc.answered_at.text("answered_at")? {
        Some(raw) if !raw.trim().is_empty() => Some(rfc3339("answered_at", raw)?),
        _ => None,
    };
    let ended_at = rfc3339("ended_at", doc.ended_at.required("ended_at")?)?;
    let outcome = lookup(OUTCOMES, "outcome", doc.outcome.required("outcome")?)?;

    Ok(CallEvent { call_id, called, caller, started_at, answered_at, ended_at, outcome })
}

/// Looks `raw` up in a mapping table; the values are exact (this is our own format).
pub(super) fn lookup<T: Copy>(table: &[(&str, T)], field: &'static str, raw: &str) -> Result<T, DecodeError> {
    table.iter().find(|(name, _)| *name == raw).map(|&(_, value)| value).ok_or_else(|| {
        let names: Vec<&str> = table.iter().map(|(name, _)| *name).collect();
        DecodeError::invalid(field, format!("{raw:?} is not one of {}", names.join(", ")))
    })
}

/// Maps presentation and number to what the subscriber sees (R-N7). The presentation
/// wins over the number: a withheld number is never shown even when the exchange sent it.
/// An allowed call without a usable number is shown as 表示圏外, the honest description
/// of "the network did not give us one".
pub(super) fn caller(presentation: Presentation, number: Option<&str>) -> Caller {
    match presentation {
        Presentation::Withheld => Caller::Withheld,
        Presentation::Unavailable => Caller::Unavailable,
        Presentation::Payphone => Caller::Payphone,
        Presentation::Allowed => number.and_then(PhoneNumber::from_caller).map_or(Caller::Unavailable, Caller::Number),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A JSON value for the documents below: plain strings and null (which the fast
    /// path reads), and what it leaves to serde.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-zA-Z0-9 :+.-]{0,12}".prop_map(|s| format!("{s:?}")),
            2 => Just("null".to_owned()),
            1 => Just("42".to_owned()),
            1 => Just(r#""a\"b""#.to_owned()),
            1 => Just(r#""東京""#.to_owned()),
            1 => Just("{}".to_owned()),
            1 => Just(r#""2026-11-24T10:00:31+09:00""#.to_owned()),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => prop::sample::select(vec![
                "call_id", "called", "caller", "presentation", "started_at", "answered_at", "ended_at", "outcome",
            ])
            .prop_map(str::to_owned),
            1 => "[a-z_]{1,8}",
            1 => Just(r"call\u005fid".to_owned()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Whatever the fast path reads, serde reads the same; what it declines, serde
        /// parses or refuses with its own words.
        #[test]
        fn the_fast_path_reads_exactly_what_serde_reads(
            fields in prop::collection::vec((key(), value()), 0..10),
            space in prop::sample::select(vec!["", " ", "\n\t", "\r\n "]),
            tail in prop::sample::select(vec!["", " ", "\n", "x", ",", "}"]),
        ) {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("{space}\"{k}\"{space}:{space}{v}{space}")).collect();
            let json = format!("{space}{{{}}}{tail}", body.join(","));
            if let Some(fast) = flat_doc(json.as_bytes()) {
                prop_assert_eq!(Some(fast), parse_object::<Doc<'_>>("canonical", json.as_bytes()).ok(), "{}", json);
            }
        }
    }

    #[test]
    fn a_cdr_as_exchanges_write_it_takes_the_fast_path() {
        let json = doc("allowed", r#""09011112222""#, "no_answer");
        let fast = flat_doc(json.as_bytes()).expect("plain strings and null only");
        assert_eq!(Some(fast), parse_object::<Doc<'_>>("canonical", json.as_bytes()).ok());
    }

    fn doc(presentation: &str, caller: &str, outcome: &str) -> String {
        format!(
            r#"{{"call_id":"c-1","called":"0312345678","caller":{caller},"presentation":"{presentation}",
            "started_at":"2026-11-24T10:00:00+09:00","ended_at":"2026-11-24T10:00:31+09:00","outcome":"{outcome}"}}"#
        )
    }

    #[test]
    fn r_n7_presentation_table_maps_to_caller() {
        let n = PhoneNumber::parse("09011112222").unwrap();
        let cases = [
            ("allowed", r#""09011112222""#, Caller::Number(n)),
            ("allowed", r#""+81 90-1111-2222""#, Caller::Number(n)),
            ("allowed", "null", Caller::Unavailable),
            ("allowed", r#""anonymous""#, Caller::Unavailable),
            ("withheld", r#""09011112222""#, Caller::Withheld),
            ("withheld", "null", Caller::Withheld),
            ("unavailable", r#""09011112222""#, Caller::Unavailable),
            ("payphone", "null", Caller::Payphone),
        ];
        for (presentation, caller, want) in cases {
            let json = doc(presentation, caller, "no_answer");
            assert_eq!(decode(json.as_bytes()).unwrap().caller, want, "{presentation} {caller}");
        }
        let err = decode(doc("restricted", "null", "no_answer").as_bytes()).unwrap_err();
        assert_eq!(err.reason().as_str(), "invalid_field");
    }

    #[test]
    fn r_n4_outcome_table_matches_outcome_serde_names() {
        for &(name, want) in OUTCOMES {
            let json = doc("allowed", "null", name);
            assert_eq!(decode(json.as_bytes()).unwrap().outcome, want);
            // Same spelling as the `Outcome` serde derive, so config and CDRs agree.
            assert_eq!(serde_json::from_str::<Outcome>(&format!("{name:?}")).unwrap(), want);
        }
        let err = decode(doc("allowed", "null", "NO_ANSWER").as_bytes()).unwrap_err();
        assert!(matches!(err, DecodeError::Invalid { field: "outcome", .. }), "{err:?}");
    }

    #[test]
    fn plain_strings_borrow_from_the_message() {
        let json = doc("allowed", "null", "busy");
        let event = decode(json.as_bytes()).unwrap();
        assert!(matches!(event.call_id, Cow::Borrowed(_)));
    }

    #[test]
    fn missing_null_and_mistyped_fields_name_the_field() {
        let json = doc("allowed", "null", "busy");
        let without = json.replace(r#""presentation":"allowed","#, "");
        assert_eq!(decode(without.as_bytes()), Err(DecodeError::Missing { field: "presentation" }));
        let null_id = json.replace(r#""c-1""#, "null");
        assert_eq!(decode(null_id.as_bytes()), Err(DecodeError::Missing { field: "call_id" }));
        let empty_id = json.replace(r#""c-1""#, r#""  ""#);
        assert!(matches!(decode(empty_id.as_bytes()), Err(DecodeError::Invalid { field: "call_id", .. })));
        let numeric = json.replace(r#""0312345678""#, "312345678");
        assert!(matches!(decode(numeric.as_bytes()), Err(DecodeError::Invalid { field: "called", .. })));
        let no_offset = json.replace("10:00:00+09:00", "10:00:00");
        assert!(matches!(decode(no_offset.as_bytes()), Err(DecodeError::Invalid { field: "started_at", .. })));
    }

    #[test]
    fn non_objects_are_syntax_errors() {
        for bad in ["", "  ", "[]", r#"["c-1"]"#, "null", "{", r#"{"call_id":"c-1"} x"#] {
            assert_eq!(decode(bad.as_bytes()).unwrap_err().reason().as_str(), "syntax", "{bad:?}");
        }
    }
}
