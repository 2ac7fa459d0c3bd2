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
//!
//! [`export`] writes the store in the same format, one line per 回線 in contract-number
//! order, every number with its services, settings (with their version, R-S9) and,
//! unless left out, the site's credential (argon2id hash, kind, when set, failures;
//! never a password): importing it into an empty store gives the same store.

use std::collections::HashSet;
use std::io::BufRead;

use crate::phone::PhoneNumber;
use crate::store::state::{Op, Reply};
use crate::store::{AuthUnit, CallSettings, CredentialRecord, FaxSettings, LineRecord, Services, Store, StoreError};
use crate::strict_json::StrictError;

/// One line of the format, read by [`import`] and written by [`export`].
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct LineInput {
    /// 契約番号; must be one of `numbers`.
    contract: PhoneNumber,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unit: Option<AuthUnit>,
    #[serde(default)]
    numbers: Vec<NumberInput>,
    /// The contract ended: the line goes, with all its numbers held (`numbers` empty).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    remove: bool,
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct NumberInput {
    number: PhoneNumber,
    #[serde(default)]
    services: Vec<Service>,
    /// Absent: the number keeps the settings it has (a subscriber's own saves survive
    /// a re-import).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    settings: Option<CallSettings>,
    /// FAXお知らせメール settings (R-F1), in the same way: absent, the number keeps its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fax_settings: Option<FaxSettings>,
    /// Absent: the number keeps the credential it has (none, if new or moved here).
    /// Present: restored as given (an export's backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credential: Option<CredentialRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
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
    /// Moves beyond those listed.
    pub moved_not_listed: usize,
    /// (input line, number) of each number its line no longer lists, or whose line was
    /// removed, the first [`MAX_LISTED`]: removed, with its password, settings and faxes.
    pub removed: Vec<(usize, PhoneNumber)>,
    /// Removals beyond those listed.
    pub removed_not_listed: usize,
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

/// An import stopped early, with what it did until then: the lines applied, and the
/// moves and removals among them, are reported all the same (they happened).
#[derive(Debug, thiserror::Error)]
#[error("{failure}")]
pub struct ImportError {
    pub failure: ImportFailure,
    /// What the import did before it stopped, as far as it knows.
    pub done: Box<ImportReport>,
}

/// Why an import stopped early: only reading the input or writing the store can.
#[derive(Debug, thiserror::Error)]
pub enum ImportFailure {
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

/// The UTF-8 byte order mark some editors put at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// What an export wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExportReport {
    pub lines: usize,
    pub numbers: usize,
    pub credentials: usize,
}

/// Why an export stopped: reading the store or writing the output.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("reading the store: {0}")]
    Store(#[from] StoreError),
    #[error("line {contract} lists number {number}, which has no record: the store is damaged")]
    Missing { contract: PhoneNumber, number: PhoneNumber },
    #[error("writing the export: {0}")]
    Write(#[from] std::io::Error),
}

/// Writes every line of `store` to `out` in the import format, in contract-number
/// order; with `credentials`, each number's site credential too (the argon2id hash and
/// its counters, never a password). Importing the output into an empty store gives the
/// same lines, numbers, settings and (if written) credentials.
pub fn export(store: &Store, credentials: bool, mut out: impl std::io::Write) -> Result<ExportReport, ExportError> {
    let mut report = ExportReport::default();
    for line in store.lines() {
        let line = line?;
        let mut numbers = Vec::with_capacity(line.numbers.len());
        for number in &line.numbers {
            let record =
                store.number(number)?.ok_or(ExportError::Missing { contract: line.contract, number: *number })?;
            let services = [(record.services.call, Service::Call), (record.services.fax, Service::Fax)];
            let credential = if credentials { store.credential(number)? } else { None };
            report.credentials += usize::from(credential.is_some());
            numbers.push(NumberInput {
                number: *number,
                services: services.into_iter().filter(|(on, _)| *on).map(|(_, s)| s).collect(),
                settings: Some(record.call),
                fax_settings: (!record.fax.is_default()).then_some(record.fax),
                credential,
            });
        }
        report.numbers += numbers.len();
        let output = LineInput { contract: line.contract, unit: line.unit, numbers, remove: false };
        serde_json::to_writer(&mut out, &output).map_err(std::io::Error::from)?;
        out.write_all(b"\n")?;
        report.lines += 1;
    }
    out.flush()?;
    Ok(report)
}

/// Imports every line of `input` into `store`. A line that is not UTF-8 (or starts with
/// a byte order mark) is rejected alone, like any other bad line.
pub fn import(store: &Store, input: impl BufRead) -> Result<ImportReport, ImportError> {
    import_in_writes_of(store, input, LINES_PER_WRITE)
}

/// [`import`], writing `lines_per_write` parsed lines in one exchange with the store's
/// state (at least one).
pub fn import_in_writes_of(
    store: &Store,
    input: impl BufRead,
    lines_per_write: usize,
) -> Result<ImportReport, ImportError> {
    let mut report = ImportReport::default();
    match import_into(store, input, lines_per_write, &mut report) {
        Ok(()) => Ok(report),
        Err(failure) => {
            report.rejected.sort_by_key(|(line, _)| *line);
            Err(ImportError { failure, done: Box::new(report) })
        }
    }
}

/// [`import_in_writes_of`], its report kept in `report` whatever becomes of it.
fn import_into(
    store: &Store,
    mut input: impl BufRead,
    lines_per_write: usize,
    report: &mut ImportReport,
) -> Result<(), ImportFailure> {
    let lines_per_write = lines_per_write.max(1);
    let mut bytes = Vec::new();
    // sled writes in the background: a full disk shows at a later write than the one
    // it lost. So an import into a store of its own flushes after each write (of
    // `lines_per_write` lines), and an error names the first line after the last flush
    // that succeeded.
    let mut durable_before = 1;
    let mut last = 0;
    let mut pending = Vec::with_capacity(lines_per_write);
    // Shared state: the lines last sent are on their way while the next ones are read
    // and sent, so the state owner always has the next lines when it is done with these
    // (waiting for each answer before reading on left it idle half the time).
    let shared = store.is_shared();
    let mut in_flight: Option<Sent> = None;
    for line in 1.. {
        bytes.clear();
        let read =
            read_line(&mut input, &mut bytes, MAX_LINE + 2).map_err(|source| ImportFailure::Read { line, source })?;
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
            Ok(parsed) => pending.push((line, parsed)),
            Err(reason) => report.reject(line, reason.to_string()),
        }
        if pending.len() >= lines_per_write {
            let lines = std::mem::replace(&mut pending, Vec::with_capacity(lines_per_write));
            let sent = Sent::send(store, lines, durable_before);
            let answer_now = if shared { in_flight.replace(sent) } else { Some(sent) };
            if let Some(sent) = answer_now {
                if let Err(failure) = sent.answered(report) {
                    // The lines sent after these may be applied: their answers still
                    // count (a move among them is reported).
                    if let Some(later) = in_flight.take() {
                        let _ = later.answered(report);
                    }
                    return Err(failure);
                }
            }
            // Shared state is durable once answered (the state topic has it, acks=all):
            // the flushes are for a store of its own.
            if !shared {
                store.flush_blocking().map_err(|source| ImportFailure::Store { line, from: durable_before, source })?;
                durable_before = line + 1;
            }
        }
    }
    let rest = (!pending.is_empty()).then(|| Sent::send(store, pending, durable_before));
    let mut failed = None;
    for sent in in_flight.into_iter().chain(rest) {
        if let Err(failure) = sent.answered(report) {
            failed.get_or_insert(failure);
        }
    }
    if let Some(failure) = failed {
        return Err(failure);
    }
    store.flush_blocking().map_err(|source| ImportFailure::Store { line: last, from: durable_before, source })?;
    // A line refused by the store is known after the parse errors of the lines read since.
    report.rejected.sort_by_key(|(line, _)| *line);
    Ok(())
}

/// Parsed lines written together: one exchange with the state owner for all of them
/// (requests of a few hundred ops each, all on their way before the first answer).
const LINES_PER_WRITE: usize = 20_000;

/// Lines sent to the store (their line in the input, what it holds), with the answers
/// to come.
struct Sent {
    lines: Vec<(usize, Parsed)>,
    answers: crate::store::state::Answers,
    /// The first line not known to be stored when these were sent: a failure names it.
    /// Shared state is stored once answered, and every line before these was.
    from: usize,
}

impl Sent {
    fn send(store: &Store, lines: Vec<(usize, Parsed)>, durable_before: usize) -> Self {
        let mut ops = Vec::new();
        for (_, parsed) in &lines {
            let (record, numbers, extras) = match parsed {
                Parsed::Upsert(record, numbers, extras) => (record, numbers, extras),
                Parsed::Remove(contract) => {
                    ops.push(Op::RemoveLine { contract: *contract });
                    continue;
                }
            };
            ops.push(Op::UpsertLine { line: record.clone(), numbers: numbers.clone() });
            // Each on the line's own numbers only: a line the store refuses leaves its
            // numbers where they were, another line's perhaps.
            let line = Some(record.contract);
            ops.extend(extras.iter().map(|extra| match extra {
                Extra::Credential(number, record) => {
                    Op::RestoreCredential { number: *number, record: record.clone(), line }
                }
                Extra::Fax(number, settings) => {
                    Op::ImportFaxSettings { number: *number, settings: settings.clone(), line }
                }
            }));
        }
        let from = match lines.first() {
            Some((first, _)) if store.is_shared() => *first,
            _ => durable_before,
        };
        Self { lines, answers: store.send_all(ops), from }
    }

    /// Waits for the answers and adds them to `report`, every one: a failed op does not
    /// hide what the others did. The first failure is returned.
    fn answered(self, report: &mut ImportReport) -> Result<(), ImportFailure> {
        let from = self.from;
        let mut results = (self.answers)().into_iter();
        let mut first = None;
        for (line, parsed) in self.lines {
            let (numbers, extras) = match &parsed {
                Parsed::Upsert(_, numbers, extras) => (numbers.len(), extras.len()),
                Parsed::Remove(_) => (0, 0),
            };
            let mut failed = |source| {
                first.get_or_insert(ImportFailure::Store { line, from, source });
            };
            let stored = match results.next().expect("an answer per op") {
                Ok(Reply::Upserted(upserted)) => {
                    let room = MAX_LISTED.saturating_sub(report.moved.len());
                    report.moved_not_listed += upserted.moved.len().saturating_sub(room) + upserted.moved_not_listed;
                    report.moved.extend(upserted.moved.into_iter().take(room).map(|(n, from)| (line, n, from)));
                    let room = MAX_LISTED.saturating_sub(report.removed.len());
                    report.removed_not_listed +=
                        upserted.removed.len().saturating_sub(room) + upserted.removed_not_listed;
                    report.removed.extend(upserted.removed.into_iter().take(room).map(|n| (line, n)));
                    report.lines += 1;
                    report.numbers += numbers;
                    true
                }
                Ok(other) => {
                    failed(StoreError::State(format!("an import was answered {other:?}")));
                    false
                }
                Err(refused @ (StoreError::TooMany { .. } | StoreError::ContractInUse { .. })) => {
                    report.reject(line, refused.to_string());
                    false
                }
                // A record no owner can read stops this line, not the import.
                Err(refused @ StoreError::UnreadableNumber { .. }) => {
                    report.reject(
                        line,
                        format!(
                            "{refused}; what the line changed before it stays changed: remove that number from its \
                             line and provision it again (docs/cluster.md)"
                        ),
                    );
                    false
                }
                Err(source) => {
                    failed(source);
                    false
                }
            };
            for _ in 0..extras {
                match results.next().expect("an answer per op") {
                    // A refused line's extras are refused with it, for its reason: its
                    // numbers are not its own, or one's record cannot be read.
                    Err(_) if !stored => {}
                    Err(source) => failed(source),
                    Ok(_) => {}
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

type Numbers = Vec<(PhoneNumber, Services, Option<CallSettings>)>;

/// Why one input line is not applied: its reason in the import report.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// Not a line record; the message names the column (serde's "at line 1 column N"
    /// would read as the file's line 1).
    #[error("{0}")]
    Json(String),
    #[error("a line needs at least one number (a line whose contract ended: {{\"contract\":\"…\",\"remove\":true}})")]
    NoNumbers,
    #[error("a line to remove lists no numbers and sets nothing: only `contract` and `remove`")]
    RemoveWithMore,
    #[error("number {0} is listed twice")]
    ListedTwice(PhoneNumber),
    #[error("number {number}: {source}")]
    Settings { number: PhoneNumber, source: StoreError },
    #[error("contract number {0} must be one of the line's numbers")]
    ContractNotListed(PhoneNumber),
    #[error(
        "number {0}: the credential's hash is not an argon2id PHC string \
         ($argon2id$v=19$m=…,t=…,p=…$salt$hash, m at most {MAX_M_COST_KIB}, t at most {MAX_T_COST}, p at most {MAX_P_COST})"
    )]
    Credential(PhoneNumber),
}

/// The most memory (KiB), passes and lanes a restored hash may ask of a login: each
/// login computes it (OWASP's 19 MiB, 2 passes, 1 lane here; 256 MiB allows their
/// heavier settings), and a hash asking for gigabytes would take the site down with it.
const MAX_M_COST_KIB: u32 = 262_144;
const MAX_T_COST: u32 = 16;
const MAX_P_COST: u32 = 16;

/// Whether `hash` is an argon2id PHC string a login can check, as the argon2 crate reads
/// it: `$argon2id$v=19$m=M,t=T,p=P$SALT$HASH`, the costs plain decimals within the
/// bounds above and m at least 8 a lane, the salt unpadded base64 of 8–48 bytes (at most
/// 64 characters), the hash of 16–64. Anything else logged in to a system error at every
/// attempt, counting nothing.
fn argon2id_phc(hash: &str) -> bool {
    // Unpadded base64 as the crate decodes it: its alphabet, a length that ends on whole
    // bytes, and no bits set past the last byte in its last character.
    let b64 = |s: &str, bytes: std::ops::RangeInclusive<usize>| {
        let value = |b: u8| match b {
            b'A'..=b'Z' => Some(b - b'A'),
            b'a'..=b'z' => Some(b - b'a' + 26),
            b'0'..=b'9' => Some(b - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        };
        let unused = match s.len() % 4 {
            0 => 0,
            2 => 0b1111,
            3 => 0b11,
            _ => return false,
        };
        s.bytes().all(|b| value(b).is_some())
            && s.bytes().last().and_then(value).is_none_or(|last| last & unused == 0)
            && bytes.contains(&(s.len() * 3 / 4))
    };
    let parts: Vec<&str> = hash.split('$').collect();
    let ["", "argon2id", "v=19", params, salt, digest] = parts[..] else { return false };
    let costs: Vec<Option<(&str, &str)>> = params.split(',').map(|p| p.split_once('=')).collect();
    let [m, t, p] = costs[..] else { return false };
    // A decimal as PHC writes one: digits, no sign, no leading zero.
    let cost = |kv: Option<(&str, &str)>, key: &str, range: std::ops::RangeInclusive<u32>| {
        kv.filter(|(k, v)| *k == key && v.bytes().all(|b| b.is_ascii_digit()) && (v.len() == 1 || !v.starts_with('0')))
            .and_then(|(_, v)| v.parse::<u32>().ok())
            .filter(|v| range.contains(v))
    };
    let (Some(m), Some(_), Some(p)) =
        (cost(m, "m", 8..=MAX_M_COST_KIB), cost(t, "t", 1..=MAX_T_COST), cost(p, "p", 1..=MAX_P_COST))
    else {
        return false;
    };
    b64(salt, 8..=48) && b64(digest, 16..=64) && m >= 8 * p
}

/// What a line sets besides the line and its numbers, each by an op of its own after
/// the upsert.
#[derive(Debug)]
enum Extra {
    /// A credential to restore.
    Credential(PhoneNumber, CredentialRecord),
    /// Fax settings to import.
    Fax(PhoneNumber, FaxSettings),
}

/// A parsed line.
enum Parsed {
    /// The line, its numbers, and what else it sets.
    Upsert(LineRecord, Numbers, Vec<Extra>),
    /// The contract number of a line to remove.
    Remove(PhoneNumber),
}

fn parse_line(text: &str) -> Result<Parsed, LineError> {
    let input: LineInput = crate::strict_json::from_slice(text.as_bytes()).map_err(|e| match e {
        StrictError::Json(e) => {
            let message = e.to_string();
            LineError::Json(match message.rsplit_once(" at line ") {
                Some((reason, _)) => format!("{reason} (column {})", e.column()),
                None => message,
            })
        }
        unknown @ StrictError::UnknownField(_) => LineError::Json(unknown.to_string()),
    })?;
    if input.remove {
        if !input.numbers.is_empty() || input.unit.is_some() {
            return Err(LineError::RemoveWithMore);
        }
        return Ok(Parsed::Remove(input.contract));
    }
    if input.numbers.is_empty() {
        return Err(LineError::NoNumbers);
    }
    let mut seen = HashSet::new();
    let mut numbers = Vec::with_capacity(input.numbers.len());
    let mut extras = Vec::new();
    for n in input.numbers {
        if !seen.insert(n.number) {
            return Err(LineError::ListedTwice(n.number));
        }
        if let Some(settings) = &n.settings {
            settings.validate().map_err(|source| LineError::Settings { number: n.number, source })?;
        }
        if let Some(credential) = n.credential {
            if !argon2id_phc(&credential.hash) {
                return Err(LineError::Credential(n.number));
            }
            extras.push(Extra::Credential(n.number, credential));
        }
        if let Some(fax) = n.fax_settings {
            fax.validate().map_err(|source| LineError::Settings { number: n.number, source })?;
            extras.push(Extra::Fax(n.number, fax));
        }
        let services = Services { call: n.services.contains(&Service::Call), fax: n.services.contains(&Service::Fax) };
        numbers.push((n.number, services, n.settings));
    }
    if !seen.contains(&input.contract) {
        return Err(LineError::ContractNotListed(input.contract));
    }
    let record =
        LineRecord { contract: input.contract, numbers: numbers.iter().map(|n| n.0).collect(), unit: input.unit };
    Ok(Parsed::Upsert(record, numbers, extras))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"contract":"0312345678","numbers":[{"number":"0312345678","services":["call"],"settings":{"enabled":true,"destinations":[{"address":"a@example.jp","send":true}],"designated_only":false,"missed_only":true,"designated":[{"number":"09011112222","designate":true}]}},{"number":"0312345679","services":["call","fax"]}]}"#;

    fn n(s: &str) -> PhoneNumber {
        PhoneNumber::parse(s).unwrap()
    }

    /// A credential as the site stores it (the hash of "password1" is not needed: the
    /// store keeps and restores it unread).
    fn credential(failures: u32) -> CredentialRecord {
        CredentialRecord {
            hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
            kind: crate::store::CredentialKind::Password,
            set_at: chrono::DateTime::from_timestamp(1_764_000_000, 0).unwrap(),
            failures,
            invalidated: false,
        }
    }

    /// Everything a store holds of its subscribers, for comparing two stores.
    /// What an export carries: not when a number moved lines (docs/provisioning.md).
    fn contents(store: &Store) -> (Vec<LineRecord>, Vec<crate::store::NumberRecord>, Vec<Option<CredentialRecord>>) {
        let lines: Vec<LineRecord> = store.lines().map(Result::unwrap).collect();
        let numbers: Vec<_> = store
            .numbers()
            .map(Result::unwrap)
            .map(|r| crate::store::NumberRecord { moved_in_at: None, ..r })
            .collect();
        let credentials = numbers.iter().map(|r| store.credential(&r.number).unwrap()).collect();
        (lines, numbers, credentials)
    }

    /// R-L3: an export is read back by import into the same store: lines and their units,
    /// numbers and services, settings with their versions (R-S9), and credentials with
    /// their failure counts (R-S3); exporting the copy gives the same bytes.
    #[test]
    fn r_l3_an_export_imported_into_an_empty_store_gives_the_same_store() {
        let store = Store::temporary().unwrap();
        let second = r#"{"contract":"0612345678","unit":"number","numbers":[{"number":"0612345678"},{"number":"0612345679","services":["fax"]}]}"#;
        import(&store, format!("{EXAMPLE}\n{second}\n").as_bytes()).unwrap();
        let saved = store.number(&n("0312345678")).unwrap().unwrap().call;
        store
            .save_call_settings(&n("0312345678"), saved.version, CallSettings { missed_only: false, ..saved })
            .unwrap();
        store.restore_credential(&n("0312345678"), &credential(0)).unwrap();
        store.restore_credential(&n("0612345679"), &credential(2)).unwrap();
        // R-F1: the fax number's settings, saved twice (version 2).
        let fax = FaxSettings {
            enabled: true,
            destinations: vec![crate::store::Destination {
                address: crate::address::DestinationAddress::parse("fax@example.jp").unwrap(),
                send: true,
            }],
            attach_pdf: true,
            version: 0,
        };
        store.save_fax_settings(&n("0612345679"), 0, fax.clone()).unwrap();
        store.save_fax_settings(&n("0612345679"), 1, FaxSettings { attach_pdf: false, ..fax }).unwrap();

        let mut exported = Vec::new();
        let report = export(&store, true, &mut exported).unwrap();
        assert_eq!(report, ExportReport { lines: 2, numbers: 4, credentials: 2 });
        let copy = Store::temporary().unwrap();
        let imported = import(&copy, exported.as_slice()).unwrap();
        assert_eq!((imported.lines, imported.numbers, imported.rejected.len()), (2, 4, 0));
        assert_eq!(contents(&copy), contents(&store));
        assert_eq!(copy.number(&n("0312345678")).unwrap().unwrap().call.version, 1, "the version is kept");
        let fax = copy.number(&n("0612345679")).unwrap().unwrap().fax;
        assert_eq!((fax.enabled, fax.attach_pdf, fax.version, fax.destinations.len()), (true, false, 2, 1));

        let mut again = Vec::new();
        export(&copy, true, &mut again).unwrap();
        assert_eq!(String::from_utf8(again).unwrap(), String::from_utf8(exported.clone()).unwrap());
        // Importing it into the store it came from changes nothing.
        import(&store, exported.as_slice()).unwrap();
        assert_eq!(contents(&store), contents(&copy));
    }

    /// R-M3, R-L1: a line refused for taking another line's contract number changes
    /// nothing of that number: its credential and fax settings in the refused line were
    /// restored all the same (the refused line's password logged in as the other line's
    /// administrator, its fax addresses got the other line's faxes), and an extra for a
    /// number of the refused line not yet provisioned stopped the whole import.
    #[test]
    fn r_m3_a_refused_line_restores_no_credential_or_fax_settings_of_another_line_s_number() {
        let store = Store::temporary().unwrap();
        let owner = r#"{"contract":"0312340001","numbers":[{"number":"0312340001","services":["call","fax"]},{"number":"0312340002"}]}"#;
        import(&store, owner.as_bytes()).unwrap();
        let before = (store.credential(&n("0312340001")).unwrap(), store.number(&n("0312340001")).unwrap());
        let credential = r#""credential":{"hash":"$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$aGFzaGhhc2hoYXNoaGFzaA","kind":"password","set_at":"2026-12-01T00:00:00Z","failures":0,"invalidated":false}"#;
        let fax = r#""fax_settings":{"enabled":true,"attach_pdf":true,"destinations":[{"address":"intruder@example.jp","send":true}]}"#;
        let refused = format!(
            r#"{{"contract":"0312340009","numbers":[{{"number":"0312340009",{credential}}},{{"number":"0312340001","services":["call","fax"],{credential},{fax}}}]}}"#
        );
        let after_it = r#"{"contract":"0312340005","numbers":[{"number":"0312340005"}]}"#;
        let report = import(&store, format!("{refused}\n{after_it}").as_bytes()).expect("the import goes on");
        assert_eq!(report.rejected.len(), 1, "{:?}", report.rejected);
        assert_eq!(report.lines, 1, "the line after it is imported");
        let after = (store.credential(&n("0312340001")).unwrap(), store.number(&n("0312340001")).unwrap());
        assert_eq!(after, before, "the refused line changed the other line's contract number");
        assert!(store.number(&n("0312340009")).unwrap().is_none());
    }

    /// R-M3: an import that stops part way (its input fails here; a store or a state
    /// owner failing is the same) still reports what it did before: the move it made
    /// happened, and an import again would not name it. Only the error was said.
    #[test]
    fn r_m3_an_import_that_stops_part_way_reports_the_moves_it_made() {
        struct FailsAfter(&'static [u8]);
        impl std::io::Read for FailsAfter {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() {
                    return Err(std::io::Error::other("the disk went away"));
                }
                let n = self.0.len().min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let store = Store::temporary().unwrap();
        let lines = concat!(
            r#"{"contract":"0312340001","numbers":[{"number":"0312340001"},{"number":"0312340002"}]}"#,
            "\n",
            r#"{"contract":"0312340009","numbers":[{"number":"0312340009"},{"number":"0312340002"}]}"#,
            "\n",
        );
        let input = std::io::BufReader::new(FailsAfter(lines.as_bytes()));
        let e = import_in_writes_of(&store, input, 1).unwrap_err();
        assert!(matches!(e.failure, ImportFailure::Read { line: 3, .. }), "{e}");
        assert_eq!(e.done.lines, 2);
        assert_eq!(e.done.moved, vec![(2, n("0312340002"), n("0312340001"))]);
        assert_eq!(store.number(&n("0312340002")).unwrap().unwrap().contract, n("0312340009"));
    }

    /// R-L1, R-M3: a line imported again without one of its numbers removes it, its
    /// password, settings and faxes with it, and the report names it, as it names a
    /// move (a file joined from an old and a new extract lists a contract twice). Before,
    /// the report said only "imported 2 lines".
    #[test]
    fn r_m3_a_number_its_line_no_longer_lists_is_removed_and_named() {
        let store = Store::temporary().unwrap();
        let lines = [
            r#"{"contract":"0312340001","numbers":[{"number":"0312340001"},{"number":"0312340002"}]}"#,
            r#"{"contract":"0312340001","numbers":[{"number":"0312340001"}]}"#,
        ];
        let report = import(&store, lines.join("\n").as_bytes()).unwrap();
        assert_eq!(report.removed, vec![(2, n("0312340002"))]);
        assert!(report.moved.is_empty() && report.rejected.is_empty(), "{report:?}");
        assert!(store.number(&n("0312340002")).unwrap().is_none());
        assert_eq!(import(&store, lines[1].as_bytes()).unwrap().removed, vec![], "removed once");

        // A line that also takes a number from another line is written over again
        // after the move: its removals are still named once each.
        let lines = [
            r#"{"contract":"0312340001","numbers":[{"number":"0312340001"},{"number":"0312340002"},{"number":"0312340003"}]}"#,
            r#"{"contract":"0312340009","numbers":[{"number":"0312340009"},{"number":"0312340008"}]}"#,
            r#"{"contract":"0312340001","numbers":[{"number":"0312340001"},{"number":"0312340008"}]}"#,
        ];
        let report = import(&store, lines.join("\n").as_bytes()).unwrap();
        assert_eq!(report.removed, vec![(3, n("0312340002")), (3, n("0312340003"))]);
        assert_eq!(report.moved, vec![(3, n("0312340008"), n("0312340009"))]);
    }

    /// R-L3, issue 18's import rate: with `store.one_record_lines` a line of its contract
    /// number alone is kept as its number's record only (two records a line before: the
    /// goal of 100 000 lines a second needs the one write; without the setting, as
    /// before, which older nodes read). It reads back as its line, its unit set by phone
    /// gives it a record, it grows into a line of two numbers and back, it is removed
    /// with its number, and the export lists every line, with and without a record, in
    /// contract-number order, and reads back into an empty store as the same lines.
    #[test]
    fn r_l3_a_line_of_one_number_is_one_record_and_reads_back_as_its_line() {
        let store = Store::temporary().unwrap().with_one_record_lines(true);
        let line = |contract: &str, numbers: &[&str]| {
            let numbers: Vec<String> = numbers.iter().map(|x| format!(r#"{{"number":"{x}"}}"#)).collect();
            format!(r#"{{"contract":"{contract}","numbers":[{}]}}"#, numbers.join(","))
        };
        let lines = [
            line("0312340001", &["0312340001"]),
            line("0312340002", &["0312340002", "0312340003"]),
            line("0312340004", &["0312340004"]),
        ];
        let report = import(&store, lines.join("\n").as_bytes()).unwrap();
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        let records = |store: &Store| store.state_entries().count();
        assert_eq!(records(&store), 5, "three numbers' records, one line's: the two one-number lines have none");
        let every_line = Store::temporary().unwrap();
        import(&every_line, lines.join("\n").as_bytes()).unwrap();
        assert_eq!(records(&every_line), 7, "without the setting every line has its record");
        assert_eq!(
            every_line.lines().map(Result::unwrap).collect::<Vec<_>>(),
            store.lines().map(Result::unwrap).collect::<Vec<_>>()
        );
        let one = store.line(&n("0312340001")).unwrap().expect("its line");
        assert_eq!((one.numbers, one.unit), (vec![n("0312340001")], None));
        assert!(store.line(&n("0312340003")).unwrap().is_none(), "an additional number is no line");
        let contracts = |store: &Store| store.lines().map(|l| l.unwrap().contract).collect::<Vec<_>>();
        assert_eq!(contracts(&store), [n("0312340001"), n("0312340002"), n("0312340004")]);

        // Its unit set by phone (R-I7): the line gets a record.
        store.set_line_unit(&n("0312340004"), AuthUnit::Line).unwrap();
        assert_eq!(store.line(&n("0312340004")).unwrap().unwrap().unit, Some(AuthUnit::Line));
        assert_eq!(records(&store), 6);
        // Two numbers, then one again: it keeps the record it has.
        import(&store, line("0312340001", &["0312340001", "0312340009"]).as_bytes()).unwrap();
        assert_eq!(store.line(&n("0312340001")).unwrap().unwrap().numbers.len(), 2);
        let report = import(&store, line("0312340001", &["0312340001"]).as_bytes()).unwrap();
        assert_eq!(report.removed, [(1, n("0312340009"))]);
        assert_eq!(store.line(&n("0312340001")).unwrap().unwrap().numbers, [n("0312340001")]);

        let mut exported = Vec::new();
        export(&store, false, &mut exported).unwrap();
        let copy = Store::temporary().unwrap().with_one_record_lines(true);
        assert!(import(&copy, exported.as_slice()).unwrap().rejected.is_empty());
        assert_eq!(
            copy.lines().map(Result::unwrap).collect::<Vec<_>>(),
            store.lines().map(Result::unwrap).collect::<Vec<_>>()
        );

        // Removed, with its number; the other lines stay.
        let report = import(&store, r#"{"contract":"0312340001","remove":true}"#.as_bytes()).unwrap();
        assert_eq!(report.removed, [(1, n("0312340001"))]);
        assert!(store.line(&n("0312340001")).unwrap().is_none() && store.number(&n("0312340001")).unwrap().is_none());
        assert_eq!(contracts(&store), [n("0312340002"), n("0312340004")]);

        // A one-number line whose number's record this version cannot read: the export
        // stops naming it (it left the line out without a word), and a removal of the
        // line takes it (it found no line and removed nothing).
        import(&store, line("0312340005", &["0312340005"]).as_bytes()).unwrap();
        store.open_tree("numbers").unwrap().insert("0312340005", &b"{not a number record"[..]).unwrap();
        let error = export(&store, false, std::io::sink()).unwrap_err();
        assert!(error.to_string().contains("0312340005"), "{error}");
        let report = import(&store, r#"{"contract":"0312340005","remove":true}"#.as_bytes()).unwrap();
        assert_eq!(report.removed, [(1, n("0312340005"))]);
        assert_eq!(contracts(&store), [n("0312340002"), n("0312340004")]);
    }

    /// R-L1, R-L3: a line's contract number moves to another line only as its line's
    /// last number, and the line then ends; while the line has other numbers, the line
    /// taking it is rejected with why. An export after moves imports into an empty store
    /// as the same store. The defect: the contract number left its line, which stayed
    /// keyed by a number it no longer had (or with none), and the export of it was
    /// rejected by import ("contract number … must be one of the line's numbers").
    #[test]
    fn r_l3_a_contract_number_moves_only_as_its_line_s_last_and_the_export_reads_back() {
        let store = Store::temporary().unwrap();
        let line = |contract: &str, numbers: &[&str]| {
            let numbers: Vec<String> = numbers.iter().map(|x| format!(r#"{{"number":"{x}"}}"#)).collect();
            format!(r#"{{"contract":"{contract}","numbers":[{}]}}"#, numbers.join(","))
        };
        let lines = [
            line("0312340001", &["0312340001", "0312340002"]),
            line("0312340003", &["0312340003"]),
            // Takes line 0312340001's contract number while it has 0312340002 too.
            line("0312340009", &["0312340009", "0312340001"]),
            // Takes line 0312340003's only number: that line ends.
            line("0312340008", &["0312340008", "0312340003"]),
        ];
        let report = import(&store, lines.join("\n").as_bytes()).unwrap();
        assert_eq!(report.rejected.len(), 1, "{:?}", report.rejected);
        let (at, why) = &report.rejected[0];
        assert_eq!(*at, 3);
        assert!(why.contains("0312340001") && why.contains("0312340002") && why.contains("last number"), "{why}");
        assert_eq!(store.line(&n("0312340001")).unwrap().unwrap().numbers, vec![n("0312340001"), n("0312340002")]);
        assert!(store.line(&n("0312340003")).unwrap().is_none(), "the line whose only number moved ends");
        assert_eq!(store.number(&n("0312340003")).unwrap().unwrap().contract, n("0312340008"));

        // 0312340002 on a line of its own first: then 0312340001 moves, and its line ends.
        let report =
            import(&store, [line("0312340002", &["0312340002"]), lines[2].clone()].join("\n").as_bytes()).unwrap();
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        assert!(store.line(&n("0312340001")).unwrap().is_none());

        // A line taken over whole, under another of its numbers as contract: not refused.
        let takeover =
            [line("0312340020", &["0312340020", "0312340021"]), line("0312340021", &["0312340021", "0312340020"])];
        let report = import(&store, takeover.join("\n").as_bytes()).unwrap();
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        assert!(store.line(&n("0312340020")).unwrap().is_none());
        // A line left by an older version keyed by a number it no longer has does not
        // keep that number's line from being imported again as it is.
        let number = |x: &str| (n(x), crate::store::Services { call: true, fax: false }, None);
        let stale = LineRecord { contract: n("0312340030"), numbers: vec![n("0312340031")], unit: None };
        let owner =
            LineRecord { contract: n("0312340032"), numbers: vec![n("0312340032"), n("0312340030")], unit: None };
        store.upsert_line(&owner, &[number("0312340032"), number("0312340030")]).unwrap();
        store.upsert_line(&stale, &[number("0312340031")]).unwrap();
        store.upsert_line(&owner, &[number("0312340032"), number("0312340030")]).expect("imported again as it is");
        store.upsert_line(&LineRecord { numbers: vec![n("0312340030")], ..stale }, &[number("0312340030")]).unwrap();

        let mut exported = Vec::new();
        export(&store, true, &mut exported).unwrap();
        let copy = Store::temporary().unwrap();
        let imported = import(&copy, exported.as_slice()).unwrap();
        assert!(imported.rejected.is_empty(), "{:?}\n{}", imported.rejected, String::from_utf8_lossy(&exported));
        assert_eq!(contents(&copy), contents(&store));
    }

    #[test]
    fn r_l3_an_export_without_credentials_holds_no_hash_and_restores_none() {
        let store = Store::temporary().unwrap();
        import(&store, EXAMPLE.as_bytes()).unwrap();
        store.restore_credential(&n("0312345678"), &credential(0)).unwrap();
        let mut exported = Vec::new();
        assert_eq!(export(&store, false, &mut exported).unwrap().credentials, 0);
        let text = String::from_utf8(exported).unwrap();
        assert!(!text.contains("credential") && !text.contains("argon2"), "{text}");
        let copy = Store::temporary().unwrap();
        import(&copy, text.as_bytes()).unwrap();
        assert_eq!(copy.credential(&n("0312345678")).unwrap(), None);
        assert_eq!(copy.numbers().count(), 2);
    }

    /// R-L3, R-M3: a line whose contract ended is removed by `{"contract":…,"remove":true}`:
    /// its numbers go with their passwords and settings, each named, and a number given
    /// to a new subscriber later starts with nothing of the old one's. There was no way
    /// to remove a line (`"numbers":[]` is refused): a number given out again kept its
    /// old subscriber's addresses (their mails went on) and password (their login showed
    /// the new subscriber's calls).
    #[test]
    fn r_m3_a_line_whose_contract_ended_is_removed_with_all_it_held() {
        let store = Store::temporary().unwrap();
        let line = r#"{"contract":"0312345678","numbers":[{"number":"0312345678","services":["call"],"settings":{"enabled":true,"destinations":[{"address":"old@example.jp","send":true}],"designated_only":false,"missed_only":true,"designated":[]}},{"number":"0312345679","services":["call"]}]}"#;
        import(&store, line.as_bytes()).unwrap();
        store.restore_credential(&n("0312345678"), &credential(0)).unwrap();
        let other = r#"{"contract":"0612345678","numbers":[{"number":"0612345678","services":["call"]}]}"#;

        let removal = r#"{"contract":"0312345678","remove":true}"#;
        let report = import(&store, format!("{other}\n{removal}\n").as_bytes()).unwrap();
        assert_eq!(report.removed, vec![(2, n("0312345678")), (2, n("0312345679"))]);
        assert_eq!((report.lines, report.numbers, report.rejected.len()), (2, 1, 0), "{report:?}");
        assert_eq!(store.line(&n("0312345678")).unwrap(), None);
        assert_eq!(store.number(&n("0312345678")).unwrap(), None);
        assert_eq!(store.number(&n("0312345679")).unwrap(), None);
        assert_eq!(store.credential(&n("0312345678")).unwrap(), None);
        assert!(store.number(&n("0612345678")).unwrap().is_some(), "another line stays");
        let subscribed: Vec<PhoneNumber> = store.subscribed_numbers().map(Result::unwrap).collect();
        assert_eq!(subscribed, [n("0612345678")], "its calls are no one's to mail");

        let again = import(&store, removal.as_bytes()).unwrap();
        assert_eq!((again.lines, again.removed.len(), again.rejected.len()), (1, 0, 0), "run again: the same state");

        // The number given to a new subscriber: none of the old one's addresses.
        import(
            &store,
            r#"{"contract":"0312345678","numbers":[{"number":"0312345678","services":["call"]}]}"#.as_bytes(),
        )
        .unwrap();
        let record = store.number(&n("0312345678")).unwrap().unwrap();
        assert!(record.call.destinations.is_empty(), "{:?}", record.call);
        assert_eq!(store.credential(&n("0312345678")).unwrap(), None);
    }

    /// R-S9: fax settings imported onto a number that never saved any start past version
    /// 0, so the site's form shown before the import (at 0) is refused as stale instead of
    /// replacing them without a word. They kept the import's version 0.
    #[test]
    fn r_s9_imported_fax_settings_make_a_form_shown_before_them_stale() {
        let store = Store::temporary().unwrap();
        let line = r#"{"contract":"0312345678","numbers":[{"number":"0312345678","services":["fax"]}]}"#;
        import(&store, line.as_bytes()).unwrap();
        let with_settings = r#"{"contract":"0312345678","numbers":[{"number":"0312345678","services":["fax"],"fax_settings":{"enabled":true,"destinations":[{"address":"ops@example.jp","send":true}],"attach_pdf":false}}]}"#;
        let report = import(&store, with_settings.as_bytes()).unwrap();
        assert!(report.rejected.is_empty(), "{report:?}");
        let stale = store.save_fax_settings(&n("0312345678"), 0, FaxSettings::default());
        assert!(matches!(stale, Err(StoreError::StaleVersion { current: 1 })), "{stale:?}");
        let kept = store.number(&n("0312345678")).unwrap().unwrap().fax;
        assert_eq!(kept.destinations.len(), 1);
    }

    /// A stored record this version cannot read rejects the line that reaches it, naming
    /// the number and what to do, and the import goes on. It stopped the whole import
    /// ("store record is corrupt", no number), at the same line on every run.
    #[test]
    fn r_l3_a_line_reaching_an_unreadable_record_is_rejected_naming_it_and_the_rest_apply() {
        let store = Store::temporary().unwrap();
        let line = r#"{"contract":"0312340001","numbers":[{"number":"0312340001"},{"number":"0312340002"}]}"#;
        import(&store, line.as_bytes()).unwrap();
        store.open_tree("numbers").unwrap().insert("0312340002", &b"{x"[..]).unwrap();
        let other = r#"{"contract":"0612340001","numbers":[{"number":"0612340001"}]}"#;
        let report = import(&store, format!("{line}\n{other}\n").as_bytes()).unwrap();
        assert_eq!(report.rejected.len(), 1, "{report:?}");
        let (at, reason) = &report.rejected[0];
        assert_eq!(*at, 1);
        assert!(reason.starts_with("the record of 0312340002 cannot be read"), "{reason}");
        assert!(reason.contains("remove that number from its line"), "{reason}");
        assert!(store.line(&n("0612340001")).unwrap().is_some(), "the next line applied");
        // With a credential and fax settings on the unreadable number (an export's line
        // carries them): rejected alike, not the import stopped at it, every run.
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        let extras = format!(
            r#"{{"contract":"0312340001","numbers":[{{"number":"0312340001"}},{{"number":"0312340002","credential":{{"hash":"{hash}","kind":"password","set_at":"2026-12-01T00:00:00Z","failures":0,"invalidated":false}},"fax_settings":{{"enabled":true,"destinations":[]}}}}]}}"#
        );
        let third = r#"{"contract":"0612340003","numbers":[{"number":"0612340003"}]}"#;
        let report = import(&store, format!("{extras}\n{third}\n").as_bytes()).expect("the import goes on");
        assert_eq!(report.rejected.len(), 1, "{report:?}");
        assert!(store.line(&n("0612340003")).unwrap().is_some(), "the next line applied");

        // As it says: off its line, then on it again, the number is readable.
        import(&store, r#"{"contract":"0312340001","numbers":[{"number":"0312340001"}]}"#.as_bytes()).unwrap();
        let report = import(&store, line.as_bytes()).unwrap();
        assert!(report.rejected.is_empty(), "{report:?}");
        assert!(store.number(&n("0312340002")).unwrap().is_some());
    }

    /// A removal that says more than which line, or a line with no numbers, is refused
    /// with what to write instead (R-L3).
    #[test]
    fn r_l3_a_removal_naming_numbers_and_a_line_without_numbers_are_refused_saying_why() {
        let store = Store::temporary().unwrap();
        import(&store, EXAMPLE.as_bytes()).unwrap();
        let lines = [
            r#"{"contract":"0312345678","remove":true,"numbers":[{"number":"0312345678"}]}"#,
            r#"{"contract":"0312345678","numbers":[]}"#,
        ];
        let report = import(&store, lines.join("\n").as_bytes()).unwrap();
        let reasons: Vec<&str> = report.rejected.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "a line to remove lists no numbers and sets nothing: only `contract` and `remove`",
                r#"a line needs at least one number (a line whose contract ended: {"contract":"…","remove":true})"#,
            ]
        );
        assert!(store.line(&n("0312345678")).unwrap().is_some(), "nothing removed");
    }

    /// Past [`MAX_LISTED`], removals are counted: the report says how many more numbers
    /// went. They were dropped from it without a word (10 000 named, 10 001 removed).
    #[test]
    fn removals_past_those_listed_are_counted() {
        let store = Store::temporary().unwrap();
        let numbers: Vec<String> =
            (0..=MAX_LISTED).map(|i| format!(r#"{{"number":"03{:08}"}}"#, 10_000_000 + i)).collect();
        let line = format!(r#"{{"contract":"0310000000","numbers":[{}]}}"#, numbers.join(","));
        import(&store, line.as_bytes()).unwrap();
        let report = import(&store, r#"{"contract":"0310000000","remove":true}"#.as_bytes()).unwrap();
        assert_eq!((report.removed.len(), report.removed_not_listed), (MAX_LISTED, 1));
    }

    /// A credential is restored only with a hash a login can check: an argon2id PHC
    /// string whose costs a login can afford. A truncated or hand-edited one (only its
    /// `$argon2id$` start was checked) was restored, and every login of the number was a
    /// system error, counting nothing; one asking for 4 GiB took that much per login.
    #[test]
    fn r_l3_a_credential_that_is_not_an_argon2id_hash_is_refused_with_its_line() {
        let line = |hash: &str| {
            format!(
                r#"{{"contract":"0312345678","numbers":[{{"number":"0312345678","credential":{{"hash":"{hash}","kind":"password","set_at":"2026-12-01T00:00:00Z","failures":0,"invalidated":false}}}}]}}"#
            )
        };
        let good = credential(0).hash;
        for bad in [
            "password1".to_owned(),
            good.replace("aGFzaA", "aGFz!"),
            good.replace("m=19456", "m=4194304"),
            good.replace("t=2", "t=0"),
            good.replace("v=19", "v=16"),
            good.replace(",p=1", ""),
            good.replace("m=19456", "m=019456"),
            good.replace("m=19456", "m=+19456"),
            good.replace("m=19456,t=2,p=1", "m=8,t=1,p=2"),
            good.replace("c2FsdHNhbHQ", &"c2FsdHNhbHQ".repeat(6)),
            good.replace("c2FsdHNhbHQ", "c2FsdHNhbHR"),
            good.replace("aGFzaA", "aGFzaB"),
            format!("{good}$more"),
            "$argon2id$v=19$m=19456,t=2,p=1$$".to_owned(),
        ] {
            let store = Store::temporary().unwrap();
            let report = import(&store, format!("{EXAMPLE}\n{}\n", line(&bad)).as_bytes()).unwrap();
            assert_eq!(report.rejected.len(), 1, "{bad}: {report:?}");
            assert!(
                report.rejected[0]
                    .1
                    .starts_with("number 0312345678: the credential's hash is not an argon2id PHC string"),
                "{bad}: {report:?}"
            );
            assert_eq!(store.credential(&n("0312345678")).unwrap(), None, "{bad}");
        }
        let store = Store::temporary().unwrap();
        let report = import(&store, line(&good).as_bytes()).unwrap();
        assert!(report.rejected.is_empty(), "{report:?}");
        assert_eq!(store.credential(&n("0312345678")).unwrap().unwrap().hash, good);
    }

    /// Stored records are read leniently (a newer version's fields passed over); an
    /// import line is not: a misspelt or unknown setting, at any depth, rejects its
    /// line with the field's path instead of being dropped in silence (R-L3, R-N4).
    #[test]
    fn r_l3_a_field_the_format_does_not_have_rejects_its_line_naming_the_field() {
        let store = Store::temporary().unwrap();
        let lines = [
            r#"{"contract":"0312340001","numbers":[{"number":"0312340001","settings":{"enabled":true,"missed_onyl":true}}]}"#,
            r#"{"contract":"0312340002","numbers":[{"number":"0312340002","settings":{"destinations":[{"address":"a@example.jp","send":true,"label":"home"}]}}]}"#,
            r#"{"contract":"0312340003","numbers":[{"number":"0312340003","services":["fax"],"fax_settings":{"enabled":true,"resolution":"fine"}}]}"#,
            r#"{"contract":"0312340004","numbers":[{"number":"0312340004"}],"note":"x"}"#,
        ];
        let report = import(&store, lines.join("\n").as_bytes()).unwrap();
        let reasons: Vec<&str> = report.rejected.iter().map(|(_, reason)| reason.as_str()).collect();
        assert_eq!(report.rejected.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![1, 2, 3, 4], "{reasons:?}");
        assert!(reasons[0].contains("unknown field `numbers.0.settings.missed_onyl`"), "{reasons:?}");
        assert!(reasons[1].contains("`numbers.0.settings.destinations.0.label`"), "{reasons:?}");
        assert!(reasons[2].contains("`numbers.0.fax_settings.resolution`"), "{reasons:?}");
        assert!(reasons[3].contains("unknown field `note`"), "{reasons:?}");
        assert_eq!(store.numbers().count(), 0, "no rejected line is applied");
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

    /// R-M3, R-S9: the old subscriber opened the settings form of a number (version 0,
    /// never saved), and the operator moved the number to another line before the save
    /// reached the state owner. The save went through (the moved number started again
    /// at version 0) and put the old subscriber's address on the new subscriber's number.
    #[test]
    fn r_m3_a_save_from_before_a_number_moved_is_refused_as_stale() {
        let store = Store::temporary().unwrap();
        let old_line = r#"{"contract":"0312340001","numbers":[{"number":"0312340001"},{"number":"0312340002"}]}"#;
        import(&store, old_line.as_bytes()).unwrap();
        let form_version = store.number(&n("0312340002")).unwrap().unwrap().call.version;
        let new_line = r#"{"contract":"0312340009","numbers":[{"number":"0312340009"},{"number":"0312340002"}]}"#;
        import(&store, new_line.as_bytes()).unwrap();
        let old_subscribers = crate::store::CallSettings {
            enabled: true,
            destinations: vec![crate::store::Destination {
                address: crate::address::DestinationAddress::parse("old@example.jp").unwrap(),
                send: true,
            }],
            ..Default::default()
        };
        let saved = store.save_call_settings(&n("0312340002"), form_version, old_subscribers);
        assert!(matches!(saved, Err(StoreError::StaleVersion { .. })), "{saved:?}");
        assert!(store.number(&n("0312340002")).unwrap().unwrap().call.destinations.is_empty());
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
