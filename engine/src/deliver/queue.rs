//! The durable retry queue: mails whose first attempt failed temporarily (SMTP 4xx, a
//! dropped connection, a timeout), in the store's `retry` tree, ordered by when they are
//! due. Putting a mail here also writes its sent-mail record in the same transaction,
//! so a replayed CDR does not queue it twice; once the transaction is flushed the CDR's
//! offset may move on, and a slow or dead mail server never holds up a partition.
//!
//! Key: the due time (milliseconds since the epoch, big-endian, so the tree is in due
//! order) followed by the mail's sent-mail key. Value: [`Queued`] as JSON.
//!
//! Entries of CDR partitions this node does not read (given up in a rebalance, or not
//! assigned since it started) are set aside in the `retry_parked` tree, same keys: their
//! partition's reader sends them, from the partition's changelog. They are kept for the
//! day the partition comes back ([`RetryQueue::reconcile`]: an entry the changelog never
//! confirmed is published again then), but they are no longer this node's queue: not
//! counted in it, not walked at every turn of the retry loop (`turn`), which passed
//! them by the thousand during a mail server's outage after a rebalance.
//!
//! Every method does blocking sled I/O: call them from a blocking thread.

use std::collections::HashSet;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::address::DestinationAddress;
use crate::phone::{PhoneNumber, PhoneNumberError};
use crate::render::{Mail, Origin};
use crate::store::{PartitionId, PartitionSink, SentKey, Store, StoreError};

/// One queued mail: everything needed to send it again and to write its dead-letter
/// record, without the CDR.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Queued {
    pub call_id: String,
    pub called: String,
    /// The call's end, milliseconds since the epoch (for the latency metric).
    pub ended_at_ms: i64,
    pub message_id: String,
    pub envelope_from: Option<String>,
    pub recipient: String,
    /// The whole message as on the wire, base64.
    pub mail_base64: String,
    /// Attempts so far, the first included (0: queued without one).
    pub attempts: u32,
    /// When the first attempt failed, milliseconds since the epoch: the give-up age
    /// counts from here.
    pub first_failed_ms: i64,
    /// The mail server's last answer, for the dead-letter record.
    pub last_reply: String,
    /// The CDR partition of its call: the entry is in that partition's changelog, and
    /// only the node reading the partition sends it (`None`: any node holding it, as
    /// entries queued before partitions were recorded, and a dead letter replayed into
    /// a node's queue, which that node sends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PartitionId>,
    /// Queued by a node that publishes its entries to their partition's changelog (set
    /// by [`RetryQueue::push`]). Such an entry that the changelog lacks, its mail with a
    /// sent record since, was handled by another node ([`RetryQueue::reconcile`]). A
    /// dead letter replayed into a stopped node's store is queued without (and without a
    /// partition): its mail has a sent record from before (its refusal), and it must be
    /// sent all the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logged: bool,
}

impl Queued {
    pub fn new(mail: &Mail, origin: &Origin, reply: &str, failed_at: DateTime<Utc>) -> Self {
        Self {
            call_id: origin.call_id.clone(),
            called: origin.called.as_str().to_owned(),
            ended_at_ms: origin.ended_at.timestamp_millis(),
            message_id: mail.message_id.clone(),
            envelope_from: mail.envelope.from().map(ToString::to_string),
            recipient: mail.recipient.as_str().to_owned(),
            mail_base64: base64::engine::general_purpose::STANDARD.encode(&mail.bytes),
            attempts: 1,
            first_failed_ms: failed_at.timestamp_millis(),
            last_reply: reply.to_owned(),
            source: origin.source.clone(),
            logged: false,
        }
    }

    /// [`Queued::new`] for a mail queued without an attempt (the mail server not
    /// answering, its address over its flood limit): its first
    /// failure waits the first delay, and a dead letter counts only the attempts made.
    pub fn untried(mail: &Mail, origin: &Origin, reply: &str, queued_at: DateTime<Utc>) -> Self {
        Self { attempts: 0, ..Self::new(mail, origin, reply, queued_at) }
    }

    /// The mail and its call again; `Err` if the stored entry no longer makes sense.
    pub fn to_mail(&self) -> Result<(Mail, Origin), EntryError> {
        let recipient = DestinationAddress::parse(&self.recipient)?;
        let from = self.envelope_from.as_deref().map(str::parse).transpose()?;
        // As the first attempt addressed it (R-N3 admits what RFC 5322 does not).
        let to = crate::render::recipient_address(&recipient);
        let envelope = lettre::address::Envelope::new(from, vec![to])?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(&self.mail_base64)?;
        let called = PhoneNumber::parse(&self.called)?;
        let ended_at = DateTime::from_timestamp_millis(self.ended_at_ms).unwrap_or_default();
        let mail = Mail { message_id: self.message_id.clone(), recipient, envelope, bytes };
        Ok((mail, Origin { call_id: self.call_id.clone(), called, ended_at, source: self.source.clone() }))
    }

    /// The mail's sent-mail key.
    pub fn sent_key(&self) -> Result<SentKey, PhoneNumberError> {
        let called = PhoneNumber::parse(&self.called)?;
        Ok(SentKey::new(self.ended_at_ms.div_euclid(1000), &called, &self.call_id, &self.recipient))
    }
}

/// An entry read back: parsed, or why it could not be.
pub type Entry = Result<Queued, EntryError>;

/// What says who sends an entry, read without building the rest (its message is
/// still scanned: JSON has no way past it).
#[derive(serde::Deserialize)]
struct Head {
    #[serde(default)]
    source: Option<PartitionId>,
    #[serde(default)]
    logged: bool,
}

impl Head {
    /// `None`: not an entry (its whole parse says why).
    fn of(value: &[u8]) -> Option<Self> {
        serde_json::from_slice(value).ok()
    }

    /// Whether the entry is of a partition other than `partition`.
    fn of_another(&self, partition: &PartitionId) -> bool {
        self.source.as_ref().is_some_and(|source| source != partition)
    }
}

/// Why a queue entry cannot be read back or sent: it is damaged, or was written by a
/// version that stored something else.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("not a retry queue entry: {0}")]
    Json(#[from] serde_json::Error),
    #[error("its recipient is not a destination address: {0}")]
    Recipient(#[from] crate::address::AddressError),
    #[error("its envelope address is invalid: {0}")]
    Envelope(#[from] lettre::address::AddressError),
    #[error("its envelope cannot be made: {0}")]
    EnvelopeBuild(#[from] lettre::error::Error),
    #[error("its message is not base64: {0}")]
    Message(#[from] base64::DecodeError),
    #[error("its called number is invalid: {0}")]
    Called(#[from] PhoneNumberError),
}

/// Position of an entry in the queue: its tree key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Slot(Vec<u8>);

impl Slot {
    fn new(due_ms: i64, key: &SentKey) -> Self {
        let mut slot = Vec::with_capacity(8 + key.as_bytes().len());
        slot.extend_from_slice(&(due_ms.max(0) as u64).to_be_bytes());
        slot.extend_from_slice(key.as_bytes());
        Self(slot)
    }

    /// When the entry is due, milliseconds since the epoch.
    pub fn due_ms(&self) -> i64 {
        self.0.get(..8).and_then(|b| b.try_into().ok()).map_or(0, |b| u64::from_be_bytes(b) as i64)
    }
}

/// The retry entries of one partition's changelog, by sent key: due time and JSON, or
/// `None` for an entry taken out.
pub type LoggedEntries = std::collections::HashMap<Vec<u8>, Option<(i64, Vec<u8>)>>;

/// What [`RetryQueue::turn`] found.
#[derive(Debug, Default)]
pub struct Turn {
    /// The entries to try now, with their slots.
    pub due: Vec<(Slot, Entry)>,
    /// When the earliest entry this node sends is due (one being tried included).
    pub next_due_ms: Option<i64>,
}

/// What [`RetryQueue::reconcile`] did.
pub struct Reconciled {
    /// The entries to publish again.
    pub unconfirmed: Vec<Unconfirmed>,
    /// By how much the queue's length changed.
    pub queued_change: i64,
}

/// An entry of this store that its partition's changelog never confirmed.
pub struct Unconfirmed {
    pub key: Vec<u8>,
    pub due_ms: i64,
    pub entry: Vec<u8>,
}

/// The retry queue of one store; cheap to clone.
#[derive(Clone)]
pub struct RetryQueue {
    /// The entries this node sends (the queue).
    retry: sled::Tree,
    /// The entries of partitions it does not read now.
    parked: sled::Tree,
    sent: crate::store::SentTrees,
    /// Where changes go to their partition's changelog, once attached.
    sink: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn PartitionSink>>>,
    /// The partition of each entry read since the queue was opened, by slot, with the
    /// entry's length: every turn of the retry loop passes the entries being tried, and
    /// those of a partition just given up until they are set aside; parsing each again
    /// (its message scanned) made a turn four times as slow. An entry's partition is its
    /// call's, so a slot's never changes; the length catches an entry written again
    /// otherwise.
    sources: std::sync::Arc<std::sync::Mutex<Sources>>,
}

/// [`RetryQueue::sources`]: slot → (entry length, partition).
type Sources = std::collections::HashMap<Vec<u8>, (usize, Option<PartitionId>)>;

/// The name of the store's tree the queue lives in.
pub const TREE: &str = "retry";
/// The tree of entries set aside, of partitions another node reads.
pub const PARKED_TREE: &str = "retry_parked";

/// A transaction's error as the store's.
fn store_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::from(e),
    }
}

impl RetryQueue {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            retry: store.open_tree(TREE)?,
            parked: store.open_tree(PARKED_TREE)?,
            sent: store.sent_trees().clone(),
            sink: store.partition_sink(),
            sources: Default::default(),
        })
    }

    /// Publishes `entry` (due at `due_ms`) to its partition's changelog.
    fn publish(&self, entry: &Queued, key: &SentKey, due_ms: i64, value: &[u8]) {
        if let (Some(sink), Some(source)) = (self.sink.get(), &entry.source) {
            sink.retry_put(source, key.as_bytes(), due_ms, value);
        }
    }

    /// Whether this node sends `entry` now: it reads the entry's partition, or the
    /// entry has none.
    pub fn sends(&self, entry: &Queued) -> bool {
        match (self.sink.get(), &entry.source) {
            (Some(sink), Some(source)) => sink.owns(source),
            _ => true,
        }
    }

    /// [`RetryQueue::sends`] for the entry `value` at `slot` (an unreadable one is
    /// handled here), its partition read once (`sources`).
    fn eligible(&self, slot: &[u8], value: &[u8], sources: &mut Sources) -> bool {
        let Some(sink) = self.sink.get() else { return true };
        let sends = |source: &Option<PartitionId>| source.as_ref().is_none_or(|source| sink.owns(source));
        if let Some((len, source)) = sources.get(slot) {
            if *len == value.len() {
                return sends(source);
            }
        }
        let Some(head) = Head::of(value) else { return true };
        let eligible = sends(&head.source);
        sources.insert(slot.to_vec(), (value.len(), head.source));
        eligible
    }

    /// Forgets the partition of the entries at `slots`, taken out.
    fn forget<'a>(&self, slots: impl IntoIterator<Item = &'a [u8]>) {
        let mut sources = self.sources.lock().expect("sources lock");
        for slot in slots {
            sources.remove(slot);
        }
    }

    /// Queues `entry`, due at `due_ms`, and records its mail as handled (`now_secs`)
    /// so a replay of its CDR sends nothing: one transaction. Not yet flushed. Also
    /// says whether the queue has one entry more: not when the same entry is pushed at
    /// the same `due_ms` again (a retried write overwrites it), nor when its partition
    /// was given up meanwhile (a revocation queues the mails it cut short: set aside).
    pub fn push(&self, entry: &Queued, due_ms: i64, now_secs: u64) -> Result<(Slot, bool), StoreError> {
        let logged = self.sink.get().is_some() && entry.source.is_some();
        let entry = &Queued { logged, ..entry.clone() };
        let key = entry.sent_key()?;
        let slot = Slot::new(due_ms, &key);
        let value = serde_json::to_vec(entry)?;
        let handled = crate::store::sent::handled_key(now_secs, key.as_bytes());
        let queued = self.sends(entry);
        let tree = if queued { &self.retry } else { &self.parked };
        let new = (tree, &self.sent.by_key, &self.sent.by_handled)
            .transaction(|(tree, sent, by_handled)| {
                let before = tree.insert(slot.0.as_slice(), value.as_slice())?;
                sent.insert(key.as_bytes(), &now_secs.to_be_bytes())?;
                by_handled.insert(handled.as_slice(), &[])?;
                Ok::<_, ConflictableTransactionError<StoreError>>(before.is_none())
            })
            .map_err(store_error)?;
        // In the changelog the entry is its mail's sent record too (the next reader
        // restores both from it): one record, so a node killed midway cannot leave the
        // mail recorded as handled there without its entry, which would lose it.
        self.publish(entry, &key, due_ms, &value);
        Ok((slot, new && queued))
    }

    /// One turn of the retry loop's reading, in one walk from the queue's start: up to
    /// `limit` entries this node sends that are due at `now_ms`, earliest first, leaving
    /// out `skip` (those being tried right now), and when the earliest entry it sends is
    /// due. An entry that does not parse is returned as `Err` with its slot, so the
    /// caller can record and remove it.
    pub fn turn(&self, now_ms: i64, skip: &HashSet<Slot>, limit: usize) -> Result<Turn, StoreError> {
        let mut turn = Turn::default();
        let mut sources = self.sources.lock().expect("sources lock");
        for item in self.retry.iter() {
            let (key, value) = item?;
            if !self.eligible(&key, &value, &mut sources) {
                continue;
            }
            let slot = Slot(key.to_vec());
            let due_ms = slot.due_ms();
            turn.next_due_ms.get_or_insert(due_ms);
            if due_ms > now_ms || turn.due.len() == limit {
                break;
            }
            if !skip.contains(&slot) {
                turn.due.push((slot, serde_json::from_slice(&value).map_err(EntryError::from)));
            }
        }
        Ok(turn)
    }

    /// [`RetryQueue::turn`]'s entries alone.
    pub fn due(&self, now_ms: i64, skip: &HashSet<Slot>, limit: usize) -> Result<Vec<(Slot, Entry)>, StoreError> {
        Ok(self.turn(now_ms, skip, limit)?.due)
    }

    /// When the earliest entry this node sends is due, if there is one.
    pub fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        Ok(self.turn(i64::MIN, &HashSet::new(), 0)?.next_due_ms)
    }

    /// Moves `slot`'s entry to `due_ms` with its new state, in the queue or aside
    /// (its partition given up while it was being tried) as it was; atomic, so after a
    /// crash the entry is at one place or the other, never lost. Published only while
    /// this node reads its partition: the next reader has the entry from the changelog
    /// and may have sent it and taken it out since, which a late republish would undo.
    /// `None` if the entry is no longer there: taken out while it was being tried (its
    /// partition came back, and its changelog said another node had sent it or queued
    /// it anew), so it is not put back.
    /// An entry made this node's only meanwhile ([`RetryQueue::own_refused`]) stays so.
    pub fn reschedule(&self, slot: &Slot, entry: &Queued, due_ms: i64) -> Result<Option<Slot>, StoreError> {
        let key = entry.sent_key()?;
        let next = Slot::new(due_ms, &key);
        let own = Queued { source: None, logged: false, ..entry.clone() };
        let (value, own_value) = (serde_json::to_vec(entry)?, serde_json::to_vec(&own)?);
        let moved = (&self.retry, &self.parked)
            .transaction(|(retry, parked)| {
                let (tree, aside, before) = if let Some(before) = parked.remove(slot.0.as_slice())? {
                    (parked, true, before)
                } else if let Some(before) = retry.remove(slot.0.as_slice())? {
                    (retry, false, before)
                } else {
                    return Ok(None);
                };
                let local = matches!(Head::of(&before), Some(Head { source: None, .. }));
                tree.insert(next.0.as_slice(), if local { own_value.as_slice() } else { value.as_slice() })?;
                Ok::<_, ConflictableTransactionError<StoreError>>(Some((aside, local)))
            })
            .map_err(store_error)?;
        self.forget([slot.0.as_slice()]);
        let Some((aside, local)) = moved else { return Ok(None) };
        if !aside && !local && self.sends(entry) {
            self.publish(entry, &key, due_ms, &value);
        }
        Ok(Some(next))
    }

    /// Takes `slot`'s entry out: sent, or given up and dead-lettered (also one set aside
    /// while it was being tried). Says whether it was in the queue.
    pub fn remove(&self, slot: &Slot) -> Result<bool, StoreError> {
        let (old, queued) = match self.retry.remove(slot.0.as_slice())? {
            Some(old) => (old, true),
            None => match self.parked.remove(slot.0.as_slice())? {
                Some(old) => (old, false),
                None => return Ok(false),
            },
        };
        self.forget([slot.0.as_slice()]);
        if let (Some(sink), Ok(entry)) = (self.sink.get(), serde_json::from_slice::<Queued>(&old)) {
            if let Some(source) = &entry.source {
                // The sent record outlives the entry's tombstone, which compaction drops
                // after a day; it goes first, so a node killed between the two leaves
                // the entry live (sent twice, the window docs/delivery.md names), never
                // gone unrecorded.
                let handled_secs = entry.first_failed_ms.div_euclid(1000).max(0) as u64;
                sink.sent(source, &slot.0[8..], handled_secs);
                sink.retry_removed(source, &slot.0[8..]);
            }
        }
        Ok(queued)
    }

    /// Makes the entries whose changelog refused them as too large
    /// ([`PartitionSink::refused_as_too_large`]) this store's only: no partition's, so
    /// they are sent from here whichever node reads their partition, and never set aside
    /// for a partition that may not come back to this node (no other node has them, and
    /// their CDRs are committed). Those found set aside come back into the queue: says
    /// how many.
    pub fn own_refused(&self) -> Result<usize, StoreError> {
        let Some(sink) = self.sink.get() else { return Ok(0) };
        let refused: HashSet<Vec<u8>> = sink.refused_as_too_large().into_iter().collect();
        if refused.is_empty() {
            return Ok(0);
        }
        let mut slots = Vec::new();
        for item in self.retry.iter().keys().chain(self.parked.iter().keys()) {
            let slot = item?;
            if slot.get(8..).is_some_and(|key| refused.contains(key)) {
                slots.push(slot);
            }
        }
        let mut back = 0;
        for slot in &slots {
            // The entry as it is now: one sent, moved or set aside since the walk is
            // taken as it is, or left alone if gone.
            let moved = (&self.retry, &self.parked)
                .transaction(|(retry, parked)| {
                    let (value, aside) = match retry.remove(slot)? {
                        Some(value) => (value, false),
                        None => match parked.remove(slot)? {
                            Some(value) => (value, true),
                            None => return Ok(None),
                        },
                    };
                    let own = match serde_json::from_slice::<Queued>(&value) {
                        Ok(entry) => serde_json::to_vec(&Queued { source: None, logged: false, ..entry })
                            .map_err(|e| ConflictableTransactionError::Abort(StoreError::from(e)))?,
                        Err(_) => value.to_vec(),
                    };
                    retry.insert(slot, own)?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(Some(aside))
                })
                .map_err(store_error)?;
            self.forget([slot.as_ref()]);
            back += usize::from(moved == Some(true));
        }
        // Taken from the sink only once done: keys of an entry that failed to move stay
        // for the next call.
        sink.forget_refused(&refused);
        Ok(back)
    }

    /// Sets aside the entries this node does not send now (their partitions given up,
    /// or not assigned since it started): their partition's reader sends them. Each
    /// moves in a transaction of its own, so after a crash it is at one place or the
    /// other. Says how many.
    pub fn park(&self) -> Result<usize, StoreError> {
        let mut sources = self.sources.lock().expect("sources lock");
        let mut foreign = Vec::new();
        for item in self.retry.iter() {
            let (slot, value) = item?;
            if !self.eligible(&slot, &value, &mut sources) {
                foreign.push(slot);
            }
        }
        drop(sources);
        let mut parked = 0;
        for slot in &foreign {
            let moved = (&self.retry, &self.parked)
                .transaction(|(retry, aside)| {
                    let Some(value) = retry.remove(slot)? else { return Ok(false) };
                    aside.insert(slot, value)?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(true)
                })
                .map_err(store_error)?;
            parked += usize::from(moved);
        }
        self.forget(foreign.iter().map(|slot| slot.as_ref()));
        Ok(parked)
    }

    /// Forgets the entries set aside whose mails first failed before `cutoff_ms`; how
    /// many. An entry is set aside while another node reads its partition, and that node
    /// has its mail (from the partition's changelog, or from its CDR read again if the
    /// changelog never had it): past the give-up age it has sent the mail or given it up
    /// (a dead letter). The copy here then only takes room for as long as the partition
    /// does not come back to this node: for ever, if it never does. One taken back into
    /// the queue meanwhile (its partition assigned here again) stays.
    pub fn forget_parked_failed_before(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let mut old = Vec::new();
        for item in self.parked.iter() {
            let (slot, value) = item?;
            if serde_json::from_slice::<Queued>(&value).is_ok_and(|entry| entry.first_failed_ms < cutoff_ms) {
                old.push((slot, value));
            }
        }
        let mut forgotten = 0;
        for (slot, value) in &old {
            forgotten += usize::from(self.parked.compare_and_swap(slot, Some(value), None::<&[u8]>)?.is_ok());
        }
        self.forget(old.iter().map(|(slot, _)| slot.as_ref()));
        Ok(forgotten)
    }

    /// The keys of this store's entries of `partitions` queued as published
    /// ([`Queued::logged`]): what [`RetryQueue::reconcile`] asks the sent changelog about.
    pub fn logged_keys_of(&self, partitions: &[PartitionId]) -> Result<HashSet<Vec<u8>>, StoreError> {
        let mut keys = HashSet::new();
        for item in self.retry.iter().chain(self.parked.iter()) {
            let (slot, value) = item?;
            if let Some(Head { source: Some(source), logged: true }) = Head::of(&value) {
                if partitions.contains(&source) {
                    keys.insert(slot[8..].to_vec());
                }
            }
        }
        Ok(keys)
    }

    /// Makes this store's entries of each of `partitions` the changelog's, in the queue
    /// (set aside ones included): its log holds the live entries there (key → due and
    /// JSON; `None`: removed), and `handled` the keys of this store's [`Queued::logged`]
    /// entries that have a sent record in the sent changelog after where this store last
    /// read it. A logged entry the changelog does not have was either never confirmed
    /// there (written just before a crash), or handled by another node since: taken out
    /// of the queue there, its tombstone since compacted away, or its CDR read again
    /// there and its mail sent. A sent record tells the last two apart: their entries
    /// are dropped (sending them would be sending twice). The others, and entries queued
    /// unlogged (a replayed dead letter, whose sent record is its refusal's), are
    /// queued and returned, to be published again. One walk of the queue for all the
    /// partitions (a walk each, of a queue of 180 000 mails, held a rebalance's
    /// revocations for as many walks as partitions assigned), one transaction each.
    /// Blocking; call it before the partitions are read. `done` is told what was done
    /// for each partition once it is (those before a failure count).
    pub fn reconcile(
        &self,
        partitions: &[(&PartitionId, &LoggedEntries)],
        handled: &HashSet<Vec<u8>>,
        mut done: impl FnMut(&PartitionId, Reconciled),
    ) -> Result<(), StoreError> {
        /// What the walk found for one partition.
        #[derive(Default)]
        struct Found {
            /// Out of either tree.
            dropped: Vec<Vec<u8>>,
            /// Set-aside entries back into the queue.
            back: Vec<(Vec<u8>, sled::IVec)>,
            unconfirmed: Vec<Unconfirmed>,
        }
        let mut found: Vec<Found> = partitions.iter().map(|_| Found::default()).collect();
        for (item, parked) in self.retry.iter().map(|i| (i, false)).chain(self.parked.iter().map(|i| (i, true))) {
            let (slot, value) = item?;
            let key = &slot[8..];
            let head = Head::of(&value);
            for ((partition, log), found) in partitions.iter().zip(&mut found) {
                // An entry of no partition (a replayed dead letter, one its changelog
                // refused) is this store's only: no changelog takes it out, not even one
                // holding its mail's key from before (the mail dead-lettered: a tombstone
                // kept a day or more). Another partition's entry is that partition's.
                if matches!(head, Some(Head { source: None, .. }))
                    || head.as_ref().is_some_and(|h| h.of_another(partition))
                {
                    continue;
                }
                if log.contains_key(key) {
                    found.dropped.push(slot.to_vec());
                    continue;
                }
                let Some(Head { source: Some(source), logged }) = &head else { continue };
                if source != *partition {
                    continue;
                }
                if *logged && handled.contains(key) {
                    found.dropped.push(slot.to_vec());
                } else {
                    let due_ms = Slot(slot.to_vec()).due_ms();
                    found.unconfirmed.push(Unconfirmed { key: key.to_vec(), due_ms, entry: value.to_vec() });
                    if parked {
                        found.back.push((slot.to_vec(), value.clone()));
                    }
                }
            }
        }
        for ((partition, log), Found { dropped, back, unconfirmed }) in partitions.iter().zip(found) {
            // A changelog partition holds the entries of every CDR topic's partition of
            // its number: another topic's are not this partition's to queue.
            let restored_here = |value: &[u8]| !Head::of(value).is_some_and(|h| h.of_another(partition));
            let mut restored: Vec<(Vec<u8>, &[u8])> =
                back.iter().map(|(slot, value)| (slot.clone(), value.as_ref())).collect();
            for (key, live) in log.iter() {
                if let Some((due_ms, value)) = live.as_ref().filter(|(_, v)| restored_here(v)) {
                    let mut slot = (due_ms.max(&0).to_owned() as u64).to_be_bytes().to_vec();
                    slot.extend_from_slice(key);
                    restored.push((slot, value.as_slice()));
                }
            }
            let queued_change = (&self.retry, &self.parked)
                .transaction(|(retry, parked)| {
                    let mut change = 0i64;
                    for slot in dropped.iter().chain(back.iter().map(|(slot, _)| slot)) {
                        change -= i64::from(retry.remove(slot.as_slice())?.is_some());
                        parked.remove(slot.as_slice())?;
                    }
                    for (slot, value) in &restored {
                        change += i64::from(retry.insert(slot.as_slice(), *value)?.is_none());
                    }
                    Ok::<_, ConflictableTransactionError<StoreError>>(change)
                })
                .map_err(store_error)?;
            self.forget(dropped.iter().chain(restored.iter().map(|(slot, _)| slot)).map(Vec::as_slice));
            done(partition, Reconciled { unconfirmed, queued_change });
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.retry.len()
    }

    /// The sent keys of the mails this node sends from its queue (not those set aside).
    pub fn sent_keys(&self) -> Result<HashSet<Vec<u8>>, StoreError> {
        let mut keys = HashSet::new();
        for slot in self.retry.iter().keys() {
            keys.insert(slot?.get(8..).unwrap_or_default().to_vec());
        }
        Ok(keys)
    }

    /// Removes the set-aside entries of the mail whose sent key is `key`: a replay
    /// queued it to be sent here, and a copy set aside would wait for its partition, to
    /// be sent again or dropped there.
    pub fn drop_set_aside(&self, key: &[u8]) -> Result<(), StoreError> {
        let mut dropped = Vec::new();
        for slot in self.parked.iter().keys() {
            let slot = slot?;
            if slot.get(8..) == Some(key) {
                self.parked.remove(&slot)?;
                dropped.push(slot);
            }
        }
        self.forget(dropped.iter().map(|slot| slot.as_ref()));
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.retry.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::Renderer;

    fn queued(call_id: &str, recipient: &str) -> (Queued, Mail) {
        let renderer = Renderer::new("no-reply@notify.example.jp".parse().unwrap());
        let called = PhoneNumber::parse("0312345678").unwrap();
        let mail = renderer
            .render_test(
                called.as_str(),
                &DestinationAddress::parse(recipient).unwrap(),
                "n",
                crate::render::MailService::Call,
            )
            .unwrap();
        let origin = Origin {
            call_id: call_id.into(),
            called,
            ended_at: DateTime::from_timestamp(1_764_000_000, 0).unwrap(),
            source: None,
        };
        (Queued::new(&mail, &origin, "451 4.3.0 try later", DateTime::from_timestamp(1_764_000_001, 0).unwrap()), mail)
    }

    /// R-N3, R-M4: an address R-N3 admits and RFC 5322 does not (`taro..@`, as some
    /// Japanese carriers issued) is sent to as typed on the first attempt: read back from
    /// the queue it is the same mail, not an unreadable entry removed without a dead
    /// letter (every mail to such an address that waited in the queue was lost).
    #[test]
    fn r_n3_r_m4_a_queued_mail_to_an_address_rfc_5322_refuses_is_read_back_whole() {
        for recipient in ["taro..@docomo.ne.jp", "a.b.@ezweb.ne.jp"] {
            let (entry, mail) = queued("c-1", recipient);
            let (again, _) = entry.to_mail().unwrap_or_else(|e| panic!("{recipient}: {e}"));
            assert_eq!(again.recipient, mail.recipient);
            assert_eq!(again.envelope.to(), mail.envelope.to(), "{recipient}");
            assert_eq!(again.bytes, mail.bytes);
        }
    }

    #[test]
    fn a_queued_mail_is_recorded_as_handled_and_comes_back_due_in_order() {
        let store = Store::temporary().unwrap();
        let queue = RetryQueue::open(&store).unwrap();
        let (late, _) = queued("c-late", "a@example.jp");
        let (early, mail) = queued("c-early", "b@example.jp");
        queue.push(&late, 2_000, 1).unwrap();
        queue.push(&early, 1_000, 1).unwrap();

        assert!(store.was_sent(&early.sent_key().unwrap()).unwrap(), "a replay must not queue it again");
        assert_eq!(queue.next_due_ms().unwrap(), Some(1_000));
        assert!(queue.due(999, &Default::default(), 10).unwrap().is_empty());
        let due = queue.due(2_000, &Default::default(), 10).unwrap();
        let entries: Vec<Queued> = due.into_iter().map(|(_, e)| e.unwrap()).collect();
        assert_eq!(entries, [early.clone(), late]);

        let (again, origin) = entries[0].to_mail().unwrap();
        assert_eq!((again.bytes, again.envelope, again.message_id), (mail.bytes, mail.envelope, mail.message_id));
        assert_eq!(origin.call_id, "c-early");
    }

    #[test]
    fn rescheduling_moves_the_entry_and_removing_empties_the_queue() {
        let store = Store::temporary().unwrap();
        let queue = RetryQueue::open(&store).unwrap();
        let (mut entry, _) = queued("c", "a@example.jp");
        let (slot, new) = queue.push(&entry, 1_000, 1).unwrap();
        assert!(new);
        assert_eq!(queue.push(&entry, 1_000, 1).unwrap(), (slot.clone(), false), "a retried write is one entry");
        entry.attempts = 2;
        let later = queue.reschedule(&slot, &entry, 5_000).unwrap().expect("queued");

        assert_eq!(queue.len(), 1);
        assert!(queue.due(4_999, &Default::default(), 10).unwrap().is_empty());
        let skip = [later.clone()].into_iter().collect();
        assert!(queue.due(5_000, &skip, 10).unwrap().is_empty(), "an entry being tried is left out");
        assert_eq!(queue.due(5_000, &Default::default(), 10).unwrap()[0].1.as_ref().unwrap().attempts, 2);
        assert!(queue.remove(&later).unwrap());
        assert!(queue.is_empty());
        assert!(!queue.remove(&later).unwrap(), "removing it twice counts once");
    }

    /// R-M4 (delivery can be delayed, never silently dropped): the retry
    /// loop's one read per turn gives what to try now, and how long it may sleep (an
    /// entry being tried or waiting for a free connection counts as due).
    #[test]
    fn r_m4_a_turn_gives_the_due_mails_and_when_the_next_falls_due() {
        let store = Store::temporary().unwrap();
        let queue = RetryQueue::open(&store).unwrap();
        let mut slots = Vec::new();
        for (call_id, due_ms) in [("c-a", 1_000), ("c-b", 2_000), ("c-c", 3_000)] {
            slots.push(queue.push(&queued(call_id, "a@example.jp").0, due_ms, 1).unwrap().0);
        }
        let turn = |skip: &[&Slot], limit| {
            let skip = skip.iter().map(|s| (*s).clone()).collect();
            let turn = queue.turn(2_500, &skip, limit).unwrap();
            let due: Vec<String> = turn.due.into_iter().map(|(_, e)| e.unwrap().call_id).collect();
            (due, turn.next_due_ms)
        };
        assert_eq!(turn(&[], 10), (vec!["c-a".to_owned(), "c-b".to_owned()], Some(1_000)));
        assert_eq!(turn(&[], 1), (vec!["c-a".to_owned()], Some(1_000)), "as many as there are free connections");
        assert_eq!(turn(&[], 0), (vec![], Some(1_000)), "no free connection: only when the next is due");
        assert_eq!(turn(&[&slots[0], &slots[1]], 10), (vec![], Some(1_000)), "both being tried");
        assert!(queue.remove(&slots[0]).unwrap() && queue.remove(&slots[1]).unwrap());
        assert_eq!(turn(&[], 10), (vec![], Some(3_000)), "nothing due: sleep until the next");
        assert_eq!(queue.next_due_ms().unwrap(), Some(3_000));
    }

    /// A node that reads the partitions in `owned` (changed by a rebalance).
    struct Reads {
        owned: std::sync::Mutex<Vec<i32>>,
        /// Keys of entries the changelog refused as too large, not yet taken.
        refused: std::sync::Mutex<Vec<Vec<u8>>>,
    }

    impl PartitionSink for Reads {
        fn sent(&self, _: &PartitionId, _: &[u8], _: u64) {}
        fn retry_put(&self, _: &PartitionId, _: &[u8], _: i64, _: &[u8]) {}
        fn retry_removed(&self, _: &PartitionId, _: &[u8]) {}
        fn owns(&self, partition: &PartitionId) -> bool {
            self.owned.lock().unwrap().contains(&partition.partition)
        }
        fn refused_as_too_large(&self) -> Vec<Vec<u8>> {
            self.refused.lock().unwrap().clone()
        }
        fn forget_refused(&self, keys: &HashSet<Vec<u8>>) {
            self.refused.lock().unwrap().retain(|key| !keys.contains(key));
        }
    }

    /// The queue in the store of a node that reads partitions 0 and 1 of topic `cdr`
    /// for now.
    fn queue_of_a_node() -> (Store, RetryQueue, std::sync::Arc<Reads>) {
        let store = Store::temporary().unwrap();
        let node = std::sync::Arc::new(Reads { owned: std::sync::Mutex::new(vec![0, 1]), refused: Default::default() });
        store.attach_partition_sink(node.clone());
        let queue = RetryQueue::open(&store).unwrap();
        (store, queue, node)
    }

    /// A mail of a call read from `partition` of topic `cdr`.
    fn of(call_id: &str, partition: i32) -> Queued {
        Queued { source: Some(PartitionId { topic: "cdr".into(), partition }), ..queued(call_id, "a@example.jp").0 }
    }

    /// [`RetryQueue::reconcile`] of `partition` alone, nothing handled elsewhere.
    fn reconcile(queue: &RetryQueue, partition: &PartitionId, log: &LoggedEntries) -> Reconciled {
        let mut reconciled = None;
        queue.reconcile(&[(partition, log)], &HashSet::new(), |_, r| reconciled = Some(r)).unwrap();
        reconciled.expect("reconciled")
    }

    /// The call ids of the mails due by 10 s, as the retry loop would take them.
    fn due_call_ids(queue: &RetryQueue) -> Vec<String> {
        queue.due(10_000, &Default::default(), 10).unwrap().into_iter().map(|(_, e)| e.unwrap().call_id).collect()
    }

    /// Partition 1 assigned to the node again, its changelog empty: what the store has
    /// set aside of it comes back into the queue.
    fn partition_1_back(queue: &RetryQueue, node: &Reads) {
        let p1 = PartitionId { topic: "cdr".into(), partition: 1 };
        reconcile(queue, &p1, &LoggedEntries::new());
        *node.owned.lock().unwrap() = vec![0, 1];
    }

    /// R-M4, docs/cluster.md: a node sends the queued mails of the CDR partitions it
    /// reads now, however often it looked at the queue before a rebalance.
    #[test]
    fn r_m4_after_a_rebalance_the_queue_gives_the_mails_of_the_partitions_read_now() {
        let (_store, queue, node) = queue_of_a_node();
        queue.push(&of("c-0", 0), 1_000, 1).unwrap();
        queue.push(&of("c-1", 1), 2_000, 1).unwrap();
        *node.owned.lock().unwrap() = vec![0];
        assert_eq!((due_call_ids(&queue), queue.next_due_ms().unwrap()), (vec!["c-0".to_owned()], Some(1_000)));
        *node.owned.lock().unwrap() = vec![1];
        assert_eq!((due_call_ids(&queue), queue.next_due_ms().unwrap()), (vec!["c-1".to_owned()], Some(2_000)));
        *node.owned.lock().unwrap() = vec![];
        assert_eq!((due_call_ids(&queue), queue.next_due_ms().unwrap()), (Vec::<String>::new(), None));

        // The entry at partition 0's slot taken out, and a mail of partition 1 queued at
        // the same due time and key (an entry written again otherwise).
        *node.owned.lock().unwrap() = vec![0, 1];
        let (slot, _) = queue.push(&of("c-0", 0), 1_000, 1).unwrap();
        assert!(queue.remove(&slot).unwrap());
        queue.push(&of("c-0", 1), 1_000, 1).unwrap();
        *node.owned.lock().unwrap() = vec![1];
        assert_eq!(due_call_ids(&queue), ["c-0", "c-1"]);
    }

    /// R-M4, docs/cluster.md: the queued mails of a partition given up are set aside, out
    /// of the node's queue (its length, the retry loop's walk), and come back into it
    /// with the partition: as its changelog has them, or as this store has them when the
    /// changelog never confirmed them. One sent while aside does not come back.
    #[test]
    fn r_m4_the_mails_of_a_partition_given_up_are_set_aside_until_it_comes_back() {
        let (_store, queue, node) = queue_of_a_node();
        queue.push(&of("c-0", 0), 1_000, 1).unwrap();
        let (tried, _) = queue.push(&of("c-1", 1), 2_000, 1).unwrap();
        let (aside, _) = queue.push(&of("c-2", 1), 3_000, 1).unwrap();
        assert_eq!(queue.len(), 3);

        // Partition 1 given up while c-1 was being tried: its attempt ends after.
        *node.owned.lock().unwrap() = vec![0];
        assert_eq!(queue.park().unwrap(), 2);
        assert_eq!((queue.len(), due_call_ids(&queue)), (1, vec!["c-0".to_owned()]));
        let tried = queue.reschedule(&tried, &of("c-1", 1), 2_500).unwrap().expect("aside");
        assert_eq!(queue.len(), 1, "rescheduled aside");
        let (_, added) = queue.push(&of("c-3", 1), 4_000, 1).unwrap();
        assert!(!added, "a mail of partition 1 cut short by the revocation is queued aside");
        assert_eq!(queue.len(), 1);
        assert!(!queue.remove(&aside).unwrap(), "sent while aside: not in the queue");

        // Partition 1 back: its changelog has c-1 (due later, as its last reader left
        // it); c-3 never reached it.
        let c1 = Queued { logged: true, ..of("c-1", 1) };
        let log: LoggedEntries =
            [(c1.sent_key().unwrap().as_bytes().to_vec(), Some((5_000, serde_json::to_vec(&c1).unwrap())))].into();
        let p1 = PartitionId { topic: "cdr".into(), partition: 1 };
        let reconciled = reconcile(&queue, &p1, &log);
        *node.owned.lock().unwrap() = vec![0, 1];
        let unconfirmed: Vec<Vec<u8>> = reconciled.unconfirmed.into_iter().map(|u| u.key).collect();
        assert_eq!(unconfirmed, [of("c-3", 1).sent_key().unwrap().as_bytes().to_vec()], "c-3 is published again");
        assert!(!queue.remove(&tried).unwrap(), "the changelog's c-1 replaced this store's");
        assert_eq!((reconciled.queued_change, queue.len()), (2, 3));
        assert_eq!(due_call_ids(&queue), ["c-0", "c-3", "c-1"]);
        assert_eq!(queue.next_due_ms().unwrap(), Some(1_000));
        assert_eq!(queue.park().unwrap(), 0, "nothing of another partition left in the queue");
    }

    /// R-M4, docs/cluster.md: a rebalance assigning several partitions at once restores
    /// them in one walk of the queue: each partition's set-aside entries come back as its
    /// changelog has them, and those it never confirmed are published again to their own
    /// partition's changelog, not another's.
    #[test]
    fn r_m4_partitions_assigned_together_each_get_their_own_entries_back() {
        let (_store, queue, node) = queue_of_a_node();
        queue.push(&of("c-0", 0), 1_000, 1).unwrap();
        queue.push(&of("c-1", 1), 2_000, 1).unwrap();
        queue.push(&of("c-1-sent", 1), 3_000, 1).unwrap();
        *node.owned.lock().unwrap() = vec![];
        assert_eq!(queue.park().unwrap(), 3);

        let c0 = Queued { logged: true, ..of("c-0", 0) };
        let key = |entry: &Queued| entry.sent_key().unwrap().as_bytes().to_vec();
        let log_0: LoggedEntries = [(key(&c0), Some((4_000, serde_json::to_vec(&c0).unwrap())))].into();
        let log_1: LoggedEntries = [(key(&of("c-1-sent", 1)), None)].into();
        let (p0, p1) =
            (PartitionId { topic: "cdr".into(), partition: 0 }, PartitionId { topic: "cdr".into(), partition: 1 });
        let mut done = Vec::new();
        queue
            .reconcile(&[(&p0, &log_0), (&p1, &log_1)], &HashSet::new(), |p, r| {
                let keys: Vec<Vec<u8>> = r.unconfirmed.into_iter().map(|u| u.key).collect();
                done.push((p.clone(), keys, r.queued_change));
            })
            .unwrap();
        *node.owned.lock().unwrap() = vec![0, 1];
        assert_eq!(
            done,
            [(p0, vec![], 1), (p1, vec![key(&of("c-1", 1))], 1)],
            "c-1 alone is published again, to cdr/1"
        );
        assert_eq!(due_call_ids(&queue), ["c-1", "c-0"], "c-0 due when its changelog says, c-1-sent taken out");
        assert_eq!(queue.len(), 2);
    }

    /// R-M4, `dead-letters replay`: a replayed mail, queued in this node's store only,
    /// stays queued when a partition is assigned whose changelog still holds its key: the
    /// tombstone of its entry from before it was dead-lettered. It was dropped as handled
    /// there, and never sent.
    #[test]
    fn r_m4_a_replayed_mail_stays_queued_when_a_changelog_holds_its_old_tombstone() {
        let (_store, queue, _node) = queue_of_a_node();
        let (replayed, _) = queued("c-replayed", "a@example.jp");
        queue.push(&replayed, 1_000, 1).unwrap();
        let log: LoggedEntries = [(replayed.sent_key().unwrap().as_bytes().to_vec(), None)].into();
        let p1 = PartitionId { topic: "cdr".into(), partition: 1 };
        let reconciled = reconcile(&queue, &p1, &log);
        assert!(reconciled.unconfirmed.is_empty(), "not this partition's to publish");
        assert_eq!((queue.len(), due_call_ids(&queue)), (1, vec!["c-replayed".to_owned()]));
    }

    /// R-M4, docs/cluster.md: a mail whose retry entry its changelog refused as too large
    /// (a fax with a large PDF; its CDR is committed all the same) is this node's only:
    /// when its partition goes, to a node that has neither the entry nor the CDR to read
    /// again, it stays in this node's queue and is sent from here; one set aside before
    /// the refusal was known comes back. It was set aside for a partition that might
    /// never come back here, then forgotten a day past its give-up age: never sent.
    #[test]
    fn r_m4_a_mail_whose_entry_its_changelog_refused_is_sent_from_here_when_its_partition_goes() {
        let (_store, queue, node) = queue_of_a_node();
        let refused = |call_id: &str, partition| {
            let key = of(call_id, partition).sent_key().unwrap().as_bytes().to_vec();
            node.refused.lock().unwrap().push(key);
        };
        queue.push(&of("c-large", 1), 1_000, 1).unwrap();
        queue.push(&of("c-logged", 1), 2_000, 1).unwrap();
        refused("c-large", 1);
        assert_eq!(queue.own_refused().unwrap(), 0, "in the queue already");
        assert_eq!(due_call_ids(&queue), ["c-large", "c-logged"]);
        *node.owned.lock().unwrap() = vec![0];
        assert_eq!(queue.park().unwrap(), 1, "only the entry its changelog has is set aside");
        assert_eq!(due_call_ids(&queue), ["c-large"]);

        // Set aside (its partition went) before the refusal came.
        let (aside, _) = queue.push(&of("c-aside", 1), 3_000, 1).unwrap();
        refused("c-aside", 1);
        assert_eq!(queue.own_refused().unwrap(), 1, "taken back into the queue");
        assert_eq!((queue.len(), due_call_ids(&queue)), (2, vec!["c-large".to_owned(), "c-aside".to_owned()]));

        // An attempt under way meanwhile ends in a temporary failure: its copy of the
        // entry still names partition 1, and the entry stays this node's all the same.
        queue.reschedule(&aside, &of("c-aside", 1), 4_000).unwrap().expect("queued");
        assert_eq!((queue.len(), due_call_ids(&queue)), (2, vec!["c-large".to_owned(), "c-aside".to_owned()]));
    }

    /// R-M4, docs/cluster.md: an entry taken out while it was being tried (its partition
    /// went, came back, and its changelog said the node that read it meanwhile sent it)
    /// is not put back when that attempt ends in a temporary failure. It was queued and
    /// published again: sent a second time, after a clean delivery elsewhere.
    #[test]
    fn r_m4_an_entry_taken_out_while_being_tried_is_not_put_back_by_its_reschedule() {
        let (_store, queue, _node) = queue_of_a_node();
        let entry = of("c-sent-elsewhere", 1);
        let (slot, _) = queue.push(&entry, 1_000, 1).unwrap();
        let key = entry.sent_key().unwrap().as_bytes().to_vec();
        let p1 = PartitionId { topic: "cdr".into(), partition: 1 };
        reconcile(&queue, &p1, &[(key, None)].into());
        assert!(queue.is_empty(), "taken out: handled by the partition's other reader");

        assert_eq!(queue.reschedule(&slot, &entry, 5_000).unwrap(), None);
        assert!(queue.is_empty() && due_call_ids(&queue).is_empty(), "not put back");
    }

    /// docs/cluster.md: a changelog partition holds the entries of every CDR topic's
    /// partition of its number. Restoring `cdr/1` queues `cdr/1`'s entries only, and
    /// leaves this store's `fax/1` entry as it was: `fax/1`'s restore's. Another topic's
    /// live entries were put in the queue (counted in its length, walked at every turn,
    /// never sent), and this store's own dropped.
    #[test]
    fn r_m4_a_restore_takes_only_its_own_topic_s_entries_from_a_shared_changelog_partition() {
        let (_store, queue, _node) = queue_of_a_node();
        let fax = |call_id: &str| Queued {
            source: Some(PartitionId { topic: "fax".into(), partition: 1 }),
            logged: true,
            ..queued(call_id, "a@example.jp").0
        };
        queue.push(&fax("f-here"), 1_000, 1).unwrap();
        let logged = |entry: &Queued| {
            (entry.sent_key().unwrap().as_bytes().to_vec(), Some((2_000, serde_json::to_vec(entry).unwrap())))
        };
        let cdr = Queued { logged: true, ..of("c-1", 1) };
        let log: LoggedEntries = [logged(&cdr), logged(&fax("f-other")), logged(&fax("f-here"))].into();
        let p1 = PartitionId { topic: "cdr".into(), partition: 1 };
        let reconciled = reconcile(&queue, &p1, &log);
        assert_eq!((reconciled.queued_change, queue.len()), (1, 2));
        assert_eq!(due_call_ids(&queue), ["f-here", "c-1"], "this store's fax entry as it was, due at 1 s");
    }

    /// R-M4, docs/cluster.md: entries set aside for a partition another node reads are
    /// forgotten once their mails are past the give-up age (that node has sent them or
    /// given them up), so a partition that never comes back does not leave them in the
    /// store for ever. A newer entry set aside stays, and so does every queued one.
    #[test]
    fn r_m4_entries_set_aside_past_their_give_up_age_are_forgotten() {
        let (_store, queue, node) = queue_of_a_node();
        let failed_at = |call_id: &str, partition, ms| Queued { first_failed_ms: ms, ..of(call_id, partition) };
        queue.push(&failed_at("old-aside", 1, 1_000), 5_000, 1).unwrap();
        queue.push(&failed_at("new-aside", 1, 9_000), 6_000, 1).unwrap();
        queue.push(&failed_at("old-queued", 0, 1_000), 4_000, 1).unwrap();
        *node.owned.lock().unwrap() = vec![0];
        assert_eq!(queue.park().unwrap(), 2);

        assert_eq!(queue.forget_parked_failed_before(5_000).unwrap(), 1);
        assert_eq!(queue.forget_parked_failed_before(5_000).unwrap(), 0, "forgotten once");
        assert_eq!(queue.len(), 1, "the queue untouched");
        partition_1_back(&queue, &node);
        assert_eq!(due_call_ids(&queue), ["old-queued", "new-aside"]);
    }

    /// The engine's hourly task: entries set aside past their give-up age and a day are
    /// forgotten an hour after the start (not before: the node's partitions, and their
    /// entries, may still come back to it), then every hour; a newer one stays (R-M4).
    #[tokio::test(start_paused = true)]
    async fn r_m4_old_entries_set_aside_are_forgotten_from_an_hour_after_the_start_then_hourly() {
        let (store, queue, node) = queue_of_a_node();
        let give_up = std::time::Duration::from_secs(2 * 3600);
        let now_ms = Utc::now().timestamp_millis();
        let too_old_ms = now_ms - (give_up.as_millis() as i64 + 86_400_000 + 60_000);
        let failed_at = |call_id: &str, ms| Queued { first_failed_ms: ms, ..of(call_id, 1) };
        queue.push(&failed_at("old", too_old_ms), 5_000, 1).unwrap();
        queue.push(&failed_at("recent", now_ms), 6_000, 1).unwrap();
        *node.owned.lock().unwrap() = vec![0];
        assert_eq!(queue.park().unwrap(), 2);
        let aside = store.open_tree(PARKED_TREE).unwrap();
        // The task's work runs on a blocking thread: wait for it in real time.
        let settles_at = |want: usize| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while aside.len() != want && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            aside.len()
        };

        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(crate::deliver::forget_old_aside_hourly(store.clone(), give_up, stop.clone()));
        tokio::time::sleep(std::time::Duration::from_secs(59 * 60)).await;
        assert_eq!(aside.len(), 2, "nothing forgotten within the first hour");
        tokio::time::sleep(std::time::Duration::from_secs(2 * 60)).await;
        assert_eq!(settles_at(1), 1, "the old entry forgotten an hour after the start");

        // An hour later, another that grew old meanwhile (set aside at once: its
        // partition is not read here now).
        queue.push(&failed_at("old-too", too_old_ms), 7_000, 1).unwrap();
        assert_eq!(aside.len(), 2);
        tokio::time::sleep(std::time::Duration::from_secs(60 * 60)).await;
        assert_eq!(settles_at(1), 1, "forgotten at the next hour");
        partition_1_back(&queue, &node);
        assert_eq!(due_call_ids(&queue), ["recent"]);
        stop.cancel();
        task.await.unwrap();
    }
}
