//! Fax documents (R-F1): TIFF Class F (T.4 / T.6) and PDF, as fax servers send them.
//!
//! A fax record carries its document, and the subscriber reads it on the settings site
//! after login, a page at a time, or downloads it. So the engine checks a document
//! before it keeps it ([`inspect`]: a record whose pages will not show is refused at
//! once, when the fax server can still be told, not when the subscriber looks), and the
//! site gets each page as a PNG ([`page_png`], what every browser shows) and the whole fax
//! as a PDF ([`to_pdf`], what every computer opens; a TIFF is not).
//!
//! Documents come from outside, so every size is bounded ([`MAX_PAGES`], [`MAX_WIDTH`],
//! [`MAX_HEIGHT`], [`MAX_DOCUMENT_PIXELS`], [`MAX_GRAY_PIXELS`]) and damaged or hostile
//! bytes end in a [`DocumentError`], never in a panic or an endless loop.
//!
//! The fax codings are decoded by the `fax` crate, not by code of ours: TIFF Group 3
//! one-dimensional (T.4 MH) and Group 4 (T.6) pages, PDF CCITTFaxDecode images of K 0
//! (with EOLs) or K < 0. What it cannot decode is refused, saying what to change: a TIFF
//! page in T.4 two-dimensional (MR) coding fails [`inspect`] (the record goes to the dead
//! letters); a PDF page coded so (or T.4 without EOLs, or T.6 with byte-aligned rows) is
//! kept, like any PDF page that is not a fax image, but [`page_png`] says why it does not
//! show. Uncompressed TIFF pages and Flate or raw PDF images are read here.
//!
//! - `ccitt`: T.4 one-dimensional and T.6 decoding and the T.6 encoding of the PDFs we
//!   write, all by the `fax` crate, and the checks of what its decoders give.
//! - `tiff_file`: the pages of a TIFF and their strips.
//! - `pdf_file`: the pages of a PDF and the image on each.
//! - `pdf_out`: the PDF made of a TIFF.
//! - `raster`: decoded pages and their PNGs.

mod ccitt;
mod pdf_file;
mod pdf_out;
mod raster;
mod tiff_file;

use pdf_file::Pdf;
use raster::Raster;

/// The most pages a document may have: more than three times the T.6 pages the largest
/// record docs/fax.md sets a fax topic up for (about 300), far more than any fax.
pub const MAX_PAGES: u32 = 1000;

/// The widest page, in pixels: a fax is at most 4864 (A3 at 400 dpi).
pub const MAX_WIDTH: u32 = 10_000;

/// The tallest page, in rows: an A4 page at 400 dpi is about 4700, a long "continuous"
/// fax page a few times that.
pub const MAX_HEIGHT: u32 = 30_000;

/// The most pixels of all a TIFF's pages together: 1000 A4 pages at fine resolution.
/// Pages may share their data, so a small file can declare many large pages; the PDF made
/// of a TIFF re-encodes every pixel, and this keeps that to seconds.
pub const MAX_DOCUMENT_PIXELS: u64 = 4_000_000_000;

/// The most pixels of an 8-bit gray PDF page (one byte each), lower than the bilevel
/// limit's 300 million (one bit each): about a 600 dpi A4 scan.
pub const MAX_GRAY_PIXELS: u64 = 40_000_000;

/// What kind of document a fax record carries, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentKind {
    Tiff,
    Pdf,
}

impl DocumentKind {
    /// By the magic bytes alone, so a record's declared content type can be checked
    /// against what it carries before anything is parsed.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [b'I', b'I', b'*', 0, ..] | [b'M', b'M', 0, b'*', ..] => Some(DocumentKind::Tiff),
            [b'%', b'P', b'D', b'F', b'-', ..] => Some(DocumentKind::Pdf),
            _ => None,
        }
    }

    /// The media type the site serves the document (and a record declares it) as.
    pub fn content_type(self) -> &'static str {
        match self {
            DocumentKind::Tiff => "image/tiff",
            DocumentKind::Pdf => "application/pdf",
        }
    }
}

/// What the engine checks of a document before it keeps it: the record's declared page
/// count must agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    pub kind: DocumentKind,
    pub pages: u32,
}

/// Why a document is refused or a page cannot be shown, worded for the dead-letter
/// record an operator reads. Every `page` counts from 1, as a person reads the document.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("the document is empty")]
    Empty,
    #[error("the document is neither a TIFF nor a PDF (by its first bytes)")]
    NotAFaxDocument,
    #[error("the TIFF file cannot be read: {0}")]
    Tiff(String),
    #[error("the PDF file cannot be read: {0}")]
    Pdf(String),
    #[error(
        "page {page} is compressed with TIFF compression {found} ({}), not a fax coding \
         (3: CCITT Group 3, 4: CCITT Group 4, or 1: none)",
        compression_name(*.found)
    )]
    Compression { page: u32, found: u32 },
    #[error("page {page} cannot be shown: {detail}")]
    Unsupported { page: u32, detail: String },
    #[error("page {page} is damaged: {detail}")]
    Corrupt { page: u32, detail: String },
    #[error("the document is too large to show: {detail}")]
    TooLarge { detail: String },
    #[error("there is no page {page}: the document has {pages}")]
    PageOutOfRange { page: u32, pages: u32 },
    #[error("page {page} has no fax image to show (no image, or only one of a kind not supported)")]
    NotAnImagePage { page: u32 },
    #[error("the page picture cannot be written: {0}")]
    Encode(String),
}

/// The TIFF names of the compressions a misconfigured fax server might send.
fn compression_name(compression: u32) -> &'static str {
    match compression {
        2 => "CCITT modified Huffman RLE",
        5 => "LZW",
        6 | 7 => "JPEG",
        8 | 32946 => "Deflate",
        32773 => "PackBits",
        34712 => "JPEG 2000",
        _ => "unknown",
    }
}

fn kind(bytes: &[u8]) -> Result<DocumentKind, DocumentError> {
    if bytes.is_empty() {
        return Err(DocumentError::Empty);
    }
    DocumentKind::sniff(bytes).ok_or(DocumentError::NotAFaxDocument)
}

/// Parses the container and checks every page can be decoded, so a record that will not
/// show on the site is refused at once. A TIFF's every page is decoded (its coding, its
/// bilevel pixels, its bit order and polarity checked on the way). A PDF need only load
/// and have pages: a page that is not a fax image still opens in a PDF reader, so the
/// fax is kept and offered for download.
pub fn inspect(bytes: &[u8]) -> Result<Inspected, DocumentError> {
    match kind(bytes)? {
        DocumentKind::Tiff => {
            let pages = tiff_file::pages(bytes)?;
            pages.iter().try_for_each(|page| tiff_file::check(bytes, page))?;
            // At most MAX_PAGES.
            let pages = u32::try_from(pages.len()).unwrap_or(MAX_PAGES);
            Ok(Inspected { kind: DocumentKind::Tiff, pages })
        }
        DocumentKind::Pdf => Ok(Inspected { kind: DocumentKind::Pdf, pages: Pdf::load(bytes)?.page_count() }),
    }
}

/// Which pages of a PDF fax (in order) [`page_png`] can show: those whose image
/// decodes (a page may hold text or a drawing instead, or a coding the decoder cannot
/// read). The PDF is loaded once and no picture is made: asked page by page through
/// [`page_png`], a fax of 300 pages was loaded 300 times and 300 pictures made and
/// thrown away each time its page was opened. None for a PDF that does not load. (A
/// TIFF's pages all show: [`inspect`] decoded each before it was kept.)
pub fn pdf_pictures(bytes: &[u8]) -> Vec<bool> {
    match Pdf::load(bytes) {
        Ok(pdf) => (0..pdf.page_count()).map(|page| pdf.page(page).is_ok()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Page `page` (0-based) as a PNG, black on white, what the site shows. Fax pixels are not
/// square at "normal" resolution (204x98 dpi): each row is written twice so the page does
/// not look squashed; "fine" (204x196) rows are written once, "superfine" (204x391) two
/// rows as one. A TIFF page's resolution is
/// its XResolution/YResolution (fine if absent), a PDF page's follows from its size.
pub fn page_png(bytes: &[u8], page: u32) -> Result<Vec<u8>, DocumentError> {
    let (raster, rows) = match kind(bytes)? {
        DocumentKind::Tiff => {
            let pages = tiff_file::pages(bytes)?;
            let count = u32::try_from(pages.len()).unwrap_or(MAX_PAGES);
            let tiff_page = pages
                .get(page as usize)
                .ok_or(DocumentError::PageOutOfRange { page: page.saturating_add(1), pages: count })?;
            (Raster::Bilevel(tiff_file::bitmap(bytes, tiff_page)?), tiff_page.resolution.rows())
        }
        DocumentKind::Pdf => Pdf::load(bytes)?.page(page)?,
    };
    raster::png(&raster, rows)
}

/// The document as a PDF (for download, or attached to its mails) of at most `at_most`
/// bytes. A PDF is returned as it came (bytes unchanged: it is the fax server's, and
/// [`inspect`] has loaded it). A TIFF becomes a PDF of its pages, each the size the fax's
/// resolution gives it (an A4 fax about 595x842 pt), its picture re-encoded as T.6
/// whatever the TIFF's coding, bit order or polarity.
///
/// The bound matters for a TIFF: its pages may share their data, so a small file can
/// make a PDF of gigabytes (a dense page takes about 3 bits a pixel in T.6). The PDF is
/// given up once it passes `at_most`, a page after it at most.
pub fn to_pdf(bytes: &[u8], at_most: usize) -> Result<Vec<u8>, DocumentError> {
    let too_large = || DocumentError::TooLarge { detail: format!("its PDF is larger than {at_most} bytes") };
    match kind(bytes)? {
        DocumentKind::Pdf if bytes.len() > at_most => Err(too_large()),
        DocumentKind::Pdf => Ok(bytes.to_vec()),
        DocumentKind::Tiff => {
            let mut pdf = pdf_out::PdfBuilder::new();
            for page in tiff_file::pages(bytes)? {
                pdf.page(&tiff_file::bitmap(bytes, &page)?, page.resolution);
                if pdf.len() > at_most {
                    return Err(too_large());
                }
            }
            Ok(pdf.finish())
        }
    }
}

#[cfg(test)]
mod tests;
