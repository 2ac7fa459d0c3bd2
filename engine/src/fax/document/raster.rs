//! Decoded pages in memory, and the PNG the site shows of them.

use super::{DocumentError, MAX_HEIGHT};

/// A bilevel page, packed eight pixels a byte, most significant bit first, 1 for black
/// (whatever the source's polarity was), each row padded to whole bytes.
#[derive(Debug)]
pub(super) struct Bitmap {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl Bitmap {
    /// An all-white page. The caller has checked the size against the limits, which keep
    /// it under 40 MB.
    pub fn white(width: u32, height: u32) -> Self {
        Bitmap { width, height, data: vec![0; stride(width).saturating_mul(height as usize)] }
    }

    pub fn stride(&self) -> usize {
        stride(self.width)
    }

    pub fn rows(&self) -> impl Iterator<Item = &[u8]> {
        self.data.chunks(self.stride().max(1))
    }

    /// Paints row `y` black where `changes` say, the columns at which the colour changes
    /// (white first) as the `fax` crate's decoders give them and `fax::decoder::pels`
    /// reads them, in order (`ccitt` has checked): span by span rather than pixel by pixel,
    /// which is several times faster.
    pub fn paint(&mut self, y: u32, changes: &[u16]) {
        let stride = self.stride();
        let Some(row) =
            self.data.get_mut((y as usize).saturating_mul(stride)..).and_then(|rest| rest.get_mut(..stride))
        else {
            return;
        };
        for span in changes.chunks(2) {
            let (start, end) = match *span {
                [start, end] => (u32::from(start), u32::from(end)),
                [start] => (u32::from(start), self.width),
                _ => continue,
            };
            fill(row, start.min(self.width) as usize, end.min(self.width) as usize);
        }
    }

    /// Swaps black and white, for sources whose 1 bits are white.
    pub fn invert(&mut self) {
        self.data.iter_mut().for_each(|b| *b = !*b);
        self.clear_padding();
    }

    /// Zeroes the bits past the width at the end of each row, so equal pictures compare
    /// equal and PNG padding stays clean.
    pub fn clear_padding(&mut self) {
        let used = self.width % 8;
        if used == 0 {
            return;
        }
        let mask = 0xffu8 << (8 - used);
        let stride = self.stride();
        for row in self.data.chunks_mut(stride.max(1)) {
            if let Some(last) = row.last_mut() {
                *last &= mask;
            }
        }
    }
}

fn stride(width: u32) -> usize {
    (width as usize).div_ceil(8)
}

/// Sets bits `start..end` of a packed row.
fn fill(row: &mut [u8], start: usize, end: usize) {
    let mut x = start;
    while x < end {
        let Some(byte) = row.get_mut(x / 8) else { return };
        if x.is_multiple_of(8) && end - x >= 8 {
            *byte = 0xff;
            x += 8;
        } else {
            *byte |= 0x80 >> (x % 8);
            x += 1;
        }
    }
}

/// An 8-bit grayscale page (0 black, 255 white), from PDFs whose page is a gray image.
#[derive(Debug)]
pub(super) struct Gray {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// A decoded page.
#[derive(Debug)]
pub(super) enum Raster {
    Bilevel(Bitmap),
    Gray(Gray),
}

/// The page as a PNG whose pixels come out square ([`Rows`]).
pub(super) fn png(raster: &Raster, rows: Rows) -> Result<Vec<u8>, DocumentError> {
    let (width, height, depth) = match raster {
        Raster::Bilevel(bitmap) => (bitmap.width, bitmap.height, png::BitDepth::One),
        Raster::Gray(gray) => (gray.width, gray.height, png::BitDepth::Eight),
    };
    let merge = rows.merge.max(1);
    // Never taller than the tallest page we decode, whatever the resolution claims.
    let repeat = if merge > 1 { 1 } else { rows.repeat.clamp(1, (MAX_HEIGHT / height.max(1)).max(1)) };
    let tall = height.div_ceil(merge).checked_mul(repeat).ok_or_else(|| encode_error("the page is too tall"))?;
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, tall);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(depth);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header().map_err(|e| encode_error(&e.to_string()))?;
    let mut stream = writer.stream_writer().map_err(|e| encode_error(&e.to_string()))?;
    let mut put = |row: &[u8]| {
        (0..repeat)
            .try_for_each(|_| std::io::Write::write_all(&mut stream, row))
            .map_err(|e| encode_error(&e.to_string()))
    };
    let merge = merge as usize;
    match raster {
        // PNG's 1-bit gray has 0 for black: the bitmap's bits, inverted; rows merged
        // are black where any of them is.
        Raster::Bilevel(bitmap) => {
            let stride = bitmap.stride().max(1);
            bitmap.data.chunks(stride * merge).try_for_each(|group| {
                let mut row = vec![0u8; stride];
                group.chunks(stride).for_each(|one| row.iter_mut().zip(one).for_each(|(to, b)| *to |= b));
                row.iter_mut().for_each(|b| *b = !*b);
                put(&row)
            })?
        }
        Raster::Gray(gray) => {
            let stride = (gray.width as usize).max(1);
            gray.data.chunks(stride * merge).try_for_each(|group| {
                let mut row = vec![u8::MAX; stride];
                group.chunks(stride).for_each(|one| row.iter_mut().zip(one).for_each(|(to, v)| *to = (*to).min(*v)));
                put(&row)
            })?
        }
    }
    stream.finish().map_err(|e| encode_error(&e.to_string()))?;
    writer.finish().map_err(|e| encode_error(&e.to_string()))?;
    Ok(out)
}

fn encode_error(detail: &str) -> DocumentError {
    DocumentError::Encode(detail.to_owned())
}

/// How a page's rows become the picture's, so that its pixels come out square: each row
/// written `repeat` times (2 for "normal", 204 x 98 dpi, whose rows are twice as tall as
/// wide), or `merge` rows made one, black where any of them is (2 for "superfine", 204 x
/// 391); 1 and 1 for "fine" (204 x 196) and anything near square.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rows {
    pub repeat: u32,
    pub merge: u32,
}

/// A page's resolution in dots per inch, across and down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Resolution {
    pub x: f32,
    pub y: f32,
}

impl Resolution {
    /// Fax "fine": what a page that does not say is taken to be.
    pub const FINE: Resolution = Resolution { x: 204.0, y: 196.0 };

    /// How its rows become the picture's so the pixels come out square.
    pub fn rows(self) -> Rows {
        // At most 4: no fax resolution is further from square.
        let steps = |ratio: f32| if ratio.is_finite() && ratio >= 1.5 { ratio.round().min(4.0) as u32 } else { 1 };
        Rows { repeat: steps(self.x / self.y), merge: steps(self.y / self.x) }
    }

    /// The page's size in PDF points (1/72 inch) for an image of `width` x `height`.
    pub fn points(self, width: u32, height: u32) -> (f32, f32) {
        (width as f32 * 72.0 / self.x, height as f32 * 72.0 / self.y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_painted_as_the_fax_crate_reads_its_changes() {
        let width = 20u16;
        // T.6 rows list the changes inside the row; T.4 rows (the crate counts every run)
        // end with the width; runs of 0 repeat a column; an odd count ends black.
        for changes in [&[][..], &[0], &[5], &[3, 9], &[3, 9, 20], &[0, 0, 7, 7, 20], &[1, 8, 8, 16], &[19]] {
            let mut bitmap = Bitmap::white(u32::from(width), 1);
            bitmap.paint(0, changes);
            let painted: Vec<bool> =
                (0..usize::from(width)).map(|x| bitmap.data[x / 8] & (0x80 >> (x % 8)) != 0).collect();
            let read: Vec<bool> = fax::decoder::pels(changes, width).map(|c| c == fax::Color::Black).collect();
            assert_eq!(painted, read, "{changes:?}");
        }
    }
}
