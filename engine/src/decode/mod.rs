//! Decode stage: the bytes of one Kafka message → one [`CallEvent`].
//!
//! Exchanges write CDRs in their own formats; each topic names its format
//! ([`CdrFormat`]) and everything after this stage sees only `CallEvent`. Decoding
//! borrows from the message where it can, so a CDR that matches no subscriber costs no
//! allocation.

mod asterisk;
mod canonical;
mod fax;
mod freeswitch;

pub use fax::{decode_fax, FaxEvent, MAX_FAX_ID};

use std::borrow::Cow;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};

use crate::phone::PhoneNumber;

/// The formats a topic can carry: the CDR formats, and fax records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CdrFormat {
    /// callnotify's own JSON, one call per message (docs/cdr-formats.md).
    Canonical,
    /// The JSON that Asterisk CDR-to-Kafka modules emit.
    Asterisk,
    /// FreeSWITCH `mod_json_cdr` documents.
    Freeswitch,
    /// Received faxes, not CDRs ([`decode_fax`], R-F1).
    Fax,
}

impl CdrFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Canonical => "canonical",
            Self::Asterisk => "asterisk",
            Self::Freeswitch => "freeswitch",
            Self::Fax => "fax",
        }
    }
}

/// One finished call, as every later stage sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallEvent<'a> {
    /// The exchange's id for the call; with `called` it identifies the notification, so a
    /// replayed CDR is recognised (dedup) and yields the same Message-ID.
    pub call_id: Cow<'a, str>,
    /// 着信番号: the subscriber's number that was called.
    pub called: PhoneNumber,
    /// 発信者: who called, or why the number is not shown.
    pub caller: Caller,
    /// When the call started ringing.
    pub started_at: DateTime<Utc>,
    /// When the call was answered; `None` for a missed call.
    pub answered_at: Option<DateTime<Utc>>,
    /// When the call ended; the start of the end-to-end latency measurement.
    pub ended_at: DateTime<Utc>,
    /// How the call ended.
    pub outcome: Outcome,
}

impl CallEvent<'_> {
    /// 応答できなかった着信: everything but an answered call (R-N4).
    pub fn is_missed(&self) -> bool {
        self.outcome != Outcome::Answered
    }

    /// Copies borrowed parts so the event can outlive the Kafka message.
    pub fn into_owned(self) -> CallEvent<'static> {
        CallEvent { call_id: Cow::Owned(self.call_id.into_owned()), ..self }
    }
}

/// 発信者番号 (caller id) as the subscriber will see it (R-N7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The caller's number, in R-L2 form.
    Number(PhoneNumber),
    /// 非通知: the caller withheld the number.
    Withheld,
    /// 表示圏外: the network could not deliver the number.
    Unavailable,
    /// 公衆電話: a payphone.
    Payphone,
}

/// How a call ended. Everything but `Answered` is a missed call (R-N4): the caller hung
/// up while it rang, the call was forwarded, and the like. `Forwarded` is any call the
/// subscriber did not pick up that something else answered: forwarded elsewhere (where
/// the CDR says so) or answered by voicemail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Answered,
    NoAnswer,
    Busy,
    Forwarded,
    Cancelled,
    Rejected,
    Failed,
}

/// Why a message is not a CDR; the reason goes to the dead-letter topic and, as its
/// [`DecodeError::reason`], into the `callnotify_cdrs_rejected_total` metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not valid JSON for the {format} format: {detail}")]
    Syntax { format: &'static str, detail: String },
    #[error("field {field} is missing")]
    Missing { field: &'static str },
    #[error("field {field} is invalid: {detail}")]
    Invalid { field: &'static str, detail: String },
    /// Times no call can have: an exchange's clock unset (1900, 1970) or far ahead.
    #[error("field {field} is not a time a call can have: {time} is {why}")]
    Implausible { field: &'static str, time: DateTime<Utc>, why: &'static str },
    /// Not the CDR's fault: the called number's record cannot be read by this version
    /// (it is dead-lettered, to be replayed once the record is one this version reads:
    /// docs/cluster.md).
    #[error("the called number's subscriber record cannot be read: {0}")]
    UnreadableSubscriber(String),
}

/// Why a CDR was rejected, as `callnotify_cdrs_rejected_total` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Syntax,
    MissingField,
    InvalidField,
    ImplausibleTime,
    UnreadableSubscriber,
}

impl Rejection {
    pub const ALL: [Rejection; 5] = [
        Rejection::Syntax,
        Rejection::MissingField,
        Rejection::InvalidField,
        Rejection::ImplausibleTime,
        Rejection::UnreadableSubscriber,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Syntax => "syntax",
            Rejection::MissingField => "missing_field",
            Rejection::InvalidField => "invalid_field",
            Rejection::ImplausibleTime => "implausible_time",
            Rejection::UnreadableSubscriber => "unreadable_subscriber",
        }
    }
}

impl DecodeError {
    /// Its metric label (low cardinality).
    pub fn reason(&self) -> Rejection {
        match self {
            Self::Syntax { .. } => Rejection::Syntax,
            Self::Missing { .. } => Rejection::MissingField,
            Self::Invalid { .. } => Rejection::InvalidField,
            Self::Implausible { .. } => Rejection::ImplausibleTime,
            Self::UnreadableSubscriber(_) => Rejection::UnreadableSubscriber,
        }
    }

    fn invalid(field: &'static str, detail: impl std::fmt::Display) -> Self {
        Self::Invalid { field, detail: detail.to_string() }
    }
}

/// What a fax's notification id ([`crate::render::Origin::call_id`]) starts with: its
/// dedup keys and Message-IDs never meet a call's with the same id.
pub(crate) const FAX_NOTIFICATION: &str = "fax:";

/// Decodes one message of the given format.
pub fn decode(format: CdrFormat, payload: &[u8]) -> Result<CallEvent<'_>, DecodeError> {
    let call = match format {
        CdrFormat::Canonical => canonical::decode(payload),
        CdrFormat::Asterisk => asterisk::decode(payload),
        CdrFormat::Freeswitch => freeswitch::decode(payload),
        // The pipeline hands fax records to decode_fax; this is for any other caller.
        CdrFormat::Fax => Err(DecodeError::Syntax { format: "fax", detail: "a fax record is not a CDR".into() }),
    }?;
    // A fax's mails are told from a call's by that prefix (their queued mails are checked
    // against the fax settings, and their dedup keys must never meet a call's).
    if call.call_id.starts_with(FAX_NOTIFICATION) {
        return Err(DecodeError::invalid("call_id", format!("{:?}: `fax:` names faxes", call.call_id)));
    }
    Ok(call)
}

/// Why a call from NTT's network came without a number, as its SIP `From` display name
/// says when the number is `anonymous` (the reasons of TTC's interface: 「Anonymous」 the
/// caller withheld it, 「Coin line/payphone」 a payphone, 「Unavailable」 and 「Interaction
/// with other service」 none can be sent): 非通知, 公衆電話 or 表示圏外 as the subscriber
/// sees it (R-N7). `None` for any other name (a person's, a company's).
fn absence_reason(display_name: &str) -> Option<Caller> {
    const REASONS: &[(&str, Caller)] = &[
        ("Anonymous", Caller::Withheld),
        ("Coin line/payphone", Caller::Payphone),
        ("Unavailable", Caller::Unavailable),
        ("Interaction with other service", Caller::Unavailable),
    ];
    let name = display_name.trim().trim_matches('"').trim();
    REASONS.iter().find(|(reason, _)| reason.eq_ignore_ascii_case(name)).map(|(_, caller)| *caller)
}

/// Whether a dialplan application (Asterisk's `lastapp`, FreeSWITCH's `last_app`) is
/// voicemail: a call it answered was not picked up by the subscriber (R-N4 ※2).
fn is_voicemail(app: &str) -> bool {
    app.trim().eq_ignore_ascii_case("voicemail")
}

/// The earliest time a call may have: before it, the exchange's clock was unset (CDRs
/// dated 1900 or 1970 are what such clocks write).
pub const EARLIEST_CALL: DateTime<Utc> = DateTime::from_timestamp(946_684_800, 0).expect("2000-01-01T00:00:00Z");
/// How far ahead of the engine's clock a call may end: clocks drift and exchanges
/// misconfigure their zone by hours, never by more than a day.
pub const FUTURE_SLACK: TimeDelta = TimeDelta::days(1);

/// Whether `call`'s times are ones a call can have, told at `now`: none before
/// [`EARLIEST_CALL`] or after `now` + [`FUTURE_SLACK`], and it ends after it starts.
pub fn check_times(call: &CallEvent<'_>, now: DateTime<Utc>) -> Result<(), DecodeError> {
    let times =
        [("started_at", Some(call.started_at)), ("answered_at", call.answered_at), ("ended_at", Some(call.ended_at))];
    for (field, time) in times {
        let Some(time) = time else { continue };
        if time < EARLIEST_CALL {
            return Err(DecodeError::Implausible { field, time, why: "before 2000" });
        }
        if time > now + FUTURE_SLACK {
            return Err(DecodeError::Implausible { field, time, why: "more than a day ahead of the engine's clock" });
        }
    }
    if call.ended_at < call.started_at {
        return Err(DecodeError::Implausible { field: "ended_at", time: call.ended_at, why: "before started_at" });
    }
    Ok(())
}

/// Parses the called number, which must be a subscriber's national number (R-L2); a
/// `+81` form from the exchange is normalised first. A number no subscriber can hold,
/// which an exchange's CDRs of its own calls out carry ([`dialled_out`]), is kept as it
/// is: the call is then for no subscriber, not a broken CDR.
fn called_number(raw: &str) -> Result<PhoneNumber, DecodeError> {
    let normal = PhoneNumber::from_caller(raw)
        .ok_or_else(|| DecodeError::invalid("called", format!("{raw:?} is not a phone number")))?;
    if dialled_out(normal.as_str()) {
        return Ok(normal);
    }
    PhoneNumber::parse(normal.as_str()).map_err(|e| DecodeError::invalid("called", e))
}

/// [`called_number`] where only a subscriber's national number will do: a fax is
/// received by a fax number, never sent to 117.
fn national_number(raw: &str) -> Result<PhoneNumber, DecodeError> {
    let normal = PhoneNumber::from_caller(raw)
        .ok_or_else(|| DecodeError::invalid("called", format!("{raw:?} is not a phone number")))?;
    PhoneNumber::parse(normal.as_str()).map_err(|e| DecodeError::invalid("called", e))
}

/// Whether a called number is one a subscriber dials, never one a subscriber has: a
/// special number of three digits starting with 1 (110, 117, 119, 171), or a number
/// abroad (`010…`, as `+1…` normalises; not `01081…`, Japan's own code, a national
/// number written oddly). Any other number that is not a national one stays a broken
/// CDR, dead-lettered where the operator sees it: nine digits without the trunk 0 (an
/// exchange stripping it), a PBX extension (`1001`: a dialplan that put it in the
/// called field of an incoming call).
fn dialled_out(normal: &str) -> bool {
    let special = normal.len() == 3 && normal.starts_with('1');
    special || (normal.starts_with("010") && !normal.starts_with("01081"))
}

// ---- Helpers shared by the three decoders ----------------------------------------------

/// Parses `payload` as one JSON object into a decoder's private struct.
///
/// The first byte is checked because serde's derived structs also accept a JSON array
/// (fields by position), and a CDR that is an array is garbage, not a call. Shape errors
/// that serde reports (a nested object that is a string, a duplicate key) count as
/// syntax: the message is not a document of this format at all.
fn parse_object<'a, T: serde::Deserialize<'a>>(format: &'static str, payload: &'a [u8]) -> Result<T, DecodeError> {
    let syntax = |detail: String| DecodeError::Syntax { format, detail };
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice(payload).map_err(|e| syntax(e.to_string())),
        Some(_) => Err(syntax("expected a JSON object".to_owned())),
        None => Err(syntax("empty message".to_owned())),
    }
}

/// A JSON value where a decoder expects a string (or a number written either way).
///
/// Decoders read every field they use as `Scalar` rather than as a typed value, so a
/// field of the wrong type becomes a [`DecodeError::Invalid`] naming the field instead of
/// an opaque serde error, and strings borrow from the message when they have no escape.
/// JSON `null` and an absent field are the same (`Absent`, the `Default`). Decoder
/// structs say `#[serde(default, bound(deserialize = "'de: 'a"))]` so that every field
/// may be absent and borrows from the message.
#[derive(Debug, Default, Clone, PartialEq)]
enum Scalar<'a> {
    #[default]
    Absent,
    Str(Cow<'a, str>),
    Int(i64),
    /// Any other number (fractional, or beyond `i64`).
    Float(f64),
    Bool(bool),
    /// An object or an array, skipped without buffering.
    Nested,
}

impl<'a> Scalar<'a> {
    /// The string, with `None` for absent/null and `Invalid` for any other type.
    fn text(&self, field: &'static str) -> Result<Option<&str>, DecodeError> {
        match self {
            Self::Absent => Ok(None),
            Self::Str(s) => Ok(Some(s)),
            other => Err(other.wrong_type(field, "a string")),
        }
    }

    /// A required string: absent or null is `Missing`.
    fn required(&self, field: &'static str) -> Result<&str, DecodeError> {
        self.text(field)?.ok_or(DecodeError::Missing { field })
    }

    /// Like [`Scalar::text`] but keeps the borrow, for values that end up in the event.
    fn into_text(self, field: &'static str) -> Result<Option<Cow<'a, str>>, DecodeError> {
        match self {
            Self::Absent => Ok(None),
            Self::Str(s) => Ok(Some(s)),
            other => Err(other.wrong_type(field, "a string")),
        }
    }

    /// Whole seconds since the Unix epoch, written as a number or a digit string (both
    /// occur in the wild); `None` for absent/null/empty.
    fn epoch_seconds(&self, field: &'static str) -> Result<Option<i64>, DecodeError> {
        let secs = match self {
            Self::Absent => return Ok(None),
            Self::Int(n) => *n,
            Self::Str(s) if s.trim().is_empty() => return Ok(None),
            Self::Str(s) => {
                s.trim().parse().map_err(|_| DecodeError::invalid(field, format!("{s:?} is not whole seconds")))?
            }
            other => return Err(other.wrong_type(field, "whole seconds")),
        };
        if secs < 0 {
            return Err(DecodeError::invalid(field, format!("{secs} is before 1970")));
        }
        Ok(Some(secs))
    }

    fn wrong_type(&self, field: &'static str, expected: &str) -> DecodeError {
        let found = match self {
            Self::Absent => "null",
            Self::Str(_) => "a string",
            Self::Int(_) | Self::Float(_) => "a number",
            Self::Bool(_) => "a boolean",
            Self::Nested => "an object or array",
        };
        DecodeError::invalid(field, format!("expected {expected}, found {found}"))
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> serde::de::Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map_or(Scalar::Float(v as f64), Scalar::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Absent)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Absent)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Scalar::Nested)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
        Ok(Scalar::Nested)
    }
}

/// Reads a flat JSON object whose keys and values are strings without escapes (or null
/// values), the shape exchanges write, calling `field` with each key and value in
/// order; `field` returns false to give up. Returns false, having maybe called `field`
/// for some keys, for any other document: serde parses those (and words their errors).
fn flat_object<'a>(payload: &'a [u8], mut field: impl FnMut(&'a str, Option<&'a str>) -> bool) -> bool {
    let Ok(text) = std::str::from_utf8(payload) else { return false };
    let mut at = skip_space(payload, 0);
    if payload.get(at) != Some(&b'{') {
        return false;
    }
    at = skip_space(payload, at + 1);
    if payload.get(at) == Some(&b'}') {
        return skip_space(payload, at + 1) == payload.len();
    }
    loop {
        let Some((key, next)) = plain_string(text, at) else { return false };
        at = skip_space(payload, next);
        if payload.get(at) != Some(&b':') {
            return false;
        }
        at = skip_space(payload, at + 1);
        let value = if payload[at..].starts_with(b"null") {
            at += 4;
            None
        } else {
            let Some((value, next)) = plain_string(text, at) else { return false };
            at = next;
            Some(value)
        };
        if !field(key, value) {
            return false;
        }
        at = skip_space(payload, at);
        match payload.get(at) {
            Some(b',') => at = skip_space(payload, at + 1),
            Some(b'}') => return skip_space(payload, at + 1) == payload.len(),
            _ => return false,
        }
    }
}

/// JSON's whitespace from `at` on; the index after it.
fn skip_space(payload: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = payload.get(at) {
        at += 1;
    }
    at
}

/// A string at byte `at` without escapes or control characters, and the index after it.
fn plain_string(text: &str, at: usize) -> Option<(&str, usize)> {
    let bytes = text.as_bytes();
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let len = bytes[at + 1..].iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    let end = at + 1 + len;
    // The quote is ASCII, so both ends are character boundaries.
    (bytes[end] == b'"').then(|| (&text[at + 1..end], end + 1))
}

/// Parses an RFC 3339 timestamp; the offset is required, because a time without one is
/// ambiguous and the mail shows Japan time (R-M2).
fn rfc3339(field: &'static str, raw: &str) -> Result<DateTime<Utc>, DecodeError> {
    let raw = raw.trim();
    if let Some(time) = plain_rfc3339(raw.as_bytes()) {
        return Ok(time);
    }
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| DecodeError::invalid(field, format!("{raw:?} is not an RFC 3339 time: {e}")))
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]` with `Z` or `±HH:MM`, the form exchanges write,
/// read without chrono's general parser (a sixth of its time); `None` for anything
/// else, which chrono then parses or refuses. The calendar is chrono's.
fn plain_rfc3339(raw: &[u8]) -> Option<DateTime<Utc>> {
    let digits = |from: usize, len: usize| -> Option<u32> {
        let part = raw.get(from..from + len)?;
        part.iter().try_fold(0u32, |n, &b| b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0')))
    };
    let punctuated = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if !punctuated.iter().all(|&(at, c)| raw.get(at) == Some(&c)) {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    let mut at = 19;
    let mut nanos = 0;
    if raw.get(at) == Some(&b'.') {
        let len = raw[at + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=9).contains(&len) {
            return None;
        }
        nanos = digits(at + 1, len)? * 10u32.pow(9 - len as u32);
        at += 1 + len;
    }
    let offset = match raw.get(at..)? {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (digits(at + 1, 2)?, digits(at + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let secs = i64::from(h * 3600 + m * 60);
            if *sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    // A second of 60 (a leap second) is left to chrono's parser.
    let local = NaiveDate::from_ymd_opt(year as i32, month, day)?.and_hms_nano_opt(hour, minute, second, nanos)?;
    local.and_utc().checked_sub_signed(TimeDelta::seconds(offset))
}

/// Converts whole seconds since the Unix epoch.
fn unix_time(field: &'static str, secs: i64) -> Result<DateTime<Utc>, DecodeError> {
    DateTime::from_timestamp(secs, 0).ok_or_else(|| DecodeError::invalid(field, format!("{secs} is out of range")))
}

/// Reports a called-number error under the format's own field name, so the dead-letter
/// message points at the field the exchange must fix.
fn called_number_in(field: &'static str, raw: &str) -> Result<PhoneNumber, DecodeError> {
    called_number(raw).map_err(|e| match e {
        DecodeError::Invalid { detail, .. } => DecodeError::Invalid { field, detail },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn chrono_rfc3339(raw: &str) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(raw).ok().map(|t| t.with_timezone(&Utc))
    }

    fn call_ending(start: &str, end: &str) -> CallEvent<'static> {
        CallEvent {
            call_id: Cow::Borrowed("c-1"),
            called: PhoneNumber::parse("0312345678").unwrap(),
            caller: Caller::Withheld,
            started_at: start.parse().unwrap(),
            answered_at: None,
            ended_at: end.parse().unwrap(),
            outcome: Outcome::NoAnswer,
        }
    }

    /// A queued mail is told a fax's by its call id's `fax:` (its address checked against
    /// the fax settings): a CDR whose call id starts so had its mails withdrawn when they
    /// waited for a retry. Such a CDR is refused, naming the field.
    #[test]
    fn r_m4_a_call_id_naming_a_fax_is_refused() {
        let cdr = |id: &str| {
            format!(
                r#"{{"call_id":"{id}","called":"0312345678","caller":null,"presentation":"withheld","started_at":"2026-11-24T10:00:00+09:00","ended_at":"2026-11-24T10:00:31+09:00","outcome":"no_answer"}}"#
            )
        };
        assert!(decode(CdrFormat::Canonical, cdr("c-1").as_bytes()).is_ok());
        let refused = decode(CdrFormat::Canonical, cdr("fax:job-1").as_bytes()).map(|_| ()).unwrap_err();
        assert!(matches!(refused, DecodeError::Invalid { field: "call_id", .. }), "{refused}");
    }

    /// An exchange's CDRs of its subscribers' own calls out (to 117, to a number abroad)
    /// are for no subscriber: they decode, to be passed over as not subscribed, not
    /// dead-lettered. They were, and fired the dead-letter alert that means "a changed
    /// exchange format". A national number that lost its trunk 0 still is.
    #[test]
    fn r_m4_calls_out_to_special_and_foreign_numbers_are_for_no_subscriber_not_broken() {
        let cdr = |called: &str| {
            format!(
                r#"{{"call_id":"c-1","called":"{called}","caller":"0312345678","presentation":"allowed","started_at":"2026-11-24T10:00:00+09:00","ended_at":"2026-11-24T10:00:31+09:00","outcome":"answered"}}"#
            )
        };
        for (called, normal) in [("117", "117"), ("110", "110"), ("+14155550100", "01014155550100")] {
            let payload = cdr(called);
            let call = decode(CdrFormat::Canonical, payload.as_bytes()).unwrap_or_else(|e| panic!("{called}: {e}"));
            assert_eq!(call.called.as_str(), normal);
        }
        for broken in ["312345678", "3123456789", "1001", "12345", "01081312345678", "s"] {
            let refused = decode(CdrFormat::Canonical, cdr(broken).as_bytes()).map(|_| ()).unwrap_err();
            assert!(matches!(refused, DecodeError::Invalid { field: "called", .. }), "{broken}: {refused}");
        }
    }

    /// Times an unset or broken exchange clock writes are not calls: dated 1900 or 1970,
    /// far ahead of the engine's clock, or ending before they start. They go to the
    /// dead letters with the field named, instead of being mailed.
    #[test]
    fn call_times_outside_the_plausible_window_are_refused_naming_the_field() {
        let now: DateTime<Utc> = "2026-12-03T08:00:00Z".parse().unwrap();
        assert_eq!(check_times(&call_ending("2026-12-03T07:59:00Z", "2026-12-03T07:59:31Z"), now), Ok(()));
        // A clock an hour (or a time zone) ahead is still a call.
        assert_eq!(check_times(&call_ending("2026-12-03T16:59:00Z", "2026-12-03T17:00:00Z"), now), Ok(()));
        for (start, end, field, why) in [
            ("1900-01-01T00:00:00Z", "1900-01-01T00:00:31Z", "started_at", "before 2000"),
            ("1970-01-01T00:00:00Z", "2026-12-03T07:59:31Z", "started_at", "before 2000"),
            ("2026-12-03T07:59:00Z", "9999-12-31T23:59:59Z", "ended_at", "more than a day ahead of the engine's clock"),
            ("2026-12-03T07:59:00Z", "2026-12-03T07:58:00Z", "ended_at", "before started_at"),
        ] {
            let err = check_times(&call_ending(start, end), now).unwrap_err();
            assert!(
                matches!(err, DecodeError::Implausible { field: f, why: w, .. } if f == field && w == why),
                "{err}"
            );
            assert_eq!(err.reason(), Rejection::ImplausibleTime);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Whatever the fast RFC 3339 reader reads, chrono reads the same: the mail's
        /// Japan time (R-M2) comes out the same either way.
        #[test]
        fn plain_rfc3339_agrees_with_chrono(
            (year, month, day) in (1900u32..2500, 0u32..14, 0u32..33),
            (hour, minute, second) in (0u32..26, 0u32..62, 0u32..62),
            fraction in prop::option::of("[0-9]{0,11}"),
            separator in prop::sample::select(vec!["T", "t", " "]),
            offset in prop_oneof![Just("Z".to_owned()), Just("z".to_owned()), "[+-][0-2][0-9]:[0-6][0-9]", Just("+0900".to_owned())],
        ) {
            let fraction = fraction.map(|f| format!(".{f}")).unwrap_or_default();
            let raw = format!("{year:04}-{month:02}-{day:02}{separator}{hour:02}:{minute:02}:{second:02}{fraction}{offset}");
            if let Some(fast) = plain_rfc3339(raw.as_bytes()) {
                prop_assert_eq!(Some(fast), chrono_rfc3339(&raw), "{}", raw);
            }
        }
    }

    #[test]
    fn exchange_timestamps_take_the_fast_path_and_read_as_chrono_reads_them() {
        for raw in [
            "2026-11-24T10:00:31+09:00",
            "2026-11-24T01:00:31Z",
            "2024-02-29T23:59:59.123456789-05:30",
            "1970-01-01T00:00:00.5+00:00",
            "2099-12-31T23:59:59-00:00",
        ] {
            let fast = plain_rfc3339(raw.as_bytes()).unwrap_or_else(|| panic!("{raw} declined"));
            assert_eq!(Some(fast), chrono_rfc3339(raw), "{raw}");
        }
        for declined in ["2026-02-29T10:00:00Z", "2026-11-24T10:00:60Z", "2026-11-24 10:00:00Z", "2026-11-24T10:00:00"]
        {
            assert_eq!(plain_rfc3339(declined.as_bytes()), None, "{declined}");
        }
    }
}
