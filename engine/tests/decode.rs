//! Decoding real-looking CDRs of every format (`tests/fixtures/cdr/<format>/`).
//!
//! Each good fixture has one expected [`CallEvent`], compared field by field, so a change
//! in any mapping (caller, outcome, time zone) shows up here. Each `bad/` fixture names
//! the expected error in its file name, `<reason>-<field or note>[--<note>].json`, so
//! adding a case needs no code. The property tests feed garbage and mutated fixtures to
//! every decoder: a message from Kafka must never crash the engine.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use engine::decode::{decode, CallEvent, Caller, CdrFormat, DecodeError, Outcome};
use engine::phone::PhoneNumber;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

const FORMATS: [CdrFormat; 3] = [CdrFormat::Canonical, CdrFormat::Asterisk, CdrFormat::Freeswitch];

/// One good fixture and the event it must decode to. Times are UTC on 2026-11-24.
struct Case {
    format: CdrFormat,
    file: &'static str,
    call_id: &'static str,
    called: &'static str,
    caller: Caller,
    started: &'static str,
    answered: Option<&'static str>,
    ended: &'static str,
    outcome: Outcome,
}

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    use CdrFormat::{Asterisk as A, Canonical as C, Freeswitch as F};
    use Outcome::*;
    let (taro, yoko) = (num("09011112222"), num("0451234567"));
    let c = |format, file, call_id, called, caller, started, answered, ended, outcome| Case {
        format, file, call_id, called, caller, started, answered, ended, outcome,
    };
    vec![
        c(C, "answered.json", "c-20261124-0001", "0312345678", taro, "01:00:00", Some("01:00:07"), "01:03:12", Answered),
        c(C, "no_answer.json", "c-1", "0312345678", taro, "01:00:00", None, "01:00:31", NoAnswer),
        c(C, "busy.json", "c-20261124-0003", "09087654321", yoko, "14:59:58", None, "15:00:01", Busy),
        c(C, "withheld.json", "c-20261124-0004", "0312345678", Caller::Withheld, "01:05:00", None, "01:05:20", Cancelled),
        c(C, "plus81_caller.json", "c-20261124-0005", "0312345678", taro, "01:10:00", None, "01:10:45.5", Forwarded),
        c(C, "international_caller.json", "c-20261124-0006", "0312345678", intl("01014155550100"), "01:20:00", None, "01:20:30", Rejected),
        c(C, "unavailable.json", "c-20261124-0007", "0312345678", Caller::Unavailable, "01:30:00", None, "01:30:15", NoAnswer),
        c(C, "payphone.json", "c-20261124-0008", "0312345678", Caller::Payphone, "01:40:00", Some("01:40:04"), "01:41:00", Answered),
        c(C, "allowed_without_number.json", "c-20261124-0009", "0312345678", Caller::Unavailable, "01:50:00", None, "01:50:09", Failed),
        c(A, "answered.json", "1795482000.18", "0312345678", taro, "01:00:00", Some("01:00:07"), "01:03:12", Answered),
        c(A, "no_answer.json", "1795482300.20", "0312345678", taro, "01:05:00", None, "01:05:31", NoAnswer),
        c(A, "busy.json", "1795535998.33", "09087654321", yoko, "14:59:58", None, "15:00:01", Busy),
        c(A, "withheld.json", "1795482600.41", "0312345678", Caller::Withheld, "01:10:00", None, "01:10:12", NoAnswer),
        c(A, "withheld_empty_src.json", "1795482900.44", "0312345678", Caller::Withheld, "01:15:00", None, "01:15:04", Failed),
        c(A, "plus81_caller.json", "1795483200.74", "0312345678", taro, "01:20:00", None, "01:20:25.25", NoAnswer),
        c(A, "congestion_linkedid_only.json", "1795483500.80", "0312345678", num("0662223333"), "01:25:00.123456", None, "01:25:01.654321", Failed),
        c(A, "clid_only.json", "1795483800.91", "0312345678", num("0798123456"), "01:30:00", None, "01:30:15", NoAnswer),
        c(F, "answered.json", "a1b2c3d4-0001-4e5f-8a9b-0c1d2e3f4a51", "0312345678", taro, "01:00:00", Some("01:00:07"), "01:03:12", Answered),
        c(F, "no_answer.json", "a1b2c3d4-0002-4e5f-8a9b-0c1d2e3f4a52", "0312345678", yoko, "01:05:00", None, "01:05:31", NoAnswer),
        c(F, "cancelled.json", "a1b2c3d4-0003-4e5f-8a9b-0c1d2e3f4a53", "0312345678", taro, "01:10:00", None, "01:10:12", Cancelled),
        c(F, "busy.json", "a1b2c3d4-0004-4e5f-8a9b-0c1d2e3f4a54", "09087654321", yoko, "14:59:58", None, "15:00:01", Busy),
        c(F, "withheld.json", "a1b2c3d4-0005-4e5f-8a9b-0c1d2e3f4a55", "0312345678", Caller::Withheld, "01:15:00", None, "01:15:12", Cancelled),
        c(F, "withheld_privacy.json", "a1b2c3d4-0006-4e5f-8a9b-0c1d2e3f4a56", "0312345678", Caller::Withheld, "01:20:00", Some("01:20:05"), "01:21:00", Answered),
        c(F, "plus81_caller.json", "a1b2c3d4-0007-4e5f-8a9b-0c1d2e3f4a57", "0312345678", taro, "01:25:00", None, "01:25:30", NoAnswer),
        // A call transferred by the dialplan (`transfer 1000 XML default`): the newest
        // caller profile names the extension, the oldest the number that was called.
        c(F, "transferred.json", "a1b2c3d4-0010-4e5f-8a9b-0c1d2e3f4a60", "0312345678", taro, "01:00:00", Some("01:00:07"), "01:03:12", Answered),
        // A carrier's `Privacy: id` with the number in P-Asserted-Identity: FreeSWITCH
        // records the number, and only `sip_Privacy` says it is withheld (R-N7).
        c(F, "withheld_sip_privacy.json", "a1b2c3d4-0011-4e5f-8a9b-0c1d2e3f4a61", "0312345678", Caller::Withheld, "01:20:00", Some("01:20:05"), "01:21:00", Answered),
    ]
}

fn num(s: &str) -> Caller {
    Caller::Number(PhoneNumber::parse(s).unwrap())
}

/// A caller abroad: not a subscriber number, so only `from_caller` builds it.
fn intl(s: &str) -> Caller {
    Caller::Number(PhoneNumber::from_caller(s).unwrap())
}

fn at(time: &str) -> DateTime<Utc> {
    format!("2026-11-24T{time}Z").parse().unwrap()
}

fn dir(format: CdrFormat) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cdr").join(format.as_str())
}

/// The `.json` file names in `dir`, sorted.
fn json_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".json"))
        .collect();
    names.sort();
    names
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Decodes the case's fixture and compares the whole event with the expected one.
fn check(case: &Case) -> CallEvent<'static> {
    let bytes = read(&dir(case.format).join(case.file));
    let got = decode(case.format, &bytes)
        .unwrap_or_else(|e| panic!("{}/{}: {e}", case.format.as_str(), case.file))
        .into_owned();
    let want = CallEvent {
        call_id: Cow::Borrowed(case.call_id),
        called: PhoneNumber::parse(case.called).unwrap(),
        caller: case.caller,
        started_at: at(case.started),
        answered_at: case.answered.map(at),
        ended_at: at(case.ended),
        outcome: case.outcome,
    };
    assert_eq!(got, want, "{}/{}", case.format.as_str(), case.file);
    got
}

/// Checks every case whose file name matches, and that there is at least one.
fn check_matching(pattern: impl Fn(&str) -> bool) -> Vec<CallEvent<'static>> {
    let events: Vec<_> = cases().iter().filter(|c| pattern(c.file)).map(check).collect();
    assert!(!events.is_empty(), "no fixture matched");
    events
}

#[test]
fn every_good_fixture_decodes_to_its_expected_event() {
    let cases = cases();
    for format in FORMATS {
        let on_disk: BTreeSet<String> = json_files(&dir(format)).into_iter().collect();
        let expected: BTreeSet<String> =
            cases.iter().filter(|c| c.format == format).map(|c| c.file.to_owned()).collect();
        assert_eq!(on_disk, expected, "{}: fixtures without a case, or cases without a fixture", format.as_str());
    }
    cases.iter().for_each(|case| drop(check(case)));
}

#[test]
fn r_n4_answered_calls_are_not_missed() {
    for event in check_matching(|f| f == "answered.json") {
        assert!(!event.is_missed() && event.answered_at.is_some(), "{event:?}");
    }
}

#[test]
fn r_n4_unanswered_busy_and_cancelled_calls_are_missed() {
    let missed = ["no_answer.json", "busy.json", "cancelled.json", "congestion_linkedid_only.json"];
    for event in check_matching(|f| missed.contains(&f)) {
        assert!(event.is_missed() && event.answered_at.is_none(), "{event:?}");
    }
}

#[test]
fn r_n7_withheld_caller_decodes_as_withheld() {
    // Includes a canonical CDR and a FreeSWITCH CDR (privacy_hide_number) that carry the
    // real number: it must not leak.
    for event in check_matching(|f| f.starts_with("withheld")) {
        assert_eq!(event.caller, Caller::Withheld);
    }
}

#[test]
fn r_n7_unavailable_and_payphone_callers_are_shown_as_such() {
    check_matching(|f| ["unavailable.json", "payphone.json", "allowed_without_number.json"].contains(&f));
}

#[test]
fn r_l2_plus81_and_formatted_numbers_are_normalised() {
    for event in check_matching(|f| f.starts_with("plus81") || f.starts_with("international") || f == "clid_only.json")
    {
        assert!(matches!(event.caller, Caller::Number(n) if n.as_str().starts_with('0')));
        assert!(PhoneNumber::parse(event.called.as_str()).is_ok());
    }
}

#[test]
fn bad_fixtures_fail_with_the_reason_in_their_name() {
    for format in FORMATS {
        let bad = dir(format).join("bad");
        let mut reasons = BTreeSet::new();
        for file in json_files(&bad) {
            let stem = file.trim_end_matches(".json");
            let (reason, rest) = stem.split_once('-').expect("<reason>-<field or note>.json");
            reasons.insert(reason.to_owned());
            let err = decode(format, &read(&bad.join(&file))).expect_err(&file);
            assert_eq!(err.reason().as_str(), reason, "{}/bad/{file}: {err}", format.as_str());
            let field = rest.split("--").next().unwrap();
            match &err {
                DecodeError::Missing { field: got }
                | DecodeError::Invalid { field: got, .. }
                | DecodeError::Implausible { field: got, .. } => {
                    assert_eq!(*got, field, "{}/bad/{file}: {err}", format.as_str())
                }
                DecodeError::Syntax { format: got, .. } => assert_eq!(*got, format.as_str()),
                DecodeError::UnreadableSubscriber(_) => panic!("decode reads no store: {file}"),
            }
        }
        let all = ["invalid_field", "missing_field", "syntax"].map(String::from);
        assert_eq!(reasons, BTreeSet::from(all), "{}", bad.display());
    }
}

/// Every fixture, good and bad, of every format: the seeds for mutation.
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dirs = FORMATS.iter().flat_map(|&f| [dir(f), dir(f).join("bad")]);
        dirs.flat_map(|d| json_files(&d).into_iter().map(move |name| read(&d.join(name)))).collect()
    })
}

/// What must hold for any input, in any format: no panic, and a decoded event is usable.
fn decode_anything(bytes: &[u8]) {
    for format in FORMATS {
        match decode(format, bytes) {
            Ok(event) => {
                // A subscriber's number, or one only dialled: 1XY, abroad.
                let called = event.called.as_str();
                let dialled = (called.len() == 3 && called.starts_with('1'))
                    || (called.starts_with("010") && !called.starts_with("01081"));
                assert!(PhoneNumber::parse(called).is_ok() || dialled, "{event:?}");
                assert!(!event.call_id.trim().is_empty(), "{event:?}");
            }
            Err(e) => assert!(["syntax", "missing_field", "invalid_field"].contains(&e.reason().as_str())),
        }
    }
}

/// JSON pointers to every member of every object in `value`.
fn member_pointers(value: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => map.iter().for_each(|(key, v)| {
            let here = format!("{at}/{}", key.replace('~', "~0").replace('/', "~1"));
            out.push(here.clone());
            member_pointers(v, here, out);
        }),
        Value::Array(items) => items.iter().enumerate().for_each(|(i, v)| member_pointers(v, format!("{at}/{i}"), out)),
        _ => {}
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        "[0-9+ -]{0,20}".prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_anything(&bytes);
    }

    #[test]
    fn truncated_and_flipped_fixtures_never_panic(
        seed in any::<Index>(),
        cut in any::<Index>(),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 0..6),
    ) {
        let mut bytes = seed.get(seeds()).clone();
        decode_anything(&bytes[..cut.index(bytes.len() + 1)]);
        for (pos, byte) in flips {
            if !bytes.is_empty() {
                let i = pos.index(bytes.len());
                bytes[i] = byte;
            }
        }
        decode_anything(&bytes);
    }

    #[test]
    fn fields_of_any_type_or_missing_never_panic(
        seed in any::<Index>(),
        member in any::<Index>(),
        replacement in prop::option::of(any_json()),
    ) {
        let Ok(mut doc) = serde_json::from_slice::<Value>(seed.get(seeds()).as_slice()) else { return Ok(()) };
        let mut pointers = Vec::new();
        member_pointers(&doc, String::new(), &mut pointers);
        prop_assume!(!pointers.is_empty());
        let pointer = member.get(&pointers);
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        match (replacement, doc.pointer_mut(parent)) {
            (Some(v), _) => *doc.pointer_mut(pointer).unwrap() = v,
            (None, Some(Value::Object(map))) => drop(map.remove(&key.replace("~1", "/").replace("~0", "~"))),
            (None, Some(Value::Array(items))) => drop(items.remove(key.parse::<usize>().unwrap())),
            (None, _) => unreachable!("a member's parent is a container"),
        }
        decode_anything(&serde_json::to_vec(&doc).unwrap());
    }
}
