//! Dead letters: undecodable CDRs and mails refused for good, as JSON records on the
//! dead-letter topic (R-M4: failures are recorded and visible to operators).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::decode::CdrFormat;
use crate::error_event::ErrorEvent;
use crate::render::{Mail, Origin};
use crate::telemetry::Metrics;

pub mod review;

/// Writes dead-letter records: undecodable CDRs and mails refused for good. Each is
/// retried until the broker takes it, since the CDR's offset waits for it. A write the
/// broker has not confirmed within the producer's `message.timeout.ms` (5 s unless
/// `kafka.properties` says otherwise) is logged at ERROR with the topic, counted in
/// `callnotify_dead_letter_write_errors_total`, and tried again.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: Arc<str>,
    metrics: Metrics,
}

impl DeadLetters {
    pub fn new(producer: FutureProducer, topic: &str, metrics: Metrics) -> Self {
        Self { producer, topic: topic.into(), metrics }
    }

    /// Records a CDR that did not decode, with its raw bytes (base64) and the reason.
    pub async fn cdr_rejected(&self, cdr: &RejectedCdr) {
        let key = format!("{}/{}/{}", cdr.source, cdr.partition, cdr.offset);
        self.publish(&key, cdr.record(), false).await;
    }

    /// Records a mail the server refused for good (R-M4); `entry`: the mail as a
    /// retry-queue entry, for a replay.
    pub async fn mail_failed(
        &self,
        mail: &Mail,
        origin: &Origin,
        reply: &str,
        attempts: u32,
        entry: serde_json::Value,
    ) {
        let record = serde_json::json!({
            "kind": "mail",
            "call_id": origin.call_id,
            "called": origin.called.as_str(),
            "recipient": mail.recipient.as_str(),
            "message_id": mail.message_id,
            "smtp_reply": reply,
            "attempts": attempts,
            "at": chrono::Utc::now().to_rfc3339(),
            "entry": entry,
        });
        self.publish(&origin.call_id, record, true).await;
    }

    /// Writes `record`, tried again until the broker takes it (its CDR's offset waits).
    /// One refused for its size (a topic of the broker's default 1 MB, a fax mail with
    /// its PDF) is written without its bulk ([`leave_out_the_bulk`]): tried again as it
    /// was, it would be refused for ever.
    async fn publish(&self, key: &str, mut record: serde_json::Value, mail: bool) {
        let mut payload = record.to_string();
        let mut delay = Duration::from_millis(200);
        loop {
            let sent = self
                .producer
                .send(FutureRecord::to(&self.topic).key(key).payload(&payload), Duration::from_secs(10))
                .await;
            match sent {
                Ok(_) => {
                    self.metrics.dead_letter(mail);
                    return;
                }
                Err((e, _))
                    if crate::cluster::too_large(&e) && leave_out_the_bulk(&mut record, payload.len(), &self.topic) =>
                {
                    tracing::warn!(topic = %self.topic, key, bytes = payload.len(), error = %e,
                        "a dead letter too large for its topic: written without the record or mail it carried");
                    payload = record.to_string();
                }
                Err((e, _)) => {
                    self.metrics.dead_letter_write_failed(mail);
                    crate::error_event!(
                        self.metrics,
                        ErrorEvent::DeadLetterWrite,
                        topic = %self.topic,
                        key,
                        error = %e,
                        retry_in = ?delay,
                        "dead-letter record not written yet; its CDR stays uncommitted until it is"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// Takes the raw record (a CDR's dead letter) or the mail (a mail's) out of `record`,
/// a dead letter of `bytes` its topic refused, saying so in its place; whether there was
/// one to take out. A mail record then has no mail for a replay to send again (it says
/// so); its Message-ID, recipient and reply stay.
fn leave_out_the_bulk(record: &mut serde_json::Value, bytes: usize, topic: &str) -> bool {
    let why = format!(
        "left out: the dead letter was {bytes} bytes with it, more than {topic} takes (its max.message.bytes, \
         docs/kafka.md; 32 MiB at most)"
    );
    if record.get("raw_base64").is_some() {
        record.as_object_mut().map(|r| r.remove("raw_base64"));
        let at = format!("{}/{}/{}", record["topic"].as_str().unwrap_or("?"), record["partition"], record["offset"]);
        record["raw_left_out"] = format!("{why}: read it at {at} while the topic keeps it").into();
        return true;
    }
    match record.get_mut("entry").and_then(|entry| entry.as_object_mut()) {
        Some(entry) if entry.contains_key("mail_base64") => {
            entry.remove("mail_base64");
            entry.insert("mail_left_out".into(), why.into());
            true
        }
        _ => false,
    }
}

/// The largest record a dead letter carries whole (base64, in `raw_base64`): 16 MiB, the
/// largest fax record docs/fax.md sets topics up for, 21.3 MiB in base64, within the
/// 32 MiB the engine writes. A larger one is left out with its size: with it the dead
/// letter could never be written, and its partition would commit nothing again.
pub const RAW_KEPT_AT_MOST: usize = 16 << 20;

/// A record of CDR topic `source` that did not decode, and why.
pub struct RejectedCdr {
    pub source: String,
    pub partition: i32,
    pub offset: i64,
    pub format: CdrFormat,
    pub error: String,
    pub raw: Vec<u8>,
}

impl RejectedCdr {
    /// Its dead letter.
    fn record(&self) -> serde_json::Value {
        let RejectedCdr { source, partition, offset, format, error, raw } = self;
        let mut record = serde_json::json!({
            "kind": "cdr",
            "topic": source,
            "partition": partition,
            "offset": offset,
            "format": format.as_str(),
            "reason": error,
            "at": chrono::Utc::now().to_rfc3339(),
        });
        if raw.len() <= RAW_KEPT_AT_MOST {
            record["raw_base64"] = base64::engine::general_purpose::STANDARD.encode(raw).into();
        } else {
            record["raw_left_out"] = format!(
                "{} bytes, more than a dead letter carries ({} MiB): read it at {source}/{partition}/{offset} while the topic keeps it",
                raw.len(),
                RAW_KEPT_AT_MOST >> 20
            )
            .into();
        }
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/fax.md: a record that fails goes to the dead letters and its partition goes
    /// on. A fax record of 25 MiB (a topic set up for 32 MiB takes it) made a dead letter
    /// of 33 MiB, which the producer refused again and again, so the partition committed
    /// nothing more. Past 16 MiB the raw record is left out, with its size and where it is.
    #[test]
    fn r_m4_a_dead_letter_of_a_record_too_large_to_carry_names_it_instead_and_fits() {
        let rejected = |source: &str, partition, offset, format, error: &str, raw: Vec<u8>| {
            RejectedCdr { source: source.into(), partition, offset, format, error: error.into(), raw }.record()
        };
        let record = rejected("fax", 2, 41, CdrFormat::Fax, "page 1 is damaged", vec![b'x'; 25 << 20]);
        let written = record.to_string().len();
        let limit: usize = crate::fax::MESSAGE_MAX_BYTES.parse().unwrap();
        assert!(written < limit, "{written} bytes");
        assert!(record.get("raw_base64").is_none());
        assert!(
            record["raw_left_out"].as_str().unwrap().contains("26214400 bytes")
                && record["raw_left_out"].as_str().unwrap().contains("fax/2/41")
        );

        let small = rejected("cdr", 0, 7, CdrFormat::Canonical, "not JSON", b"{oops".to_vec());
        assert_eq!(small["raw_base64"], "e29vcHM=", "a record within the bound is kept whole");
    }

    /// R-M4, docs/kafka.md: a dead-letter topic keeps the broker's default record size
    /// (1 MB). A fax mail with its PDF attached (about 600 KB) refused for good made a
    /// dead letter of 1.1 MB, the mail base64 once more, which the broker refused again
    /// and again: the mail's other recipients waited, and its partition committed nothing
    /// more. Refused for its size, the dead letter is written without the mail, saying so.
    #[tokio::test]
    async fn r_m4_a_mail_dead_letter_too_large_for_its_topic_is_written_without_the_mail() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::Message;
        let kafka = crate::embedded::EmbeddedKafka::start(&["dl"], 1).unwrap();
        // A producer that takes records of 1 MB at most, as a topic of the default size.
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .set("message.max.bytes", "1000000")
            .set("message.timeout.ms", "5000")
            .create()
            .unwrap();
        let letters = DeadLetters::new(producer, "dl", Metrics::new());
        let recipient = crate::address::DestinationAddress::parse("taro@example.jp").unwrap();
        let to = crate::render::recipient_address(&recipient);
        let envelope = lettre::address::Envelope::new(Some("no-reply@example.jp".parse().unwrap()), vec![to]).unwrap();
        // A mail with a PDF of 600 KB attached, base64 in the mail.
        let bytes = vec![b'x'; 800_000];
        let mail = Mail { message_id: "<call-1.0@example.jp>".into(), recipient, envelope, bytes };
        let called = crate::phone::PhoneNumber::parse("0312345678").unwrap();
        let origin = Origin { call_id: "call-1".into(), called, ended_at: chrono::Utc::now(), source: None };
        let mail_base64 = base64::engine::general_purpose::STANDARD.encode(&mail.bytes);
        let entry = serde_json::json!({"mail_base64": mail_base64, "attempts": 1});
        let written = tokio::time::timeout(
            Duration::from_secs(60),
            letters.mail_failed(&mail, &origin, "550 no such user", 1, entry),
        )
        .await;
        assert!(written.is_ok(), "the dead letter was never written");

        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .set("group.id", "read")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        consumer.subscribe(&["dl"]).unwrap();
        let record = loop {
            if let Some(message) = consumer.poll(Duration::from_secs(10)) {
                break serde_json::from_slice::<serde_json::Value>(message.unwrap().payload().unwrap()).unwrap();
            }
        };
        assert_eq!(
            (record["kind"].as_str(), record["message_id"].as_str()),
            (Some("mail"), Some(mail.message_id.as_str()))
        );
        assert!(record["entry"].get("mail_base64").is_none(), "{record}");
        let left_out = record["entry"]["mail_left_out"].as_str().unwrap();
        assert!(left_out.starts_with("left out") && left_out.contains("more than dl takes"), "{left_out}");
    }
}
