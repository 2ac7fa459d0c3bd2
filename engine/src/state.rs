//! Subscriber state shared by every engine node through Kafka: lines, numbers, settings
//! and credentials (with the failure counts of R-S2/R-S3) have their truth in the
//! compacted state topic; each node's sled trees are a view of it.
//!
//! ```text
//!   any node's site, IVR, /provision          the state owner (one node)          every node
//!   Op ──▶ state-requests topic ──────────▶ Store::execute, one op after   ──▶ state topic ──▶ Store::apply_state
//!          (1 partition)                    another, on its own view           (compacted,    (the applier thread)
//!                                           values of the touched keys,         1 partition)
//!                                           then a reply record
//! ```
//!
//! Why it is correct (docs/cluster.md says more):
//!
//! - **One writer.** The owner is the member of consumer group `<kafka.group_id>-state`
//!   that holds the request topic's only partition. Ops run one after another on its
//!   store, which has every earlier write: it catches up to the state topic's end when
//!   it gets the partition; after that its own writes are in its store as it makes them,
//!   and its applier applies no other record of its epoch. So a failure count read,
//!   incremented and written cannot interleave with another: failed logins spread over
//!   any number of nodes lock the account after exactly the counts of R-S2 and R-S3.
//!   The owner takes its next batch once the state topic has confirmed the last one,
//!   without waiting to read it back; its store stays marked as ahead of the topic until
//!   its applier has read the batch and found it not fenced.
//! - **Exactly once per request.** Each request's records are followed by a reply record
//!   naming the request (the sending node and its number, given in the order the node
//!   sends); a store records the last answered number of each node with the values. An
//!   owner that takes over skips the requests the topic already has replies for, so a
//!   request whose records were written before its owner died is not counted twice.
//! - **Read-your-writes.** A node answers its user when its own applier has applied the
//!   reply: the records come before the reply in the one partition, so the node shows
//!   the write. Other nodes apply it as soon as they read it.
//! - **Compaction** keeps the last value of every key (a deleted key: its tombstone), so
//!   an empty node reads each key once to catch up.
//!
//! - **Fencing.** An owner that was thought dead but still runs (a pause longer than
//!   its session) could publish after its successor took over. Each owner announces
//!   itself when it takes over (a record of its own key, `owner/…`, that compaction
//!   keeps), and every record it writes carries its epoch: the offset of that
//!   announcement. Every node applies a record only if its epoch is the last announced
//!   one before it in the partition, so all nodes, and a node reading the topic from
//!   its start later, ignore the same records. The current owner writes each ignored
//!   key again (compaction would otherwise keep the ignored value and drop the last
//!   good one), and a node that finds its own records ignored stops and rebuilds its
//!   store from the topic.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::error_event::{ErrorEvent, RaiseEvery};
use crate::store::state::{Changed, Op, OpError, Reply, StateKey, StateWriter, Unreadable};
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;

/// How long a write waits for the owner's answer: longer than a takeover takes (the
/// owner group's session timeout, 45 s by default, less when configured).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// A request an owner reaches this long after it was sent (by the record's time) is
/// refused, not carried out: its sender tells its user it failed after
/// [`ANSWER_WITHIN`], and a write found done after that is worse than one not done.
/// Shorter than that, so that nodes' clocks apart by up to the difference agree.
const REQUEST_EXPIRES: Duration = Duration::from_secs(ANSWER_WITHIN.as_secs() - 10);
/// Ops per request record at most (an import's batch).
const OPS_PER_REQUEST: usize = 200;
/// A request record's ops take at most this many bytes (but for one op larger alone):
/// below the 1 MB a topic and a broker take by default (`max.message.bytes`,
/// `message.max.bytes`), so an import of lines of many numbers through a node needs
/// neither raised. Less where the operator's `message.max.bytes` is less
/// ([`request_bytes`]).
const REQUEST_BYTES: usize = 512 << 10;
/// Requests the owner takes in one batch: carried out, published, then confirmed.
const REQUESTS_PER_BATCH: usize = 500;
/// Records the applier reads before it applies them and records its position.
const RECORDS_PER_APPLY: usize = 20_000;
/// How long the owner waits for the state topic to confirm a batch's records before it
/// gives up and stops its node. A broker's loss makes the topic unwritable for a while
/// (a new leader is elected after the controller's broker session timeout, then the
/// producer finds it): the owner waits that out.
const PUBLISH_WITHIN: Duration = Duration::from_secs(120);
/// The least `max.poll.interval.ms` of the owner's consumer: longer than any of its
/// waits between two polls ([`PUBLISH_WITHIN`], then reading its announcement back).
const OWNER_POLL_INTERVAL: Duration = Duration::from_secs(300);
const _: () = assert!(OWNER_POLL_INTERVAL.as_secs() > PUBLISH_WITHIN.as_secs() + ANSWER_WITHIN.as_secs());
/// How long the owner's producer gathers records into one produce request while the
/// owner still carries out a batch.
const OWNER_LINGER: Duration = Duration::from_millis(20);
/// How often a wait for the state topic is raised ([`ErrorEvent::StateStalled`]).
const WAITING_NOTE_EVERY: Duration = Duration::from_secs(10);

/// How long a clean stop gives the owner to finish its batch and see it read back: past
/// it, the owner stops where it is and the store keeps its batch mark.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Key prefix of an owner's announcement, one per takeover: `owner/NODE/MILLISECONDS`.
/// Each key is unique, so compaction keeps every announcement and a node reading the
/// topic from its start fences exactly the records a node reading it live fenced.
const ANNOUNCEMENT: &str = "owner/";

/// Where the state lives, from `kafka.*`.
pub struct StateOptions<'a> {
    /// The owner group is `<group_id>-state`.
    pub reach: crate::cluster::Reach<'a>,
    /// The compacted state topic (`kafka.state_topic`).
    pub topic: &'a str,
    /// The owner's request topic (`kafka.state_requests_topic`).
    pub requests: &'a str,
    /// Whether the topics live in the embedded cluster (`kafka.brokers` empty), which
    /// ends with this process: the store stays the truth between runs.
    pub embedded: bool,
}

/// A request record: the ops of one caller, in order (written by [`request_payload`]).
#[derive(serde::Deserialize)]
struct Request {
    node: String,
    id: u64,
    ops: Vec<Op>,
}

/// What of a request an owner can still read when its ops are not all ones it knows (a
/// newer node's, during a rolling upgrade): enough to answer it.
#[derive(serde::Deserialize)]
struct Envelope {
    node: String,
    id: u64,
    ops: Vec<serde::de::IgnoredAny>,
}

/// A request record read by the owner.
enum Read {
    Request(Request),
    /// Its ops do not all read (`why`): every one is answered with an error, nothing is
    /// carried out, so its writer hears at once instead of waiting out its answer time.
    Unknown {
        envelope: Envelope,
        why: String,
    },
    /// Not a request at all: no one to answer.
    Junk,
}

impl Read {
    fn of(payload: Option<&[u8]>) -> Self {
        let Some(payload) = payload else { return Read::Junk };
        match serde_json::from_slice::<Request>(payload) {
            Ok(request) => Read::Request(request),
            Err(e) => match serde_json::from_slice::<Envelope>(payload) {
                Ok(envelope) => Read::Unknown { envelope, why: e.to_string() },
                Err(_) => Read::Junk,
            },
        }
    }
}

/// The bytes a request's ops may take with the request producer's `message.max.bytes`
/// at `max` (the operator's, if set): [`REQUEST_BYTES`], or less, room left for the
/// record's envelope.
fn request_bytes(max: Option<&str>) -> usize {
    let max = max.and_then(|m| m.parse::<usize>().ok()).unwrap_or(usize::MAX);
    REQUEST_BYTES.min(max.saturating_sub(4096) / 2).max(1)
}

/// `encoded` ops (each one's JSON) in requests of at most [`OPS_PER_REQUEST`] ops and
/// `budget` bytes, in order; an op larger than that alone.
fn requests(encoded: &[Vec<u8>], budget: usize) -> impl Iterator<Item = &[Vec<u8>]> {
    let mut rest = encoded;
    std::iter::from_fn(move || {
        let (mut ops, mut bytes) = (0, 0);
        while let Some(op) = rest.get(ops) {
            if ops == OPS_PER_REQUEST || (ops > 0 && bytes + op.len() + 1 > budget) {
                break;
            }
            (ops, bytes) = (ops + 1, bytes + op.len() + 1);
        }
        let (request, after) = rest.split_at(ops);
        rest = after;
        (!request.is_empty()).then_some(request)
    })
}

/// A [`Request`] record of `ops` already encoded: each op is encoded once, to size the
/// requests by ([`requests`]).
fn request_payload(node: &str, id: u64, ops: &[Vec<u8>]) -> Vec<u8> {
    let node = serde_json::Value::from(node);
    let mut payload = format!(r#"{{"node":{node},"id":{id},"ops":["#).into_bytes();
    payload.reserve(ops.iter().map(|op| op.len() + 1).sum::<usize>() + 2);
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            payload.push(b',');
        }
        payload.extend_from_slice(op);
    }
    payload.extend_from_slice(b"]}");
    payload
}

/// The owner's answer to one request, published after the request's values.
#[derive(serde::Serialize, serde::Deserialize)]
struct Answer {
    node: String,
    id: u64,
    results: Vec<Result<Reply, OpError>>,
}

/// How far this node's applier has read the state topic.
#[derive(Default)]
struct Progress {
    /// Next offset to apply, and whether the applier stopped for good.
    next: Mutex<(i64, bool)>,
    moved: Condvar,
}

impl Progress {
    fn set(&self, next: i64) {
        self.next.lock().expect("progress lock").0 = next;
        self.moved.notify_all();
    }

    fn get(&self) -> i64 {
        self.next.lock().expect("progress lock").0
    }

    /// The engine stops: waits end at once (the applier stops reading).
    fn halt(&self) {
        self.next.lock().expect("progress lock").1 = true;
        self.moved.notify_all();
    }

    /// Waits until offsets below `offset` are applied; false after `within` or once halted.
    fn wait_for(&self, offset: i64, within: Duration) -> bool {
        let guard = self.next.lock().expect("progress lock");
        let (next, _) = self
            .moved
            .wait_timeout_while(guard, within, |(next, halted)| *next < offset && !*halted)
            .expect("progress lock");
        next.0 >= offset
    }
}

type Results = Vec<Result<Reply, OpError>>;

/// `answer`, waited for until `deadline`; `waiting` is called once it has waited
/// [`WAITING_NOTE_EVERY`] (not when it is answered sooner, or the deadline comes first).
fn answer_by(
    answer: &std::sync::mpsc::Receiver<Results>,
    deadline: Instant,
    waiting: impl FnOnce(),
) -> Result<Results, std::sync::mpsc::RecvTimeoutError> {
    let left = || deadline.saturating_duration_since(Instant::now());
    match answer.recv_timeout(left().min(WAITING_NOTE_EVERY)) {
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !left().is_zero() => {
            waiting();
            answer.recv_timeout(left())
        }
        answered => answered,
    }
}

/// Keys whose last record a replaced owner wrote (ignored everywhere): the current
/// owner writes them again from its store. Every node's applier keeps them, in its
/// store too ([`Store::change_fenced`]), until it reads a record of the key written in
/// the epoch in force: an owner killed before its rewrite reached the topic leaves them
/// to the next owner, on this node after a restart or on another.
#[derive(Default)]
struct Fenced {
    /// Each key, and whether this node's owner has written it again since it was noted.
    keys: Mutex<HashMap<String, bool>>,
    /// Whether `keys` has any: the applier asks per record, without the lock.
    any: AtomicBool,
}

impl Fenced {
    /// The keys a store kept, none written again here yet.
    fn of(store: &Store) -> Result<Self, StoreError> {
        let keys: HashMap<String, bool> = store.fenced_keys()?.into_iter().map(|key| (key, false)).collect();
        Ok(Self { any: AtomicBool::new(!keys.is_empty()), keys: Mutex::new(keys) })
    }

    /// `noted` were fenced (again: to be written again), `cleared` read as written in
    /// the epoch in force.
    fn change(&self, noted: &HashSet<String>, cleared: &HashSet<String>) {
        let mut keys = self.keys.lock().expect("fenced lock");
        keys.extend(noted.iter().map(|key| (key.clone(), false)));
        keys.retain(|key, _| !cleared.contains(key));
        self.any.store(!keys.is_empty(), Ordering::Relaxed);
    }

    /// Whether there are keys kept (read by the applier, which alone changes them).
    fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    fn contains(&self, key: &str) -> bool {
        self.keys.lock().expect("fenced lock").contains_key(key)
    }

    /// The keys this node's owner has not written again since they were noted, marked
    /// written.
    fn to_write(&self) -> Vec<String> {
        let mut keys = self.keys.lock().expect("fenced lock");
        let mut to_write = Vec::new();
        for (key, written) in keys.iter_mut().filter(|(_, written)| !**written) {
            *written = true;
            to_write.push(key.clone());
        }
        to_write
    }

    /// Whether some key waits for this node's owner to write it again.
    fn any_to_write(&self) -> bool {
        self.keys.lock().expect("fenced lock").values().any(|written| !written)
    }

    /// This node no longer owns: what it wrote again and is still noted waits for the
    /// next owner, this node's included.
    fn none_written(&self) {
        self.keys.lock().expect("fenced lock").values_mut().for_each(|written| *written = false);
    }
}

/// The callers waiting for answers, by request id.
#[derive(Default)]
struct Waiters(Mutex<HashMap<u64, std::sync::mpsc::SyncSender<Results>>>);

impl Waiters {
    /// Wakes every caller without an answer (their `wait` says why): the node stops,
    /// because its owner could not publish or past its stop's grace period, and their
    /// requests may never be answered here.
    fn forget_all(&self) {
        self.0.lock().expect("waiters lock").clear();
    }

    fn answer(&self, id: u64, results: Results) {
        if let Some(waiter) = self.0.lock().expect("waiters lock").remove(&id) {
            let _ = waiter.try_send(results);
        }
    }
}

/// Fails a request whose record the broker did not take. One that timed out on its way
/// may have been written all the same (librdkafka's "possibly persisted"): its writer
/// waits on for the owner's answer, as for any request, rather than hear "not written"
/// of a write an owner then carries out (a password changed that its user was told was
/// not, and their logins with the old one counted towards R-S3).
struct RequestDeliveries {
    waiters: Arc<Waiters>,
}

impl ClientContext for RequestDeliveries {}

impl ProducerContext for RequestDeliveries {
    type DeliveryOpaque = Box<(u64, usize)>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        if let Err((e, message)) = result {
            // SAFETY: the message is the delivery report's, alive for this call;
            // librdkafka only reads its status.
            let status = unsafe { rdkafka::bindings::rd_kafka_message_status(message.ptr()) };
            if status != rdkafka::bindings::rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_NOT_PERSISTED {
                tracing::warn!(error = %e, "a state request's delivery failed after it may have been written: its answer is waited for");
                return;
            }
            let (id, ops) = *opaque;
            let failed = (0..ops).map(|_| Err(OpError::Failed(format!("the state request was not written: {e}"))));
            self.waiters.answer(id, failed.collect());
        }
    }
}

/// The shared state of one node: its writer ([`StateWriter`]) and the threads that keep
/// its store a view of the state topic and, while this node owns it, carry out writes.
pub struct StateLog {
    node: String,
    next_id: Mutex<u64>,
    requests: String,
    /// What a request's ops may take ([`request_bytes`]).
    request_bytes: usize,
    /// Taken at [`StateLog::stop`]: its thread would otherwise outlive the cluster.
    producer: Mutex<Option<ThreadedProducer<RequestDeliveries>>>,
    waiters: Arc<Waiters>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    /// Set first at [`StateLog::stop`]: the owner takes no new batch and settles its last
    /// one while the applier still reads.
    closing: Arc<AtomicBool>,
    /// Disconnected once the owner has ended (its sender drops with it).
    owner_ended: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Set when the owner could not publish and stopped the engine.
    failure: Arc<Mutex<Option<String>>>,
    metrics: Metrics,
    /// When a write waiting for its answer was last raised as a stall: once every
    /// [`WAITING_NOTE_EVERY`] per node, however many writes wait.
    waiting_raised: Mutex<RaiseEvery>,
}

impl StateWriter for StateLog {
    fn send(self: Arc<Self>, ops: Vec<Op>) -> crate::store::state::Answers {
        let count = ops.len();
        let pending: Vec<_> = match ops.iter().map(serde_json::to_vec).collect::<Result<Vec<_>, _>>() {
            Ok(encoded) => {
                requests(&encoded, self.request_bytes).map(|chunk| (chunk.len(), self.request(chunk))).collect()
            }
            Err(e) => vec![(count, Err(format!("encoding a state request: {e}")))],
        };
        // One wait for all the requests of these writes, from the last one's sending (an
        // owner carries each out up to 50 s after its own): waited in turn, each its own
        // 60 s, an import's batch of 100 requests without an owner waited 100 minutes,
        // and its caller had long given up.
        let deadline = Instant::now() + ANSWER_WITHIN;
        Box::new(move || {
            let mut results = Vec::with_capacity(count);
            for (count, request) in pending {
                match request.and_then(|(id, answer)| self.wait(id, answer, deadline)) {
                    Ok(answers) => results.extend(answers.into_iter().map(|r| r.map_err(StoreError::from))),
                    Err(e) => results.extend((0..count).map(|_| Err(StoreError::State(e.clone())))),
                }
            }
            results
        })
    }
}

impl StateLog {
    /// Connects this node to the shared state: carries a single-node store over if the
    /// topic is empty, catches up with the topic (logging how long that took), starts
    /// the applier and the owner, and attaches itself to `store` as its writer. Blocks
    /// until caught up. `failed` is cancelled if the node can no longer keep its view.
    pub fn start(
        store: &Store,
        options: &StateOptions<'_>,
        metrics: Metrics,
        failed: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let config = |defaults: &[(&str, &str)]| options.reach.consumer(defaults);
        let producer_config = |defaults: &[(&str, &str)]| options.reach.producer(defaults);
        // Names this process's requests and replies; std's hasher keys are random.
        let node = {
            use std::hash::BuildHasher;
            format!("{:016x}", std::collections::hash_map::RandomState::new().hash_one(std::process::id()))
        };
        let reader: BaseConsumer = config(&[
            ("group.id", &format!("{}-state-view", options.reach.group_id)),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "false"),
            ("fetch.wait.max.ms", "10"),
            // What it fetches ahead of applying (librdkafka's default is 64 MB), in
            // fetches of up to 8 MB; and once that is full, librdkafka's default is to
            // wait 1 s before fetching again: a catch-up (2 000 000 records) spent half
            // its time waiting so.
            ("queued.max.messages.kbytes", "32768"),
            ("max.partition.fetch.bytes", "8388608"),
            ("fetch.queue.backoff.ms", "5"),
        ])
        .create()
        .context("creating the state topic's reader")?;
        let (_, end) = reader
            .fetch_watermarks(options.topic, 0, crate::cluster::ANSWER_WITHIN)
            .with_context(|| format!("reading the end of state topic {:?}", options.topic))?;

        // A carry-over into this topic that stopped part-way: the topic holds part of
        // the store's values, which are still the truth.
        let resumed = store.carrying_over()?.as_deref() == Some(options.topic);
        // Records published and the time it took, when this start carried the store over.
        let mut carried = None;
        if store.diverged()? {
            if end > 0 && !resumed {
                tracing::warn!("this store may hold writes the state topic lacks: rebuilding it from the topic");
                store.forget_state()?;
            } else if store.has_state()? {
                // Nothing to rebuild from (the embedded cluster's topic is new at every
                // start, or the store's carry-over is not over): the store stays the
                // truth, its last writes with it, and is published below.
                tracing::warn!(
                    topic = options.topic,
                    "this store may hold writes its last run did not confirm, but the state topic holds nothing \
                     to rebuild it from: keeping it as it is"
                );
                store.trust_state()?;
            }
        }
        let attached = store.viewing(options.topic, options.embedded)?;
        // Asked of the cluster once, when first needed: a cluster that cannot answer
        // (librdkafka's mock) is waited for seconds.
        let deletions_kept = DeletionsKept {
            admin: options.reach.producer(&[]),
            topic: options.topic.to_owned(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            known: std::sync::OnceLock::new(),
        };
        if attached && end > 0 && !resumed {
            // Read part way, never to the end, and with no time noted of when that
            // reading began: how long it was away is not known, and reading on may miss
            // deletions whose tombstones are gone since, so it starts over.
            if store.caught_up_at()?.is_none() && store.state_position()? > 0 {
                tracing::warn!(topic = options.topic,
                    "this store stopped reading the state topic part way, from a time not known: rebuilding it from the topic");
                store.forget_state()?;
            }
            if let Some(at) = store.caught_up_at()? {
                // Kafka drops a tombstone `delete.retention.ms` after compaction reached
                // it: a store away longer may have missed deletions (a number removed,
                // its old subscriber still mailed from here), and reading on from its
                // position would never bring them.
                // A store away less than the margin is in time for any topic kept as
                // docs/cluster.md says (at least twice the margin): not asked then, a
                // restart waits for nothing.
                let away = Duration::from_secs(unix_now(store).saturating_sub(at));
                if away >= AWAY_MARGIN && missed_deletions(away, deletions_kept.get()) {
                    tracing::warn!(topic = options.topic, ?away,
                        "this store was away from the state topic longer than it keeps deletions: rebuilding it from the topic");
                    store.forget_state()?;
                }
            }
        }
        if !attached {
            // A single-node store, or one that served on the embedded cluster: where it
            // stood in that cluster's topic means nothing in this one.
            store.forget_state_position()?;
        }
        // An empty topic takes the store's values below, whatever the store had read:
        // rebuilding from nothing would lose every subscriber.
        if attached && end > 0 && !resumed && store.state_position()? > end {
            tracing::warn!(
                topic = options.topic,
                end,
                position = store.state_position()?,
                "the state topic is shorter than this store has read (recreated?): rebuilding the store from it"
            );
            store.forget_state()?;
        }
        if (end == 0 || resumed) && store.has_state()? {
            // A single-node store's first start in cluster mode, or a state topic that
            // was lost (the embedded cluster lives only as long as its process): the
            // store's values become the topic's.
            if resumed {
                tracing::warn!(
                    topic = options.topic,
                    records = end,
                    "this store's carry-over into the state topic stopped part-way: publishing its subscribers again"
                );
            } else if attached && store.state_position()? > 0 {
                tracing::warn!(
                    topic = options.topic,
                    position = store.state_position()?,
                    "the state topic is empty but this store was a view of it (recreated, or an embedded cluster): \
                     publishing this store's subscribers into it"
                );
            }
            store.begin_carry_over(options.topic)?;
            carried = Some(carry_over(
                store,
                options,
                producer_config(&[
                    ("enable.idempotence", "true"),
                    ("acks", "all"),
                    ("message.max.bytes", crate::fax::MESSAGE_MAX_BYTES),
                ]),
            )?);
            // The store holds what it just published: reading it back would write every
            // value again. It is the topic's whole content, as of now.
            store.set_caught_up_at(unix_now(store))?;
            let (_, published) = reader
                .fetch_watermarks(options.topic, 0, crate::cluster::ANSWER_WITHIN)
                .with_context(|| format!("reading the end of state topic {:?}", options.topic))?;
            store.set_state_position(published)?;
        } else if !attached && store.has_state()? {
            anyhow::bail!(
                "this store holds the subscribers of a single-node engine, and state topic {:?} already holds the \
                 cluster's: move them with `callnotify provision export` here and `provision import --url` on a \
                 running node, or start this node on an empty store (docs/cluster.md)",
                options.topic
            );
        }
        store.set_state_topic(options.topic, options.embedded)?;
        store.end_carry_over()?;
        // Said once the store no longer holds the carry-over's mark on disk: the operator
        // starts the other nodes then, and a start of this one on a store still marked
        // would publish its old values again over what they wrote.
        if let Some((records, took)) = carried {
            tracing::info!(
                records,
                ?took,
                topic = options.topic,
                "carried this store's subscribers into the empty state topic"
            );
        }
        // A store about to read the topic from its start notes when: Kafka keeps a
        // tombstone `delete.retention.ms`, the bound on a reading begun then, so one
        // stopped part way and resumed is judged from it (above) as one away since.
        if store.caught_up_at()?.is_none() {
            store.set_caught_up_at(unix_now(store))?;
        }

        let progress = Arc::new(Progress::default());
        let waiters = Arc::new(Waiters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let closing = Arc::new(AtomicBool::new(false));
        let (owner_ends, owner_ended) = std::sync::mpsc::sync_channel(0);
        let failure = Arc::new(Mutex::new(None));
        let fenced = Arc::new(Fenced::of(store)?);
        let position = store.state_position()?;
        let end = end.max(position);
        progress.set(position);
        // What the store has applied already: the operator compares it across nodes.
        metrics.state_applied(position);
        let started = Instant::now();
        let applier = Applier {
            caught_up_noted: None,
            end_asked: None,
            // As the start left it: a store carried over is caught up as of then, one
            // away within the bound is judged on through its catch-up.
            caught_up_at: store.caught_up_at()?,
            deletions_kept,
            topic: options.topic.to_owned(),
            store: store.clone(),
            node: node.clone(),
            consumer: reader,
            waiters: waiters.clone(),
            progress: progress.clone(),
            stop: stop.clone(),
            metrics: metrics.clone(),
            epoch: store.owner_epoch()?,
            fenced: fenced.clone(),
            failed: failed.clone(),
            failure: failure.clone(),
        };
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(options.topic, 0, Offset::Offset(position))?;
        applier.consumer.assign(&assignment).context("reading the state topic")?;
        let mut threads =
            vec![std::thread::Builder::new().name("state-applier".into()).spawn(move || applier.run())?];
        let mut waited = Duration::ZERO;
        while !progress.wait_for(end, Duration::from_secs(10)) {
            if let Some(failure) = failure.lock().expect("failure lock").clone() {
                anyhow::bail!("catching up with the state topic: {failure}");
            }
            waited += Duration::from_secs(10);
            tracing::info!(applied = progress.get(), end, waited = ?waited, "catching up with the state topic");
        }
        tracing::info!(
            records = end - position,
            from = position,
            took = ?started.elapsed(),
            topic = options.topic,
            "subscriber state caught up"
        );

        let mut owner_config = config(&[
            ("group.id", &format!("{}-state", options.reach.group_id)),
            ("enable.auto.commit", "false"),
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "false"),
            ("fetch.wait.max.ms", "10"),
            ("fetch.queue.backoff.ms", "5"),
            ("statistics.interval.ms", crate::unread::STATISTICS_INTERVAL_MS),
        ]);
        let poll_interval = owner_poll_interval(owner_config.get("max.poll.interval.ms"));
        owner_config.set("max.poll.interval.ms", poll_interval);
        // Requests before its group's first commit are carried out, whatever the
        // operator's CDR consumers start from.
        owner_config.set("auto.offset.reset", "earliest");
        let owner = Owner {
            store: store.clone(),
            node: node.clone(),
            topic: options.topic.to_owned(),
            consumer: owner_config
                .create_with_context(OwnerContext {
                    assigned: AtomicBool::new(false),
                    owning: AtomicBool::new(false),
                    metrics: metrics.clone(),
                    unread: crate::unread::Unread::default(),
                })
                .context("creating the state owner's consumer")?,
            producer: producer_config(&[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("message.max.bytes", crate::fax::MESSAGE_MAX_BYTES),
                // A batch of an import is 200 000 records: at 1 ms the producer's
                // broker thread woke for a few records at a time and took a third of a
                // core from the owner. A batch's last records do not wait for it:
                // `confirmed` sends them at once.
                ("linger.ms", &OWNER_LINGER.as_millis().to_string()),
            ])
            // Not the operator's (a short one for dead letters, docs/kafka.md): the owner
            // waits out a broker's loss, it does not stop its node at the first seconds.
            .set("message.timeout.ms", PUBLISH_WITHIN.as_millis().to_string())
            .create_with_context(Published::default())
            .context("creating the state owner's producer")?,
            progress: progress.clone(),
            waiters: waiters.clone(),
            stop: stop.clone(),
            metrics: metrics.clone(),
            failed,
            failure: failure.clone(),
            epoch: std::cell::Cell::new(None),
            fenced,
            unsettled: std::cell::Cell::new(None),
            marked: std::cell::Cell::new(false),
            closing: closing.clone(),
            _ended: owner_ends,
        };
        owner.consumer.subscribe(&[options.requests]).context("subscribing to the state requests")?;
        threads.push(std::thread::Builder::new().name("state-owner".into()).spawn(move || owner.run())?);

        let mut producer_config = producer_config(&[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("message.max.bytes", crate::fax::MESSAGE_MAX_BYTES),
            ("linger.ms", "1"),
        ]);
        // Pinned, whatever `kafka.properties` says: a request the broker may still take
        // after this is still carried out by an owner for [`REQUEST_EXPIRES`], and its
        // writer waits [`ANSWER_WITHIN`] for the answer.
        producer_config.set("message.timeout.ms", "30000");
        let request_bytes = request_bytes(producer_config.get("message.max.bytes"));
        let producer: ThreadedProducer<RequestDeliveries> = producer_config
            .create_with_context(RequestDeliveries { waiters: waiters.clone() })
            .context("creating the state request producer")?;
        let log = Arc::new(Self {
            node,
            next_id: Mutex::new(1),
            requests: options.requests.to_owned(),
            request_bytes,
            producer: Mutex::new(Some(producer)),
            waiters,
            progress,
            stop,
            closing,
            owner_ended: Mutex::new(Some(owner_ended)),
            threads: Mutex::new(threads),
            failure,
            metrics: metrics.clone(),
            waiting_raised: Mutex::new(RaiseEvery::new(WAITING_NOTE_EVERY)),
        });
        store.attach_writer(log.clone());
        Ok(log)
    }

    /// Why this node stopped the engine, if it did (the owner could not publish).
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("failure lock").clone()
    }

    /// At the engine's stop, once its grace period has passed: writes still waiting for
    /// an answer are told the engine stops, later ones are refused, and the owner stops
    /// waiting for the state topic (its store is rebuilt at the next start).
    pub fn abandon_writes(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.progress.halt();
        self.waiters.forget_all();
    }

    /// Next offset of the state topic this node has applied.
    pub fn applied(&self) -> i64 {
        self.progress.get()
    }

    /// Stops the owner, the applier and the request producer (at the engine's stop);
    /// writes after it fail. The owner first, given up to [`CLOSE_WITHIN`]: it finishes
    /// the batch under way and waits for the applier to read its records back, so that
    /// a clean stop leaves no batch mark (which would rebuild the store at the next start).
    pub fn stop(&self) {
        self.closing.store(true, Ordering::Relaxed);
        if let Some(ended) = self.owner_ended.lock().expect("owner lock").take() {
            let _ = ended.recv_timeout(CLOSE_WITHIN);
        }
        self.stop.store(true, Ordering::Relaxed);
        self.progress.halt();
        drop(self.producer.lock().expect("producer lock").take());
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        for thread in threads {
            let _ = thread.join();
        }
        // No answer comes any more: the writes still waiting are told the node stops
        // (instead of waiting out their answer time, and the process's exit with them).
        self.waiters.forget_all();
    }

    /// Sends one request record, of `ops` (each one's JSON).
    fn request(&self, ops: &[Vec<u8>]) -> Result<(u64, std::sync::mpsc::Receiver<Results>), String> {
        // Ids reach the topic in the order they are given (an owner taking over skips
        // every id up to the last answered): one sender at a time.
        let mut next_id = self.next_id.lock().expect("request id lock");
        let id = *next_id;
        *next_id += 1;
        let count = ops.len();
        let payload = request_payload(&self.node, id, ops);
        let (answer_tx, answer) = std::sync::mpsc::sync_channel(1);
        self.waiters.0.lock().expect("waiters lock").insert(id, answer_tx);
        let mut record = BaseRecord::with_opaque_to(&self.requests, Box::new((id, count)))
            .key(self.node.as_str())
            .payload(payload.as_slice());
        let deadline = Instant::now() + ANSWER_WITHIN;
        let producer = self.producer.lock().expect("producer lock");
        let Some(producer) = producer.as_ref().filter(|_| !self.stop.load(Ordering::Relaxed)) else {
            self.waiters.0.lock().expect("waiters lock").remove(&id);
            return Err("the engine is stopping: no more writes of subscriber state".into());
        };
        loop {
            match producer.send(record) {
                Ok(()) => return Ok((id, answer)),
                // A full local queue empties as librdkafka sends; anything else (a
                // request past the producer's size) stays as it is.
                Err((
                    e @ rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    back,
                )) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "state request queue full; waiting");
                    std::thread::sleep(Duration::from_millis(5));
                    record = back;
                }
                Err((e, _)) => {
                    self.waiters.0.lock().expect("waiters lock").remove(&id);
                    return Err(format!("the state request could not be sent: {e}"));
                }
            }
        }
    }

    fn wait(&self, id: u64, answer: std::sync::mpsc::Receiver<Results>, deadline: Instant) -> Result<Results, String> {
        answer_by(&answer, deadline, || self.raise_waiting()).map_err(|e| {
            self.waiters.0.lock().expect("waiters lock").remove(&id);
            match (e, self.failure()) {
                (std::sync::mpsc::RecvTimeoutError::Disconnected, Some(failure)) => format!(
                    "this node stops ({failure}): the write may or may not be carried out; look at it on another node"
                ),
                (std::sync::mpsc::RecvTimeoutError::Disconnected, None) => {
                    "the engine stops before the state owner answered: the write may or may not be carried out".into()
                }
                _ => format!(
                    "no state owner answered within {} s (is the Kafka cluster reachable, and topic {:?} readable?): \
                     not carried out, unless an owner took it up in time and waits for the state topic to confirm it \
                     (it then shows in a while)",
                    ANSWER_WITHIN.as_secs(),
                    self.requests
                ),
            }
        })
    }

    /// A write has waited [`WAITING_NOTE_EVERY`] for its answer. Whatever the cause (no
    /// node holds the request partition, an owner that cannot read it or waits for the
    /// state topic), the node whose users wait raises it, at most once a period.
    fn raise_waiting(&self) {
        if !self.waiting_raised.lock().expect("waiting lock").due(Instant::now()) {
            return;
        }
        crate::error_event!(self.metrics, ErrorEvent::StateStalled, waited = ?WAITING_NOTE_EVERY, requests = %self.requests,
            "a write of subscriber state has waited for the state owner's answer (does a node hold the request \
            partition and read it? is the state topic writable?); waiting on");
    }
}

impl Drop for StateLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How long after it was sent a request reached the owner, if past [`REQUEST_EXPIRES`]
/// (by the record's creation time; a record without one is taken as in time).
fn too_late(message: &OwnedMessage) -> Option<Duration> {
    let rdkafka::Timestamp::CreateTime(sent_ms) = message.timestamp() else { return None };
    let late = Duration::from_millis(chrono::Utc::now().timestamp_millis().saturating_sub(sent_ms).max(0) as u64);
    (late > REQUEST_EXPIRES).then_some(late)
}

/// Kafka's default `delete.retention.ms`: what a start assumes when the state topic's
/// own cannot be read (no `DescribeConfigs` right).
const TOMBSTONES_KEPT_BY_DEFAULT: Duration = Duration::from_secs(86_400);

/// How much sooner than the topic drops tombstones a store away is rebuilt: its last
/// note of being caught up may be a minute old, and it may have lagged behind a little.
const AWAY_MARGIN: Duration = Duration::from_secs(3_600);

/// Unix seconds by `store`'s clock: when a view noted itself caught up, and how long
/// since.
fn unix_now(store: &Store) -> u64 {
    store.now().timestamp().max(0) as u64
}

/// Whether a store away from the state topic for `away` may have missed deletions that
/// it keeps for `kept` (its `delete.retention.ms`): reading on would never bring them.
fn missed_deletions(away: Duration, kept: Duration) -> bool {
    away + AWAY_MARGIN >= kept
}

/// How long the state topic keeps a tombstone after compaction reaches it (its
/// `delete.retention.ms`), asked of the cluster when first needed.
struct DeletionsKept {
    /// A client configuration reaching the cluster.
    admin: ClientConfig,
    topic: String,
    /// Where the admin answer is awaited: the start runs on tokio's blocking pool, the
    /// applier on a thread of its own.
    runtime: Option<tokio::runtime::Handle>,
    known: std::sync::OnceLock<Duration>,
}

impl DeletionsKept {
    fn get(&self) -> Duration {
        *self.known.get_or_init(|| {
            use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
            let admin = self.admin.create::<AdminClient<rdkafka::client::DefaultClientContext>>().ok();
            let asked = self.runtime.as_ref().zip(admin).and_then(|(runtime, admin)| {
                // A cluster answers at once; one that cannot (librdkafka's mock) is not
                // waited for long.
                let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
                let described =
                    runtime.block_on(admin.describe_configs(&[ResourceSpecifier::Topic(&self.topic)], &opts));
                described.ok()?.pop()?.ok()?.get("delete.retention.ms")?.value.as_deref()?.parse::<u64>().ok()
            });
            match asked {
                Some(ms) => Duration::from_millis(ms),
                _ => {
                    tracing::warn!(topic = self.topic, assumed = ?TOMBSTONES_KEPT_BY_DEFAULT,
                        "the state topic's delete.retention.ms could not be read (DescribeConfigs): assuming Kafka's default");
                    TOMBSTONES_KEPT_BY_DEFAULT
                }
            }
        })
    }
}

/// [`Applier::note_caught_up`]'s judgement: the unix time as of which a store applied
/// up to `progress` is caught up, if it is. `asked` keeps when `ask` (the broker) was
/// asked, the end it told (none: unanswered) and the unix time, until `progress`
/// reaches that end; `now` is (the instant, unix seconds).
fn caught_up_as_of(
    asked: &mut Option<(Instant, Option<i64>, u64)>,
    progress: i64,
    now: (Instant, u64),
    ask: impl FnOnce() -> Option<i64>,
) -> Option<u64> {
    let as_of = match *asked {
        Some((_, Some(end), at)) if progress >= end => Some(at),
        // An end told is kept until reached (asked again, a lag of more than the time
        // between asks would never reach it).
        Some((_, Some(_), _)) => return None,
        // Unanswered: asked again in 10 s.
        Some((when, None, _)) if now.0.saturating_duration_since(when) < Duration::from_secs(10) => return None,
        _ => match ask() {
            Some(end) if progress >= end => Some(now.1),
            end => {
                *asked = Some((now.0, end, now.1));
                return None;
            }
        },
    };
    *asked = None;
    as_of
}

/// How long the applier waits for the broker's answer to where the state topic ends.
const END_ASKED_WITHIN: Duration = Duration::from_secs(5);

/// The end of the state topic as its broker says it now, if it answers in time. The end
/// librdkafka last fetched is no evidence: a node cut off from its brokers keeps it, and
/// noted itself caught up with it every minute while deletions passed it by.
fn end_now<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str) -> Option<i64> {
    consumer.fetch_watermarks(topic, 0, END_ASKED_WITHIN).ok().map(|(_, high)| high)
}

/// Publishes every value of `store` into the empty state topic (the one-time move of a
/// single-node store into cluster mode): how many, in how long.
fn carry_over(store: &Store, options: &StateOptions<'_>, config: ClientConfig) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let producer: BaseProducer<Published> =
        config.create_with_context(Published::default()).context("creating the carry-over producer")?;
    let mut count = 0u64;
    for entry in store.state_entries() {
        let (key, value) = entry?;
        let key = key.encode();
        let mut record = BaseRecord::<str, [u8]>::to(options.topic).key(key.as_str()).payload(value.as_ref());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    producer.poll(Duration::from_millis(10));
                    record = back;
                }
            }
        }
        count += 1;
    }
    producer.flush(Duration::from_secs(60)).context("carrying the store over into the state topic")?;
    if let (_, Some(failure)) = &*producer.context().last.lock().expect("published lock") {
        anyhow::bail!("carrying the store over into the state topic: a record was not written: {failure}");
    }
    Ok((count, started.elapsed()))
}

/// Keeps the store a view of the state topic, from its position on.
struct Applier {
    /// When it last noted the store caught up ([`Applier::note_caught_up`]).
    caught_up_noted: Option<Instant>,
    /// The state topic.
    topic: String,
    store: Store,
    node: String,
    consumer: BaseConsumer,
    waiters: Arc<Waiters>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    metrics: Metrics,
    /// The epoch in force where it reads: the offset of the last announcement read.
    epoch: Option<i64>,
    /// Where it leaves the keys a replaced owner wrote, for the owner.
    fenced: Arc<Fenced>,
    /// Cancelled, with `failure` set, when this node finds its own records fenced.
    failed: CancellationToken,
    failure: Arc<Mutex<Option<String>>>,
    /// When it last asked the broker where the topic ends, the end told (none:
    /// unanswered) and the unix time it was asked at ([`Applier::note_caught_up`]).
    end_asked: Option<(Instant, Option<i64>, u64)>,
    /// When the store last noted itself caught up (unix seconds).
    caught_up_at: Option<u64>,
    /// The topic's `delete.retention.ms`, for [`Applier::away_too_long`].
    deletions_kept: DeletionsKept,
}

impl Applier {
    fn run(mut self) {
        let mut values = Vec::new();
        let mut answers = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let mut next = None;
            let mut answered: Vec<(String, u64)> = Vec::new();
            let mut ignored = Ignored::default();
            // Keys read fenced, and read written in the epoch in force, in this batch.
            let (mut fenced_now, mut cleared) = (HashSet::new(), HashSet::new());
            let mut wait = Duration::from_millis(100);
            let mut at_end = false;
            for _ in 0..RECORDS_PER_APPLY {
                match self.consumer.poll(wait) {
                    None => {
                        at_end = true;
                        break;
                    }
                    Some(Err(e)) => {
                        crate::error_event!(self.metrics, ErrorEvent::StateRead, error = %e, "reading the state topic failed; trying again");
                        break;
                    }
                    Some(Ok(message)) => {
                        // Back after being cut off (the store not noted caught up since):
                        // judged before anything read is applied.
                        if next.is_none() && self.away_too_long() {
                            self.stop_away();
                            return;
                        }
                        wait = Duration::ZERO;
                        next = Some(message.offset() + 1);
                        let key = message.key().unwrap_or_default();
                        if key.starts_with(ANNOUNCEMENT.as_bytes()) {
                            self.epoch = Some(message.offset());
                            continue;
                        }
                        let (writer, written_in) = written_as(&message).map_or((None, None), |(n, e)| (Some(n), e));
                        let own = writer == Some(self.node.as_bytes());
                        // A store that applied the topic before owners had epochs
                        // takes the first one it meets.
                        self.epoch = self.epoch.or(written_in);
                        if written_in.is_some() && written_in != self.epoch {
                            if let Some(fenced) = ignored.note(key, message.offset(), written_in, own) {
                                cleared.remove(&fenced);
                                fenced_now.insert(fenced);
                            }
                            continue;
                        }
                        answered.extend(carried_out(&message));
                        let encoded = key;
                        if let Some(key) = StateKey::decode(encoded) {
                            // The owner's, or another node's, writing again of a fenced key.
                            if !fenced_now.is_empty() || self.fenced.any() {
                                let encoded = std::str::from_utf8(encoded).unwrap_or_default();
                                if fenced_now.remove(encoded) || self.fenced.contains(encoded) {
                                    cleared.insert(encoded.to_owned());
                                }
                            }
                            // What this node wrote as the owner, its store has already.
                            if !own {
                                values.push((key, message.payload().map(<[u8]>::to_vec)));
                            }
                        } else if let Some(answer) =
                            message.payload().and_then(|p| serde_json::from_slice::<Answer>(p).ok())
                        {
                            answered.push((answer.node.clone(), answer.id));
                            if answer.node == self.node {
                                answers.push(answer);
                            }
                        }
                    }
                }
            }
            let Some(next) = next else {
                if at_end {
                    self.note_caught_up();
                }
                continue;
            };
            // Before the position moves: an owner waiting for its records sees the stop.
            self.report(ignored);
            // And the fenced keys are kept before it: a restart reads this batch again.
            if !fenced_now.is_empty() || !cleared.is_empty() {
                while let Err(e) = self.store.change_fenced(&fenced_now, &cleared) {
                    crate::error_event!(self.metrics, ErrorEvent::StateApply, error = %e, "keeping fenced keys in this node's store failed; trying again");
                    if self.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                self.fenced.change(&fenced_now, &cleared);
            }
            let unreadable = loop {
                match self.store.apply_state(&values, next, self.epoch, &answered) {
                    Ok(unreadable) => break unreadable,
                    Err(e) => {
                        crate::error_event!(self.metrics, ErrorEvent::StateApply, error = %e, "applying the state topic to this node's store failed; trying again");
                    }
                }
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            };
            for Unreadable { key, why } in unreadable {
                crate::error_event!(
                    self.metrics,
                    ErrorEvent::StateUnreadable,
                    key,
                    error = why,
                    "a record of the state topic is not one any version writes: passed over"
                );
            }
            values.clear();
            self.progress.set(next);
            self.metrics.state_applied(next);
            for answer in answers.drain(..) {
                self.waiters.answer(answer.id, answer.results);
            }
            // After the answers: it may wait seconds for the broker.
            self.note_caught_up();
        }
    }
}

/// The records of replaced owners met in one read of the state topic: reported once,
/// not one ERROR each (a paused owner's batch is thousands).
#[derive(Default)]
struct Ignored {
    records: usize,
    /// The first one: key, offset, and the epoch it was written in.
    first: Option<(String, i64, Option<i64>)>,
    /// Whether any was this node's own.
    own: bool,
}

impl Ignored {
    /// Another node's key (returned) goes to the owner, to be written again.
    fn note(&mut self, key: &[u8], offset: i64, written_in: Option<i64>, own: bool) -> Option<String> {
        let key = String::from_utf8_lossy(key).into_owned();
        self.records += 1;
        self.own |= own;
        let fenced = (!own && StateKey::decode(key.as_bytes()).is_some()).then(|| key.clone());
        self.first.get_or_insert((key, offset, written_in));
        fenced
    }
}

impl Applier {
    /// Notes in the store, once a minute at most, that it has read the topic to its end
    /// (what a start measures the store's time away by).
    fn note_caught_up(&mut self) {
        if self.caught_up_noted.is_some_and(|at| at.elapsed() < Duration::from_secs(60)) {
            return;
        }
        // Caught up as of a time T: every record the topic held at T applied, by the end
        // its broker told at T (asked every 10 s at most; reached later, the note is of
        // T). Not by what was fetched: the local queue empties between fetches (a node
        // catching up after days away noted itself caught up at its first poll, then,
        // killed midway, was not rebuilt at its next start), and a node cut off from its
        // brokers keeps the end it last fetched. Nor only when idle: a node reading state
        // writes without a pause for a day would never have noted itself caught up.
        let (consumer, topic) = (&self.consumer, &self.topic);
        let asked = &mut self.end_asked;
        let as_of = caught_up_as_of(asked, self.progress.get(), (Instant::now(), unix_now(&self.store)), || {
            end_now(consumer, topic)
        });
        let Some(at) = as_of else { return };
        match self.store.set_caught_up_at(at).and_then(|()| self.store.note_read_to_end()) {
            Ok(()) => (self.caught_up_noted, self.caught_up_at) = (Some(Instant::now()), Some(at)),
            Err(e) => tracing::warn!(error = %e, "noting the store caught up failed; trying again"),
        }
    }

    /// Whether this node, reading again after being cut off from the state topic, was
    /// away longer than the topic keeps deletions (as a start judges it): it stops, and
    /// its next start rebuilds its store (reading on, it would mail a removed number's
    /// old subscriber for good).
    fn away_too_long(&self) -> bool {
        let Some(at) = self.caught_up_at else { return false };
        let away = Duration::from_secs(unix_now(&self.store).saturating_sub(at));
        away >= AWAY_MARGIN && missed_deletions(away, self.deletions_kept.get())
    }

    /// Stops the node after [`Applier::away_too_long`]: its store keeps the time it last
    /// noted itself caught up, and its next start rebuilds it.
    fn stop_away(&self) {
        let mut failure = self.failure.lock().expect("failure lock");
        if failure.is_some() {
            return;
        }
        let kept = self.deletions_kept.get();
        // A backup of this store would hold what it missed (`provision export` refuses).
        if let Err(e) = self.store.forget_read_to_end() {
            tracing::warn!(error = %e, "taking back the store's mark of a view read to its end failed");
        }
        crate::error_event!(
            self.metrics,
            ErrorEvent::StateRead,
            caught_up_at = self.caught_up_at,
            ?kept,
            "this node was cut off from the state topic longer than the topic keeps deletions: it may have missed \
             some; it stops and rebuilds its store from the topic at its next start"
        );
        *failure = Some(format!(
            "cut off from the state topic longer than it keeps deletions ({kept:?}): this node's store is rebuilt at its next start"
        ));
        drop(failure);
        self.waiters.forget_all();
        self.failed.cancel();
    }

    /// Records written in an epoch a later announcement ended were ignored. This
    /// node's own among them means it was that replaced owner, and its store holds
    /// writes nobody else applied: it stops, and rebuilds its store at its next start.
    fn report(&self, ignored: Ignored) {
        let Some((key, offset, written_in)) = ignored.first else { return };
        let (records, epoch) = (ignored.records, self.epoch);
        if !ignored.own {
            crate::error_event!(self.metrics, ErrorEvent::StateFenced, records, key, offset, written_in, epoch,
                "state records of a replaced owner (paused past its session) were ignored; the owner writes their keys again");
            return;
        }
        let mut failure = self.failure.lock().expect("failure lock");
        if failure.is_some() {
            return;
        }
        crate::error_event!(
            self.metrics,
            ErrorEvent::StateFenced,
            records,
            key,
            offset,
            written_in,
            epoch,
            "this node's writes as the state owner are ignored: another node took over while it was paused; \
            this node stops and rebuilds its store from the state topic at its next start"
        );
        let _ = self.store.mark_diverged();
        *failure =
            Some("another node became the state owner while this one was paused; its writes since are ignored".into());
        drop(failure);
        self.waiters.forget_all();
        self.failed.cancel();
    }
}

/// The header naming the owner that wrote a record: its node id, then `:` and its
/// epoch (decimal) once it announced itself. One header, not two: a catch-up reads
/// millions of records, and a second header cost it a sixth more time.
const OWNER_HEADER: &str = "owner";
/// Header of the last value record a request wrote: `NODE:ID`. A node applying it counts
/// the request answered, as its reply would: an owner that stopped after a request's
/// values and before its reply left a successor that would carry the request out again
/// (a wrong password counted twice, R-S2/R-S3), had it gone by replies only.
const REQUEST_HEADER: &str = "request";

/// The request (node, id) whose last value `message` is, if it is one.
fn carried_out(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<(String, u64)> {
    use rdkafka::message::Headers as _;
    let value = message.headers()?.iter().find(|h| h.key == REQUEST_HEADER)?.value?;
    let (node, id) = std::str::from_utf8(value).ok()?.rsplit_once(':')?;
    Some((node.to_owned(), id.parse().ok()?))
}

/// Who wrote `message` as the owner: its node id and epoch (`None` for a record
/// written without one: carried over into an empty topic, or by an engine before
/// epochs, or an announcement).
fn written_as<'m>(message: &'m rdkafka::message::BorrowedMessage<'_>) -> Option<(&'m [u8], Option<i64>)> {
    use rdkafka::message::Headers as _;
    let value = message.headers()?.iter().find(|h| h.key == OWNER_HEADER)?.value?;
    Some(match value.iter().rposition(|&b| b == b':') {
        Some(at) => (&value[..at], std::str::from_utf8(&value[at + 1..]).ok().and_then(|e| e.parse().ok())),
        None => (value, None),
    })
}

/// The owner consumer's `max.poll.interval.ms`, given the one configured
/// (`kafka.properties`): at least [`OWNER_POLL_INTERVAL`]. The owner does not poll while
/// it waits for the state topic (up to [`PUBLISH_WITHIN`]): a shorter interval would
/// hand the partition to another node while this one still publishes. A dead owner is
/// noticed by its session timeout all the same.
fn owner_poll_interval(configured: Option<&str>) -> String {
    let least = OWNER_POLL_INTERVAL.as_millis();
    configured.and_then(|v| v.trim().parse::<u128>().ok()).map_or(least, |v| v.max(least)).to_string()
}

/// Has `producer` send what it holds at once, whatever its `linger.ms`, for up to
/// `wait` or until every record is delivered. librdkafka's `rd_kafka_flush` does that
/// for its duration; rdkafka's `flush` calls it without a wait and then polls, so the
/// broker thread seldom woke while it held.
fn send_now<C: ProducerContext>(producer: &BaseProducer<C>, wait: Duration) {
    let wait = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the pointer is the live handle `producer` owns, for the whole call; librdkafka
    // allows rd_kafka_flush from any thread. Its answer (timed out, or all delivered) is
    // read by the caller from `in_flight_count`.
    unsafe {
        rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), wait);
    }
}

/// Notes each assignment of the request partition (the owner catches up first) and
/// shows in `callnotify_state_owner` whether this node is the owner.
struct OwnerContext {
    /// Set at an assignment, until the owner has caught up and announced itself.
    assigned: AtomicBool,
    /// Whether this node holds the request partition now.
    owning: AtomicBool,
    metrics: Metrics,
    /// The request partition, if assigned and not read (see [`crate::unread`]).
    unread: crate::unread::Unread,
}

impl ClientContext for OwnerContext {
    fn stats(&self, stats: rdkafka::Statistics) {
        self.unread.note(&stats, Instant::now());
    }
}

impl ConsumerContext for OwnerContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) if partitions.count() > 0 => {
                self.assigned.store(true, Ordering::Relaxed);
                self.owning.store(true, Ordering::Relaxed);
                self.metrics.state_owner(true);
                tracing::info!("this node now carries out writes of subscriber state (the state owner)");
            }
            Rebalance::Revoke(partitions) if partitions.count() > 0 => {
                self.owning.store(false, Ordering::Relaxed);
                self.metrics.state_owner(false);
            }
            _ => {}
        }
    }
}

/// What the owner's producer confirmed: the highest offset, and any failure.
#[derive(Default)]
struct Published {
    last: Mutex<(Option<i64>, Option<String>)>,
}

impl ClientContext for Published {}

impl ProducerContext for Published {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut last = self.last.lock().expect("published lock");
        match result {
            Ok(message) => last.0 = last.0.max(Some(message.offset())),
            Err((e, _)) => last.1 = Some(e.to_string()),
        }
    }
}

/// Carries out the requests while this node holds the request partition.
struct Owner {
    store: Store,
    /// This node's id: its applier skips the values it wrote as the owner.
    node: String,
    topic: String,
    consumer: BaseConsumer<OwnerContext>,
    producer: BaseProducer<Published>,
    progress: Arc<Progress>,
    /// Woken without answers when this owner stops its node.
    waiters: Arc<Waiters>,
    stop: Arc<AtomicBool>,
    metrics: Metrics,
    failed: CancellationToken,
    /// Why the node stopped, for the engine's exit.
    failure: Arc<Mutex<Option<String>>>,
    /// The offset of this owner's announcement, once made: every record it writes
    /// carries it.
    epoch: std::cell::Cell<Option<i64>>,
    /// Keys a replaced owner wrote last, found by the applier: written again.
    fenced: Arc<Fenced>,
    /// The offset of the last record this owner published, until its applier has read
    /// it (the store keeps its batch mark until then).
    unsettled: std::cell::Cell<Option<i64>>,
    /// Whether the store holds the batch mark this owner set (and has not taken back).
    /// A batch may publish nothing (its requests answered by an earlier owner): its mark
    /// is taken back with no record of its own to wait for.
    marked: std::cell::Cell<bool>,
    /// [`StateLog::closing`]: no new batch, the last one settled, then return.
    closing: Arc<AtomicBool>,
    /// Dropped with the owner: tells [`StateLog::stop`] it has ended.
    _ended: std::sync::mpsc::SyncSender<()>,
}

/// How the owner's turn at a batch of requests ended.
enum Turn {
    /// Carried out, published, confirmed and committed.
    Done,
    /// Not started: the previous owner's writes could not be read yet (the state topic
    /// unreachable). Nothing was written: the same batch is taken again.
    NotCaughtUp(anyhow::Error),
    /// The engine stops while the state topic has not confirmed the batch (or the
    /// owner's announcement, before it wrote anything), or because its records were
    /// fenced (another owner took over).
    Stopped,
}

impl Owner {
    fn run(self) {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        // Since when the previous owner's writes could not be read. Raised at once,
        // then every WAITING_NOTE_EVERY: an owner that took over during a broker's loss
        // (its group coordinator lost with it) may spend less than that here, while
        // writes waited far longer.
        let mut not_caught_up: Option<Instant> = None;
        let mut raise = RaiseEvery::new(WAITING_NOTE_EVERY);
        while !self.stop.load(Ordering::Relaxed) {
            if self.closing.load(Ordering::Relaxed) {
                self.close();
                return;
            }
            self.read_unread();
            let mut wait = Duration::from_millis(100);
            while batch.len() < REQUESTS_PER_BATCH {
                match self.consumer.poll(wait) {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "reading state requests failed; trying again");
                        break;
                    }
                    Some(Ok(message)) => {
                        wait = Duration::ZERO;
                        batch.push(message.detach());
                    }
                }
            }
            let owning = self.consumer.context().owning.load(Ordering::Relaxed);
            if !owning {
                // Revoked while gathering: the partition's next owner carries them out.
                batch.clear();
                self.epoch.set(None);
                self.fenced.none_written();
            }
            // Not owning, or nothing to do: its last batch's mark is taken back once the
            // applier has read that batch (kept, the next start would rebuild the store
            // for nothing).
            if !owning || (batch.is_empty() && !self.fenced.any_to_write()) {
                match self.settled() {
                    // Its records fenced: the applier stops the node.
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "taking back the state owner's batch mark failed"),
                }
                continue;
            }
            // A failure while the engine stops is the stop's.
            let turn = match self.carry_out(&batch) {
                Err(_) if self.stop.load(Ordering::Relaxed) => Ok(Turn::Stopped),
                turn => turn,
            };
            match turn {
                Ok(Turn::Done) => {
                    batch.clear();
                    not_caught_up = None;
                    raise.reset();
                }
                Ok(Turn::NotCaughtUp(e)) => {
                    let now = Instant::now();
                    let since = *not_caught_up.get_or_insert(now);
                    if raise.due(now) {
                        crate::error_event!(self.metrics, ErrorEvent::StateStalled, error = %e, waited = ?now.duration_since(since),
                            "the state owner could not read the previous owner's writes yet; trying again, writes of subscriber state wait");
                    } else {
                        tracing::warn!(error = %e, "the state owner could not read the previous owner's writes yet; trying again");
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                // The batch's writes, if it made any, may or may not reach the topic:
                // its mark stays, and the store is rebuilt from the topic at the next
                // start. An owner that stopped before it wrote (while it announced
                // itself) leaves no mark: nothing to rebuild.
                Ok(Turn::Stopped) => return,
                Err(e) => {
                    crate::error_event!(self.metrics, ErrorEvent::StatePublish, error = %e,
                        "publishing subscriber state failed: this node stops and rebuilds its store from the state topic at its next start");
                    let _ = self.store.mark_diverged();
                    *self.failure.lock().expect("failure lock") =
                        Some(format!("publishing subscriber state failed: {e:#}"));
                    self.waiters.forget_all();
                    self.failed.cancel();
                    return;
                }
            }
        }
    }

    /// Assigns the request partition again if librdkafka left it unread (see
    /// [`crate::unread`]): every write of subscriber state in the cluster waits for it.
    fn read_unread(&self) {
        let unread = self.consumer.context().unread.take_due();
        if unread.is_empty() {
            return;
        }
        crate::error_event!(self.metrics, ErrorEvent::PartitionUnread, partitions = ?unread, after = ?crate::unread::UNREAD_AFTER,
            "the state owner's request partition is assigned and not read (its committed offset was not fetched); \
            assigning it again: writes of subscriber state wait until then");
        if let Err(e) = crate::unread::assign_again(&self.consumer, &unread) {
            tracing::warn!(error = %e, "assigning the request partition again failed; trying again later");
        }
    }

    /// Waits until the previous owner's writes (every record below the state topic's
    /// end) are applied here, once per assignment of the request partition.
    fn catch_up(&self) -> anyhow::Result<()> {
        if !self.consumer.context().assigned.load(Ordering::Relaxed) {
            return Ok(());
        }
        // This client reads the requests, not the state topic: it would ask the leader
        // it last knew of (none, after a broker's loss) until its metadata grew old.
        let metadata = self.consumer.fetch_metadata(Some(&self.topic), crate::cluster::ANSWER_WITHIN)?;
        let leader = metadata.topics().first().and_then(|t| t.partitions().first()).map(|p| p.leader());
        if leader.is_none_or(|leader| leader < 0) {
            anyhow::bail!("the state topic {:?} has no leader", self.topic);
        }
        let (_, end) = self.consumer.fetch_watermarks(&self.topic, 0, crate::cluster::ANSWER_WITHIN)?;
        if !self.progress.wait_for(end, ANSWER_WITHIN) {
            anyhow::bail!("the state topic was not read up to its end ({end}) within {ANSWER_WITHIN:?}");
        }
        Ok(())
    }

    /// Once caught up after an assignment: announces this owner, so that records of an
    /// earlier one written after this point are ignored everywhere, and waits until
    /// the applier has read the announcement. False if the engine stops first.
    fn announce(&self) -> anyhow::Result<bool> {
        let key = format!("{ANNOUNCEMENT}{}/{}", self.node, chrono::Utc::now().timestamp_millis());
        self.send(&key, Some(br#"{"owner":true}"#), None)?;
        if !self.confirmed()? {
            return Ok(false);
        }
        let (last, failure) = std::mem::take(&mut *self.producer.context().last.lock().expect("published lock"));
        if let Some(failure) = failure {
            anyhow::bail!("the owner's announcement was not written: {failure}");
        }
        let epoch = last.context("the owner's announcement was confirmed without an offset")?;
        if !self.progress.wait_for(epoch + 1, ANSWER_WITHIN) {
            anyhow::bail!("this node's applier did not read the owner's announcement within {ANSWER_WITHIN:?}");
        }
        self.epoch.set(Some(epoch));
        self.consumer.context().assigned.store(false, Ordering::Relaxed);
        tracing::info!(epoch, "the state owner announced itself: records of earlier owners after this are ignored");
        Ok(true)
    }

    fn carry_out(&self, batch: &[OwnedMessage]) -> anyhow::Result<Turn> {
        if let Err(e) = self.catch_up() {
            return Ok(Turn::NotCaughtUp(e));
        }
        if self.consumer.context().assigned.load(Ordering::Relaxed) && !self.announce()? {
            return Ok(Turn::Stopped);
        }
        if !self.marked.get() {
            self.store.begin_owner_batch()?;
            self.marked.set(true);
        }
        for key in self.fenced.to_write() {
            if let Some(state_key) = StateKey::decode(key.as_bytes()) {
                let value = self.store.state_value(&state_key)?;
                self.publish(&key, value.as_deref())?;
            }
        }
        for message in batch {
            let request = match Read::of(message.payload()) {
                Read::Request(request) => request,
                Read::Unknown { envelope, why } => {
                    if self.store.answered(&envelope.node)?.is_some_and(|done| envelope.id <= done) {
                        continue;
                    }
                    tracing::warn!(offset = message.offset(), node = %envelope.node, error = %why,
                        "a state request with ops (or fields of them) this node does not know (a newer version's?): refused");
                    let refusal =
                        format!("an op or a field this state owner does not know (an older version's?): {why}");
                    let results = envelope.ops.iter().map(|_| Err(OpError::Failed(refusal.clone()))).collect();
                    let answer = Answer { node: envelope.node, id: envelope.id, results };
                    self.publish(&format!("reply/{}", answer.node), Some(&serde_json::to_vec(&answer)?))?;
                    continue;
                }
                Read::Junk => {
                    tracing::warn!(offset = message.offset(), "a state request that is not one: skipped");
                    continue;
                }
            };
            if self.store.answered(&request.node)?.is_some_and(|done| request.id <= done) {
                continue; // Answered by an earlier owner that stopped before committing.
            }
            if let Some(late) = too_late(message) {
                tracing::warn!(offset = message.offset(), node = %request.node, ?late,
                    "a state request reached the owner after its sender stopped waiting: refused, not carried out");
                let refusal = format!(
                    "not carried out: the state owner took the write up {} s after it was sent, past its answer time",
                    late.as_secs()
                );
                let results = request.ops.iter().map(|_| Err(OpError::Failed(refusal.clone()))).collect();
                let answer = Answer { node: request.node, id: request.id, results };
                self.publish(&format!("reply/{}", answer.node), Some(&serde_json::to_vec(&answer)?))?;
                continue;
            }
            let mut results = Vec::with_capacity(request.ops.len());
            // Published once the request is carried out, the last one marked as its
            // ([`REQUEST_HEADER`]).
            let mut records: Vec<(String, Option<Vec<u8>>)> = Vec::new();
            // One after another: an import's lines on several threads (`store::batch`)
            // made an import through a node no faster on two cores shared with the
            // broker, the importer and the applier (BENCHMARKS.md, "An import on
            // several threads").
            for op in &request.ops {
                let before = self.store.values_before(op)?;
                // What an op refused or failed part way wrote is published too: this
                // store holds it, and every other must.
                let (reply, changed) = self.store.attempt(op);
                match changed {
                    Changed::Keys(touched) => {
                        // Only what changed: a login that counts nothing writes nothing.
                        for key in touched {
                            let value = self.store.state_value(&key)?;
                            if before.iter().any(|(k, v)| *k == key && *v == value) {
                                continue;
                            }
                            records.push((key.encode(), value.map(|v| v.to_vec())));
                        }
                    }
                    Changed::Values(written) => {
                        for (key, value) in written.into_values() {
                            records.push((key.encode(), value.map(|v| v.to_vec())));
                        }
                    }
                }
                if let Err(e) = &reply {
                    tracing::debug!(op = op.name(), error = %e, "a state write was refused");
                }
                results.push(reply.map_err(|e| OpError::from(&e)));
            }
            // The numbers an import moved or removed, listed up to a bound: lines of
            // many numbers made answers past what a record takes, which stopped every
            // owner in turn on the same request.
            // As many of each as an import's report lists.
            let (mut moved, mut removed) = (crate::provision::MAX_LISTED, crate::provision::MAX_LISTED);
            for result in &mut results {
                if let Ok(Reply::Upserted(upserted)) = result {
                    let listed = upserted.list_at_most(moved, removed);
                    (moved, removed) = (moved - listed.0, removed - listed.1);
                }
            }
            let last = records.len().saturating_sub(1);
            for (i, (key, value)) in records.iter().enumerate() {
                let carried_out = (i == last).then_some((request.node.as_str(), request.id));
                self.publish_for(key, value.as_deref(), carried_out)?;
            }
            let answer = Answer { node: request.node, id: request.id, results };
            let key = format!("reply/{}", answer.node);
            self.publish(&key, Some(&serde_json::to_vec(&answer)?))?;
        }
        if !self.confirmed()? {
            return Ok(Turn::Stopped);
        }
        let (last, failure) = std::mem::take(&mut *self.producer.context().last.lock().expect("published lock"));
        if let Some(failure) = failure {
            anyhow::bail!("a state record was not written: {failure}");
        }
        // The next batch does not wait for this one to be read back here: the store
        // has its own writes already, and the applier applies no other writer's value
        // in this owner's epoch. The batch mark stays until the applier has read them.
        if last.is_some() {
            self.unsettled.set(last);
        }
        if self.settled()? {
            // The applier found these records, or earlier ones, fenced and stops the
            // node: the store keeps its mark, to be rebuilt.
            return Ok(Turn::Stopped);
        }
        let (Some(first), Some(last_request)) = (batch.first(), batch.last()) else {
            return Ok(Turn::Done); // Only keys written again.
        };
        let mut commit = TopicPartitionList::new();
        commit.add_partition_offset(first.topic(), first.partition(), Offset::Offset(last_request.offset() + 1))?;
        if let Err(e) = self.consumer.commit(&commit, CommitMode::Sync) {
            // The replies are written: a successor skips these requests anyway.
            tracing::warn!(error = %e, "committing state requests failed");
        }
        Ok(Turn::Done)
    }

    /// At a clean stop, between batches: waits (up to [`CLOSE_WITHIN`]) for the applier to
    /// read back the last batch, and takes the store's batch mark back.
    fn close(&self) {
        if let Some(last) = self.unsettled.get() {
            self.progress.wait_for(last + 1, CLOSE_WITHIN);
        }
        match self.settled() {
            // Its records fenced: the applier has stopped the node, to be rebuilt.
            Ok(true) => {}
            Ok(false) if !self.marked.get() => {}
            Ok(false) => tracing::info!("the state owner's last batch was not read back in time: the store is rebuilt from the topic at the next start"),
            Err(e) => tracing::warn!(error = %e, "taking back the state owner's batch mark failed"),
        }
    }

    /// Takes the store's batch mark back once the applier has read every record this
    /// owner published and found none fenced; whether it found some (the node stops).
    fn settled(&self) -> anyhow::Result<bool> {
        // In this order: the applier reports fenced records before it moves its position.
        let applied = self.progress.get();
        if self.failure.lock().expect("failure lock").is_some() {
            return Ok(true);
        }
        if self.marked.get() && self.unsettled.get().is_none_or(|last| applied > last) {
            self.store.end_owner_batch()?;
            self.marked.set(false);
            self.unsettled.set(None);
        }
        Ok(false)
    }

    /// Waits until the state topic has confirmed every record sent (rdkafka's `flush`
    /// would sleep up to 100 ms per look): through a broker's loss, up to [`PUBLISH_WITHIN`], after
    /// which the producer reports the records failed. False if the engine stops first.
    fn confirmed(&self) -> anyhow::Result<bool> {
        let started = Instant::now();
        let mut noted = started;
        while self.producer.in_flight_count() > 0 {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            if started.elapsed() > PUBLISH_WITHIN + Duration::from_secs(5) {
                anyhow::bail!("the state topic did not confirm the writes within {PUBLISH_WITHIN:?}");
            }
            if noted.elapsed() >= WAITING_NOTE_EVERY {
                noted = Instant::now();
                crate::error_event!(self.metrics, ErrorEvent::StateStalled, waited = ?started.elapsed(),
                    records = self.producer.in_flight_count(), within = ?PUBLISH_WITHIN,
                    "the state topic has not confirmed the owner's writes yet (a broker lost?); waiting, writes of subscriber state wait too");
            }
            send_now(&self.producer, Duration::from_millis(1));
            self.producer.poll(Duration::ZERO);
        }
        Ok(true)
    }

    /// Publishes a record of this owner's epoch.
    fn publish(&self, key: &str, value: Option<&[u8]>) -> anyhow::Result<()> {
        self.publish_for(key, value, None)
    }

    /// [`Owner::publish`], the last value of request (node, id) marked as such.
    fn publish_for(&self, key: &str, value: Option<&[u8]>, carried_out: Option<(&str, u64)>) -> anyhow::Result<()> {
        let epoch = self.epoch.get().context("the state owner writes before it announced itself")?;
        self.send_marked(key, value, Some(epoch), carried_out)
    }

    fn send(&self, key: &str, value: Option<&[u8]>, epoch: Option<i64>) -> anyhow::Result<()> {
        self.send_marked(key, value, epoch, None)
    }

    fn send_marked(
        &self,
        key: &str,
        value: Option<&[u8]>,
        epoch: Option<i64>,
        carried_out: Option<(&str, u64)>,
    ) -> anyhow::Result<()> {
        let owner = match epoch {
            Some(epoch) => format!("{}:{epoch}", self.node),
            None => self.node.clone(),
        };
        let request = carried_out.map(|(node, id)| format!("{node}:{id}"));
        let mut headers = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header { key: OWNER_HEADER, value: Some(owner.as_bytes()) });
        if let Some(request) = &request {
            headers = headers.insert(rdkafka::message::Header { key: REQUEST_HEADER, value: Some(request.as_bytes()) });
        }
        let mut record = BaseRecord::<str, [u8]>::to(&self.topic).key(key).headers(headers);
        if let Some(value) = value {
            record = record.payload(value);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    if self.stop.load(Ordering::Relaxed) {
                        anyhow::bail!("the engine stops while the state topic takes no records");
                    }
                    self.producer.poll(Duration::from_millis(10));
                    record = back;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// R-M3, docs/cluster.md: a node noted itself caught up once a minute by the end
    /// librdkafka had last fetched, also while cut off from its brokers: after a day so,
    /// the deletions compacted away meanwhile were missed for good (its next start saw
    /// it never away). The end is now asked of the broker: none while it does not answer.
    #[test]
    fn r_m3_the_end_a_node_notes_itself_caught_up_by_is_the_broker_s_answer() {
        let kafka = crate::embedded::EmbeddedKafka::start(&["state"], 1).expect("mock cluster");
        let reader: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", kafka.bootstrap_servers()).create().expect("reader");
        assert_eq!(end_now(&reader, "state"), Some(0));
        kafka.on_cluster(|cluster| cluster.partition_leader("state", 0, None).expect("leaderless"));
        assert_eq!(end_now(&reader, "state"), None, "no answer, no end");
        kafka.on_cluster(|cluster| cluster.partition_leader("state", 0, Some(1)).expect("led again"));
        assert_eq!(end_now(&reader, "state"), Some(0));
    }

    /// R-M3: a node notes itself caught up as of the time it asked its broker where the
    /// topic ends, once it has applied up to that end: also while state writes keep
    /// coming (it noted only when idle, and a node busy for a day stopped itself as one
    /// cut off), and never while the broker does not answer.
    #[test]
    fn r_m3_a_node_is_caught_up_as_of_when_it_asked_the_end_it_has_since_reached() {
        let t0 = Instant::now();
        let never = || -> Option<i64> { panic!("asked again too soon") };
        let mut asked = None;
        // Idle at the end: caught up now.
        assert_eq!(caught_up_as_of(&mut asked, 50, (t0, 1_000), || Some(50)), Some(1_000));
        // Writes keep coming: behind the end told at 2 000 (for longer than the 10 s
        // between asks: the end told is kept, not moved on), then past it at 2 030.
        assert_eq!(caught_up_as_of(&mut asked, 60, (t0, 2_000), || Some(64)), None);
        assert_eq!(caught_up_as_of(&mut asked, 62, (t0 + Duration::from_secs(20), 2_020), never), None);
        assert_eq!(caught_up_as_of(&mut asked, 70, (t0 + Duration::from_secs(30), 2_030), never), Some(2_000));
        // Cut off: nothing, and not asked again for 10 s.
        assert_eq!(caught_up_as_of(&mut asked, 70, (t0, 3_000), || None), None);
        assert_eq!(caught_up_as_of(&mut asked, 70, (t0 + Duration::from_secs(9), 3_009), never), None);
        assert_eq!(caught_up_as_of(&mut asked, 70, (t0 + Duration::from_secs(10), 3_010), || Some(70)), Some(3_010));
    }

    /// The same bound at a start and on a running node reading again after being cut
    /// off: away within the topic's `delete.retention.ms` less the margin, it reads on.
    #[test]
    fn r_m3_a_store_away_nearly_as_long_as_deletions_are_kept_may_have_missed_some() {
        let day = Duration::from_secs(86_400);
        assert!(!missed_deletions(day - 2 * AWAY_MARGIN, day));
        assert!(missed_deletions(day - AWAY_MARGIN, day));
        assert!(missed_deletions(3 * day, day));
    }

    /// The requests of one write (an import's batch: up to 100 of them) share one wait
    /// from their sending: once it is over, a request not answered is not waited for
    /// again (each waited 60 s in turn, and an import's caller gave up long before its
    /// report); one answered by then is still taken.
    #[test]
    fn the_requests_of_one_write_share_one_wait() {
        let passed = Instant::now();
        let (_silent_tx, silent) = std::sync::mpsc::sync_channel::<Results>(1);
        let mut noted = false;
        let unanswered = answer_by(&silent, passed, || noted = true);
        assert!(matches!(unanswered, Err(std::sync::mpsc::RecvTimeoutError::Timeout)));
        assert!(!noted, "nothing waited for: no stall raised");
        let (answered_tx, answered) = std::sync::mpsc::sync_channel::<Results>(1);
        answered_tx.send(Vec::new()).unwrap();
        assert!(answer_by(&answered, passed, || noted = true).is_ok_and(|r| r.is_empty()), "answered in time, taken");
        assert!(!noted);
    }

    /// [`ErrorEvent::StateStalled`] (`callnotify_errors_total{stage="state",
    /// error="stalled"}`): a wait for the state topic shorter than the period counts once (an owner that took over
    /// during a broker's loss spent 9.98 s unable to read it while an import waited
    /// 24 s, and nothing was counted); a long one counts once a period, not once a look;
    /// a wait after one that ended counts at once.
    #[test]
    fn a_stall_is_raised_at_first_sight_then_once_a_period() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut raise = RaiseEvery::new(Duration::from_secs(10));
        let raised: Vec<u64> = (0..=25).filter(|&s| raise.due(at(s))).collect();
        assert_eq!(raised, [0, 10, 20], "raised at these seconds of a 25 s wait looked at every second");
        raise.reset();
        assert!(raise.due(at(26)), "a new wait right after one ended is raised at once");
        assert!(!raise.due(at(27)));
    }

    /// R-L3: an import's ops reach the owner as they were sent, in order, in records
    /// below 1 MB (Kafka's default) however large its lines, at most 200 ops each; an
    /// op larger than that alone, not refused here.
    #[test]
    fn requests_stay_below_a_megabyte_and_read_back_as_sent() {
        let flash = |bytes: usize| Op::SetFlash { key: "k".into(), path: "/settings".into(), html: "x".repeat(bytes) };
        let ops: Vec<Op> = [10, 300_000, 300_000, 10, 2_000_000, 10]
            .into_iter()
            .map(flash)
            .chain((0..450).map(|_| flash(10)))
            .collect();
        let encoded: Vec<Vec<u8>> = ops.iter().map(|op| serde_json::to_vec(op).unwrap()).collect();
        let mut read_back = Vec::new();
        let mut sizes = Vec::new();
        for (id, chunk) in requests(&encoded, REQUEST_BYTES).enumerate() {
            let payload = request_payload("node-a", id as u64, chunk);
            let Read::Request(request) = Read::of(Some(&payload)) else { panic!("the owner reads request {id}") };
            assert_eq!((request.node.as_str(), request.id), ("node-a", id as u64));
            sizes.push((request.ops.len(), payload.len()));
            read_back.extend(request.ops.iter().map(|op| serde_json::to_vec(op).unwrap()));
        }
        assert_eq!(read_back, encoded, "every op once, in order");
        let counts: Vec<usize> = sizes.iter().map(|(ops, _)| *ops).collect();
        assert_eq!(counts, [2, 2, 1, 200, 200, 51]);
        assert!(sizes.iter().all(|&(ops, bytes)| bytes < 1_000_000 || ops == 1), "{sizes:?}");
        // An operator's smaller `message.max.bytes` makes smaller requests.
        assert_eq!(request_bytes(None), REQUEST_BYTES);
        assert_eq!(request_bytes(Some("33554432")), REQUEST_BYTES);
        assert_eq!(request_bytes(Some("150000")), 72_952);
    }

    /// docs/cluster.md, a broker's loss: an operator's shorter `max.poll.interval.ms`
    /// (for the CDR consumers) does not let the group take the request partition from
    /// an owner that waits up to two minutes for the state topic; a longer one is kept.
    #[test]
    fn the_owner_polls_at_least_every_five_minutes_whatever_kafka_properties_say() {
        assert_eq!(owner_poll_interval(None), "300000");
        assert_eq!(owner_poll_interval(Some("10000")), "300000", "raised");
        assert_eq!(owner_poll_interval(Some("900000")), "900000", "kept");
    }
}
