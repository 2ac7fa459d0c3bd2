//! CCITT fax coding, by the `fax` crate: its decoders read T.4 one-dimensional (Group 3,
//! Modified Huffman) and T.6 (Group 4) data, its encoder writes the T.6 of the PDFs we
//! make. T.4 two-dimensional (Modified READ) data is refused before it gets here (the
//! crate cannot decode it, [`TWO_DIMENSIONAL`]), and so is T.4 without an EOL before
//! each row (the crate finds rows by their EOLs).
//!
//! What is ours is the check of what the crate hands back, so damaged or hostile data
//! ends in a [`Damage`] naming the row: every T.4 row must add up to exactly the page
//! width and no row may change colour past it or backwards; never more than the declared
//! rows are asked for; a page whose data stops early is only taken (the rest white, as
//! encoders may leave trailing white rows out) when the crate finds its end mark (RTC in
//! T.4, EOFB in T.6) where its data ends. The crate's decoders consume at least one bit
//! of input a step or fail, so the work is bounded by the input's size and the declared
//! rows; the input each row may read is bounded too ([`row_budget`]).

use std::cell::Cell;
use std::convert::Infallible;

use fax::decoder::{DecodeError, DecodeStatus, Group3Decoder, Group4Decoder};
use fax::{Color, VecWriter};

/// Why the crate cannot take T.4 two-dimensional data, worded for the operator who reads
/// the dead letter.
pub(super) const TWO_DIMENSIONAL: &str =
    "T.4 two-dimensional (MR) coding is not supported: have the fax server store T.6 (G4) or T.4 one-dimensional";

/// How the rows of a CCITT stream are coded: the two the `fax` crate decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Coding {
    /// T.4 one-dimensional (Modified Huffman), an EOL before (or after) each row.
    G3,
    /// T.6 (Modified Modified READ): every row against the row above, no EOLs.
    G4,
}

/// What a CCITT stream needs to be decoded besides its bytes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Params {
    pub coding: Coding,
    pub width: u32,
    pub rows: u32,
    /// TIFF FillOrder 2: the first bit of each byte is its least significant.
    pub reversed: bool,
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

/// A T.4 RTC (return to control): six EOLs, `000000000001` each.
///
/// A TIFF strip has none after its last row (TIFF marks no end of page), but the crate's
/// Group 3 decoder only gives a row once the EOL after it has come, so without it the
/// last row would be lost; the crate skips zero bits before an EOL as fill bits, so it
/// also follows data that ends mid-byte. A strip that carries its own RTC ends there and
/// this one is never read.
const RTC: [u8; 9] = [0x00, 0x10, 0x01, 0x00, 0x10, 0x01, 0x00, 0x10, 0x01];

/// A T.6 EOFB (end of facsimile block): two EOLs. The crate's code tables look a few bits
/// past the code they read, so without something after it a last row whose code ends the
/// data (an encoder that writes no EOFB) would not decode.
const EOFB: [u8; 6] = [0x00, 0x10, 0x01, 0x00, 0x10, 0x01];

/// How many bytes of the data may follow the end mark the crate finds before the
/// declared rows, for that to be the page's end: the rest of the mark (the crate reads
/// only the first EOL of an EOFB) and an encoder's padding. Damage is not: the crate takes
/// seven zero bits where a T.6 row should start for the mark (a whole EOL is twelve), so a
/// few zeroed bytes in the middle would otherwise cut the page short unnoticed.
const AFTER_END_MARK: usize = 64;

const TOO_WIDE: &str = "the runs add up to more than the page width";

/// The most bytes the crate may read for one row of `width` pixels: 32 bits a column,
/// more than twice what the costliest row needs (a one-pixel run in every column, at most
/// 12 bits each), and room for an EOL and its fill. The crate collects a row's changes
/// until the row is done, so data that never finishes a row (codes that move back and
/// forth) would otherwise grow that list with the whole input.
fn row_budget(width: u16) -> usize {
    usize::from(width) * 4 + 64
}

/// Decodes `params.rows` rows of `data`, handing each to `on_row` with its number
/// (counted from 0) and the columns at which its colour changes, white first, in order
/// and within the width (as `fax::decoder::pels` reads them). Rows after the page's end
/// mark are white and not handed on.
pub(super) fn decode(data: &[u8], params: Params, mut on_row: impl FnMut(u32, &[u16])) -> Result<(), Damage> {
    let mark: &[u8] = match params.coding {
        Coding::G3 => &RTC,
        Coding::G4 => &EOFB,
    };
    match run(data, mark, params, &mut on_row)? {
        Ended::AllRows => Ok(()),
        // The end the crate found may be the mark added above, not the data's own: only
        // when the data alone ends at the same row did the encoder end the page there.
        Ended::Early { rows, .. } => match run(data, &[], params, &mut |_: u32, _: &[u16]| {}) {
            Ok(Ended::Early { rows: alone, unread }) if alone == rows && unread <= AFTER_END_MARK => Ok(()),
            Ok(Ended::Early { rows: alone, .. }) if alone == rows => {
                Err(Damage { row: rows, what: "an end-of-page mark comes in the middle of the data" })
            }
            _ => Err(Damage { row: rows, what: "the data ends before the page does, with no end-of-page mark" }),
        },
    }
}

/// How a run of the decoder over a page's rows ended.
enum Ended {
    AllRows,
    /// At an end mark, after `rows` rows, `unread` bytes of the data not yet read.
    Early {
        rows: u32,
        unread: usize,
    },
}

/// Decodes `data` followed by `mark`, row by row, until `params.rows` rows or the end.
fn run(data: &[u8], mark: &[u8], params: Params, on_row: &mut dyn FnMut(u32, &[u16])) -> Result<Ended, Damage> {
    let damage = |row, what| Damage { row, what };
    let width = u16::try_from(params.width).map_err(|_| damage(0, TOO_WIDE))?;
    let reversed = params.reversed;
    // Bytes of `data` the crate has read; bytes it may still read for the current row,
    // and whether it wanted more (then the input ends for it).
    let read = Cell::new(0usize);
    let (budget, over_budget) = (Cell::new(row_budget(width)), Cell::new(false));
    let input = data
        .iter()
        .inspect(|_| read.set(read.get() + 1))
        .map(move |&byte| if reversed { byte.reverse_bits() } else { byte })
        .chain(mark.iter().copied())
        .take_while(|_| {
            let left = budget.get();
            budget.set(left.saturating_sub(1));
            over_budget.set(left == 0);
            left > 0
        })
        .map(Ok::<u8, Infallible>);
    let mut decoder = match params.coding {
        Coding::G3 => {
            Decoder::G3(Group3Decoder::new(input).map_err(|_| damage(0, "the data does not start with an EOL"))?)
        }
        Coding::G4 => Decoder::G4(Group4Decoder::new(input, width).unwrap_or_else(|never| match never {})),
    };
    let mut row = 0;
    while row < params.rows {
        let step = decoder.step(width);
        if over_budget.get() {
            return Err(damage(row, "the row goes on for far more codes than its width allows"));
        }
        budget.set(row_budget(width));
        let step = step.map_err(|what| damage(row, what))?;
        if let Some(changes) = step.row {
            check(changes, width, params.coding).map_err(|what| damage(row, what))?;
            on_row(row, changes);
            row += 1;
        }
        if step.end && row < params.rows {
            return Ok(Ended::Early { rows: row, unread: data.len().saturating_sub(read.get()) });
        }
    }
    Ok(Ended::AllRows)
}

/// The crate's decoder of either coding.
enum Decoder<R> {
    G3(Group3Decoder<R>),
    G4(Group4Decoder<R>),
}

/// What one step of a decoder gives: a row, the page's end, or both (in T.4 the RTC ends
/// the step of the row before it).
struct Step<'a> {
    row: Option<&'a [u16]>,
    end: bool,
}

impl<R: Iterator<Item = Result<u8, Infallible>>> Decoder<R> {
    fn step(&mut self, width: u16) -> Result<Step<'_>, &'static str> {
        match self {
            Decoder::G3(decoder) => {
                let status = match decoder.advance() {
                    Ok(status) => status,
                    // The crate fails a row whose runs overflow its counter, far past any width.
                    Err(_) if decoder.transitions().iter().any(|&at| at > width) => return Err(TOO_WIDE),
                    Err(_) => return Err("a code is not valid T.4, or no EOL follows the row"),
                };
                // No changes at all is an EOL with no row before it (two EOLs in a row), a
                // T.4 row has at least the one at its right edge.
                let row = Some(decoder.transitions()).filter(|changes| !changes.is_empty());
                Ok(Step { row, end: status == DecodeStatus::End })
            }
            Decoder::G4(decoder) => match decoder.advance() {
                Ok(DecodeStatus::Incomplete) => Ok(Step { row: Some(decoder.transition()), end: false }),
                Ok(DecodeStatus::End) => Ok(Step { row: None, end: true }),
                Err(DecodeError::Unsupported) => Err("it switches to uncompressed mode, which is not supported"),
                Err(DecodeError::Invalid) => Err("a code is not valid T.6, or the data ends in the middle of the row"),
                Err(DecodeError::Reader(never)) => match never {},
            },
        }
    }
}

/// Checks a decoded row: its changes of colour go left to right and stay within the
/// width; a T.4 row's last is its right edge (the crate counts every run, the last one
/// included, where T.6 rows list only the changes inside the row).
fn check(changes: &[u16], width: u16, coding: Coding) -> Result<(), &'static str> {
    if changes.windows(2).any(|pair| pair[1] < pair[0]) {
        return Err("a change lies left of the one before it");
    }
    match changes.last() {
        Some(&last) if last > width => Err(TOO_WIDE),
        Some(&last) if coding == Coding::G3 && last < width => Err("the runs add up to less than the page width"),
        _ => Ok(()),
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
