//! Fax records (R-F1): one received fax per message, callnotify's own JSON, in the style
//! of the canonical CDR.
//!
//! ```json
//! {"fax_id":"hylafax-000123","called":"0312345678","caller":"0612345678",
//!  "presentation":"allowed","received_at":"2026-12-04T10:00:00+09:00","pages":2,
//!  "content_type":"image/tiff","document_base64":"SUkqAAgAAAA…"}
//! ```
//!
//! The document is TIFF Class F (T.4 or T.6, as fax servers and T.38 gateways write it)
//! or PDF; `content_type` may be left out (the document's first bytes tell), and when
//! given must agree with them. `pages` must match the document: a fax server that
//! counted differently sent something else than it meant. The document is checked here,
//! every page of a TIFF decoded, so a record the site could not show goes to the dead
//! letters at once instead of to a subscriber. Unknown fields are ignored.

use std::borrow::Cow;

use base64::Engine as _;
use chrono::{DateTime, Utc};

use super::canonical::{caller, lookup, PRESENTATIONS};
use super::{national_number, parse_object, rfc3339, Caller, DecodeError, Scalar};
use crate::fax::document::{self, DocumentKind};
use crate::phone::PhoneNumber;

/// The longest `fax_id`: it is part of the site's address of the fax and of the mail's
/// dedup key.
pub const MAX_FAX_ID: usize = 64;

/// One received fax, as every later stage sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaxEvent<'a> {
    /// The fax server's id for the fax; with `called` it identifies the notification, so
    /// a record read again is recognised (dedup) and the fax is kept once.
    pub fax_id: Cow<'a, str>,
    /// The subscriber's fax number that was called.
    pub called: PhoneNumber,
    /// Who sent it, or why the number is not shown (R-N7).
    pub caller: Caller,
    pub received_at: DateTime<Utc>,
    pub pages: u32,
    pub kind: DocumentKind,
    /// The document as the fax server wrote it.
    pub document: Vec<u8>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default, bound(deserialize = "'de: 'a"))]
struct Doc<'a> {
    fax_id: Scalar<'a>,
    called: Scalar<'a>,
    caller: Scalar<'a>,
    presentation: Scalar<'a>,
    received_at: Scalar<'a>,
    pages: Scalar<'a>,
    content_type: Scalar<'a>,
    document_base64: Scalar<'a>,
}

/// Decodes one fax record, its document checked ([`document::inspect`]).
pub fn decode_fax(payload: &[u8]) -> Result<FaxEvent<'_>, DecodeError> {
    let doc: Doc<'_> = parse_object("fax", payload)?;
    let fax_id = doc.fax_id.into_text("fax_id")?.ok_or(DecodeError::Missing { field: "fax_id" })?;
    check_fax_id(&fax_id)?;
    let called = national_number(doc.called.required("called")?)?;
    let presentation = lookup(PRESENTATIONS, "presentation", doc.presentation.required("presentation")?)?;
    let caller = caller(presentation, doc.caller.text("caller")?);
    let received_at = rfc3339("received_at", doc.received_at.required("received_at")?)?;
    let pages = match doc.pages {
        Scalar::Int(n) if n >= 1 => u32::try_from(n).map_err(|_| DecodeError::invalid("pages", "too many"))?,
        Scalar::Int(n) => return Err(DecodeError::invalid("pages", format!("{n}: a fax has at least one page"))),
        Scalar::Absent => return Err(DecodeError::Missing { field: "pages" }),
        other => return Err(other.wrong_type("pages", "a whole number")),
    };
    let encoded = doc.document_base64.required("document_base64")?;
    if encoded.len() > crate::fax::DOCUMENT_BASE64_AT_MOST {
        return Err(DecodeError::invalid(
            "document_base64",
            format!(
                "{} bytes: larger than the {} a fax record may carry (docs/fax.md)",
                encoded.len(),
                crate::fax::DOCUMENT_BASE64_AT_MOST
            ),
        ));
    }
    let document = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| DecodeError::invalid("document_base64", format!("not base64: {e}")))?;
    let kind = DocumentKind::sniff(&document)
        .ok_or_else(|| DecodeError::invalid("document_base64", "neither a TIFF nor a PDF document"))?;
    // Its media type (RFC 3302's `image/tiff; application=faxbw` is a fax TIFF); an empty
    // value is none given.
    if let Some(declared) = doc.content_type.text("content_type")?.filter(|d| !d.trim().is_empty()) {
        let media_type = declared.split(';').next().unwrap_or_default().trim();
        if !media_type.eq_ignore_ascii_case(kind.content_type()) {
            return Err(DecodeError::invalid(
                "content_type",
                format!("{declared:?}, but the document is {}", kind.content_type()),
            ));
        }
    }
    let inspected = document::inspect(&document).map_err(|e| DecodeError::invalid("document_base64", e))?;
    if inspected.pages != pages {
        return Err(DecodeError::invalid(
            "pages",
            format!("{pages}, but the document has {} page(s)", inspected.pages),
        ));
    }
    Ok(FaxEvent { fax_id, called, caller, received_at, pages, kind, document })
}

/// `fax_id`: 1 to [`MAX_FAX_ID`] of `A-Z a-z 0-9 . _ - : @`, as fax servers name jobs,
/// not `.` or `..`: the last segment of the fax's link, which a browser would resolve
/// away, so the link would never lead to the fax.
fn check_fax_id(id: &str) -> Result<(), DecodeError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@');
    if id.is_empty() || id.len() > MAX_FAX_ID || !id.chars().all(allowed) {
        return Err(DecodeError::invalid("fax_id", format!("{id:?}: 1 to {MAX_FAX_ID} of A-Z a-z 0-9 . _ - : @")));
    }
    if id == "." || id == ".." {
        return Err(DecodeError::invalid("fax_id", format!("{id:?}: not a name a link can end in")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// R-F1: the fax's link (`…/fax/{number}/{ms}/{fax_id}`) must lead to it: a browser
    /// resolves a last segment of `.` or `..` away, and the fax could be neither viewed
    /// nor deleted. Such a record is refused (a dead letter) instead of kept unreachable.
    #[test]
    fn r_f1_a_fax_id_a_link_cannot_end_in_is_refused_and_others_pass() {
        for id in [".", ".."] {
            let error = check_fax_id(id).unwrap_err().to_string();
            assert!(error.contains("fax_id"), "{id}: {error}");
        }
        for id in ["...", ".job", "hylafax-000123", "q1.2@host:5"] {
            assert!(check_fax_id(id).is_ok(), "{id}");
        }
    }

    /// R-F1: a fax server bridging Internet fax (T.37) declares a fax TIFF as RFC 3302
    /// registers it, `image/tiff; application=faxbw`; it was refused whole and the fax
    /// never kept or mailed (a dead letter, refused again at a replay). Parameters after
    /// `;` are not the media type; an empty value is none given; another type still fails.
    #[test]
    fn r_f1_a_content_type_with_parameters_or_empty_is_read_by_its_media_type() {
        use base64::Engine as _;
        let g4 = include_bytes!("../../tests/fixtures/fax/fine-g4.tif");
        let record = |content_type: &str| {
            serde_json::json!({
                "fax_id": "t37", "called": "0312345600", "caller": "0612345678", "presentation": "allowed",
                "received_at": "2026-11-24T10:00:00+09:00", "pages": 3, "content_type": content_type,
                "document_base64": base64::engine::general_purpose::STANDARD.encode(g4),
            })
            .to_string()
        };
        for declared in ["image/tiff; application=faxbw", "Image/TIFF;application=faxbw", "", " image/tiff "] {
            assert!(decode_fax(record(declared).as_bytes()).is_ok(), "{declared:?}");
        }
        for declared in ["application/pdf", "image/tiff-fx", "; application=faxbw"] {
            let error = decode_fax(record(declared).as_bytes()).map(|_| ()).unwrap_err().to_string();
            assert!(error.contains("content_type") && error.contains("image/tiff"), "{declared:?}: {error}");
        }
    }

    /// R-F1, R-M4: a fax record larger than docs/fax.md allows (a topic set up to take
    /// more) decoded, and then its write to the state topics was refused at every try:
    /// its mails never went, its partition's commits waited for good, and no dead
    /// letter said why. It is now refused as it is decoded; one within the bound passes.
    #[test]
    fn r_m4_a_fax_document_larger_than_a_fax_record_may_carry_is_refused() {
        use base64::Engine as _;
        let g4 = include_bytes!("../../tests/fixtures/fax/fine-g4.tif");
        let record = |document: &[u8]| {
            serde_json::json!({
                "fax_id": "big", "called": "0312345600", "caller": "0612345678", "presentation": "allowed",
                "received_at": "2026-11-24T10:00:00+09:00", "pages": 3,
                "document_base64": base64::engine::general_purpose::STANDARD.encode(document),
            })
            .to_string()
        };
        assert!(decode_fax(record(g4).as_bytes()).is_ok());
        let mut padded = g4.to_vec();
        padded.resize(crate::fax::DOCUMENT_BASE64_AT_MOST / 4 * 3 + 3, 0);
        let error = decode_fax(record(&padded).as_bytes()).map(|_| ()).unwrap_err();
        assert!(error.to_string().contains("document_base64"), "{error}");
    }
}
