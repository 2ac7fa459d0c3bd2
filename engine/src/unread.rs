//! Assigned partitions that librdkafka never starts reading, found and assigned again.
//!
//! A consumer in a group looks up the committed offset of each partition it is assigned
//! before it reads it. When that lookup fails (a group coordinator lost, the answer "not
//! coordinator" from the broker that was one), librdkafka keeps the partition assigned
//! and never tries again (librdkafka issue 5586, open in 2.12): nothing more is read from
//! it until the partition is assigned anew. For the state owner that means every write of
//! subscriber state in the cluster fails; for a CDR consumer, calls never notified; and
//! both silently, since the consumer otherwise runs well. Seen on a cluster of three
//! brokers when the owner group's coordinator was killed just after an assignment.
//!
//! Every group consumer of the engine reports librdkafka's statistics into an
//! [`Unread`]: a partition assigned (desired) whose fetcher has not started for
//! [`UNREAD_AFTER`] is raised as an error and assigned again by the consumer's thread
//! ([`assign_again`]), which has librdkafka look its committed offset up anew.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::{Statistics, TopicPartitionList};

/// How long an assigned partition may stay unread before it is assigned again. Its
/// committed offset normally comes within milliseconds; while a group coordinator moves,
/// librdkafka waits for the next one, for seconds. Assigning again early costs one more
/// lookup.
pub const UNREAD_AFTER: Duration = Duration::from_secs(15);

/// librdkafka's statistics interval for the consumers watched: [`UNREAD_AFTER`] plus at
/// most this passes before an unread partition is assigned again.
pub const STATISTICS_INTERVAL_MS: &str = "5000";

/// Tries at giving back partitions a cooperative assignor's consumer took off.
const ASSIGN_TRIES: u32 = 5;

/// A partition: topic and number.
pub type Partition = (String, i32);

/// The assigned partitions a consumer has not started reading, from its statistics.
#[derive(Default)]
pub struct Unread(Mutex<Seen>);

#[derive(Default)]
struct Seen {
    /// Since when each assigned partition has been seen unread.
    since: HashMap<Partition, Instant>,
    /// Unread for [`UNREAD_AFTER`]: for the consumer's thread to assign again.
    due: Vec<Partition>,
}

impl Unread {
    /// Notes, from one statistics report at `now`, which assigned partitions are not
    /// read. A partition due is due once; if it stays unread it is due again after
    /// another [`UNREAD_AFTER`].
    pub fn note(&self, stats: &Statistics, now: Instant) {
        let partitions = stats.topics.iter().flat_map(|(name, topic)| {
            topic.partitions.iter().map(move |(id, p)| (name.as_str(), *id, p.desired, p.fetch_state.as_str()))
        });
        self.note_states(partitions, now);
    }

    /// [`Unread::note`] of (topic, partition, desired, fetch state), as librdkafka's
    /// statistics name them.
    fn note_states<'a>(&self, partitions: impl Iterator<Item = (&'a str, i32, bool, &'a str)>, now: Instant) {
        let mut seen = self.0.lock().expect("unread lock");
        let mut since = HashMap::new();
        for (topic, id, desired, fetch_state) in partitions {
            // "none" before a partition's first read, "stopped" after an earlier one.
            if id >= 0 && desired && matches!(fetch_state, "none" | "stopped") {
                let key = (topic.to_owned(), id);
                let first = seen.since.get(&key).copied().unwrap_or(now);
                since.insert(key, first);
            }
        }
        let due: Vec<Partition> = since
            .iter()
            .filter(|(_, first)| now.duration_since(**first) >= UNREAD_AFTER)
            .map(|(p, _)| p.clone())
            .collect();
        for partition in &due {
            since.remove(partition);
        }
        seen.since = since;
        seen.due.extend(due);
    }

    /// The partitions to assign again, each once.
    pub fn take_due(&self) -> Vec<Partition> {
        let mut due = std::mem::take(&mut self.0.lock().expect("unread lock").due);
        due.sort();
        due.dedup();
        due
    }
}

/// Assigns `unread` again, so that librdkafka looks up their committed offsets anew.
/// With an eager protocol (librdkafka's default) the whole assignment is given again: the
/// partitions read so far go on from where the application read them (what librdkafka
/// had fetched ahead is fetched again), the unread ones from their committed offsets.
/// With a cooperative one, only the unread partitions are taken off and assigned again.
/// The caller pauses again what must stay paused: librdkafka kept a partition's pause
/// across it where tried (an eager assignor, 2.12), which is not its documented behaviour.
pub fn assign_again<C: ConsumerContext>(consumer: &BaseConsumer<C>, unread: &[Partition]) -> KafkaResult<()> {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => {
            let mut list = TopicPartitionList::new();
            for (topic, partition) in unread {
                list.add_partition(topic, *partition);
            }
            consumer.incremental_unassign(&list)?;
            // Taken off, they are read by nobody until they are given back: the group
            // still counts them this member's. A refusal (a rebalance starting) is tried
            // again for a second before it is given up.
            let mut tries = 0;
            loop {
                match consumer.incremental_assign(&list) {
                    Err(_) if tries < ASSIGN_TRIES => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    done => return done,
                }
            }
        }
        RebalanceProtocol::Eager | RebalanceProtocol::None => {
            // Every assigned partition, at the offset after the last message the
            // application read (none, for the unread: their committed offset is looked up).
            let positions = consumer.position()?;
            consumer.assign(&positions)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Notes a report naming `partitions` of topic `t` as (id, desired, fetch state).
    fn note(unread: &Unread, partitions: &[(i32, bool, &str)], now: Instant) {
        unread.note_states(partitions.iter().map(|(id, desired, state)| ("t", *id, *desired, *state)), now);
    }

    #[test]
    fn a_partition_assigned_and_unread_for_fifteen_seconds_is_due_once() {
        let unread = Unread::default();
        let start = Instant::now();
        let stuck = [(0, true, "none"), (1, true, "active"), (-1, false, "none"), (2, false, "none")];
        note(&unread, &stuck, start);
        note(&unread, &stuck, start + Duration::from_secs(10));
        assert!(unread.take_due().is_empty(), "10 s: a coordinator may be moving");
        note(&unread, &stuck, start + UNREAD_AFTER);
        assert_eq!(unread.take_due(), vec![("t".to_owned(), 0)], "only the assigned and unread");
        assert!(unread.take_due().is_empty(), "taken once");
        note(&unread, &stuck, start + UNREAD_AFTER + Duration::from_secs(5));
        assert!(unread.take_due().is_empty(), "its clock starts again");
        note(&unread, &stuck, start + UNREAD_AFTER * 2 + Duration::from_secs(5));
        assert_eq!(unread.take_due().len(), 1, "still unread: due again");
    }

    #[test]
    fn a_partition_read_in_between_starts_its_clock_again() {
        let unread = Unread::default();
        let start = Instant::now();
        note(&unread, &[(0, true, "stopped")], start);
        note(&unread, &[(0, true, "active")], start + Duration::from_secs(10));
        note(&unread, &[(0, true, "stopped")], start + Duration::from_secs(20));
        note(&unread, &[(0, true, "stopped")], start + Duration::from_secs(30));
        assert!(unread.take_due().is_empty());
    }
}
