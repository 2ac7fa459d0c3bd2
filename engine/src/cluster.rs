//! The Kafka cluster as the engine meets it: one client configuration for every client
//! it makes (the consumers, the dead-letter producer, the start-up check), and the check
//! that the cluster answers and holds every topic the engine reads or writes before it
//! consumes anything.
//!
//! Why check: a CDR topic that does not exist is read as an empty one, and a missing
//! dead-letter topic holds its CDR's partition up for good. Both used to go unnoticed.
//! The check never creates a topic, also on a broker with
//! `auto.create.topics.enable=true`: its metadata requests ask for no creation, so a
//! missing topic is an error there too and the operator creates it, with the partitions
//! and replication they chose.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};

/// How long the check waits for the cluster's first answer: a broker that does not
/// answer by then (down, wrong address, wrong credentials, a certificate it refuses)
/// is an error at start, not a consumer that waits for ever.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// Settings what the engine promises rests on: no offset committed or stored before its
/// CDR is handled, no record confirmed before every in-sync replica has it, none
/// written twice, none skipped by a group new to its partition. Where a client sets
/// one, `kafka.properties` does not change it.
const KEPT: &[&str] =
    &["enable.auto.commit", "enable.auto.offset.store", "acks", "enable.idempotence", "auto.offset.reset"];

/// A client configuration for `brokers`: the client's `defaults`, then the operator's
/// `kafka.properties` (security settings among them) over them, but for the [`KEPT`]
/// settings a client sets (a property that tries is warned about and left out).
pub fn client_config(brokers: &str, defaults: &[(&str, &str)], properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in defaults.iter().copied() {
        config.set(key, value);
    }
    for (key, value) in properties {
        match defaults.iter().find(|(k, _)| k == key) {
            Some((_, kept)) if KEPT.contains(&key.as_str()) => {
                if kept != value {
                    tracing::warn!(key = %key, property = %value, kept, "kafka.properties sets a setting the engine's guarantees rest on: not applied");
                }
            }
            _ => {
                config.set(key, value);
            }
        }
    }
    config
}

/// How a part of the engine that makes its own Kafka clients reaches the cluster
/// (`kafka.brokers`, `kafka.properties`, `kafka.group_id`).
#[derive(Clone, Copy)]
pub struct Reach<'a> {
    pub brokers: &'a str,
    pub properties: &'a BTreeMap<String, String>,
    /// The engine's group; a part's own groups are named after it.
    pub group_id: &'a str,
}

impl Reach<'_> {
    /// A consumer's configuration: `defaults`, then `kafka.properties`.
    pub fn consumer(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        client_config(self.brokers, defaults, self.properties)
    }

    /// A producer's configuration: `defaults`, then `kafka.properties` a producer reads.
    pub fn producer(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        client_config(self.brokers, defaults, &producer_properties(self.properties))
    }
}

/// librdkafka properties only a consumer reads (librdkafka's CONFIGURATION.md, "C").
/// `kafka.properties` serves both clients; a producer given these logs a CONFWARN for
/// each at every start, noise that hides the warnings that matter.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
    "auto.offset.reset",
];

/// Whether Kafka refused a record for its size (librdkafka before sending it, or the
/// broker by the topic's `max.message.bytes`).
pub fn too_large(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
}

/// `properties` without the consumer-only ones: what a producer is given.
pub fn producer_properties(properties: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    properties
        .iter()
        .filter(|(k, _)| !CONSUMER_ONLY.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What the start-up check found wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the Kafka cluster at {brokers} did not answer within {} s: {cause}", ANSWER_WITHIN.as_secs())]
    Unreachable { brokers: String, cause: String },
    #[error(
        "topic {topic:?} ({key}) does not exist on the Kafka cluster: create it first (the engine never creates topics)"
    )]
    MissingTopic { topic: String, key: String },
    #[error("topic {topic:?} ({key}) cannot be used: {code}")]
    TopicError { topic: String, key: String, code: RDKafkaErrorCode },
    #[error("topic {topic:?} ({key}) has {found} partitions; it must have exactly one (docs/cluster.md)")]
    NotOnePartition { topic: String, key: String, found: usize },
    #[error("topic {topic:?} ({key}) has {found} partitions, fewer than CDR topic {cdr:?} ({wanted}): it needs at least as many (docs/cluster.md)")]
    TooFewPartitions { topic: String, key: String, found: usize, cdr: String, wanted: usize },
    #[error("creating a Kafka client: {0}")]
    Client(#[from] KafkaError),
}

/// Keeps what librdkafka says went wrong while the check waits: authentication and TLS
/// failures reach a client only as log lines and error events, never as the answer to
/// the request that timed out.
#[derive(Default)]
struct Witness {
    failures: Mutex<Vec<String>>,
}

impl Witness {
    fn note(&self, failure: String) {
        let mut failures = self.failures.lock().expect("witness lock");
        if !failures.contains(&failure) && failures.len() < 4 {
            failures.push(failure);
        }
    }
}

impl ClientContext for Witness {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        use RDKafkaLogLevel::{Alert, Critical, Emerg, Error, Warning};
        if matches!(level, Emerg | Alert | Critical | Error | Warning) {
            self.note(log_message.to_owned());
        }
        tracing::debug!(target: "librdkafka", fac, "{log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.note(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for Witness {}

/// Asks the cluster for each of `topics` (name, the config key that names it) and fails
/// on the first one it does not have, naming the topic and the key. Blocking: call it
/// off the async runtime.
pub fn check_topics(config: &ClientConfig, topics: &[(&str, &str)]) -> Result<(), ClusterError> {
    let mut config = config.clone();
    // Asking must never create: a consumer's default, made sure of.
    config.set("allow.auto.create.topics", "false");
    let client: BaseConsumer<Witness> = config.create_with_context(Witness::default())?;
    let brokers = config.get("bootstrap.servers").unwrap_or_default().to_owned();
    let unreachable = |client: &BaseConsumer<Witness>, e: KafkaError| {
        // Error events wait in the client's queue until it is polled.
        let _ = client.poll(Duration::ZERO);
        let failures = client.context().failures.lock().expect("witness lock").join("; ");
        let cause = if failures.is_empty() { e.to_string() } else { failures };
        ClusterError::Unreachable { brokers: brokers.clone(), cause }
    };
    for (topic, key) in topics {
        let metadata = client.fetch_metadata(Some(topic), ANSWER_WITHIN).map_err(|e| unreachable(&client, e))?;
        let found = metadata.topics().iter().find(|t| t.name() == *topic);
        let error = found.map_or(Some(RDKafkaErrorCode::UnknownTopicOrPartition), |t| t.error().map(Into::into));
        match error {
            None => {}
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                return Err(ClusterError::MissingTopic { topic: topic.to_string(), key: key.to_string() })
            }
            Some(code) => {
                return Err(ClusterError::TopicError { topic: topic.to_string(), key: key.to_string(), code })
            }
        }
    }
    Ok(())
}

/// Checks that each of `topics` (name, config key) has exactly one partition: the state
/// topics, whose single order of writes is what makes them correct.
pub fn check_one_partition(config: &ClientConfig, topics: &[(&str, &str)]) -> Result<(), ClusterError> {
    let client: BaseConsumer = config.create()?;
    for (topic, key) in topics {
        let metadata = client.fetch_metadata(Some(topic), ANSWER_WITHIN)?;
        let found = metadata.topics().iter().find(|t| t.name() == *topic).map_or(0, |t| t.partitions().len());
        if found != 1 {
            return Err(ClusterError::NotOnePartition { topic: topic.to_string(), key: key.to_string(), found });
        }
    }
    Ok(())
}

/// Checks that each changelog topic of `changelogs` (name, config key) has at least as
/// many partitions as every topic of `cdrs`: a CDR partition's records go to the
/// changelog partition of the same number.
pub fn check_partitions_cover(
    config: &ClientConfig,
    changelogs: &[(&str, &str)],
    cdrs: &[&str],
) -> Result<(), ClusterError> {
    let client: BaseConsumer = config.create()?;
    let count = |topic: &str| -> Result<usize, ClusterError> {
        let metadata = client.fetch_metadata(Some(topic), ANSWER_WITHIN)?;
        Ok(metadata.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len()))
    };
    let mut widest = ("", 0);
    for cdr in cdrs {
        let n = count(cdr)?;
        if n > widest.1 {
            widest = (cdr, n);
        }
    }
    for (topic, key) in changelogs {
        let found = count(topic)?;
        if found < widest.1 {
            return Err(ClusterError::TooFewPartitions {
                topic: topic.to_string(),
                key: key.to_string(),
                found,
                cdr: widest.0.to_owned(),
                wanted: widest.1,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::EmbeddedKafka;

    /// The operator's `kafka.properties` serve the consumers and the dead-letter
    /// producer: the producer gets the ones it reads (security among them) and no
    /// consumer-only ones, for which it logged a CONFWARN each at every start.
    #[test]
    fn the_producer_is_not_given_consumer_properties() {
        let properties: BTreeMap<String, String> = [
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "500"),
            ("max.poll.interval.ms", "10000"),
            ("fetch.wait.max.ms", "20"),
            ("security.protocol", "plaintext"),
            ("client.id", "callnotify-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let given = producer_properties(&properties);
        assert_eq!(given.keys().map(String::as_str).collect::<Vec<_>>(), ["client.id", "security.protocol"]);
    }

    /// docs/kafka.md: `kafka.properties` tunes the clients, but does not undo what the
    /// engine's guarantees rest on (a commit only after its mail, `acks=all`,
    /// idempotence): `"acks" = "1"` made every client confirm what one broker had.
    #[test]
    fn the_operator_s_properties_do_not_undo_the_settings_the_guarantees_rest_on() {
        let properties: BTreeMap<String, String> =
            [("acks", "1"), ("enable.auto.commit", "true"), ("linger.ms", "50"), ("enable.idempotence", "false")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        let config = client_config(
            "localhost:9092",
            &[("acks", "all"), ("enable.auto.commit", "false"), ("linger.ms", "5")],
            &properties,
        );
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        assert_eq!(config.get("linger.ms"), Some("50"), "what only tunes is the operator's");
        assert_eq!(config.get("enable.idempotence"), Some("false"), "a client that does not set it takes the property");
    }

    #[test]
    fn a_missing_topic_is_named_with_its_config_key_and_present_ones_pass() {
        let cluster = EmbeddedKafka::start(&["cdr", "cdr-dead-letter"], 1).expect("mock cluster");
        let config = client_config(cluster.bootstrap_servers(), &[], &BTreeMap::new());
        check_topics(&config, &[("cdr", "kafka.topics"), ("cdr-dead-letter", "kafka.dead_letter_topic")])
            .expect("both exist");
        let err = check_topics(&config, &[("cdr", "kafka.topics"), ("dl-typo", "kafka.dead_letter_topic")])
            .expect_err("dl-typo is missing");
        let text = err.to_string();
        assert!(text.contains("\"dl-typo\"") && text.contains("kafka.dead_letter_topic"), "{text}");
    }

    #[test]
    fn a_cluster_that_does_not_answer_is_an_error_within_the_wait_not_a_hang() {
        let port = testkit::closed_port().unwrap();
        let closed = port.addr;
        let config = client_config(&closed.to_string(), &[], &BTreeMap::new());
        let started = std::time::Instant::now();
        let err = check_topics(&config, &[("cdr", "kafka.topics")]).expect_err("no cluster there");
        assert!(matches!(err, ClusterError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains(&closed.to_string()), "names the brokers: {err}");
        assert!(started.elapsed() < ANSWER_WITHIN + Duration::from_secs(5), "gave up after the wait");
    }
}
