//! The PDF the site offers for download of a TIFF fax: one page per fax page, sized from
//! the fax's resolution, each page one Group 4 image (the densest coding every PDF reader
//! knows, the one the fax was most likely sent in).

use pdf_writer::{Content, Filter, Finish, Name, Pdf, Rect, Ref};

use super::ccitt;
use super::raster::{Bitmap, Resolution};

/// Builds the PDF, a page at a time, so only one page's picture is held at once.
pub(super) struct PdfBuilder {
    pdf: Pdf,
    pages: Vec<Ref>,
    next: Ref,
}

const CATALOG: Ref = Ref::new(1);
const PAGE_TREE: Ref = Ref::new(2);
const IMAGE: Name<'static> = Name(b"Im0");

impl PdfBuilder {
    pub fn new() -> Self {
        PdfBuilder { pdf: Pdf::new(), pages: Vec::new(), next: Ref::new(3) }
    }

    /// Adds `bitmap` as the next page. Its width is at most [`super::MAX_WIDTH`].
    pub fn page(&mut self, bitmap: &Bitmap, resolution: Resolution) {
        let (page, content, image) = (self.next.bump(), self.next.bump(), self.next.bump());
        self.pages.push(page);
        let (width, height) = resolution.points(bitmap.width, bitmap.height);
        let mut page_dict = self.pdf.page(page);
        page_dict.parent(PAGE_TREE).media_box(Rect::new(0.0, 0.0, width, height)).contents(content);
        page_dict.resources().x_objects().pair(IMAGE, image);
        page_dict.finish();

        let mut draw = Content::new();
        draw.save_state().transform([width, 0.0, 0.0, height, 0.0, 0.0]).x_object(IMAGE).restore_state();
        self.pdf.stream(content, &draw.finish());

        let columns = u16::try_from(bitmap.width).unwrap_or(u16::MAX);
        let data = ccitt::encode_g4(columns, bitmap.rows());
        let (columns, rows) = (i32::from(columns), i32::try_from(bitmap.height).unwrap_or(i32::MAX));
        let mut xobject = self.pdf.image_xobject(image, &data);
        xobject.width(columns).height(rows).bits_per_component(1);
        xobject.color_space().device_gray();
        xobject.filter(Filter::CcittFaxDecode);
        // The encoder codes black pixels as CCITT black: BlackIs1 false makes those 0,
        // which DeviceGray shows black.
        xobject.decode_parms().k(-1).columns(columns).rows(rows).black_is_1(false);
    }

    /// The bytes written so far.
    pub fn len(&self) -> usize {
        self.pdf.len()
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.pdf.catalog(CATALOG).pages(PAGE_TREE);
        let count = i32::try_from(self.pages.len()).unwrap_or(i32::MAX);
        self.pdf.pages(PAGE_TREE).kids(self.pages.iter().copied()).count(count);
        self.pdf.finish()
    }
}
