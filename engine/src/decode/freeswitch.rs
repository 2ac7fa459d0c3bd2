//! FreeSWITCH `mod_json_cdr` documents.
//!
//! A document is large (hundreds of channel variables, the SDP, the dialplan trace); the
//! few fields a notification needs are in `variables`, with the caller profile under
//! `callflow` as a fallback for the numbers. `callflow` is an array in current
//! FreeSWITCH and, in old releases, an object, one `callflow` key per flow; all are read.
//! Everything else is skipped without being buffered.
//!
//! `mod_json_cdr` URL-encodes variable values by default (`encode-values`), so a `+81`
//! caller arrives as `%2B81…`; the number fields are percent-decoded before use.

use std::borrow::Cow;
use std::fmt;

use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{
    absence_reason, called_number_in, is_voicemail, parse_object, unix_time, CallEvent, Caller, DecodeError, Outcome,
    Scalar,
};
use crate::phone::PhoneNumber;

#[derive(Default)]
struct Cdr<'a> {
    variables: Option<Variables<'a>>,
    callflow: Option<Callflow<'a>>,
}

/// The keys of a document this decoder reads.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum CdrKey {
    Variables,
    Callflow,
    #[serde(other)]
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Cdr<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(CdrVisitor)
    }
}

struct CdrVisitor;

impl<'de> Visitor<'de> for CdrVisitor {
    type Value = Cdr<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mod_json_cdr document")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut cdr = Cdr::default();
        while let Some(key) = map.next_key::<CdrKey>()? {
            match key {
                CdrKey::Variables if cdr.variables.is_some() => {
                    return Err(serde::de::Error::duplicate_field("variables"));
                }
                CdrKey::Variables => cdr.variables = map.next_value()?,
                // Old releases write one `callflow` key per flow, newest first: the last
                // with a caller profile is the oldest, as in an array.
                CdrKey::Callflow => {
                    let flow: Callflow<'de> = map.next_value()?;
                    if flow.0.is_some() || cdr.callflow.is_none() {
                        cdr.callflow = Some(flow);
                    }
                }
                CdrKey::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(cdr)
    }
}

/// The channel variables this decoder reads.
#[derive(Deserialize, Default)]
#[serde(default, bound(deserialize = "'de: 'a"))]
struct Variables<'a> {
    uuid: Scalar<'a>,
    caller_id_number: Scalar<'a>,
    /// The `From` display name: NTT's network says there why a call has no number.
    caller_id_name: Scalar<'a>,
    sip_from_user: Scalar<'a>,
    destination_number: Scalar<'a>,
    start_epoch: Scalar<'a>,
    answer_epoch: Scalar<'a>,
    end_epoch: Scalar<'a>,
    hangup_cause: Scalar<'a>,
    /// The dialplan application the call ended in: `voicemail` answered it.
    last_app: Scalar<'a>,
    privacy_hide_number: Scalar<'a>,
    privacy: Scalar<'a>,
    /// The `Privacy` header of the INVITE (RFC 3323/3325), as sofia keeps it: a carrier
    /// withholding the caller sends `id` with the number in P-Asserted-Identity, which
    /// FreeSWITCH records as the caller's number all the same.
    #[serde(rename = "sip_Privacy")]
    sip_privacy: Scalar<'a>,
}

#[derive(Deserialize, Default)]
#[serde(default, bound(deserialize = "'de: 'a"))]
struct Flow<'a> {
    caller_profile: Option<Profile<'a>>,
}

/// The oldest `callflow` entry's `caller_profile`, the fallback for the numbers and the
/// uuid.
#[derive(Deserialize, Default)]
#[serde(default, bound(deserialize = "'de: 'a"))]
struct Profile<'a> {
    uuid: Scalar<'a>,
    caller_id_number: Scalar<'a>,
    caller_id_name: Scalar<'a>,
    destination_number: Scalar<'a>,
}

/// Causes of an unanswered call that say more than "it failed" (compared ignoring case).
/// NORMAL_CLEARING on an unanswered call is the caller hanging up or the ring timer
/// ending it normally, so it counts as not answered; any other cause is `Failed`.
const HANGUP_CAUSES: &[(&str, Outcome)] = &[
    ("USER_BUSY", Outcome::Busy),
    ("CALL_REJECTED", Outcome::Rejected),
    ("ORIGINATOR_CANCEL", Outcome::Cancelled),
    ("NO_ANSWER", Outcome::NoAnswer),
    ("NO_USER_RESPONSE", Outcome::NoAnswer),
    ("ALLOTTED_TIMEOUT", Outcome::NoAnswer),
    ("NORMAL_CLEARING", Outcome::NoAnswer),
];

/// Values of `privacy_hide_number` / `privacy` that hide the number: FreeSWITCH's
/// `switch_true` spellings, plus `privacy`'s `full`/`number` and SIP `Privacy: id`.
const HIDE_VALUES: &[&str] = &["true", "yes", "on", "1", "t", "enabled", "full", "number", "id"];

pub(super) fn decode(payload: &[u8]) -> Result<CallEvent<'_>, DecodeError> {
    let cdr: Cdr<'_> = parse_object("freeswitch", payload)?;
    let vars = cdr.variables.ok_or(DecodeError::Missing { field: "variables" })?;
    let profile = cdr.callflow.and_then(|c| c.0).unwrap_or_default();

    let call_id = first(vars.uuid, profile.uuid).into_text("uuid")?.ok_or(DecodeError::Missing { field: "uuid" })?;
    if call_id.trim().is_empty() {
        return Err(DecodeError::invalid("uuid", "empty"));
    }
    let destination = first(vars.destination_number, profile.destination_number);
    let destination = destination.required("destination_number")?;
    let called = called_number_in("destination_number", &unescape(destination))?;

    let hidden = hides(&vars.privacy_hide_number, "privacy_hide_number")?
        || hides(&vars.privacy, "privacy")?
        || asks_privacy(vars.sip_privacy.text("sip_Privacy")?.map(unescape).as_deref());
    let number = first(first(vars.caller_id_number, profile.caller_id_number), vars.sip_from_user);
    let caller = caller(hidden, number.text("caller_id_number")?.map(unescape).as_deref());
    // No number, not hidden by a privacy flag: the name NTT's network gave the caller
    // says why (R-N7). (One hidden by a flag had a number: it was withheld.)
    let caller = match caller {
        Caller::Withheld if !hidden => {
            let name = first(vars.caller_id_name, profile.caller_id_name);
            let name = name.text("caller_id_name")?;
            name.map(unescape).as_deref().and_then(absence_reason).unwrap_or(Caller::Withheld)
        }
        caller => caller,
    };

    let epoch = |value: &Scalar<'_>, field| match value.epoch_seconds(field)? {
        Some(secs) if secs > 0 => unix_time(field, secs).map(Some),
        _ => Ok(None),
    };
    let started_at = epoch(&vars.start_epoch, "start_epoch")?.ok_or(DecodeError::Missing { field: "start_epoch" })?;
    let answered_at = epoch(&vars.answer_epoch, "answer_epoch")?;
    let ended_at = epoch(&vars.end_epoch, "end_epoch")?.ok_or(DecodeError::Missing { field: "end_epoch" })?;
    let outcome = match answered_at {
        // Answered by voicemail, not by the subscriber: a missed call (R-N4 ※2).
        Some(_) if vars.last_app.text("last_app")?.is_some_and(is_voicemail) => Outcome::Forwarded,
        Some(_) => Outcome::Answered,
        None => missed_outcome(vars.hangup_cause.text("hangup_cause")?),
    };

    Ok(CallEvent { call_id, called, caller, started_at, answered_at, ended_at, outcome })
}

/// The first value that is present (a present but empty string counts: it means the
/// exchange had no number, which must not be replaced by a fallback's).
fn first<'a>(preferred: Scalar<'a>, fallback: Scalar<'a>) -> Scalar<'a> {
    match preferred {
        Scalar::Absent => fallback,
        value => value,
    }
}

/// How an unanswered call ended; no cause at all is `Failed`, as is any cause not listed.
fn missed_outcome(cause: Option<&str>) -> Outcome {
    let cause = cause.unwrap_or_default().trim();
    HANGUP_CAUSES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(cause))
        .map_or(Outcome::Failed, |&(_, outcome)| outcome)
}

/// Whether a SIP `Privacy` header asks for the caller's identity to be withheld: any of
/// `id`, `user`, `header` among its values (`none`, `session`, `critical` alone do not).
fn asks_privacy(header: Option<&str>) -> bool {
    header.is_some_and(|h| {
        h.split([';', ',']).map(str::trim).any(|v| ["id", "user", "header"].iter().any(|p| p.eq_ignore_ascii_case(v)))
    })
}

/// Whether a privacy variable asks to hide the number.
fn hides(value: &Scalar<'_>, field: &'static str) -> Result<bool, DecodeError> {
    Ok(match value {
        Scalar::Bool(b) => *b,
        Scalar::Int(n) => *n != 0,
        _ => value.text(field)?.is_some_and(|v| HIDE_VALUES.iter().any(|h| h.eq_ignore_ascii_case(v.trim()))),
    })
}

/// The caller as the subscriber sees it (R-N7): a privacy flag hides the number even
/// when FreeSWITCH recorded it (carriers send the real number with `Privacy: id`); an
/// empty or `anonymous` number is withheld; no number at all, or one that is not a
/// number, is 表示圏外.
fn caller(hidden: bool, number: Option<&str>) -> Caller {
    let Some(number) = number.map(str::trim) else {
        return if hidden { Caller::Withheld } else { Caller::Unavailable };
    };
    if hidden || number.is_empty() || number.eq_ignore_ascii_case("anonymous") {
        return Caller::Withheld;
    }
    PhoneNumber::from_caller(number).map_or(Caller::Unavailable, Caller::Number)
}

/// Undoes `mod_json_cdr`'s URL encoding (`%XX` only; `+` is a literal plus there).
/// Borrows when there is nothing to decode, which is the usual case for numbers.
fn unescape(raw: &str) -> Cow<'_, str> {
    if !raw.contains('%') {
        return Cow::Borrowed(raw);
    }
    let (bytes, mut out, mut i) = (raw.as_bytes(), Vec::with_capacity(raw.len()), 0);
    while i < bytes.len() {
        let escaped = match bytes[i..] {
            [b'%', hi, lo, ..] => hex(hi).zip(hex(lo)),
            _ => None,
        };
        let (byte, width) = escaped.map_or((bytes[i], 1), |(hi, lo)| (hi << 4 | lo, 3));
        out.push(byte);
        i += width;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|d| d as u8)
}

/// `callflow`: an array of flows (newest first) or, in old releases, one flow object.
/// Only the oldest flow's caller profile is kept, the one the call arrived with: a
/// dialplan's `transfer` adds a newer one whose destination is the transfer's target
/// (an extension, or another subscriber's number); anything else is skipped.
struct Callflow<'a>(Option<Profile<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for Callflow<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CallflowVisitor)
    }
}

struct CallflowVisitor;

impl<'de> Visitor<'de> for CallflowVisitor {
    type Value = Callflow<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a callflow array or object")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // Each flow is read as a `Callflow` borrowing from the input (nothing copied),
        // the last one with a caller profile kept.
        let mut oldest = Callflow(None);
        while let Some(flow) = seq.next_element::<Callflow<'de>>()? {
            if flow.0.is_some() {
                oldest = flow;
            }
        }
        Ok(oldest)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let flow = Flow::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        Ok(Callflow(flow.caller_profile))
    }
    // A callflow that is not a flow is no use as a fallback, but no reason to drop the CDR.
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Callflow(None))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Callflow(None))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Callflow(None))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Callflow(None))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Callflow(None))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Callflow(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r_n4_hangup_cause_table_for_unanswered_calls() {
        let cases = [
            ("USER_BUSY", Outcome::Busy),
            ("CALL_REJECTED", Outcome::Rejected),
            ("ORIGINATOR_CANCEL", Outcome::Cancelled),
            ("NO_ANSWER", Outcome::NoAnswer),
            ("NO_USER_RESPONSE", Outcome::NoAnswer),
            ("ALLOTTED_TIMEOUT", Outcome::NoAnswer),
            ("NORMAL_CLEARING", Outcome::NoAnswer),
            ("normal_clearing", Outcome::NoAnswer),
            ("UNALLOCATED_NUMBER", Outcome::Failed),
            ("RECOVERY_ON_TIMER_EXPIRE", Outcome::Failed),
        ];
        for (cause, want) in cases {
            assert_eq!(missed_outcome(Some(cause)), want, "{cause}");
        }
        assert_eq!(missed_outcome(None), Outcome::Failed);
    }

    /// R-N7: a call from NTT's network without a number says why in the caller's name
    /// (`caller_id_name`): a payphone's is 公衆電話, one that cannot be sent 表示圏外. They
    /// were 非通知, the name never read. A number hidden by a privacy flag stays 非通知.
    #[test]
    fn r_n7_the_reason_in_the_caller_s_name_tells_payphone_and_unavailable_from_withheld() {
        let cdr = |number: &str, name: &str, privacy: &str| {
            format!(
                r#"{{"variables":{{"uuid":"u-1","caller_id_number":"{number}","caller_id_name":"{name}","destination_number":"0312345678","start_epoch":"1795482000","answer_epoch":"0","end_epoch":"1795482020","hangup_cause":"NO_ANSWER","privacy":"{privacy}"}}}}"#
            )
        };
        for (number, name, privacy, want) in [
            ("anonymous", "Coin%20line%2Fpayphone", "", Caller::Payphone),
            ("anonymous", "Unavailable", "", Caller::Unavailable),
            ("", "Interaction with other service", "", Caller::Unavailable),
            ("anonymous", "Anonymous", "", Caller::Withheld),
            ("anonymous", "Taro", "", Caller::Withheld),
            ("09011112222", "Coin line/payphone", "full", Caller::Withheld),
        ] {
            assert_eq!(decode(cdr(number, name, privacy).as_bytes()).unwrap().caller, want, "{number:?} {name}");
        }
    }

    #[test]
    fn r_n7_privacy_and_anonymous_callers_are_withheld() {
        let n = Caller::Number(PhoneNumber::parse("09011112222").unwrap());
        assert_eq!(caller(false, Some("09011112222")), n);
        assert_eq!(caller(true, Some("09011112222")), Caller::Withheld);
        assert_eq!(caller(false, Some("")), Caller::Withheld);
        assert_eq!(caller(false, Some("Anonymous")), Caller::Withheld);
        assert_eq!(caller(false, Some("unknown")), Caller::Unavailable);
        assert_eq!(caller(false, None), Caller::Unavailable);
        assert_eq!(caller(true, None), Caller::Withheld);
        let s = |v: &'static str| Scalar::Str(v.into());
        for yes in ["true", "YES", "number", "full", "id", "1"] {
            assert!(hides(&s(yes), "privacy").unwrap(), "{yes}");
        }
        for no in ["false", "no", "none", "name", ""] {
            assert!(!hides(&s(no), "privacy").unwrap(), "{no}");
        }
        assert!(hides(&Scalar::Bool(true), "privacy").unwrap());
        assert!(!hides(&Scalar::Absent, "privacy").unwrap());
    }

    /// R-N4 (※2 不在時の呼びきり、転送など): a call voicemail answered has an
    /// `answer_epoch`, and 応答できなかった着信のみ dropped it as answered; the subscriber
    /// never picked up. It is a missed call; one bridged to the subscriber stays answered.
    #[test]
    fn r_n4_a_call_answered_by_voicemail_is_a_missed_call() {
        let cdr = |last_app: &str| {
            format!(
                r#"{{"variables":{{"uuid":"u-1","caller_id_number":"09011112222","destination_number":"0312345678","start_epoch":"1795482000","answer_epoch":"1795482020","end_epoch":"1795482050","last_app":"{last_app}"}}}}"#
            )
        };
        assert!(decode(cdr("voicemail").as_bytes()).unwrap().is_missed());
        assert!(!decode(cdr("bridge").as_bytes()).unwrap().is_missed());
    }

    /// R-N7: `mod_json_cdr` URL-encodes `sip_Privacy` as any value: `id;critical` comes
    /// as `id%3Bcritical`, and was not taken for `id` (the number shown).
    #[test]
    fn r_n7_a_url_encoded_privacy_header_withholds_the_caller() {
        let cdr = |privacy: &str| {
            format!(
                r#"{{"variables":{{"uuid":"u-1","sip_Privacy":"{privacy}","start_epoch":"1795482000","end_epoch":"1795482030"}},"callflow":[{{"caller_profile":{{"caller_id_number":"09011112222","destination_number":"0312345678"}}}}]}}"#
            )
        };
        for privacy in ["id%3Bcritical", "user%3B%20id", "id", "header"] {
            assert_eq!(decode(cdr(privacy).as_bytes()).unwrap().caller, Caller::Withheld, "{privacy}");
        }
        for shown in ["none", "critical%3Bsession"] {
            assert!(matches!(decode(cdr(shown).as_bytes()).unwrap().caller, Caller::Number(_)), "{shown}");
        }
    }

    #[test]
    fn url_encoded_values_are_decoded() {
        assert!(matches!(unescape("0312345678"), Cow::Borrowed("0312345678")));
        assert_eq!(unescape("%2B819011112222"), "+819011112222");
        assert_eq!(unescape("%2b81%20"), "+81 ");
        assert_eq!(unescape("100%"), "100%");
        assert_eq!(unescape("%zz%4%+1"), "%zz%4%+1");
        assert_eq!(unescape("%E3%81%82"), "あ");
    }

    #[test]
    fn callflow_may_be_an_array_an_object_or_junk() {
        let number = |json: &str| {
            let cdr: Cdr<'_> = serde_json::from_str(json).unwrap();
            let profile = cdr.callflow.and_then(|c| c.0).unwrap_or_default();
            let number = profile.destination_number.text("destination_number").unwrap();
            number.map(str::to_owned)
        };
        let flow = r#"{"dialplan":"XML","caller_profile":{"destination_number":"0312345678"}}"#;
        // Newest first: a transfer's flow, then the one the call arrived with.
        let transfer = r#"{"dialplan":"XML","caller_profile":{"destination_number":"1000"}}"#;
        assert_eq!(number(&format!(r#"{{"callflow":[{transfer},{flow},{{}}]}}"#)).as_deref(), Some("0312345678"));
        assert_eq!(number(&format!(r#"{{"callflow":{flow}}}"#)).as_deref(), Some("0312345678"));
        for junk in ["[]", "null", r#""x""#, "1", "[1]"] {
            assert_eq!(number(&format!(r#"{{"callflow":{junk}}}"#)), None, "{junk}");
        }
    }

    /// R-N4, R-M4: releases before the array write one `callflow` key per flow, newest
    /// first, in one object (their JSON CDR adds the key in its loop over the caller
    /// profiles). Every CDR of a transferred call, which the stock public dialplan makes
    /// of every inbound call, was dead-lettered as a syntax error ("duplicate field"),
    /// and its missed call never mailed.
    #[test]
    fn r_n4_an_old_release_s_repeated_callflow_keys_are_read_oldest_last() {
        let cdr = r#"{"variables":{"uuid":"u1","start_epoch":"1795482000","answer_epoch":"0","end_epoch":"1795482020","hangup_cause":"NO_ANSWER"},
            "callflow":{"caller_profile":{"caller_id_number":"09011112222","destination_number":"1000"}},
            "callflow":{"caller_profile":{"caller_id_number":"09011112222","destination_number":"0312345678"}},
            "callflow":{}}"#;
        let call = decode(cdr.as_bytes()).expect("read");
        assert_eq!(call.called.as_str(), "0312345678");
        assert_eq!(call.outcome, Outcome::NoAnswer);
        assert_eq!(call.caller, Caller::Number(PhoneNumber::parse("09011112222").unwrap()));
        // Two `variables` are still no CDR to guess from.
        let twice = r#"{"variables":{"uuid":"u1"},"variables":{"uuid":"u2"}}"#;
        assert!(matches!(decode(twice.as_bytes()), Err(DecodeError::Syntax { .. })));
    }
}
