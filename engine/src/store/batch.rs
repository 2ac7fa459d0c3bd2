//! A batch of ops carried out on several threads, with the state it would have had on
//! one: the import's lines (R-L3) split into groups that share no phone number, each
//! group in order on a thread of its own. An import is sled's work, on one core when
//! the lines go one after another; this is what lets it use the others.
//!
//! Why the state is the same as one thread's: every key an import op reads or writes
//! is a tree's record of one phone number (`lines/C`, `numbers/N`, `credentials/N`, the
//! index of subscribed numbers), and the numbers it can reach are known before it runs
//! from the store as it is then ([`Reach::reach`]): its contract, the numbers it lists,
//! the numbers its line lists now (those it may remove) and the lines its numbers belong
//! to now (those it may take them from). Ops whose numbers meet are one group, in their
//! order. An op of a group reaches only the group's numbers when it runs, too: a line's
//! numbers or a number's line changed since the batch began were changed by an earlier
//! op of the same group (no other group writes those keys), which listed them, so
//! they are the group's. Groups thus never meet, each key sees its ops in order, and
//! what each op wrote (its [`super::state::Changed`]) is what it wrote on one thread.
//! Used by an import without a state owner (`provision import` without `--url`); the
//! owner carries out ops one after another (`crate::state` says why).
//! Any other op (a login, a session, a save) is carried out alone, after every op
//! before it and before every op after it.
//!
//! [`by_key`] is the same for writes of one key each, whose order matters only per key:
//! a node applying the state topic's records (a catch-up).

use std::collections::HashMap;
use std::hash::Hash;

use super::{PhoneNumber, Store, StoreError};

/// An op a batch may carry out beside others: one whose reach is known before it runs.
pub(super) trait Reach {
    /// Whether this op may run beside others (an import's); any other runs alone.
    fn independent(&self) -> bool;

    /// Every number whose records this independent op may read or write, from the
    /// store as it is (module docs).
    fn reach(&self, store: &Store) -> Result<Vec<PhoneNumber>, StoreError>;
}

/// Fewer independent ops than this are carried out on the calling thread: threads of
/// their own would cost more than they save.
const MIN_PER_THREAD: usize = 256;

/// The threads a batch is carried out on: the machine's cores (more only contend: three
/// on two cores were slower than two), at most four (more are not measured).
pub(super) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(4)
}

impl Store {
    /// Carries out `run` for every op of `ops` on up to `threads` threads, with the
    /// result of carrying them out in order (module docs); the results in `ops`'s order.
    /// `run` is where the op is carried out (and what the caller needs of it kept).
    pub(super) fn execute_batch<O: Reach + Sync, R: Send>(
        &self,
        ops: &[O],
        threads: usize,
        run: impl Fn(&O) -> R + Sync,
    ) -> Vec<R> {
        let mut results = Vec::with_capacity(ops.len());
        let mut start = 0;
        for (i, op) in ops.iter().enumerate() {
            if !op.independent() {
                results.extend(self.execute_apart(&ops[start..i], threads, &run));
                results.push(run(op));
                start = i + 1;
            }
        }
        results.extend(self.execute_apart(&ops[start..], threads, &run));
        results
    }

    /// Independent ops ([`Reach::independent`]) in groups that share no number, on threads.
    fn execute_apart<O: Reach + Sync, R: Send>(
        &self,
        ops: &[O],
        threads: usize,
        run: &(impl Fn(&O) -> R + Sync),
    ) -> Vec<R> {
        let threads = threads.min(ops.len() / MIN_PER_THREAD).max(1);
        let groups = match threads {
            1 => None,
            _ => self.groups(ops, threads),
        };
        let Some(first_of_group) = groups else { return ops.iter().map(run).collect() };
        // Groups by where their first op is: a sorted input keeps each thread on keys
        // of its own, where sled's pages see no contention.
        let thread_of = |i: usize| first_of_group[i] * threads / ops.len();
        on_threads(ops.len(), threads, thread_of, |i| run(&ops[i]))
    }

    /// For each op, the first op of its group (ops that reach a common number); `None`
    /// when the store cannot be read (the ops then run one after another, and meet the
    /// error themselves).
    fn groups<O: Reach + Sync>(&self, ops: &[O], threads: usize) -> Option<Vec<usize>> {
        // Read on the threads too: the store does not change while they read.
        let chunk = ops.len().div_ceil(threads);
        let parts: Vec<Result<Vec<Vec<PhoneNumber>>, StoreError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ops
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().map(|op| op.reach(self)).collect::<Result<Vec<_>, _>>()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        });
        let reaches: Vec<Vec<PhoneNumber>> = parts.into_iter().collect::<Result<Vec<_>, _>>().ok()?.concat();
        let mut first = Groups::new(ops.len());
        let mut seen: HashMap<PhoneNumber, usize> = HashMap::with_capacity(ops.len() * 2);
        for (i, reach) in reaches.iter().enumerate() {
            for number in reach {
                match seen.get(number) {
                    Some(&j) => first.join(i, j),
                    None => {
                        seen.insert(*number, i);
                    }
                }
            }
        }
        Some((0..ops.len()).map(|i| first.first(i)).collect())
    }
}

/// Carries out `run` for every item of `items` on up to `threads` threads, every item of
/// one key (`key_of`) on one thread in their order; the results in `items`'s order. For
/// writes of one key each (a state topic's records), whose order matters per key only.
pub(super) fn by_key<'a, T: Sync, K: Hash + Eq, R: Send>(
    items: &'a [T],
    threads: usize,
    key_of: impl Fn(&'a T) -> K,
    run: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.min(items.len() / MIN_PER_THREAD).max(1);
    if threads == 1 {
        return items.iter().map(run).collect();
    }
    // Keys numbered as they first come, and shared out in runs of that order: a sorted
    // input keeps each thread on keys of its own.
    let mut rank: HashMap<K, usize> = HashMap::with_capacity(items.len());
    let ranks: Vec<usize> = items
        .iter()
        .map(|item| {
            let next = rank.len();
            *rank.entry(key_of(item)).or_insert(next)
        })
        .collect();
    let keys = rank.len();
    on_threads(items.len(), threads, |i| ranks[i] * threads / keys, |i| run(&items[i]))
}

/// Runs `run` for every index below `len`, index `i` on thread `thread_of(i)` (of
/// `threads`; 0 is the calling one), each thread's indices in their order; the results
/// in index order.
fn on_threads<R: Send>(
    len: usize,
    threads: usize,
    thread_of: impl Fn(usize) -> usize + Sync,
    run: impl Fn(usize) -> R + Sync,
) -> Vec<R> {
    let (thread_of, run) = (&thread_of, &run);
    let mut results: Vec<Option<R>> = std::iter::repeat_with(|| None).take(len).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (1..threads)
            .map(|t| {
                scope.spawn(move || (0..len).filter(|&i| thread_of(i) == t).map(|i| (i, run(i))).collect::<Vec<_>>())
            })
            .collect();
        for i in (0..len).filter(|&i| thread_of(i) == 0) {
            results[i] = Some(run(i));
        }
        for handle in handles {
            // A panic of `run` is the caller's, as on one thread.
            for (i, result) in handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)) {
                results[i] = Some(result);
            }
        }
    });
    results.into_iter().map(|r| r.expect("every index ran on some thread")).collect()
}

/// Union-find over op indices whose root is the group's first op.
struct Groups(Vec<usize>);

impl Groups {
    fn new(len: usize) -> Self {
        Self((0..len).collect())
    }

    fn first(&mut self, mut i: usize) -> usize {
        while self.0[i] != i {
            self.0[i] = self.0[self.0[i]];
            i = self.0[i];
        }
        i
    }

    fn join(&mut self, a: usize, b: usize) {
        let (a, b) = (self.first(a), self.first(b));
        let (first, other) = if a < b { (a, b) } else { (b, a) };
        self.0[other] = first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::state::{Changed, Op};
    use crate::store::{CredentialKind, CredentialRecord, LineRecord, Services};

    /// The n-th number of these tests: `03` + 8 digits.
    fn n(i: usize) -> PhoneNumber {
        PhoneNumber::parse(&format!("03{:08}", 10_000_000 + i)).unwrap()
    }

    fn upsert(contract: usize, numbers: &[usize]) -> Op {
        let services = Services { call: true, fax: false };
        Op::UpsertLine {
            line: LineRecord { contract: n(contract), numbers: numbers.iter().map(|&i| n(i)).collect(), unit: None },
            numbers: numbers.iter().map(|&i| (n(i), services, None)).collect(),
        }
    }

    fn credential(hash: &str) -> CredentialRecord {
        CredentialRecord {
            hash: hash.into(),
            kind: CredentialKind::Password,
            set_at: chrono::DateTime::UNIX_EPOCH,
            failures: 0,
            invalidated: false,
        }
    }

    /// `lines` lines of three numbers each (line i: numbers 4i, 4i+1, 4i+2, contract
    /// 4i), each with a credential on its second number.
    fn seeded(lines: usize) -> Store {
        // One time for both stores: a move notes when it was carried out.
        let at = chrono::DateTime::from_timestamp(1_796_000_000, 0).unwrap();
        let store = Store::temporary().unwrap().with_clock(std::sync::Arc::new(move || at));
        for i in 0..lines {
            let c = 4 * i;
            store.execute(&upsert(c, &[c, c + 1, c + 2])).unwrap();
            store.execute(&Op::SetCredential { number: n(c + 1), record: credential(&format!("old{i}")) }).unwrap();
        }
        store
    }

    /// Everything the store holds of lines, numbers and credentials, comparable.
    fn contents(store: &Store, lines: usize) -> Vec<String> {
        let mut all: Vec<String> = store.lines().map(|l| format!("{:?}", l.unwrap())).collect();
        for i in 0..4 * lines {
            all.push(format!("{i}: {:?} {:?}", store.number(&n(i)).unwrap(), store.credential(&n(i)).unwrap()));
        }
        all
    }

    /// R-L3, R-M3: an import whose lines take numbers from each other, drop numbers
    /// another line takes, come twice, and restore credentials of numbers a later line
    /// moves, with other writes between them, leaves the store as one thread leaves it,
    /// answers the same and says it wrote the same.
    #[test]
    fn r_l3_a_batch_on_several_threads_leaves_the_store_one_thread_leaves() {
        const LINES: usize = 1_200;
        let mut ops = Vec::new();
        for i in 0..LINES {
            let c = 4 * i;
            let other = 4 * ((i * 7 + i / 3) % LINES);
            ops.push(match i % 4 {
                0 => upsert(c, &[c, c + 1]),                   // drops c + 2
                1 => upsert(c, &[c, c + 1, other + 2]),        // takes another line's number
                2 => upsert(c, &[c, c + 2, other + 1, c + 3]), // drops c + 1, takes one, a new one
                _ => upsert(c, &[c, c + 1, c + 2]),            // the same again
            });
            if i % 5 == 0 {
                ops.push(Op::RestoreCredential {
                    number: n(c + 2),
                    record: credential(&format!("restored{i}")),
                    line: None,
                });
            }
            if i % 97 == 0 {
                // Not an import's: carried out alone, between the others.
                ops.push(Op::SetCredential { number: n(other + 1), record: credential(&format!("set{i}")) });
            }
            if i % 13 == 0 {
                ops.push(upsert(other, &[other, c + 2]));
            }
        }
        let one = seeded(LINES);
        let several = seeded(LINES);
        // What makes it so: every number an op of an import writes, one after another,
        // is one its group reaches as the batch begins (groups never meet).
        let imports: Vec<Op> = ops.iter().filter(|op| op.independent()).cloned().collect();
        let first = several.groups(&imports, 4).expect("the store reads");
        let mut reach: HashMap<usize, Vec<PhoneNumber>> = HashMap::new();
        for (i, op) in imports.iter().enumerate() {
            reach.entry(first[i]).or_default().extend(op.reach(&several).unwrap());
        }
        let probe = seeded(LINES);
        for (i, op) in imports.iter().enumerate() {
            let written: Vec<String> = match probe.execute(op) {
                Ok((_, Changed::Values(values))) => values.into_values().into_iter().map(|(k, _)| k.id).collect(),
                Ok((_, Changed::Keys(keys))) => keys.into_iter().map(|k| k.id).collect(),
                Err(_) => Vec::new(), // A credential for a number gone: refused, nothing written.
            };
            for id in written {
                assert!(
                    reach[&first[i]].contains(&PhoneNumber::parse(&id).unwrap()),
                    "op {i} writes {id} outside its group"
                );
            }
        }
        assert!(first.iter().enumerate().filter(|(i, f)| *i == **f).count() > 100, "many groups");
        let answers = |store: &Store, threads| -> Vec<String> {
            // The answer and what the op says it wrote.
            let run = |op: &Op| format!("{:?}", store.execute(op));
            store.execute_batch(&ops, threads, run)
        };
        let on_one = answers(&one, 1);
        assert!(on_one.iter().any(|a| a.contains("moved: [(")), "some numbers move between lines");
        assert_eq!(answers(&several, 4), on_one);
        assert_eq!(contents(&several, LINES + 1), contents(&one, LINES + 1));
    }

    /// A state topic's records on several threads: every key's on one thread, in their
    /// order, so its last value is the one left, as on one thread.
    #[test]
    fn by_key_runs_each_key_s_items_on_one_thread_in_their_order() {
        let items: Vec<(usize, usize)> = (0..5_000).map(|i| ((i * 7_919) % 300, i)).collect();
        let ran = std::sync::Mutex::new(Vec::new());
        let results = by_key(
            &items,
            4,
            |(key, _)| *key,
            |&(key, i)| {
                ran.lock().unwrap().push((key, i, std::thread::current().id()));
                i * 2
            },
        );
        assert_eq!(results, (0..5_000).map(|i| i * 2).collect::<Vec<_>>(), "the results in the items' order");
        let ran = ran.into_inner().unwrap();
        let threads: std::collections::HashSet<_> = ran.iter().map(|r| r.2).collect();
        assert_eq!(threads.len(), 4);
        for key in 0..300 {
            let of_key: Vec<_> = ran.iter().filter(|r| r.0 == key).collect();
            assert!(of_key.len() > 10);
            for pair in of_key.windows(2) {
                assert!(pair[0].1 < pair[1].1, "key {key}: item {} ran before item {}", pair[1].1, pair[0].1);
                assert_eq!(pair[0].2, pair[1].2, "key {key}: items {} and {} on two threads", pair[0].1, pair[1].1);
            }
        }
    }

    /// R-L3 on a node catching up: the records an import published (lines taking numbers
    /// from each other, dropping numbers, the same line twice), applied in one call on
    /// several threads, leave the store that applying them one by one leaves: the
    /// importing store's lines, numbers and index of subscribed numbers.
    #[test]
    fn r_l3_records_applied_at_once_leave_the_store_they_were_written_in() {
        const LINES: usize = 600;
        let source = Store::temporary().unwrap();
        let mut records = Vec::new();
        for i in 0..LINES {
            let (c, other) = (4 * i, 4 * ((i * 7 + 3) % LINES));
            let mut ops = vec![upsert(c, &[c, c + 1, c + 2])];
            match i % 3 {
                0 => ops.push(upsert(other, &[other, c + 1])), // takes c + 1 from line c
                1 => ops.push(upsert(c, &[c])),                // drops two
                _ => ops.push(upsert(c, &[c, c + 1, c + 2])),  // the same again
            }
            for op in ops {
                let Ok((_, Changed::Values(written))) = source.execute(&op) else { panic!("an upsert writes values") };
                records.extend(written.into_values().into_iter().map(|(k, v)| (k, v.map(|v| v.to_vec()))));
            }
        }
        let at_once = Store::temporary().unwrap();
        at_once.apply_state(&records, records.len() as i64, None, &[]).unwrap();
        let one_by_one = Store::temporary().unwrap();
        for (i, record) in records.iter().enumerate() {
            one_by_one.apply_state(std::slice::from_ref(record), i as i64 + 1, None, &[]).unwrap();
        }
        let subscribed = |store: &Store| store.subscribed_numbers().collect::<Result<Vec<_>, _>>().unwrap();
        assert!(subscribed(&at_once).len() > LINES, "{}", subscribed(&at_once).len());
        assert_eq!(subscribed(&at_once), subscribed(&one_by_one));
        assert_eq!(subscribed(&at_once), subscribed(&source));
        assert_eq!(contents(&at_once, LINES), contents(&one_by_one, LINES));
        assert_eq!(contents(&at_once, LINES), contents(&source, LINES));
        assert_eq!(at_once.state_position().unwrap(), records.len() as i64);
    }

    /// An op reaches the lines its numbers are on now, though it names none of them:
    /// two lines taking a number each from line 0 both change line 0's record, and each
    /// says what it wrote there, as on one thread only if they are one group.
    #[test]
    fn ops_taking_numbers_from_one_line_are_one_group() {
        let store = seeded(2);
        let ops = [upsert(8, &[8, 2]), upsert(12, &[12, 1]), upsert(16, &[16])];
        let first = store.groups(&ops, 2).unwrap();
        assert_eq!(first, vec![0, 0, 2]);
    }
}
