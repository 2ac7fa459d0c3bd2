//! Fax records (docs/fax.md) as a fax server writes them: the document in base64 beside
//! the fax number called, the sender and the page count.

use base64::Engine as _;
use chrono::{DateTime, Utc};

/// A fax record of `document` (`pages` pages) to `called`, from 0612345678 (shown),
/// received at `received_at`.
pub fn record_at(fax_id: &str, called: &str, document: &[u8], pages: u32, received_at: DateTime<Utc>) -> String {
    serde_json::json!({
        "fax_id": fax_id,
        "called": called,
        "caller": "0612345678",
        "presentation": "allowed",
        "received_at": received_at.to_rfc3339(),
        "pages": pages,
        "document_base64": base64::engine::general_purpose::STANDARD.encode(document),
    })
    .to_string()
}

/// [`record_at`] of a fax received now.
pub fn record(fax_id: &str, called: &str, document: &[u8], pages: u32) -> String {
    record_at(fax_id, called, document, pages, Utc::now())
}
