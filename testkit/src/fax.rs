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

/// A little-endian TIFF of `pages` uncompressed pages of `width` (a multiple of 8) by
/// `height` pixels, all one checkerboard of single pixels and sharing one strip: a file
/// of one page's bytes whose pages, re-encoded as T.6 for a PDF, take about 3 bits a
/// pixel each (the densest a fax coding gets).
pub fn checkered_tiff(pages: u32, width: u32, height: u32) -> Vec<u8> {
    let row = (width / 8) as usize;
    let entries: [(u16, u32); 8] = [
        (256, width),
        (257, height),
        (258, 1),
        (259, 1),
        (262, 0),
        (273, 0),
        (278, height),
        (279, row as u32 * height),
    ];
    let ifd_len = 2 + 12 * entries.len() as u32 + 4;
    let data_at = 8 + ifd_len * pages;
    let mut tiff = b"II*\0".to_vec();
    tiff.extend(8u32.to_le_bytes());
    for page in 0..pages {
        tiff.extend((entries.len() as u16).to_le_bytes());
        for (tag, value) in entries {
            tiff.extend(tag.to_le_bytes());
            tiff.extend(4u16.to_le_bytes()); // LONG
            tiff.extend(1u32.to_le_bytes());
            tiff.extend(if tag == 273 { data_at } else { value }.to_le_bytes());
        }
        let next = if page + 1 < pages { 8 + ifd_len * (page + 1) } else { 0 };
        tiff.extend(next.to_le_bytes());
    }
    for y in 0..height as usize {
        tiff.extend(std::iter::repeat_n(if y % 2 == 0 { 0xAA } else { 0x55 }, row));
    }
    tiff
}
