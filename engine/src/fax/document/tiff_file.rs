//! Fax TIFFs: TIFF Class F (RFC 2306) and what fax servers write in its spirit. The
//! `tiff` crate reads the container (the chain of IFDs, one per page, and their tags);
//! the strips are cut from the input and handed to the `fax` crate's decoders (through
//! `ccitt`), since the `tiff` crate cannot decode Group 3 or FillOrder 2 and cannot
//! check a page without building its picture. Group 3 two-dimensional pages are refused
//! when the page is read: no decoder we use takes them.

use std::borrow::Cow;
use std::io::Cursor;

use tiff::decoder::ifd::Value;
use tiff::decoder::Decoder;
use tiff::tags::Tag;

use super::ccitt::{self, Coding, TWO_DIMENSIONAL};
use super::raster::{Bitmap, Resolution};
use super::{DocumentError, MAX_DOCUMENT_PIXELS, MAX_HEIGHT, MAX_PAGES, MAX_WIDTH};

/// T4Options (TIFF tag 292): bit 0 two-dimensional coding, bit 1 uncompressed mode.
const T4_OPTIONS: Tag = Tag::Unknown(292);

/// What one page (IFD) says about its picture, checked against what we can show.
#[derive(Debug)]
pub(super) struct Page {
    /// Counted from 1, for error messages.
    number: u32,
    width: u32,
    height: u32,
    /// `None` for uncompressed rows.
    coding: Option<Coding>,
    /// FillOrder 2: the first pixel is in each byte's least significant bit.
    lsb_first: bool,
    /// PhotometricInterpretation 1: 1 bits are white.
    black_is_zero: bool,
    rows_per_strip: u32,
    /// Offset and length of each strip in the file.
    strips: Vec<(u64, u64)>,
    pub resolution: Resolution,
}

/// Every page of the TIFF, in the order of its IFD chain.
pub(super) fn pages(bytes: &[u8]) -> Result<Vec<Page>, DocumentError> {
    let mut decoder = Decoder::new(Cursor::new(bytes)).map_err(|e| container(1, &e))?;
    let mut pages = Vec::new();
    let mut pixels = 0u64;
    // A file holds each strip's offset and length, two bytes each at the least: pages
    // that list more share their tables, and would be held once per page (a crafted
    // file of a few hundred KB, hundreds of MB).
    let (mut strips, strips_at_most) = (0usize, bytes.len() / 4);
    loop {
        let number = u32::try_from(pages.len()).unwrap_or(u32::MAX).saturating_add(1);
        let page = read_page(&mut decoder, number)?;
        strips = strips.saturating_add(page.strips.len());
        if strips > strips_at_most {
            return Err(DocumentError::Tiff(format!(
                "its pages up to page {number} list {strips} strips, more than a file of {} bytes can hold \
                 (pages sharing their strip tables)",
                bytes.len()
            )));
        }
        pixels = pixels.saturating_add(u64::from(page.width) * u64::from(page.height));
        if pixels > MAX_DOCUMENT_PIXELS {
            return Err(DocumentError::TooLarge {
                detail: format!("its pages up to page {number} have more than {MAX_DOCUMENT_PIXELS} pixels"),
            });
        }
        pages.push(page);
        if !decoder.more_images() {
            return Ok(pages);
        }
        if pages.len() >= MAX_PAGES as usize {
            return Err(DocumentError::TooLarge { detail: format!("it has more than {MAX_PAGES} pages") });
        }
        decoder.next_image().map_err(|e| container(number.saturating_add(1), &e))?;
    }
}

fn container(page: u32, error: &tiff::TiffError) -> DocumentError {
    DocumentError::Tiff(format!("page {page}: {error}"))
}

fn read_page(decoder: &mut Decoder<Cursor<&[u8]>>, number: u32) -> Result<Page, DocumentError> {
    let tiff = |e: tiff::TiffError| container(number, &e);
    let unsupported = |detail: String| DocumentError::Unsupported { page: number, detail };
    let (width, height) = decoder.dimensions().map_err(tiff)?;
    if width > MAX_WIDTH || height > MAX_HEIGHT {
        return Err(DocumentError::TooLarge {
            detail: format!("page {number} is {width} x {height} pixels, more than {MAX_WIDTH} x {MAX_HEIGHT}"),
        });
    }
    let tag = |decoder: &mut Decoder<Cursor<&[u8]>>, tag, default| {
        decoder.find_tag_unsigned::<u32>(tag).map(|v| v.unwrap_or(default)).map_err(tiff)
    };
    let compression = tag(decoder, Tag::Compression, 1)?;
    let t4_options = tag(decoder, T4_OPTIONS, 0)?;
    let coding = match compression {
        1 => None,
        3 if t4_options & 2 != 0 => return Err(unsupported("its Group 3 data uses uncompressed mode".into())),
        3 if t4_options & 1 != 0 => return Err(unsupported(TWO_DIMENSIONAL.into())),
        3 => Some(Coding::G3),
        4 => Some(Coding::G4),
        found => return Err(DocumentError::Compression { page: number, found }),
    };
    let samples = tag(decoder, Tag::SamplesPerPixel, 1)?;
    let bits = decoder.find_tag_unsigned_vec::<u32>(Tag::BitsPerSample).map_err(tiff)?.unwrap_or_else(|| vec![1]);
    if samples != 1 || bits != [1] {
        return Err(unsupported(format!(
            "it is not black and white ({samples} samples of {bits:?} bits a pixel, a fax has 1 of 1)"
        )));
    }
    let black_is_zero = match tag(decoder, Tag::PhotometricInterpretation, 0)? {
        0 => false,
        1 => true,
        other => return Err(unsupported(format!("its PhotometricInterpretation is {other}, not 0 or 1"))),
    };
    let lsb_first = match tag(decoder, Tag::FillOrder, 1)? {
        1 => false,
        2 => true,
        other => return Err(unsupported(format!("its FillOrder is {other}, not 1 or 2"))),
    };
    if decoder.find_tag(Tag::TileOffsets).map_err(tiff)?.is_some() {
        return Err(unsupported("it is stored in tiles, a fax page is stored in strips".into()));
    }
    let offsets = decoder.find_tag_unsigned_vec::<u64>(Tag::StripOffsets).map_err(tiff)?.unwrap_or_default();
    let counts = decoder.find_tag_unsigned_vec::<u64>(Tag::StripByteCounts).map_err(tiff)?.unwrap_or_default();
    if offsets.is_empty() || offsets.len() != counts.len() {
        return Err(DocumentError::Tiff(format!("page {number}: its strip offsets and lengths do not match")));
    }
    let rows_per_strip = tag(decoder, Tag::RowsPerStrip, height)?.clamp(1, height.max(1));
    let resolution = resolution(decoder).map_err(tiff)?;
    let strips = offsets.into_iter().zip(counts).collect();
    Ok(Page { number, width, height, coding, lsb_first, black_is_zero, rows_per_strip, strips, resolution })
}

/// XResolution and YResolution in dots per inch; fax fine where missing or absurd.
fn resolution(decoder: &mut Decoder<Cursor<&[u8]>>) -> Result<Resolution, tiff::TiffError> {
    let per_inch = match decoder.find_tag_unsigned::<u32>(Tag::ResolutionUnit)? {
        Some(3) => 2.54,
        _ => 1.0,
    };
    let mut read = |tag, default: f32| -> Result<f32, tiff::TiffError> {
        let dpi = match decoder.find_tag(tag)? {
            Some(Value::Rational(n, d)) if d != 0 => n as f32 / d as f32 * per_inch,
            _ => default,
        };
        Ok(if (20.0..=2000.0).contains(&dpi) { dpi } else { default })
    };
    Ok(Resolution { x: read(Tag::XResolution, Resolution::FINE.x)?, y: read(Tag::YResolution, Resolution::FINE.y)? })
}

/// The page's picture.
pub(super) fn bitmap(bytes: &[u8], page: &Page) -> Result<Bitmap, DocumentError> {
    let mut bitmap = Bitmap::white(page.width, page.height);
    decode(bytes, page, Some(&mut bitmap))?;
    if page.black_is_zero {
        bitmap.invert();
    }
    bitmap.clear_padding();
    Ok(bitmap)
}

/// Decodes the page without keeping its picture: whether it would show.
pub(super) fn check(bytes: &[u8], page: &Page) -> Result<(), DocumentError> {
    decode(bytes, page, None)
}

fn decode(bytes: &[u8], page: &Page, mut bitmap: Option<&mut Bitmap>) -> Result<(), DocumentError> {
    let corrupt = |detail: String| DocumentError::Corrupt { page: page.number, detail };
    let strip_count = page.strips.len();
    for (index, &(offset, length)) in page.strips.iter().enumerate() {
        let first_row = u32::try_from(index).ok().and_then(|i| i.checked_mul(page.rows_per_strip));
        let Some(first_row) = first_row.filter(|&row| row < page.height) else {
            break; // Strips past the last row hold nothing of the page.
        };
        let rows = page.rows_per_strip.min(page.height - first_row);
        let data = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(length).ok())
            .and_then(|(offset, length)| bytes.get(offset..offset.checked_add(length)?))
            .ok_or_else(|| corrupt(format!("strip {} of {strip_count} lies past the end of the file", index + 1)))?;
        match page.coding {
            None => {
                let data: Cow<'_, [u8]> =
                    if page.lsb_first { data.iter().map(|b| b.reverse_bits()).collect() } else { data.into() };
                copy_rows(&data, page.width, first_row, rows, bitmap.as_deref_mut()).map_err(corrupt)?
            }
            Some(coding) => {
                let params = ccitt::Params { coding, width: page.width, rows, reversed: page.lsb_first };
                ccitt::decode(data, params, |row, changes| {
                    if let Some(bitmap) = bitmap.as_deref_mut() {
                        bitmap.paint(first_row + row, changes);
                    }
                })
                .map_err(|damage| corrupt(damage.describe(first_row, page.height)))?;
            }
        }
    }
    Ok(())
}

/// Uncompressed rows, each padded to whole bytes.
fn copy_rows(data: &[u8], width: u32, first_row: u32, rows: u32, bitmap: Option<&mut Bitmap>) -> Result<(), String> {
    let stride = (width as usize).div_ceil(8);
    let needed = stride.saturating_mul(rows as usize);
    let data = data.get(..needed).ok_or_else(|| {
        let (first, last) = (u64::from(first_row) + 1, u64::from(first_row) + u64::from(rows));
        format!("rows {first} to {last} need {needed} bytes, their strip has {}", data.len())
    })?;
    if let Some(bitmap) = bitmap {
        let start = stride.saturating_mul(first_row as usize);
        if let Some(target) = bitmap.data.get_mut(start..start.saturating_add(needed)) {
            target.copy_from_slice(data);
        }
    }
    Ok(())
}
