//! Source stage: the Kafka consumers, each on a thread of its own, and the bookkeeping
//! that makes delivery at-least-once.
//!
//! A consumer thread polls a [`BaseConsumer`] and runs decode → resolve → filter →
//! render itself: these are CPU work plus, on a cache miss, a sled read, which is why
//! they run here and not on an async worker. Mails go to delivery tasks on the tokio
//! runtime; each reports back a [`Completion`] to the thread that read its CDR.
//!
//! `engine.consumers` threads run, each a member of the consumer group, so the group
//! gives each partitions of its own; everything below is per thread, except the count
//! of CDRs in flight (`engine.max_in_flight` bounds the engine) and the set of mails
//! being sent (a CDR read by two threads is sent once).
//!
//! Offsets follow the rust-rdkafka at-least-once recipe, `enable.auto.offset.store=false`:
//! an offset is stored only when its CDR and every earlier CDR of the partition are
//! finished (mails accepted, refused for good, or durably queued for retry; dead letters
//! written). Every [`COMMIT_INTERVAL`] the thread flushes the store and takes the
//! offsets found safe, and commits them itself once the partition changelogs have
//! confirmed the records published until then (it reads on meanwhile), so a committed
//! offset never runs ahead of the sent-mail records on disk or in Kafka, whatever kills
//! the process. On revocation and on shutdown the thread waits three quarters of the
//! grace period for the mails in flight to be sent, has the ones still waiting queued
//! (sent from the queue later, by whoever holds it), then flushes and commits.

mod context;
mod offsets;

use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::context::Sending;
pub use self::context::SourceContext;
use self::offsets::{Completion, Tracker};
use crate::dead_letter::{DeadLetters, RejectedCdr};
use crate::decode::CdrFormat;
use crate::deliver::Deliverer;
use crate::error_event::ErrorEvent;
use crate::pipeline::{Mails, Outcome, Pipeline};
use crate::store::{Claimed, Claims, SentKey, StoreError};
use crate::telemetry::Metrics;

/// What the consumer thread hands work to.
#[derive(Clone)]
pub struct Stages {
    /// Decode to render: what one CDR becomes.
    pub pipeline: Pipeline,
    pub deliverer: Deliverer,
    pub dead_letters: DeadLetters,
    pub metrics: Metrics,
    /// Where delivery tasks run.
    pub runtime: tokio::runtime::Handle,
    /// Every delivery task, for the engine to wait on at the end of a stop.
    pub tasks: TaskTracker,
    /// While the store's disk is low, the consumers stay paused.
    pub disk: crate::disk::DiskWatch,
    /// Each partition's sent records and retry entries in Kafka: restored at
    /// assignment, confirmed before each commit.
    pub changelog: std::sync::Arc<crate::partition_log::PartitionLog>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("subscription store: {0}")]
    Store(#[from] StoreError),
    #[error("a consumer thread panicked")]
    Panicked,
}

/// Of a grace period (at shutdown, or for a revoked partition), the time mails in
/// flight get to be sent; the rest is for queuing those left and committing.
pub fn sending_time(grace: Duration) -> Duration {
    grace * 3 / 4
}

/// How long the consumer waits, at `engine.max_in_flight`, for a mail to finish before
/// it pauses its partitions.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// How often stored offsets are committed, each time after a store flush.
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// What the consumers are to read, and how.
pub struct SourceOptions<'a> {
    pub brokers: &'a str,
    pub group_id: &'a str,
    pub topics: Vec<(String, CdrFormat)>,
    pub properties: &'a std::collections::BTreeMap<String, String>,
    /// Consumer threads (`engine.consumers`), at least 1.
    pub consumers: usize,
    /// CDRs in flight over all consumer threads before they stop reading.
    pub max_in_flight: usize,
    pub grace: Duration,
}

/// The consumer threads of one engine, members of one consumer group: the group
/// shares the partitions out among them.
pub struct Source {
    threads: Vec<std::thread::JoinHandle<Result<(), SourceError>>>,
}

impl Source {
    /// Waits for every consumer thread to return; the first error, if any. Each thread
    /// cancels the reading token as it returns, so one that fails stops the others.
    pub fn join(self) -> Result<(), SourceError> {
        let mut result = Ok(());
        for thread in self.threads {
            let r = thread.join().unwrap_or(Err(SourceError::Panicked));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

/// Runs `body` on consumer thread `n`; when it returns or panics, `reading` is
/// cancelled: the other threads stop too, so the engine stops rather than go on with
/// part of its partitions unserved.
fn start_thread(
    n: usize,
    reading: CancellationToken,
    body: impl FnOnce() -> Result<(), SourceError> + Send + 'static,
) -> std::thread::JoinHandle<Result<(), SourceError>> {
    std::thread::Builder::new()
        .name(format!("cdr-source-{n}"))
        .spawn(move || {
            let _stop_others = reading.drop_guard();
            body()
        })
        .expect("spawning a consumer thread")
}

/// Starts `options.consumers` consumer threads; they run until `reading` is cancelled,
/// then finish in-flight work (up to the grace period), commit and return. Their
/// delivery tasks' time for sending hangs below `shutdown`.
pub fn spawn(
    options: SourceOptions<'_>,
    stages: Stages,
    reading: CancellationToken,
    shutdown: &CancellationToken,
) -> Result<Source, SourceError> {
    // What the threads share besides the pipeline's claims: how many CDRs are in
    // flight in all.
    let total = Arc::new(AtomicUsize::new(0));
    stages.metrics.count_in_flight(total.clone());
    // Every consumer is created before any thread starts: one that cannot be leaves no
    // thread running.
    let mut consumers = Vec::with_capacity(options.consumers);
    for thread in 0..options.consumers {
        let (tx, rx) = std::sync::mpsc::channel();
        let context = SourceContext {
            thread,
            metrics: stages.metrics.clone(),
            topics: options.topics.clone(),
            store: stages.pipeline.resolver.store().clone(),
            grace: options.grace,
            tracker: Mutex::new(Tracker::new(total.clone())),
            completions: Mutex::new(rx),
            sending: Mutex::new(Sending::new(shutdown.child_token())),
            changelog: stages.changelog.clone(),
            unread: crate::unread::Unread::default(),
            pending: Mutex::default(),
            reading: reading.clone(),
            paused: Default::default(),
            unrestored: Mutex::default(),
        };
        consumers.push((consumer(&options, context)?, tx));
    }
    let (max_in_flight, grace) = (options.max_in_flight, options.grace);
    let mut threads = Vec::with_capacity(consumers.len());
    for (n, (consumer, tx)) in consumers.into_iter().enumerate() {
        let (stages, stop_reading) = (stages.clone(), reading.clone());
        threads.push(start_thread(n, reading.clone(), move || {
            // The stages hold runtime-bound parts (timers, task handles); this thread
            // runs inside the runtime's context so using and dropping them here works.
            let runtime = stages.runtime.clone();
            let _entered = runtime.enter();
            let result = run(consumer, &stages, tx, stop_reading, max_in_flight, grace);
            drop(stages);
            result
        }));
    }
    Ok(Source { threads })
}

/// How the consumers fetch, unless `kafka.properties` says otherwise (the load tester's
/// bare consumer fetches the same way).
pub const FETCH_SETTINGS: [(&str, &str); 2] = [
    // A notification is worth little late: do not let an idle fetch sit for librdkafka's
    // default 500 ms.
    ("fetch.wait.max.ms", "20"),
    // Once the CDRs fetched ahead pass librdkafka's queue thresholds, it waits this long
    // before fetching a partition again. With its default of 1 s, an engine catching up
    // on a backlog emptied its queue and then read nothing for most of a second, each
    // time (BENCHMARKS.md, ingest).
    ("fetch.queue.backoff.ms", "100"),
];

/// A consumer subscribed to the topics, with settings that make the offset bookkeeping
/// above correct.
fn consumer(options: &SourceOptions<'_>, context: SourceContext) -> Result<BaseConsumer<SourceContext>, SourceError> {
    let defaults = [
        ("group.id", options.group_id),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("statistics.interval.ms", crate::unread::STATISTICS_INTERVAL_MS),
    ];
    let defaults: Vec<(&str, &str)> = defaults.into_iter().chain(FETCH_SETTINGS).collect();
    let config = crate::cluster::client_config(options.brokers, &defaults, options.properties);
    let consumer: BaseConsumer<SourceContext> = config.create_with_context(context)?;
    let names: Vec<&str> = options.topics.iter().map(|(t, _)| t.as_str()).collect();
    consumer.subscribe(&names)?;
    Ok(consumer)
}

fn run(
    consumer: BaseConsumer<SourceContext>,
    stages: &Stages,
    tx: Sender<Completion>,
    reading: CancellationToken,
    max_in_flight: usize,
    grace: Duration,
) -> Result<(), SourceError> {
    let ctx = consumer.context();
    ctx.set_paused(false);
    let mut full_since: Option<Instant> = None;
    let mut last_commit = Instant::now();
    while !reading.is_cancelled() {
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            ctx.take_commit()?;
            last_commit = Instant::now();
        }
        ctx.commit_confirmed(&consumer)?;
        // Backpressure: with `max_in_flight` CDRs waiting on mails, the next CDR waits
        // for one of them to finish. Not polling meanwhile keeps what librdkafka fetched
        // ahead. A mail server that finishes nothing for PAUSE_AFTER gets the partitions
        // paused instead, and polling goes on so the consumer serves rebalances and stays
        // in the group. Fetching resumes at half the limit: librdkafka drops what it had
        // fetched ahead at the pause, and a resume takes it a few hundred ms to fetch again.
        // A low disk pauses them too, for as long as it lasts (crate::disk): the room
        // left is for the records of the mails already on their way.
        let in_flight = ctx.tracker.lock().expect("tracker lock").in_flight_total();
        let disk_low = stages.disk.is_low();
        if in_flight < max_in_flight {
            full_since = None;
        } else if !ctx.paused() && !disk_low {
            let since = *full_since.get_or_insert_with(Instant::now);
            if since.elapsed() < PAUSE_AFTER {
                ctx.await_completion(Duration::from_millis(10));
                continue;
            }
        }
        if !ctx.paused() && (disk_low || in_flight >= max_in_flight) {
            consumer.pause(&consumer.assignment()?)?;
            ctx.set_paused(true);
            if disk_low {
                tracing::warn!(in_flight, "consumer paused: the store's disk is low");
            } else {
                tracing::info!(in_flight, "consumer paused until CDRs in flight finish (mails sent or queued, dead letters written, faxes kept)");
            }
        }
        if ctx.paused() && !disk_low && in_flight <= max_in_flight / 2 {
            consumer.resume(&ctx.readable(consumer.assignment()?))?;
            ctx.set_paused(false);
            tracing::info!(in_flight, "consumer resumed");
        }
        match consumer.poll(Duration::from_millis(if ctx.paused() { 10 } else { 100 })) {
            Some(Ok(message)) => handle(&consumer, stages, &tx, &message)?,
            Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
            None => {}
        }
        ctx.drain();
        read_unread(&consumer, ctx.paused())?;
        ctx.restore_again(&consumer);
    }
    if !ctx.finish_or_queue(None, grace) {
        let left = ctx.tracker.lock().expect("tracker lock").in_flight;
        tracing::warn!(in_flight = left, "shutdown grace period over; those CDRs will be read again on restart");
    }
    ctx.drain();
    // What is still in flight now is abandoned: its offsets stay uncommitted, and
    // closing the consumer below must not wait for it again.
    ctx.tracker.lock().expect("tracker lock").abandon();
    if ctx.commit_now(&consumer)? {
        tracing::info!("consumer stopped; offsets committed");
    } else {
        tracing::warn!("consumer stopped; offsets since the last commit not committed: those CDRs will be read again");
    }
    Ok(())
}

/// Assigns again the partitions librdkafka left unread (see [`crate::unread`]): their
/// calls would otherwise never be notified. Paused ones are paused again, and so are
/// those waiting for their changelogs.
fn read_unread(consumer: &BaseConsumer<SourceContext>, paused: bool) -> Result<(), SourceError> {
    let ctx = consumer.context();
    let unread = ctx.unread.take_due();
    if unread.is_empty() {
        return Ok(());
    }
    crate::error_event!(ctx.metrics, ErrorEvent::PartitionUnread, partitions = ?unread, after = ?crate::unread::UNREAD_AFTER,
        "CDR partitions are assigned and not read (their committed offsets were not fetched); assigning them again");
    match crate::unread::assign_again(consumer, &unread) {
        // Paused again, all of them while the thread is, else those whose changelogs are
        // not restored yet (read, they would send their last reader's mails again).
        Ok(()) if paused => consumer.pause(&consumer.assignment()?)?,
        Ok(()) => {
            let waiting = ctx.unrestored_of(&consumer.assignment()?);
            if waiting.count() > 0 {
                consumer.pause(&waiting)?;
            }
        }
        Err(e) => tracing::warn!(error = %e, partitions = ?unread,
            "assigning unread CDR partitions again failed; tried again while they stay unread (with a cooperative \
             assignor, if they were taken off, at the next rebalance)"),
    }
    Ok(())
}

/// One message through the pipeline; its mails, if any, go to a delivery task, and its
/// offset is tracked until that task reports back.
fn handle(
    consumer: &BaseConsumer<SourceContext>,
    stages: &Stages,
    tx: &Sender<Completion>,
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
    let Mails { mut origin, mails, contested, keep } = match stages.pipeline.run(format, payload, chrono::Utc::now())? {
        Outcome::Send(mails) => mails,
        Outcome::Nothing => {
            let skipped = ctx.tracker.lock().expect("tracker lock").finished(tp, offset);
            ctx.note_skipped(tp, skipped);
            return Ok(());
        }
        Outcome::Rejected(e) => {
            tracing::warn!(topic = message.topic(), partition, offset, error = %e, "CDR rejected; sent to dead letters");
            let weight = offsets::weight(payload.len());
            let skipped = ctx.tracker.lock().expect("tracker lock").started(tp, offset, weight);
            ctx.note_skipped(tp, skipped);
            let (dead_letters, tx) = (stages.dead_letters.clone(), tx.clone());
            let rejected = RejectedCdr {
                source: message.topic().to_owned(),
                partition,
                offset,
                format,
                error: e.to_string(),
                raw: payload.to_vec(),
            };
            let sending = ctx.sending(tp);
            stages.tasks.spawn_on(
                async move {
                    tokio::select! {
                        () = dead_letters.cdr_rejected(&rejected) => {
                            let _ = tx.send(Completion { topic, partition, offset });
                        }
                        () = sending.cancelled() => {}
                    }
                },
                &stages.runtime,
            );
            return Ok(());
        }
    };
    let weight = offsets::weight(payload.len());
    let skipped = ctx.tracker.lock().expect("tracker lock").started(tp, offset, weight);
    ctx.note_skipped(tp, skipped);
    origin.source = Some(crate::store::PartitionId { topic: message.topic().to_owned(), partition });
    let (deliverer, tx, sending) = (stages.deliverer.clone(), tx.clone(), ctx.sending(tp));
    let (store, claims, metrics) =
        (stages.pipeline.resolver.store().clone(), stages.pipeline.claims.clone(), stages.metrics.clone());
    stages.tasks.spawn_on(
        async move {
            if let Some(fax) = keep {
                // Kept before any mail links to it. Not kept (the engine stops, the
                // partition goes): the record is read again, so its mails are not
                // claimed here any longer.
                if !keep_fax(&store, *fax, &sending, &metrics).await {
                    mails.iter().for_each(|(key, _)| claims.release(key));
                    return;
                }
            }
            // Each claim goes as soon as its mail's record is written, so this task
            // holds none while it waits on another reading's below (two readings of one
            // CDR, each holding a mail the other waits on, would wait for ever).
            for (key, mail) in mails {
                deliverer.deliver(&key, &mail, &origin, sending.cancelled()).await;
                claims.release(&key);
            }
            // Mails another reading holds (the same CDR read again while a revoked
            // partition's task still writes their fate): this CDR is done only once
            // they are let go, and sends those let go unsent.
            for (key, mail) in contested {
                match until_let_go(&claims, &key, &sending, &metrics).await {
                    Some(Claimed::Mine) => {
                        deliverer.deliver(&key, &mail, &origin, sending.cancelled()).await;
                        claims.release(&key);
                    }
                    Some(_) => metrics.duplicate(),
                    // The partition goes: its next reader reads the CDR again.
                    None => return,
                }
            }
            let _ = tx.send(Completion { topic, partition, offset });
        },
        &stages.runtime,
    );
    Ok(())
}

/// [`Claims::claim_once_let_go`], tried again while the store cannot be read: `None`
/// if `sending` ends first.
async fn until_let_go(
    claims: &Arc<Claims>,
    key: &SentKey,
    sending: &CancellationToken,
    metrics: &Metrics,
) -> Option<Claimed> {
    let mut delay = Duration::from_millis(100);
    loop {
        match claims.claim_once_let_go(key, sending).await {
            Ok(claimed) => return claimed,
            Err(e) => crate::error_event!(*metrics, ErrorEvent::DeliveryStore, error = %e, retry_in = ?delay,
                "sent record not read yet; a CDR read again waits on it"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = sending.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Has the state owner keep a received fax, trying again until it is kept or `sending`
/// ends; whether it was kept. Each failure is raised: a fax whose mails wait on it is
/// not silently held up.
///
/// When `sending` ends (the partition goes, the engine stops) the fax is given up at
/// once, even while a try is still waiting for the owner's answer (up to a minute): its
/// caller then lets the mails' claims go before the partition's next reader, this node
/// again perhaps, reads the record again. Given up only once that try had failed, the
/// mails claimed here would have been passed over by that reader as being sent and
/// then let go: never sent. A try that ends after the give-up still keeps the fax, once.
async fn keep_fax(
    store: &crate::store::Store,
    fax: crate::pipeline::FaxToKeep,
    sending: &CancellationToken,
    metrics: &Metrics,
) -> bool {
    let mut delay = Duration::from_millis(200);
    let fax = Arc::new(fax);
    loop {
        let (store, attempt, counted) = (store.clone(), fax.clone(), metrics.clone());
        // Counted where it is carried out: a try given up below still ends, and says so.
        let kept = tokio::task::spawn_blocking(move || {
            let kept = store.keep_fax(attempt.record.clone(), attempt.document.clone());
            match &kept {
                Ok(true) => counted.fax_kept(),
                Ok(false) => {}
                Err(e) => crate::error_event!(counted, ErrorEvent::FaxKeep, fax_id = %attempt.record.fax_id,
                    number = %attempt.record.number,
                    error = %e, retry_in = ?delay, "received fax not kept yet; its mails wait"),
            }
            kept
        });
        let kept = tokio::select! {
            kept = kept => kept,
            () = sending.cancelled() => return false,
        };
        match kept {
            Ok(Ok(_)) => return true,
            Ok(Err(_)) => {}
            Err(e) => {
                tracing::warn!(fax_id = %fax.record.fax_id, error = %e, retry_in = ?delay, "keeping a received fax failed")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = sending.cancelled() => return false,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread that runs until told to stop, or gives up after a while.
    fn serving(reading: &CancellationToken) -> impl FnOnce() -> Result<(), SourceError> + Send + 'static {
        let reading = reading.clone();
        move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !reading.is_cancelled() {
                if Instant::now() > deadline {
                    return Err(StoreError::FlusherStopped.into());
                }
                std::thread::park_timeout(Duration::from_millis(10));
            }
            Ok(())
        }
    }

    #[test]
    fn a_consumer_thread_that_fails_stops_the_others_and_the_engine_gets_its_error() {
        let reading = CancellationToken::new();
        let threads = vec![
            start_thread(0, reading.clone(), serving(&reading)),
            start_thread(1, reading.clone(), || Err(StoreError::FlusherStopped.into())),
        ];
        let error = Source { threads }.join().expect_err("a thread failed");
        assert_eq!(error.to_string(), "subscription store: the store flusher thread has stopped");
    }

    #[test]
    fn a_consumer_thread_that_panics_stops_the_others_too() {
        let reading = CancellationToken::new();
        let threads = vec![
            start_thread(0, reading.clone(), serving(&reading)),
            start_thread(1, reading.clone(), || panic!("a bug in a consumer thread")),
        ];
        assert!(matches!(Source { threads }.join(), Err(SourceError::Panicked)));
    }
}
