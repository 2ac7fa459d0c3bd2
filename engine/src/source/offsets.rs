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
    /// A CDR finished without async work.
    pub(super) fn finished(&mut self, tp: (usize, i32), offset: i64) {
        match self.partitions.get_mut(&tp) {
            Some(q) if !q.is_empty() => q.push_back((offset, true)),
            _ => self.safe(tp, offset),
        }
    }

    pub(super) fn started(&mut self, tp: (usize, i32), offset: i64) {
        self.partitions.entry(tp).or_default().push_back((offset, false));
        self.in_flight += 1;
    }

    /// Marks `offset` finished; the offsets before it that are all finished become safe.
    pub(super) fn completed(&mut self, tp: (usize, i32), offset: i64) {
        let Some(q) = self.partitions.get_mut(&tp) else { return };
        let Ok(i) = q.binary_search_by_key(&offset, |(o, _)| *o) else { return };
        if !q[i].1 {
            q[i].1 = true;
            self.in_flight -= 1;
        }
        let mut safe = None;
        while let Some(&(o, true)) = q.front() {
            safe = Some(o);
            q.pop_front();
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
}
