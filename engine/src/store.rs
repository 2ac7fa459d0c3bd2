//! The subscription store: lines, numbers and their call-notification settings, and the
//! record of mails already sent, in sled.
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
//! - `sent`: the same without the call end, as written before; still consulted until
//!   the pruner has emptied it.
//!
//! Every write of a number's record tells the registered listeners (the resolve stage's
//! cache) at once, so the very next CDR sees the new settings.

use std::path::Path;
use std::sync::{Arc, RwLock};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::address::DestinationAddress;
use crate::phone::PhoneNumber;

mod journal;
use journal::{Commit, Journal};

/// 送信先 limit (R-N2).
pub const MAX_DESTINATIONS: usize = 5;
/// お知らせ対象電話番号 limit (R-N5).
pub const MAX_DESIGNATED: usize = 30;

/// 認証単位 (authentication unit) of a line (R-A1..R-A3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthUnit {
    Line,
    Number,
    AdminUser,
}

/// 回線 (line): a contract number and its additional numbers (R-L1).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LineRecord {
    /// 契約番号: the number the contract and, for unit `line`, the login are under.
    pub contract: PhoneNumber,
    /// Every number of the line, the contract number included.
    pub numbers: Vec<PhoneNumber>,
    /// How subscribers of this line log in; `None` until set by phone (R-I7).
    #[serde(default)]
    pub unit: Option<AuthUnit>,
}

/// Which notification services a number has contracted (R-C1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Services {
    /// 着信お知らせメール.
    pub call: bool,
    /// FAXお知らせメール.
    pub fax: bool,
}

/// One phone number and its call-notification settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NumberRecord {
    pub number: PhoneNumber,
    /// The line's contract number, to find the line from a number.
    pub contract: PhoneNumber,
    pub services: Services,
    pub call: CallSettings,
}

/// 着信お知らせメール settings of one number (R-N1..R-N5).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallSettings {
    /// 開始 (true) / 停止 (false), R-N1. Off until the subscriber starts the service.
    #[serde(default)]
    pub enabled: bool,
    /// 送信先メールアドレス, at most [`MAX_DESTINATIONS`] (R-N2).
    #[serde(default)]
    pub destinations: Vec<Destination>,
    /// 指定した電話番号からの着信のみ (R-N4).
    #[serde(default)]
    pub designated_only: bool,
    /// 応答できなかった着信のみ (R-N4).
    #[serde(default)]
    pub missed_only: bool,
    /// お知らせ対象電話番号, at most [`MAX_DESIGNATED`] (R-N5).
    #[serde(default)]
    pub designated: Vec<Designated>,
    /// Bumped by every save, so a save from a stale form can be refused (R-S9).
    #[serde(default)]
    pub version: u64,
}

/// 送信先: an address and its 送信 check (R-N2).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    pub address: DestinationAddress,
    /// Only checked addresses receive notifications.
    pub send: bool,
}

/// お知らせ対象電話番号: a number and its 指定 check (R-N5).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Designated {
    pub number: PhoneNumber,
    /// Only checked entries count.
    pub designate: bool,
    /// The settings page's row (0-based) the subscriber entered it in, so it is shown
    /// there again; `None` (provisioning, older records): the first free row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<u8>,
}

impl CallSettings {
    /// Checks the limits of R-N2 and R-N5.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.destinations.len() > MAX_DESTINATIONS {
            return Err(StoreError::TooMany {
                what: "destination addresses",
                max: MAX_DESTINATIONS,
                given: self.destinations.len(),
            });
        }
        if self.designated.len() > MAX_DESIGNATED {
            return Err(StoreError::TooMany {
                what: "designated numbers",
                max: MAX_DESIGNATED,
                given: self.designated.len(),
            });
        }
        Ok(())
    }
}

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
}

/// The sent records' trees (see the module docs), always written together.
#[derive(Clone)]
pub(crate) struct SentTrees {
    /// Record key → unix seconds handled.
    pub(crate) by_key: sled::Tree,
    /// Unix seconds handled, then the record key → nothing.
    pub(crate) by_handled: sled::Tree,
}

impl SentTrees {
    fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self { by_key: db.open_tree("sent_by_call_end")?, by_handled: db.open_tree("sent_by_handled")? })
    }

    /// Records `key` as handled at `at` (unix seconds).
    pub(crate) fn insert(&self, key: &[u8], at: u64) -> sled::Result<()> {
        self.by_key.insert(key, &at.to_be_bytes())?;
        self.by_handled.insert(handled_key(at, key), &[])?;
        Ok(())
    }

    /// Gives every record of `by_key` its place in `by_handled`, once: stores written
    /// before the second tree existed have none, and would never be pruned. A marker
    /// says it is done; a crash before it only means doing it again.
    fn index_once(&self, db: &sled::Db) -> Result<(), StoreError> {
        const DONE: &[u8] = b"sent_by_handled indexed";
        if db.contains_key(DONE)? {
            return Ok(());
        }
        let mut count = 0usize;
        for entry in self.by_key.iter() {
            let (key, value) = entry?;
            let at = value.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            self.by_handled.insert(handled_key(at, &key), &[])?;
            count += 1;
        }
        db.flush()?;
        db.insert(DONE, &[])?;
        if count > 0 {
            tracing::info!(records = count, "sent records indexed by the time they were handled");
        }
        Ok(())
    }
}

/// A `sent_by_handled` key: `at` (big-endian), then the record's key.
pub(crate) fn handled_key(at: u64, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&at.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// The tree of the settings site's credentials, keyed by login number.
pub const CREDENTIALS_TREE: &str = "credentials";

/// What an upsert of a line changed beyond the line itself.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Upserted {
    /// Numbers that were on another line (number, that line's contract): they arrive
    /// without their credential and with only the settings the import gave them, so
    /// nothing of the previous subscriber reaches the new one (R-M3).
    pub moved: Vec<(PhoneNumber, PhoneNumber)>,
    /// Numbers no longer listed: removed, credential and settings with them.
    pub removed: Vec<PhoneNumber>,
}

/// Told of a number's new record (`None`: the number was removed).
type Listener = Arc<dyn Fn(&PhoneNumber, Option<&NumberRecord>) + Send + Sync>;

/// Handle to the store; cheap to clone, shared by every stage and the admin site.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    lines: sled::Tree,
    numbers: sled::Tree,
    /// The settings site's credentials by login number (the admin crate reads and writes
    /// them): a number that leaves its line loses its credential in the same write.
    credentials: sled::Tree,
    sent: SentTrees,
    /// Sent records of the earlier key layout, while any remain (see the module docs).
    legacy_sent: Option<(sled::Tree, Arc<std::sync::atomic::AtomicBool>)>,
    /// Told of every number whose record changed, right after the write.
    listeners: Arc<RwLock<Vec<Listener>>>,
    /// Group commit for [`Store::flush`].
    flusher: Arc<Flusher>,
    /// Where sent records are made durable between flushes; none for a temporary store.
    journal: Option<Arc<Journal>>,
}

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
    fn start() -> Arc<Self> {
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
                                let inserted = trees.insert(&key.0, at);
                                journal::encode(&mut records, &key.0, at);
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
                                tracing::error!(error = %e, "store flush failed; retrying");
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

    /// `dir`: the store's directory, for the sent journal (`None`: a temporary store).
    fn from_db(db: sled::Db, dir: Option<&Path>) -> Result<Self, StoreError> {
        let sent = SentTrees::open(&db)?;
        let journal = dir.map(|dir| Journal::open(dir, &db, &sent)).transpose()?.map(Arc::new);
        sent.index_once(&db)?;
        Ok(Self {
            lines: db.open_tree("lines")?,
            numbers: db.open_tree("numbers")?,
            credentials: db.open_tree(CREDENTIALS_TREE)?,
            sent,
            legacy_sent: legacy_sent(&db)?,
            db,
            listeners: Arc::default(),
            flusher: Flusher::start(),
            journal,
        })
    }

    /// Registers `f` to be called with every number whose record changes and its new
    /// record, right after the write.
    pub fn on_number_change(&self, f: impl Fn(&PhoneNumber, Option<&NumberRecord>) + Send + Sync + 'static) {
        self.listeners.write().expect("listener lock").push(Arc::new(f));
    }

    fn changed(&self, records: &[(PhoneNumber, Option<NumberRecord>)]) {
        let listeners = self.listeners.read().expect("listener lock").clone();
        for (number, record) in records {
            listeners.iter().for_each(|f| f(number, record.as_ref()));
        }
    }

    pub fn number(&self, number: &PhoneNumber) -> Result<Option<NumberRecord>, StoreError> {
        self.numbers.get(number.as_str())?.map(|raw| serde_json::from_slice(&raw).map_err(StoreError::from)).transpose()
    }

    pub fn line(&self, contract: &PhoneNumber) -> Result<Option<LineRecord>, StoreError> {
        self.lines.get(contract.as_str())?.map(|raw| serde_json::from_slice(&raw).map_err(StoreError::from)).transpose()
    }

    /// Every number's record, in number order (exports, audits, tests).
    pub fn numbers(&self) -> impl Iterator<Item = Result<NumberRecord, StoreError>> + '_ {
        self.numbers.iter().map(|kv| Ok(serde_json::from_slice(&kv?.1)?))
    }

    /// Every line's record, in contract-number order.
    pub fn lines(&self) -> impl Iterator<Item = Result<LineRecord, StoreError>> + '_ {
        self.lines.iter().map(|kv| Ok(serde_json::from_slice(&kv?.1)?))
    }

    /// How many numbers are provisioned.
    pub fn number_count(&self) -> usize {
        self.numbers.len()
    }

    /// Writes a line and its numbers as one transaction (provisioning, R-L3).
    ///
    /// The line replaces what was stored for its contract: numbers no longer listed are
    /// removed, numbers moved from another line leave it. A number keeps its settings
    /// unless `settings` has an entry for it.
    pub fn upsert_line(
        &self,
        line: &LineRecord,
        numbers: &[(PhoneNumber, Services, Option<CallSettings>)],
    ) -> Result<Upserted, StoreError> {
        let result = (&self.lines, &self.numbers, &self.credentials).transaction(|(lines, nums, credentials)| {
            let mut touched: Vec<(PhoneNumber, Option<NumberRecord>)> = Vec::new();
            let mut upserted = Upserted::default();
            let abort = |e: StoreError| ConflictableTransactionError::Abort(e);
            let old_line: Option<LineRecord> = match lines.get(line.contract.as_str())? {
                Some(raw) => Some(serde_json::from_slice(&raw).map_err(|e| abort(e.into()))?),
                None => None,
            };
            if let Some(old) = &old_line {
                for gone in old.numbers.iter().filter(|n| !line.numbers.contains(n)) {
                    // A number that leaves the line takes nothing with it: not its
                    // settings, not the password its old subscriber set (R-M3).
                    nums.remove(gone.as_str())?;
                    credentials.remove(gone.as_str())?;
                    touched.push((*gone, None));
                    upserted.removed.push(*gone);
                }
            }
            let mut stored = line.clone();
            if stored.unit.is_none() {
                stored.unit = old_line.and_then(|l| l.unit);
            }
            for (number, services, settings) in numbers {
                let mut old: Option<NumberRecord> = match nums.get(number.as_str())? {
                    Some(raw) => Some(serde_json::from_slice(&raw).map_err(|e| abort(e.into()))?),
                    // A number new to the store has no credential: one left from before
                    // it was removed (by an older version) belongs to someone else.
                    None => {
                        credentials.remove(number.as_str())?;
                        None
                    }
                };
                if let Some(other) = old.as_ref().map(|o| o.contract).filter(|c| *c != line.contract) {
                    // The number moves between lines: the old line must not list it, and
                    // the new subscriber gets neither the old one's settings (their
                    // addresses would get the new one's calls) nor their password.
                    if let Some(raw) = lines.get(other.as_str())? {
                        let mut other_line: LineRecord = serde_json::from_slice(&raw).map_err(|e| abort(e.into()))?;
                        other_line.numbers.retain(|n| n != number);
                        let raw = serde_json::to_vec(&other_line).map_err(|e| abort(e.into()))?;
                        lines.insert(other.as_str(), raw)?;
                    }
                    credentials.remove(number.as_str())?;
                    upserted.moved.push((*number, other));
                    old = None;
                }
                let old_call = old.as_ref().map(|o| &o.call);
                let call = match (settings, old_call) {
                    (None, Some(old)) => old.clone(),
                    (None, None) => CallSettings::default(),
                    (Some(new), None) => new.clone(),
                    // Re-importing the same settings is a no-op; different ones are a
                    // save like any other and bump the version (R-S9).
                    (Some(new), Some(old)) => {
                        let same = CallSettings { version: old.version, ..new.clone() };
                        if same == *old {
                            same
                        } else {
                            CallSettings { version: old.version + 1, ..new.clone() }
                        }
                    }
                };
                let record = NumberRecord { number: *number, contract: line.contract, services: *services, call };
                if old.as_ref() != Some(&record) {
                    let raw = serde_json::to_vec(&record).map_err(|e| abort(e.into()))?;
                    nums.insert(number.as_str(), raw)?;
                    touched.push((*number, Some(record)));
                }
            }
            let raw = serde_json::to_vec(&stored).map_err(|e| abort(e.into()))?;
            lines.insert(line.contract.as_str(), raw)?;
            Ok((touched, upserted))
        });
        match result {
            Ok((touched, upserted)) => {
                self.changed(&touched);
                Ok(upserted)
            }
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Saves a number's settings if they were edited from version `expected` (R-S9);
    /// returns the new version.
    pub fn save_call_settings(
        &self,
        number: &PhoneNumber,
        expected: u64,
        settings: CallSettings,
    ) -> Result<u64, StoreError> {
        settings.validate()?;
        loop {
            let raw = self.numbers.get(number.as_str())?.ok_or(StoreError::UnknownNumber(*number))?;
            let mut record: NumberRecord = serde_json::from_slice(&raw)?;
            if record.call.version != expected {
                return Err(StoreError::StaleVersion { current: record.call.version });
            }
            record.call = CallSettings { version: expected + 1, ..settings.clone() };
            let new = serde_json::to_vec(&record)?;
            if self.numbers.compare_and_swap(number.as_str(), Some(raw), Some(new))?.is_ok() {
                self.changed(&[(*number, Some(record))]);
                return Ok(expected + 1);
            }
        }
    }

    /// Sets the authentication unit of a line (R-I7: chosen by phone).
    pub fn set_line_unit(&self, contract: &PhoneNumber, unit: AuthUnit) -> Result<(), StoreError> {
        loop {
            let raw = self.lines.get(contract.as_str())?.ok_or(StoreError::UnknownNumber(*contract))?;
            let mut line: LineRecord = serde_json::from_slice(&raw)?;
            line.unit = Some(unit);
            let new = serde_json::to_vec(&line)?;
            if self.lines.compare_and_swap(contract.as_str(), Some(raw), Some(new))?.is_ok() {
                return Ok(());
            }
        }
    }

    /// A tree of the same database for another part of the product (the settings
    /// site's credentials and sessions), so one store holds all state.
    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// The sent-mail records, for the retry queue: queuing a mail and recording it as
    /// handled are one transaction.
    pub(crate) fn sent_trees(&self) -> &SentTrees {
        &self.sent
    }

    /// Whether the mail for (`called`, `call_id`, `recipient`) was already accepted.
    pub fn was_sent(&self, key: &SentKey) -> Result<bool, StoreError> {
        if self.sent.by_key.contains_key(&key.0)? {
            return Ok(true);
        }
        match &self.legacy_sent {
            Some((tree, live)) if live.load(std::sync::atomic::Ordering::Relaxed) => {
                Ok(tree.contains_key(key.legacy())?)
            }
            _ => Ok(false),
        }
    }

    /// Records that the mail for `key` was accepted at `unix_secs`, not flushed (the
    /// engine uses [`Store::record_sent`]; tests set up records with this).
    #[cfg(test)]
    pub(crate) fn mark_sent(&self, key: &SentKey, unix_secs: u64) -> Result<(), StoreError> {
        self.sent.insert(&key.0, unix_secs)?;
        Ok(())
    }

    /// Forgets up to `limit` sent-mail records whose mails were handled before
    /// `cutoff_unix_secs`, whenever their calls were; returns how many, and whether
    /// there may be more. A CDR replayed after that sends its mail again (the
    /// retention window is the dedup guarantee). The records are walked in the order
    /// they were handled, so this reads nothing else. A record handled again since (a
    /// mail queued, then accepted) keeps its later time and stays.
    pub fn prune_sent(&self, cutoff_unix_secs: u64, limit: usize) -> Result<(usize, bool), StoreError> {
        let (mut seen, mut pruned) = (0, 0);
        for entry in self.sent.by_handled.range(..cutoff_unix_secs.to_be_bytes()).keys().take(limit) {
            let entry = entry?;
            seen += 1;
            let key = &entry[8..];
            if let Some(latest) = self.sent.by_key.get(key)? {
                let at = latest.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
                // Unless it was handled again meanwhile.
                let swapped = at < cutoff_unix_secs
                    && self.sent.by_key.compare_and_swap(key, Some(latest), None::<&[u8]>)?.is_ok();
                pruned += usize::from(swapped);
            }
            self.sent.by_handled.remove(&entry)?;
        }
        Ok((pruned, seen == limit))
    }

    /// The recipient of every mail handled at or after `since` (unix seconds), once per
    /// mail: what flood control counted lately, for a restarted engine to go on from.
    pub fn recipients_handled_since(&self, since: u64) -> Result<Vec<String>, StoreError> {
        let mut recipients = Vec::new();
        for entry in self.sent.by_handled.range(since.to_be_bytes()..).keys() {
            let entry = entry?;
            // handled (8) | call end (8) | called \0 call id \0 recipient
            let Some(record) = entry.get(16..) else { continue };
            if let Some(at) = memchr::memrchr(0, record) {
                recipients.push(String::from_utf8_lossy(&record[at + 1..]).into_owned());
            }
        }
        Ok(recipients)
    }

    /// Like [`Store::prune_sent`] for the records of the earlier key layout, which has
    /// no time order: looks at up to `limit` records after `after` and removes those
    /// written before the cutoff; returns how many and where to go on (`None`: the end).
    /// Once the tree is empty it is no longer consulted.
    pub fn prune_legacy_sent(
        &self,
        cutoff_unix_secs: u64,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(usize, Option<Vec<u8>>), StoreError> {
        use std::ops::Bound;
        let Some((tree, live)) = &self.legacy_sent else { return Ok((0, None)) };
        let from = after.map_or(Bound::Unbounded, |k| Bound::Excluded(k.to_vec()));
        let (mut pruned, mut seen, mut last) = (0, 0, None);
        for entry in tree.range::<Vec<u8>, _>((from, Bound::Unbounded)).take(limit) {
            let (key, value) = entry?;
            let at = value.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if at < cutoff_unix_secs {
                tree.remove(&key)?;
                pruned += 1;
            }
            seen += 1;
            last = Some(key.to_vec());
        }
        if tree.is_empty() {
            live.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        // A full slice may have more after it; a short one reached the end.
        Ok((pruned, if seen == limit { last } else { None }))
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

    /// Writes `key`'s sent record and makes it durable, on the store's flusher thread:
    /// the records of mails finishing together share one flush.
    pub async fn record_sent(&self, key: &SentKey, unix_secs: u64) -> Result<(), StoreError> {
        self.group_commit(Some((self.sent.clone(), key.clone(), unix_secs))).await
    }

    async fn group_commit(&self, write: Option<(SentTrees, SentKey, u64)>) -> Result<(), StoreError> {
        let (done, finished) = tokio::sync::oneshot::channel();
        let request = FlushRequest { db: self.db.clone(), journal: self.journal.clone(), write, done };
        if self.flusher.requests.send(request).is_err() {
            return Err(StoreError::FlusherStopped);
        }
        finished.await.unwrap_or(Err(StoreError::FlusherStopped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens a store whose previous handle was just dropped. sled's own background
    /// flusher holds the file lock until its next tick, so a lock error is waited out.
    fn open_again(path: &Path) -> Store {
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
                    store.record_sent(&key, 1).await.unwrap();
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

    /// The journal holds sent records only until a flush of the database covers them:
    /// its file stays under the checkpoint size however many mails are sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sent_journal_stays_bounded_and_every_record_outlives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        let key = |i: usize| SentKey::new(1_764_000_000, &called, &format!("c-{i}"), &format!("{:0>60}@example.jp", i));
        let journal = dir.path().join("sent.journal");
        let (mut largest, mut emptied) = (0, 0);
        // About 100 bytes a record: 3 MiB of records in all.
        for chunk in 0..30 {
            let batch: Vec<_> = (chunk * 1_000..(chunk + 1) * 1_000)
                .map(|i| {
                    let (store, key) = (store.clone(), key(i));
                    tokio::spawn(async move { store.record_sent(&key, 1).await.unwrap() })
                })
                .collect();
            for task in batch {
                task.await.unwrap();
            }
            let len = std::fs::metadata(&journal).unwrap().len();
            emptied += usize::from(len < largest);
            largest = largest.max(len);
        }
        assert!(largest <= journal::CHECKPOINT_BYTES, "journal grew to {largest} bytes");
        assert!(emptied >= 2, "the journal starts again after each checkpoint ({emptied} times)");
        drop(store);
        let reopened = open_again(dir.path());
        assert!((0..30_000).all(|i| reopened.was_sent(&key(i)).unwrap()));
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0, "replayed at open, then emptied");
    }

    #[test]
    fn sent_records_handled_before_the_window_are_pruned_and_newer_ones_kept() {
        let store = Store::temporary().unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        let old: Vec<SentKey> =
            (0..25).map(|i| SentKey::new(1_000 + i, &called, "c-old", &format!("{i}@example.jp"))).collect();
        let new = SentKey::new(9_000, &called, "c-new", "a@example.jp");
        old.iter().for_each(|k| store.mark_sent(k, 2_000).unwrap());
        store.mark_sent(&new, 9_999).unwrap();

        assert_eq!(store.prune_sent(5_000, 10).unwrap(), (10, true), "a full slice: there may be more");
        assert_eq!(store.prune_sent(5_000, 10).unwrap(), (10, true));
        assert_eq!(store.prune_sent(5_000, 10).unwrap(), (5, false), "the rest, then the end");
        assert!(old.iter().all(|k| !store.was_sent(k).unwrap()), "past the window: a replay would send again");
        assert!(store.was_sent(&new).unwrap(), "inside the window: a replay sends nothing");
    }

    /// The dedup window counts from when the mail was handled, not from the call: a
    /// backlog of calls older than the retention, notified today, is remembered for the
    /// whole window (a prune at the next start used to forget it, and a replay sent
    /// every mail again).
    #[test]
    fn a_call_older_than_the_window_handled_now_is_remembered_for_the_whole_window() {
        let store = Store::temporary().unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        let (call_ended, handled, retention) = (1_000, 1_000_000, 7 * 86_400);
        let late = SentKey::new(call_ended, &called, "c-late", "a@example.jp");
        store.mark_sent(&late, handled).unwrap();

        // The pruner's cutoff at time `now`, as startup's hourly prune computes it.
        let cutoff = |now: u64| now - retention;
        // Its call ended long before any of these cutoffs: that no longer counts.
        assert_eq!(store.prune_sent(cutoff(handled + retention - 1), 100).unwrap(), (0, false));
        assert!(store.was_sent(&late).unwrap(), "inside the window from its handling: a replay sends nothing");
        assert_eq!(store.prune_sent(cutoff(handled + retention + 1), 100).unwrap(), (1, false));
        assert!(!store.was_sent(&late).unwrap());
    }

    /// A mail queued (recorded then) and accepted later keeps the later time.
    #[test]
    fn a_record_handled_again_keeps_its_latest_time() {
        let store = Store::temporary().unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        let key = SentKey::new(1_000, &called, "c-1", "a@example.jp");
        store.mark_sent(&key, 2_000).unwrap();
        store.mark_sent(&key, 8_000).unwrap();
        assert_eq!(store.prune_sent(5_000, 100).unwrap(), (0, false), "only the older entry was due");
        assert!(store.was_sent(&key).unwrap());
        assert_eq!(store.prune_sent(9_000, 100).unwrap(), (1, false));
        assert!(!store.was_sent(&key).unwrap());
    }

    /// A store written before `sent_by_handled` existed gets its records indexed at
    /// open, so they are pruned by the time they were handled too.
    #[test]
    fn records_of_a_store_without_the_handled_index_are_indexed_at_open_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        let key = SentKey::new(1_000, &called, "c-1", "a@example.jp");
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("sent_by_call_end").unwrap().insert(key.as_bytes(), &2_000u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let store = open_again(dir.path());
        assert!(store.was_sent(&key).unwrap());
        assert_eq!(store.prune_sent(5_000, 100).unwrap(), (1, false));
        assert!(!store.was_sent(&key).unwrap());
    }

    #[test]
    fn records_of_the_earlier_key_layout_still_count_until_pruned_then_the_tree_goes() {
        let dir = tempfile::tempdir().unwrap();
        let called = PhoneNumber::parse("0312345678").unwrap();
        // The same mails as keyed now, by a replay of their CDRs.
        let key = |call_id: &str| SentKey::new(1_764_000_000, &called, call_id, "a@example.jp");
        let (old, recent) = (key("c-1"), key("c-2"));
        {
            let db = sled::open(dir.path()).unwrap();
            let legacy = db.open_tree("sent").unwrap();
            legacy.insert(old.legacy(), &1_000u64.to_be_bytes()).unwrap();
            legacy.insert(recent.legacy(), &9_000u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let store = open_again(dir.path());
        assert!(store.was_sent(&old).unwrap() && store.was_sent(&recent).unwrap(), "an upgrade forgets nothing");

        assert_eq!(store.prune_legacy_sent(5_000, None, 100).unwrap(), (1, None));
        assert!(!store.was_sent(&old).unwrap());
        assert!(store.was_sent(&recent).unwrap());
        assert_eq!(store.prune_legacy_sent(10_000, None, 100).unwrap(), (1, None));
        drop(store);
        let reopened = open_again(dir.path());
        assert!(reopened.legacy_sent.is_none(), "an emptied legacy tree is dropped");
        assert!(!reopened.db.tree_names().iter().any(|n| n.as_ref() == b"sent"));
    }
}

/// The tree of the earlier sent-record layout, if it still holds records; an empty one
/// is dropped.
fn legacy_sent(db: &sled::Db) -> Result<Option<(sled::Tree, Arc<std::sync::atomic::AtomicBool>)>, StoreError> {
    if !db.tree_names().iter().any(|name| name.as_ref() == b"sent") {
        return Ok(None);
    }
    let tree = db.open_tree("sent")?;
    if tree.is_empty() {
        drop(tree);
        db.drop_tree("sent")?;
        return Ok(None);
    }
    Ok(Some((tree, Arc::new(std::sync::atomic::AtomicBool::new(true)))))
}

/// Key of one sent mail: when the call ended, called number, call id and recipient.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SentKey(Vec<u8>);

impl SentKey {
    /// `ended_at`: the call's end in unix seconds, from its CDR (so a replay of the CDR
    /// makes the same key).
    pub fn new(ended_at: i64, called: &PhoneNumber, call_id: &str, recipient: &str) -> Self {
        let mut key = Vec::with_capacity(8 + called.as_str().len() + call_id.len() + recipient.len() + 2);
        key.extend_from_slice(&(ended_at.max(0) as u64).to_be_bytes());
        key.extend_from_slice(called.as_str().as_bytes());
        key.push(0);
        key.extend_from_slice(call_id.as_bytes());
        key.push(0);
        key.extend_from_slice(recipient.as_bytes());
        Self(key)
    }

    /// The key in the earlier layout, without the call end.
    fn legacy(&self) -> &[u8] {
        &self.0[8..]
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}
