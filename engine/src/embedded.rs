//! The embedded Kafka: librdkafka's in-process mock cluster, which speaks the real Kafka
//! protocol. Used when `kafka.brokers` is empty (the demo, a first try) and by tests.
//! Also [`ensure_topics`], for the test and load-test brokers: the engine checks at
//! start that its topics exist and never creates them.
//!
//! The mock cluster is not `Send`, so it lives on a thread of its own until dropped.

use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaErrorCode;

/// Creates those of `topics` (name, partitions) that `brokers` does not have yet, each
/// with the cluster's default replication (`default.replication.factor`). A topic that
/// exists is left as it is.
pub async fn ensure_topics(brokers: &str, topics: &[(&str, i32)]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(-1))).collect();
    for result in admin.create_topics(&new, &AdminOptions::new()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(KafkaError::AdminOpCreation(format!("creating topic {name}: {code}"))),
        }
    }
    Ok(())
}

/// `kafka.state_topic` and `kafka.state_requests_topic` of the default configuration.
pub const STATE_TOPICS: [&str; 2] = ["callnotify-state", "callnotify-state-requests"];
/// `kafka.sent_topic` and `kafka.retry_topic` of the default configuration.
pub const CHANGELOG_TOPICS: [&str; 2] = ["callnotify-sent", "callnotify-retry"];

/// The names of the topics a cluster of nodes shares beside the CDR and dead-letter
/// topics (`kafka.state_topic`, `state_requests_topic`, `sent_topic`, `retry_topic`).
pub struct SharedTopics<'a> {
    pub state: &'a str,
    pub requests: &'a str,
    pub sent: &'a str,
    pub retry: &'a str,
}

/// Creates the shared topics on `brokers` unless they exist, as docs/cluster.md tells
/// an operator to: the state topics one partition each, the state compacted, the
/// requests kept a day, both taking records of faxes up to 16 MiB (docs/fax.md); the
/// changelogs `partitions` each, the sent records kept 8 days, the retry entries
/// compacted and taking a waiting fax mail's entry (its PDF attached) up to 32 MiB.
pub async fn ensure_shared_topics(brokers: &str, topics: &SharedTopics<'_>, partitions: i32) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let new = [
        NewTopic::new(topics.state, 1, TopicReplication::Fixed(-1))
            .set("cleanup.policy", "compact")
            .set("max.message.bytes", crate::fax::MESSAGE_MAX_BYTES),
        NewTopic::new(topics.requests, 1, TopicReplication::Fixed(-1))
            .set("retention.ms", "86400000")
            .set("max.message.bytes", crate::fax::MESSAGE_MAX_BYTES),
        NewTopic::new(topics.sent, partitions, TopicReplication::Fixed(-1)).set("retention.ms", "691200000"),
        NewTopic::new(topics.retry, partitions, TopicReplication::Fixed(-1))
            .set("cleanup.policy", "compact")
            .set("max.message.bytes", crate::fax::MESSAGE_MAX_BYTES),
    ];
    for result in admin.create_topics(&new, &AdminOptions::new()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(KafkaError::AdminOpCreation(format!("creating topic {name}: {code}"))),
        }
    }
    Ok(())
}

/// The mock cluster of an [`EmbeddedKafka`], as [`EmbeddedKafka::on_cluster`] hands it.
pub type Mock = MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// Something to do on the mock cluster's thread.
type OnCluster = Box<dyn FnOnce(&Mock) + Send>;

pub struct EmbeddedKafka {
    bootstrap: String,
    /// To the cluster's thread, which ends when this is dropped.
    commands: Option<mpsc::Sender<OnCluster>>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedKafka {
    /// Starts a one-broker cluster with `topics`, each of `partitions` partitions, and
    /// the state and changelog topics of the default configuration ([`STATE_TOPICS`],
    /// [`CHANGELOG_TOPICS`]).
    pub fn start(topics: &[&str], partitions: i32) -> Result<Self, KafkaError> {
        let topics: Vec<(&str, i32)> = topics
            .iter()
            .chain(&CHANGELOG_TOPICS)
            .map(|t| (*t, partitions))
            .chain(STATE_TOPICS.iter().map(|t| (*t, 1)))
            .collect();
        Self::start_with(&topics)
    }

    /// Starts a one-broker cluster with `topics` (name, partitions).
    pub fn start_with(topics: &[(&str, i32)]) -> Result<Self, KafkaError> {
        let topics: Vec<(String, i32)> = topics.iter().map(|(t, p)| (t.to_string(), *p)).collect();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (commands, commands_rx) = mpsc::channel::<OnCluster>();
        let thread = std::thread::Builder::new()
            .name("kafka-mock".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // Produce v10+ replies to a partition without a leader carry its current
                // leader (KIP-951), which librdkafka 2.12's mock reads through a null
                // pointer: a client producing there as its leader goes away (a test's
                // leaderless partition) crashed the process now and then. v9 has no such
                // field, and the engine needs none.
                if let Err(e) = cluster.apiversion(rdkafka::types::RDKafkaApiKey::Produce, Some(0), Some(9)) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                for (topic, partitions) in &topics {
                    if let Err(e) = cluster.create_topic(topic, *partitions, 1) {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Until the owner drops us (or goes away).
                while let Ok(command) = commands_rx.recv() {
                    command(&cluster);
                }
            })
            .expect("spawning the mock cluster thread");
        let bootstrap = ready_rx.recv().expect("mock cluster thread reports")?;
        Ok(Self { bootstrap, commands: Some(commands), thread: Some(thread) })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Runs `f` on the mock cluster (on its thread, since it is not `Send`) and returns
    /// once it has run: to have the cluster fail requests, say, as a broker would.
    pub fn on_cluster(&self, f: impl FnOnce(&Mock) + Send + 'static) {
        let (done_tx, done) = mpsc::channel();
        let command: OnCluster = Box::new(move |cluster| {
            f(cluster);
            let _ = done_tx.send(());
        });
        if let Some(commands) = &self.commands {
            if commands.send(command).is_ok() {
                let _ = done.recv();
            }
        }
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        drop(self.commands.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
