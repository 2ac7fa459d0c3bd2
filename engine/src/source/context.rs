//! The consumer's context: librdkafka calls it on the consumer thread for statistics
//! (the lag metric) and rebalances (finish or queue in-flight work, then commit, before
//! a partition is given up).

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::offsets::{Completion, Skipped, Tracker};
use crate::decode::CdrFormat;
use crate::error_event::{ErrorEvent, RaiseEvery};
use crate::partition_log::{Mark, NotConfirmed};
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;

/// How long an assignment waits for the group's committed offsets (see `note_starts`).
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a commit may wait for the partition changelogs to confirm its records
/// before it is raised (and how long a revocation's or a stop's commit waits).
const CONFIRM_WITHIN: Duration = Duration::from_secs(10);

/// The consumer's context: statistics → lag metric; revocation → finish or queue, then commit.
pub struct SourceContext {
    /// Which of the engine's consumer threads this is (0-based), for metrics.
    pub(super) thread: usize,
    pub(super) metrics: Metrics,
    pub(super) topics: Vec<(String, CdrFormat)>,
    pub(super) store: Store,
    pub(super) grace: Duration,
    pub(super) tracker: Mutex<Tracker>,
    pub(super) completions: Mutex<Receiver<Completion>>,
    /// The delivery tasks' time for sending: cancelled, they queue what they have not
    /// sent yet.
    pub(super) sending: Mutex<Sending>,
    /// Sent records and retry entries of each partition, in Kafka.
    pub(super) changelog: Arc<crate::partition_log::PartitionLog>,
    /// Assigned partitions librdkafka has not started reading (see [`crate::unread`]).
    pub(super) unread: crate::unread::Unread,
    /// The offsets taken for a commit, until the changelogs confirm their records.
    pub(super) pending: Mutex<Pending>,
    /// Cancelled when the engine stops reading: a revocation after it is the stop's.
    pub(super) reading: CancellationToken,
    /// Whether the thread holds its partitions paused (backpressure, a low disk). A
    /// partition assigned is given that state: librdkafka keeps a partition's pause
    /// across its revocation, so one paused, moved to another member and given back
    /// would otherwise stay paused for good, and one assigned during a pause be read.
    pub(super) paused: std::sync::atomic::AtomicBool,
    /// Assigned partitions whose changelogs could not be restored: not read until they
    /// are (their previous reader's queued mails and sent records are not here yet, and
    /// this node would set aside the mails it queued for them).
    pub(super) unrestored: Mutex<Unrestored>,
}

/// Partitions whose changelogs wait to be restored, and when to try again.
#[derive(Default)]
pub(super) struct Unrestored {
    partitions: Vec<crate::store::PartitionId>,
    next_try: Option<Instant>,
    backoff: Duration,
}

/// How long after a failed restore the changelogs are tried again: doubled after each
/// failure up to [`RESTORE_AGAIN_AT_MOST`]. A try blocks the thread's reading of its
/// other partitions for up to twice [`RESTORE_AGAIN_WAITS`].
const RESTORE_AGAIN_AFTER: Duration = Duration::from_secs(1);
const RESTORE_AGAIN_AT_MOST: Duration = Duration::from_secs(30);
/// How long a try again waits for each of the cluster's answers.
const RESTORE_AGAIN_WAITS: Duration = Duration::from_secs(2);

/// The thread's commit that waits for the partition changelogs, if any.
pub(super) struct Pending {
    held: Option<Held>,
    /// A commit waiting past [`CONFIRM_WITHIN`] is raised every [`CONFIRM_WITHIN`].
    raise: RaiseEvery,
}

impl Default for Pending {
    fn default() -> Self {
        Self { held: None, raise: RaiseEvery::new(CONFIRM_WITHIN) }
    }
}

/// Offsets taken for a commit, with the changelog records they rely on.
struct Held {
    /// Per partition, the highest offset found safe.
    offsets: HashMap<(usize, i32), i64>,
    records: Mark,
    /// Since when they wait.
    since: Instant,
}

/// The token tree of the delivery tasks' time for sending: the thread's, ended when the
/// engine stops, and a child per partition, ended when the partition is revoked.
pub(super) struct Sending {
    all: CancellationToken,
    partitions: HashMap<(usize, i32), CancellationToken>,
}

impl Sending {
    /// `all`: a child of the engine's shutdown token.
    pub(super) fn new(all: CancellationToken) -> Self {
        Self { all, partitions: HashMap::new() }
    }
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        self.unread.note(&stats, Instant::now());
        for (name, topic) in &stats.topics {
            for (id, p) in &topic.partitions {
                // The partitions assigned to this consumer only: librdkafka goes on
                // reporting a lag for one it gave up, from where it stopped reading.
                if *id >= 0 && p.desired && p.consumer_lag >= 0 {
                    self.metrics.consumer_lag(name, *id, p.consumer_lag);
                }
            }
        }
    }
}

/// Commits the stored offsets without waiting, its answer coming back as an event on the
/// consumer's queue, which `poll` hands to `commit_callback`. rdkafka's
/// `commit_consumer_state` asks for no answer (fede1024/rust-rdkafka#856): a refused
/// commit went unseen.
fn commit_async(consumer: &BaseConsumer<SourceContext>) -> KafkaResult<()> {
    use rdkafka::bindings as rd;
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is the live handle `consumer` owns, for the whole call. The queue is a
    // new reference to the consumer's queue, which the commit takes a reference of its
    // own to (librdkafka's `RD_KAFKA_REPLYQ`), so it is released here; no offsets list
    // (the stored ones) and no callback (the answer is an event).
    let error = unsafe {
        let queue = rd::rd_kafka_queue_get_consumer(rk);
        if queue.is_null() {
            return Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::UnknownGroup));
        }
        let error = rd::rd_kafka_commit_queue(rk, std::ptr::null(), queue, None, std::ptr::null_mut());
        rd::rd_kafka_queue_destroy(queue);
        error
    };
    match error {
        rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => Ok(()),
        error => Err(KafkaError::ConsumerCommit(error.into())),
    }
}

/// Whether a commit went through: nothing to commit is nothing left undone.
fn committed(result: &KafkaResult<()>) -> bool {
    matches!(result, Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)))
}

impl ConsumerContext for SourceContext {
    /// The broker's answer to an asynchronous commit ([`commit_async`]). A refusal (the
    /// group rebalancing, its coordinator moving, the principal's rights) loses nothing:
    /// the offsets stay stored and go with the next commit, a second later; until one
    /// goes through, a partition moving elsewhere is read again from its last commit,
    /// its mails deduplicated by the changelogs.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if !committed(&result) || offsets.elements().iter().any(|e| e.error().is_err()) {
            self.commit_refused(&result, offsets);
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: HashSet<(usize, i32)> =
                tpl.elements().iter().filter_map(|e| Some((self.topic_index(e.topic())?, e.partition()))).collect();
            tracing::info!(partitions = revoked.len(), "partitions revoked; finishing their in-flight CDRs");
            let gone = partitions(tpl);
            self.unrestored.lock().expect("unrestored lock").partitions.retain(|p| !gone.contains(p));
            // Their lag is their next reader's to report.
            for e in tpl.elements() {
                self.metrics.consumer_lag(e.topic(), e.partition(), 0);
            }
            // Their retries are the next reader's from now on: mails queued below are
            // not tried here again.
            self.changelog.disown(&partitions(tpl));
            self.finish_or_queue(Some(&revoked), self.grace);
            let mut tracker = self.tracker.lock().expect("tracker lock");
            revoked.iter().for_each(|tp| tracker.forget(tp));
            drop(tracker);
            // Out of this node's queue. Not at a stop: its entries stay queued, and the
            // next start sets aside those of the partitions it is not given.
            if !self.reading.is_cancelled() {
                self.changelog.set_aside(&self.store);
            }
            let committed = self.commit_now(consumer);
            // Offsets of partitions no longer read are not this node's to commit.
            if let Some(held) = &mut self.pending.lock().expect("pending commit lock").held {
                held.offsets.retain(|tp, _| !revoked.contains(tp));
            }
            if let Err(e) = committed {
                crate::error_event!(
                    self.metrics,
                    ErrorEvent::RevokeFlush,
                    error = %e,
                    "store flush or changelog write failed; offsets of revoked partitions not committed"
                );
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Ok(assignment) = consumer.assignment() {
            self.metrics.consumer_partitions(self.thread, assignment.count());
        }
        if let Rebalance::Assign(tpl) = rebalance {
            // What the partitions' previous readers sent and queued, before any CDR.
            let assigned = partitions(tpl);
            let restored = match self.changelog.restore(&self.store, &assigned) {
                Ok(()) => true,
                Err(e) => {
                    crate::error_event!(self.metrics, ErrorEvent::ChangelogRestore, error = %e,
                        partitions = assigned.len(),
                        "partition changelogs not restored: their partitions are not read until they are (tried again after 1 s, then at doubling intervals up to 30 s)");
                    let mut unrestored = self.unrestored.lock().expect("unrestored lock");
                    unrestored.partitions.extend(assigned);
                    unrestored.backoff = RESTORE_AGAIN_AFTER;
                    unrestored.next_try = Some(Instant::now() + RESTORE_AGAIN_AFTER);
                    false
                }
            };
            let paused = self.paused() || !restored;
            let set = if paused { consumer.pause(tpl) } else { consumer.resume(tpl) };
            if let Err(e) = set {
                tracing::warn!(error = %e, paused, "the pause state of newly assigned partitions was not set");
            }
            self.note_starts(consumer, tpl);
        }
    }
}

/// The partitions of `tpl` as the changelogs name them.
fn partitions(tpl: &TopicPartitionList) -> Vec<crate::store::PartitionId> {
    tpl.elements()
        .iter()
        .map(|e| crate::store::PartitionId { topic: e.topic().to_owned(), partition: e.partition() })
        .collect()
}

impl SourceContext {
    /// Whether the thread holds its partitions paused.
    pub(super) fn paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records that the thread has paused (or resumed) its partitions, for partitions
    /// assigned later and for the operator.
    pub(super) fn set_paused(&self, paused: bool) {
        self.paused.store(paused, std::sync::atomic::Ordering::Relaxed);
        self.metrics.consumer_paused(self.thread, paused);
    }

    /// Tries the changelogs of the partitions not restored again when it is time
    /// ([`RESTORE_AGAIN_AFTER`], doubling); once restored they are read (unless the
    /// thread holds its partitions paused).
    pub(super) fn restore_again(&self, consumer: &BaseConsumer<Self>) {
        let waiting = {
            let unrestored = self.unrestored.lock().expect("unrestored lock");
            if unrestored.partitions.is_empty() || unrestored.next_try.is_some_and(|at| Instant::now() < at) {
                return;
            }
            unrestored.partitions.clone()
        };
        if let Err(e) = self.changelog.restore_within(&self.store, &waiting, RESTORE_AGAIN_WAITS) {
            let mut unrestored = self.unrestored.lock().expect("unrestored lock");
            unrestored.backoff = (unrestored.backoff * 2).min(RESTORE_AGAIN_AT_MOST);
            unrestored.next_try = Some(Instant::now() + unrestored.backoff);
            // Counted at each try: a partition left unread for good pages
            // (CallnotifyChangelogRestoreFailing), not one count at its assignment.
            crate::error_event!(self.metrics, ErrorEvent::ChangelogRestore, error = format!("{e:#}"),
                partitions = waiting.len(), next = ?unrestored.backoff,
                "partition changelogs still not restored: their partitions are still not read");
            return;
        }
        self.unrestored.lock().expect("unrestored lock").partitions.retain(|p| !waiting.contains(p));
        tracing::info!(partitions = waiting.len(), "partition changelogs restored after all: reading their partitions");
        if !self.paused() {
            let mut list = TopicPartitionList::new();
            for p in &waiting {
                list.add_partition(&p.topic, p.partition);
            }
            if let Err(e) = consumer.resume(&list) {
                tracing::warn!(error = %e, "partitions restored after all were not resumed");
            }
        }
    }

    /// The assigned partitions the thread reads when not paused: all but those whose
    /// changelogs wait to be restored.
    pub(super) fn readable(&self, assignment: TopicPartitionList) -> TopicPartitionList {
        if self.unrestored.lock().expect("unrestored lock").partitions.is_empty() {
            return assignment;
        }
        self.of_assignment(&assignment, false)
    }

    /// The partitions of `assignment` whose changelogs are not restored yet.
    pub(super) fn unrestored_of(&self, assignment: &TopicPartitionList) -> TopicPartitionList {
        self.of_assignment(assignment, true)
    }

    /// The partitions of `assignment` waiting for their changelogs (`waiting`), or the others.
    fn of_assignment(&self, assignment: &TopicPartitionList, waiting: bool) -> TopicPartitionList {
        let unrestored = self.unrestored.lock().expect("unrestored lock");
        let mut list = TopicPartitionList::new();
        for e in assignment.elements() {
            let unrestored = unrestored.partitions.iter().any(|p| p.topic == e.topic() && p.partition == e.partition());
            if unrestored == waiting {
                list.add_partition(e.topic(), e.partition());
            }
        }
        list
    }

    pub(super) fn topic_index(&self, name: &str) -> Option<usize> {
        self.topics.iter().position(|(t, _)| t == name)
    }

    /// Where reading the newly assigned partitions goes on: their committed offsets, so
    /// a broker that resumes past one is caught at the first CDR it hands out. One
    /// request to the group coordinator per assignment; without an answer (or a
    /// committed offset) a partition is checked from its first CDR on.
    fn note_starts(&self, consumer: &BaseConsumer<Self>, assigned: &TopicPartitionList) {
        if assigned.count() == 0 {
            return;
        }
        let committed = match consumer.committed_offsets(assigned.clone(), COMMITTED_TIMEOUT) {
            Ok(committed) => committed,
            Err(e) => {
                // Seen by the operator: a start past the committed offset (retention
                // deleted CDRs not read yet) is not caught for these partitions.
                tracing::warn!(error = %e, partitions = assigned.count(),
                    "committed offsets not fetched at assignment: offsets a broker passes over before the first CDR read are not counted (later gaps are)");
                return;
            }
        };
        let mut tracker = self.tracker.lock().expect("tracker lock");
        for e in committed.elements() {
            if let (Some(topic), Offset::Offset(offset)) = (self.topic_index(e.topic()), e.offset()) {
                tracker.starts_at((topic, e.partition()), offset);
            }
        }
    }

    /// Counts and logs offsets the broker passed over before the CDR just read.
    pub(super) fn note_skipped(&self, (topic, partition): (usize, i32), skipped: Option<Skipped>) {
        if let Some(Skipped { from, to }) = skipped {
            self.metrics.offsets_skipped((to - from) as u64);
            tracing::warn!(
                topic = %self.topics[topic].0,
                partition,
                from,
                to,
                "offsets passed over: whatever was there was never read (CDRs lost, skipped by the broker or deleted by retention first, unless they were transaction markers or compacted away)"
            );
        }
    }

    /// Every [`super::COMMIT_INTERVAL`] on the consumer thread: flushes the store and
    /// takes the offsets found safe since the last time, to commit once the partition
    /// changelogs have confirmed the records published until now
    /// ([`SourceContext::commit_confirmed`]). While an earlier commit still waits for
    /// its records, the offsets found meanwhile wait in the tracker.
    pub(super) fn take_commit(&self) -> Result<(), StoreError> {
        let mut pending = self.pending.lock().expect("pending commit lock");
        if pending.held.is_some() {
            return Ok(());
        }
        let offsets = self.tracker.lock().expect("tracker lock").take_to_store();
        // What a committed offset covers is on disk first.
        self.store.flush_blocking()?;
        pending.held = Some(Held { offsets, records: self.changelog.mark(), since: Instant::now() });
        Ok(())
    }

    /// On every turn of the consumer thread, without waiting: commits the taken offsets
    /// once the changelogs have confirmed the records they rely on (their next reader
    /// relies on them). A commit not confirmed within [`CONFIRM_WITHIN`] (a partition's
    /// leader lost) is raised, every [`CONFIRM_WITHIN`], and goes on waiting; the CDRs
    /// stay uncommitted meanwhile, the node reads and sends on, and nothing is lost.
    pub(super) fn commit_confirmed(&self, consumer: &BaseConsumer<Self>) -> Result<(), StoreError> {
        let mut pending = self.pending.lock().expect("pending commit lock");
        let Some(held) = &pending.held else { return Ok(()) };
        if !self.changelog.confirmed(&held.records).map_err(|refused| StoreError::State(refused.to_string()))? {
            let now = Instant::now();
            if now.saturating_duration_since(held.since) >= CONFIRM_WITHIN && pending.raise.due(now) {
                self.raise_unconfirmed(&NotConfirmed::Late(CONFIRM_WITHIN));
            }
            return Ok(());
        }
        if let Some(held) = pending.held.take() {
            self.commit_offsets(consumer, &held.offsets, CommitMode::Async);
        }
        pending.raise.reset();
        Ok(())
    }

    /// Commits now what the thread has found safe, the taken offsets with it: at a
    /// revocation and at a stop. Waits up to [`CONFIRM_WITHIN`] for the changelogs to
    /// confirm the records published until now. Says whether it committed: not if they
    /// were late, which is raised; the offsets then wait for the next commit.
    pub(super) fn commit_now(&self, consumer: &BaseConsumer<Self>) -> Result<bool, StoreError> {
        let mut pending = self.pending.lock().expect("pending commit lock");
        let (mut offsets, since) =
            pending.held.take().map_or_else(|| (HashMap::new(), Instant::now()), |h| (h.offsets, h.since));
        for (tp, offset) in self.tracker.lock().expect("tracker lock").take_to_store() {
            let stored = offsets.entry(tp).or_insert(offset);
            *stored = (*stored).max(offset);
        }
        self.store.flush_blocking()?;
        let records = self.changelog.mark();
        match self.changelog.confirm(&records, CONFIRM_WITHIN) {
            Ok(()) => {
                pending.raise.reset();
                Ok(self.commit_offsets(consumer, &offsets, CommitMode::Sync))
            }
            Err(late @ NotConfirmed::Late(_)) => {
                self.raise_unconfirmed(&late);
                pending.raise.due(Instant::now());
                pending.held = Some(Held { offsets, records, since });
                Ok(false)
            }
            Err(refused) => Err(StoreError::State(refused.to_string())),
        }
    }

    fn raise_unconfirmed(&self, late: &NotConfirmed) {
        crate::error_event!(self.metrics, ErrorEvent::ChangelogUnconfirmed, error = %late,
            "offsets not committed: the partition changelogs have not confirmed their records (a broker lost?); they wait on");
    }

    /// Hands librdkafka `offsets` in one call, then commits. Says whether the commit
    /// went through; a refusal is raised, and the offsets stay stored for the next
    /// commit. (An asynchronous one is answered later, in `commit_callback`.)
    fn commit_offsets(
        &self,
        consumer: &BaseConsumer<Self>,
        offsets: &HashMap<(usize, i32), i64>,
        mode: CommitMode,
    ) -> bool {
        if !offsets.is_empty() {
            let mut list = TopicPartitionList::with_capacity(offsets.len());
            for (&(topic, partition), &offset) in offsets {
                // librdkafka commits what it is given: the next message to read.
                if let Err(e) = list.add_partition_offset(&self.topics[topic].0, partition, Offset::Offset(offset + 1))
                {
                    crate::error_event!(self.metrics, ErrorEvent::OffsetOutOfRange, error = %e, partition, offset, "offset out of range");
                }
            }
            if let Err(e) = consumer.store_offsets(&list) {
                tracing::debug!(error = %e, "offsets not stored (partitions no longer ours)");
            }
        }
        let result = match mode {
            CommitMode::Sync => consumer.commit_consumer_state(mode),
            CommitMode::Async => commit_async(consumer),
        };
        if committed(&result) {
            return true;
        }
        self.commit_refused(&result, &TopicPartitionList::new());
        false
    }

    /// Raises a commit the broker refused, with the partitions it names.
    fn commit_refused(&self, result: &KafkaResult<()>, offsets: &TopicPartitionList) {
        let refused: Vec<String> = offsets
            .elements()
            .iter()
            .filter(|e| e.error().is_err())
            .map(|e| format!("{}/{}@{:?}", e.topic(), e.partition(), e.offset()))
            .collect();
        let error = match result {
            Err(e) => e.to_string(),
            Ok(()) => {
                offsets.elements().iter().find_map(|e| e.error().err()).map_or_else(String::new, |e| e.to_string())
            }
        };
        crate::error_event!(self.metrics, ErrorEvent::OffsetCommit, error = %error, partitions = ?refused,
            "offsets not committed (tried again at the next commit, every second)");
    }

    /// Moves a finished CDR's partition offset if it may (its delivery task wrote its
    /// mails' sent records and let their claims go).
    fn apply(&self, c: Completion) {
        self.tracker.lock().expect("tracker lock").completed((c.topic, c.partition), c.offset);
    }

    /// Applies completions until the given partitions (all if `None`) have nothing in
    /// flight or `deadline` passes. Returns whether everything finished.
    pub(super) fn settle(&self, only: Option<&HashSet<(usize, i32)>>, deadline: Instant) -> bool {
        let completions = self.completions.lock().expect("completions lock");
        while self.tracker.lock().expect("tracker lock").busy(only) {
            let left = deadline.saturating_duration_since(Instant::now());
            match completions.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(c) => self.apply(c),
                Err(RecvTimeoutError::Timeout) if left.is_zero() => return false,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        true
    }

    /// Waits [`super::sending_time`] of `grace` for the mails in flight on the given
    /// partitions (all if `None`) to be sent, then has the ones not answered yet queued
    /// and waits the rest of it for that. Returns whether everything finished.
    pub(super) fn finish_or_queue(&self, only: Option<&HashSet<(usize, i32)>>, grace: Duration) -> bool {
        let start = Instant::now();
        let deadline = start + grace;
        if self.settle(only, start + super::sending_time(grace)) {
            return true;
        }
        let left = self.tracker.lock().expect("tracker lock").in_flight;
        tracing::warn!(in_flight = left, "mails not sent in time are queued");
        {
            let mut sending = self.sending.lock().expect("sending lock");
            match only {
                None => sending.all.cancel(),
                // The partitions may come back: their next CDRs get a new token.
                Some(tps) => tps.iter().filter_map(|tp| sending.partitions.remove(tp)).for_each(|t| t.cancel()),
            }
        }
        self.settle(only, deadline)
    }

    /// The token whose cancellation ends the time for sending of partition `tp`'s
    /// delivery tasks.
    pub(super) fn sending(&self, tp: (usize, i32)) -> CancellationToken {
        let mut sending = self.sending.lock().expect("sending lock");
        let Sending { all, partitions } = &mut *sending;
        partitions.entry(tp).or_insert_with(|| all.child_token()).clone()
    }

    /// Waits up to `timeout` for a completion, then applies it and every other one
    /// already reported.
    pub(super) fn await_completion(&self, timeout: Duration) {
        let next = self.completions.lock().expect("completions lock").recv_timeout(timeout);
        if let Ok(c) = next {
            self.apply(c);
            self.drain();
        }
    }

    /// Applies every completion already reported, without waiting.
    pub(super) fn drain(&self) {
        loop {
            let next = self.completions.lock().expect("completions lock").try_recv();
            match next {
                Ok(c) => self.apply(c),
                Err(_) => return,
            }
        }
    }
}
