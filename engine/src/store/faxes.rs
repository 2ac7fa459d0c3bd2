//! Received faxes kept for the settings site (R-F1): what was received, and the document
//! itself, for `store.fax_retention_days`.
//!
//! Both are subscriber state ([`super::state`]): the node that reads a fax record has the
//! state owner keep it, and every node applies it, so any node's site shows any fax. A
//! fax the subscriber deletes keeps its record, marked deleted and without its document,
//! until it expires: the same fax record read again (a replay, a partition's next reader)
//! then finds it and does not bring the fax back.
//!
//! Trees, one key for both: `number/received (unix ms, 13 digits)/fax id`, so a number's
//! faxes are one key range in time order.
//! - `faxes`: key → [`FaxRecord`] (JSON).
//! - `fax_documents`: key → the document as the fax server sent it.

use chrono::{DateTime, TimeDelta, Utc};

use std::time::Duration;

use super::state::{Op, Reply, StateKey, StateTree, Written};
use super::{DocumentBytes, FaxRecord, Store, StoreError};
use crate::phone::PhoneNumber;

pub use super::records::{fax_key, FAXES_TREE, FAX_DOCUMENTS_TREE};

impl Store {
    /// Keeps a received fax, unless it is kept (or was deleted) already: whether it is
    /// new. Blocks on the state owner when the state is shared.
    pub fn keep_fax(&self, record: FaxRecord, document: Vec<u8>) -> Result<bool, StoreError> {
        match self.submit(Op::KeepFax { record, document: DocumentBytes(document) })? {
            Reply::Removed(kept) => Ok(kept),
            other => Err(super::subscribers::unexpected(other)),
        }
    }

    /// Faxes are kept for `retention` (`store.fax_retention_days`): one older is not
    /// listed or shown from now on, though [`expire_hourly`] has not removed it yet.
    pub fn keep_faxes_for(&self, retention: TimeDelta) {
        self.fax_retention_secs.store(retention.num_seconds(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `record` is one to show: not deleted, and within the retention.
    fn shown(&self, record: &FaxRecord) -> bool {
        let retention = self.fax_retention_secs.load(std::sync::atomic::Ordering::Relaxed);
        !record.deleted && (retention == 0 || record.received_at > (self.clock)() - TimeDelta::seconds(retention))
    }

    /// `number`'s faxes not deleted nor past their retention, newest first.
    pub fn faxes_of(&self, number: &PhoneNumber) -> Result<Vec<FaxRecord>, StoreError> {
        let prefix = format!("{number}/");
        let mut faxes = Vec::new();
        for item in self.faxes.scan_prefix(prefix.as_bytes()).rev() {
            let record: FaxRecord = serde_json::from_slice(&item?.1)?;
            if self.shown(&record) {
                faxes.push(record);
            }
        }
        Ok(faxes)
    }

    /// The fax under `key` if it belongs to `number`, is not deleted nor past its retention.
    pub fn fax(&self, number: &PhoneNumber, key: &str) -> Result<Option<FaxRecord>, StoreError> {
        if !key.starts_with(&format!("{number}/")) {
            return Ok(None);
        }
        let Some(raw) = self.faxes.get(key.as_bytes())? else { return Ok(None) };
        let record: FaxRecord = serde_json::from_slice(&raw)?;
        Ok(self.shown(&record).then_some(record))
    }

    /// The document of the fax under `key`, if it is kept.
    pub fn fax_document(&self, key: &str) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.fax_documents.get(key.as_bytes())?)
    }

    /// Marks the fax under `key` read (the site showed it).
    pub fn mark_fax_read(&self, key: &str) -> Result<(), StoreError> {
        self.submit(Op::MarkFaxRead { key: key.to_owned() }).map(drop)
    }

    /// Deletes the fax under `key`: whether there was one to delete.
    pub fn delete_fax(&self, key: &str) -> Result<bool, StoreError> {
        match self.submit(Op::DeleteFax { key: key.to_owned() })? {
            Reply::Removed(removed) => Ok(removed),
            other => Err(super::subscribers::unexpected(other)),
        }
    }

    /// Forgets every fax received before `before`, record and document.
    pub fn expire_faxes(&self, before: DateTime<Utc>) -> Result<(), StoreError> {
        self.submit(Op::ExpireFaxes { before }).map(drop)
    }

    /// How many faxes (records, deleted ones included) and document bytes this store holds.
    pub fn fax_usage(&self) -> Result<(usize, u64), StoreError> {
        let mut bytes = 0u64;
        for item in self.fax_documents.iter() {
            bytes += item?.1.len() as u64;
        }
        Ok((self.faxes.len(), bytes))
    }

    pub(super) fn keep_fax_here(
        &self,
        record: &FaxRecord,
        document: &DocumentBytes,
        written: &mut Written,
    ) -> Result<bool, StoreError> {
        let key = record.key();
        let value = sled::IVec::from(serde_json::to_vec(record)?);
        // Whoever keeps it first keeps it; the record is written last, so a record means
        // its document is there (or was deleted).
        if self.faxes.contains_key(key.as_bytes())? {
            return Ok(false);
        }
        // Its number's subscriber was checked when the fax was read; the keep may come
        // after the number left the line (it waited on this owner while an import moved
        // or removed it), and the number's next subscriber must not find it (R-M3).
        match self.number(&record.number) {
            Ok(tenant) => {
                if !tenant.is_some_and(|number| number.services.fax && !number.before_moving_in(record.received_at)) {
                    tracing::info!(number = %record.number, fax_id = %record.fax_id,
                        "a fax read for its number's subscriber of then (the number moved or was removed since, or its fax service ended): not kept");
                    return Ok(false);
                }
            }
            // A record this owner cannot read (a newer version's, during an upgrade): the
            // node that read the fax checked it, by a record it could read.
            Err(StoreError::UnreadableNumber { .. }) => {}
            Err(e) => return Err(e),
        }
        let doc = sled::IVec::from(document.0.as_slice());
        self.fax_documents.insert(key.as_bytes(), doc.clone())?;
        written.put(StateKey { tree: StateTree::FaxDocuments, id: key.clone() }, Some(doc));
        if self.faxes.compare_and_swap(key.as_bytes(), None::<&[u8]>, Some(value.clone()))?.is_err() {
            return Ok(false);
        }
        written.put(StateKey { tree: StateTree::Faxes, id: key }, Some(value));
        Ok(true)
    }

    /// Deletes every fax of `number` (a number leaving its line, R-M3): as the
    /// subscriber's own delete does, so the next subscriber of the number finds none and
    /// a record read again does not bring one back.
    pub(super) fn forget_faxes_here(&self, number: &PhoneNumber, written: &mut Written) -> Result<(), StoreError> {
        let prefix = format!("{number}/");
        for item in self.faxes.scan_prefix(prefix.as_bytes()) {
            self.delete_fax_here(&String::from_utf8_lossy(&item?.0), written)?;
        }
        Ok(())
    }

    /// Marks the fax under `key` deleted and removes its document: whether there was one
    /// to delete.
    fn delete_fax_here(&self, key: &str, written: &mut Written) -> Result<bool, StoreError> {
        let deleted = self.update_fax(key, written, |r| r.deleted = true)?;
        if self.fax_documents.remove(key.as_bytes())?.is_some() {
            written.put(StateKey { tree: StateTree::FaxDocuments, id: key.to_owned() }, None);
        }
        Ok(deleted)
    }

    /// Changes the record under `key` by `change` (nothing if there is none, or it is
    /// deleted); whether it changed.
    fn update_fax(
        &self,
        key: &str,
        written: &mut Written,
        change: impl Fn(&mut FaxRecord),
    ) -> Result<bool, StoreError> {
        loop {
            let Some(raw) = self.faxes.get(key.as_bytes())? else { return Ok(false) };
            let mut record: FaxRecord = serde_json::from_slice(&raw)?;
            if record.deleted {
                return Ok(false);
            }
            let before = record.clone();
            change(&mut record);
            if record == before {
                return Ok(false);
            }
            let value = sled::IVec::from(serde_json::to_vec(&record)?);
            if self.faxes.compare_and_swap(key.as_bytes(), Some(raw), Some(value.clone()))?.is_ok() {
                written.put(StateKey { tree: StateTree::Faxes, id: key.to_owned() }, Some(value));
                return Ok(true);
            }
        }
    }

    /// Carries out a fax op, noting in `written` each value as it writes it.
    pub(super) fn execute_fax(&self, op: &Op, written: &mut Written) -> Result<Reply, StoreError> {
        let reply = match op {
            Op::KeepFax { record, document } => Reply::Removed(self.keep_fax_here(record, document, written)?),
            Op::MarkFaxRead { key } => {
                self.update_fax(key, written, |r| r.read = true)?;
                Reply::Done
            }
            Op::DeleteFax { key } => Reply::Removed(self.delete_fax_here(key, written)?),
            Op::ExpireFaxes { before } => {
                for item in self.faxes.iter() {
                    let (key, raw) = item?;
                    let record: Result<FaxRecord, _> = serde_json::from_slice(&raw);
                    // A record that does not read back expires too.
                    if record.is_ok_and(|r| r.received_at >= *before) {
                        continue;
                    }
                    let id = String::from_utf8_lossy(&key).into_owned();
                    self.faxes.remove(&key)?;
                    written.put(StateKey { tree: StateTree::Faxes, id: id.clone() }, None);
                    if self.fax_documents.remove(&key)?.is_some() {
                        written.put(StateKey { tree: StateTree::FaxDocuments, id }, None);
                    }
                }
                Reply::Done
            }
            _ => return Err(StoreError::State(format!("{} is not a fax op", op.name()))),
        };
        Ok(reply)
    }
}

impl Store {
    /// One round of [`expire_hourly`]: [`Store::expire_faxes`], unless this store holds no
    /// fax at all (every node applies every fax, so then no node has one): no request to
    /// the state owner then, so a node without faxes writes no state of its own. Whether
    /// it asked.
    pub fn expire_faxes_if_any(&self, before: DateTime<Utc>) -> Result<bool, StoreError> {
        if self.faxes.is_empty() {
            return Ok(false);
        }
        self.expire_faxes(before)?;
        Ok(true)
    }
}

/// Every hour, has the faxes received more than `retention_days` ago forgotten
/// (`store.fax_retention_days`): on every node, so the expiry does not wait for any one
/// of them; the state owner carries out each request, and a second finds nothing left.
pub async fn expire_hourly(store: Store, retention_days: u64, stop: tokio_util::sync::CancellationToken) {
    store.keep_faxes_for(TimeDelta::days(retention_days as i64));
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let before = chrono::Utc::now() - chrono::TimeDelta::days(retention_days as i64);
        let store = store.clone();
        let expired = tokio::select! {
            () = stop.cancelled() => return,
            expired = tokio::task::spawn_blocking(move || store.expire_faxes_if_any(before)) => expired,
        };
        match expired {
            Ok(Ok(false)) => {}
            Ok(Ok(true)) => tracing::debug!(retention_days, "faxes past their retention removed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "removing old faxes failed; will try again in an hour"),
            Err(e) => tracing::warn!(error = %e, "removing old faxes failed; will try again in an hour"),
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::fax::document::DocumentKind;
    use crate::store::{LineRecord, Services};

    fn n(s: &str) -> PhoneNumber {
        PhoneNumber::parse(s).unwrap()
    }

    fn record(number: &str, fax_id: &str, received_at: DateTime<Utc>) -> FaxRecord {
        FaxRecord {
            number: n(number),
            fax_id: fax_id.to_owned(),
            sender: "非通知".to_owned(),
            received_at,
            pages: 1,
            kind: DocumentKind::Tiff,
            size: 4,
            read: false,
            deleted: false,
        }
    }

    fn store() -> Store {
        let store = Store::temporary().unwrap();
        let line = LineRecord { contract: n("0312345678"), numbers: vec![n("0312345678")], unit: None };
        store.upsert_line(&line, &[(n("0312345678"), Services { call: false, fax: true }, None)]).unwrap();
        store
    }

    /// R-F1: a fax is kept once; deleted, it loses its document at once and is not kept
    /// again when its record is read again (a replay, a partition's next reader).
    #[test]
    fn r_f1_a_deleted_fax_is_not_brought_back_by_its_record_read_again() {
        let store = store();
        let fax = record("0312345678", "f-1", Utc::now());
        assert!(store.keep_fax(fax.clone(), b"II*\0".to_vec()).unwrap());
        assert!(!store.keep_fax(fax.clone(), b"II*\0".to_vec()).unwrap(), "kept once");
        assert!(store.delete_fax(&fax.key()).unwrap());
        assert_eq!(store.fax_document(&fax.key()).unwrap(), None, "the document goes at once");
        assert!(!store.keep_fax(fax.clone(), b"II*\0".to_vec()).unwrap(), "not kept again");
        assert!(store.faxes_of(&fax.number).unwrap().is_empty());
        assert_eq!(store.fax(&fax.number, &fax.key()).unwrap(), None);
        assert!(!store.delete_fax(&fax.key()).unwrap(), "nothing left to delete");
    }

    /// R-M3, R-F1: a fax read for a number's subscriber but kept only after the number
    /// left the line (its keep waited on the state owner while an import moved or
    /// removed the number) is not kept: the number's next subscriber would find the
    /// previous one's fax on the site.
    #[test]
    fn r_m3_a_fax_kept_after_its_number_left_the_line_is_not_kept() {
        let store = Store::temporary().unwrap();
        let fax_only = Services { call: false, fax: true };
        let line = |contract: &str, numbers: &[&str]| {
            let numbers: Vec<PhoneNumber> = numbers.iter().map(|x| n(x)).collect();
            let line = LineRecord { contract: n(contract), numbers: numbers.clone(), unit: None };
            let numbers: Vec<_> = numbers.iter().map(|x| (*x, fax_only, None)).collect();
            store.upsert_line(&line, &numbers).unwrap();
        };
        line("0312345678", &["0312345678", "0312345679", "0312345670"]);
        let received = Utc::now() - TimeDelta::minutes(1);
        let moved = record("0312345679", "f-moved", received);
        let removed = record("0312345670", "f-removed", received);

        line("0612345678", &["0612345678", "0312345679"]);
        line("0312345678", &["0312345678"]);
        assert!(!store.keep_fax(moved.clone(), b"II*\0".to_vec()).unwrap(), "moved to another line");
        assert!(!store.keep_fax(removed.clone(), b"II*\0".to_vec()).unwrap(), "removed");
        for fax in [&moved, &removed] {
            assert!(store.faxes_of(&fax.number).unwrap().is_empty(), "{}", fax.fax_id);
            assert_eq!(store.fax_document(&fax.key()).unwrap(), None, "{}", fax.fax_id);
        }
        let after = record("0312345679", "f-after", Utc::now() + TimeDelta::seconds(1));
        assert!(store.keep_fax(after, b"II*\0".to_vec()).unwrap(), "its new subscriber's own fax");
    }

    /// What a node asks of the state owner, by op name.
    struct Recording(std::sync::Mutex<Vec<&'static str>>);

    impl crate::store::state::StateWriter for Recording {
        fn send(self: std::sync::Arc<Self>, ops: Vec<Op>) -> crate::store::state::Answers {
            self.0.lock().unwrap().extend(ops.iter().map(Op::name));
            let answers = ops.iter().map(|_| Ok(Reply::Done)).collect();
            Box::new(move || answers)
        }
    }

    /// R-F1, `store.fax_retention_days`: the hourly expiry asks the state owner only on a
    /// node that holds faxes; one without any sends nothing.
    #[test]
    fn r_f1_the_hourly_expiry_asks_the_state_owner_only_where_there_are_faxes() {
        let asked = |store: Store| {
            let writer = std::sync::Arc::new(Recording(Default::default()));
            store.attach_writer(writer.clone());
            let asked = store.expire_faxes_if_any(Utc::now()).unwrap();
            let ops = writer.0.lock().unwrap().clone();
            (asked, ops)
        };
        assert_eq!(asked(store()), (false, vec![]), "no faxes: no request");
        let with_fax = store();
        assert!(with_fax.keep_fax(record("0312345678", "f-1", Utc::now()), b"II*\0".to_vec()).unwrap());
        assert_eq!(asked(with_fax), (true, vec!["expire_faxes"]));
    }

    /// R-F1, `store.fax_retention_days`: faxes received before the cut are forgotten,
    /// record and document (deleted ones too); later ones stay, newest first.
    #[test]
    fn r_f1_faxes_past_their_retention_are_removed_with_their_documents() {
        let store = store();
        let now = Utc::now();
        let old = record("0312345678", "old", now - TimeDelta::days(31));
        let deleted = record("0312345678", "deleted", now - TimeDelta::days(40));
        let recent = record("0312345678", "recent", now - TimeDelta::days(2));
        let newest = record("0312345678", "newest", now);
        for fax in [&old, &deleted, &recent, &newest] {
            assert!(store.keep_fax(fax.clone(), b"II*\0".to_vec()).unwrap());
        }
        store.delete_fax(&deleted.key()).unwrap();
        store.expire_faxes(now - TimeDelta::days(30)).unwrap();
        let kept: Vec<String> = store.faxes_of(&n("0312345678")).unwrap().into_iter().map(|f| f.fax_id).collect();
        assert_eq!(kept, ["newest", "recent"]);
        assert_eq!(store.fax_document(&old.key()).unwrap(), None);
        assert_eq!(store.fax_usage().unwrap(), (2, 8), "two records, two documents of 4 bytes");
        // An expired fax's record read again is a new fax: but the pipeline does not keep
        // a fax older than store.fax_retention_days, and only such a fax has expired.
    }

    /// R-F1, `store.fax_retention_days`: the expiry runs hourly (and only where the state
    /// owner is reached), and until it did, a fax past its retention was still listed,
    /// shown and linked from its mail. A node's store now passes over it as it reads.
    #[test]
    fn r_f1_a_fax_past_its_retention_is_not_listed_or_shown_before_the_expiry_runs() {
        let store = store();
        store.keep_faxes_for(TimeDelta::days(30));
        let now = Utc::now();
        let past = record("0312345678", "past", now - TimeDelta::days(30) - TimeDelta::minutes(1));
        let within = record("0312345678", "within", now - TimeDelta::days(30) + TimeDelta::minutes(1));
        for fax in [&past, &within] {
            assert!(store.keep_fax(fax.clone(), b"II*\0".to_vec()).unwrap());
        }
        let listed: Vec<String> = store.faxes_of(&n("0312345678")).unwrap().into_iter().map(|f| f.fax_id).collect();
        assert_eq!(listed, ["within"]);
        assert_eq!(store.fax(&n("0312345678"), &past.key()).unwrap(), None);
        assert!(store.fax(&n("0312345678"), &within.key()).unwrap().is_some());
    }

    /// A fax's key names its number: another number's key finds nothing.
    #[test]
    fn r_f1_a_fax_is_found_only_under_its_own_number() {
        let store = store();
        let fax = record("0312345678", "f-1", Utc::now());
        store.keep_fax(fax.clone(), b"II*\0".to_vec()).unwrap();
        assert!(store.fax(&n("0312345678"), &fax.key()).unwrap().is_some());
        assert_eq!(store.fax(&n("0312345679"), &fax.key()).unwrap(), None);
        let forged = fax.key().replacen("0312345678", "0312345679", 1);
        assert_eq!(store.fax(&n("0312345679"), &forged).unwrap(), None);
    }
    /// R-M3 (nothing of a number's previous subscriber reaches the next one), R-F1: a
    /// number that leaves its line, or moves to another line, takes none of its faxes
    /// along: its next subscriber listed and read the old one's faxes, documents and
    /// all, until they expired. A fax record read again then is not kept again.
    #[test]
    fn r_m3_a_number_leaving_its_line_leaves_its_faxes_behind_for_nobody() {
        let store = Store::temporary().unwrap();
        let fax_only = Services { call: false, fax: true };
        let (a, b, moved, removed) = (n("0312345678"), n("0612345678"), n("0312345679"), n("0312345670"));
        let line_a = LineRecord { contract: a, numbers: vec![a, moved, removed], unit: None };
        store.upsert_line(&line_a, &[(a, fax_only, None), (moved, fax_only, None), (removed, fax_only, None)]).unwrap();
        let (of_moved, of_removed) = (record("0312345679", "f-1", Utc::now()), record("0312345670", "f-2", Utc::now()));
        for fax in [&of_moved, &of_removed] {
            assert!(store.keep_fax(fax.clone(), b"II*\0".to_vec()).unwrap());
        }

        // `removed` leaves line A; `moved` goes to line B.
        let line_a = LineRecord { contract: a, numbers: vec![a], unit: None };
        store.upsert_line(&line_a, &[(a, fax_only, None)]).unwrap();
        let line_b = LineRecord { contract: b, numbers: vec![b, moved], unit: None };
        store.upsert_line(&line_b, &[(b, fax_only, None), (moved, fax_only, None)]).unwrap();
        // ... and `removed` is provisioned anew, on a line of its own.
        let line_c = LineRecord { contract: removed, numbers: vec![removed], unit: None };
        store.upsert_line(&line_c, &[(removed, fax_only, None)]).unwrap();

        for fax in [&of_moved, &of_removed] {
            let listed = store.faxes_of(&fax.number).unwrap();
            assert!(listed.is_empty(), "{}'s next subscriber lists the old one's faxes: {listed:?}", fax.number);
            assert_eq!(store.fax(&fax.number, &fax.key()).unwrap(), None);
            assert_eq!(store.fax_document(&fax.key()).unwrap(), None, "the document stays");
            assert!(!store.keep_fax(fax.clone(), b"II*\0".to_vec()).unwrap(), "kept again when read again");
        }
    }
}
