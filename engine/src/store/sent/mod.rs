//! Sent records: what makes each mail go out once, however often its CDR is read.
//!
//! - [`SentKey`]: one mail, keyed by its call's end, called number, call id and
//!   recipient (a replay of the CDR makes the same key);
//! - [`Claims`]: mails being sent right now, so two readers of one CDR send once;
//! - [`Store::record_sent`]: the record, written on the store's flusher thread and made
//!   durable by the [`journal`] (one append) or a flush;
//! - [`Store::prune_sent`] and [`prune_hourly`]: records live
//!   `store.sent_retention_days` from when their mail was handled;
//! - [`Store::recipients_handled_since`]: what flood control counted lately.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashSet;
use tokio_util::sync::CancellationToken;

use super::{Store, StoreError};
use crate::phone::PhoneNumber;

pub(super) mod journal;

/// The CDR partition a mail's call was read from: its sent record and retry-queue entry
/// belong to that partition's changelog (`crate::partition_log`), which the
/// partition's next reader restores.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PartitionId {
    pub topic: String,
    pub partition: i32,
}

/// Where sent records and retry-queue changes are published, per CDR partition, so
/// they follow the partition to its next reader. Unset (tools, unit tests): they stay
/// in this store only.
pub trait PartitionSink: Send + Sync {
    /// `key`'s mail was handled (sent or refused; or queued, and it left the queue)
    /// at `at` (unix seconds). A queued mail's record is its retry entry.
    fn sent(&self, partition: &PartitionId, key: &[u8], at: u64);
    /// A retry-queue entry (due at `due_ms`, as JSON) was put, or moved.
    fn retry_put(&self, partition: &PartitionId, key: &[u8], due_ms: i64, entry: &[u8]);
    /// A retry-queue entry was taken out (sent, or given up).
    fn retry_removed(&self, partition: &PartitionId, key: &[u8]);
    /// Whether this node reads `partition` now: only then does it send its retries.
    fn owns(&self, partition: &PartitionId) -> bool;
    /// The keys of the retry entries whose changelog refused them as too large, not yet
    /// [`PartitionSink::forget_refused`]: they are this node's only from now
    /// ([`crate::deliver::queue::RetryQueue::own_refused`]).
    fn refused_as_too_large(&self) -> Vec<Vec<u8>> {
        Vec::new()
    }
    /// `keys`' entries are this node's only now.
    fn forget_refused(&self, _keys: &std::collections::HashSet<Vec<u8>>) {}
}

/// Key of one sent mail: when the call ended, called number, call id and recipient.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SentKey(Vec<u8>);

impl SentKey {
    /// `ended_at`: the call's end in unix seconds, from its CDR (so a replay of the CDR
    /// makes the same key).
    pub fn new(ended_at: i64, called: &PhoneNumber, call_id: &str, recipient: &str) -> Self {
        let mut key = Vec::with_capacity(8 + called.as_str().len() + call_id.len() + recipient.len() + 2);
        key.extend_from_slice(&(ended_at.max(0) as u64).to_be_bytes());
        key.extend_from_slice(called.as_str().as_bytes());
        key.push(0);
        key.extend_from_slice(call_id.as_bytes());
        key.push(0);
        key.extend_from_slice(recipient.as_bytes());
        Self(key)
    }

    /// The key in the earlier layout, without the call end.
    fn legacy(&self) -> &[u8] {
        &self.0[8..]
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The dedup step's memory of mails being sent now, by sent-record key, shared by every
/// consumer thread. With the store's sent records it makes a mail go out once, however
/// often its CDR is read: a thread that reads the same CDR while the mail is on its way
/// finds the claim; one that reads it later finds the sent record, which is written
/// before the claim is released.
///
/// A reader that finds the claim does not count its CDR done until the claim is let go
/// ([`Claims::claim_once_let_go`]): the claim may be a revoked partition's, whose task
/// is still writing the mail's fate (a queue entry, a dead letter) when this node reads
/// the partition again. Done at once, its offset would be committed while the mail's
/// fate is not yet written, and lost with the node.
pub struct Claims {
    sending: DashSet<SentKey>,
    /// Woken at every release, for readers waiting on a claim.
    released: tokio::sync::Notify,
    store: Store,
}

/// What [`Claims::claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// Claimed by this caller: it sends the mail, then releases it.
    Mine,
    /// Its sent record is written: the mail was handled.
    Sent,
    /// Another reader of the same CDR holds the claim.
    Sending,
}

impl Claims {
    pub fn new(store: Store) -> Self {
        Self { sending: DashSet::new(), released: tokio::sync::Notify::new(), store }
    }

    /// Claims `key`'s mail for sending, if it is neither being sent nor sent.
    pub fn claim(&self, key: &SentKey) -> Result<Claimed, StoreError> {
        if !self.sending.insert(key.clone()) {
            return Ok(Claimed::Sending);
        }
        match self.store.was_sent(key) {
            Ok(false) => Ok(Claimed::Mine),
            sent => {
                self.release(key);
                sent.map(|_| Claimed::Sent)
            }
        }
    }

    /// Waits until no other reader holds `key`, then claims it: [`Claimed::Mine`], or
    /// [`Claimed::Sent`] if the other reader handled the mail. (A reader lets a claim go
    /// without a record when its CDR will be read again: then the mail is this
    /// caller's to send.) `None` if `stop` ends the wait first: nothing is claimed.
    /// The store is read on a blocking thread, which `stop` does not interrupt.
    pub async fn claim_once_let_go(
        self: &Arc<Self>,
        key: &SentKey,
        stop: &CancellationToken,
    ) -> Result<Option<Claimed>, StoreError> {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the look, so a release between the two is not missed.
            released.as_mut().enable();
            if self.sending.contains(key) {
                tokio::select! {
                    () = released => continue,
                    () = stop.cancelled() => return Ok(None),
                }
            }
            let (claims, key) = (Arc::clone(self), key.clone());
            let claimed = tokio::task::spawn_blocking(move || claims.claim(&key)).await??;
            if claimed != Claimed::Sending {
                return Ok(Some(claimed));
            }
        }
    }

    /// Lets `key` go: its sent record is written, or its mail was given up.
    pub fn release(&self, key: &SentKey) {
        self.sending.remove(key);
        self.released.notify_waiters();
    }
}

/// The sent records' trees (see the module docs), always written together.
#[derive(Clone)]
pub(crate) struct SentTrees {
    /// Record key → unix seconds handled.
    pub(crate) by_key: sled::Tree,
    /// Unix seconds handled, then the record key → nothing.
    pub(crate) by_handled: sled::Tree,
}

impl SentTrees {
    pub(super) fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self { by_key: db.open_tree("sent_by_call_end")?, by_handled: db.open_tree("sent_by_handled")? })
    }

    /// Records `key` as handled at `at` (unix seconds).
    pub(crate) fn insert(&self, key: &[u8], at: u64) -> sled::Result<()> {
        self.by_key.insert(key, &at.to_be_bytes())?;
        self.by_handled.insert(handled_key(at, key), &[])?;
        Ok(())
    }

    /// Gives every record of `by_key` its place in `by_handled`, once: stores written
    /// before the second tree existed have none, and would never be pruned. A marker
    /// says it is done; a crash before it only means doing it again.
    pub(super) fn index_once(&self, db: &sled::Db) -> Result<(), StoreError> {
        const DONE: &[u8] = b"sent_by_handled indexed";
        if db.contains_key(DONE)? {
            return Ok(());
        }
        let mut count = 0usize;
        for entry in self.by_key.iter() {
            let (key, value) = entry?;
            let at = value.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            self.by_handled.insert(handled_key(at, &key), &[])?;
            count += 1;
        }
        db.flush()?;
        db.insert(DONE, &[])?;
        if count > 0 {
            tracing::info!(records = count, "sent records indexed by the time they were handled");
        }
        Ok(())
    }
}

/// A `sent_by_handled` key: `at` (big-endian), then the record's key.
pub(crate) fn handled_key(at: u64, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&at.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// The tree of the earlier sent-record layout, if it still holds records; an empty one
/// is dropped.
pub(super) fn legacy_sent(
    db: &sled::Db,
) -> Result<Option<(sled::Tree, Arc<std::sync::atomic::AtomicBool>)>, StoreError> {
    if !db.tree_names().iter().any(|name| name.as_ref() == b"sent") {
        return Ok(None);
    }
    let tree = db.open_tree("sent")?;
    if tree.is_empty() {
        drop(tree);
        db.drop_tree("sent")?;
        return Ok(None);
    }
    Ok(Some((tree, Arc::new(std::sync::atomic::AtomicBool::new(true)))))
}

impl Store {
    /// The sent-mail records, for the retry queue: queuing a mail and recording it as
    /// handled are one transaction.
    pub(crate) fn sent_trees(&self) -> &SentTrees {
        &self.sent
    }

    /// Whether the mail for (`called`, `call_id`, `recipient`) was already accepted.
    pub fn was_sent(&self, key: &SentKey) -> Result<bool, StoreError> {
        if self.sent.by_key.contains_key(&key.0)? {
            return Ok(true);
        }
        match &self.legacy_sent {
            Some((tree, live)) if live.load(std::sync::atomic::Ordering::Relaxed) => {
                Ok(tree.contains_key(key.legacy())?)
            }
            _ => Ok(false),
        }
    }

    /// Records that the mail for `key` was accepted at `unix_secs`, not flushed (the
    /// engine uses [`Store::record_sent`]; tests set up records with this).
    #[cfg(test)]
    pub(crate) fn mark_sent(&self, key: &SentKey, unix_secs: u64) -> Result<(), StoreError> {
        self.sent.insert(&key.0, unix_secs)?;
        Ok(())
    }

    /// Forgets up to `limit` sent-mail records whose mails were handled before
    /// `cutoff_unix_secs`, whenever their calls were; returns how many, and whether
    /// there may be more. A CDR replayed after that sends its mail again (the
    /// retention window is the dedup guarantee). The records are walked in the order
    /// they were handled, so this reads nothing else. A record handled again since (a
    /// mail queued, then accepted) keeps its later time and stays.
    pub fn prune_sent(&self, cutoff_unix_secs: u64, limit: usize) -> Result<(usize, bool), StoreError> {
        let (mut seen, mut pruned) = (0, 0);
        for entry in self.sent.by_handled.range(..cutoff_unix_secs.to_be_bytes()).keys().take(limit) {
            let entry = entry?;
            seen += 1;
            let key = &entry[8..];
            if let Some(latest) = self.sent.by_key.get(key)? {
                let at = latest.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
                // Unless it was handled again meanwhile.
                let swapped = at < cutoff_unix_secs
                    && self.sent.by_key.compare_and_swap(key, Some(latest), None::<&[u8]>)?.is_ok();
                pruned += usize::from(swapped);
            }
            self.sent.by_handled.remove(&entry)?;
        }
        Ok((pruned, seen == limit))
    }

    /// The recipient of every mail handled at or after `since` (unix seconds), once per
    /// mail: what flood control counted lately, for a restarted engine to go on from.
    pub fn recipients_handled_since(&self, since: u64) -> Result<Vec<String>, StoreError> {
        let mut recipients = Vec::new();
        for entry in self.sent.by_handled.range(since.to_be_bytes()..).keys() {
            let entry = entry?;
            // handled (8) | call end (8) | called \0 call id \0 recipient
            let Some(record) = entry.get(16..) else { continue };
            if let Some(at) = memchr::memrchr(0, record) {
                recipients.push(String::from_utf8_lossy(&record[at + 1..]).into_owned());
            }
        }
        Ok(recipients)
    }

    /// Like [`Store::prune_sent`] for the records of the earlier key layout, which has
    /// no time order: looks at up to `limit` records after `after` and removes those
    /// written before the cutoff; returns how many and where to go on (`None`: the end).
    /// Once the tree is empty it is no longer consulted.
    pub fn prune_legacy_sent(
        &self,
        cutoff_unix_secs: u64,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(usize, Option<Vec<u8>>), StoreError> {
        use std::ops::Bound;
        let Some((tree, live)) = &self.legacy_sent else { return Ok((0, None)) };
        let from = after.map_or(Bound::Unbounded, |k| Bound::Excluded(k.to_vec()));
        let (mut pruned, mut seen, mut last) = (0, 0, None);
        for entry in tree.range::<Vec<u8>, _>((from, Bound::Unbounded)).take(limit) {
            let (key, value) = entry?;
            let at = value.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if at < cutoff_unix_secs {
                tree.remove(&key)?;
                pruned += 1;
            }
            seen += 1;
            last = Some(key.to_vec());
        }
        if tree.is_empty() {
            live.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        // A full slice may have more after it; a short one reached the end.
        Ok((pruned, if seen == limit { last } else { None }))
    }

    /// Writes `key`'s sent record and makes it durable, on the store's flusher thread:
    /// the records of mails finishing together share one flush. Then publishes it to
    /// `partition`'s changelog, if there is one.
    pub async fn record_sent(
        &self,
        key: &SentKey,
        unix_secs: u64,
        partition: Option<&PartitionId>,
    ) -> Result<(), StoreError> {
        self.group_commit(Some((self.sent.clone(), key.clone(), unix_secs))).await?;
        if let (Some(sink), Some(partition)) = (self.partition_sink.get(), partition) {
            sink.sent(partition, key.as_bytes(), unix_secs);
        }
        Ok(())
    }

    /// Publishes sent records and retry-queue changes to `sink` from now on.
    pub fn attach_partition_sink(&self, sink: Arc<dyn PartitionSink>) {
        let _ = self.partition_sink.set(sink);
    }

    /// Where sent records and retry-queue changes are published, once attached.
    pub fn partition_sink(&self) -> Arc<std::sync::OnceLock<Arc<dyn PartitionSink>>> {
        self.partition_sink.clone()
    }

    /// Records `key` as handled at `at` without publishing it: a record read from its
    /// partition's changelog. A key this store has keeps its time: the retry entries
    /// are read again at every assignment, and a second time would count the mail
    /// twice for flood control ([`Store::recipients_handled_since`]).
    pub fn restore_sent(&self, key: &[u8], at: u64) -> Result<(), StoreError> {
        if self.sent.by_key.compare_and_swap(key, None::<&[u8]>, Some(&at.to_be_bytes()))?.is_ok() {
            self.sent.by_handled.insert(handled_key(at, key), &[])?;
        }
        Ok(())
    }
}

/// Every hour until `stop` is cancelled, forgets sent-mail records older than the
/// retention window, a slice at a time on a blocking thread with a pause after each, so
/// even millions of records never take more than a sliver of a core.
pub async fn prune_hourly(store: Store, retention_days: u64, stop: tokio_util::sync::CancellationToken) {
    const SLICE: usize = 1_000;
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let cutoff = (chrono::Utc::now().timestamp().max(0) as u64).saturating_sub(retention_days * 86_400);
        let current = sweep(&store, (), move |store, ()| {
            store.prune_sent(cutoff, SLICE).map(|(n, more)| (n, more.then_some(())))
        });
        // Records of the earlier key layout, until there are none.
        let legacy = sweep(&store, None, move |store, after: Option<Vec<u8>>| {
            store.prune_legacy_sent(cutoff, after.as_deref(), SLICE).map(|(n, next)| (n, next.map(Some)))
        });
        let swept = tokio::select! {
            () = stop.cancelled() => return,
            swept = async { (current.await, legacy.await) } => swept,
        };
        match swept {
            (Ok(pruned), Ok(legacy)) => {
                tracing::info!(pruned = pruned + legacy, retention_days, "old sent-mail records pruned")
            }
            (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "pruning sent-mail records failed; will try again"),
        }
    }
}

/// Calls `slice` with `state` on a blocking thread until it returns no next state,
/// pausing 20 ms between calls; returns how many records it removed in all.
async fn sweep<S: Send + 'static>(
    store: &Store,
    mut state: S,
    slice: impl Fn(&Store, S) -> Result<(usize, Option<S>), StoreError> + Clone + Send + 'static,
) -> Result<usize, StoreError> {
    let mut total = 0;
    loop {
        let (store, slice) = (store.clone(), slice.clone());
        let (n, next) = tokio::task::spawn_blocking(move || slice(&store, state)).await??;
        total += n;
        match next {
            Some(next) => state = next,
            None => return Ok(total),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::open_again;

    /// R-M4's "once": a mail is claimed by one reader of its CDR at a time, may be
    /// claimed again if it was let go without a sent record, and never once its record
    /// is written.
    #[tokio::test]
    async fn a_mail_is_claimed_once_and_never_again_after_its_record_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let claims = Claims::new(store.clone());
        let key = SentKey::new(1_764_000_000, &PhoneNumber::parse("0312345678").unwrap(), "c-1", "taro@example.jp");

        assert_eq!(claims.claim(&key).unwrap(), Claimed::Mine);
        assert_eq!(claims.claim(&key).unwrap(), Claimed::Sending, "a second reader while it is being sent");
        claims.release(&key);
        assert_eq!(claims.claim(&key).unwrap(), Claimed::Mine, "let go without a record: it may still be sent");
        store.record_sent(&key, 1_764_000_100, None).await.unwrap();
        claims.release(&key);
        assert_eq!(claims.claim(&key).unwrap(), Claimed::Sent, "its record is written: never again");
    }

    /// A reader finding a mail claimed waits for the claim to go: then the mail is its
    /// own to send if it was let go unsent (its first reader gave the CDR up), handled if
    /// its record was written; and it stops waiting, claiming nothing, when told to.
    #[tokio::test]
    async fn r_m4_a_reader_finding_a_mail_claimed_waits_for_its_fate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let claims = Arc::new(Claims::new(store.clone()));
        let key = SentKey::new(1_764_000_000, &PhoneNumber::parse("0312345678").unwrap(), "c-1", "taro@example.jp");
        let never = CancellationToken::new();

        assert_eq!(claims.claim(&key).unwrap(), Claimed::Mine);
        let mut waiting = tokio::spawn({
            let (claims, key, never) = (claims.clone(), key.clone(), never.clone());
            async move { claims.claim_once_let_go(&key, &never).await }
        });
        let held = tokio::time::timeout(Duration::from_millis(200), &mut waiting).await;
        assert!(held.is_err(), "it waits while the claim is held: {held:?}");
        claims.release(&key);
        assert_eq!(waiting.await.unwrap().unwrap(), Some(Claimed::Mine), "let go unsent: now this reader's");

        let waiting = tokio::spawn({
            let (claims, key, never) = (claims.clone(), key.clone(), never.clone());
            async move { claims.claim_once_let_go(&key, &never).await }
        });
        store.record_sent(&key, 1_764_000_100, None).await.unwrap();
        claims.release(&key);
        assert_eq!(waiting.await.unwrap().unwrap(), Some(Claimed::Sent), "its record written: handled");

        let other = SentKey::new(1_764_000_000, &PhoneNumber::parse("0312345678").unwrap(), "c-2", "taro@example.jp");
        assert_eq!(claims.claim(&other).unwrap(), Claimed::Mine);
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(claims.claim_once_let_go(&other, &stop).await.unwrap(), None);
        assert_eq!(claims.claim(&other).unwrap(), Claimed::Sending, "the first reader still holds it");
    }

    /// The journal holds sent records only until a flush of the database covers them:
    /// its file stays under the checkpoint size however many mails are sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sent_journal_stays_bounded_and_every_record_outlives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        let key = |i: usize| SentKey::new(1_764_000_000, &called, &format!("c-{i}"), &format!("{:0>60}@example.jp", i));
        let journal = dir.path().join("sent.journal");
        let (mut largest, mut emptied) = (0, 0);
        // About 100 bytes a record: 3 MiB of records in all.
        for chunk in 0..30 {
            let batch: Vec<_> = (chunk * 1_000..(chunk + 1) * 1_000)
                .map(|i| {
                    let (store, key) = (store.clone(), key(i));
                    tokio::spawn(async move { store.record_sent(&key, 1, None).await.unwrap() })
                })
                .collect();
            for task in batch {
                task.await.unwrap();
            }
            let len = std::fs::metadata(&journal).unwrap().len();
            emptied += usize::from(len < largest);
            largest = largest.max(len);
        }
        assert!(largest <= journal::CHECKPOINT_BYTES, "journal grew to {largest} bytes");
        assert!(emptied >= 2, "the journal starts again after each checkpoint ({emptied} times)");
        drop(store);
        let reopened = open_again(dir.path());
        assert!((0..30_000).all(|i| reopened.was_sent(&key(i)).unwrap()));
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0, "replayed at open, then emptied");
    }

    #[test]
    fn sent_records_handled_before_the_window_are_pruned_and_newer_ones_kept() {
        let store = Store::temporary().unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        let old: Vec<SentKey> =
            (0..25).map(|i| SentKey::new(1_000 + i, &called, "c-old", &format!("{i}@example.jp"))).collect();
        let new = SentKey::new(9_000, &called, "c-new", "a@example.jp");
        old.iter().for_each(|k| store.mark_sent(k, 2_000).unwrap());
        store.mark_sent(&new, 9_999).unwrap();

        assert_eq!(store.prune_sent(5_000, 10).unwrap(), (10, true), "a full slice: there may be more");
        assert_eq!(store.prune_sent(5_000, 10).unwrap(), (10, true));
        assert_eq!(store.prune_sent(5_000, 10).unwrap(), (5, false), "the rest, then the end");
        assert!(old.iter().all(|k| !store.was_sent(k).unwrap()), "past the window: a replay would send again");
        assert!(store.was_sent(&new).unwrap(), "inside the window: a replay sends nothing");
    }

    /// The dedup window counts from when the mail was handled, not from the call: a
    /// backlog of calls older than the retention, notified today, is remembered for the
    /// whole window (a prune at the next start used to forget it, and a replay sent
    /// every mail again).
    #[test]
    fn a_call_older_than_the_window_handled_now_is_remembered_for_the_whole_window() {
        let store = Store::temporary().unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        let (call_ended, handled, retention) = (1_000, 1_000_000, 7 * 86_400);
        let late = SentKey::new(call_ended, &called, "c-late", "a@example.jp");
        store.mark_sent(&late, handled).unwrap();

        // The pruner's cutoff at time `now`, as startup's hourly prune computes it.
        let cutoff = |now: u64| now - retention;
        // Its call ended long before any of these cutoffs: that no longer counts.
        assert_eq!(store.prune_sent(cutoff(handled + retention - 1), 100).unwrap(), (0, false));
        assert!(store.was_sent(&late).unwrap(), "inside the window from its handling: a replay sends nothing");
        assert_eq!(store.prune_sent(cutoff(handled + retention + 1), 100).unwrap(), (1, false));
        assert!(!store.was_sent(&late).unwrap());
    }

    /// A mail queued (recorded then) and accepted later keeps the later time.
    #[test]
    fn a_record_handled_again_keeps_its_latest_time() {
        let store = Store::temporary().unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        let key = SentKey::new(1_000, &called, "c-1", "a@example.jp");
        store.mark_sent(&key, 2_000).unwrap();
        store.mark_sent(&key, 8_000).unwrap();
        assert_eq!(store.prune_sent(5_000, 100).unwrap(), (0, false), "only the older entry was due");
        assert!(store.was_sent(&key).unwrap());
        assert_eq!(store.prune_sent(9_000, 100).unwrap(), (1, false));
        assert!(!store.was_sent(&key).unwrap());
    }

    /// A store written before `sent_by_handled` existed gets its records indexed at
    /// open, so they are pruned by the time they were handled too.
    #[test]
    fn records_of_a_store_without_the_handled_index_are_indexed_at_open_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        let key = SentKey::new(1_000, &called, "c-1", "a@example.jp");
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("sent_by_call_end").unwrap().insert(key.as_bytes(), &2_000u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let store = open_again(dir.path());
        assert!(store.was_sent(&key).unwrap());
        assert_eq!(store.prune_sent(5_000, 100).unwrap(), (1, false));
        assert!(!store.was_sent(&key).unwrap());
    }

    #[test]
    fn records_of_the_earlier_key_layout_still_count_until_pruned_then_the_tree_goes() {
        let dir = tempfile::tempdir().unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        // The same mails as keyed now, by a replay of their CDRs.
        let key = |call_id: &str| SentKey::new(1_764_000_000, &called, call_id, "a@example.jp");
        let (old, recent) = (key("c-1"), key("c-2"));
        {
            let db = sled::open(dir.path()).unwrap();
            let legacy = db.open_tree("sent").unwrap();
            legacy.insert(old.legacy(), &1_000u64.to_be_bytes()).unwrap();
            legacy.insert(recent.legacy(), &9_000u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let store = open_again(dir.path());
        assert!(store.was_sent(&old).unwrap() && store.was_sent(&recent).unwrap(), "an upgrade forgets nothing");

        assert_eq!(store.prune_legacy_sent(5_000, None, 100).unwrap(), (1, None));
        assert!(!store.was_sent(&old).unwrap());
        assert!(store.was_sent(&recent).unwrap());
        assert_eq!(store.prune_legacy_sent(10_000, None, 100).unwrap(), (1, None));
        drop(store);
        let reopened = open_again(dir.path());
        assert!(reopened.legacy_sent.is_none(), "an emptied legacy tree is dropped");
        assert!(!reopened.db.tree_names().iter().any(|n| n.as_ref() == b"sent"));
    }
}
