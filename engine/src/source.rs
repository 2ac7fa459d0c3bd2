//! Source stage: the Kafka consumer, on a thread of its own, and the bookkeeping that
//! makes delivery at-least-once.
//!
//! The consumer thread polls a [`BaseConsumer`] and runs decode → resolve → filter →
//! render itself: these are CPU work plus, on a cache miss, a sled read, which is why
//! they run here and not on an async worker. Mails go to delivery tasks on the tokio
//! runtime; each reports back a [`Completion`].
//!
//! Offsets follow the rust-rdkafka at-least-once recipe: auto commit on,
//! `enable.auto.offset.store=false`, and an offset is stored only when its CDR and every
//! earlier CDR of the partition are finished (mails accepted or refused for good,
//! dead letters written). On revocation and on shutdown the thread waits, up to the
//! grace period, for in-flight work, then commits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Statistics};

use crate::decode::{decode, CdrFormat};
use crate::deliver::{Deliverer, Fate};
use crate::filter::decide;
use crate::render::{Mail, Renderer};
use crate::resolve::Resolver;
use crate::store::{SentKey, Store, StoreError};
use crate::telemetry::Metrics;

/// What a delivery task reports when a CDR's work is finished.
pub struct Completion {
    topic: usize,
    partition: i32,
    offset: i64,
    /// Each mail's dedup key and how it ended; recorded before the offset moves.
    mails: Vec<(SentKey, Fate)>,
}

/// Offsets with work in flight, per partition, in consumption order.
#[derive(Default)]
struct Tracker {
    /// (topic index, partition) → (offset, finished) in ascending offset order.
    partitions: HashMap<(usize, i32), VecDeque<(i64, bool)>>,
    /// Entries not yet finished, over all partitions.
    in_flight: usize,
    /// Dedup keys of mails being sent, so a CDR repeated back-to-back is not sent twice.
    keys: HashSet<SentKey>,
}

impl Tracker {
    /// A CDR finished without async work; returns the offset to store, if it may be.
    fn finished(&mut self, tp: (usize, i32), offset: i64) -> Option<i64> {
        match self.partitions.get_mut(&tp) {
            Some(q) if !q.is_empty() => {
                q.push_back((offset, true));
                None
            }
            _ => Some(offset),
        }
    }

    fn started(&mut self, tp: (usize, i32), offset: i64) {
        self.partitions.entry(tp).or_default().push_back((offset, false));
        self.in_flight += 1;
    }

    /// Marks `offset` finished; returns the highest offset now safe to store.
    fn completed(&mut self, tp: (usize, i32), offset: i64) -> Option<i64> {
        let q = self.partitions.get_mut(&tp)?;
        let i = q.binary_search_by_key(&offset, |(o, _)| *o).ok()?;
        if !q[i].1 {
            q[i].1 = true;
            self.in_flight -= 1;
        }
        let mut safe = None;
        while let Some(&(o, true)) = q.front() {
            safe = Some(o);
            q.pop_front();
        }
        safe
    }

    fn busy(&self, only: Option<&HashSet<(usize, i32)>>) -> bool {
        self.partitions.iter().any(|(tp, q)| !q.is_empty() && only.is_none_or(|s| s.contains(tp)))
    }

    fn forget(&mut self, tp: &(usize, i32)) {
        if let Some(q) = self.partitions.remove(tp) {
            self.in_flight -= q.iter().filter(|(_, done)| !done).count();
        }
    }
}

/// The consumer's context: statistics → lag metric; revocation → finish, then commit.
pub struct SourceContext {
    metrics: Metrics,
    topics: Vec<(String, CdrFormat)>,
    store: Store,
    grace: Duration,
    tracker: Mutex<Tracker>,
    completions: Mutex<Receiver<Completion>>,
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        for (name, topic) in &stats.topics {
            for (id, p) in &topic.partitions {
                if *id >= 0 && p.consumer_lag >= 0 {
                    self.metrics.consumer_lag(name, *id, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: HashSet<(usize, i32)> =
                tpl.elements().iter().filter_map(|e| Some((self.topic_index(e.topic())?, e.partition()))).collect();
            tracing::info!(partitions = revoked.len(), "partitions revoked; finishing their in-flight CDRs");
            if let Err(e) = self.settle(consumer, Some(&revoked), Instant::now() + self.grace) {
                tracing::error!(error = %e, "store failed while finishing revoked partitions");
            }
            let mut tracker = self.tracker.lock().expect("tracker lock");
            revoked.iter().for_each(|tp| tracker.forget(tp));
            drop(tracker);
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "commit before giving up partitions: nothing to commit or failed");
            }
        }
    }
}

impl SourceContext {
    fn topic_index(&self, name: &str) -> Option<usize> {
        self.topics.iter().position(|(t, _)| t == name)
    }

    fn store_offset(&self, consumer: &BaseConsumer<Self>, tp: (usize, i32), offset: i64) {
        // librdkafka commits offset + 1: the next message to read.
        if let Err(e) = consumer.store_offset(&self.topics[tp.0].0, tp.1, offset) {
            tracing::debug!(error = %e, partition = tp.1, offset, "offset not stored (partition no longer ours)");
        }
    }

    /// Records a finished CDR's mails and moves its partition's offset if it may.
    fn apply(&self, consumer: &BaseConsumer<Self>, c: Completion) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut tracker = self.tracker.lock().expect("tracker lock");
        for (key, _fate) in &c.mails {
            // A mail refused for good is recorded too: it is never retried (R-M4).
            self.store.mark_sent(key, now)?;
            tracker.keys.remove(key);
        }
        let safe = tracker.completed((c.topic, c.partition), c.offset);
        self.metrics.in_flight(tracker.in_flight);
        drop(tracker);
        if let Some(offset) = safe {
            self.store_offset(consumer, (c.topic, c.partition), offset);
        }
        Ok(())
    }

    /// Applies completions until the given partitions (all if `None`) have nothing in
    /// flight or `deadline` passes. Returns whether everything finished.
    fn settle(
        &self,
        consumer: &BaseConsumer<Self>,
        only: Option<&HashSet<(usize, i32)>>,
        deadline: Instant,
    ) -> Result<bool, StoreError> {
        let completions = self.completions.lock().expect("completions lock");
        while self.tracker.lock().expect("tracker lock").busy(only) {
            let left = deadline.saturating_duration_since(Instant::now());
            match completions.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(c) => self.apply(consumer, c)?,
                Err(RecvTimeoutError::Timeout) if left.is_zero() => return Ok(false),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Applies every completion already reported, without waiting.
    fn drain(&self, consumer: &BaseConsumer<Self>) -> Result<(), StoreError> {
        loop {
            let next = self.completions.lock().expect("completions lock").try_recv();
            match next {
                Ok(c) => self.apply(consumer, c)?,
                Err(_) => return Ok(()),
            }
        }
    }
}

/// Writes dead-letter records: undecodable CDRs and mails refused for good. Each is
/// retried until the broker takes it, since the CDR's offset waits for it.
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
    pub async fn cdr_rejected(
        &self,
        source: &str,
        partition: i32,
        offset: i64,
        format: CdrFormat,
        error: &str,
        raw: &[u8],
    ) {
        let record = serde_json::json!({
            "kind": "cdr",
            "topic": source,
            "partition": partition,
            "offset": offset,
            "format": format.as_str(),
            "reason": error,
            "raw_base64": base64::engine::general_purpose::STANDARD.encode(raw),
            "at": chrono::Utc::now().to_rfc3339(),
        });
        self.publish(&format!("{source}/{partition}/{offset}"), record, false).await;
    }

    /// Records a mail the server refused for good (R-M4).
    pub async fn mail_failed(&self, mail: &Mail, origin: &crate::deliver::Origin, reply: &str, attempts: u32) {
        let record = serde_json::json!({
            "kind": "mail",
            "call_id": origin.call_id,
            "called": origin.called.as_str(),
            "recipient": mail.recipient.as_str(),
            "message_id": mail.message_id,
            "smtp_reply": reply,
            "attempts": attempts,
            "at": chrono::Utc::now().to_rfc3339(),
        });
        self.publish(&origin.call_id, record, true).await;
    }

    async fn publish(&self, key: &str, record: serde_json::Value, mail: bool) {
        let payload = record.to_string();
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
                Err((e, _)) => {
                    tracing::error!(topic = %self.topic, error = %e, retry_in = ?delay, "dead-letter record not written yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

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
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
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
            // Delivery parts (lettre's pool) spawn tasks, even when dropped at the end
            // of `run`, so the whole thread runs inside the runtime's context.
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
    while !stop.load(Ordering::Acquire) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => handle(&consumer, stages, &tx, &cancel, &message)?,
            Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
            None => {}
        }
        ctx.drain(&consumer)?;
        // Backpressure: a slow mail server pauses fetching instead of piling up work;
        // polling goes on so the group membership stays alive.
        let in_flight = ctx.tracker.lock().expect("tracker lock").in_flight;
        if !paused && in_flight >= max_in_flight {
            consumer.pause(&consumer.assignment()?)?;
            paused = true;
            tracing::info!(in_flight, "consumer paused until mails drain");
        } else if paused && in_flight < max_in_flight - max_in_flight / 10 {
            consumer.resume(&consumer.assignment()?)?;
            paused = false;
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
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit had nothing to do or failed");
    }
    ctx.store.flush_blocking()?;
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
    let call = match decode(format, payload) {
        Ok(call) => call,
        Err(e) => {
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
    let subscription = stages.resolver.resolve(&call.called)?;
    let subscription = match decide(subscription.as_deref(), &call) {
        Ok(s) => s,
        Err(skip) => {
            stages.metrics.filtered(skip);
            let safe = ctx.tracker.lock().expect("tracker lock").finished(tp, offset);
            if let Some(offset) = safe {
                ctx.store_offset(consumer, tp, offset);
            }
            return Ok(());
        }
    };
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
                let fate = deliverer.deliver(&mail, &origin).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_advance_only_past_finished_work_in_order() {
        let mut t = Tracker::default();
        let tp = (0, 0);
        assert_eq!(t.finished(tp, 0), Some(0), "nothing in flight: store at once");
        t.started(tp, 1);
        t.started(tp, 2);
        assert_eq!(t.finished(tp, 3), None, "must wait for 1 and 2");
        assert_eq!(t.completed(tp, 2), None, "1 is still in flight");
        assert_eq!(t.completed(tp, 1), Some(3), "1, 2 and 3 are now all finished");
        assert_eq!(t.in_flight, 0);
        assert_eq!(t.completed(tp, 1), None, "a stale completion changes nothing");
        assert_eq!(t.finished(tp, 4), Some(4));
    }

    #[test]
    fn forgetting_a_revoked_partition_drops_its_in_flight_count() {
        let mut t = Tracker::default();
        t.started((0, 1), 10);
        t.started((0, 2), 10);
        t.forget(&(0, 1));
        assert_eq!(t.in_flight, 1);
        assert!(t.busy(None));
        assert!(!t.busy(Some(&[(0, 1)].into_iter().collect())));
        assert_eq!(t.completed((0, 1), 10), None, "completion of a revoked partition is ignored");
    }
}
