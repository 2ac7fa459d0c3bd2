//! Asterisk CDRs, as the CDR-to-Kafka modules (cdr_kafka and the like) emit them: the
//! classic CDR columns as one flat JSON object.
//!
//! ```json
//! {"uniqueid":"1795482000.42","linkedid":"1795482000.42","src":"09011112222",
//!  "dst":"0312345678","clid":"\"Taro\" <09011112222>","start":"2026-11-24 10:00:00",
//!  "answer":"","end":"2026-11-24 10:00:31","duration":31,"billsec":0,
//!  "disposition":"NO ANSWER"}
//! ```
//!
//! Asterisk CDRs carry no presentation flag, so a withheld caller is recognised only by
//! the empty or `anonymous` number the exchange puts in its place.

use chrono::{DateTime, FixedOffset, NaiveDateTime, Utc};
use serde::Deserialize;

use super::{
    absence_reason, called_number_in, is_voicemail, parse_object, rfc3339, unix_time, CallEvent, Caller, DecodeError,
    Outcome, Scalar,
};
use crate::phone::PhoneNumber;

/// The columns this decoder reads; the others (`duration`, `billsec`, `lastapp`, …) are
/// skipped whatever their type.
#[derive(Deserialize, Default)]
#[serde(default, bound(deserialize = "'de: 'a"))]
struct Cdr<'a> {
    uniqueid: Scalar<'a>,
    linkedid: Scalar<'a>,
    src: Scalar<'a>,
    clid: Scalar<'a>,
    dst: Scalar<'a>,
    start: Scalar<'a>,
    answer: Scalar<'a>,
    end: Scalar<'a>,
    disposition: Scalar<'a>,
    /// The dialplan application the call ended in: `VoiceMail` answered it.
    lastapp: Scalar<'a>,
}

/// `disposition` values, as Asterisk spells them (compared ignoring case). CONGESTION is
/// the network refusing the call, which the subscriber sees as a failed call.
const DISPOSITIONS: &[(&str, Outcome)] = &[
    ("ANSWERED", Outcome::Answered),
    ("NO ANSWER", Outcome::NoAnswer),
    ("BUSY", Outcome::Busy),
    ("FAILED", Outcome::Failed),
    ("CONGESTION", Outcome::Failed),
];

/// The exchange's clock: Asterisk writes CDR times in its local time without an
/// offset, and the exchanges this service reads are in Japan.
const EXCHANGE_OFFSET_SECS: i32 = 9 * 3600;

/// How far from 0 an `answer` may be and still be the Unix epoch written in some zone.
const EPOCH_IN_ANY_ZONE_SECS: i64 = 14 * 3600;

pub(super) fn decode(payload: &[u8]) -> Result<CallEvent<'_>, DecodeError> {
    let cdr: Cdr<'_> = parse_object("asterisk", payload)?;

    let call_id = call_id(cdr.uniqueid, cdr.linkedid)?;
    let dst = cdr.dst.required("dst")?;
    let called = called_number_in("dst", dst)?;
    let clid = cdr.clid.text("clid")?;
    let caller = match cdr.src.text("src")? {
        Some(src) => caller(src),
        None => clid.map_or(Caller::Unavailable, |clid| caller(clid_number(clid))),
    };
    // No number: the name NTT's network gave the caller says why (R-N7).
    let caller = match (caller, clid) {
        (Caller::Withheld, Some(clid)) => absence_reason(clid_name(clid)).unwrap_or(Caller::Withheld),
        (caller, _) => caller,
    };
    let started_at = time(&cdr.start, "start")?.ok_or(DecodeError::Missing { field: "start" })?;
    // The Unix epoch in any zone (`1970-01-01 09:00:00`, a template formatting an answer
    // time of 0 in Japan time) is "never answered", as 0 itself is: the disposition, not
    // `answer`, says how the call went.
    let answered_at = time(&cdr.answer, "answer")?.filter(|t| t.timestamp().abs() > EPOCH_IN_ANY_ZONE_SECS);
    let ended_at = time(&cdr.end, "end")?.ok_or(DecodeError::Missing { field: "end" })?;
    let disposition = cdr.disposition.required("disposition")?;
    let outcome = match outcome(disposition)? {
        // Answered by voicemail, not by the subscriber: a missed call (R-N4 ※2).
        Outcome::Answered if cdr.lastapp.text("lastapp")?.is_some_and(is_voicemail) => Outcome::Forwarded,
        outcome => outcome,
    };

    Ok(CallEvent { call_id, called, caller, started_at, answered_at, ended_at, outcome })
}

/// `uniqueid` names the call (its first channel); `linkedid` stands in for modules that
/// leave `uniqueid` out or empty.
fn call_id<'a>(uniqueid: Scalar<'a>, linkedid: Scalar<'a>) -> Result<std::borrow::Cow<'a, str>, DecodeError> {
    let uniqueid_present = !matches!(uniqueid, Scalar::Absent);
    for (field, value) in [("uniqueid", uniqueid), ("linkedid", linkedid)] {
        if let Some(id) = value.into_text(field)? {
            if !id.trim().is_empty() {
                return Ok(id);
            }
        }
    }
    Err(if uniqueid_present {
        DecodeError::invalid("uniqueid", "empty")
    } else {
        DecodeError::Missing { field: "uniqueid" }
    })
}

fn outcome(disposition: &str) -> Result<Outcome, DecodeError> {
    DISPOSITIONS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(disposition.trim()))
        .map(|&(_, outcome)| outcome)
        .ok_or_else(|| DecodeError::invalid("disposition", format!("unknown {disposition:?}")))
}

/// An empty or `anonymous` number is what Asterisk records for a withheld caller (R-N7);
/// anything else that is not a number (`unknown`, `Restricted`…) is shown as 表示圏外.
fn caller(number: &str) -> Caller {
    let number = number.trim();
    if number.is_empty() || number.eq_ignore_ascii_case("anonymous") {
        return Caller::Withheld;
    }
    PhoneNumber::from_caller(number).map_or(Caller::Unavailable, Caller::Number)
}

/// The name part of a caller id such as `"Coin line/payphone" <anonymous>` (empty when
/// it has none).
fn clid_name(clid: &str) -> &str {
    clid.rfind('<').map_or("", |open| &clid[..open])
}

/// The number part of a caller id such as `"Taro" <09011112222>`; a clid without angle
/// brackets is taken as the number itself.
fn clid_number(clid: &str) -> &str {
    match (clid.rfind('<'), clid.rfind('>')) {
        (Some(open), Some(close)) if open < close => &clid[open + 1..close],
        _ => clid,
    }
}

/// A CDR time: `YYYY-MM-DD HH:MM:SS[.ffffff]` in the exchange's local time, RFC 3339, or
/// Unix seconds, as a number or as text, whole or with a fraction (`cdr_custom`'s
/// `${CDR(start,u)}`: `1795482000.123456`). Empty, `0` and the zero dates some modules
/// write for "never" (an unanswered call's `answer`) are `None`.
fn time(value: &Scalar<'_>, field: &'static str) -> Result<Option<DateTime<Utc>>, DecodeError> {
    let unix = |secs: f64| -> Result<Option<DateTime<Utc>>, DecodeError> {
        if secs == 0.0 {
            return Ok(None);
        }
        if !secs.is_finite() || secs < 0.0 {
            return Err(DecodeError::invalid(field, format!("{secs} is not a time")));
        }
        unix_time(field, secs.floor() as i64).map(Some)
    };
    match value {
        Scalar::Int(secs) => return unix(*secs as f64),
        Scalar::Float(secs) => return unix(*secs),
        _ => {}
    }
    let raw = match value.text(field)? {
        Some(raw) => raw.trim(),
        None => return Ok(None),
    };
    if raw.is_empty() || raw.starts_with("0000-00-00") {
        return Ok(None);
    }
    let (whole, fraction) = raw.split_once('.').unwrap_or((raw, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(whole) && digits(fraction) {
        let secs: i64 = whole.parse().map_err(|_| DecodeError::invalid(field, format!("{raw:?} is out of range")))?;
        return unix(secs as f64);
    }
    let local = NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%.f"));
    match local {
        Ok(local) => {
            let offset = FixedOffset::east_opt(EXCHANGE_OFFSET_SECS).expect("valid offset");
            let utc = local.and_local_timezone(offset).single().map(|t| t.with_timezone(&Utc));
            utc.map(Some).ok_or_else(|| DecodeError::invalid(field, format!("{raw:?} is out of range")))
        }
        Err(_) => rfc3339(field, raw).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// R-N7: a call from NTT's network without a number says why in the caller's name
    /// (`clid`): a payphone's is 公衆電話, one that cannot be sent 表示圏外, one withheld
    /// 非通知. Every one of them was 非通知 (`src` `anonymous`), the name never read.
    #[test]
    fn r_n7_the_reason_in_the_caller_s_name_tells_payphone_and_unavailable_from_withheld() {
        let cdr = |src: &str, clid: &str| {
            format!(
                r#"{{"uniqueid":"1.1","src":"{src}","clid":"{clid}","dst":"0312345678","start":"2026-11-24 10:00:00","answer":"","end":"2026-11-24 10:00:20","disposition":"NO ANSWER"}}"#
            )
        };
        for (src, clid, want) in [
            ("anonymous", r#"\"Coin line/payphone\" <anonymous>"#, Caller::Payphone),
            ("anonymous", r#"\"Unavailable\" <anonymous>"#, Caller::Unavailable),
            ("", r#"\"Interaction with other service\" <anonymous>"#, Caller::Unavailable),
            ("anonymous", r#"\"Anonymous\" <anonymous>"#, Caller::Withheld),
            ("anonymous", "anonymous", Caller::Withheld),
            ("anonymous", r#"\"Taro\" <anonymous>"#, Caller::Withheld),
        ] {
            assert_eq!(decode(cdr(src, clid).as_bytes()).unwrap().caller, want, "{src:?} {clid}");
        }
        // A number is the number, whatever the name says.
        let named = cdr("09011112222", r#"\"Unavailable\" <09011112222>"#);
        assert_eq!(
            decode(named.as_bytes()).unwrap().caller,
            Caller::Number(PhoneNumber::parse("09011112222").unwrap())
        );
    }

    /// R-N4: an unanswered call whose `answer` is the Unix epoch written in Japan time
    /// (`1970-01-01 09:00:00`, what a template formatting 0 writes) is a missed call. It
    /// was refused as "answered_at before 2000" and never mailed.
    #[test]
    fn r_n4_an_answer_time_of_the_epoch_in_local_time_is_not_answered() {
        for answer in ["1970-01-01 09:00:00", "1970-01-01 00:00:00", "0"] {
            let cdr = format!(
                r#"{{"uniqueid":"1.1","src":"09011112222","dst":"0312345678","start":"2026-11-24 10:00:00","answer":"{answer}","end":"2026-11-24 10:00:20","disposition":"NO ANSWER"}}"#
            );
            let call = decode(cdr.as_bytes()).unwrap();
            assert_eq!(call.answered_at, None, "{answer}");
            let now = DateTime::parse_from_rfc3339("2026-11-24T02:00:00Z").unwrap().to_utc();
            assert_eq!(crate::decode::check_times(&call, now), Ok(()), "{answer}");
        }
    }

    #[test]
    fn r_n4_disposition_table() {
        let cases = [
            ("ANSWERED", Outcome::Answered),
            ("NO ANSWER", Outcome::NoAnswer),
            ("BUSY", Outcome::Busy),
            ("FAILED", Outcome::Failed),
            ("CONGESTION", Outcome::Failed),
            ("no answer", Outcome::NoAnswer),
        ];
        for (disposition, want) in cases {
            assert_eq!(outcome(disposition), Ok(want), "{disposition}");
        }
        assert!(matches!(outcome("NOANSWER"), Err(DecodeError::Invalid { field: "disposition", .. })));
        assert!(outcome("").is_err());
    }

    /// R-N4 (※2 不在時の呼びきり、転送など): a call voicemail answered is ANSWERED to
    /// Asterisk, and 応答できなかった着信のみ dropped it as answered; the subscriber
    /// never picked up. It is a missed call; one the subscriber answered stays answered.
    #[test]
    fn r_n4_a_call_answered_by_voicemail_is_a_missed_call() {
        let cdr = |lastapp: &str| {
            format!(
                r#"{{"uniqueid":"1.1","src":"09011112222","dst":"0312345678","start":"2026-11-24 10:00:00","answer":"2026-11-24 10:00:20","end":"2026-11-24 10:00:50","disposition":"ANSWERED","lastapp":"{lastapp}"}}"#
            )
        };
        assert!(decode(cdr("VoiceMail").as_bytes()).unwrap().is_missed());
        assert!(!decode(cdr("Dial").as_bytes()).unwrap().is_missed());
    }

    #[test]
    fn r_n7_empty_or_anonymous_src_is_withheld() {
        let n = |s| Caller::Number(PhoneNumber::parse(s).unwrap());
        assert_eq!(caller(""), Caller::Withheld);
        assert_eq!(caller("Anonymous"), Caller::Withheld);
        assert_eq!(caller("unknown"), Caller::Unavailable);
        assert_eq!(caller("+819011112222"), n("09011112222"));
        assert_eq!(caller(clid_number("\"Taro\" <09011112222>")), n("09011112222"));
        assert_eq!(caller(clid_number("\"Anonymous\" <anonymous>")), Caller::Withheld);
    }

    #[test]
    fn times_are_exchange_local_rfc3339_or_unix_seconds() {
        let want = DateTime::parse_from_rfc3339("2026-11-24T01:00:00Z").unwrap();
        let ok = |v: Scalar<'static>| time(&v, "start").unwrap().unwrap();
        assert_eq!(ok(Scalar::Str("2026-11-24 10:00:00".into())), want);
        assert_eq!(ok(Scalar::Str("2026-11-24T10:00:00".into())), want);
        assert_eq!(ok(Scalar::Str("2026-11-24T10:00:00+09:00".into())), want);
        assert_eq!(ok(Scalar::Int(want.timestamp())), want);
        let frac = ok(Scalar::Str("2026-11-24 10:00:00.250000".into()));
        assert_eq!(frac.timestamp_subsec_millis(), 250);
        for none in ["", "0000-00-00 00:00:00"] {
            assert_eq!(time(&Scalar::Str(none.into()), "answer"), Ok(None));
        }
        assert_eq!(time(&Scalar::Absent, "answer"), Ok(None));
        assert!(time(&Scalar::Str("24/11/2026".into()), "start").is_err());
    }

    /// docs/cdr-formats.md promises Unix seconds: `cdr_custom`'s `${CDR(start,u)}`
    /// writes them as a string with microseconds, and an unanswered call's answer as
    /// `0.000000`. Such CDRs were all rejected (dead letters, no mail at all).
    #[test]
    fn unix_seconds_written_as_text_or_with_a_fraction_are_times() {
        let want = DateTime::parse_from_rfc3339("2026-11-24T01:00:00Z").unwrap();
        let secs = want.timestamp();
        let at = |v: Scalar<'static>| time(&v, "start").unwrap();
        assert_eq!(at(Scalar::Str(format!("{secs}.123456").into())).unwrap().timestamp(), secs);
        assert_eq!(at(Scalar::Str(format!("{secs}").into())).unwrap().timestamp(), secs);
        assert_eq!(at(Scalar::Float(secs as f64 + 0.5)).unwrap().timestamp(), secs);
        for none in [Scalar::Str("0.000000".into()), Scalar::Str("0".into()), Scalar::Float(0.0)] {
            assert_eq!(time(&none, "answer"), Ok(None));
        }
        assert!(time(&Scalar::Str("1795482000.12.3".into()), "start").is_err());
        assert!(time(&Scalar::Float(-5.0), "start").is_err());
    }

    #[test]
    fn call_id_falls_back_to_linkedid() {
        let s = |v: &'static str| Scalar::Str(v.into());
        assert_eq!(call_id(s("1.1"), s("1.0")).unwrap(), "1.1");
        assert_eq!(call_id(Scalar::Absent, s("1.0")).unwrap(), "1.0");
        assert_eq!(call_id(s(""), s("1.0")).unwrap(), "1.0");
        assert_eq!(call_id(Scalar::Absent, Scalar::Absent), Err(DecodeError::Missing { field: "uniqueid" }));
        assert!(matches!(call_id(s(" "), Scalar::Absent), Err(DecodeError::Invalid { field: "uniqueid", .. })));
        assert!(call_id(Scalar::Int(1), Scalar::Absent).is_err());
    }
}
