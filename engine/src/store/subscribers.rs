//! Lines, numbers and their settings: reads, the provisioning upsert (R-L3, R-M3), the
//! site's saves (R-S9) and the line unit (R-I7). Every write of a number's record tells
//! the registered listeners at once.

use std::sync::Arc;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::state::{Attempt, Op, Reply};
use super::{AuthUnit, CallSettings, CredentialRecord, LineRecord, NumberRecord, Services, Store, StoreError};
use crate::phone::PhoneNumber;

/// The tree of the settings site's credentials, keyed by login number.
pub const CREDENTIALS_TREE: &str = "credentials";

/// What an upsert of a line changed beyond the line itself.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Upserted {
    /// Numbers that were on another line (number, that line's contract): they arrive
    /// without their credential and with only the settings the import gave them, so
    /// nothing of the previous subscriber reaches the new one (R-M3).
    pub moved: Vec<(PhoneNumber, PhoneNumber)>,
    /// Numbers no longer listed: removed, credential and settings with them.
    pub removed: Vec<PhoneNumber>,
}

/// Told of a number's new record (`None`: the number was removed).
pub(super) type Listener = Arc<dyn Fn(&PhoneNumber, Option<&NumberRecord>) + Send + Sync>;

impl Store {
    /// Registers `f` to be called with every number whose record changes and its new
    /// record, right after the write.
    pub fn on_number_change(&self, f: impl Fn(&PhoneNumber, Option<&NumberRecord>) + Send + Sync + 'static) {
        self.listeners.write().expect("listener lock").push(Arc::new(f));
    }

    pub(super) fn changed(&self, records: &[(PhoneNumber, Option<NumberRecord>)]) {
        let listeners = self.listeners.read().expect("listener lock").clone();
        for (number, record) in records {
            listeners.iter().for_each(|f| f(number, record.as_ref()));
        }
    }

    pub fn number(&self, number: &PhoneNumber) -> Result<Option<NumberRecord>, StoreError> {
        self.numbers.get(number.as_str())?.map(|raw| serde_json::from_slice(&raw).map_err(StoreError::from)).transpose()
    }

    pub fn line(&self, contract: &PhoneNumber) -> Result<Option<LineRecord>, StoreError> {
        self.lines.get(contract.as_str())?.map(|raw| serde_json::from_slice(&raw).map_err(StoreError::from)).transpose()
    }

    /// Every number's record, in number order (exports, audits, tests).
    pub fn numbers(&self) -> impl Iterator<Item = Result<NumberRecord, StoreError>> + '_ {
        self.numbers.iter().map(|kv| Ok(serde_json::from_slice(&kv?.1)?))
    }

    /// Every line's record, in contract-number order.
    pub fn lines(&self) -> impl Iterator<Item = Result<LineRecord, StoreError>> + '_ {
        self.lines.iter().map(|kv| Ok(serde_json::from_slice(&kv?.1)?))
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
        expect_done(self.submit(Op::RestoreCredential { number: *number, record: record.clone() })?)
    }

    /// Sets `number`'s credential (a temporary password by phone, a password on the
    /// site), replacing whatever it had.
    pub fn set_credential(&self, number: &PhoneNumber, record: &CredentialRecord) -> Result<(), StoreError> {
        expect_done(self.submit(Op::SetCredential { number: *number, record: record.clone() })?)
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

    /// How many numbers are provisioned: a walk of the whole tree (sled keeps no count),
    /// so for start-up and tools, not a request path.
    pub fn number_count(&self) -> usize {
        self.numbers.len()
    }

    /// Writes a line and its numbers as one transaction (provisioning, R-L3).
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

    pub(super) fn upsert_line_here(
        &self,
        line: &LineRecord,
        numbers: &[(PhoneNumber, Services, Option<CallSettings>)],
    ) -> Result<Upserted, StoreError> {
        let result = (&self.lines, &self.numbers, &self.credentials).transaction(|(lines, nums, credentials)| {
            let mut touched: Vec<(PhoneNumber, Option<NumberRecord>)> = Vec::new();
            let mut upserted = Upserted::default();
            let abort = |e: StoreError| ConflictableTransactionError::Abort(e);
            let old_line: Option<LineRecord> = match lines.get(line.contract.as_str())? {
                Some(raw) => Some(serde_json::from_slice(&raw).map_err(|e| abort(e.into()))?),
                None => None,
            };
            if let Some(old) = &old_line {
                for gone in old.numbers.iter().filter(|n| !line.numbers.contains(n)) {
                    // A number that leaves the line takes nothing with it: not its
                    // settings, not the password its old subscriber set (R-M3).
                    nums.remove(gone.as_str())?;
                    credentials.remove(gone.as_str())?;
                    touched.push((*gone, None));
                    upserted.removed.push(*gone);
                }
            }
            let mut stored = line.clone();
            if stored.unit.is_none() {
                stored.unit = old_line.and_then(|l| l.unit);
            }
            for (number, services, settings) in numbers {
                let mut old: Option<NumberRecord> = match nums.get(number.as_str())? {
                    Some(raw) => Some(serde_json::from_slice(&raw).map_err(|e| abort(e.into()))?),
                    // A number new to the store has no credential: one left from before
                    // it was removed (by an older version) belongs to someone else.
                    None => {
                        credentials.remove(number.as_str())?;
                        None
                    }
                };
                if let Some(other) = old.as_ref().map(|o| o.contract).filter(|c| *c != line.contract) {
                    // The number moves between lines: the old line must not list it, and
                    // the new subscriber gets neither the old one's settings (their
                    // addresses would get the new one's calls) nor their password.
                    if let Some(raw) = lines.get(other.as_str())? {
                        let mut other_line: LineRecord = serde_json::from_slice(&raw).map_err(|e| abort(e.into()))?;
                        other_line.numbers.retain(|n| n != number);
                        let raw = serde_json::to_vec(&other_line).map_err(|e| abort(e.into()))?;
                        lines.insert(other.as_str(), raw)?;
                    }
                    credentials.remove(number.as_str())?;
                    upserted.moved.push((*number, other));
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
                let record = NumberRecord { number: *number, contract: line.contract, services: *services, call };
                if old.as_ref() != Some(&record) {
                    let raw = serde_json::to_vec(&record).map_err(|e| abort(e.into()))?;
                    nums.insert(number.as_str(), raw)?;
                    touched.push((*number, Some(record)));
                }
            }
            let raw = serde_json::to_vec(&stored).map_err(|e| abort(e.into()))?;
            lines.insert(line.contract.as_str(), raw)?;
            Ok((touched, upserted))
        });
        match result {
            Ok((touched, upserted)) => {
                self.changed(&touched);
                Ok(upserted)
            }
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
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
        loop {
            let raw = self.numbers.get(number.as_str())?.ok_or(StoreError::UnknownNumber(*number))?;
            let mut record: NumberRecord = serde_json::from_slice(&raw)?;
            if record.call.version != expected {
                return Err(StoreError::StaleVersion { current: record.call.version });
            }
            record.call = CallSettings { version: expected + 1, ..settings.clone() };
            let new = serde_json::to_vec(&record)?;
            if self.numbers.compare_and_swap(number.as_str(), Some(raw), Some(new))?.is_ok() {
                self.changed(&[(*number, Some(record))]);
                return Ok(expected + 1);
            }
        }
    }

    /// Sets the authentication unit of a line (R-I7: chosen by phone).
    pub fn set_line_unit(&self, contract: &PhoneNumber, unit: AuthUnit) -> Result<(), StoreError> {
        expect_done(self.submit(Op::SetLineUnit { contract: *contract, unit })?)
    }

    pub(super) fn set_line_unit_here(&self, contract: &PhoneNumber, unit: AuthUnit) -> Result<(), StoreError> {
        loop {
            let raw = self.lines.get(contract.as_str())?.ok_or(StoreError::UnknownNumber(*contract))?;
            let mut line: LineRecord = serde_json::from_slice(&raw)?;
            line.unit = Some(unit);
            let new = serde_json::to_vec(&line)?;
            if self.lines.compare_and_swap(contract.as_str(), Some(raw), Some(new))?.is_ok() {
                return Ok(());
            }
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
fn unexpected(reply: Reply) -> StoreError {
    StoreError::State(format!("the state owner answered {reply:?}, not what the write asks for"))
}
