//! The document module's tests: each fixture (scripts/make-fax-fixtures.sh) decoded and
//! compared pixel by pixel with its drawing, the PDFs made and read back, and the
//! refusals of what is not a fax, damaged or too large.

use super::*;

/// [`super::to_pdf`] without a bound on its size.
fn to_pdf(bytes: &[u8]) -> Result<Vec<u8>, DocumentError> {
    super::to_pdf(bytes, usize::MAX)
}

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("../../../tests/fixtures/fax/", $name)).as_slice()
    };
}

// Made by scripts/make-fax-fixtures.sh: three A4 pages drawn at fine resolution
// (1728 x 2287), page 1 again at normal resolution (1728 x 1144), in the codings a
// fax server stores; the PNGs are the drawn bitmaps themselves.
const PAGES: [&[u8]; 3] = [fixture!("page1.png"), fixture!("page2.png"), fixture!("page3.png")];
const NORMAL_PAGE: &[u8] = fixture!("normal.png");
const FINE_G4: &[u8] = fixture!("fine-g4.tif");
const FINE_G3: &[u8] = fixture!("fine-g3.tif");
const FINE_G3_2D: &[u8] = fixture!("fine-g3-2d.tif");
const FINE_G3_LSB: &[u8] = fixture!("fine-g3-lsb.tif");
const NORMAL_G3: &[u8] = fixture!("normal-g3.tif");
const BLACK_IS_ZERO_G4: &[u8] = fixture!("page2-blackiszero-g4.tif");
const BAND_UNCOMPRESSED: &[u8] = fixture!("page1-band-uncompressed.tif");
const SMALL_LZW: &[u8] = fixture!("small-lzw.tif");
const FINE_G4_PDF: &[u8] = fixture!("fine-g4.pdf");
const BLACK_IS_ZERO_PDF: &[u8] = fixture!("page2-blackiszero-g4.pdf");

/// A picture as a person sees it: which pixels are black.
#[derive(PartialEq, Eq)]
struct Picture {
    width: u32,
    height: u32,
    black: Vec<bool>,
}

impl std::fmt::Debug for Picture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let black = self.black.iter().filter(|&&b| b).count();
        write!(f, "{} x {} picture, {black} black pixels", self.width, self.height)
    }
}

impl Picture {
    fn row(&self, y: u32) -> &[bool] {
        let w = self.width as usize;
        &self.black[y as usize * w..(y as usize + 1) * w]
    }

    /// Rows `from..to`.
    fn band(&self, from: u32, to: u32) -> Picture {
        let w = self.width as usize;
        let black = self.black[from as usize * w..to as usize * w].to_vec();
        Picture { width: self.width, height: to - from, black }
    }

    /// Every other row: a picture with each row written twice, as it was before.
    fn halved(&self) -> Picture {
        let black = (0..self.height / 2).flat_map(|y| self.row(2 * y).to_vec()).collect();
        Picture { width: self.width, height: self.height / 2, black }
    }
}

/// Reads any PNG (ours, or the truth ImageMagick wrote) as black and white.
fn picture(png: &[u8]) -> Picture {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buffer = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut buffer).expect("a frame");
    assert_eq!(info.bit_depth, png::BitDepth::Eight, "gray expanded to 8 bits");
    let channels = info.color_type.samples();
    let black = buffer
        .chunks(info.line_size)
        .take(info.height as usize)
        .flat_map(|line| line.chunks(channels).take(info.width as usize).map(|pixel| pixel[0] < 128))
        .collect();
    Picture { width: info.width, height: info.height, black }
}

fn shown(document: &[u8], page: u32) -> Picture {
    picture(&page_png(document, page).unwrap_or_else(|e| panic!("page {}: {e}", page + 1)))
}

/// Asserts two pictures are the same, saying where they first differ if not.
fn assert_same(seen: &Picture, truth: &Picture, what: &str) {
    assert_eq!((seen.width, seen.height), (truth.width, truth.height), "{what}: size");
    if let Some(at) = seen.black.iter().zip(&truth.black).position(|(a, b)| a != b) {
        let wrong = seen.black.iter().zip(&truth.black).filter(|(a, b)| a != b).count();
        let (x, y) = (at % seen.width as usize, at / seen.width as usize);
        panic!("{what}: {wrong} pixels differ from the original, the first at column {x}, row {y}");
    }
}

/// Every page of a three-page fine fixture shows as drawn.
fn assert_shows_the_three_pages(document: &[u8], what: &str) {
    let inspected = inspect(document).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(inspected.pages, 3, "{what}");
    for (page, truth) in PAGES.iter().enumerate() {
        assert_same(&shown(document, page as u32), &picture(truth), &format!("{what}, page {}", page + 1));
    }
}

fn u32_at(tiff: &[u8], at: usize) -> usize {
    u32::from_le_bytes(tiff[at..at + 4].try_into().unwrap()) as usize
}

fn u16_at(tiff: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([tiff[at], tiff[at + 1]])
}

/// Where the `ifd`th IFD (counted from 0) of a little-endian TIFF starts.
fn ifd_offset(tiff: &[u8], ifd: usize) -> usize {
    assert_eq!(&tiff[..2], b"II");
    (0..ifd).fold(u32_at(tiff, 4), |offset, _| u32_at(tiff, offset + 2 + 12 * usize::from(u16_at(tiff, offset))))
}

/// Where the value of `tag` in the `ifd`th IFD sits (a value of one SHORT or LONG).
fn ifd_value_at(tiff: &[u8], ifd: usize, tag: u16) -> usize {
    let offset = ifd_offset(tiff, ifd);
    let entries = usize::from(u16_at(tiff, offset));
    (0..entries).map(|i| offset + 2 + 12 * i).find(|&e| u16_at(tiff, e) == tag).expect("the tag") + 8
}

/// The TIFF with `tag` of the `ifd`th IFD set to `value`.
fn patch(tiff: &[u8], ifd: usize, tag: u16, value: u32) -> Vec<u8> {
    let mut tiff = tiff.to_vec();
    let at = ifd_value_at(&tiff, ifd, tag);
    // The entry's type, 6 bytes before its value: 3 is SHORT, else LONG.
    let bytes = if tiff[at - 6] == 3 { (value as u16).to_le_bytes().to_vec() } else { value.to_le_bytes().to_vec() };
    tiff[at..at + bytes.len()].copy_from_slice(&bytes);
    tiff
}

/// A minimal little-endian TIFF of `pages` uncompressed white pages, all sharing one
/// strip (of at most 4 KB: larger pages are for limits checked before any decoding).
fn tiny_tiff(pages: u32, width: u32, height: u32) -> Vec<u8> {
    let strip = width.div_ceil(8) * height;
    let mut tiff = b"II*\0".to_vec();
    tiff.extend(8u32.to_le_bytes());
    let entries: [(u16, u32); 7] = [(256, width), (257, height), (258, 1), (259, 1), (262, 0), (273, 0), (279, strip)];
    let ifd_len = 2 + 12 * entries.len() as u32 + 4;
    let data_at = 8 + ifd_len * pages;
    for page in 0..pages {
        tiff.extend((entries.len() as u16).to_le_bytes());
        for (tag, value) in entries {
            let value = if tag == 273 { data_at } else { value };
            tiff.extend(tag.to_le_bytes());
            tiff.extend(4u16.to_le_bytes());
            tiff.extend(1u32.to_le_bytes());
            tiff.extend(value.to_le_bytes());
        }
        let next = if page + 1 < pages { 8 + ifd_len * (page + 1) } else { 0 };
        tiff.extend(next.to_le_bytes());
    }
    tiff.resize(tiff.len() + strip.min(4096) as usize, 0);
    tiff
}

/// A one-page PDF whose page is `data` as a FlateDecode DeviceGray image.
fn flate_pdf(width: u32, height: u32, bits: i64, data: Vec<u8>) -> Vec<u8> {
    let mut image = gray_image(width, height, bits, data);
    image.compress().expect("compressed");
    assert_eq!(image.filters().expect("a filter"), [b"FlateDecode".as_slice()]);
    image_pdf(width, height, image)
}

/// A one-page PDF whose page is `data` as a CCITTFaxDecode image with `parms`.
fn ccitt_pdf(width: u32, height: u32, parms: lopdf::Dictionary, data: Vec<u8>) -> Vec<u8> {
    let mut image = gray_image(width, height, 1, data);
    image.dict.set("Filter", "CCITTFaxDecode");
    image.dict.set("DecodeParms", parms);
    image_pdf(width, height, image)
}

fn gray_image(width: u32, height: u32, bits: i64, data: Vec<u8>) -> lopdf::Stream {
    use lopdf::dictionary;
    let dict = dictionary! {
        "Type" => "XObject", "Subtype" => "Image", "ColorSpace" => "DeviceGray",
        "Width" => i64::from(width), "Height" => i64::from(height), "BitsPerComponent" => bits,
    };
    lopdf::Stream::new(dict, data)
}

/// A one-page PDF whose page is `image`, drawn over the whole page.
fn image_pdf(width: u32, height: u32, image: lopdf::Stream) -> Vec<u8> {
    use lopdf::{dictionary, Object, Stream};
    let mut doc = lopdf::Document::with_version("1.5");
    let pages = doc.new_object_id();
    let image = doc.add_object(image);
    let (w, h) = (width as f32 * 0.3, height as f32 * 0.3);
    let draw = format!("q {w} 0 0 {h} 0 0 cm /Im0 Do Q");
    let content = doc.add_object(Stream::new(dictionary! {}, draw.into_bytes()));
    let page = doc.add_object(dictionary! {
        "Type" => "Page", "Parent" => pages, "Contents" => content,
        "MediaBox" => vec![0.into(), 0.into(), w.into(), h.into()],
        "Resources" => dictionary! { "XObject" => dictionary! { "Im0" => image } },
    });
    let tree = dictionary! { "Type" => "Pages", "Kids" => vec![page.into()], "Count" => 1 };
    doc.objects.insert(pages, Object::Dictionary(tree));
    let catalog = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages });
    doc.trailer.set("Root", catalog);
    let mut out = Vec::new();
    doc.save_to(&mut out).expect("saved");
    out
}

/// R-F1: a PDF whose pages share one resource dictionary listing every page's image (as
/// FPDF, TCPDF and jsPDF write them) shows each page's own image, the one its content
/// draws: every page used to show the first listed of those equal in size.
#[test]
fn r_f1_pdf_pages_sharing_their_resources_each_show_their_own_image() {
    use lopdf::{dictionary, Object, Stream};
    let (width, height) = (16u32, 4u32);
    let row_bytes = (width as usize).div_ceil(8) * height as usize;
    let mut doc = lopdf::Document::with_version("1.5");
    let pages = doc.new_object_id();
    // 1-bit gray, 0 black: one all black, one all white, one black but for a white row.
    let black = doc.add_object(gray_image(width, height, 1, vec![0x00; row_bytes]));
    let white = doc.add_object(gray_image(width, height, 1, vec![0xff; row_bytes]));
    let mut banded = vec![0x00; row_bytes];
    banded[..2].fill(0xff);
    let banded = doc.add_object(gray_image(width, height, 1, banded));
    let resources = doc.add_object(dictionary! {
        "XObject" => dictionary! { "Im0" => black, "Im1" => white, "Im2" => banded },
    });
    let (w, h) = (width as f32 * 0.3, height as f32 * 0.3);
    let mut draws = |name: &str| {
        let draw = format!("q {w} 0 0 {h} 0 0 cm /{name} Do Q");
        Object::from(doc.add_object(Stream::new(dictionary! {}, draw.into_bytes())))
    };
    // Page 4 lists one part 65 times (a bomb of a million would take as many inflations):
    // not read, so its largest image is shown, the first of those equal in size.
    let white_again = draws("Im1");
    let contents = [draws("Im1"), draws("Im2"), draws("Im0"), Object::Array(vec![white_again; 65])];
    let kids: Vec<Object> = contents
        .into_iter()
        .map(|content| {
            doc.add_object(dictionary! {
                "Type" => "Page", "Parent" => pages, "Contents" => content, "Resources" => resources,
                "MediaBox" => vec![0.into(), 0.into(), w.into(), h.into()],
            })
            .into()
        })
        .collect();
    let tree = dictionary! { "Type" => "Pages", "Kids" => kids, "Count" => 4 };
    doc.objects.insert(pages, Object::Dictionary(tree));
    let catalog = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages });
    doc.trailer.set("Root", catalog);
    let mut pdf = Vec::new();
    doc.save_to(&mut pdf).expect("saved");

    let black_pixels = |page: u32| shown(&pdf, page).black.iter().filter(|&&b| b).count();
    let all = (width * height) as usize;
    assert_eq!(black_pixels(0), 0, "page 1 draws the white image");
    assert_eq!(black_pixels(1), all - width as usize, "page 2 draws the banded one");
    assert_eq!(black_pixels(2), all, "page 3 draws the black one");
    assert_eq!(black_pixels(3), all, "page 4's content is not read");
}

#[test]
fn r_f1_the_kind_of_a_document_is_known_by_its_first_bytes() {
    assert_eq!(DocumentKind::sniff(FINE_G4), Some(DocumentKind::Tiff));
    assert_eq!(DocumentKind::sniff(NORMAL_G3), Some(DocumentKind::Tiff), "big-endian, MM");
    assert_eq!(&NORMAL_G3[..4], b"MM\0*");
    assert_eq!(DocumentKind::sniff(FINE_G4_PDF), Some(DocumentKind::Pdf));
    assert_eq!(DocumentKind::sniff(PAGES[0]), None, "a PNG");
    assert_eq!(DocumentKind::sniff(b"II*"), None);
    assert_eq!(DocumentKind::Tiff.content_type(), "image/tiff");
    assert_eq!(DocumentKind::Pdf.content_type(), "application/pdf");
    assert_eq!(serde_json::to_string(&DocumentKind::Pdf).unwrap(), "\"pdf\"");
}

#[test]
fn r_f1_a_g4_tiff_of_three_pages_shows_each_page_as_drawn() {
    assert_eq!(inspect(FINE_G4).unwrap(), Inspected { kind: DocumentKind::Tiff, pages: 3 });
    assert_shows_the_three_pages(FINE_G4, "G4 (T.6)");
}

#[test]
fn r_f1_a_one_dimensional_g3_tiff_shows_each_page_as_drawn() {
    assert_shows_the_three_pages(FINE_G3, "G3 1-D (T.4 MH)");
}

#[test]
fn r_f1_a_two_dimensional_g3_tiff_is_refused_saying_what_to_do() {
    // The fax crate has no T.4 two-dimensional (MR) decoder: refused when checked, so
    // the record goes to the dead letters with the reason.
    let error = inspect(FINE_G3_2D).unwrap_err();
    assert!(matches!(error, DocumentError::Unsupported { page: 1, .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        concat!(
            "page 1 cannot be shown: T.4 two-dimensional (MR) coding is not supported: ",
            "have the fax server store T.6 (G4) or T.4 one-dimensional"
        )
    );
    assert!(matches!(page_png(FINE_G3_2D, 1), Err(DocumentError::Unsupported { page: 1, .. })));
    assert!(matches!(to_pdf(FINE_G3_2D), Err(DocumentError::Unsupported { page: 1, .. })));
}

#[test]
fn r_f1_a_g3_tiff_with_reversed_bit_order_shows_each_page_as_drawn() {
    assert_shows_the_three_pages(FINE_G3_LSB, "G3 1-D, FillOrder 2, byte-aligned EOLs");
}

#[test]
fn r_f1_a_normal_resolution_fax_shows_each_row_twice() {
    assert_eq!(inspect(NORMAL_G3).unwrap(), Inspected { kind: DocumentKind::Tiff, pages: 1 });
    let seen = shown(NORMAL_G3, 0);
    let truth = picture(NORMAL_PAGE);
    assert_eq!(seen.height, 2 * truth.height, "each row twice");
    for y in 0..truth.height {
        assert_eq!(seen.row(2 * y), seen.row(2 * y + 1), "row {y} is written twice");
    }
    assert_same(&seen.halved(), &truth, "normal resolution, G3 1-D, big-endian");
}

#[test]
fn r_f1_a_black_is_zero_g4_tiff_in_strips_shows_black_on_white() {
    // PhotometricInterpretation 1 and 62 strips of 37 rows, each its own T.6 stream.
    assert_eq!(inspect(BLACK_IS_ZERO_G4).unwrap().pages, 1);
    assert_same(&shown(BLACK_IS_ZERO_G4, 0), &picture(PAGES[1]), "BlackIsZero G4");
}

#[test]
fn r_f1_an_uncompressed_tiff_shows_as_drawn() {
    // Rows 80 to 127 of page 1, Compression 1, BlackIsZero.
    assert_eq!(inspect(BAND_UNCOMPRESSED).unwrap().pages, 1);
    assert_same(&shown(BAND_UNCOMPRESSED, 0), &picture(PAGES[0]).band(80, 128), "uncompressed");
}

#[test]
fn r_f1_a_fax_pdf_of_three_pages_shows_each_page_as_drawn() {
    // tiff2pdf's PDF of the G4 TIFF: CCITTFaxDecode, K -1.
    assert_eq!(inspect(FINE_G4_PDF).unwrap(), Inspected { kind: DocumentKind::Pdf, pages: 3 });
    assert_shows_the_three_pages(FINE_G4_PDF, "PDF");
}

#[test]
fn r_f1_a_pdf_with_black_is_1_shows_black_on_white() {
    // tiff2pdf of the BlackIsZero TIFF: /BlackIs1 true.
    assert_eq!(inspect(BLACK_IS_ZERO_PDF).unwrap().pages, 1);
    assert_same(&shown(BLACK_IS_ZERO_PDF, 0), &picture(PAGES[1]), "PDF, BlackIs1 true");
}

#[test]
fn r_f1_a_flate_compressed_pdf_page_shows_as_drawn() {
    // 1 bit a pixel, 0 black, as DeviceGray has it.
    let truth = picture(PAGES[2]);
    let packed: Vec<u8> = truth
        .black
        .chunks(truth.width as usize)
        .flat_map(|row| {
            row.chunks(8)
                .map(|byte| {
                    byte.iter().enumerate().fold(0xff, |b, (i, &black)| if black { b & !(0x80 >> i) } else { b })
                })
                .collect::<Vec<u8>>()
        })
        .collect();
    let pdf = flate_pdf(truth.width, truth.height, 1, packed);
    assert_eq!(inspect(&pdf).unwrap(), Inspected { kind: DocumentKind::Pdf, pages: 1 });
    assert_same(&shown(&pdf, 0), &truth, "Flate, 1 bit");

    // 8 bits a pixel: every gray comes out as it went in.
    let (width, height) = (256u32, 40u32);
    let gray: Vec<u8> = (0..height).flat_map(|y| (0..width).map(move |x| (x as u8).wrapping_add(y as u8))).collect();
    let png = page_png(&flate_pdf(width, height, 8, gray.clone()), 0).unwrap();
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png.as_slice())).read_info().unwrap();
    let mut shown = vec![0; decoder.output_buffer_size().unwrap()];
    let info = decoder.next_frame(&mut shown).unwrap();
    assert_eq!((info.width, info.height, info.color_type), (width, height, png::ColorType::Grayscale));
    assert_eq!(shown, gray);
}

#[test]
fn r_f1_a_pdf_page_without_a_fax_image_is_kept_but_not_shown() {
    use pdf_writer::{Content, Filter, Finish, Name, Pdf, Rect, Ref};
    let mut pdf = Pdf::new();
    let [catalog, tree, drawn, drawing, photo, jpeg] = [1, 2, 3, 4, 5, 6].map(Ref::new);
    pdf.catalog(catalog).pages(tree);
    pdf.pages(tree).kids([drawn, photo]).count(2);
    // Page 1: a vector drawing, no image.
    pdf.page(drawn).parent(tree).media_box(Rect::new(0.0, 0.0, 595.0, 842.0)).contents(drawing);
    let mut draw = Content::new();
    draw.rect(100.0, 100.0, 200.0, 200.0).fill_nonzero();
    pdf.stream(drawing, &draw.finish());
    // Page 2: only a JPEG image, which a fax page is not.
    let mut page = pdf.page(photo);
    page.parent(tree).media_box(Rect::new(0.0, 0.0, 595.0, 842.0));
    page.resources().x_objects().pair(Name(b"Im0"), jpeg);
    page.finish();
    let mut image = pdf.image_xobject(jpeg, b"\xff\xd8\xff\xd9");
    image.width(8).height(8).bits_per_component(8);
    image.color_space().device_gray();
    image.filter(Filter::DctDecode);
    image.finish();
    let pdf = pdf.finish();

    assert_eq!(inspect(&pdf).unwrap(), Inspected { kind: DocumentKind::Pdf, pages: 2 });
    assert!(matches!(page_png(&pdf, 0), Err(DocumentError::NotAnImagePage { page: 1 })));
    let error = page_png(&pdf, 1).unwrap_err();
    assert!(matches!(error, DocumentError::NotAnImagePage { page: 2 }), "{error:?}");
    assert_eq!(error.to_string(), "page 2 has no fax image to show (no image, or only one of a kind not supported)");
    assert_eq!(to_pdf(&pdf).unwrap(), pdf, "still offered for download");
    // What the site's page of the fax asks (once for all its pages): the same.
    assert_eq!(pdf_pictures(&pdf), [false, false]);
    assert_eq!(pdf_pictures(FINE_G4_PDF), [true, true, true]);
    assert_eq!(pdf_pictures(b"%PDF-1.4 not one"), [] as [bool; 0]);
}

#[test]
fn r_f1_a_pdf_fax_downloads_unchanged() {
    assert_eq!(to_pdf(FINE_G4_PDF).unwrap(), FINE_G4_PDF);
    assert_eq!(to_pdf(BLACK_IS_ZERO_PDF).unwrap(), BLACK_IS_ZERO_PDF);
}

#[test]
fn r_f1_a_tiff_fax_downloads_as_an_a4_pdf_of_the_same_pages() {
    for (tiff, what, a4) in [
        (FINE_G4, "G4, fine", true),
        (NORMAL_G3, "G3, normal", true),
        (BLACK_IS_ZERO_G4, "G4 BlackIsZero in strips", true),
        (BAND_UNCOMPRESSED, "uncompressed band", false),
    ] {
        let pdf = to_pdf(tiff).unwrap_or_else(|e| panic!("{what}: {e}"));
        let pages = inspect(tiff).unwrap().pages;
        let read = lopdf::Document::load_mem(&pdf).unwrap_or_else(|e| panic!("{what}: lopdf: {e}"));
        assert_eq!(read.get_pages().len(), pages as usize, "{what}: pages");
        assert_eq!(inspect(&pdf).unwrap(), Inspected { kind: DocumentKind::Pdf, pages }, "{what}");
        for (number, id) in read.get_pages() {
            let media_box: Vec<f32> = read
                .get_dictionary(id)
                .and_then(|page| page.get(b"MediaBox"))
                .and_then(|b| b.as_array())
                .unwrap()
                .iter()
                .map(|n| n.as_float().unwrap())
                .collect();
            let (width, height) = (media_box[2] - media_box[0], media_box[3] - media_box[1]);
            if a4 {
                // A4 is 595 x 842 pt; a fax page is 215 mm wide, an A4 page long.
                assert!(
                    (590.0..620.0).contains(&width) && (830.0..850.0).contains(&height),
                    "{what}: {width} x {height} pt"
                );
            }
            let page = number - 1;
            assert_same(&shown(&pdf, page), &shown(tiff, page), &format!("{what}: page {number} of the PDF"));
        }
    }
}

#[test]
fn r_f1_what_is_not_a_fax_document_is_refused() {
    assert!(matches!(inspect(b""), Err(DocumentError::Empty)));
    for (bytes, what) in
        [(b"hello, this is not a fax".as_slice(), "text"), (PAGES[0], "a PNG"), (&[0xff; 64][..], "garbage")]
    {
        let error = inspect(bytes).unwrap_err();
        assert!(matches!(error, DocumentError::NotAFaxDocument), "{what}: {error:?}");
        assert_eq!(error.to_string(), "the document is neither a TIFF nor a PDF (by its first bytes)");
        assert!(matches!(page_png(bytes, 0), Err(DocumentError::NotAFaxDocument)), "{what}");
        assert!(matches!(to_pdf(bytes), Err(DocumentError::NotAFaxDocument)), "{what}");
    }
    let error = inspect(b"%PDF-1.4\nnothing else").unwrap_err();
    assert!(matches!(error, DocumentError::Pdf(_)), "{error:?}");
    assert!(error.to_string().starts_with("the PDF file cannot be read: "), "{error}");
}

#[test]
fn r_f1_a_truncated_tiff_is_refused_naming_the_page() {
    // libtiff writes each page's data, then its IFD: cut in the first IFD, in the second.
    let error = inspect(&FINE_G4[..ifd_offset(FINE_G4, 0) + 20]).unwrap_err();
    assert!(matches!(&error, DocumentError::Tiff(m) if m.starts_with("page 1: ")), "{error:?}");
    let error = inspect(&FINE_G4[..ifd_offset(FINE_G4, 1) + 20]).unwrap_err();
    assert!(matches!(&error, DocumentError::Tiff(m) if m.starts_with("page 2: ")), "{error:?}");
    assert!(error.to_string().starts_with("the TIFF file cannot be read: page 2: "), "{error}");
}

#[test]
fn r_f1_a_tiff_whose_data_lies_past_its_end_is_refused() {
    let moved = patch(FINE_G4, 1, 273, 1_000_000);
    let error = inspect(&moved).unwrap_err();
    assert!(matches!(error, DocumentError::Corrupt { page: 2, .. }), "{error:?}");
    assert_eq!(error.to_string(), "page 2 is damaged: strip 1 of 1 lies past the end of the file");
    assert!(matches!(page_png(&moved, 1), Err(DocumentError::Corrupt { page: 2, .. })));
    assert!(page_png(&moved, 0).is_ok(), "page 1 is whole");
}

#[test]
fn r_f1_an_lzw_tiff_is_refused_naming_its_compression() {
    let error = inspect(SMALL_LZW).unwrap_err();
    assert!(matches!(error, DocumentError::Compression { page: 1, found: 5 }), "{error:?}");
    assert_eq!(
        error.to_string(),
        concat!(
            "page 1 is compressed with TIFF compression 5 (LZW), not a fax coding ",
            "(3: CCITT Group 3, 4: CCITT Group 4, or 1: none)"
        )
    );
    assert!(matches!(page_png(SMALL_LZW, 0), Err(DocumentError::Compression { .. })));
    assert!(matches!(to_pdf(SMALL_LZW), Err(DocumentError::Compression { .. })));
}

#[test]
fn r_f1_a_tiff_page_of_an_unknown_bit_order_or_colour_is_refused() {
    let error = inspect(&patch(FINE_G4, 2, 266, 3)).unwrap_err();
    assert_eq!(error.to_string(), "page 3 cannot be shown: its FillOrder is 3, not 1 or 2");
    let error = inspect(&patch(FINE_G4, 0, 258, 8)).unwrap_err();
    assert!(matches!(error, DocumentError::Unsupported { page: 1, .. }), "{error:?}");
    assert!(error.to_string().contains("not black and white"), "{error}");
}

#[test]
fn r_f1_damaged_fax_data_is_refused_naming_the_page_and_row() {
    // All ones are valid T.4 codes (white 7, black 2, ...), 400 bytes of them more than
    // a row: put them in the middle of page 2's strip.
    let strip = u32_at(FINE_G3, ifd_value_at(FINE_G3, 1, 273));
    let middle = strip + u32_at(FINE_G3, ifd_value_at(FINE_G3, 1, 279)) / 2;
    let mut damaged = FINE_G3.to_vec();
    damaged[middle..middle + 400].fill(0xff);
    let error = inspect(&damaged).unwrap_err();
    let DocumentError::Corrupt { page: 2, detail } = &error else { panic!("{error:?}") };
    assert!(
        detail.starts_with("row ") && detail.ends_with("of 2287: the runs add up to more than the page width"),
        "{detail}"
    );
    assert!(page_png(&damaged, 0).is_ok() && page_png(&damaged, 2).is_ok(), "the other pages show");
    assert!(matches!(to_pdf(&damaged), Err(DocumentError::Corrupt { page: 2, .. })));

    // T.6 codes that never finish a row (vertical -1 from the right edge, again and
    // again): stopped long before the input is used up.
    let error = inspect(&ccitt_tiff(4, 1, &bits(&"010".repeat(4000)))).unwrap_err();
    assert_eq!(
        error.to_string(),
        "page 1 is damaged: row 1 of 1: the row goes on for far more codes than its width allows"
    );
}

/// Bits written as text ("0111 011"), packed most significant first, zero-padded.
fn bits(text: &str) -> Vec<u8> {
    let bits: Vec<bool> = text.chars().filter(|c| !c.is_whitespace()).map(|c| c == '1').collect();
    bits.chunks(8).map(|byte| byte.iter().enumerate().fold(0, |b, (i, &one)| b | (u8::from(one) << (7 - i)))).collect()
}

/// A one-page TIFF of `strip` in `compression` (3: T.4, 4: T.6), 8 pixels wide.
fn ccitt_tiff(compression: u32, height: u32, strip: &[u8]) -> Vec<u8> {
    ccitt_tiff_at(compression, height, strip, None)
}

/// [`ccitt_tiff`] with XResolution and YResolution (dots per inch) when `resolution` says.
fn ccitt_tiff_at(compression: u32, height: u32, strip: &[u8], resolution: Option<(u32, u32)>) -> Vec<u8> {
    const LONG: u16 = 4;
    const RATIONAL: u16 = 5;
    let count = if resolution.is_some() { 9 } else { 7 };
    let ifd_end = 8 + 2 + count * 12 + 4;
    let (rationals, strip_at) = match resolution {
        Some(_) => (ifd_end, ifd_end + 16),
        None => (ifd_end, ifd_end),
    };
    let mut entries: Vec<(u16, u16, u32)> = vec![
        (256, LONG, 8),
        (257, LONG, height),
        (258, LONG, 1),
        (259, LONG, compression),
        (262, LONG, 0),
        (273, LONG, strip_at),
        (279, LONG, strip.len() as u32),
    ];
    if resolution.is_some() {
        entries.extend([(282, RATIONAL, rationals), (283, RATIONAL, rationals + 8)]);
    }
    let mut tiff = b"II*\0".to_vec();
    tiff.extend(8u32.to_le_bytes());
    tiff.extend((entries.len() as u16).to_le_bytes());
    for (tag, kind, value) in entries {
        tiff.extend(tag.to_le_bytes());
        tiff.extend(kind.to_le_bytes());
        tiff.extend(1u32.to_le_bytes());
        tiff.extend(value.to_le_bytes());
    }
    tiff.extend(0u32.to_le_bytes());
    if let Some((x, y)) = resolution {
        for dots in [x, y] {
            tiff.extend(dots.to_le_bytes());
            tiff.extend(1u32.to_le_bytes());
        }
    }
    tiff.extend(strip);
    tiff
}

/// R-F1: a "superfine" fax (204 x 391 dpi, a T.30 resolution many machines offer) has
/// rows half as tall as wide: two rows make one of the picture, black where either is,
/// so the page is not shown twice as tall as it is (its PDF already had its shape).
#[test]
fn r_f1_a_superfine_fax_shows_two_rows_as_one() {
    const EOL: &str = "000000000001 ";
    // White 2, black 4, white 2; all white; all white; all black.
    let (drawn, white, black) = ("0111 011 0111 ", "10011 ", "00110101 000101 ");
    let strip = bits(&[EOL, drawn, EOL, white, EOL, white, EOL, black].concat());
    let superfine = ccitt_tiff_at(3, 4, &strip, Some((204, 391)));
    let page = shown(&superfine, 0);
    assert_eq!((page.width, page.height), (8, 2), "four rows shown as two");
    let first = [false, false, true, true, true, true, false, false];
    assert_eq!((page.row(0), page.row(1)), (&first[..], &[true; 8][..]));

    let fine = shown(&ccitt_tiff_at(3, 4, &strip, Some((204, 196))), 0);
    assert_eq!(fine.height, 4, "fine: each row once");
}

#[test]
fn r_f1_a_g3_page_whose_data_ends_early_is_white_below_only_after_rtc() {
    const EOL: &str = "000000000001 ";
    // Row 1: white 2, black 4, white 2. Row 2: white 0, black 8.
    let (row1, row2) = ("0111 011 0111 ", "00110101 000101 ");
    let drawn = [false, false, true, true, true, true, false, false];
    let two_rows = [EOL, row1, EOL, row2].concat();

    // As a TIFF stores it: no RTC after the last row, which still shows.
    let page = shown(&ccitt_tiff(3, 2, &bits(&two_rows)), 0);
    assert_eq!((page.width, page.height), (8, 2));
    assert_eq!((page.row(0), page.row(1)), (&drawn[..], &[true; 8][..]));

    // Four rows declared, two coded, then the fax's RTC: the rest is white.
    let with_rtc = ccitt_tiff(3, 4, &bits(&[two_rows.as_str(), &EOL.repeat(6)].concat()));
    assert_eq!(inspect(&with_rtc).unwrap().pages, 1);
    let page = shown(&with_rtc, 0);
    assert_eq!((page.row(0), page.row(1)), (&drawn[..], &[true; 8][..]));
    assert!(page.band(2, 4).black.iter().all(|&black| !black), "rows 3 and 4 white");

    // Without the RTC the data was cut short.
    let error = inspect(&ccitt_tiff(3, 4, &bits(&two_rows))).unwrap_err();
    assert_eq!(
        error.to_string(),
        "page 1 is damaged: row 3 of 4: the data ends before the page does, with no end-of-page mark"
    );

    // A row must fill the width exactly.
    let error = inspect(&ccitt_tiff(3, 1, &bits(&[EOL, "0111 011"].concat()))).unwrap_err();
    assert_eq!(error.to_string(), "page 1 is damaged: row 1 of 1: the runs add up to less than the page width");
}

#[test]
fn r_f1_a_tiff_page_whose_data_ends_early_is_refused_unless_it_marks_the_end() {
    // Page 1 of the G4 TIFF declared 100 rows longer: its data ends with EOFB (libtiff
    // writes one), so those rows are white.
    let longer = patch(&patch(FINE_G4, 0, 257, 2387), 0, 278, 2387);
    let seen = shown(&longer, 0);
    assert_same(&seen.band(0, 2287), &picture(PAGES[0]), "the rows the data holds");
    assert!(seen.band(2287, 2387).black.iter().all(|&black| !black), "the rest white");
    // Zeroed bytes read as an end mark (the crate takes seven zero bits for one), but
    // the data goes on after it.
    let strip = u32_at(FINE_G4, ifd_value_at(FINE_G4, 1, 273));
    let middle = strip + u32_at(FINE_G4, ifd_value_at(FINE_G4, 1, 279)) / 2;
    let mut zeroed = FINE_G4.to_vec();
    zeroed[middle..middle + 8].fill(0);
    let error = inspect(&zeroed).unwrap_err();
    let DocumentError::Corrupt { page: 2, detail } = &error else { panic!("{error:?}") };
    assert!(detail.ends_with(" of 2287: an end-of-page mark comes in the middle of the data"), "{detail}");
    // A G3 strip has no RTC after its rows (TIFF has none), so the page was cut short.
    let error = inspect(&patch(&patch(FINE_G3, 0, 257, 2387), 0, 278, 2387)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "page 1 is damaged: row 2288 of 2387: the data ends before the page does, with no end-of-page mark"
    );
}

#[test]
fn r_f1_a_pdf_with_a_ccitt_coding_the_decoder_cannot_read_is_kept_but_not_shown() {
    use lopdf::{dictionary, Dictionary};
    // Page 1 of the G3 TIFF: T.4 one-dimensional, an EOL before each row.
    let strip = u32_at(FINE_G3, ifd_value_at(FINE_G3, 0, 273));
    let data = FINE_G3[strip..strip + u32_at(FINE_G3, ifd_value_at(FINE_G3, 0, 279))].to_vec();
    let pdf = |parms: Dictionary| ccitt_pdf(1728, 2287, parms, data.clone());

    let g3 = pdf(dictionary! { "K" => 0, "Columns" => 1728, "Rows" => 2287, "EndOfLine" => true });
    assert_same(&shown(&g3, 0), &picture(PAGES[0]), "PDF, K 0 with EOLs");

    for (parms, detail) in [
        (
            dictionary! { "K" => 1, "Columns" => 1728, "EndOfLine" => true },
            "T.4 two-dimensional (MR) coding is not supported: have the fax server store T.6 (G4) or T.4 \
             one-dimensional",
        ),
        (
            dictionary! { "K" => 0, "Columns" => 1728 },
            "T.4 one-dimensional coding without an EOL before each row (EndOfLine false) is not supported: \
             have the fax server store T.6 (G4) or set EndOfLine",
        ),
        (
            dictionary! { "K" => -1, "Columns" => 1728, "EncodedByteAlign" => true },
            "T.6 with each row byte-aligned (EncodedByteAlign) is not supported: have the fax server write it \
             without",
        ),
    ] {
        let pdf = pdf(parms);
        assert_eq!(inspect(&pdf).unwrap(), Inspected { kind: DocumentKind::Pdf, pages: 1 }, "{detail}");
        let error = page_png(&pdf, 0).unwrap_err();
        assert!(matches!(&error, DocumentError::Unsupported { page: 1, detail: d } if d == detail), "{error:?}");
        assert_eq!(to_pdf(&pdf).unwrap(), pdf, "still offered for download");
    }
}

#[test]
fn r_f1_a_page_past_the_last_is_out_of_range() {
    for document in [FINE_G4, FINE_G4_PDF] {
        let error = page_png(document, 3).unwrap_err();
        assert!(matches!(error, DocumentError::PageOutOfRange { page: 4, pages: 3 }), "{error:?}");
        assert_eq!(error.to_string(), "there is no page 4: the document has 3");
        assert!(matches!(page_png(document, u32::MAX), Err(DocumentError::PageOutOfRange { .. })));
    }
}

#[test]
fn r_f1_documents_beyond_the_limits_are_refused() {
    assert_eq!(inspect(&tiny_tiff(MAX_PAGES, 8, 1)).unwrap().pages, MAX_PAGES);
    let error = inspect(&tiny_tiff(MAX_PAGES + 1, 8, 1)).unwrap_err();
    assert_eq!(error.to_string(), "the document is too large to show: it has more than 1000 pages");
    let error = inspect(&tiny_tiff(1, MAX_WIDTH + 1, 1)).unwrap_err();
    assert!(matches!(error, DocumentError::TooLarge { .. }), "{error:?}");
    let error = inspect(&tiny_tiff(1, 8, MAX_HEIGHT + 1)).unwrap_err();
    assert!(matches!(error, DocumentError::TooLarge { .. }), "{error:?}");
    // 14 of the largest pages, sharing their data, are more than 4 billion pixels.
    let error = inspect(&tiny_tiff(14, MAX_WIDTH, MAX_HEIGHT)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the document is too large to show: its pages up to page 14 have more than 4000000000 pixels"
    );
    // A G4 page that claims fewer rows than its data holds shows those rows only.
    let short = patch(FINE_G4, 0, 257, 100);
    assert_same(&shown(&short, 0), &picture(PAGES[0]).band(0, 100), "the first 100 rows");
}

/// A little-endian TIFF of `pages` uncompressed pages 8 pixels wide and `rows` high,
/// a strip per row, every page pointing at the same strip tables (one offset array, one
/// count array) and the same byte of data.
fn shared_strip_tables(pages: u32, rows: u32) -> Vec<u8> {
    let entries = 8u32;
    let ifd_len = 2 + 12 * entries + 4;
    let offsets_at = 8 + ifd_len * pages;
    let counts_at = offsets_at + 4 * rows;
    let data_at = counts_at + 4 * rows;
    let mut tiff = b"II*\0".to_vec();
    tiff.extend(8u32.to_le_bytes());
    for page in 0..pages {
        tiff.extend((entries as u16).to_le_bytes());
        let fields: [(u16, u32, u32); 8] = [
            (256, 1, 8),
            (257, 1, rows),
            (258, 1, 1),
            (259, 1, 1),
            (262, 1, 0),
            (273, rows, offsets_at),
            (278, 1, 1),
            (279, rows, counts_at),
        ];
        for (tag, count, value) in fields {
            tiff.extend(tag.to_le_bytes());
            tiff.extend(4u16.to_le_bytes());
            tiff.extend(count.to_le_bytes());
            tiff.extend(value.to_le_bytes());
        }
        let next = if page + 1 < pages { 8 + ifd_len * (page + 1) } else { 0 };
        tiff.extend(next.to_le_bytes());
    }
    (0..rows).for_each(|_| tiff.extend(data_at.to_le_bytes()));
    (0..rows).for_each(|_| tiff.extend(1u32.to_le_bytes()));
    tiff.push(0);
    tiff
}

/// R-F1, bounded work: a TIFF of a few hundred KB whose pages all point at one table of
/// 30 000 strips held, for each reading of it (the intake's, every page image the site
/// draws), 16 bytes per strip per page: 96 MB here, 480 MB for a thousand pages. Strip
/// tables larger than the file could hold are refused; an honest file with a strip per
/// row still reads.
#[test]
fn r_f1_pages_that_share_strip_tables_larger_than_the_file_are_refused() {
    let crafted = shared_strip_tables(200, 30_000);
    assert!(crafted.len() < 1 << 20);
    let error = inspect(&crafted).unwrap_err();
    assert!(error.to_string().contains("strips"), "{error}");
    let honest = shared_strip_tables(1, 30_000);
    assert_eq!(inspect(&honest).unwrap().pages, 1);
}

/// R-F1: a TIFF whose thousand pages share one dense strip (a record under 1 MB) would
/// make a PDF of about 1.5 GB; it is given up once past its bound, a page after it.
#[test]
fn r_f1_a_pdf_is_given_up_past_its_bound_however_many_pages_share_their_data() {
    let dense = testkit::fax::checkered_tiff(MAX_PAGES, 1728, 2296);
    assert!(dense.len() < 1 << 20);
    assert_eq!(inspect(&dense).unwrap().pages, MAX_PAGES);
    let error = super::to_pdf(&dense, 4 << 20).unwrap_err();
    assert_eq!(error.to_string(), "the document is too large to show: its PDF is larger than 4194304 bytes");
    let one = testkit::fax::checkered_tiff(1, 1728, 2296);
    assert!(super::to_pdf(&one, 4 << 20).is_ok(), "one such page fits");
    assert!(matches!(super::to_pdf(FINE_G4_PDF, 100), Err(DocumentError::TooLarge { .. })), "a PDF as it came, too");
}

#[test]
fn r_f1_mutated_documents_never_panic() {
    // Deterministic: a xorshift generator with a fixed seed.
    let mut state = 0x9e37_79b9_u32;
    let mut next = move |below: usize| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state as usize % below.max(1)
    };
    let documents =
        [FINE_G4, NORMAL_G3, BLACK_IS_ZERO_G4, BAND_UNCOMPRESSED, SMALL_LZW, FINE_G4_PDF, BLACK_IS_ZERO_PDF];
    let mut variants = 0;
    for document in documents {
        // The first IFD (or the PDF's end, its cross-reference table): where a flip
        // changes structure rather than pixels.
        let structure = match &document[..2] {
            b"II" => u32::from_le_bytes(document[4..8].try_into().unwrap()) as usize,
            b"MM" => u32::from_be_bytes(document[4..8].try_into().unwrap()) as usize,
            _ => document.len().saturating_sub(400),
        };
        for variant in 0..48 {
            let mut bytes = document.to_vec();
            let near_structure = (structure + next(400)).min(bytes.len() - 1);
            match variant % 6 {
                0 => bytes.truncate(next(bytes.len())),
                1 => {
                    let at = next(bytes.len());
                    bytes[at] ^= 1 << next(8);
                }
                2 => bytes[near_structure] ^= 1 << next(8),
                3 => bytes[near_structure] = [0, 0xff, 1, 0x80][next(4)],
                4 => {
                    let at = next(bytes.len());
                    let end = (at + 1 + next(32)).min(bytes.len());
                    let value = next(256) as u8;
                    bytes[at..end].fill(value);
                }
                _ => (0..8).for_each(|_| {
                    let at = next(bytes.len());
                    bytes[at] = next(256) as u8;
                }),
            }
            let _ = inspect(&bytes);
            let _ = page_png(&bytes, 0);
            let _ = page_png(&bytes, next(4) as u32);
            let _ = to_pdf(&bytes);
            variants += 1;
        }
    }
    assert_eq!(variants, 336);
}
