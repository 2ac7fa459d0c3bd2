//! The load tester's Kafka producer, which counts what the broker acknowledged: a CDR
//! only counts as produced once it is in the broker, so a slow broker is not mistaken
//! for a slow engine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::traffic::Cdr;

/// Delivery reports, as counters.
#[derive(Default)]
pub struct Acks {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

#[derive(Clone, Default)]
pub struct Counting(pub Arc<Acks>);

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                *self.0.last_error.lock().expect("error lock") = Some(e.to_string());
            }
        }
    }
}

pub type CountingProducer = BaseProducer<Counting>;

/// A producer for `brokers` tuned for throughput, with its delivery counters.
pub fn create(brokers: &str) -> anyhow::Result<(CountingProducer, Arc<Acks>)> {
    let context = Counting::default();
    let acks = context.0.clone();
    let producer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        // A run's topics are made, and removed at its end, by the run: never again by a
        // record still on its way (auto-creation on a broker that allows it).
        .set("allow.auto.create.topics", "false")
        .create_with_context(context)?;
    Ok((producer, acks))
}

/// Produces `cdrs` to `topic` and waits until the broker has acknowledged every one;
/// returns how many there were. For a topic filled before it is read.
pub fn fill(brokers: &str, topic: &str, cdrs: impl Iterator<Item = Cdr>) -> anyhow::Result<u64> {
    let (producer, acks) = create(brokers)?;
    let mut sent = 0u64;
    for cdr in cdrs {
        anyhow::ensure!(!crate::stopping(), "stopped while filling {topic}");
        let mut record = BaseRecord::to(topic).key(&cdr.key).payload(&cdr.payload);
        while let Err((_, back)) = producer.send(record) {
            // Queue full: let librdkafka deliver, then try again.
            producer.poll(Duration::from_millis(5));
            record = back;
        }
        sent += 1;
    }
    producer.flush(Duration::from_secs(120))?;
    let delivered = acks.delivered.load(Ordering::Acquire);
    anyhow::ensure!(
        delivered == sent,
        "the broker took {delivered} of {sent} CDRs for {topic} (last error: {:?})",
        acks.last_error.lock().expect("error lock")
    );
    Ok(sent)
}

/// Messages of `topic` the broker still holds, over all its partitions. librdkafka's
/// mock cluster keeps at most 5 MB or 100 000 messages a partition and deletes older
/// ones, so a topic filled in advance may hold fewer than were produced.
pub fn retained(brokers: &str, topic: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut held = 0;
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = consumer.fetch_watermarks(topic, partition.id(), timeout)?;
        held += high - low;
    }
    Ok(held)
}

/// Fails with what to change when the broker holds fewer than `produced` messages of
/// `topic`: a comparison would wait for messages that are gone.
pub fn ensure_retained(brokers: &str, topic: &str, produced: u64) -> anyhow::Result<()> {
    let held = retained(brokers, topic)?;
    anyhow::ensure!(
        held >= produced as i64,
        "the broker holds only {held} of the {produced} CDRs produced: librdkafka's mock cluster keeps at most \
         5 MB or 100 000 messages a partition and drops older ones. Produce fewer (--count, or --mails in \
         smtp) or use more --partitions (BENCHMARKS.md: ingest --count 100000 --partitions 12)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A topic filled beyond the mock cluster's retention is refused with what to do,
    /// not waited on; one within it passes. `fill` counts only what the broker
    /// acknowledged.
    #[test]
    fn a_topic_filled_beyond_the_mock_cluster_s_retention_is_refused_with_what_to_do() {
        let kafka = engine::embedded::EmbeddedKafka::start(&["fill"], 1).unwrap();
        let brokers = kafka.bootstrap_servers();
        let cdrs = |count| {
            (0..count).map(|_| Cdr { key: String::new(), payload: vec![b'x'; 100], expected: Vec::new(), fax: false })
        };
        // About 2.5 MB with the record overhead.
        assert_eq!(fill(brokers, "fill", cdrs(20_000)).unwrap(), 20_000);
        ensure_retained(brokers, "fill", 20_000).expect("within retention");
        // 40 000 more: past 5 MB in the one partition, though the broker took them all.
        assert_eq!(fill(brokers, "fill", cdrs(40_000)).unwrap(), 40_000);
        let refused = ensure_retained(brokers, "fill", 60_000).unwrap_err().to_string();
        assert!(refused.contains("--partitions") && refused.contains("of the 60000 CDRs"), "{refused}");
    }
}
