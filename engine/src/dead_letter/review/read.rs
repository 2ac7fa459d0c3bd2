//! Reading the dead-letter topic to its end, through the errors a retry mends.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{never_mends, Filter, Letter, ReviewError, TIMEOUT};

/// The (partition, offset) of the records replayed, from their markers.
type Replayed = HashSet<(i32, i64)>;

/// The records of `topic` from its start to its end now that `filter` lets through, and
/// the records replayed. Given up once no record came for `patience`: a topic of
/// millions (a decoder broken for a day at a carrier's rate) takes as long as it takes,
/// and only the records asked for are held.
pub(super) fn read(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    filter: &Filter,
    patience: Duration,
) -> Result<(Vec<Letter>, Replayed), ReviewError> {
    if brokers.is_empty() {
        return Err(ReviewError::NoCluster);
    }
    let group = format!("callnotify-dead-letters-{}", std::process::id());
    let consumer: BaseConsumer = crate::cluster::client_config(
        brokers,
        &[("group.id", &group), ("enable.auto.commit", "false"), ("enable.partition.eof", "true")],
        properties,
    )
    .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    if partitions.is_empty() {
        return Err(ReviewError::NoTopic { topic: topic.to_owned() });
    }
    let mut ends = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, TIMEOUT)?;
        if high > low {
            ends.insert(partition, high);
            assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
        }
    }
    consumer.assign(&assignment)?;
    let (mut letters, mut replayed) = (Vec::new(), HashSet::new());
    let mut deadline = std::time::Instant::now() + patience;
    let mut left: usize = ends.len();
    let mut done = HashSet::new();
    let mut last_error = None;
    while left > 0 {
        if std::time::Instant::now() > deadline {
            let last = last_error.map(|e| format!(" (the last error: {e})")).unwrap_or_default();
            return Err(ReviewError::Slow { topic: topic.to_owned(), last });
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = match message {
            // The end of a partition whose last offsets hold no record (compacted away,
            // a transaction's marker): nothing more to wait for there.
            Err(rdkafka::error::KafkaError::PartitionEOF(partition)) => {
                if done.insert(partition) {
                    left -= 1;
                    deadline = std::time::Instant::now() + patience;
                }
                continue;
            }
            Err(e) => {
                // A broker restarting, a connection dropped: librdkafka reconnects and the
                // reading goes on (the patience above bounds it). What no retry mends
                // ends it at once.
                if let Some((code, why)) = consumer.client().fatal_error() {
                    return Err(ReviewError::Fatal(format!("{code}: {why}")));
                }
                if e.rdkafka_error_code().is_some_and(never_mends) {
                    return Err(ReviewError::Kafka(e));
                }
                tracing::warn!(error = %e, "reading the dead letters: {e}; going on");
                last_error = Some(e.to_string());
                continue;
            }
            Ok(message) => message,
        };
        // Progress is a record of a partition not yet read to its end as it was: new dead
        // letters on one read already do not keep a stalled one waited for.
        if !done.contains(&message.partition()) && message.offset() < ends[&message.partition()] {
            deadline = std::time::Instant::now() + patience;
        }
        let (partition, offset) = (message.partition(), message.offset());
        // One that is no dead letter of ours (a test message produced by hand, an empty
        // one) is listed as unreadable, and a replay names it and leaves it alone.
        let record: serde_json::Value = serde_json::from_slice(message.payload().unwrap_or_default())
            .unwrap_or_else(|e| serde_json::json!({"kind": "unreadable", "reason": format!("not JSON: {e}")}));
        if record["kind"] == "replayed" {
            if let (Some(p), Some(o)) = (record["partition"].as_i64(), record["offset"].as_i64()) {
                replayed.insert((p as i32, o));
            }
        } else {
            let letter = Letter { partition, offset, record, replayed: false };
            if letter.matches(filter) {
                letters.push(letter);
            }
        }
        if offset + 1 >= ends[&partition] && done.insert(partition) {
            left -= 1;
        }
    }
    letters.sort_by_key(|l| (l.partition, l.offset));
    Ok((letters, replayed))
}

#[cfg(test)]
mod tests {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    use super::*;

    /// A dead-letter topic larger than can be read in the 30 s given to the whole read
    /// (a decoder broken for a day at a carrier's rate: millions) could not be listed or
    /// replayed at all. The read now gives up only when no record comes for that long,
    /// and holds only the records the filter lets through. (Here with a patience of
    /// 1 s, which the whole read of these records, one a fetch, takes longer than.)
    #[test]
    fn r_m4_a_dead_letter_topic_read_longer_than_the_patience_is_read_to_its_end() {
        const RECORDS: usize = 20_000;
        let kafka = crate::embedded::EmbeddedKafka::start(&["dl"], 1).unwrap();
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .set("queue.buffering.max.messages", "1000000")
            // A batch a record: fetched one at a time below.
            .set("batch.num.messages", "1")
            .create()
            .unwrap();
        for i in 0..RECORDS {
            let kind = if i % 1000 == 0 { "mail" } else { "cdr" };
            let record = format!(r#"{{"kind":"{kind}","reason":"r{i}"}}"#);
            producer.send(BaseRecord::<(), str>::to("dl").payload(&record)).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(Duration::from_secs(60)).unwrap();

        let patience = Duration::from_millis(1_000);
        let mails = Filter { kind: Some("mail".into()), ..Filter::default() };
        let started = std::time::Instant::now();
        // One record a fetch: a read as long as a large topic's.
        let small_fetches: BTreeMap<String, String> =
            [("fetch.max.bytes", "1000"), ("message.max.bytes", "1000"), ("max.partition.fetch.bytes", "200")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into();
        let (letters, _) = read(kafka.bootstrap_servers(), &small_fetches, "dl", &mails, patience).unwrap();
        assert!(started.elapsed() > patience, "read in {:?}: the test shows nothing", started.elapsed());
        assert_eq!(letters.len(), RECORDS / 1000, "the mails only, every one");
    }
}
