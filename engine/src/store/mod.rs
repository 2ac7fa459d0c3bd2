//! The subscription store: lines, numbers and their call-notification settings, and the
//! record of mails already sent, in sled.
//!
//! - [`records`]: what is stored for a line and a number (R-L1, R-N1..R-N5).
//! - [`subscribers`]: reading and writing lines, numbers and settings; listeners.
//! - [`batch`]: a batch of an import's ops on several threads, as on one.
//! - [`state`]: every write of lines, numbers, settings and credentials as an op, carried
//!   out here or through the shared state log.
//! - [`sent`]: the sent records that make each mail go out once (key, claim, record,
//!   prune, journal).
//! - here: opening the store, its errors, and the group commit that makes writes
//!   durable.
//!
//! Trees:
//! - `lines`: contract number → [`LineRecord`] (R-L1).
//! - `numbers`: phone number → [`NumberRecord`], the settings of R-N1..R-N5.
//! - `sent_by_call_end`: call end (unix seconds, big-endian) `called \0 call_id \0
//!   recipient` → unix seconds when the mail was handled (accepted, queued or refused);
//!   a replayed CDR finds its mails here and sends nothing again. Keys in call-time
//!   order keep the lookups and inserts of live traffic on the few most recent pages
//!   however large the tree grows.
//! - `sent_by_handled`: unix seconds handled (big-endian) followed by the record's key →
//!   nothing: the same records in the order they were handled, which the pruner walks
//!   from the front. A record lives `store.sent_retention_days` from when its mail was
//!   handled, whatever the call's time: a backlog of old calls read today is remembered
//!   as long as today's calls.
//! - `faxes`, `fax_documents`: received faxes for the site ([`faxes`], R-F1).
//! - `sent`: the same without the call end, as written before; still consulted until
//!   the pruner has emptied it.
//!
//! Every write of a number's record tells the registered listeners (the resolve stage's
//! cache) at once, so the very next CDR sees the new settings.

use std::path::Path;
use std::sync::{Arc, RwLock};

use crate::error_event::{CountErrors, ErrorCounter, ErrorEvent};
use crate::phone::PhoneNumber;

pub mod batch;
pub mod faxes;
pub mod records;
pub mod sent;
pub mod state;
pub mod subscribers;

pub use records::*;
pub(crate) use sent::SentTrees;
pub use sent::{Claimed, Claims, PartitionId, PartitionSink, SentKey};
pub use subscribers::{Upserted, CREDENTIALS_TREE};

use sent::journal::{self, Commit, Journal};
use subscribers::Listener;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O failed: {0}")]
    Sled(#[from] sled::Error),
    #[error("the sent journal {path} cannot be used: {source}")]
    Journal { path: std::path::PathBuf, source: std::io::Error },
    #[error("store record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    /// More destinations or designated numbers than R-N2 or R-N5 allow.
    #[error("at most {max} {what}, {given} given")]
    TooMany { what: &'static str, max: usize, given: usize },
    #[error("the store flusher thread has stopped")]
    FlusherStopped,
    #[error("store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A queued mail whose called number no longer parses (a damaged entry).
    #[error("queued mail for an invalid number: {0}")]
    QueuedNumber(#[from] crate::phone::PhoneNumberError),
    #[error("the settings were changed by another save (version {current}); reload and try again")]
    StaleVersion { current: u64 },
    #[error("no such number: {0}")]
    UnknownNumber(PhoneNumber),
    /// A number's record this version cannot read (a newer version's value, a field a
    /// stricter parser refuses): that number's calls and faxes are dead-lettered, the
    /// others go on.
    #[error("the record of {number} cannot be read: {why}")]
    UnreadableNumber { number: PhoneNumber, why: String },
    /// R-L1: a line is keyed by its contract number, which must stay one of its numbers.
    #[error(
        "{number} is the contract number of a line that also has {}: it moves to another line only as its \
         line's last number (provision those on a line of their own first)",
        others.iter().map(PhoneNumber::as_str).collect::<Vec<_>>().join(", ")
    )]
    ContractInUse { number: PhoneNumber, others: Vec<PhoneNumber> },
    /// The shared state log could not carry out a write (see [`state`]).
    #[error("subscriber state: {0}")]
    State(String),
}

/// Handle to the store; cheap to clone, shared by every stage and the admin site.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    lines: sled::Tree,
    numbers: sled::Tree,
    /// The index of numbers with call notification ([`subscribers::SUBSCRIBED_TREE`]).
    subscribed: sled::Tree,
    /// The settings site's credentials by login number (the admin crate reads and writes
    /// them): a number that leaves its line loses its credential in the same write.
    credentials: sled::Tree,
    /// The settings site's sessions, by a hash of their id ([`state::SESSIONS_TREE`]).
    sessions: sled::Tree,
    /// Received faxes and their documents ([`faxes`]).
    faxes: sled::Tree,
    fax_documents: sled::Tree,
    sent: SentTrees,
    /// Sent records of the earlier key layout, while any remain (see the module docs).
    legacy_sent: Option<(sled::Tree, Arc<std::sync::atomic::AtomicBool>)>,
    /// Told of every number whose record changed, right after the write.
    listeners: Arc<RwLock<Vec<Listener>>>,
    /// Group commit for [`Store::flush`].
    flusher: Arc<Flusher>,
    /// Where sent records are made durable between flushes; none for a temporary store.
    journal: Option<Arc<Journal>>,
    /// Where the flusher and the journal count their errors, once the engine's metrics
    /// exist ([`Store::report_errors_to`]).
    errors: ErrorCounter,
    /// Where writes of subscriber state go when it is shared between nodes (`serve`);
    /// unset, they are carried out here ([`state`]).
    writer: Arc<std::sync::OnceLock<Arc<dyn state::StateWriter>>>,
    /// Without a writer, ops are carried out here one call at a time, as the single
    /// state owner carries them out: concurrent calls (two logins at once) read and
    /// wrote a credential's count over each other.
    carrying_out: Arc<std::sync::Mutex<()>>,
    /// Where sent records and retry-queue changes follow their CDR partition (`serve`).
    partition_sink: Arc<std::sync::OnceLock<Arc<dyn sent::PartitionSink>>>,
    /// The clock the writes carried out here read (when a number moved lines): the
    /// system's, or a test's fixed one ([`Store::with_clock`]).
    clock: Clock,
    /// `store.fax_retention_days` in seconds, 0 until set ([`Store::keep_faxes_for`]): a
    /// fax older is not shown, though the hourly expiry has not removed it yet.
    fax_retention_secs: Arc<std::sync::atomic::AtomicI64>,
    /// `store.one_record_lines`: a line of its contract number alone is written as its
    /// number's record only ([`Store::implicit_line`]). Off, every line gets a record as
    /// older versions wrote them, which older nodes of a cluster read; this version
    /// reads both ways whatever the setting.
    one_record_lines: bool,
}

/// A clock a store's writes read.
pub type Clock = Arc<dyn Fn() -> chrono::DateTime<chrono::Utc> + Send + Sync>;

/// One thread that writes sent records and makes them durable for every async caller,
/// so a thousand mails finishing together cost one append to the sent journal (or one
/// flush), not a thousand, and no thread hop of their own. (sled's own `flush_async`
/// runs each call on sled's small I/O thread pool, where enough concurrent calls occupy
/// every thread waiting for a write that needs a thread of that same pool: a deadlock.)
struct Flusher {
    /// Each request carries a handle to the database, so the thread holds none between
    /// requests and a dropped store closes. The thread ends with the last sender.
    requests: std::sync::mpsc::Sender<FlushRequest>,
    /// The shortest time between the starts of two flushes, in ms
    /// (`store.group_commit_ms`).
    every_ms: Arc<std::sync::atomic::AtomicU64>,
}

/// `store.group_commit_ms` unless set.
const DEFAULT_GROUP_COMMIT_MS: u64 = 0;

struct FlushRequest {
    db: sled::Db,
    journal: Option<Arc<Journal>>,
    /// A sent record to write before the flush: (trees, key, unix seconds).
    write: Option<(SentTrees, SentKey, u64)>,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

impl Flusher {
    fn start(errors: ErrorCounter) -> Arc<Self> {
        let (requests, incoming) = std::sync::mpsc::channel::<FlushRequest>();
        let every_ms = Arc::new(std::sync::atomic::AtomicU64::new(DEFAULT_GROUP_COMMIT_MS));
        let every = every_ms.clone();
        std::thread::Builder::new()
            .name("store-flusher".into())
            .spawn(move || {
                let (mut batch, mut answers, mut records) = (Vec::new(), Vec::new(), Vec::new());
                let mut last_flush: Option<std::time::Instant> = None;
                while let Ok(first) = incoming.recv() {
                    // Under load, requests gather until `every` after the last flush
                    // began: fewer, larger flushes. An idle store flushes at once.
                    let gap = std::time::Duration::from_millis(every.load(std::sync::atomic::Ordering::Relaxed));
                    if let Some(last) = last_flush.filter(|_| !gap.is_zero()) {
                        std::thread::sleep(gap.saturating_sub(last.elapsed()));
                    }
                    last_flush = Some(std::time::Instant::now());
                    batch.push(first);
                    batch.extend(incoming.try_iter());
                    // Writes first, then one flush that covers them and every write
                    // the callers did before asking. Every handle on the database is
                    // dropped before anyone is answered, so a caller may close and
                    // reopen the store at once.
                    // A batch of sent records only is appended to the journal; a
                    // plain flush request (retry queue entries) flushes the database.
                    let (mut db, mut journal, mut flush_db) = (None, None, false);
                    records.clear();
                    for FlushRequest { db: handle, journal: log, write, done } in batch.drain(..) {
                        let written = match write {
                            Some((trees, key, at)) => {
                                let inserted = trees.insert(key.as_bytes(), at);
                                journal::encode(&mut records, key.as_bytes(), at);
                                inserted
                            }
                            None => {
                                flush_db = true;
                                Ok(())
                            }
                        };
                        db.get_or_insert(handle);
                        journal = journal.or(log);
                        answers.push((done, written.map_err(StoreError::from)));
                    }
                    if let Some(db) = db {
                        let appended = match &journal {
                            Some(journal) if !flush_db => matches!(journal.commit(&records), Commit::Appended),
                            _ => false,
                        };
                        if !appended {
                            while let Err(e) = db.flush() {
                                crate::error_event!(errors, ErrorEvent::StoreFlush, error = %e, "store flush failed; retrying");
                                std::thread::sleep(std::time::Duration::from_millis(100));
                            }
                            if let Some(journal) = &journal {
                                journal.emptied();
                            }
                        }
                    }
                    for (done, result) in answers.drain(..) {
                        let _ = done.send(result);
                    }
                }
            })
            .expect("spawning the store flusher");
        Arc::new(Self { requests, every_ms })
    }
}

impl Store {
    /// Opens (or creates) the store at `path` with sled's page cache at 64 MiB.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, 64 << 20)
    }

    /// Opens (or creates) the store at `path`; sled keeps at most `cache_bytes` of pages
    /// in memory (its own default, 1 GiB, would dwarf the rest of the engine).
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::from_db(sled::Config::new().path(path).cache_capacity(cache_bytes).open()?, Some(path))
    }

    /// A store that lives in memory and vanishes when dropped (tests, benches).
    pub fn temporary() -> Result<Self, StoreError> {
        Self::from_db(sled::Config::new().temporary(true).open()?, None)
    }

    /// The store with `clock` for the writes it carries out and the times its view of
    /// the state topic notes (tests that compare what two stores wrote, or move a
    /// node's time on).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The store writing a line of its contract number alone as its number's record only
    /// (`store.one_record_lines`), or every line's record.
    pub fn with_one_record_lines(mut self, on: bool) -> Self {
        self.one_record_lines = on;
        self
    }

    /// The time by this store's clock: the system's, or a test's.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        (self.clock)()
    }

    /// `dir`: the store's directory, for the sent journal (`None`: a temporary store).
    fn from_db(db: sled::Db, dir: Option<&Path>) -> Result<Self, StoreError> {
        let sent = SentTrees::open(&db)?;
        let errors = ErrorCounter::default();
        let journal = dir.map(|dir| Journal::open(dir, &db, &sent, errors.clone())).transpose()?.map(Arc::new);
        sent.index_once(&db)?;
        let store = Self {
            lines: db.open_tree("lines")?,
            numbers: db.open_tree("numbers")?,
            subscribed: db.open_tree(subscribers::SUBSCRIBED_TREE)?,
            credentials: db.open_tree(CREDENTIALS_TREE)?,
            sessions: db.open_tree(state::SESSIONS_TREE)?,
            faxes: db.open_tree(faxes::FAXES_TREE)?,
            fax_documents: db.open_tree(faxes::FAX_DOCUMENTS_TREE)?,
            sent,
            legacy_sent: sent::legacy_sent(&db)?,
            db,
            listeners: Arc::default(),
            flusher: Flusher::start(errors.clone()),
            journal,
            errors,
            writer: Arc::default(),
            carrying_out: Arc::default(),
            partition_sink: Arc::default(),
            clock: Arc::new(chrono::Utc::now),
            fax_retention_secs: Arc::default(),
            one_record_lines: false,
        };
        store.index_subscribed_once()?;
        Ok(store)
    }

    /// Counts the store's errors (a failed flush, an unwritable journal) in `counter`
    /// (the engine's metrics) from now on; before, they are logged only.
    pub fn report_errors_to(&self, counter: impl CountErrors + 'static) {
        self.errors.set(counter);
    }

    /// A tree of the same database for another part of the product (the settings
    /// site's credentials and sessions), so one store holds all state.
    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Makes every write so far durable, from a thread that may block.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Sets the shortest time between two group flushes (`store.group_commit_ms`).
    pub fn set_group_commit(&self, every: std::time::Duration) {
        self.flusher.every_ms.store(every.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes every write so far durable; concurrent callers share one flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.group_commit(None).await
    }

    pub(super) async fn group_commit(&self, write: Option<(SentTrees, SentKey, u64)>) -> Result<(), StoreError> {
        let (done, finished) = tokio::sync::oneshot::channel();
        let request = FlushRequest { db: self.db.clone(), journal: self.journal.clone(), write, done };
        if self.flusher.requests.send(request).is_err() {
            return Err(StoreError::FlusherStopped);
        }
        finished.await.unwrap_or(Err(StoreError::FlusherStopped))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Opens a store whose previous handle was just dropped. sled's own background
    /// flusher holds the file lock until its next tick, so a lock error is waited out.
    pub(crate) fn open_again(path: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(path) {
                Ok(store) => return store,
                Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("the store must open again: {e}"),
            }
        }
    }

    /// A store written before the index of subscribed numbers existed gets it at its
    /// first open: otherwise no number of it would be notified after the upgrade.
    #[test]
    fn a_store_from_before_the_index_of_subscribed_numbers_is_indexed_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (PhoneNumber::parse("0312345601").unwrap(), PhoneNumber::parse("0312345602").unwrap());
        {
            let store = Store::open(dir.path()).unwrap();
            let line = LineRecord { contract: a, numbers: vec![a, b], unit: None };
            let call = Services { call: true, fax: false };
            store.upsert_line(&line, &[(a, call, None), (b, Services { call: false, fax: true }, None)]).unwrap();
            // As an older version left it: no index, no marker.
            store.subscribed.clear().unwrap();
            store.db.remove(b"subscribed indexed").unwrap();
            store.flush_blocking().unwrap();
        }
        let store = open_again(dir.path());
        let indexed: Vec<_> = store.subscribed_numbers().collect::<Result<_, _>>().unwrap();
        assert_eq!(indexed, [a]);
    }

    /// Many mails finishing at once each record and flush their sent record (and retry
    /// queue entries ask for plain flushes): sled's own `flush_async` deadlocked under
    /// this (its I/O pool filled with waiting flushes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hundreds_of_concurrent_flushes_all_complete_and_persist_their_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let key = SentKey::new(1_764_000_000, &called, &format!("c-{i}"), "a@example.jp");
                    store.record_sent(&key, 1, None).await.unwrap();
                    if i % 3 == 0 {
                        store.flush().await.unwrap();
                    }
                })
            })
            .collect();
        let all = async {
            for task in tasks {
                task.await.unwrap();
            }
        };
        // A guard against a hang, not a speed target.
        tokio::time::timeout(std::time::Duration::from_secs(60), all).await.expect("every flush completes");
        drop(store);
        let reopened = open_again(dir.path());
        assert!((0..300).all(|i| reopened
            .was_sent(&SentKey::new(1_764_000_000, &called, &format!("c-{i}"), "a@example.jp"))
            .unwrap()));
    }
}
