//! Checks shared by the fuzz targets in `fuzz_targets/`.
//!
//! # Layout
//! - [`decode_and_check`]: one CDR through `engine::decode::decode`, then the invariants
//!   every decoder promises on its result (used by the three `decode_*` targets).
//! - [`is_caller_form`]: what `PhoneNumber::from_caller` may return.
//! - [`decode_fax_and_check`], [`check_document`]: a fax record (R-F1) and its document
//!   through everything the engine and the site do with them (`decode_fax`,
//!   `fax_document`).

use engine::decode::{decode, Caller, CdrFormat, Outcome};
use engine::phone::PhoneNumber;

/// Decodes `data` as `format` and panics if the result breaks what the decode stage
/// promises to later stages. Only properties the code guarantees are checked: the
/// decoders do not, for instance, require `ended_at` to follow `started_at`.
pub fn decode_and_check(format: CdrFormat, data: &[u8]) {
    let result = decode(format, data);
    // The decoders are pure: the same bytes always give the same answer.
    assert_eq!(result, decode(format, data), "decode is not deterministic");

    let event = match result {
        Ok(event) => event,
        Err(err) => {
            // The reason feeds a metric label, the message the dead-letter topic.
            assert!(["syntax", "missing_field", "invalid_field"].contains(&err.reason().as_str()));
            assert!(!err.to_string().is_empty());
            return;
        }
    };

    // 着信番号: resolve looks the called number up as a subscriber's R-L2 number, or it
    // is one only dialled (1XY, abroad), which no subscriber holds.
    let called = event.called.as_str();
    let dialled =
        (called.len() == 3 && called.starts_with('1')) || (called.starts_with("010") && !called.starts_with("01081"));
    assert!(
        PhoneNumber::parse(called) == Ok(event.called) || dialled,
        "called number {:?} is neither in R-L2 form nor one only dialled",
        event.called
    );
    // The call id keys dedup and the Message-ID; every decoder refuses a blank one.
    assert!(!event.call_id.trim().is_empty(), "blank call id {:?}", event.call_id);
    // A shown caller number went through `PhoneNumber::from_caller`.
    if let Caller::Number(n) = event.caller {
        assert!(is_caller_form(n.as_str()), "caller number {n:?} is not a normalised number");
    }
    // R-N4: missed means anything but answered.
    assert_eq!(event.is_missed(), event.outcome != Outcome::Answered);
    // FreeSWITCH has no disposition field: the outcome is derived from answer_epoch.
    if format == CdrFormat::Freeswitch {
        assert_eq!(event.answered_at.is_some(), event.outcome == Outcome::Answered, "{event:?}");
    }
    // Events that outlive the Kafka message are copies of the borrowed ones.
    let text = format!("{event:?}");
    assert_eq!(event.clone().into_owned(), event, "into_owned changed {text}");
}

/// A number as `PhoneNumber::from_caller` normalises it: 3..=18 half-width digits starting
/// with 0 (national, or 010 + a number abroad, never 00) or 1 (short numbers such as 110).
pub fn is_caller_form(s: &str) -> bool {
    (3..=18).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_digit())
        && matches!(s.as_bytes()[0], b'0' | b'1')
        && !s.starts_with("00")
}

/// Decodes `data` as a fax record (R-F1) and panics if the result breaks what the decode
/// stage promises: a fax it accepts has a called number in R-L2 form, a usable id, at
/// least one page, and a document the site can show and turn into a PDF.
pub fn decode_fax_and_check(data: &[u8]) {
    let result = engine::decode::decode_fax(data);
    assert_eq!(result, engine::decode::decode_fax(data), "decode_fax is not deterministic");
    let fax = match result {
        Ok(fax) => fax,
        Err(err) => {
            assert!(["syntax", "missing_field", "invalid_field"].contains(&err.reason().as_str()));
            return;
        }
    };
    assert_eq!(PhoneNumber::parse(fax.called.as_str()), Ok(fax.called));
    assert!(!fax.fax_id.is_empty() && fax.fax_id.len() <= engine::decode::MAX_FAX_ID);
    assert!(fax.pages >= 1);
    check_document(&fax.document);
}

/// The largest PDF the site makes of a fax (its download's bound).
const PDF_AT_MOST: usize = 64 << 20;

/// Runs a fax document through everything the site does with it: never a panic, and a
/// document that inspects fine always yields a PDF, or is too large for one.
pub fn check_document(data: &[u8]) {
    use engine::fax::document::{inspect, page_png, to_pdf, DocumentError};
    let Ok(inspected) = inspect(data) else {
        let _ = page_png(data, 0);
        let _ = to_pdf(data, PDF_AT_MOST);
        return;
    };
    assert!(inspected.pages >= 1);
    // The first and the last page: enough for the fuzzer, bounded for its speed.
    for page in [0, inspected.pages - 1] {
        if let Ok(png) = page_png(data, page) {
            assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "page {page} is not a PNG");
        }
    }
    assert!(page_png(data, inspected.pages).is_err(), "a page past the last one");
    match to_pdf(data, PDF_AT_MOST) {
        Ok(pdf) => assert!(pdf.starts_with(b"%PDF-")),
        Err(DocumentError::TooLarge { .. }) => {}
        Err(e) => panic!("an inspected document makes a PDF: {e}"),
    }
}
