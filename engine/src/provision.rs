//! Provisioning: lines, numbers and (optionally) settings from JSON Lines (R-L1, R-L3).
//!
//! One line of input describes one whole line (回線):
//!
//! ```json
//! {"contract":"0312345678","numbers":[{"number":"0312345678","services":["call"],
//!   "settings":{"enabled":true,"destinations":[{"address":"a@example.jp","send":true}]}}]}
//! ```
//!
//! Import is an idempotent upsert. A bad input line is reported with its line number
//! and reason and is not applied; every other line is.

use std::collections::HashSet;
use std::io::BufRead;

use crate::phone::PhoneNumber;
use crate::store::{AuthUnit, CallSettings, LineRecord, Services, Store, StoreError};

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LineInput {
    /// 契約番号; must be one of `numbers`.
    contract: PhoneNumber,
    #[serde(default)]
    unit: Option<AuthUnit>,
    numbers: Vec<NumberInput>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NumberInput {
    number: PhoneNumber,
    #[serde(default)]
    services: Vec<Service>,
    /// Absent: the number keeps the settings it has (a subscriber's own saves survive
    /// a re-import).
    #[serde(default)]
    settings: Option<CallSettings>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Service {
    Call,
    Fax,
}

/// The outcome of one import.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Input lines applied.
    pub lines: usize,
    /// Phone numbers in the applied lines.
    pub numbers: usize,
    /// (1-based input line number, reason) of each line not applied, the first
    /// [`MAX_LISTED`] of them.
    pub rejected: Vec<(usize, String)>,
    /// Lines rejected beyond those listed.
    pub rejected_not_listed: usize,
    /// (input line, number, contract of the line it was on) of each number that moved
    /// from another line, the first [`MAX_LISTED`]: it lost its old subscriber's password
    /// (and so their sessions) and settings (R-M3).
    pub moved: Vec<(usize, PhoneNumber, PhoneNumber)>,
}

/// Rejected lines listed with their reason; more are only counted, so a huge file of
/// bad lines cannot fill memory with reasons.
pub const MAX_LISTED: usize = 10_000;

/// The longest input line read: a line (回線) with every number and setting takes a few
/// KiB. A longer one is rejected without being held in memory.
pub const MAX_LINE: usize = 1 << 20;

impl ImportReport {
    fn reject(&mut self, line: usize, reason: String) {
        if self.rejected.len() < MAX_LISTED {
            self.rejected.push((line, reason));
        } else {
            self.rejected_not_listed += 1;
        }
    }
}

/// Reads one line (up to `\n`) into `out`, keeping at most `max` bytes of it; returns
/// whether there was a line, and whether it was longer than `max`.
fn read_line(input: &mut impl BufRead, out: &mut Vec<u8>, max: usize) -> std::io::Result<Option<bool>> {
    let (mut any, mut too_long) = (false, false);
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            return Ok(any.then_some(too_long));
        }
        any = true;
        let (taken, end) = match memchr::memchr(b'\n', available) {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        let room = max.saturating_sub(out.len());
        out.extend_from_slice(&available[..taken.min(room)]);
        too_long |= taken > room;
        input.consume(taken);
        if end {
            return Ok(Some(too_long));
        }
    }
}

/// Why an import stopped early: only reading the input or writing the store can.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read the input at line {line}: {source}")]
    Read { line: usize, source: std::io::Error },
    #[error(
        "store failed at input line {line}: {source}; the lines before line {from} are on disk, those from it on \
         may not be: import the file again once the cause is fixed (lines already stored apply unchanged)"
    )]
    Store {
        line: usize,
        /// The first line not known to be on disk: everything before it was flushed.
        from: usize,
        source: StoreError,
    },
}

/// Lines between two flushes of an import: a failure names the lines known stored.
const CHECKPOINT_LINES: usize = 1_000;

/// The UTF-8 byte order mark some editors put at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Imports every line of `input` into `store`. A line that is not UTF-8 (or starts with
/// a byte order mark) is rejected alone, like any other bad line.
pub fn import(store: &Store, mut input: impl BufRead) -> Result<ImportReport, ImportError> {
    let mut report = ImportReport::default();
    let mut bytes = Vec::new();
    // sled writes in the background: a full disk shows at a later write than the one
    // it lost. So the import flushes every CHECKPOINT_LINES lines, and an error names
    // the first line after the last flush that succeeded.
    let (mut durable_before, mut since_flush) = (1, 0);
    let mut last = 0;
    for line in 1.. {
        bytes.clear();
        let read =
            read_line(&mut input, &mut bytes, MAX_LINE + 2).map_err(|source| ImportError::Read { line, source })?;
        let Some(too_long) = read else { break };
        last = line;
        if too_long {
            report.reject(line, format!("longer than {} KiB: not a line of this format", MAX_LINE >> 10));
            continue;
        }
        let raw = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = match std::str::from_utf8(raw) {
            _ if raw.starts_with(BOM) => {
                report.reject(
                    line,
                    "starts with a UTF-8 byte order mark (BOM): save the file as UTF-8 without a BOM".into(),
                );
                continue;
            }
            Ok(text) => text,
            Err(e) => {
                report.reject(line, format!("not valid UTF-8 (from byte {} of the line on)", e.valid_up_to() + 1));
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        match parse_line(text) {
            Ok((record, numbers)) => match store.upsert_line(&record, &numbers) {
                Ok(upserted) => {
                    let room = MAX_LISTED.saturating_sub(report.moved.len());
                    report.moved.extend(upserted.moved.into_iter().take(room).map(|(n, from)| (line, n, from)));
                    report.lines += 1;
                    report.numbers += numbers.len();
                    since_flush += 1;
                }
                Err(refused @ StoreError::TooMany { .. }) => report.reject(line, refused.to_string()),
                Err(source) => return Err(ImportError::Store { line, from: durable_before, source }),
            },
            Err(reason) => report.reject(line, reason.to_string()),
        }
        if since_flush >= CHECKPOINT_LINES {
            store.flush_blocking().map_err(|source| ImportError::Store { line, from: durable_before, source })?;
            (durable_before, since_flush) = (line + 1, 0);
        }
    }
    store.flush_blocking().map_err(|source| ImportError::Store { line: last, from: durable_before, source })?;
    Ok(report)
}

type Numbers = Vec<(PhoneNumber, Services, Option<CallSettings>)>;

/// Why one input line is not applied: its reason in the import report.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// Not a line record; the message names the column (serde's "at line 1 column N"
    /// would read as the file's line 1).
    #[error("{0}")]
    Json(String),
    #[error("a line needs at least one number")]
    NoNumbers,
    #[error("number {0} is listed twice")]
    ListedTwice(PhoneNumber),
    #[error("number {number}: {source}")]
    Settings { number: PhoneNumber, source: StoreError },
    #[error("contract number {0} must be one of the line's numbers")]
    ContractNotListed(PhoneNumber),
}

fn parse_line(text: &str) -> Result<(LineRecord, Numbers), LineError> {
    let input: LineInput = serde_json::from_str(text).map_err(|e| {
        let message = e.to_string();
        LineError::Json(match message.rsplit_once(" at line ") {
            Some((reason, _)) => format!("{reason} (column {})", e.column()),
            None => message,
        })
    })?;
    if input.numbers.is_empty() {
        return Err(LineError::NoNumbers);
    }
    let mut seen = HashSet::new();
    let mut numbers = Vec::with_capacity(input.numbers.len());
    for n in input.numbers {
        if !seen.insert(n.number) {
            return Err(LineError::ListedTwice(n.number));
        }
        if let Some(settings) = &n.settings {
            settings.validate().map_err(|source| LineError::Settings { number: n.number, source })?;
        }
        let services = Services { call: n.services.contains(&Service::Call), fax: n.services.contains(&Service::Fax) };
        numbers.push((n.number, services, n.settings.map(|s| CallSettings { version: 0, ..s })));
    }
    if !seen.contains(&input.contract) {
        return Err(LineError::ContractNotListed(input.contract));
    }
    let record =
        LineRecord { contract: input.contract, numbers: numbers.iter().map(|n| n.0).collect(), unit: input.unit };
    Ok((record, numbers))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"contract":"0312345678","numbers":[{"number":"0312345678","services":["call"],"settings":{"enabled":true,"destinations":[{"address":"a@example.jp","send":true}],"designated_only":false,"missed_only":true,"designated":[{"number":"09011112222","designate":true}]}},{"number":"0312345679","services":["call","fax"]}]}"#;

    fn n(s: &str) -> PhoneNumber {
        PhoneNumber::parse(s).unwrap()
    }

    #[test]
    fn r_l3_the_documented_example_imports() {
        let store = Store::temporary().unwrap();
        let report = import(&store, EXAMPLE.as_bytes()).unwrap();
        assert_eq!(report, ImportReport { lines: 1, numbers: 2, ..Default::default() });
        let first = store.number(&n("0312345678")).unwrap().unwrap();
        assert!(first.call.enabled && first.call.missed_only);
        let second = store.number(&n("0312345679")).unwrap().unwrap();
        assert_eq!(second.services, Services { call: true, fax: true });
        assert_eq!(second.contract, n("0312345678"));
        assert_eq!(store.line(&n("0312345678")).unwrap().unwrap().numbers.len(), 2);
    }

    #[test]
    fn bad_lines_are_reported_with_their_number_and_the_rest_applied() {
        let store = Store::temporary().unwrap();
        let input = [
            EXAMPLE,
            "",
            r#"{"contract":"03-1234-0000","numbers":[{"number":"0312340000"}]}"#,
            r#"{"contract":"0312340001","numbers":[{"number":"0312340002"}]}"#,
            r#"{"contract":"0312340003","numbers":[{"number":"0312340003","settings":{"destinations":[{"address":"bad@","send":true}]}}]}"#,
            "not json",
            r#"{"contract":"0312340004","numbers":[{"number":"0312340004","services":["call"]}]}"#,
        ]
        .join("\n");
        let report = import(&store, input.as_bytes()).unwrap();
        assert_eq!(report.lines, 2);
        let lines: Vec<usize> = report.rejected.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, vec![3, 4, 5, 6]);
        assert!(report.rejected[0].1.contains("digits"), "{:?}", report.rejected[0]);
        assert!(report.rejected[1].1.contains("contract number"), "{:?}", report.rejected[1]);
        assert!(report.rejected[2].1.contains("bad@"), "{:?}", report.rejected[2]);
        assert!(store.number(&n("0312340000")).unwrap().is_none(), "a rejected line is not applied");
        assert!(store.number(&n("0312340004")).unwrap().is_some());
    }

    /// A line of invalid UTF-8 and a byte order mark used to stop the whole import (the
    /// CLI exited with no report; HTTP answered 500): now each is one rejected line,
    /// named as what it is, and the lines after it apply.
    #[test]
    fn r_l3_a_line_of_invalid_utf8_and_a_bom_are_rejected_alone_and_the_rest_applied() {
        let store = Store::temporary().unwrap();
        let line = |number: &str| format!(r#"{{"contract":"{number}","numbers":[{{"number":"{number}"}}]}}"#);
        let mut input = b"\xEF\xBB\xBF".to_vec();
        input.extend_from_slice(line("0312340010").as_bytes());
        input.extend_from_slice(b"\r\n");
        input.extend_from_slice(line("0312340011").as_bytes());
        input.extend_from_slice(b"\n{\"contract\":\"\xff\xfe\"}\n");
        input.extend_from_slice(line("0312340012").as_bytes());
        let report = import(&store, input.as_slice()).unwrap();
        assert_eq!(report.lines, 2, "{report:?}");
        let lines: Vec<usize> = report.rejected.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, vec![1, 3]);
        assert!(report.rejected[0].1.contains("byte order mark (BOM)"), "{:?}", report.rejected[0]);
        assert!(report.rejected[1].1.contains("not valid UTF-8 (from byte 14"), "{:?}", report.rejected[1]);
        assert!(store.number(&n("0312340011")).unwrap().is_some(), "a CRLF line applies");
        assert!(store.number(&n("0312340012")).unwrap().is_some(), "the line after the bad one applies");
    }

    #[test]
    fn r_n2_r_n5_limits_are_enforced_on_import() {
        let store = Store::temporary().unwrap();
        let dests: Vec<String> = (0..6).map(|i| format!(r#"{{"address":"a{i}@example.jp","send":true}}"#)).collect();
        let line = format!(
            r#"{{"contract":"0312345678","numbers":[{{"number":"0312345678","settings":{{"destinations":[{}]}}}}]}}"#,
            dests.join(",")
        );
        let report = import(&store, line.as_bytes()).unwrap();
        assert!(report.rejected[0].1.contains("at most 5"), "{:?}", report.rejected);
    }

    #[test]
    fn importing_twice_gives_the_same_state() {
        let store = Store::temporary().unwrap();
        import(&store, EXAMPLE.as_bytes()).unwrap();
        let once = store.number(&n("0312345678")).unwrap();
        import(&store, EXAMPLE.as_bytes()).unwrap();
        assert_eq!(store.number(&n("0312345678")).unwrap(), once);
    }

    #[test]
    fn a_reimported_line_drops_numbers_it_no_longer_lists() {
        let store = Store::temporary().unwrap();
        import(&store, EXAMPLE.as_bytes()).unwrap();
        let smaller = r#"{"contract":"0312345678","numbers":[{"number":"0312345678","services":["call"]}]}"#;
        import(&store, smaller.as_bytes()).unwrap();
        assert!(store.number(&n("0312345679")).unwrap().is_none());
        let kept = store.number(&n("0312345678")).unwrap().unwrap();
        assert!(kept.call.enabled, "settings absent from the import are kept");
    }
}
