//! Which offsets may be stored: per partition, the CDRs with work in flight in the
//! order they were read. An offset is safe once it and every earlier one are finished.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What a delivery task reports when a CDR's work is finished.
pub struct Completion {
    pub topic: usize,
    pub partition: i32,
    pub offset: i64,
}

/// Offsets the broker passed over in a partition: `from..to` were never read. Kafka
/// leaves such gaps for transaction markers and compacted records; on a plain CDR topic
/// they are lost CDRs: deleted by retention before they were read (the consumer then
/// starts at the oldest one left), or skipped by a broker (tansu 0.6.0, which the
/// integration suite once ran on, did after a resume inside a batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Skipped {
    pub(super) from: i64,
    pub(super) to: i64,
}

/// One partition's CDRs with work in flight and where reading should go on.
#[derive(Default)]
pub(super) struct Partition {
    /// (offset, its tasks not finished yet, its record's [`weight`]) in ascending offset
    /// order. Read again (an
    /// offset reset rewinds the partition while CDRs after it are in flight), an offset
    /// takes its place in the order, or counts one task more where it is already.
    queue: VecDeque<(i64, u32, u32)>,
    /// The offset expected next: the committed one at assignment, then the last read + 1.
    next: Option<i64>,
}

impl Partition {
    /// Notes `offset` as read; the offsets skipped to reach it, if any. A lower offset
    /// than expected (read again after an offset reset) skips nothing.
    fn read(&mut self, offset: i64) -> Option<Skipped> {
        let skipped = self.next.filter(|&next| offset > next).map(|from| Skipped { from, to: offset });
        self.next = Some(offset + 1);
        skipped
    }

    /// Adds `tasks` to `offset`'s entry, made in its place in the order if new.
    fn note(&mut self, offset: i64, tasks: u32, weight: u32) {
        if self.queue.back().is_none_or(|(last, _, _)| *last < offset) {
            self.queue.push_back((offset, tasks, weight));
            return;
        }
        match self.queue.binary_search_by_key(&offset, |(o, _, _)| *o) {
            Ok(i) => {
                self.queue[i].1 += tasks;
                self.queue[i].2 = self.queue[i].2.max(weight);
            }
            Err(i) => self.queue.insert(i, (offset, tasks, weight)),
        }
    }
}

/// Bytes of a record that count as one more CDR in flight (`engine.max_in_flight`): a
/// fax in flight holds its document, its rendered mails and their PDF, megabytes where a
/// CDR holds a few hundred bytes, and a backlog of faxes counted one each filled memory
/// long before the count paused the consumers.
pub(super) const WEIGHT_BYTES: usize = 16 * 1024;

/// What a record of `bytes` counts for in flight: 1, and 1 more per [`WEIGHT_BYTES`].
pub(super) fn weight(bytes: usize) -> u32 {
    u32::try_from(1 + bytes / WEIGHT_BYTES).unwrap_or(u32::MAX)
}

/// Offsets with work in flight, per partition, in consumption order.
#[derive(Default)]
pub(super) struct Tracker {
    /// (topic index, partition) → its CDRs in flight and next offset.
    partitions: HashMap<(usize, i32), Partition>,
    /// Entries not yet finished, over all partitions, each by its [`weight`].
    pub(super) in_flight: usize,
    /// The same over every consumer thread of the engine, which share it.
    total: Arc<AtomicUsize>,
    /// Per partition, the highest offset found safe and not yet handed to librdkafka.
    /// They are stored together before each commit: one call instead of one per CDR.
    to_store: HashMap<(usize, i32), i64>,
}

impl Tracker {
    /// A tracker whose in-flight entries also count in `total`.
    pub(super) fn new(total: Arc<AtomicUsize>) -> Self {
        Self { total, ..Self::default() }
    }

    /// CDRs in flight on every consumer thread sharing this one's total.
    pub(super) fn in_flight_total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn add(&mut self, n: usize) {
        self.in_flight += n;
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&mut self, n: usize) {
        self.in_flight -= n;
        self.total.fetch_sub(n, Ordering::Relaxed);
    }

    /// Reading `tp` goes on at `offset` (its committed offset, at assignment).
    pub(super) fn starts_at(&mut self, tp: (usize, i32), offset: i64) {
        self.partitions.entry(tp).or_default().next = Some(offset);
    }

    /// A CDR read and finished without async work; the offsets skipped before it.
    #[must_use]
    pub(super) fn finished(&mut self, tp: (usize, i32), offset: i64) -> Option<Skipped> {
        let p = self.partitions.entry(tp).or_default();
        let skipped = p.read(offset);
        if p.queue.is_empty() {
            self.safe(tp, offset);
        } else {
            p.note(offset, 0, 0);
        }
        skipped
    }

    /// A CDR read whose work goes on; the offsets skipped before it.
    #[must_use]
    pub(super) fn started(&mut self, tp: (usize, i32), offset: i64, weight: u32) -> Option<Skipped> {
        let p = self.partitions.entry(tp).or_default();
        let skipped = p.read(offset);
        p.note(offset, 1, weight);
        self.add(weight as usize);
        skipped
    }

    /// Marks `offset` finished; the offsets before it that are all finished become safe.
    pub(super) fn completed(&mut self, tp: (usize, i32), offset: i64) {
        let Some(Partition { queue: q, .. }) = self.partitions.get_mut(&tp) else { return };
        let Ok(i) = q.binary_search_by_key(&offset, |(o, _, _)| *o) else { return };
        let (newly, weight) = (q[i].1 > 0, q[i].2);
        q[i].1 = q[i].1.saturating_sub(1);
        let mut safe = None;
        while let Some(&(o, 0, _)) = q.front() {
            safe = Some(o);
            q.pop_front();
        }
        if newly {
            self.sub(weight as usize);
        }
        if let Some(offset) = safe {
            self.safe(tp, offset);
        }
    }

    /// Notes `offset` as safe to store for `tp`.
    fn safe(&mut self, tp: (usize, i32), offset: i64) {
        let stored = self.to_store.entry(tp).or_insert(offset);
        *stored = (*stored).max(offset);
    }

    /// The offsets found safe since the last call, to store.
    pub(super) fn take_to_store(&mut self) -> HashMap<(usize, i32), i64> {
        std::mem::take(&mut self.to_store)
    }

    pub(super) fn busy(&self, only: Option<&HashSet<(usize, i32)>>) -> bool {
        self.partitions.iter().any(|(tp, p)| !p.queue.is_empty() && only.is_none_or(|s| s.contains(tp)))
    }

    pub(super) fn forget(&mut self, tp: &(usize, i32)) {
        if let Some(p) = self.partitions.remove(tp) {
            self.sub(p.queue.iter().map(|(_, tasks, weight)| (*tasks * *weight) as usize).sum());
        }
    }

    /// Gives up every partition's work in flight (at shutdown, after the grace period):
    /// its offsets are never stored.
    pub(super) fn abandon(&mut self) {
        self.partitions.clear();
        let left = self.in_flight;
        self.sub(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_advance_only_past_finished_work_in_order() {
        let mut t = Tracker::default();
        let tp = (0, 0);
        let safe = |t: &mut Tracker| t.take_to_store().get(&tp).copied();
        assert_eq!(t.finished(tp, 0), None);
        assert_eq!(safe(&mut t), Some(0), "nothing in flight: store at once");
        assert_eq!(t.started(tp, 1, 1), None);
        assert_eq!(t.started(tp, 2, 1), None);
        assert_eq!(t.finished(tp, 3), None, "offsets read in order skip nothing");
        assert_eq!(safe(&mut t), None, "must wait for 1 and 2");
        t.completed(tp, 2);
        assert_eq!(safe(&mut t), None, "1 is still in flight");
        t.completed(tp, 1);
        assert_eq!(safe(&mut t), Some(3), "1, 2 and 3 are now all finished");
        assert_eq!(t.in_flight, 0);
        t.completed(tp, 1);
        assert_eq!(safe(&mut t), None, "a stale completion changes nothing");
        let _ = (t.finished(tp, 4), t.finished(tp, 5));
        assert_eq!(t.take_to_store(), [(tp, 5)].into(), "only the highest safe offset is stored");
        assert!(t.take_to_store().is_empty());
    }

    /// An offset reset that rewinds a partition while CDRs after it are in flight (the
    /// log truncated under a new leader; `auto.offset.reset` earliest) reads their
    /// offsets again: each read is waited for, and the partition's offsets go on once
    /// all are finished. The re-read offsets were queued out of order, their completions
    /// not found: nothing of the partition was ever stored again, and its in-flight
    /// count leaked (a revocation waited out its grace, the consumer paused for good).
    #[test]
    fn offsets_read_again_after_a_rewind_are_waited_for_and_then_stored() {
        let mut t = Tracker::default();
        let tp = (0, 0);
        let _ = (t.started(tp, 100, 1), t.started(tp, 101, 1));
        // Rewound to 50: 50 and 100 are read again while the first 100 and 101 are in flight.
        let _ = (t.finished(tp, 50), t.started(tp, 100, 1));
        t.completed(tp, 100);
        t.completed(tp, 101);
        assert_eq!(t.take_to_store().get(&tp), Some(&50), "only 50 is safe: 100 is read again");
        t.completed(tp, 100);
        assert_eq!(t.take_to_store().get(&tp), Some(&101));
        assert_eq!(t.in_flight, 0);
        assert!(!t.busy(None));
    }

    /// A fax of 10 MB counts as 611 CDRs in flight, so a backlog of faxes pauses the
    /// consumers before their documents fill memory; a CDR counts as one.
    #[test]
    fn a_large_record_counts_for_its_size_in_flight() {
        assert_eq!((weight(0), weight(400), weight(WEIGHT_BYTES)), (1, 1, 2));
        let fax = weight(10_000_000);
        assert_eq!(fax, 611);
        let mut t = Tracker::default();
        let tp = (0, 0);
        let _ = (t.started(tp, 1, fax), t.started(tp, 2, 1));
        assert_eq!(t.in_flight, 612);
        t.completed(tp, 1);
        assert_eq!(t.in_flight, 1, "its whole weight goes with it");
        let _ = t.started(tp, 3, fax);
        t.forget(&tp);
        assert_eq!(t.in_flight, 0);
    }

    #[test]
    fn forgetting_a_revoked_partition_drops_its_in_flight_count() {
        let mut t = Tracker::default();
        let _ = (t.started((0, 1), 10, 1), t.started((0, 2), 10, 1));
        t.forget(&(0, 1));
        assert_eq!(t.in_flight, 1);
        assert!(t.busy(None));
        assert!(!t.busy(Some(&[(0, 1)].into_iter().collect())));
        t.completed((0, 1), 10);
        assert!(t.take_to_store().is_empty(), "completion of a revoked partition is ignored");
    }

    /// `engine.max_in_flight` bounds the engine, not each consumer thread.
    #[test]
    fn consumer_threads_count_their_work_in_flight_together() {
        let total = Arc::new(AtomicUsize::new(0));
        let (mut a, mut b) = (Tracker::new(total.clone()), Tracker::new(total));
        let _ = (a.started((0, 0), 1, 1), a.started((0, 0), 2, 1), b.started((0, 1), 7, 1));
        assert_eq!((a.in_flight, b.in_flight, a.in_flight_total()), (2, 1, 3));
        a.completed((0, 0), 1);
        b.forget(&(0, 1));
        assert_eq!(b.in_flight_total(), 1, "a's CDR 2 is still in flight");
        a.abandon();
        assert_eq!((a.in_flight, b.in_flight_total()), (0, 0));
        assert!(!a.busy(None));
    }

    /// `callnotify_offsets_skipped_total`: a broker that hands out CDRs past where reading
    /// should go on (as tansu did after a resume inside a batch) is caught at the first one.
    #[test]
    fn offsets_the_broker_passed_over_are_reported_and_a_reread_is_not() {
        let mut t = Tracker::default();
        let tp = (0, 3);
        t.starts_at(tp, 5);
        assert_eq!(t.finished(tp, 10), Some(Skipped { from: 5, to: 10 }), "resumed past the committed offset");
        assert_eq!(t.started(tp, 11, 1), None);
        assert_eq!(t.finished(tp, 14), Some(Skipped { from: 12, to: 14 }), "a gap between two CDRs");
        assert_eq!(t.finished(tp, 2), None, "read again after an offset reset");
        assert_eq!(t.finished(tp, 3), None);
        t.forget(&tp);
        assert_eq!(t.finished(tp, 40), None, "assigned again without a known start: checked from its first CDR");
        assert_eq!(t.finished(tp, 42), Some(Skipped { from: 41, to: 42 }));
    }
}
