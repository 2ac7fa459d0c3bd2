//! Which offsets may be stored: per partition, the CDRs with work in flight in the
//! order they were read. An offset is safe once it and every earlier one are finished.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::deliver::Fate;
use crate::store::SentKey;

/// What a delivery task reports when a CDR's work is finished.
pub struct Completion {
    pub topic: usize,
    pub partition: i32,
    pub offset: i64,
    /// Each mail's dedup key (its sent record is on disk already) and how it ended.
    pub mails: Vec<(SentKey, Fate)>,
}

/// Offsets with work in flight, per partition, in consumption order.
#[derive(Default)]
pub(super) struct Tracker {
    /// (topic index, partition) → (offset, finished) in ascending offset order.
    pub(super) partitions: HashMap<(usize, i32), VecDeque<(i64, bool)>>,
    /// Entries not yet finished, over all partitions.
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

    /// A CDR finished without async work.
    pub(super) fn finished(&mut self, tp: (usize, i32), offset: i64) {
        match self.partitions.get_mut(&tp) {
            Some(q) if !q.is_empty() => q.push_back((offset, true)),
            _ => self.safe(tp, offset),
        }
    }

    pub(super) fn started(&mut self, tp: (usize, i32), offset: i64) {
        self.partitions.entry(tp).or_default().push_back((offset, false));
        self.add(1);
    }

    /// Marks `offset` finished; the offsets before it that are all finished become safe.
    pub(super) fn completed(&mut self, tp: (usize, i32), offset: i64) {
        let Some(q) = self.partitions.get_mut(&tp) else { return };
        let Ok(i) = q.binary_search_by_key(&offset, |(o, _)| *o) else { return };
        let newly = !std::mem::replace(&mut q[i].1, true);
        let mut safe = None;
        while let Some(&(o, true)) = q.front() {
            safe = Some(o);
            q.pop_front();
        }
        if newly {
            self.sub(1);
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
        self.partitions.iter().any(|(tp, q)| !q.is_empty() && only.is_none_or(|s| s.contains(tp)))
    }

    pub(super) fn forget(&mut self, tp: &(usize, i32)) {
        if let Some(q) = self.partitions.remove(tp) {
            self.sub(q.iter().filter(|(_, done)| !done).count());
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
        t.finished(tp, 0);
        assert_eq!(safe(&mut t), Some(0), "nothing in flight: store at once");
        t.started(tp, 1);
        t.started(tp, 2);
        t.finished(tp, 3);
        assert_eq!(safe(&mut t), None, "must wait for 1 and 2");
        t.completed(tp, 2);
        assert_eq!(safe(&mut t), None, "1 is still in flight");
        t.completed(tp, 1);
        assert_eq!(safe(&mut t), Some(3), "1, 2 and 3 are now all finished");
        assert_eq!(t.in_flight, 0);
        t.completed(tp, 1);
        assert_eq!(safe(&mut t), None, "a stale completion changes nothing");
        t.finished(tp, 4);
        t.finished(tp, 5);
        assert_eq!(t.take_to_store(), [(tp, 5)].into(), "only the highest safe offset is stored");
        assert!(t.take_to_store().is_empty());
    }

    #[test]
    fn forgetting_a_revoked_partition_drops_its_in_flight_count() {
        let mut t = Tracker::default();
        t.started((0, 1), 10);
        t.started((0, 2), 10);
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
        a.started((0, 0), 1);
        a.started((0, 0), 2);
        b.started((0, 1), 7);
        assert_eq!((a.in_flight, b.in_flight, a.in_flight_total()), (2, 1, 3));
        a.completed((0, 0), 1);
        b.forget(&(0, 1));
        assert_eq!(b.in_flight_total(), 1, "a's CDR 2 is still in flight");
        a.abandon();
        assert_eq!((a.in_flight, b.in_flight_total()), (0, 0));
        assert!(!a.busy(None));
    }
}
