//! PDFs as fax servers send them: each page one image, usually CCITT (as stored by the
//! fax machine), sometimes Flate-compressed 1- or 8-bit gray. lopdf parses the file; the
//! image is found in the page's resources and decoded here, CCITT by the `fax` crate
//! (through `ccitt`). A CCITT image the crate cannot decode (T.4 two-dimensional, T.4
//! without EOLs, T.6 with byte-aligned rows) makes its page one the site cannot show,
//! saying why; the PDF itself is still kept and offered for download.

use lopdf::{Dictionary, Document, LoadOptions, Object, ObjectId, Stream};

use super::ccitt::{self, Coding, TWO_DIMENSIONAL};
use super::raster::{Bitmap, Gray, Raster, Resolution, Rows};
use super::{DocumentError, MAX_GRAY_PIXELS, MAX_HEIGHT, MAX_PAGES, MAX_WIDTH};

/// How far up the page tree an inherited attribute is looked for: real trees are a few
/// levels deep, a cycle would be endless.
const MAX_TREE_DEPTH: usize = 32;

/// The most any stream may inflate to while lopdf loads the file (object and
/// cross-reference streams): ample for a fax's few objects, small enough for a bomb.
const MAX_LOAD_INFLATE: usize = 16 * 1024 * 1024;

/// A loaded PDF and its pages, in order.
pub(super) struct Pdf {
    doc: Document,
    pages: Vec<ObjectId>,
}

impl Pdf {
    pub fn load(bytes: &[u8]) -> Result<Pdf, DocumentError> {
        let options = LoadOptions::with_max_decompressed_size(MAX_LOAD_INFLATE);
        let doc = Document::load_mem_with_options(bytes, options).map_err(|e| DocumentError::Pdf(e.to_string()))?;
        let pages: Vec<ObjectId> = doc.page_iter().take(MAX_PAGES as usize + 1).collect();
        if pages.is_empty() {
            return Err(DocumentError::Pdf("it has no pages".into()));
        }
        if pages.len() > MAX_PAGES as usize {
            return Err(DocumentError::TooLarge { detail: format!("it has more than {MAX_PAGES} pages") });
        }
        Ok(Pdf { doc, pages })
    }

    pub fn page_count(&self) -> u32 {
        // At most MAX_PAGES, checked in `load`.
        u32::try_from(self.pages.len()).unwrap_or(MAX_PAGES)
    }

    /// Page `index` (0-based) as a picture, and how its rows make square pixels.
    pub fn page(&self, index: u32) -> Result<(Raster, Rows), DocumentError> {
        let number = index.saturating_add(1);
        let page = self
            .pages
            .get(index as usize)
            .ok_or(DocumentError::PageOutOfRange { page: number, pages: self.page_count() })?;
        let page = self.doc.get_dictionary(*page).map_err(|e| DocumentError::Pdf(format!("page {number}: {e}")))?;
        // The images its content draws: pages may share one resource dictionary listing
        // every page's image (FPDF, TCPDF and jsPDF write them so). Any image it lists
        // where the content draws none of them (through a form, or unreadable).
        let drawn = self.drawn(page);
        let mut best: Option<(bool, Image<'_>)> = None;
        for (name, image) in self.images(page) {
            let image =
                image.map_err(|detail| DocumentError::TooLarge { detail: format!("page {number}: {detail}") })?;
            let is_drawn = drawn.iter().any(|d| d.as_slice() == name);
            if best.as_ref().is_none_or(|(was_drawn, b)| (is_drawn, image.area()) > (*was_drawn, b.area())) {
                best = Some((is_drawn, image));
            }
        }
        let (_, image) = best.ok_or(DocumentError::NotAnImagePage { page: number })?;
        let raster = image.decode(number)?;
        Ok((raster, self.rows(page, &image)))
    }

    /// The image XObjects of the page we can decode, by name; an error for one too large
    /// to.
    fn images<'a>(&'a self, page: &'a Dictionary) -> impl Iterator<Item = (&'a [u8], Result<Image<'a>, String>)> + 'a {
        let xobjects = self
            .inherited(page, b"Resources")
            .and_then(|r| r.as_dict().ok())
            .and_then(|r| r.get(b"XObject").ok())
            .and_then(|x| self.deref(x).as_dict().ok());
        xobjects
            .into_iter()
            .flat_map(|x| x.iter())
            .filter_map(|(name, object)| Some((name.as_slice(), self.deref(object).as_stream().ok()?)))
            .filter_map(|(name, stream)| Some((name, Image::read(self, stream).transpose()?)))
    }

    /// The names of the XObjects the page's content draws (`/Name Do`), up to an operator
    /// it cannot read or the [`DRAWN_AT_MOST`]th; none if its content is larger than a
    /// fax page's (a few operators) could be, in all its parts, or does not inflate.
    fn drawn(&self, page: &Dictionary) -> Vec<Vec<u8>> {
        // A part may be listed many times over: the bound is on them all.
        const BYTES_AT_MOST: usize = 1 << 20;
        const PARTS_AT_MOST: usize = 64;
        let contents: Vec<&Stream> = match page.get(b"Contents").map(|c| self.deref(c)) {
            Ok(Object::Stream(stream)) => vec![stream],
            Ok(Object::Array(parts)) if parts.len() <= PARTS_AT_MOST => {
                parts.iter().filter_map(|p| self.deref(p).as_stream().ok()).collect()
            }
            _ => Vec::new(),
        };
        let (mut drawn, mut left) = (Vec::new(), BYTES_AT_MOST);
        for stream in contents {
            let Ok(content) = stream.decompressed_content_with_limit(left) else { return Vec::new() };
            left = left.saturating_sub(content.len());
            for operation in lopdf::content::Content::decode_iter(&content) {
                let Ok(operation) = operation else { return drawn };
                if let ("Do", [Object::Name(name)]) = (operation.operator.as_str(), operation.operands.as_slice()) {
                    drawn.push(name.clone());
                    if drawn.len() == DRAWN_AT_MOST {
                        return drawn;
                    }
                }
            }
        }
        drawn
    }

    /// A page attribute, from the page or the nearest ancestor that has it.
    fn inherited<'a>(&'a self, page: &'a Dictionary, key: &[u8]) -> Option<&'a Object> {
        let mut node = page;
        for _ in 0..MAX_TREE_DEPTH {
            if let Ok(value) = node.get(key) {
                return Some(self.deref(value));
            }
            node = node.get(b"Parent").ok().and_then(|p| self.deref(p).as_dict().ok())?;
        }
        None
    }

    fn deref<'a>(&'a self, object: &'a Object) -> &'a Object {
        self.doc.dereference(object).map_or(object, |(_, o)| o)
    }

    fn number(&self, object: &Object) -> Option<f32> {
        self.deref(object).as_float().ok()
    }

    /// Fax PDFs draw the image over the whole page, so the page's shape tells a "normal"
    /// fax (rows twice as tall as wide) from a "fine" one.
    fn rows(&self, page: &Dictionary, image: &Image<'_>) -> Rows {
        let media_box = self.inherited(page, b"MediaBox").and_then(|m| m.as_array().ok());
        let corners: Vec<f32> = media_box.into_iter().flatten().filter_map(|n| self.number(n)).collect();
        let [x1, y1, x2, y2] = corners[..] else { return Rows { repeat: 1, merge: 1 } };
        let (width, height) = ((x2 - x1).abs(), (y2 - y1).abs());
        Resolution { x: image.width as f32 / width, y: image.height as f32 / height }.rows()
    }
}

/// The XObjects of a page's content looked at, at most: a fax page draws one image.
const DRAWN_AT_MOST: usize = 64;

/// An image XObject we can decode.
struct Image<'a> {
    width: u32,
    height: u32,
    stream: &'a Stream,
    samples: Samples,
    /// The Decode array swaps dark and light ([1 0]).
    inverted: bool,
}

enum Samples {
    /// CCITTFaxDecode.
    Ccitt { coding: Coding, black_is_1: bool },
    /// CCITTFaxDecode in a form the `fax` crate cannot decode, and why.
    CcittRefused(&'static str),
    /// 1-bit gray or a stencil mask, raw or FlateDecode: 0 is black.
    Bilevel { flate: bool },
    /// 8-bit gray, raw or FlateDecode.
    Gray { flate: bool },
}

impl<'a> Image<'a> {
    /// The image if we can decode it, `None` if not (another colour space, another
    /// filter), an error if it is larger than we show.
    fn read(pdf: &Pdf, stream: &'a Stream) -> Result<Option<Self>, String> {
        let dict = &stream.dict;
        let get = |key: &[u8]| dict.get(key).ok().map(|o| pdf.deref(o));
        if get(b"Subtype").and_then(|s| s.as_name().ok()) != Some(b"Image") {
            return Ok(None);
        }
        let size = |key: &[u8]| get(key).and_then(|n| n.as_i64().ok()).and_then(|n| u32::try_from(n).ok());
        let (Some(width), Some(height)) = (size(b"Width"), size(b"Height")) else { return Ok(None) };
        if width == 0 || height == 0 {
            return Ok(None);
        }
        if width > MAX_WIDTH || height > MAX_HEIGHT {
            return Err(format!("its image is {width} x {height} pixels, more than {MAX_WIDTH} x {MAX_HEIGHT}"));
        }
        let mask = get(b"ImageMask").and_then(|m| m.as_bool().ok()).unwrap_or(false);
        let bits = get(b"BitsPerComponent").and_then(|b| b.as_i64().ok()).unwrap_or(1);
        if !mask && !get(b"ColorSpace").is_some_and(|cs| is_gray(pdf, cs)) {
            return Ok(None);
        }
        let inverted = get(b"Decode")
            .and_then(|d| d.as_array().ok())
            .and_then(|d| Some((pdf.number(d.first()?)?, pdf.number(d.get(1)?)?)))
            .is_some_and(|(from, to)| from > to);
        let Some((filter, parms)) = single_filter(pdf, dict) else { return Ok(None) };
        let samples = match (filter.as_deref(), bits) {
            (Some(b"CCITTFaxDecode" | b"CCF"), 1) => {
                let parm = |key: &[u8]| parms.and_then(|p| p.get(key).ok()).map(|o| pdf.deref(o));
                let flag = |key: &[u8]| parm(key).and_then(|f| f.as_bool().ok()).unwrap_or(false);
                let columns = parm(b"Columns").and_then(|c| c.as_i64().ok()).unwrap_or(1728);
                if columns != i64::from(width) {
                    return Ok(None);
                }
                let k = parm(b"K").and_then(|k| k.as_i64().ok()).unwrap_or(0);
                let black_is_1 = flag(b"BlackIs1");
                match k {
                    // The crate's T.6 decoder reads rows back to back, never skipping to a byte.
                    k if k < 0 && flag(b"EncodedByteAlign") => Samples::CcittRefused(
                        "T.6 with each row byte-aligned (EncodedByteAlign) is not supported: \
                         have the fax server write it without",
                    ),
                    k if k < 0 => Samples::Ccitt { coding: Coding::G4, black_is_1 },
                    // Fill bits before an EOL are skipped, byte-aligned or not; without EOLs the
                    // crate cannot tell where a row ends.
                    0 if flag(b"EndOfLine") => Samples::Ccitt { coding: Coding::G3, black_is_1 },
                    0 => Samples::CcittRefused(
                        "T.4 one-dimensional coding without an EOL before each row (EndOfLine false) \
                         is not supported: have the fax server store T.6 (G4) or set EndOfLine",
                    ),
                    _ => Samples::CcittRefused(TWO_DIMENSIONAL),
                }
            }
            (None, 1) => Samples::Bilevel { flate: false },
            (Some(b"FlateDecode" | b"Fl"), 1) => Samples::Bilevel { flate: true },
            (None, 8) if !mask => Samples::Gray { flate: false },
            (Some(b"FlateDecode" | b"Fl"), 8) if !mask => Samples::Gray { flate: true },
            _ => return Ok(None),
        };
        if matches!(samples, Samples::Gray { .. }) && u64::from(width) * u64::from(height) > MAX_GRAY_PIXELS {
            return Err(format!("its gray image has more than {MAX_GRAY_PIXELS} pixels"));
        }
        Ok(Some(Image { width, height, stream, samples, inverted }))
    }

    fn area(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    /// The image of page `page` (counted from 1, for errors).
    fn decode(&self, page: u32) -> Result<Raster, DocumentError> {
        let (width, height) = (self.width, self.height);
        let corrupt = |detail: String| DocumentError::Corrupt { page, detail };
        match self.samples {
            Samples::CcittRefused(detail) => Err(DocumentError::Unsupported { page, detail: detail.into() }),
            Samples::Ccitt { coding, black_is_1 } => {
                let mut bitmap = Bitmap::white(width, height);
                let params = ccitt::Params { coding, width, rows: height, reversed: false };
                ccitt::decode(&self.stream.content, params, |row, changes| {
                    bitmap.paint(row, changes);
                })
                .map_err(|damage| corrupt(damage.describe(0, height)))?;
                // The filter gives 0 for black unless BlackIs1; Decode [1 0] swaps again.
                if black_is_1 != self.inverted {
                    bitmap.invert();
                }
                Ok(Raster::Bilevel(bitmap))
            }
            Samples::Bilevel { flate } => {
                let size = (width as usize).div_ceil(8).saturating_mul(height as usize);
                let mut bitmap = Bitmap { width, height, data: self.samples(flate, size).map_err(corrupt)? };
                // 0 is black, the bitmap's 1 is.
                if !self.inverted {
                    bitmap.invert();
                }
                bitmap.clear_padding();
                Ok(Raster::Bilevel(bitmap))
            }
            Samples::Gray { flate } => {
                let mut data =
                    self.samples(flate, (width as usize).saturating_mul(height as usize)).map_err(corrupt)?;
                if self.inverted {
                    data.iter_mut().for_each(|v| *v = !*v);
                }
                Ok(Raster::Gray(Gray { width, height, data }))
            }
        }
    }

    /// The first `size` bytes of the (inflated) stream.
    fn samples(&self, flate: bool, size: usize) -> Result<Vec<u8>, String> {
        let mut data = if flate {
            // A little over the size: trailing bytes are harmless, a bomb is not.
            self.stream.decompressed_content_with_limit(size.saturating_add(1024)).map_err(|e| e.to_string())?
        } else {
            self.stream.content.clone()
        };
        if data.len() < size {
            return Err(format!("its image data has {} bytes, the image needs {size}", data.len()));
        }
        data.truncate(size);
        Ok(data)
    }
}

/// The stream's one filter (`None` for none) and its DecodeParms; `None` for a chain
/// of filters, which fax PDFs do not use.
fn single_filter<'a>(pdf: &'a Pdf, dict: &'a Dictionary) -> Option<(Option<Vec<u8>>, Option<&'a Dictionary>)> {
    let one = |object: Option<&'a Object>| -> Option<Option<&'a Object>> {
        match object.map(|o| pdf.deref(o)) {
            None | Some(Object::Null) => Some(None),
            Some(Object::Array(items)) => match items.as_slice() {
                [] => Some(None),
                [item] => Some(Some(pdf.deref(item))),
                _ => None,
            },
            Some(other) => Some(Some(other)),
        }
    };
    let filter = one(dict.get(b"Filter").ok())?;
    let filter = match filter {
        Some(name) => Some(name.as_name().ok()?.to_vec()),
        None => None,
    };
    let parms = one(dict.get(b"DecodeParms").ok()).flatten().and_then(|p| p.as_dict().ok());
    Some((filter, parms))
}

/// Whether a colour space is one gray channel.
fn is_gray(pdf: &Pdf, space: &Object) -> bool {
    match space {
        Object::Name(name) => matches!(name.as_slice(), b"DeviceGray" | b"G" | b"CalGray"),
        Object::Array(items) => match items.first().and_then(|n| n.as_name().ok()) {
            Some(b"CalGray") => true,
            Some(b"ICCBased") => {
                items
                    .get(1)
                    .and_then(|s| pdf.deref(s).as_stream().ok())
                    .and_then(|s| s.dict.get(b"N").ok())
                    .and_then(|n| pdf.deref(n).as_i64().ok())
                    == Some(1)
            }
            _ => false,
        },
        _ => false,
    }
}
