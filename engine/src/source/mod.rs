//! Source stage: the Kafka consumer, on a thread of its own, and the bookkeeping that
//! makes delivery at-least-once.
//!
//! The consumer thread polls a [`BaseConsumer`] and runs decode → resolve → filter →
//! render itself: these are CPU work plus, on a cache miss, a sled read, which is why
//! they run here and not on an async worker. Mails go to delivery tasks on the tokio
//! runtime; each reports back a [`Completion`].
//!
//! Offsets follow the rust-rdkafka at-least-once recipe, `enable.auto.offset.store=false`:
//! an offset is stored only when its CDR and every earlier CDR of the partition are
//! finished (mails accepted, refused for good, or durably queued for retry; dead letters
//! written). The thread commits stored offsets itself every [`COMMIT_INTERVAL`], right
//! after flushing the store, so a committed offset never runs ahead of the sent-mail
//! records on disk, whatever kills the process. On revocation and on shutdown the
//! thread waits, up to the grace period, for in-flight work, then flushes and commits.

mod context;
mod offsets;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;

pub use self::context::SourceContext;
use self::offsets::Completion;
use crate::dead_letter::DeadLetters;
use crate::decode::CdrFormat;
use crate::deliver::Deliverer;
use crate::pipeline::{classify, Verdict};
use crate::render::Renderer;
use crate::resolve::Resolver;
use crate::store::{SentKey, StoreError};
use crate::telemetry::Metrics;

/// What the consumer thread hands work to.
#[derive(Clone)]
pub struct Stages {
    pub resolver: Resolver,
    pub renderer: Renderer,
    pub deliverer: Deliverer,
    pub dead_letters: DeadLetters,
    pub metrics: Metrics,
    /// Where delivery tasks run.
    pub runtime: tokio::runtime::Handle,
}

/// Told to delivery tasks when shutdown's grace period is over: they stop at once and
/// report nothing, so their CDRs are read again on the next start.
#[derive(Clone)]
struct Cancel(tokio::sync::watch::Receiver<bool>);

impl Cancel {
    async fn cancelled(mut self) {
        let _ = self.0.wait_for(|c| *c).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("subscription store: {0}")]
    Store(#[from] StoreError),
}

/// How often stored offsets are committed, each time after a store flush.
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Consumer settings that make the offset bookkeeping above correct.
pub struct SourceOptions<'a> {
    pub brokers: &'a str,
    pub group_id: &'a str,
    pub topics: Vec<(String, CdrFormat)>,
    pub properties: &'a std::collections::BTreeMap<String, String>,
    pub max_in_flight: usize,
    pub grace: Duration,
}

/// Starts the consumer thread; it runs until `stop` is set, then finishes in-flight
/// work (up to the grace period), commits and returns.
pub fn spawn(
    options: SourceOptions<'_>,
    stages: Stages,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<(), SourceError>>, SourceError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let context = SourceContext {
        metrics: stages.metrics.clone(),
        topics: options.topics.clone(),
        store: stages.resolver.store().clone(),
        grace: options.grace,
        tracker: Mutex::default(),
        completions: Mutex::new(rx),
    };
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", options.brokers)
        .set("group.id", options.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // A notification is worth little late: do not let an idle fetch sit for
        // librdkafka's default 500 ms (kafka.properties may override).
        .set("fetch.wait.max.ms", "20")
        .set("statistics.interval.ms", "5000");
    for (k, v) in options.properties {
        config.set(k, v);
    }
    let consumer: BaseConsumer<SourceContext> = config.create_with_context(context)?;
    let names: Vec<&str> = options.topics.iter().map(|(t, _)| t.as_str()).collect();
    consumer.subscribe(&names)?;
    let max_in_flight = options.max_in_flight;
    let grace = options.grace;
    let thread = std::thread::Builder::new()
        .name("cdr-source".into())
        .spawn(move || {
            // The stages hold runtime-bound parts (timers, task handles); this thread
            // runs inside the runtime's context so using and dropping them here works.
            let runtime = stages.runtime.clone();
            let _entered = runtime.enter();
            let result = run(consumer, &stages, tx, stop, max_in_flight, grace);
            drop(stages);
            result
        })
        .expect("spawning the consumer thread");
    Ok(thread)
}

fn run(
    consumer: BaseConsumer<SourceContext>,
    stages: &Stages,
    tx: Sender<Completion>,
    stop: Arc<AtomicBool>,
    max_in_flight: usize,
    grace: Duration,
) -> Result<(), SourceError> {
    let ctx = consumer.context();
    let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
    let cancel = Cancel(cancel_rx);
    let mut paused = false;
    let mut last_commit = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            ctx.commit(&consumer, CommitMode::Async)?;
            last_commit = Instant::now();
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => handle(&consumer, stages, &tx, &cancel, &message)?,
            Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
            None => {}
        }
        ctx.drain(&consumer)?;
        // Backpressure: a slow mail server pauses fetching instead of piling up work;
        // polling goes on so the group membership stays alive. Fetching resumes at half
        // the limit, since every resume costs a re-fetch.
        let in_flight = ctx.tracker.lock().expect("tracker lock").in_flight;
        if !paused && in_flight >= max_in_flight {
            consumer.pause(&consumer.assignment()?)?;
            paused = true;
            tracing::info!(in_flight, "consumer paused until mails drain");
        } else if paused && in_flight <= max_in_flight / 2 {
            // librdkafka drops what it had fetched ahead at the pause and fetches again
            // from the first message not yet handed to us.
            consumer.resume(&consumer.assignment()?)?;
            paused = false;
            tracing::info!(in_flight, "consumer resumed");
        }
    }
    let finished = ctx.settle(&consumer, None, Instant::now() + grace)?;
    ctx.drain(&consumer)?;
    if !finished {
        let left = ctx.tracker.lock().expect("tracker lock").in_flight;
        tracing::warn!(in_flight = left, "shutdown grace period over; those CDRs will be read again on restart");
    }
    // What is still in flight is abandoned: its offsets stay uncommitted, and closing
    // the consumer below must not wait for it again.
    let _ = cancel_tx.send(true);
    let mut tracker = ctx.tracker.lock().expect("tracker lock");
    tracker.partitions.clear();
    tracker.in_flight = 0;
    drop(tracker);
    ctx.commit(&consumer, CommitMode::Sync)?;
    tracing::info!("consumer stopped; offsets committed");
    Ok(())
}

/// One message through decode → resolve → filter → render, handing mails to a task.
fn handle(
    consumer: &BaseConsumer<SourceContext>,
    stages: &Stages,
    tx: &Sender<Completion>,
    cancel: &Cancel,
    message: &rdkafka::message::BorrowedMessage<'_>,
) -> Result<(), SourceError> {
    let ctx = consumer.context();
    stages.metrics.consumed();
    let Some(topic) = ctx.topic_index(message.topic()) else {
        return Ok(());
    };
    let (partition, offset) = (message.partition(), message.offset());
    let tp = (topic, partition);
    let format = ctx.topics[topic].1;
    let payload = message.payload().unwrap_or_default();
    let (call, subscription) = match classify(format, payload, &stages.resolver)? {
        Verdict::Notify { call, subscription } => (call, subscription),
        Verdict::Filtered(skip) => {
            stages.metrics.decoded();
            stages.metrics.filtered(skip);
            let safe = ctx.tracker.lock().expect("tracker lock").finished(tp, offset);
            if let Some(offset) = safe {
                ctx.store_offset(consumer, tp, offset);
            }
            return Ok(());
        }
        Verdict::Rejected(e) => {
            stages.metrics.rejected(e.reason());
            tracing::warn!(topic = message.topic(), partition, offset, error = %e, "CDR rejected; sent to dead letters");
            ctx.tracker.lock().expect("tracker lock").started(tp, offset);
            let (dead_letters, tx) = (stages.dead_letters.clone(), tx.clone());
            let (source, raw, error) = (message.topic().to_owned(), payload.to_vec(), e.to_string());
            let cancelled = cancel.clone().cancelled();
            stages.runtime.spawn(async move {
                tokio::select! {
                    () = dead_letters.cdr_rejected(&source, partition, offset, format, &error, &raw) => {
                        let _ = tx.send(Completion { topic, partition, offset, mails: Vec::new() });
                    }
                    () = cancelled => {}
                }
            });
            return Ok(());
        }
    };
    stages.metrics.decoded();
    stages.metrics.notified();
    let mut tracker = ctx.tracker.lock().expect("tracker lock");
    let mut mails = Vec::with_capacity(subscription.recipients.len());
    for recipient in &subscription.recipients {
        let key = SentKey::new(&call.called, &call.call_id, recipient.as_str());
        if tracker.keys.contains(&key) || ctx.store.was_sent(&key)? {
            stages.metrics.duplicate();
            continue;
        }
        match stages.renderer.render(&call, recipient) {
            Ok(mail) => {
                tracker.keys.insert(key.clone());
                mails.push((key, mail));
            }
            Err(e) => {
                stages.metrics.failed("render");
                tracing::error!(call_id = %call.call_id, %recipient, error = %e, "mail could not be rendered");
            }
        }
    }
    if mails.is_empty() {
        if let Some(offset) = tracker.finished(tp, offset) {
            drop(tracker);
            ctx.store_offset(consumer, tp, offset);
        }
        return Ok(());
    }
    tracker.started(tp, offset);
    stages.metrics.in_flight(tracker.in_flight);
    drop(tracker);
    let origin =
        crate::deliver::Origin { call_id: call.call_id.into_owned(), called: call.called, ended_at: call.ended_at };
    let (deliverer, tx, cancelled) = (stages.deliverer.clone(), tx.clone(), cancel.clone().cancelled());
    stages.runtime.spawn(async move {
        let deliver_all = async {
            let mut done = Vec::with_capacity(mails.len());
            for (key, mail) in mails {
                let fate = deliverer.deliver(&key, &mail, &origin).await;
                done.push((key, fate));
            }
            done
        };
        tokio::select! {
            done = deliver_all => {
                let _ = tx.send(Completion { topic, partition, offset, mails: done });
            }
            () = cancelled => {}
        }
    });
    Ok(())
}
