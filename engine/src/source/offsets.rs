//! Which offsets may be stored: per partition, the CDRs with work in flight in the
//! order they were read. An offset is safe once it and every earlier one are finished.

use std::collections::{HashMap, HashSet, VecDeque};

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
    /// Dedup keys of mails being sent, so a CDR repeated back-to-back is not sent twice.
    pub(super) keys: HashSet<SentKey>,
    /// Per partition, the highest offset found safe and not yet handed to librdkafka.
    /// They are stored together before each commit: one call instead of one per CDR.
    to_store: HashMap<(usize, i32), i64>,
}

impl Tracker {
    /// A CDR finished without async work; returns the offset to store, if it may be.
    pub(super) fn finished(&mut self, tp: (usize, i32), offset: i64) -> Option<i64> {
        match self.partitions.get_mut(&tp) {
            Some(q) if !q.is_empty() => {
                q.push_back((offset, true));
                None
            }
            _ => self.safe(tp, Some(offset)),
        }
    }

    pub(super) fn started(&mut self, tp: (usize, i32), offset: i64) {
        self.partitions.entry(tp).or_default().push_back((offset, false));
        self.in_flight += 1;
    }

    /// Marks `offset` finished; returns the highest offset now safe to store.
    pub(super) fn completed(&mut self, tp: (usize, i32), offset: i64) -> Option<i64> {
        let q = self.partitions.get_mut(&tp)?;
        let i = q.binary_search_by_key(&offset, |(o, _)| *o).ok()?;
        if !q[i].1 {
            q[i].1 = true;
            self.in_flight -= 1;
        }
        let mut safe = None;
        while let Some(&(o, true)) = q.front() {
            safe = Some(o);
            q.pop_front();
        }
        self.safe(tp, safe)
    }

    fn safe(&mut self, tp: (usize, i32), offset: Option<i64>) -> Option<i64> {
        if let Some(offset) = offset {
            let stored = self.to_store.entry(tp).or_insert(offset);
            *stored = (*stored).max(offset);
        }
        offset
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
            self.in_flight -= q.iter().filter(|(_, done)| !done).count();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_advance_only_past_finished_work_in_order() {
        let mut t = Tracker::default();
        let tp = (0, 0);
        assert_eq!(t.finished(tp, 0), Some(0), "nothing in flight: store at once");
        t.started(tp, 1);
        t.started(tp, 2);
        assert_eq!(t.finished(tp, 3), None, "must wait for 1 and 2");
        assert_eq!(t.completed(tp, 2), None, "1 is still in flight");
        assert_eq!(t.completed(tp, 1), Some(3), "1, 2 and 3 are now all finished");
        assert_eq!(t.in_flight, 0);
        assert_eq!(t.completed(tp, 1), None, "a stale completion changes nothing");
        assert_eq!(t.finished(tp, 4), Some(4));
        assert_eq!(t.take_to_store(), [(tp, 4)].into(), "only the highest safe offset is stored");
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
        assert_eq!(t.completed((0, 1), 10), None, "completion of a revoked partition is ignored");
    }
}
