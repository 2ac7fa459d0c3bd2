//! What a CDR partition's reader knows of the mails it handled, kept with the
//! partition in Kafka so that the partition's next reader knows it too (Kafka Streams'
//! changelog of a partition's state store):
//!
//! - `kafka.sent_topic`: the sent record of every mail sent or refused, and of every
//!   queued mail once it leaves the queue, in the partition of the same number as its
//!   CDR's; kept as long as the records (`store.sent_retention_days`);
//! - `kafka.retry_topic` (compacted): the live retry-queue entries of each partition,
//!   a tombstone once one is sent or given up. An entry is also its mail's sent record
//!   while it is queued: one record, so a node killed midway cannot leave a mail
//!   recorded as handled without its entry.
//!
//! The node commits a CDR's offset only after the records published before the commit
//! was taken are confirmed by the cluster (`acks=all`), so a record a committed CDR
//! relies on is in the changelog. When a partition is assigned, the node restores both
//! changelogs' partition before it reads a CDR: the sent records from where its store
//! stopped, the retry entries in full (the log's version wins; an entry the log lacks is
//! published again, unless a sent record since says another node handled it). It sends
//! the retries of the partitions it reads, and only those: a node that dies leaves its
//! queued mails to whoever reads their partitions next.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dashmap::DashMap;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::deliver::queue::{LoggedEntries, RetryQueue, Unconfirmed};
use crate::error_event::ErrorEvent;
use crate::store::{PartitionId, PartitionSink, Store};
use crate::telemetry::Metrics;

/// How long the engine's stop waits for the changelog records still on their way.
const STOP_FLUSH_WITHIN: Duration = Duration::from_secs(5);

/// Where the changelogs are, from `kafka.*`.
pub struct PartitionLogOptions<'a> {
    /// The restoring reader's (uncommitted) group is `<group_id>-changelog-reader`.
    pub reach: crate::cluster::Reach<'a>,
    /// `kafka.sent_topic`.
    pub sent_topic: &'a str,
    /// `kafka.retry_topic`.
    pub retry_topic: &'a str,
}

/// Keeps the books of the changelog records: librdkafka calls it on its thread when the
/// cluster has settled a record (written, or refused after librdkafka's own retries).
struct Confirmations {
    ledger: Arc<Ledger>,
    /// The keys of retry entries refused as too large, for the retry queue.
    too_large: Arc<Mutex<Vec<Vec<u8>>>>,
    /// `kafka.sent_topic`, to tell the two changelogs' records apart.
    sent_topic: String,
    metrics: Metrics,
}

impl ClientContext for Confirmations {}

impl ProducerContext for Confirmations {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let message = match result {
            Ok(message) => message,
            Err((e, message)) if message.topic() != self.sent_topic && crate::cluster::too_large(e) => {
                // The topic's own max.message.bytes is below the producer's.
                kept_here_only(&self.metrics, e, message.topic(), message.partition(), message.payload_len());
                let key = message.key().unwrap_or_default().to_vec();
                self.too_large.lock().expect("too large lock").push(key);
                message
            }
            Err((e, message)) => {
                self.ledger.refused.fetch_add(1, Ordering::Relaxed);
                crate::error_event!(self.metrics, ErrorEvent::ChangelogWrite, error = %e, topic = message.topic(),
                    partition = message.partition(), "a changelog record was not written: offsets are no longer committed");
                message
            }
        };
        let retry = message.topic() != self.sent_topic;
        self.ledger.settled(retry, message.partition());
    }
}

/// A retry entry too large for its changelog (a fax mail with a large PDF attached):
/// the mail stays in this node's queue, no partition's from now (the retry queue takes
/// the key from [`PartitionSink::refused_as_too_large`]), and is sent from there whoever
/// reads its partition; the CDR's offset is committed all the same. Stopping the commits
/// for it would stop the engine, at every start, on the same entry; what is given up is
/// the entry's move to another node (if this node is lost before the mail is sent, so
/// is the mail).
fn kept_here_only(metrics: &Metrics, e: &KafkaError, topic: &str, partition: i32, bytes: usize) {
    crate::error_event!(*metrics, ErrorEvent::ChangelogTooLarge, error = %e, topic, partition, bytes,
        "a retry entry is larger than its changelog takes: kept in this node's queue only (raise the retry topic's \
         max.message.bytes, docs/fax.md)");
}

/// Per changelog partition, how many records were published and how many the cluster
/// has settled. librdkafka settles a partition's records in the order they were
/// published (the producer is idempotent), so "n settled" says the first n are: a
/// commit waits for the records published before it, not for the ones after.
#[derive(Default)]
struct Ledger {
    /// (retry changelog?, partition) → its counts.
    partitions: DashMap<(bool, i32), Counts>,
    /// Records the cluster refused for good.
    refused: AtomicU64,
}

#[derive(Default)]
struct Counts {
    published: AtomicU64,
    settled: AtomicU64,
}

impl Ledger {
    fn published(&self, retry: bool, partition: i32) {
        self.partitions.entry((retry, partition)).or_default().published.fetch_add(1, Ordering::SeqCst);
    }

    fn settled(&self, retry: bool, partition: i32) {
        if let Some(counts) = self.partitions.get(&(retry, partition)) {
            counts.settled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The changelog records published up to a moment that the cluster had not settled
/// then: what a commit taken at that moment waits for ([`PartitionLog::mark`]).
#[derive(Debug)]
pub struct Mark(Vec<((bool, i32), u64)>);

/// The restoring reader's context: it reads to each partition's end on purpose, so
/// librdkafka's "reached end of partition" is no error to log.
struct EndsExpected;

impl ClientContext for EndsExpected {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(%error, reason, "changelog reader");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for EndsExpected {}

/// Why [`PartitionLog::confirm`] did not confirm.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum NotConfirmed {
    /// Records still wait for the cluster (a partition's leader lost): not yet.
    #[error("changelog records not confirmed within {0:?}")]
    Late(Duration),
    /// Records the cluster refused for good.
    #[error("{0} changelog records were refused by the cluster")]
    Refused(u64),
}

/// One node's side of the partition changelogs.
pub struct PartitionLog {
    sent_topic: String,
    retry_topic: String,
    /// Taken at [`PartitionLog::stop`], with the reader: the store (which holds this)
    /// outlives the engine, its Kafka clients must not outlive the cluster.
    producer: RwLock<Option<ThreadedProducer<Confirmations>>>,
    /// Restores run on the consumer threads' rebalance callbacks, one at a time.
    reader: Mutex<Option<BaseConsumer<EndsExpected>>>,
    ledger: Arc<Ledger>,
    metrics: Metrics,
    /// The CDR partitions this node reads: it sends their retries.
    owned: RwLock<HashSet<PartitionId>>,
    /// [`PartitionSink::refused_as_too_large`]'s keys, from either side of the producer.
    too_large: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Held while entries move between the queue and aside with [`PartitionLog::owned`]:
    /// a restore's (queued, then owned) on one consumer thread and a revocation's set-aside
    /// on another. Between the two steps of the restore, the set-aside took the restored
    /// entries for another node's and set them aside until the next reassignment.
    moving: Mutex<()>,
}

/// The store's tree of where each sent-topic partition was restored up to, per CDR
/// topic ([`position_key`]).
const POSITIONS_TREE: &str = "sent_log_positions";

/// A CDR topic's key in [`POSITIONS_TREE`] for the sent-topic partition `partition`.
fn position_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut key = Vec::with_capacity(topic.len() + 5);
    key.extend_from_slice(topic.as_bytes());
    key.push(0);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// Where `topic`'s restore of the sent-topic partition `partition` starts: where it
/// stopped last, else where a store written before positions were kept per topic
/// stopped (the partition number alone: any topic's restore, as before), else the start.
fn sent_position(positions: &sled::Tree, topic: &str, partition: i32) -> anyhow::Result<i64> {
    let raw = match positions.get(position_key(topic, partition))? {
        Some(raw) => Some(raw),
        None => positions.get(partition.to_be_bytes())?,
    };
    Ok(raw.and_then(|r| <[u8; 8]>::try_from(r.as_ref()).ok()).map_or(0, i64::from_be_bytes))
}

/// Waits a moment for librdkafka's thread to empty the producer's full local queue. A
/// delivery task publishes its sent record from a tokio worker: there the wait is
/// announced to the runtime (`block_in_place`), which moves the worker's other tasks to
/// another thread meanwhile instead of leaving them stalled behind it.
fn wait_for_room() {
    let pause = || std::thread::sleep(Duration::from_millis(1));
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(pause)
        }
        _ => pause(),
    }
}

impl PartitionLog {
    /// Holds no handle on a store (a store holds it: [`Store::attach_partition_sink`]).
    pub fn start(options: &PartitionLogOptions<'_>, metrics: Metrics) -> anyhow::Result<Self> {
        let ledger = Arc::new(Ledger::default());
        let too_large = Arc::new(Mutex::new(Vec::new()));
        let producer = options
            .reach
            .producer(&[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "5"),
                // A retry entry holds its whole mail, a fax's PDF included.
                ("message.max.bytes", crate::fax::MESSAGE_MAX_BYTES),
            ])
            .create_with_context(Confirmations {
                ledger: ledger.clone(),
                too_large: too_large.clone(),
                sent_topic: options.sent_topic.to_owned(),
                metrics: metrics.clone(),
            })
            .context("creating the changelog producer")?;
        let reader = options
            .reach
            .consumer(&[
                ("group.id", &format!("{}-changelog-reader", options.reach.group_id)),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "true"),
                // A start that retention deleted between the reader's look at the
                // partition's first offset and its fetch: read from the new first one.
                // librdkafka's default (`latest`) jumped to the end, and the restore
                // ended without the records in between (their mails sent again).
                ("auto.offset.reset", "earliest"),
                ("fetch.wait.max.ms", "10"),
                // librdkafka waits 1 s before fetching again once its queue is full: a
                // restore of millions of records would spend most of its time there.
                ("fetch.queue.backoff.ms", "5"),
            ])
            .create_with_context(EndsExpected)
            .context("creating the changelog reader")?;
        Ok(Self {
            sent_topic: options.sent_topic.to_owned(),
            retry_topic: options.retry_topic.to_owned(),
            producer: RwLock::new(Some(producer)),
            reader: Mutex::new(Some(reader)),
            ledger,
            metrics,
            owned: RwLock::default(),
            too_large,
            moving: Mutex::new(()),
        })
    }

    fn produce(&self, topic: &str, partition: i32, key: &[u8], value: Option<&[u8]>) {
        let mut record = BaseRecord::<[u8], [u8]>::to(topic).partition(partition).key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        let producer = self.producer.read().expect("producer lock");
        let Some(producer) = producer.as_ref() else {
            tracing::warn!(topic, partition, "a changelog record after the engine stopped: not written");
            return;
        };
        let retry = topic != self.sent_topic;
        self.ledger.published(retry, partition);
        loop {
            match producer.send(record) {
                Ok(()) => return,
                // A full local queue empties within milliseconds (librdkafka's thread).
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    wait_for_room();
                    record = back;
                }
                Err((e, _)) if retry && crate::cluster::too_large(&e) => {
                    self.ledger.settled(retry, partition);
                    kept_here_only(&self.metrics, &e, topic, partition, value.map_or(0, <[u8]>::len));
                    self.too_large.lock().expect("too large lock").push(key.to_vec());
                    return;
                }
                Err((e, _)) => {
                    self.ledger.refused.fetch_add(1, Ordering::Relaxed);
                    self.ledger.settled(retry, partition);
                    crate::error_event!(self.metrics, ErrorEvent::ChangelogWrite, error = %e, topic,
                        partition, "a changelog record was not written: offsets are no longer committed");
                    return;
                }
            }
        }
    }

    /// The records published so far that the cluster has not settled yet: a commit of
    /// the offsets found safe until now waits for them ([`PartitionLog::confirmed`]).
    pub fn mark(&self) -> Mark {
        let waiting = self.ledger.partitions.iter().filter_map(|entry| {
            let published = entry.published.load(Ordering::SeqCst);
            (entry.settled.load(Ordering::SeqCst) < published).then_some((*entry.key(), published))
        });
        Mark(waiting.collect())
    }

    /// Whether every record up to `mark` is confirmed, without waiting: a commit's
    /// offsets are committed only then, so a committed CDR's records are in the
    /// changelog. Fails for good once a record was refused (the CDRs after it are read
    /// again at the next start).
    pub fn confirmed(&self, mark: &Mark) -> Result<bool, NotConfirmed> {
        let settled = |(key, published): &((bool, i32), u64)| {
            self.ledger.partitions.get(key).is_some_and(|c| c.settled.load(Ordering::SeqCst) >= *published)
        };
        match self.ledger.refused.load(Ordering::Relaxed) {
            0 => Ok(mark.0.iter().all(settled)),
            n => Err(NotConfirmed::Refused(n)),
        }
    }

    /// Waits until every record up to `mark` is confirmed ([`PartitionLog::confirmed`]);
    /// [`NotConfirmed::Late`] after `within` (the records still wait, and may yet be
    /// written).
    pub fn confirm(&self, mark: &Mark, within: Duration) -> Result<(), NotConfirmed> {
        let deadline = Instant::now() + within;
        while !self.confirmed(mark)? {
            if Instant::now() > deadline {
                return Err(NotConfirmed::Late(within));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Restores the changelogs of newly `assigned` partitions into `store`, then sends
    /// their retries from here on. Blocking: the consumer thread's assignment.
    pub fn restore(&self, store: &Store, assigned: &[PartitionId]) -> anyhow::Result<()> {
        self.restore_within(store, assigned, crate::cluster::ANSWER_WITHIN)
    }

    /// [`PartitionLog::restore`], waiting up to `within` for the cluster's answers
    /// about each partition's ends (a try again after a failed restore waits less: it
    /// holds up the reading of the thread's other partitions).
    pub fn restore_within(&self, store: &Store, assigned: &[PartitionId], within: Duration) -> anyhow::Result<()> {
        if assigned.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let guard = self.reader.lock().expect("changelog reader lock");
        let Some(reader) = guard.as_ref() else { anyhow::bail!("the engine is stopping") };
        let numbers: Vec<i32> = {
            let mut n: Vec<i32> = assigned.iter().map(|p| p.partition).collect();
            n.sort_unstable();
            n.dedup();
            n
        };
        let positions = store.open_tree(POSITIONS_TREE)?;
        let queue = RetryQueue::open(store)?;
        let mut retries: HashMap<i32, LoggedEntries> = HashMap::new();
        let mut next_sent: HashMap<Vec<u8>, i64> = HashMap::new();
        let (mut sent, mut entries) = (0u64, 0u64);
        let mut handled = HashSet::new();
        // The sent changelog's partition `n` holds the records of every CDR topic's
        // partition `n`: each topic's partitions are read from where that topic's restore
        // stopped, so that one topic's restore does not pass over the other's records.
        let mut topics: Vec<&str> = assigned.iter().map(|p| p.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            let of_topic: Vec<PartitionId> = assigned.iter().filter(|p| p.topic == topic).cloned().collect();
            // This store's own entries of these partitions, from when it read them last (or
            // died reading them): a sent record of one published since says another node
            // took it out of its queue, or sent its mail afresh, meanwhile.
            let local = queue.logged_keys_of(&of_topic)?;
            let sent_from: Vec<(i32, Offset)> = of_topic
                .iter()
                .map(|p| Ok((p.partition, Offset::Offset(sent_position(&positions, topic, p.partition)?))))
                .collect::<anyhow::Result<_>>()?;
            read_to_end(reader, &self.sent_topic, &sent_from, within, RESTORE_STALLS_AFTER, |message| {
                let key = message.key().unwrap_or_default();
                let at = message.payload().and_then(|v| <[u8; 8]>::try_from(v).ok()).map_or(0, u64::from_be_bytes);
                store.restore_sent(key, at)?;
                if local.contains(key) {
                    handled.insert(key.to_vec());
                }
                next_sent.insert(position_key(topic, message.partition()), message.offset() + 1);
                sent += 1;
                Ok(())
            })?;
        }
        let retry_from: Vec<(i32, Offset)> = numbers.iter().map(|&p| (p, Offset::Beginning)).collect();
        read_to_end(reader, &self.retry_topic, &retry_from, within, RESTORE_STALLS_AFTER, |message| {
            let key = message.key().unwrap_or_default();
            let live = message.payload().filter(|v| v.len() > 8).map(|v| {
                let due = i64::from_be_bytes(v[..8].try_into().expect("eight bytes"));
                (due, v[8..].to_vec())
            });
            // An entry, queued or taken out, is its mail's sent record (`RetryQueue::push`).
            let at = message.timestamp().to_millis().map_or(0, |ms| ms.div_euclid(1000).max(0) as u64);
            store.restore_sent(key, at)?;
            retries.entry(message.partition()).or_default().insert(key.to_vec(), live);
            entries += 1;
            Ok(())
        })?;
        drop(guard);
        let empty = HashMap::new();
        let mut republished = 0;
        let moving = self.moving.lock().expect("moving lock");
        let logs: Vec<(&PartitionId, &LoggedEntries)> =
            assigned.iter().map(|p| (p, retries.get(&p.partition).unwrap_or(&empty))).collect();
        queue.reconcile(&logs, &handled, |partition, reconciled| {
            self.metrics.retry_queue_changed(reconciled.queued_change);
            for Unconfirmed { key, due_ms, entry } in reconciled.unconfirmed {
                self.retry_put(partition, &key, due_ms, &entry);
                republished += 1;
            }
        })?;
        // Only once the queue is reconciled: `handled` (the sent records found past the
        // old positions) lives in memory, and a restore failing in between would start
        // the next one past them, taking a mail sent elsewhere for one never confirmed.
        for (key, next) in next_sent {
            positions.insert(key, &next.to_be_bytes())?;
        }
        store.flush_blocking()?;
        self.owned.write().expect("owned lock").extend(assigned.iter().cloned());
        drop(moving);
        // Dropped: those the retry changelog does not have (its version wins over the rest).
        let handled_elsewhere =
            handled.iter().filter(|key| !retries.values().any(|log| log.contains_key(*key))).count();
        tracing::info!(partitions = assigned.len(), sent_records = sent, retry_records = entries, republished,
            handled_elsewhere,
            took = ?started.elapsed(), "partition changelogs restored");
        Ok(())
    }

    /// Closes the Kafka clients (at the engine's stop, after its tasks): records after
    /// it are not written, restores fail.
    pub fn stop(&self) {
        let producer = self.producer.write().expect("producer lock").take();
        if let Some(producer) = &producer {
            // Said, not passed over: a sent record lost here is a mail the partition's
            // next reader may send again (the retry loop's last sends come after the
            // consumers' last commit, so no commit waited for them).
            if let Err(e) = producer.flush(STOP_FLUSH_WITHIN) {
                let unconfirmed = producer.in_flight_count();
                crate::error_event!(self.metrics, ErrorEvent::ChangelogUnflushed, error = %e, unconfirmed,
                    "changelog records unconfirmed at the stop: the mails they record as sent may be sent again by \
                     their partition's next reader");
            }
        }
        drop(producer);
        drop(self.reader.lock().expect("changelog reader lock").take());
    }

    /// After [`PartitionLog::stop`]: the retry entries the changelog refused as too
    /// large (all known once the producer has flushed; one queued during the stop, after
    /// the retry loop ended) become `store`'s own queue's, as the retry loop makes them
    /// while it runs. Left their partition's, they would be set aside at the next start
    /// if the partition went to another node, which never had them.
    pub fn keep_refused_here(&self, store: &Store) {
        match RetryQueue::open(store).and_then(|queue| queue.own_refused()).and_then(|_| store.flush_blocking()) {
            Ok(()) => {}
            Err(e) => crate::error_event!(self.metrics, ErrorEvent::RetryQueuePark, error = %e,
                "retry entries too large for their changelog not made this node's at its stop: set aside at the \
                 next start if their partition goes to another node"),
        }
    }

    /// Stops sending the retries of `revoked` partitions (their next reader will).
    pub fn disown(&self, revoked: &[PartitionId]) {
        let mut owned = self.owned.write().expect("owned lock");
        revoked.iter().for_each(|p| {
            owned.remove(p);
        });
    }

    /// Sets the retry entries of the partitions this node no longer reads aside, out of
    /// its queue in `store` ([`RetryQueue::park`]). Blocking: a revocation's.
    pub fn set_aside(&self, store: &Store) {
        // Entries refused as too large first: this node's only, not set aside.
        let moving = self.moving.lock().expect("moving lock");
        let parked = RetryQueue::open(store).and_then(|queue| Ok((queue.own_refused()?, queue.park()?)));
        drop(moving);
        match parked {
            Ok((back, parked)) => self.metrics.retry_queue_changed(back as i64 - parked as i64),
            Err(e) => crate::error_event!(self.metrics, ErrorEvent::RetryQueuePark, error = %e,
                "retry entries of partitions given up not set aside: this node's queue passes them by at every turn"),
        }
    }
}

impl PartitionSink for PartitionLog {
    fn sent(&self, partition: &PartitionId, key: &[u8], at: u64) {
        self.produce(&self.sent_topic, partition.partition, key, Some(&at.to_be_bytes()));
    }

    fn retry_put(&self, partition: &PartitionId, key: &[u8], due_ms: i64, entry: &[u8]) {
        let mut value = Vec::with_capacity(8 + entry.len());
        value.extend_from_slice(&due_ms.to_be_bytes());
        value.extend_from_slice(entry);
        self.produce(&self.retry_topic, partition.partition, key, Some(&value));
    }

    fn retry_removed(&self, partition: &PartitionId, key: &[u8]) {
        self.produce(&self.retry_topic, partition.partition, key, None);
    }

    fn owns(&self, partition: &PartitionId) -> bool {
        self.owned.read().expect("owned lock").contains(partition)
    }

    fn refused_as_too_large(&self) -> Vec<Vec<u8>> {
        self.too_large.lock().expect("too large lock").clone()
    }

    fn forget_refused(&self, keys: &HashSet<Vec<u8>>) {
        self.too_large.lock().expect("too large lock").retain(|key| !keys.contains(key));
    }
}

/// How long a changelog's restore goes on without reading a record before it is given
/// up (and tried again later). A limit on its whole read instead (5 minutes) failed the
/// restore of a long changelog (8 days of a busy partition's sent records on an empty
/// store) at every try, each starting over: its partition was never read.
const RESTORE_STALLS_AFTER: Duration = Duration::from_secs(300);

/// Reads `topic`'s partitions (number, where to start) to their ends, handing each
/// record to `apply`; given up once `stalls_after` passes without a record or a
/// partition's end read, however long the whole read takes.
fn read_to_end(
    reader: &BaseConsumer<EndsExpected>,
    topic: &str,
    from: &[(i32, Offset)],
    within: Duration,
    stalls_after: Duration,
    mut apply: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut list = TopicPartitionList::new();
    let mut open = HashSet::new();
    for &(p, offset) in from {
        let watermarks = || reader.fetch_watermarks(topic, p, within);
        let (low, high) = watermarks()
            .or_else(|e| {
                // What the reader knows of the partition may predate a new leader (it
                // refreshes its metadata every 5 minutes only): asked anew, then again.
                // Not after a timeout: the cluster did not answer, asking more waits more.
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::OperationTimedOut) {
                    return Err(e);
                }
                reader.fetch_metadata(Some(topic), within)?;
                watermarks()
            })
            .with_context(|| format!("reading the end of changelog {topic:?} partition {p}"))?;
        let start = match offset {
            // A position past the partition's end is of a topic since recreated (its
            // offsets start again from 0): read from its start.
            Offset::Offset(o) if o <= high => o.max(low),
            _ => low,
        };
        if start < high {
            list.add_partition_offset(topic, p, Offset::Offset(start))?;
            open.insert(p);
        }
    }
    if open.is_empty() {
        return Ok(());
    }
    reader.assign(&list).with_context(|| format!("reading changelog {topic:?}"))?;
    let mut last_read = Instant::now();
    while !open.is_empty() {
        anyhow::ensure!(
            last_read.elapsed() < stalls_after,
            "changelog {topic:?} was not read to its end: nothing read for {stalls_after:?}"
        );
        match reader.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
                last_read = Instant::now();
            }
            Some(Err(e)) => tracing::warn!(error = %e, topic, "reading a changelog failed; trying again"),
            Some(Ok(message)) => {
                apply(&message)?;
                last_read = Instant::now();
            }
        }
    }
    reader.unassign()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use chrono::{DateTime, Utc};

    use super::*;
    use crate::deliver::queue::Queued;
    use crate::embedded::EmbeddedKafka;
    use crate::phone::PhoneNumber;
    use crate::render::{Origin, Renderer};
    use crate::store::SentKey;

    const SENT: &str = "cdr-sent";
    const RETRY: &str = "cdr-retry";

    fn partition() -> PartitionId {
        PartitionId { topic: "cdr".into(), partition: 1 }
    }

    fn log(kafka: &EmbeddedKafka, group_id: &str) -> Arc<PartitionLog> {
        let properties = BTreeMap::new();
        let reach = crate::cluster::Reach { brokers: kafka.bootstrap_servers(), properties: &properties, group_id };
        let options = PartitionLogOptions { reach, sent_topic: SENT, retry_topic: RETRY };
        Arc::new(PartitionLog::start(&options, Metrics::new()).expect("changelog clients"))
    }

    /// A mail whose first attempt was deferred, as the delivery stage queues it.
    fn deferred(call_id: &str) -> Queued {
        deferred_from(call_id, partition())
    }

    /// [`deferred`], its CDR read from `source`.
    fn deferred_from(call_id: &str, source: PartitionId) -> Queued {
        let renderer = Renderer::new("no-reply@notify.example.jp".parse().unwrap());
        let called = PhoneNumber::parse("0312345678").unwrap();
        let to = crate::address::DestinationAddress::parse("taro@example.jp").unwrap();
        let mail = renderer.render_test(called.as_str(), &to, "n", crate::render::MailService::Call).unwrap();
        let ended_at = DateTime::from_timestamp(1_764_000_000, 0).unwrap();
        let origin = Origin { call_id: call_id.into(), called, ended_at, source: Some(source) };
        Queued::new(&mail, &origin, "450 4.3.0 try later", Utc::now())
    }

    /// A node killed before all it published was confirmed: Kafka confirms each
    /// partition on its own, so the records of one changelog may be in the cluster and
    /// those of the other lost. This sink passes one changelog's records and loses the
    /// other's.
    struct KilledMidway {
        log: Arc<PartitionLog>,
        kept: &'static str,
    }

    impl PartitionSink for KilledMidway {
        fn sent(&self, partition: &PartitionId, key: &[u8], at: u64) {
            if self.kept == SENT {
                self.log.sent(partition, key, at);
            }
        }

        fn retry_put(&self, partition: &PartitionId, key: &[u8], due_ms: i64, entry: &[u8]) {
            if self.kept == RETRY {
                self.log.retry_put(partition, key, due_ms, entry);
            }
        }

        fn retry_removed(&self, partition: &PartitionId, key: &[u8]) {
            if self.kept == RETRY {
                self.log.retry_removed(partition, key);
            }
        }

        fn owns(&self, _: &PartitionId) -> bool {
            true
        }
    }

    /// R-M4, docs/cluster.md: a partition's next reader restores its changelogs before it
    /// reads the partition, however long they are. A restore that took longer than 5
    /// minutes in all (8 days of a busy partition's sent records, on an empty store) was
    /// given up at every try, each starting over: the partition was never read. Now only
    /// a read that stops coming is given up. Here each record takes a twentieth of the
    /// limit to apply (a slow store), the whole read twice the limit.
    #[test]
    fn r_m4_a_changelog_read_longer_than_its_stall_limit_is_read_to_its_end_while_records_come() {
        const RECORDS: u64 = 40;
        let kafka = EmbeddedKafka::start(&["cdr", SENT, RETRY], 2).expect("mock cluster");
        let log = log(&kafka, "long");
        for i in 0..RECORDS {
            log.sent(&partition(), format!("call-{i}").as_bytes(), i);
        }
        log.confirm(&log.mark(), Duration::from_secs(10)).expect("published");
        let guard = log.reader.lock().expect("reader lock");
        let reader = guard.as_ref().expect("a reader");
        let stalls_after = Duration::from_secs(1);
        let mut read = 0;
        read_to_end(
            reader,
            SENT,
            &[(partition().partition, Offset::Beginning)],
            Duration::from_secs(10),
            stalls_after,
            |_| {
                std::thread::sleep(stalls_after / 20);
                read += 1;
                Ok(())
            },
        )
        .expect("read to its end");
        assert_eq!(read, RECORDS);
    }

    /// docs/cluster.md: a commit waits for the records published before it was taken,
    /// not for later ones: records waiting on a changelog partition without a leader
    /// hold back the commits taken after them only. (Were a commit to wait for every
    /// record in flight, a node reading on would hardly ever commit.)
    #[test]
    fn a_commit_waits_for_the_records_published_before_it_only() {
        let kafka = EmbeddedKafka::start(&["cdr", SENT, RETRY], 2).expect("mock cluster");
        let log = log(&kafka, "marks");
        let (led, leaderless) = (PartitionId { topic: "cdr".into(), partition: 0 }, partition());
        let number = leaderless.partition;
        log.sent(&led, b"call-1", 1);
        let before = log.mark();
        kafka.on_cluster(move |cluster| cluster.partition_leader(SENT, number, None).expect("leaderless"));
        log.sent(&leaderless, b"call-2", 2);
        let after = log.mark();
        log.confirm(&before, Duration::from_secs(10)).expect("the records before it are confirmed");
        assert_eq!(log.confirmed(&after), Ok(false), "call-2's record waits for a leader");
        kafka.on_cluster(move |cluster| cluster.partition_leader(SENT, number, Some(1)).expect("led again"));
        log.confirm(&after, Duration::from_secs(10)).expect("confirmed once the partition is led again");
        log.stop();
    }

    /// R-M4 (a delayed mail is never silently dropped): the partition's next reader
    /// after a node queued a mail and was killed with only one of the changelogs'
    /// records confirmed. Its CDR was not committed (a commit waits for every record),
    /// so the next reader reads it again: the mail is either in that reader's queue, or
    /// not recorded as handled so that the CDR queues or sends it again. Never recorded
    /// as handled without being queued: that loses it (the CI run of cc2e605 lost two
    /// mails so).
    #[test]
    fn r_m4_a_node_killed_after_queueing_a_mail_leaves_it_queued_or_unhandled_on_the_partition_s_next_reader() {
        let kafka = EmbeddedKafka::start(&["cdr", SENT, RETRY], 2).expect("mock cluster");
        for (i, kept) in [SENT, RETRY].into_iter().enumerate() {
            let killed = Store::temporary().unwrap();
            let written = log(&kafka, "killed");
            killed.attach_partition_sink(Arc::new(KilledMidway { log: written.clone(), kept }));
            let entry = deferred(&format!("call-{i}"));
            RetryQueue::open(&killed).unwrap().push(&entry, Utc::now().timestamp_millis(), 1).unwrap();
            written.confirm(&written.mark(), Duration::from_secs(10)).expect("the kept records confirmed");

            let next = Store::temporary().unwrap();
            let reader = log(&kafka, "next");
            next.attach_partition_sink(reader.clone());
            reader.restore(&next, &[partition()]).expect("restore");
            let queued = RetryQueue::open(&next).unwrap().len() == 1;
            let handled = next.was_sent(&entry.sent_key().unwrap()).unwrap();
            assert!(
                queued || !handled,
                "only the {kept} record confirmed: the mail is lost (queued {queued}, handled {handled})"
            );
            assert!(!queued || handled, "queued, but its CDR read again would queue it twice");
            written.stop();
            reader.stop();
        }
    }

    /// R-M4, and no mail twice (docs/delivery.md): a node queued two mails and died
    /// before the retry changelog had either. The partition's next reader read their
    /// CDRs again and sent one of the mails this time (the other one it did not get to).
    /// When the first node is back on its store and gets the partition again, its old
    /// entry of the mail sent meanwhile is dropped, not published and sent again; the
    /// other is published, so whoever reads the partition next sends it. A dead letter
    /// replayed into a stopped node's store has a sent record too (its refusal): it is
    /// published and sent all the same.
    #[test]
    fn r_m4_a_mail_sent_by_another_node_meanwhile_is_not_sent_again_from_the_queue_of_one_back_on_its_store() {
        let kafka = EmbeddedKafka::start(&["cdr", SENT, RETRY], 2).expect("mock cluster");
        let store = Store::temporary().unwrap();
        let died = log(&kafka, "died");
        store.attach_partition_sink(Arc::new(KilledMidway { log: died.clone(), kept: SENT }));
        let (sent_meanwhile, still_due, replayed) = (deferred("call-1"), deferred("call-2"), deferred("call-3"));
        let queue = RetryQueue::open(&store).unwrap();
        for entry in [&sent_meanwhile, &still_due] {
            queue.push(entry, Utc::now().timestamp_millis(), 1).unwrap();
        }
        died.stop();
        // `callnotify dead-letters replay`: into a store no engine has open.
        let replayed_into = Store::temporary().unwrap();
        RetryQueue::open(&replayed_into).unwrap().push(&replayed, Utc::now().timestamp_millis(), 1).unwrap();

        let next = log(&kafka, "next");
        next.sent(&partition(), sent_meanwhile.sent_key().unwrap().as_bytes(), 2);
        next.sent(&partition(), replayed.sent_key().unwrap().as_bytes(), 2);
        next.confirm(&next.mark(), Duration::from_secs(10)).expect("the sent records confirmed");
        next.stop();

        let back = log(&kafka, "back");
        back.restore(&store, &[partition()]).expect("restore");
        back.restore(&replayed_into, &[partition()]).expect("restore");
        back.confirm(&back.mark(), Duration::from_secs(10)).expect("what the restores published confirmed");
        let queued = |store: &Store| -> Vec<SentKey> {
            let due = RetryQueue::open(store).unwrap().due(i64::MAX, &HashSet::new(), 10).unwrap();
            due.into_iter().map(|(_, entry)| entry.expect("an entry").sent_key().unwrap()).collect()
        };
        let (still_due, replayed) = (still_due.sent_key().unwrap(), replayed.sent_key().unwrap());
        assert_eq!(
            queued(&store),
            std::slice::from_ref(&still_due),
            "back on its store: the mail sent meanwhile is queued again"
        );
        assert!(queued(&replayed_into).contains(&replayed), "the replayed dead letter is queued no more");
        back.stop();

        let later = Store::temporary().unwrap();
        let reader = log(&kafka, "later");
        later.attach_partition_sink(reader.clone());
        reader.restore(&later, &[partition()]).expect("restore");
        let mut restored = queued(&later);
        restored.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        assert_eq!(restored, [still_due, replayed], "the partition's next reader");
        reader.stop();
    }

    /// R-M4, no mail twice: a sent changelog recreated by the operator numbers its
    /// records from 0 again. A store that had restored the old one past where the new
    /// one ends now reads the new one from its start: its sent records were not read, so
    /// a CDR read again after its reader was killed sent their mails again.
    #[test]
    fn r_m4_a_recreated_sent_changelog_is_read_from_its_start_whatever_the_old_position() {
        let kafka = EmbeddedKafka::start(&["cdr", SENT, RETRY], 2).expect("mock cluster");
        let store = Store::temporary().unwrap();
        store
            .open_tree(POSITIONS_TREE)
            .unwrap()
            .insert(position_key("cdr", partition().partition), &1_000i64.to_be_bytes())
            .unwrap();
        let writer = log(&kafka, "writer");
        let key = deferred("call-1").sent_key().unwrap();
        writer.sent(&partition(), key.as_bytes(), 2);
        writer.confirm(&writer.mark(), Duration::from_secs(10)).expect("the sent record confirmed");
        writer.stop();

        let reader = log(&kafka, "reader");
        reader.restore(&store, &[partition()]).expect("restore");
        assert!(store.was_sent(&key).unwrap(), "the recreated changelog's record is read");
        reader.stop();
    }

    /// R-M4: a fax mail with its PDF attached waits in the queue like any other. Its
    /// entry, past Kafka's 1 MB default, goes into the changelog and reaches the
    /// partition's next reader (the changelog's producer refused it, and every commit
    /// after it failed: the engine stopped, at every start). One past even the raised
    /// limit stays in its node's queue, counted, and commits go on.
    #[test]
    fn r_m4_a_queued_mail_larger_than_a_megabyte_reaches_the_next_reader_and_a_larger_one_stays_queued() {
        let kafka = EmbeddedKafka::start(&["cdr", SENT, RETRY], 2).expect("mock cluster");
        let store = Store::temporary().unwrap();
        let metrics = Metrics::new();
        let properties = BTreeMap::new();
        let reach =
            crate::cluster::Reach { brokers: kafka.bootstrap_servers(), properties: &properties, group_id: "big" };
        let options = PartitionLogOptions { reach, sent_topic: SENT, retry_topic: RETRY };
        let written = Arc::new(PartitionLog::start(&options, metrics.clone()).expect("changelog clients"));
        store.attach_partition_sink(written.clone());
        written.restore(&store, &[partition()]).expect("the partition is this node's");
        let (mut two_mb, mut too_large) = (deferred("call-pdf"), deferred("call-huge"));
        two_mb.mail_base64 = "A".repeat(2 << 20);
        too_large.mail_base64 = "A".repeat(40 << 20);
        let queue = RetryQueue::open(&store).unwrap();
        for entry in [&two_mb, &too_large] {
            queue.push(entry, Utc::now().timestamp_millis(), 1).unwrap();
        }
        written.confirm(&written.mark(), Duration::from_secs(10)).expect("commits go on");
        assert_eq!(queue.len(), 2, "both wait in this node's queue");
        let rendered = metrics.render();
        assert!(
            rendered.contains(r#"callnotify_errors_total{stage="state",error="changelog_too_large"} 1"#),
            "{rendered}"
        );
        written.stop();

        let next = Store::temporary().unwrap();
        let reader = log(&kafka, "next");
        next.attach_partition_sink(reader.clone());
        reader.restore(&next, &[partition()]).expect("restore");
        let due = RetryQueue::open(&next).unwrap().due(i64::MAX, &HashSet::new(), 10).unwrap();
        let restored: Vec<Queued> = due.into_iter().map(|(_, entry)| entry.expect("an entry")).collect();
        assert_eq!(restored.len(), 1, "only the entry the changelog took");
        assert_eq!((restored[0].call_id.as_str(), restored[0].mail_base64.len()), ("call-pdf", 2 << 20));
        reader.stop();
    }

    /// R-M4, docs/cluster.md (a queued mail is sent by its node): an entry too large for
    /// its changelog, queued during a stop (a fax mail cut short by it), stayed its
    /// partition's in the store: only the retry loop, stopped first, made it this
    /// node's own. At the next start its partition went to another node, which never had
    /// it, and it waited set aside until it was forgotten: the fax mail never sent.
    #[test]
    fn r_m4_an_entry_too_large_for_its_changelog_queued_during_a_stop_stays_this_node_s() {
        let kafka = EmbeddedKafka::start(&["cdr", SENT, RETRY], 2).expect("mock cluster");
        let store = Store::temporary().unwrap();
        let written = log(&kafka, "stopping");
        store.attach_partition_sink(written.clone());
        written.restore(&store, &[partition()]).expect("the partition is this node's");
        let mut too_large = deferred("call-huge");
        too_large.mail_base64 = "A".repeat(40 << 20);
        let queue = RetryQueue::open(&store).unwrap();
        queue.push(&too_large, Utc::now().timestamp_millis(), 1).unwrap();

        written.stop();
        written.keep_refused_here(&store);
        // The partition is another node's now: what is left in the queue is this node's.
        written.disown(&[partition()]);
        let due = queue.due(i64::MAX, &HashSet::new(), 10).unwrap();
        let left: Vec<Queued> = due.into_iter().map(|(_, entry)| entry.expect("an entry")).collect();
        assert_eq!(left.len(), 1, "sent by this node");
        assert_eq!((left[0].call_id.as_str(), &left[0].source), ("call-huge", &None));
    }

    /// R-M4, no mail twice (docs/delivery.md): node A was trying a queued mail when its
    /// partition moved to node B, which restored the entry, sent the mail and took it out
    /// of the changelog. A's attempt then failed and A rescheduled the entry: it
    /// published it live again, after B's tombstone, so the partition's next reader
    /// (days later, perhaps) sent the mail a second time. An entry set aside is not
    /// published again.
    #[test]
    fn r_m4_an_entry_rescheduled_after_its_partition_moved_is_not_published_again() {
        let kafka = EmbeddedKafka::start(&["cdr", SENT, RETRY], 2).expect("mock cluster");
        let (a, b) = (Store::temporary().unwrap(), Store::temporary().unwrap());
        let (log_a, log_b) = (log(&kafka, "a"), log(&kafka, "b"));
        a.attach_partition_sink(log_a.clone());
        b.attach_partition_sink(log_b.clone());
        log_a.restore(&a, &[partition()]).expect("restore");
        let entry = deferred("call-moved");
        let queue_a = RetryQueue::open(&a).unwrap();
        let (slot, _) = queue_a.push(&entry, Utc::now().timestamp_millis(), 1).unwrap();
        log_a.confirm(&log_a.mark(), Duration::from_secs(10)).expect("queued in the changelog");

        // The partition moves while A tries the mail.
        log_a.disown(&[partition()]);
        log_a.set_aside(&a);
        log_b.restore(&b, &[partition()]).expect("restore");
        let queue_b = RetryQueue::open(&b).unwrap();
        let due = queue_b.due(i64::MAX, &HashSet::new(), 10).unwrap();
        assert_eq!(due.len(), 1, "B has the entry");
        assert!(queue_b.remove(&due[0].0).unwrap(), "B sent the mail");
        log_b.confirm(&log_b.mark(), Duration::from_secs(10)).expect("B's records confirmed");

        // A's attempt fails late: it reschedules the entry.
        let tried = Queued { attempts: 2, ..entry.clone() };
        queue_a.reschedule(&slot, &tried, Utc::now().timestamp_millis() + 60_000).unwrap().expect("queued");
        log_a.confirm(&log_a.mark(), Duration::from_secs(10)).expect("A's records confirmed");

        let c = Store::temporary().unwrap();
        let log_c = log(&kafka, "c");
        c.attach_partition_sink(log_c.clone());
        log_c.restore(&c, &[partition()]).expect("restore");
        let queued = RetryQueue::open(&c).unwrap().due(i64::MAX, &HashSet::new(), 10).unwrap();
        assert!(queued.is_empty(), "the partition's next reader would send it again: {} entries", queued.len());
        for log in [log_a, log_b, log_c] {
            log.stop();
        }
    }
    /// R-M4, no mail twice (docs/delivery.md): the sent changelog's partition 1 holds
    /// the records of both CDR topics' partition 1 (`cdr/1`, `fax/1`). A node back on its
    /// store with a fax mail of `fax/1` queued, whose mail another node sent meanwhile,
    /// restored `cdr/1` first: that read the sent record, and where the store had read
    /// the sent partition up to moved past it. The restore of `fax/1` then started after
    /// it, took the entry for one never confirmed and published it again: sent twice.
    #[test]
    fn r_m4_a_mail_of_one_cdr_topic_sent_elsewhere_is_not_sent_again_after_the_other_topic_s_restore() {
        let kafka = EmbeddedKafka::start(&["cdr", "fax", SENT, RETRY], 2).expect("mock cluster");
        let fax = PartitionId { topic: "fax".into(), partition: 1 };
        let store = Store::temporary().unwrap();
        let died = log(&kafka, "died");
        store.attach_partition_sink(Arc::new(KilledMidway { log: died.clone(), kept: SENT }));
        let sent_meanwhile = deferred_from("fax-1", fax.clone());
        RetryQueue::open(&store).unwrap().push(&sent_meanwhile, Utc::now().timestamp_millis(), 1).unwrap();
        died.stop();

        let next = log(&kafka, "next");
        next.sent(&fax, sent_meanwhile.sent_key().unwrap().as_bytes(), 2);
        next.confirm(&next.mark(), Duration::from_secs(10)).expect("the sent record confirmed");
        next.stop();

        let back = log(&kafka, "back");
        back.restore(&store, &[partition()]).expect("restore of cdr/1");
        back.restore(&store, &[fax]).expect("restore of fax/1");
        back.confirm(&back.mark(), Duration::from_secs(10)).expect("what the restores published confirmed");
        let queued = RetryQueue::open(&store).unwrap().due(i64::MAX, &HashSet::new(), 10).unwrap();
        assert!(queued.is_empty(), "the fax mail sent meanwhile is queued again: {} entries", queued.len());
        back.stop();

        let later = Store::temporary().unwrap();
        let reader = log(&kafka, "later");
        later.attach_partition_sink(reader.clone());
        reader.restore(&later, &[PartitionId { topic: "fax".into(), partition: 1 }]).expect("restore");
        let republished = RetryQueue::open(&later).unwrap().len();
        assert_eq!(republished, 0, "the partition's next reader sends it a second time");
        reader.stop();
    }
}
