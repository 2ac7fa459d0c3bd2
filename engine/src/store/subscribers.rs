//! Lines, numbers and their settings: reads, the provisioning upsert (R-L3, R-M3), the
//! site's saves (R-S9) and the line unit (R-I7). Every write of a number's record tells
//! the registered listeners at once.

use std::sync::Arc;

use super::state::{Attempt, Op, Reply, Written};
use super::{
    AuthUnit, CallSettings, CredentialRecord, FaxSettings, LineRecord, NumberRecord, Services, Store, StoreError,
};
use crate::phone::PhoneNumber;

/// The tree of the settings site's credentials, keyed by login number.
pub const CREDENTIALS_TREE: &str = "credentials";

/// The numbers with call notification (着信お知らせメール契約番号), keys only: what
/// a start reads instead of every number's record (at 10 000 000 numbers a walk of
/// them all took sled to 3.5 GB).
pub(super) const SUBSCRIBED_TREE: &str = "subscribed";

/// What an upsert of a line changed beyond the line itself.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Upserted {
    /// Numbers that were on another line (number, that line's contract): they arrive
    /// without their credential and with only the settings the import gave them, so
    /// nothing of the previous subscriber reaches the new one (R-M3).
    pub moved: Vec<(PhoneNumber, PhoneNumber)>,
    /// Numbers no longer listed: removed, credential and settings with them.
    pub removed: Vec<PhoneNumber>,
    /// Moved numbers past those in `moved`, left out of a state owner's answer so that
    /// it fits in a record ([`Upserted::list_at_most`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub moved_not_listed: usize,
    /// Removed numbers past those in `removed`, as `moved_not_listed`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub removed_not_listed: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Upserted {
    /// Keeps the first `moved` moved numbers and `removed` removed ones listed, and
    /// counts the rest; how many of each it still lists.
    pub fn list_at_most(&mut self, moved: usize, removed: usize) -> (usize, usize) {
        let moved = self.moved.len().min(moved);
        self.moved_not_listed += self.moved.len() - moved;
        self.moved.truncate(moved);
        let removed = self.removed.len().min(removed);
        self.removed_not_listed += self.removed.len() - removed;
        self.removed.truncate(removed);
        (moved, removed)
    }
}

/// A stored record of `number` (or of its line) this version cannot read.
fn unreadable(number: &PhoneNumber, e: serde_json::Error) -> StoreError {
    StoreError::UnreadableNumber { number: *number, why: e.to_string() }
}

/// Told of a number's new services (`None`: the number was removed).
pub(super) type Listener = Arc<dyn Fn(&PhoneNumber, Option<Services>) + Send + Sync>;

impl Store {
    /// Registers `f` to be called with every number whose record changes and the
    /// services of its new record, right after the write. Services, not the record: a
    /// view reads no more of a value it applies from the state topic than it needs.
    pub fn on_number_change(&self, f: impl Fn(&PhoneNumber, Option<Services>) + Send + Sync + 'static) {
        self.listeners.write().expect("listener lock").push(Arc::new(f));
    }

    /// Keeps the index of subscribed numbers and tells the listeners, after writes of
    /// these numbers' records.
    pub(super) fn changed(&self, records: &[(PhoneNumber, Option<Services>)]) -> Result<(), StoreError> {
        for (number, services) in records {
            self.index_subscribed(number, services.is_some_and(|s| s.call))?;
        }
        self.tell_listeners(records);
        Ok(())
    }

    /// Tells the listeners of each of `records`, its index written already.
    pub(super) fn tell_listeners(&self, records: &[(PhoneNumber, Option<Services>)]) {
        if records.is_empty() {
            return;
        }
        let listeners = self.listeners.read().expect("listener lock").clone();
        for (number, services) in records {
            listeners.iter().for_each(|f| f(number, *services));
        }
    }

    /// Records whether `number` has call notification in [`SUBSCRIBED_TREE`].
    pub(super) fn index_subscribed(&self, number: &PhoneNumber, call: bool) -> Result<(), StoreError> {
        if call {
            self.subscribed.insert(number.as_str(), &[])?;
        } else {
            // Most numbers have no call notification: sled (0.34) writes nothing for a
            // removal that finds no key, so a lookup first would only add a read.
            self.subscribed.remove(number.as_str())?;
        }
        Ok(())
    }

    /// Fills [`SUBSCRIBED_TREE`] from every number's record, once: stores written
    /// before it existed have none. A marker says it is done; a crash before it only
    /// means doing it again.
    pub(super) fn index_subscribed_once(&self) -> Result<(), StoreError> {
        const DONE: &[u8] = b"subscribed indexed";
        if self.db.contains_key(DONE)? {
            return Ok(());
        }
        let (mut numbers, mut subscribed) = (0usize, 0usize);
        for record in self.numbers() {
            let record = record?;
            self.index_subscribed(&record.number, record.services.call)?;
            numbers += 1;
            subscribed += usize::from(record.services.call);
        }
        self.db.flush()?;
        self.db.insert(DONE, &[])?;
        if numbers > 0 {
            tracing::info!(numbers, subscribed, "the numbers with call notification indexed, once");
        }
        Ok(())
    }

    /// Every number with call notification, in number order.
    pub fn subscribed_numbers(&self) -> impl Iterator<Item = Result<PhoneNumber, StoreError>> + '_ {
        self.subscribed.iter().keys().map(|key| {
            let key = key?;
            std::str::from_utf8(&key)
                .ok()
                .and_then(|k| PhoneNumber::parse(k).ok())
                .ok_or_else(|| StoreError::State(format!("the index of subscribed numbers holds {key:?}")))
        })
    }

    pub fn number(&self, number: &PhoneNumber) -> Result<Option<NumberRecord>, StoreError> {
        let unreadable = |e: serde_json::Error| StoreError::UnreadableNumber { number: *number, why: e.to_string() };
        self.numbers.get(number.as_str())?.map(|raw| serde_json::from_slice(&raw).map_err(unreadable)).transpose()
    }

    /// The line of contract number `contract`: its record, or the line of that number
    /// alone ([`Store::implicit_line`]).
    pub fn line(&self, contract: &PhoneNumber) -> Result<Option<LineRecord>, StoreError> {
        match self.lines.get(contract.as_str())? {
            Some(raw) => Ok(Some(serde_json::from_slice(&raw)?)),
            None => self.implicit_line(contract),
        }
    }

    /// A line of its contract number alone, with no unit set, may have no record of its
    /// own (written so with `store.one_record_lines`): its number's record, whose line is
    /// its own number, stands for it. Most lines are such (a home line), and a record
    /// less a line is a write less at an import, a record less in the state topic and in
    /// a catch-up. Any other line has its record ([`LineRecord::implicit`]). A number
    /// record this version cannot read stands for no line here ([`Store::line`]); a
    /// removal of the line takes it all the same.
    pub(super) fn implicit_line(&self, contract: &PhoneNumber) -> Result<Option<LineRecord>, StoreError> {
        let Some(raw) = self.numbers.get(contract.as_str())? else { return Ok(None) };
        let own = serde_json::from_slice::<super::records::OfLine>(&raw).is_ok_and(|of| of.contract == *contract);
        Ok(own.then(|| LineRecord { contract: *contract, numbers: vec![*contract], unit: None }))
    }

    /// Every number's record, in number order (exports, audits, tests).
    pub fn numbers(&self) -> impl Iterator<Item = Result<NumberRecord, StoreError>> + '_ {
        self.numbers.iter().map(|kv| Ok(serde_json::from_slice(&kv?.1)?))
    }

    /// Every line, in contract-number order: the lines' records and the lines without
    /// one ([`Store::implicit_line`]), one walk of each tree.
    pub fn lines(&self) -> impl Iterator<Item = Result<LineRecord, StoreError>> + '_ {
        let mut recorded = self.lines.iter().peekable();
        let mut numbers = self.numbers.iter().peekable();
        std::iter::from_fn(move || loop {
            // The next line with a record comes first unless a number's key sorts before it.
            let number_first = match (recorded.peek(), numbers.peek()) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(Ok((line, _))), Some(Ok((number, _)))) => number < line,
                (Some(Err(_)), _) => false,
                (_, Some(Err(_))) => true,
            };
            if !number_first {
                let (key, raw) = match recorded.next()? {
                    Ok(kv) => kv,
                    Err(e) => return Some(Err(e.into())),
                };
                // Its contract number's record is the line's, not a line of its own.
                if numbers.peek().is_some_and(|n| n.as_ref().is_ok_and(|(number, _)| *number == key)) {
                    numbers.next();
                }
                return Some(serde_json::from_slice(&raw).map_err(StoreError::from));
            }
            let (key, raw) = match numbers.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            let of = match serde_json::from_slice::<super::records::OfLine>(&raw) {
                Ok(of) => of,
                // Said, not passed over: it may be a line with no record of its own, and
                // an export would leave it out without a word.
                Err(e) => {
                    return Some(Err(match std::str::from_utf8(&key).ok().and_then(|k| PhoneNumber::parse(k).ok()) {
                        Some(number) => unreadable(&number, e),
                        None => StoreError::State(format!("the numbers tree holds {key:?}")),
                    }))
                }
            };
            if of.contract.as_str().as_bytes() == key.as_ref() {
                return Some(Ok(LineRecord { contract: of.contract, numbers: vec![of.contract], unit: None }));
            }
        })
    }

    /// The settings site's credential of login number `number`, if it has one.
    pub fn credential(&self, number: &PhoneNumber) -> Result<Option<CredentialRecord>, StoreError> {
        self.credentials
            .get(number.as_str())?
            .map(|raw| serde_json::from_slice(&raw).map_err(StoreError::from))
            .transpose()
    }

    /// Restores `number`'s credential as exported (provisioning): it replaces the one
    /// the number has. Refused for a number not provisioned.
    pub fn restore_credential(&self, number: &PhoneNumber, record: &CredentialRecord) -> Result<(), StoreError> {
        expect_done(self.submit(Op::RestoreCredential { number: *number, record: record.clone(), line: None })?)
    }

    /// Sets `number`'s credential (a temporary password by phone, a password on the
    /// site), replacing whatever it had.
    pub fn set_credential(&self, number: &PhoneNumber, record: &CredentialRecord) -> Result<(), StoreError> {
        self.set_credential_on_line(number, None, record)
    }

    /// [`Store::set_credential`] while `number` is on the line of `line`, where given:
    /// else [`StoreError::UnknownNumber`], nothing set (it moved, or its line was removed,
    /// since its subscriber was asked).
    pub fn set_credential_on_line(
        &self,
        number: &PhoneNumber,
        line: Option<&PhoneNumber>,
        record: &CredentialRecord,
    ) -> Result<(), StoreError> {
        let record = record.clone();
        expect_done(self.submit(match line {
            None => Op::SetCredential { number: *number, record },
            Some(line) => Op::RestoreCredential { number: *number, record, line: Some(*line) },
        })?)
    }

    /// Deletes `number`'s credential; whether there was one.
    pub fn remove_credential(&self, number: &PhoneNumber) -> Result<bool, StoreError> {
        match self.submit(Op::RemoveCredential { number: *number })? {
            Reply::Removed(removed) => Ok(removed),
            other => Err(unexpected(other)),
        }
    }

    /// Counts a login attempt whose password was checked against `hash` (R-S2, R-S3).
    pub fn login_attempt(
        &self,
        number: &PhoneNumber,
        hash: &str,
        matched: bool,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Attempt, StoreError> {
        match self.submit(Op::LoginAttempt { number: *number, hash: hash.to_owned(), matched, now })? {
            Reply::Attempt(attempt) => Ok(attempt),
            other => Err(unexpected(other)),
        }
    }

    /// Writes a line and its numbers (provisioning, R-L3).
    ///
    /// The line replaces what was stored for its contract: numbers no longer listed are
    /// removed, numbers moved from another line leave it. A number keeps its settings
    /// unless `settings` has an entry for it.
    pub fn upsert_line(
        &self,
        line: &LineRecord,
        numbers: &[(PhoneNumber, Services, Option<CallSettings>)],
    ) -> Result<Upserted, StoreError> {
        match self.submit(Op::UpsertLine { line: line.clone(), numbers: numbers.to_vec() })? {
            Reply::Upserted(upserted) => Ok(upserted),
            other => Err(unexpected(other)),
        }
    }

    /// Removes the line of `contract` (provisioning: its contract ended, R-L3): its numbers
    /// go with their passwords (and so their site sessions), settings and faxes, as a
    /// number its line no longer lists does (R-M3), and the report names each. No such line: nothing
    /// to remove (an import run again gives the same state).
    pub fn remove_line(&self, contract: &PhoneNumber) -> Result<Upserted, StoreError> {
        match self.submit(Op::RemoveLine { contract: *contract })? {
            Reply::Upserted(removed) => Ok(removed),
            other => Err(unexpected(other)),
        }
    }

    /// Carries out [`Store::remove_line`] on this store; `written` as for
    /// [`Store::upsert_line_here`].
    pub(super) fn remove_line_here(
        &self,
        contract: &PhoneNumber,
        written: &mut Written,
    ) -> Result<Upserted, StoreError> {
        let mut touched = Vec::new();
        let removed = self.remove_line_writing(contract, written, &mut touched);
        let told = self.changed(&touched);
        let removed = removed?;
        told?;
        Ok(removed)
    }

    fn remove_line_writing(
        &self,
        contract: &PhoneNumber,
        written: &mut Written,
        touched: &mut Vec<(PhoneNumber, Option<Services>)>,
    ) -> Result<Upserted, StoreError> {
        let mut removed = Upserted::default();
        let line: LineRecord = match self.lines.get(contract.as_str())? {
            Some(raw) => serde_json::from_slice(&raw).map_err(|e| unreadable(contract, e))?,
            None => match self.implicit_line(contract)? {
                Some(line) => line,
                // A number's record this version cannot read, with no line's record: it
                // may stand for its line ([`Store::implicit_line`]), and goes as its line,
                // as the operator's way out of a damaged record is to remove it.
                None if self
                    .numbers
                    .get(contract.as_str())?
                    .is_some_and(|raw| serde_json::from_slice::<super::records::OfLine>(&raw).is_err()) =>
                {
                    LineRecord { contract: *contract, numbers: vec![*contract], unit: None }
                }
                None => return Ok(removed),
            },
        };
        for number in &line.numbers {
            // Only what is this line's: a number another line holds stays there. One whose
            // record cannot be read goes with the line that lists it.
            let Some(raw) = self.numbers.get(number.as_str())? else { continue };
            if serde_json::from_slice::<super::records::OfLine>(&raw).is_ok_and(|record| record.contract != *contract) {
                continue;
            }
            self.take_off_line_here(number, written, touched)?;
            removed.removed.push(*number);
        }
        // Its subscriber's open sessions end at their next request, as a number's that
        // leaves its line: their credential is gone (not ended here, which would read
        // every session of every subscriber for each line removed).
        if self.lines.remove(contract.as_str())?.is_some() {
            written.line_removed(contract);
        }
        Ok(removed)
    }

    /// Removes `number`, which leaves its line: it takes nothing with it, not its
    /// settings, not the password its old subscriber set (and so not their sessions), not
    /// the faxes received for them (R-M3). `touched` is told at once, should what follows
    /// fail.
    fn take_off_line_here(
        &self,
        number: &PhoneNumber,
        written: &mut Written,
        touched: &mut Vec<(PhoneNumber, Option<Services>)>,
    ) -> Result<(), StoreError> {
        if self.numbers.remove(number.as_str())?.is_some() {
            written.number(number, None);
        }
        touched.push((*number, None));
        if self.credentials.remove(number.as_str())?.is_some() {
            written.credential_removed(number);
        }
        self.forget_faxes_here(number, written)
    }

    /// Carries out [`Store::upsert_line`] on this store.
    ///
    /// Plain writes, not a sled transaction over the three trees: a transaction per
    /// line took six times as long and seven times the memory (1 000 000 lines: 52 s
    /// and 2.5 GB against 8.6 s and 370 MB). Each write of a record this upsert read is
    /// a compare-and-swap against what it read, so a concurrent write makes it read
    /// again and start over. A crash in between leaves a line half written: the state
    /// owner's batch mark rebuilds its store from the topic, and an import into a store
    /// of its own is run again (importing the same file twice gives the same state).
    ///
    /// `written` gets each value as it is written, so that what an upsert failing part
    /// way wrote is published all the same; the cache and the subscribed index follow
    /// those writes too.
    pub(super) fn upsert_line_here(
        &self,
        line: &LineRecord,
        numbers: &[(PhoneNumber, Services, Option<CallSettings>)],
        written: &mut Written,
    ) -> Result<Upserted, StoreError> {
        let mut touched = Vec::new();
        let upserted = self.upsert_line_writing(line, numbers, written, &mut touched);
        let told = self.changed(&touched);
        // The upsert's own failure is the one to tell.
        let mut upserted = upserted?;
        told?;
        // Each pass of 'again noted what it found: once each, in the order first found.
        let mut seen = std::collections::HashSet::new();
        upserted.moved.retain(|(number, _)| seen.insert(*number));
        seen.clear();
        upserted.removed.retain(|number| seen.insert(*number));
        Ok(upserted)
    }

    /// [`Store::upsert_line_here`]'s writes; `touched` gets the numbers whose services
    /// changed.
    fn upsert_line_writing(
        &self,
        line: &LineRecord,
        numbers: &[(PhoneNumber, Services, Option<CallSettings>)],
        written: &mut Written,
        touched: &mut Vec<(PhoneNumber, Option<Services>)>,
    ) -> Result<Upserted, StoreError> {
        // Kept over a start-over: what an earlier attempt wrote stays written.
        let mut upserted = Upserted::default();
        'again: loop {
            self.check_contracts_taken(line, numbers)?;
            let old_raw = self.lines.get(line.contract.as_str())?;
            let old_line: Option<LineRecord> = match old_raw.as_deref() {
                Some(raw) => Some(serde_json::from_slice(raw).map_err(|e| unreadable(&line.contract, e))?),
                // A line without a record ([`Store::implicit_line`]) matters here only
                // where it would differ from none: a unit other than `number` set, or its
                // number not listed. Else a read less a line.
                None if line.unit.is_some_and(|unit| unit != AuthUnit::Number)
                    || !line.numbers.contains(&line.contract) =>
                {
                    self.implicit_line(&line.contract)?
                }
                None => None,
            };
            if let Some(old) = &old_line {
                for gone in old.numbers.iter().filter(|n| !line.numbers.contains(n)) {
                    self.take_off_line_here(gone, written, touched)?;
                    upserted.removed.push(*gone);
                }
            }
            let mut stored = line.clone();
            let old_unit = old_line.as_ref().and_then(|l| l.unit);
            if stored.unit.is_none() {
                stored.unit = old_unit;
            }
            // A unit the operator changes removes the credentials the new unit does not
            // use, as a change by phone or on the site does (R-O2, R-O3): under `line`
            // or `number` an additional number's password left from before would log
            // in with the new unit's reach (R-A1, R-A2). Its sessions end with it.
            // (No unit reads as `number`, as at login.)
            let effective = |unit: Option<AuthUnit>| unit.unwrap_or(AuthUnit::Number);
            let unit_changed = old_line.is_some() && effective(stored.unit) != effective(old_unit);
            if unit_changed && stored.unit != Some(AuthUnit::AdminUser) {
                for other in stored.numbers.iter().filter(|n| **n != stored.contract) {
                    if self.credentials.remove(other.as_str())?.is_some() {
                        written.credential_removed(other);
                    }
                }
            }
            // And the line's sessions end, as they do on a change by phone: one that went
            // on would keep the old unit's reach and idle timeout (R-S7).
            if unit_changed {
                self.end_sessions(
                    |_, session| stored.numbers.contains(&session.number),
                    |id| written.session_removed(id),
                )?;
            }
            for (number, services, settings) in numbers {
                let raw = self.numbers.get(number.as_str())?;
                let mut past_versions = None;
                let mut moved_in_at = None;
                let mut old: Option<NumberRecord> =
                    raw.as_deref().map(serde_json::from_slice).transpose().map_err(|e| unreadable(number, e))?;
                // A number new to the store has no credential: one left from before it
                // was removed (by an older version) belongs to someone else.
                if old.is_none() && self.credentials.remove(number.as_str())?.is_some() {
                    written.credential_removed(number);
                }
                if let Some(other) = old.as_ref().map(|o| o.contract).filter(|c| *c != line.contract) {
                    // The number moves between lines: the old line must not list it, and
                    // the new subscriber gets neither the old one's settings (their
                    // addresses would get the new one's calls) nor their password nor
                    // their faxes.
                    if *number == other {
                        // Its line's last number (checked above): the line ends with it.
                        if self.lines.remove(other.as_str())?.is_some() {
                            written.line_removed(&other);
                        }
                    } else if let Some(raw) =
                        self.update_line(&other, |other_line| other_line.numbers.retain(|n| n != number))?
                    {
                        written.line(&other, raw);
                    }
                    if self.credentials.remove(number.as_str())?.is_some() {
                        written.credential_removed(number);
                    }
                    self.forget_faxes_here(number, written)?;
                    upserted.moved.push((*number, other));
                    // Its settings start over past the old ones' versions: a save from
                    // the old subscriber's form, checked before the move and carried out
                    // after it, is then refused as stale instead of putting their
                    // addresses on the new subscriber's number (R-S9).
                    past_versions = old.as_ref().map(|o| (o.call.version + 1, o.fax.version + 1));
                    moved_in_at = Some((self.clock)().timestamp());
                    old = None;
                }
                let old_call = old.as_ref().map(|o| &o.call);
                let call = match (settings, old_call) {
                    (None, Some(old)) => old.clone(),
                    (None, None) => CallSettings::default(),
                    (Some(new), None) => new.clone(),
                    // Re-importing the same settings is a no-op; different ones are a
                    // save like any other and bump the version (R-S9).
                    (Some(new), Some(old)) => {
                        let same = CallSettings { version: old.version, ..new.clone() };
                        if same == *old {
                            same
                        } else {
                            CallSettings { version: old.version + 1, ..new.clone() }
                        }
                    }
                };
                // Fax settings are the site's: an import keeps them (a moved number
                // arrives without them, as without its call settings).
                let mut fax = old.as_ref().map(|o| o.fax.clone()).unwrap_or_default();
                let mut call = call;
                if let Some((call_version, fax_version)) = past_versions {
                    call.version = call.version.max(call_version);
                    fax.version = fax.version.max(fax_version);
                }
                let moved_in_at = moved_in_at.or(old.as_ref().and_then(|o| o.moved_in_at));
                let record = NumberRecord {
                    number: *number,
                    contract: line.contract,
                    services: *services,
                    call,
                    fax,
                    moved_in_at,
                };
                if old.as_ref() != Some(&record) {
                    let new = sled::IVec::from(serde_json::to_vec(&record)?);
                    if self.numbers.compare_and_swap(number.as_str(), raw, Some(new.clone()))?.is_err() {
                        continue 'again;
                    }
                    written.number(number, Some(new));
                    touched.push((*number, Some(record.services)));
                }
            }
            if self.one_record_lines && old_raw.is_none() && stored.implicit() {
                return Ok(upserted);
            }
            let new = sled::IVec::from(serde_json::to_vec(&stored)?);
            if old_raw.as_ref() != Some(&new) {
                if self.lines.compare_and_swap(line.contract.as_str(), old_raw, Some(new.clone()))?.is_err() {
                    continue 'again;
                }
                written.line(&line.contract, new);
            }
            return Ok(upserted);
        }
    }

    /// Refuses `line` before it writes anything if it takes another line's contract number
    /// while that line has other numbers (R-L1): the line would stay keyed by a number it
    /// no longer has, and its export would not import.
    fn check_contracts_taken(
        &self,
        line: &LineRecord,
        numbers: &[(PhoneNumber, Services, Option<CallSettings>)],
    ) -> Result<(), StoreError> {
        for (number, ..) in numbers.iter().filter(|(number, ..)| *number != line.contract) {
            let Some(raw) = self.lines.get(number.as_str())? else { continue };
            let taken: LineRecord = serde_json::from_slice(&raw).map_err(|e| unreadable(number, e))?;
            // A line that no longer has its contract number (left so by an older
            // version) keys nothing this line takes; what this line takes too stays
            // with it (a line taken over whole).
            if !taken.numbers.contains(number) {
                continue;
            }
            let others: Vec<PhoneNumber> =
                taken.numbers.into_iter().filter(|n| n != number && !line.numbers.contains(n)).collect();
            if !others.is_empty() {
                return Err(StoreError::ContractInUse { number: *number, others });
            }
        }
        Ok(())
    }

    /// Changes the record of line `contract`, if there is one, by `change`; its new value.
    fn update_line(
        &self,
        contract: &PhoneNumber,
        change: impl Fn(&mut LineRecord),
    ) -> Result<Option<sled::IVec>, StoreError> {
        loop {
            let raw = self.lines.get(contract.as_str())?;
            let mut line: LineRecord = match &raw {
                Some(raw) => serde_json::from_slice(raw)?,
                // Changed, a line without a record gets one.
                None => match self.implicit_line(contract)? {
                    Some(line) => line,
                    None => return Ok(None),
                },
            };
            change(&mut line);
            let new = sled::IVec::from(serde_json::to_vec(&line)?);
            if self.lines.compare_and_swap(contract.as_str(), raw, Some(new.clone()))?.is_ok() {
                return Ok(Some(new));
            }
        }
    }

    /// Saves a number's settings if they were edited from version `expected` (R-S9);
    /// returns the new version.
    pub fn save_call_settings(
        &self,
        number: &PhoneNumber,
        expected: u64,
        settings: CallSettings,
    ) -> Result<u64, StoreError> {
        settings.validate()?;
        match self.submit(Op::SaveCallSettings { number: *number, expected, settings })? {
            Reply::Version(version) => Ok(version),
            other => Err(unexpected(other)),
        }
    }

    pub(super) fn save_call_settings_here(
        &self,
        number: &PhoneNumber,
        expected: u64,
        settings: CallSettings,
    ) -> Result<u64, StoreError> {
        settings.validate()?;
        self.update_number(number, |record| {
            if record.call.version != expected {
                return Err(StoreError::StaleVersion { current: record.call.version });
            }
            record.call = CallSettings { version: expected + 1, ..settings.clone() };
            Ok(expected + 1)
        })
    }

    /// Saves a number's fax settings if they were edited from version `expected` (R-F1,
    /// R-S9); returns the new version.
    pub fn save_fax_settings(
        &self,
        number: &PhoneNumber,
        expected: u64,
        settings: FaxSettings,
    ) -> Result<u64, StoreError> {
        settings.validate()?;
        match self.submit(Op::SaveFaxSettings { number: *number, expected, settings })? {
            Reply::Version(version) => Ok(version),
            other => Err(unexpected(other)),
        }
    }

    pub(super) fn save_fax_settings_here(
        &self,
        number: &PhoneNumber,
        expected: u64,
        settings: FaxSettings,
    ) -> Result<u64, StoreError> {
        settings.validate()?;
        self.update_number(number, |record| {
            if record.fax.version != expected {
                return Err(StoreError::StaleVersion { current: record.fax.version });
            }
            record.fax = FaxSettings { version: expected + 1, ..settings.clone() };
            Ok(expected + 1)
        })
    }

    /// Provisioning's fax settings for `number`, as an import treats call settings: the
    /// same settings again change nothing, different ones are a save and bump the version
    /// (R-S9), and a number without any takes them as given (an export's version kept).
    /// Returns the version now stored.
    pub(super) fn import_fax_settings_here(
        &self,
        number: &PhoneNumber,
        settings: &FaxSettings,
    ) -> Result<u64, StoreError> {
        settings.validate()?;
        self.update_number(number, |record| {
            let old = &record.fax;
            record.fax = if old.is_default() {
                // Never saved: the import's, past version 0, so that a form the site showed
                // before it (at 0) is refused as stale instead of overwriting it (R-S9);
                // an export's own version is kept.
                match settings.is_default() {
                    true => old.clone(),
                    false => FaxSettings { version: settings.version.max(1), ..settings.clone() },
                }
            } else if (FaxSettings { version: old.version, ..settings.clone() }) == *old {
                old.clone()
            } else {
                FaxSettings { version: old.version + 1, ..settings.clone() }
            };
            Ok(record.fax.version)
        })
    }

    /// Changes `number`'s record by `change` (which may refuse, or say what to answer),
    /// tells the listeners, and answers what `change` said. A concurrent write of the
    /// record makes it read and change it again.
    fn update_number<T>(
        &self,
        number: &PhoneNumber,
        change: impl Fn(&mut NumberRecord) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        loop {
            let raw = self.numbers.get(number.as_str())?.ok_or(StoreError::UnknownNumber(*number))?;
            let mut record: NumberRecord = serde_json::from_slice(&raw)?;
            let answer = change(&mut record)?;
            let new = serde_json::to_vec(&record)?;
            if self.numbers.compare_and_swap(number.as_str(), Some(raw), Some(new))?.is_ok() {
                self.changed(&[(*number, Some(record.services))])?;
                return Ok(answer);
            }
        }
    }

    /// Sets the authentication unit of a line (R-I7: chosen by phone).
    pub fn set_line_unit(&self, contract: &PhoneNumber, unit: AuthUnit) -> Result<(), StoreError> {
        expect_done(self.submit(Op::SetLineUnit { contract: *contract, unit })?)
    }

    /// A change of the line's unit (R-O2, R-O3, R-I7): the credentials of `removed` go
    /// first (one exchange with the state owner), and the unit changes only once every
    /// one of them is gone. Failing part-way it leaves at worst numbers without a
    /// password (set again by phone), never one whose password logs in with the new
    /// unit's reach. (The owner carries out a request's ops one by one and goes on past
    /// a failed one: the unit cannot go in the same request.)
    pub fn change_line_unit(
        &self,
        contract: &PhoneNumber,
        unit: AuthUnit,
        removed: &[PhoneNumber],
    ) -> Result<(), StoreError> {
        let removals = removed.iter().map(|number| Op::RemoveCredential { number: *number }).collect();
        for answer in self.submit_all(removals) {
            answer?;
        }
        self.set_line_unit(contract, unit)
    }

    pub(super) fn set_line_unit_here(&self, contract: &PhoneNumber, unit: AuthUnit) -> Result<(), StoreError> {
        match self.update_line(contract, |line| line.unit = Some(unit))? {
            Some(_) => Ok(()),
            None => Err(StoreError::UnknownNumber(*contract)),
        }
    }
}

fn expect_done(reply: Reply) -> Result<(), StoreError> {
    match reply {
        Reply::Done => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// An answer of another kind than the op asks for: an owner of another version.
pub(super) fn unexpected(reply: Reply) -> StoreError {
    StoreError::State(format!("the state owner answered {reply:?}, not what the write asks for"))
}
