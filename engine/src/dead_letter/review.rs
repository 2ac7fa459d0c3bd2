//! The operator's side of the dead-letter topic: [`list`] its records, and [`replay`] the
//! CDRs among them into the topics they came from once their cause is fixed (a wrong
//! `kafka.topics` format, a decoder fixed in a new version). Mail records are handed back
//! to the caller, which queues each record's `entry` in the engine's retry queue (the
//! store is the engine's: `callnotify dead-letters replay` does it with `serve` stopped)
//! and then [`mark`]s it.
//!
//! A replay is idempotent: after each record is replayed, a marker record
//! (`{"kind":"replayed","partition":…,"offset":…}`) goes to the dead-letter topic, and
//! records with a marker are not replayed again. A crash between the two replays that
//! record once more; its mails are sent once all the same (the sent records, and a mail
//! keeps its Message-ID). A CDR that still does not decode is dead-lettered again, as a
//! new record.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

mod read;

use read::read;

/// The header a replayed CDR carries: the dead-letter record it came from.
pub const REPLAYED_FROM: &str = "callnotify-replayed-from";

/// How long reading the topic may go without a record, or a replayed record's delivery
/// may take.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the dead letters need a Kafka cluster (kafka.brokers): the embedded mock cluster lives inside `serve`")]
    NoCluster,
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the dead-letter topic {topic} does not exist (kafka.dead_letter_topic)")]
    NoTopic { topic: String },
    #[error("the dead-letter topic {topic} was not read to its end: no record came for {TIMEOUT:?}{last}")]
    Slow { topic: String, last: String },
    #[error("kafka, for good: {0}")]
    Fatal(String),
    /// The cluster refused a record sent (no write permission, too large, no such
    /// partition).
    #[error("kafka refused the record: {0}")]
    Refused(rdkafka::error::KafkaError),
}

/// Which records to look at.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// `cdr` or `mail`.
    pub kind: Option<String>,
    /// Written at or after.
    pub since: Option<DateTime<Utc>>,
    /// Part of the reason (a CDR's) or the mail server's reply (a mail's).
    pub reason: Option<String>,
}

/// One record of the dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Letter {
    pub partition: i32,
    pub offset: i64,
    /// The record as written (see docs/delivery.md for its fields).
    pub record: serde_json::Value,
    /// Whether it was replayed already.
    pub replayed: bool,
}

impl Letter {
    pub fn kind(&self) -> &str {
        self.record["kind"].as_str().unwrap_or("")
    }

    /// The CDR's reason, or the mail server's reply.
    pub fn reason(&self) -> &str {
        self.record["reason"].as_str().or(self.record["smtp_reply"].as_str()).unwrap_or("")
    }

    fn at(&self) -> Option<DateTime<Utc>> {
        self.record["at"].as_str().and_then(|at| DateTime::parse_from_rfc3339(at).ok()).map(|at| at.to_utc())
    }

    fn matches(&self, filter: &Filter) -> bool {
        filter.kind.as_deref().is_none_or(|kind| kind == self.kind())
            && filter.since.is_none_or(|since| self.at().is_some_and(|at| at >= since))
            && filter.reason.as_deref().is_none_or(|part| self.reason().contains(part))
    }
}

/// Every record of `topic` that `filter` lets through, in partition and offset order
/// (markers of replays are not listed; they mark the records they name).
pub fn list(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    filter: &Filter,
) -> Result<Vec<Letter>, ReviewError> {
    let (letters, replayed) = read(brokers, properties, topic, filter, TIMEOUT)?;
    Ok(letters
        .into_iter()
        .map(|letter| Letter { replayed: replayed.contains(&(letter.partition, letter.offset)), ..letter })
        .collect())
}

/// What a replay did.
#[derive(Debug, Default, PartialEq)]
pub struct Replay {
    /// CDRs put back into their topics (with `dry_run`: that would be).
    pub replayed: Vec<(i32, i64)>,
    /// Records replayed before: left alone.
    pub already: usize,
    /// Mail records not replayed yet, for the caller to queue and [`mark`].
    pub mails: Vec<Letter>,
    /// Records that cannot be replayed (partition, offset, why): left alone, the others
    /// replayed.
    pub unreplayable: Vec<(i32, i64, String)>,
    /// CDRs the judge held back (partition, offset, why): not put back, not marked, for
    /// a replay once their engines would notify them.
    pub held_back: Vec<(i32, i64, String)>,
    /// CDRs put back whose marker the cluster refused (partition, offset, why): a next
    /// replay puts them back again. A marker refused for good stops the CDRs' step after
    /// it (its why says so).
    pub unmarked: Vec<(i32, i64, String)>,
}

/// Puts the CDRs of the records `filter` lets through back into the topics and
/// partitions they were read from, each with a [`REPLAYED_FROM`] header, and marks each
/// as replayed; with `dry_run`, only says which. A CDR `judge` says why not to put back
/// (its source topic, its bytes) is held back, named.
pub fn replay(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    filter: &Filter,
    dry_run: bool,
    judge: &dyn Fn(&str, &[u8]) -> Option<String>,
) -> Result<Replay, ReviewError> {
    let letters = list(brokers, properties, topic, filter)?;
    let mut done = Replay::default();
    let new_producer = || -> Result<BaseProducer<Deliveries>, ReviewError> {
        let config = crate::cluster::client_config(
            brokers,
            &[
                ("enable.idempotence", "true"),
                ("allow.auto.create.topics", "false"),
                // A fax record goes back as it came, up to the size docs/fax.md sets topics up for.
                ("message.max.bytes", crate::fax::MESSAGE_MAX_BYTES),
            ],
            &crate::cluster::producer_properties(properties),
        );
        Ok(config.create_with_context(Deliveries::default())?)
    };
    let mut producer = new_producer()?;
    for letter in letters {
        if letter.replayed {
            done.already += 1;
            continue;
        }
        if letter.kind() == "mail" {
            done.mails.push(letter);
            continue;
        }
        let (source, partition, raw) = match replayable(&letter) {
            Ok(found) => found,
            Err(why) => {
                done.unreplayable.push((letter.partition, letter.offset, why));
                continue;
            }
        };
        if let Some(why) = judge(source, &raw) {
            done.held_back.push((letter.partition, letter.offset, why));
            continue;
        }
        if !dry_run {
            let from = format!("{topic}/{}/{}", letter.partition, letter.offset);
            let headers = OwnedHeaders::new().insert(Header { key: REPLAYED_FROM, value: Some(from.as_bytes()) });
            let record = BaseRecord::<(), [u8]>::to(source).partition(partition).payload(&raw).headers(headers);
            match send(&producer, record) {
                Ok(()) => {}
                Err(ReviewError::Refused(e)) => {
                    done.unreplayable.push((letter.partition, letter.offset, format!("not put back: {e}")));
                    // An idempotent producer refuses every record after a refusal.
                    producer = new_producer()?;
                    continue;
                }
                Err(e) => return Err(e),
            }
            match write_marker(&producer, topic, &letter) {
                Ok(()) => {}
                // Put back, but a next replay would put it back again (the sent records
                // keep its mails to one each): said.
                // One refused for good (no write permission on the dead-letter topic)
                // would be refused for every CDR: the replay stops, putting back no more
                // CDRs that a replay after the fix would put back again.
                Err(ReviewError::Refused(e)) if e.rdkafka_error_code().is_some_and(never_mends) => {
                    let why = format!("{e}; the replay stopped here, the CDR records after it left as they are");
                    done.unmarked.push((letter.partition, letter.offset, why));
                    break;
                }
                Err(ReviewError::Refused(e)) => {
                    done.unmarked.push((letter.partition, letter.offset, e.to_string()));
                    producer = new_producer()?;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        done.replayed.push((letter.partition, letter.offset));
    }
    Ok(done)
}

/// Where the CDR of `letter` goes back and its bytes; why it cannot be replayed.
fn replayable(letter: &Letter) -> Result<(&str, i32, Vec<u8>), String> {
    let source = letter.record["topic"].as_str().ok_or("no source topic")?;
    let partition = letter.record["partition"].as_i64().ok_or("no source partition")? as i32;
    if let Some(left_out) = letter.record["raw_left_out"].as_str() {
        return Err(format!("its record was not kept: {left_out}"));
    }
    let raw = letter.record["raw_base64"]
        .as_str()
        .and_then(|raw| base64::engine::general_purpose::STANDARD.decode(raw).ok())
        .ok_or("no raw CDR")?;
    Ok((source, partition, raw))
}

/// Marks `letter` (a mail record the caller has queued again) as replayed.
pub fn mark(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    letter: &Letter,
) -> Result<(), ReviewError> {
    let producer: BaseProducer<Deliveries> =
        crate::cluster::client_config(brokers, &[], &crate::cluster::producer_properties(properties))
            .create_with_context(Deliveries::default())?;
    write_marker(&producer, topic, letter)
}

fn write_marker(producer: &BaseProducer<Deliveries>, topic: &str, letter: &Letter) -> Result<(), ReviewError> {
    let marker = serde_json::json!({
        "kind": "replayed",
        "partition": letter.partition,
        "offset": letter.offset,
        "at": Utc::now().to_rfc3339(),
    })
    .to_string();
    let key = format!("replayed/{topic}/{}/{}", letter.partition, letter.offset);
    send(producer, BaseRecord::<str, str>::to(topic).key(&key).payload(&marker))
}

/// Sends one record and waits until the cluster has it: [`ReviewError::Refused`] if
/// it refused it.
fn send<K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(
    producer: &BaseProducer<Deliveries>,
    record: BaseRecord<'_, K, P>,
) -> Result<(), ReviewError> {
    producer.send(record).map_err(|(e, _)| e)?;
    producer.flush(TIMEOUT)?;
    match producer.context().refused.lock().expect("deliveries lock").take() {
        Some(e) => Err(ReviewError::Refused(e)),
        None => Ok(()),
    }
}

/// The producer's delivery reports: a flush returns once every record is answered,
/// refused ones too, so the refusal is kept for [`send`] to see.
#[derive(Default)]
struct Deliveries {
    refused: std::sync::Mutex<Option<rdkafka::error::KafkaError>>,
}

impl rdkafka::ClientContext for Deliveries {}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            *self.refused.lock().expect("deliveries lock") = Some(e.clone());
        }
    }
}

/// Whether an error reading the dead letters, or refusing a replay's marker, is one no
/// retry mends: the tool's user may not read or write the topic, the topic went away.
fn never_mends(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        code,
        Code::TopicAuthorizationFailed
            | Code::GroupAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::SaslAuthenticationFailed
            | Code::Authentication
            | Code::UnknownTopicOrPartition
            | Code::UnknownTopic
            | Code::UnknownPartition
    )
}
