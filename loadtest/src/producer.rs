//! The load tester's Kafka producer, which counts what the broker acknowledged: a CDR
//! only counts as produced once it is in the broker, so a slow broker is not mistaken
//! for a slow engine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::producer::{BaseProducer, DeliveryResult, ProducerContext};
use rdkafka::ClientContext;

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
        .create_with_context(context)?;
    Ok((producer, acks))
}
