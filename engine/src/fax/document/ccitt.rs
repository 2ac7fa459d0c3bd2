//! CCITT T.4 (Group 3, one- and two-dimensional) and T.6 (Group 4) decoding, and the
//! Group 4 encoding of the PDFs we write.
//!
//! The decoder is our own, built on the `fax` crate's code tables, because the crate's
//! own decoders cannot take every fax a server stores: its Group 3 decoder knows no
//! two-dimensional (MR) rows, drops a page's last row when no EOL follows it, and neither
//! decoder can say which row is damaged. One decoder for all three codings also gives
//! one set of bounds: every row must add up to exactly the page width, and never more
//! than the declared rows are produced, so damaged or hostile data ends in an error, never
//! in a panic, an endless loop or an unbounded allocation. Each step consumes at least
//! one bit of input, so the work is bounded by the input's size and the declared rows.

use fax::maps::{black, mode, white, Mode};
use fax::{BitReader, Color, VecWriter};

/// How the rows of a CCITT stream are coded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Coding {
    /// T.4 one-dimensional (Modified Huffman): each row alone, usually after an EOL.
    G3OneD,
    /// T.4 two-dimensional (Modified READ): a tag bit before each row, after its EOL, says
    /// whether it is coded alone or against the row above.
    G3TwoD,
    /// T.6 (Modified Modified READ): every row against the row above, no EOLs.
    G4,
}

/// What a CCITT stream needs to be decoded besides its bytes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Params {
    pub coding: Coding,
    pub width: u32,
    pub rows: u32,
    /// Each row starts on a byte boundary (PDF's EncodedByteAlign).
    pub byte_align: bool,
}

/// Where and how a CCITT stream is damaged.
#[derive(Debug)]
pub(super) struct Damage {
    /// The row that does not decode, counted from 0 in the stream.
    pub row: u32,
    pub what: &'static str,
}

impl Damage {
    /// For an error message, of a stream that holds a page's rows from `first_row` on.
    pub fn describe(&self, first_row: u32, page_rows: u32) -> String {
        let row = u64::from(first_row) + u64::from(self.row) + 1;
        format!("row {row} of {page_rows}: {}", self.what)
    }
}

/// Decodes `params.rows` rows of `data`, handing each to `on_row` as the columns at which
/// the colour changes, the first change being from white to black. A page that ends early
/// with its end mark (RTC in T.4, EOFB in T.6) gets white rows for the rest, as encoders
/// may leave trailing white rows out.
pub(super) fn decode(data: &[u8], params: Params, mut on_row: impl FnMut(&[u32])) -> Result<(), Damage> {
    let mut bits = Bits { data, pos: 0 };
    let mut reference = Vec::new();
    let mut current = Vec::new();
    for row in 0..params.rows {
        match decode_row(&mut bits, params, &reference, &mut current) {
            Ok(true) => {
                on_row(&current);
                std::mem::swap(&mut reference, &mut current);
            }
            Ok(false) => {
                (row..params.rows).for_each(|_| on_row(&[]));
                return Ok(());
            }
            Err(what) => return Err(Damage { row, what }),
        }
    }
    Ok(())
}

/// Decodes one row into `out`; `Ok(false)` when the page's end mark comes instead.
fn decode_row(bits: &mut Bits, params: Params, reference: &[u32], out: &mut Vec<u32>) -> Result<bool, &'static str> {
    out.clear();
    if params.coding == Coding::G4 {
        if params.byte_align {
            bits.align();
        }
        return row_2d(bits, params.width, reference, out);
    }
    let mut eols = 0u32;
    let mut tag = None;
    while bits.eol() {
        eols = eols.saturating_add(1);
        if params.coding == Coding::G3TwoD {
            tag = bits.bit();
        }
    }
    // RTC is six EOLs; fewer followed only by padding ends a page just as well.
    if eols >= 6 || (eols > 0 && bits.rest_is_padding()) {
        return Ok(false);
    }
    if eols == 0 && params.byte_align {
        bits.align();
    }
    let one_d = match params.coding {
        Coding::G3TwoD => tag.or_else(|| bits.bit()).ok_or("the data ends before the row")?,
        _ => true,
    };
    if one_d {
        row_1d(bits, params.width, out).map(|()| true)
    } else {
        row_2d(bits, params.width, reference, out)
    }
}

/// A one-dimensional row: alternating white and black runs that fill the width exactly.
fn row_1d(bits: &mut Bits, width: u32, out: &mut Vec<u32>) -> Result<(), &'static str> {
    let mut a0 = 0u32;
    let mut color = Color::White;
    while a0 < width {
        a0 = a0.checked_add(run(bits, color, width)?).ok_or(TOO_WIDE)?;
        if a0 > width {
            return Err(TOO_WIDE);
        }
        change(out, a0, width)?;
        color = !color;
    }
    Ok(())
}

/// A two-dimensional row, coded against `reference` (the row above, white for the first).
/// `Ok(false)` when it starts with the end mark (T.6's EOFB).
fn row_2d(bits: &mut Bits, width: u32, reference: &[u32], out: &mut Vec<u32>) -> Result<bool, &'static str> {
    // `None` is T.6's imaginary white pixel just left of the row.
    let mut a0: Option<u32> = None;
    let mut color = Color::White;
    // The first change in `reference` right of a0: the search for b1 only moves right.
    let mut lo = 0;
    let at = |i: usize| reference.get(i).copied().unwrap_or(width);
    loop {
        let pos = a0.unwrap_or(0);
        if a0.is_some() {
            if pos >= width {
                return Ok(true);
            }
            while lo < reference.len() && at(lo) <= pos {
                lo += 1;
            }
        }
        // b1 is a change to the colour opposite a0's: changes to black sit at even indices.
        let b1_index = if (lo % 2 == 0) == (color == Color::White) { lo } else { lo + 1 };
        let (b1, b2) = (at(b1_index), at(b1_index + 1));
        match mode::decode(bits).ok_or("a code is not valid T.6")? {
            Mode::Pass => a0 = Some(b2),
            Mode::Horizontal => {
                let a1 = pos.checked_add(run(bits, color, width)?).ok_or(TOO_WIDE)?;
                let a2 = a1.checked_add(run(bits, !color, width)?).ok_or(TOO_WIDE)?;
                if a2 > width {
                    return Err(TOO_WIDE);
                }
                change(out, a1, width)?;
                change(out, a2, width)?;
                a0 = Some(a2);
            }
            Mode::Vertical(delta) => {
                let a1 = i64::from(b1) + i64::from(delta);
                let a1 = u32::try_from(a1).map_err(|_| "a change lies left of the row")?;
                if a1 > width {
                    return Err(TOO_WIDE);
                }
                if a0.is_some_and(|a0| a1 < a0) {
                    return Err("a change lies left of the one before it");
                }
                change(out, a1, width)?;
                a0 = Some(a1);
                color = !color;
            }
            Mode::Extension => return Err("it switches to uncompressed mode, which is not supported"),
            Mode::EOF if a0.is_none() => return Ok(false),
            Mode::EOF => return Err("an EOL comes in the middle of the row"),
        }
    }
}

const TOO_WIDE: &str = "the runs add up to more than the page width";

/// Notes a change of colour at `at`, unless it is the row's right edge.
fn change(out: &mut Vec<u32>, at: u32, width: u32) -> Result<(), &'static str> {
    if at < width {
        // A row has at most one change per column; more means the data runs in place.
        if out.len() > width as usize {
            return Err("the row changes colour more often than it has columns");
        }
        out.push(at);
    }
    Ok(())
}

/// One run length of `color`: make-up codes (multiples of 64) and a terminating code.
fn run(bits: &mut Bits, color: Color, width: u32) -> Result<u32, &'static str> {
    let mut total = 0u32;
    loop {
        let code = match color {
            Color::White => white::decode(bits),
            Color::Black => black::decode(bits),
        }
        .ok_or("a run-length code is not valid (or the data ends)")?;
        total = total.checked_add(u32::from(code)).ok_or(TOO_WIDE)?;
        if code < 64 {
            return Ok(total);
        }
        if total > width {
            return Err(TOO_WIDE);
        }
    }
}

/// The input, read a bit at a time, most significant bit first.
struct Bits<'a> {
    data: &'a [u8],
    /// Bits consumed.
    pos: usize,
}

impl Bits<'_> {
    fn len(&self) -> usize {
        self.data.len().saturating_mul(8)
    }

    fn bit(&mut self) -> Option<bool> {
        let bit = self.peek(1)?;
        self.consume(1).ok()?;
        Some(bit == 1)
    }

    /// Skips to the next byte boundary.
    fn align(&mut self) {
        self.pos = self.pos.div_ceil(8).saturating_mul(8).min(self.len());
    }

    /// Consumes an EOL (eleven or more zeros, then a one: fill bits may lengthen the
    /// zeros) if one comes next.
    fn eol(&mut self) -> bool {
        let start = self.pos;
        while self.peek(1) == Some(0) {
            self.pos += 1;
        }
        if self.pos - start >= 11 && self.peek(1) == Some(1) {
            self.pos += 1;
            return true;
        }
        self.pos = start;
        false
    }

    /// Whether nothing but zero bits is left.
    fn rest_is_padding(&self) -> bool {
        let byte = self.pos / 8;
        let partial = self.data.get(byte).map_or(0, |b| b & (0xff >> (self.pos % 8)));
        partial == 0 && self.data.get(byte + 1..).is_none_or(|rest| rest.iter().all(|&b| b == 0))
    }
}

impl BitReader for Bits<'_> {
    type Error = ();

    /// The next `bits` bits (at most 16), padded with zeros past the end of the data as
    /// long as at least one bit is left: the code tables look ahead further than the
    /// shortest codes, and a stream may end right after one.
    fn peek(&self, bits: u8) -> Option<u16> {
        if bits > 16 || self.pos >= self.len() {
            return None;
        }
        let byte = self.pos / 8;
        let window = (0..3).fold(0u32, |w, i| w << 8 | u32::from(self.data.get(byte + i).copied().unwrap_or(0)));
        let shift = 24 - (self.pos % 8) - usize::from(bits);
        Some(((window >> shift) & ((1u32 << bits) - 1)) as u16)
    }

    fn consume(&mut self, bits: u8) -> Result<(), ()> {
        let pos = self.pos.checked_add(usize::from(bits)).ok_or(())?;
        if pos > self.len() {
            return Err(());
        }
        self.pos = pos;
        Ok(())
    }

    fn bits_to_byte_boundary(&self) -> u8 {
        ((8 - self.pos % 8) % 8) as u8
    }
}

/// Encodes rows of pixels (`true` is black) as T.6, the most compact coding a PDF reader
/// takes (CCITTFaxDecode, K -1). `width` is at most [`super::MAX_WIDTH`].
pub(super) fn encode_g4<'a>(width: u16, rows: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut encoder = fax::encoder::Encoder::new(VecWriter::new());
    for row in rows {
        let pels = (0..usize::from(width)).map(|x| {
            let byte = row.get(x / 8).copied().unwrap_or(0);
            if byte & (0x80 >> (x % 8)) != 0 {
                Color::Black
            } else {
                Color::White
            }
        });
        // VecWriter's error type is Infallible.
        encoder.encode_line(pels, width).unwrap_or_else(|never| match never {});
    }
    encoder.finish().unwrap_or_else(|never| match never {}).finish()
}
