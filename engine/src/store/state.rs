//! Subscriber state as writes that can travel: every change of a line, a number's
//! settings or a credential is an [`Op`], and the store carries it out in one of two
//! places.
//!
//! - With a [`StateWriter`] attached (every `serve`: [`crate::state`]), an op goes to
//!   the state owner through Kafka; the owner carries it out on its own store, publishes
//!   the new values of the keys it touched to the compacted state topic, and every node
//!   applies them ([`Store::apply_state`]). The caller's answer comes back once its own
//!   store shows the write (read-your-writes).
//! - Without one (the owner itself, tools on a stopped store, unit tests), the op is
//!   carried out here ([`Store::execute`]).
//!
//! The ops are the store's only writes of the state trees, so both are the same code.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{
    AuthUnit, CallSettings, CredentialKind, CredentialRecord, DocumentBytes, FaxRecord, FaxSettings, LineRecord,
    Services, SessionRecord, Store, StoreError, Upserted, FAXES_TREE, FAX_DOCUMENTS_TREE, PASSWORD_LIFETIME,
    TEMPORARY_VALIDITY,
};
use crate::phone::PhoneNumber;

/// One write of subscriber state. Carries no password: credentials travel as argon2id
/// hashes, login attempts as the verdict of the hash check the requesting node made.
///
/// Read strictly, records in it too: an op with a field this version does not know (a
/// newer node's, while a cluster is upgraded) is refused, not carried out without it.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Provisioning (R-L3, R-M3): see [`Store::upsert_line`].
    UpsertLine {
        #[serde(deserialize_with = "crate::strict_json::known_fields_only")]
        line: LineRecord,
        #[serde(deserialize_with = "crate::strict_json::known_fields_only")]
        numbers: Vec<(PhoneNumber, Services, Option<CallSettings>)>,
    },
    /// Provisioning: a line whose contract ended goes with all it holds (R-L3, R-M3): see
    /// [`Store::remove_line`].
    RemoveLine {
        contract: PhoneNumber,
    },
    /// The site's save (R-S9): see [`Store::save_call_settings`].
    SaveCallSettings {
        number: PhoneNumber,
        expected: u64,
        #[serde(deserialize_with = "crate::strict_json::known_fields_only")]
        settings: CallSettings,
    },
    /// R-I7: see [`Store::set_line_unit`].
    SetLineUnit {
        contract: PhoneNumber,
        unit: AuthUnit,
    },
    /// A temporary password (R-I7) or a password (R-S4) replaces the number's credential.
    SetCredential {
        number: PhoneNumber,
        #[serde(deserialize_with = "crate::strict_json::known_fields_only")]
        record: CredentialRecord,
    },
    /// Provisioning restores an exported credential; refused for a number not provisioned,
    /// or not on line `line` where that is given (an import's line the store refused: its
    /// number may be another line's). Also a password set by phone or on the site that
    /// must land only while its number is on the line it was asked for
    /// ([`Store::set_credential_on_line`]): an op every owner since `line` came knows.
    RestoreCredential {
        number: PhoneNumber,
        #[serde(deserialize_with = "crate::strict_json::known_fields_only")]
        record: CredentialRecord,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        line: Option<PhoneNumber>,
    },
    RemoveCredential {
        number: PhoneNumber,
    },
    /// A login attempt whose password was checked against `hash` (R-S2, R-S3, R-S6, R-I8).
    LoginAttempt {
        number: PhoneNumber,
        hash: String,
        matched: bool,
        now: DateTime<Utc>,
    },
    /// A site session starts, under `key` (a hash of the id its browser holds).
    PutSession {
        key: String,
        #[serde(deserialize_with = "crate::strict_json::known_fields_only")]
        session: SessionRecord,
    },
    /// A request of session `key` at `now`: its idle timeout restarts, unless it has
    /// ended (then it is removed).
    TouchSession {
        key: String,
        now: DateTime<Utc>,
    },
    /// Keeps `html` for the session's next GET of `path`.
    SetFlash {
        key: String,
        path: String,
        html: String,
    },
    /// The page kept for the session's GET of `path`, once.
    TakeFlash {
        key: String,
        path: String,
    },
    /// Logout: the session ends everywhere.
    RemoveSession {
        key: String,
    },
    /// Every session of `number` ends but `keep` (a password changed).
    RemoveSessions {
        number: PhoneNumber,
        keep: Option<String>,
    },
    /// Ended sessions are forgotten.
    SweepSessions {
        now: DateTime<Utc>,
    },
    /// Writes nothing: its answer comes once the asking node's view shows every write
    /// carried out before it ([`Store::sync_view`]).
    Sync,
    /// Provisioning's fax settings: see [`Store::import_fax_settings_here`]; refused for a
    /// number not on line `line` where that is given, as [`Op::RestoreCredential`].
    ImportFaxSettings {
        number: PhoneNumber,
        #[serde(deserialize_with = "crate::strict_json::known_fields_only")]
        settings: FaxSettings,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        line: Option<PhoneNumber>,
    },
    /// The site's save of a number's fax settings (R-F1, R-S9).
    SaveFaxSettings {
        number: PhoneNumber,
        expected: u64,
        #[serde(deserialize_with = "crate::strict_json::known_fields_only")]
        settings: FaxSettings,
    },
    /// A received fax is kept, unless it is already (R-F1): see [`Store::keep_fax`].
    KeepFax {
        #[serde(deserialize_with = "crate::strict_json::known_fields_only")]
        record: FaxRecord,
        document: DocumentBytes,
    },
    /// The site showed the fax under `key`.
    MarkFaxRead {
        key: String,
    },
    /// The subscriber deleted the fax under `key`.
    DeleteFax {
        key: String,
    },
    /// Faxes received before `before` are forgotten (`store.fax_retention_days`).
    ExpireFaxes {
        before: DateTime<Utc>,
    },
}

impl Op {
    /// What the op is, for logs (never its values: hashes stay out of logs).
    pub fn name(&self) -> &'static str {
        match self {
            Op::UpsertLine { .. } => "upsert_line",
            Op::RemoveLine { .. } => "remove_line",
            Op::SaveCallSettings { .. } => "save_call_settings",
            Op::SetLineUnit { .. } => "set_line_unit",
            Op::SetCredential { .. } => "set_credential",
            Op::RestoreCredential { .. } => "restore_credential",
            Op::RemoveCredential { .. } => "remove_credential",
            Op::LoginAttempt { .. } => "login_attempt",
            Op::PutSession { .. } => "put_session",
            Op::TouchSession { .. } => "touch_session",
            Op::SetFlash { .. } => "set_flash",
            Op::TakeFlash { .. } => "take_flash",
            Op::RemoveSession { .. } => "remove_session",
            Op::RemoveSessions { .. } => "remove_sessions",
            Op::SweepSessions { .. } => "sweep_sessions",
            Op::SaveFaxSettings { .. } => "save_fax_settings",
            Op::ImportFaxSettings { .. } => "import_fax_settings",
            Op::KeepFax { .. } => "keep_fax",
            Op::MarkFaxRead { .. } => "mark_fax_read",
            Op::DeleteFax { .. } => "delete_fax",
            Op::ExpireFaxes { .. } => "expire_faxes",
            Op::Sync => "sync",
        }
    }
}

/// The ops of an import run beside each other in a batch ([`super::batch`]).
impl super::batch::Reach for Op {
    fn independent(&self) -> bool {
        matches!(self, Op::UpsertLine { .. } | Op::RestoreCredential { .. } | Op::ImportFaxSettings { .. })
    }

    fn reach(&self, store: &Store) -> Result<Vec<PhoneNumber>, StoreError> {
        /// What of a stored line says where an upsert of it reaches: the numbers it may remove.
        #[derive(serde::Deserialize)]
        struct Listed {
            numbers: Vec<PhoneNumber>,
        }
        // A stored number's line (`OfLine`) says where an upsert listing it reaches: the
        // line it may take the number from.
        use super::records::OfLine;
        match self {
            Op::UpsertLine { line, numbers } => {
                let mut reach = vec![line.contract];
                if let Some(raw) = store.lines.get(line.contract.as_str())? {
                    reach.extend(serde_json::from_slice::<Listed>(&raw)?.numbers);
                }
                for (number, ..) in numbers {
                    reach.push(*number);
                    if let Some(raw) = store.numbers.get(number.as_str())? {
                        reach.push(serde_json::from_slice::<OfLine>(&raw)?.contract);
                    }
                }
                Ok(reach)
            }
            // The number's record and credential.
            Op::RestoreCredential { number, .. } | Op::ImportFaxSettings { number, .. } => Ok(vec![*number]),
            other => Err(StoreError::State(format!("{} runs alone, not beside others", other.name()))),
        }
    }
}

/// What an op answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Upserted(Upserted),
    /// The settings' new version.
    Version(u64),
    Done,
    /// Whether there was something to remove.
    Removed(bool),
    Attempt(Attempt),
    /// The session after a touch (`None`: there is none, or it has ended).
    Session(Option<SessionRecord>),
    Flash(Option<String>),
}

/// How a login attempt counted, decided where the count is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attempt {
    /// The number has no credential.
    Unknown,
    /// Invalidated by consecutive wrong entries before this attempt.
    Locked,
    /// A temporary password older than 24 hours (R-I8).
    Expired,
    /// The credential is no longer the one the password was checked against (set again
    /// meanwhile): check again.
    Changed,
    Accepted {
        kind: CredentialKind,
        /// After a temporary password, or a password older than 60 days (R-S4, R-S6).
        must_change: bool,
    },
    /// Counted; `locked` when this entry invalidated the credential (R-S2, R-S3).
    Wrong { kind: CredentialKind, locked: bool },
}

/// An op's error as it travels back from the owner: what a caller handles by kind
/// stays a kind, the rest is its message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpError {
    StaleVersion {
        current: u64,
    },
    UnknownNumber(PhoneNumber),
    ContractInUse {
        number: PhoneNumber,
        others: Vec<PhoneNumber>,
    },
    /// An import's line reached a record the owner cannot read: that line is refused,
    /// the import goes on.
    UnreadableNumber {
        number: PhoneNumber,
        why: String,
    },
    Failed(String),
}

impl From<&StoreError> for OpError {
    fn from(e: &StoreError) -> Self {
        match e {
            StoreError::StaleVersion { current } => OpError::StaleVersion { current: *current },
            StoreError::UnknownNumber(n) => OpError::UnknownNumber(*n),
            StoreError::ContractInUse { number, others } => {
                OpError::ContractInUse { number: *number, others: others.clone() }
            }
            StoreError::UnreadableNumber { number, why } => {
                OpError::UnreadableNumber { number: *number, why: why.clone() }
            }
            other => OpError::Failed(other.to_string()),
        }
    }
}

impl From<OpError> for StoreError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::StaleVersion { current } => StoreError::StaleVersion { current },
            OpError::UnknownNumber(n) => StoreError::UnknownNumber(n),
            OpError::ContractInUse { number, others } => StoreError::ContractInUse { number, others },
            OpError::UnreadableNumber { number, why } => StoreError::UnreadableNumber { number, why },
            OpError::Failed(message) => StoreError::State(message),
        }
    }
}

/// The answers to ops on their way ([`Store::send_all`]), one per op in order: calling
/// it waits for them. Blocks: call it where blocking is allowed (tokio's blocking pool,
/// a tool).
pub type Answers = Box<dyn FnOnce() -> Vec<Result<Reply, StoreError>> + Send>;

/// Where ops go when the state is shared (the Kafka state log).
pub trait StateWriter: Send + Sync {
    /// Sends `ops` to be carried out in order, after every op this node sent before
    /// them, and returns without waiting; each answer arrives once this store shows the
    /// write.
    fn send(self: Arc<Self>, ops: Vec<Op>) -> Answers;
}

/// What an op changed, for the state owner to publish.
#[derive(Debug)]
pub enum Changed {
    /// Keys the op may have changed: the owner publishes those whose value differs
    /// from what [`Store::values_before`] read.
    Keys(Vec<StateKey>),
    /// The values the op wrote (`None`: removed), each key once: published as they are.
    Values(Written),
}

/// The values a write made, in order, the last value of each key only.
#[derive(Debug, Default)]
pub struct Written(Vec<(StateKey, Option<sled::IVec>)>);

impl Written {
    pub(super) fn line(&mut self, contract: &PhoneNumber, value: sled::IVec) {
        self.put(StateKey::number(StateTree::Lines, contract), Some(value));
    }

    pub(super) fn line_removed(&mut self, contract: &PhoneNumber) {
        self.put(StateKey::number(StateTree::Lines, contract), None);
    }

    pub(super) fn number(&mut self, number: &PhoneNumber, value: Option<sled::IVec>) {
        self.put(StateKey::number(StateTree::Numbers, number), value);
    }

    pub(super) fn credential_removed(&mut self, number: &PhoneNumber) {
        self.put(StateKey::number(StateTree::Credentials, number), None);
    }

    /// The session stored under `key` (a hash of its id) ended.
    pub(super) fn session_removed(&mut self, key: String) {
        self.put(StateKey::session(&key), None);
    }

    /// A key written again (an upsert that started over) keeps only its last value.
    pub(super) fn put(&mut self, key: StateKey, value: Option<sled::IVec>) {
        self.0.retain(|(k, _)| *k != key);
        self.0.push((key, value));
    }

    pub fn into_values(self) -> Vec<(StateKey, Option<sled::IVec>)> {
        self.0
    }
}

/// The trees that hold subscriber state, as keys of the state topic name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateTree {
    Lines,
    Numbers,
    Credentials,
    /// Site sessions, by a hash of their id.
    Sessions,
    /// Received faxes ([`super::faxes`]).
    Faxes,
    FaxDocuments,
}

impl StateTree {
    pub const ALL: [StateTree; 6] = [
        StateTree::Lines,
        StateTree::Numbers,
        StateTree::Credentials,
        StateTree::Sessions,
        StateTree::Faxes,
        StateTree::FaxDocuments,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StateTree::Lines => "lines",
            StateTree::Numbers => "numbers",
            StateTree::Credentials => super::CREDENTIALS_TREE,
            StateTree::Sessions => SESSIONS_TREE,
            StateTree::Faxes => FAXES_TREE,
            StateTree::FaxDocuments => FAX_DOCUMENTS_TREE,
        }
    }
}

/// The tree of site sessions.
pub const SESSIONS_TREE: &str = "sessions";

/// One key of subscriber state: `tree/id` in the state topic (the id a phone number,
/// or a session's hash).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StateKey {
    pub tree: StateTree,
    pub id: String,
}

impl StateKey {
    /// The key of `number` in `tree`.
    pub fn number(tree: StateTree, number: &PhoneNumber) -> Self {
        Self { tree, id: number.as_str().to_owned() }
    }

    /// The key of the session stored under `key` (a hash of its id).
    pub fn session(key: &str) -> Self {
        Self { tree: StateTree::Sessions, id: key.to_owned() }
    }

    pub fn encode(&self) -> String {
        format!("{}/{}", self.tree.name(), self.id)
    }

    /// `None` for a key that names no state tree (the owner's reply records).
    pub fn decode(raw: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(raw).ok()?;
        let (tree, id) = text.split_once('/')?;
        let tree = StateTree::ALL.into_iter().find(|t| t.name() == tree)?;
        Some(Self { tree, id: id.to_owned() })
    }
}

/// The tree of this node's bookkeeping of the state topic.
const META_TREE: &str = "state_meta";
/// Next offset of the state topic to apply (i64, big-endian).
const POSITION: &[u8] = b"position";
/// Followed by a node's id: the id of the last of its state requests whose answer this
/// store applied (u64, big-endian).
const ANSWERED: &str = "answered/";
/// The state topic this store is a view of, once it has been attached to one.
const TOPIC: &[u8] = b"topic";
/// Set when [`TOPIC`] lives in the embedded cluster, which ends with its process: the
/// store is then its own truth between runs (the next start publishes it again).
const EMBEDDED: &[u8] = b"topic_embedded";
/// The owner epoch in force at [`POSITION`]: the offset of the last owner's
/// announcement read (i64, big-endian; `crate::state` fences by it).
const EPOCH: &[u8] = b"owner_epoch";
/// Set when this store may hold writes the state topic lacks (an owner's publish
/// failed): the view is rebuilt from the topic at the next start.
const DIVERGED: &[u8] = b"diverged";
/// The state topic this store's values are being carried into (it was empty): a start
/// that finds it carries them over again, whatever part of them the topic holds, instead
/// of taking that part for the truth.
const CARRYING: &[u8] = b"carrying_over";
/// Set while the state owner carries out writes the state topic has not confirmed: a
/// crash before they are confirmed leaves the store to be rebuilt. A key of its own, so
/// that the end of a batch never takes back [`DIVERGED`], which the applier may set
/// meanwhile (it found this owner's records fenced).
const OWNER_BATCH: &[u8] = b"owner_batch";
/// When this store's applier last found nothing more to read in the state topic, or
/// when a reading from the topic's start began (unix seconds, big-endian): a store away
/// longer than the topic keeps tombstones may have missed deletions, and is rebuilt
/// ([`crate::state`]).
const CAUGHT_UP_AT: &[u8] = b"caught_up_at";
/// Set once the store, a view, has read the state topic to its end (cleared with the
/// rest of the view by a rebuild): a backup of it holds every subscriber.
const READ_TO_END: &[u8] = b"read_to_end";
/// Before a state key: a replaced owner's record is its last in the topic, and the owner
/// writes it again (cleared with the rest of the view by a rebuild, which reads them
/// again).
const FENCED: &str = "fenced/";

/// A record of the state topic [`Store::apply_state`] passed over: its key, and why.
#[derive(Debug)]
pub struct Unreadable {
    pub key: String,
    pub why: String,
}

impl Store {
    /// Sends every write of subscriber state to `writer` from now on.
    pub fn attach_writer(&self, writer: Arc<dyn StateWriter>) {
        let _ = self.writer.set(writer);
    }

    /// Whether this store's writes go to a shared state log.
    pub fn is_shared(&self) -> bool {
        self.writer.get().is_some()
    }

    /// Carries out `op` where the state is kept: through the attached writer, or here.
    pub fn submit(&self, op: Op) -> Result<Reply, StoreError> {
        self.submit_all(vec![op]).pop().expect("one answer per op")
    }

    /// Waits until this node's view shows every write of subscriber state carried out
    /// before the call, through any node: for a read whose miss a write on another node
    /// a moment ago may explain (its records reach this node within a second). One
    /// exchange with the state owner, which writes nothing for it.
    pub fn sync_view(&self) -> Result<(), StoreError> {
        self.submit(Op::Sync).map(drop)
    }

    /// [`Store::submit`] for many ops, in order, in one exchange with the owner.
    pub fn submit_all(&self, ops: Vec<Op>) -> Vec<Result<Reply, StoreError>> {
        self.send_all(ops)()
    }

    /// [`Store::submit_all`] without waiting for the answers: ops sent after these are
    /// carried out after them, so a caller can send its next ops while the owner works
    /// on these. Without a writer the ops are carried out here before it returns.
    pub fn send_all(&self, ops: Vec<Op>) -> Answers {
        match self.writer.get() {
            Some(writer) => writer.clone().send(ops),
            None => {
                let one_at_a_time = self.carrying_out.lock().unwrap_or_else(|e| e.into_inner());
                let answers =
                    self.execute_batch(&ops, super::batch::threads(), |op| self.execute(op).map(|(reply, _)| reply));
                drop(one_at_a_time);
                Box::new(move || answers)
            }
        }
    }

    /// Carries out `op` on this store (the owner's side); also returns what it changed.
    pub fn execute(&self, op: &Op) -> Result<(Reply, Changed), StoreError> {
        let (reply, changed) = self.attempt(op);
        reply.map(|reply| (reply, changed))
    }

    /// [`Store::execute`], with what the op changed also when it failed part way (a
    /// record it could not read, a write sled refused after others went through): the
    /// owner publishes those too, so that every node's store keeps holding what the
    /// owner's holds.
    pub fn attempt(&self, op: &Op) -> (Result<Reply, StoreError>, Changed) {
        match op {
            Op::UpsertLine { line, numbers } => {
                let mut written = Written::default();
                let reply = self.upsert_line_here(line, numbers, &mut written).map(Reply::Upserted);
                (reply, Changed::Values(written))
            }
            Op::RemoveLine { contract } => {
                let mut written = Written::default();
                let reply = self.remove_line_here(contract, &mut written).map(Reply::Upserted);
                (reply, Changed::Values(written))
            }
            Op::KeepFax { .. } | Op::MarkFaxRead { .. } | Op::DeleteFax { .. } | Op::ExpireFaxes { .. } => {
                let mut written = Written::default();
                let reply = self.execute_fax(op, &mut written);
                (reply, Changed::Values(written))
            }
            other => {
                let mut touched = Vec::new();
                let reply = self.execute_keyed(other, &mut touched);
                (reply, Changed::Keys(touched))
            }
        }
    }

    /// [`Store::attempt`] of an op that names the keys it may change, into `touched`
    /// before it writes them.
    fn execute_keyed(&self, op: &Op, touched: &mut Vec<StateKey>) -> Result<Reply, StoreError> {
        let mut key = |tree: StateTree, number: &PhoneNumber| touched.push(StateKey::number(tree, number));
        match op {
            Op::UpsertLine { .. }
            | Op::RemoveLine { .. }
            | Op::KeepFax { .. }
            | Op::MarkFaxRead { .. }
            | Op::DeleteFax { .. }
            | Op::ExpireFaxes { .. } => Err(StoreError::State(format!("{} names what it wrote", op.name()))),
            Op::SaveFaxSettings { number, expected, settings } => {
                key(StateTree::Numbers, number);
                Ok(Reply::Version(self.save_fax_settings_here(number, *expected, settings.clone())?))
            }
            Op::ImportFaxSettings { number, settings, line } => {
                self.check_on_line(number, line.as_ref())?;
                key(StateTree::Numbers, number);
                Ok(Reply::Version(self.import_fax_settings_here(number, settings)?))
            }
            Op::SaveCallSettings { number, expected, settings } => {
                key(StateTree::Numbers, number);
                Ok(Reply::Version(self.save_call_settings_here(number, *expected, settings.clone())?))
            }
            Op::SetLineUnit { contract, unit } => {
                key(StateTree::Lines, contract);
                self.set_line_unit_here(contract, *unit)?;
                Ok(Reply::Done)
            }
            Op::SetCredential { number, record } => {
                key(StateTree::Credentials, number);
                self.credentials.insert(number.as_str(), serde_json::to_vec(record)?)?;
                Ok(Reply::Done)
            }
            Op::RestoreCredential { number, record, line } => {
                self.check_on_line(number, line.as_ref())?;
                key(StateTree::Credentials, number);
                self.credentials.insert(number.as_str(), serde_json::to_vec(record)?)?;
                Ok(Reply::Done)
            }
            Op::RemoveCredential { number } => {
                key(StateTree::Credentials, number);
                Ok(Reply::Removed(self.credentials.remove(number.as_str())?.is_some()))
            }
            Op::LoginAttempt { number, hash, matched, now } => {
                key(StateTree::Credentials, number);
                Ok(Reply::Attempt(self.login_attempt_here(number, hash, *matched, *now)?))
            }
            Op::PutSession { key, session: record } => {
                touched.push(StateKey::session(key));
                self.sessions.insert(key.as_bytes(), serde_json::to_vec(record)?)?;
                Ok(Reply::Done)
            }
            Op::TouchSession { key, now } => {
                let Some(mut record) = self.session(key)? else { return Ok(Reply::Session(None)) };
                touched.push(StateKey::session(key));
                if record.expired(*now) {
                    self.sessions.remove(key.as_bytes())?;
                    return Ok(Reply::Session(None));
                }
                record.last_seen = *now;
                self.sessions.insert(key.as_bytes(), serde_json::to_vec(&record)?)?;
                Ok(Reply::Session(Some(record)))
            }
            Op::SetFlash { key, path, html } => {
                let Some(mut record) = self.session(key)? else { return Ok(Reply::Done) };
                touched.push(StateKey::session(key));
                record.flash = Some((path.clone(), html.clone()));
                self.sessions.insert(key.as_bytes(), serde_json::to_vec(&record)?)?;
                Ok(Reply::Done)
            }
            Op::TakeFlash { key, path } => {
                let Some(mut record) = self.session(key)? else { return Ok(Reply::Flash(None)) };
                // Another page's stays for that page.
                if record.flash.as_ref().is_none_or(|(kept, _)| kept != path) {
                    return Ok(Reply::Flash(None));
                }
                let Some((_, html)) = record.flash.take() else { return Ok(Reply::Flash(None)) };
                touched.push(StateKey::session(key));
                self.sessions.insert(key.as_bytes(), serde_json::to_vec(&record)?)?;
                Ok(Reply::Flash(Some(html)))
            }
            Op::RemoveSession { key } => {
                touched.push(StateKey::session(key));
                self.sessions.remove(key.as_bytes())?;
                Ok(Reply::Done)
            }
            Op::RemoveSessions { number, keep } => {
                self.end_sessions(
                    |id, record| record.number == *number && keep.as_deref() != Some(id),
                    |id| touched.push(StateKey::session(&id)),
                )?;
                Ok(Reply::Done)
            }
            Op::SweepSessions { now } => {
                self.end_sessions(|_, record| record.expired(*now), |id| touched.push(StateKey::session(&id)))?;
                Ok(Reply::Done)
            }
            Op::Sync => Ok(Reply::Done),
        }
    }

    /// The session stored under `key`, if any.
    pub fn session(&self, key: &str) -> Result<Option<SessionRecord>, StoreError> {
        self.sessions.get(key.as_bytes())?.map(|raw| serde_json::from_slice(&raw).map_err(StoreError::from)).transpose()
    }

    /// Ends every session of the line of `numbers` in one write, on every node (a unit
    /// change, by phone or on the site: a session that went on would keep the old unit's
    /// reach and idle timeout, R-S7).
    pub fn end_line_sessions(&self, numbers: &[PhoneNumber]) -> Result<(), StoreError> {
        let ends = numbers.iter().map(|number| Op::RemoveSessions { number: *number, keep: None }).collect();
        self.submit_all(ends).into_iter().try_for_each(|ended| ended.map(drop))
    }

    /// How many sessions this store holds.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Removes the sessions for which `ends` holds, telling `ended` each one's key as it
    /// goes (those removed before a failure included).
    pub(super) fn end_sessions(
        &self,
        ends: impl Fn(&str, &SessionRecord) -> bool,
        mut ended: impl FnMut(String),
    ) -> Result<(), StoreError> {
        for item in self.sessions.iter() {
            let (key, raw) = item?;
            let id = String::from_utf8_lossy(&key).into_owned();
            // A record that does not read back ends too.
            if serde_json::from_slice(&raw).map_or(true, |record| ends(&id, &record)) {
                self.sessions.remove(&key)?;
                ended(id);
            }
        }
        Ok(())
    }

    /// The values before `op` of the keys it may change, known before it runs, for an
    /// op that answers [`Changed::Keys`].
    pub fn values_before(&self, op: &Op) -> Result<Vec<(StateKey, Option<sled::IVec>)>, StoreError> {
        let mut keys = Vec::new();
        match op {
            // They name the values they wrote ([`Changed::Values`]).
            Op::UpsertLine { .. }
            | Op::RemoveLine { .. }
            | Op::KeepFax { .. }
            | Op::MarkFaxRead { .. }
            | Op::DeleteFax { .. }
            | Op::ExpireFaxes { .. } => {}
            Op::SaveCallSettings { number, .. }
            | Op::SaveFaxSettings { number, .. }
            | Op::ImportFaxSettings { number, .. } => keys.push(StateKey::number(StateTree::Numbers, number)),
            Op::SetLineUnit { contract, .. } => keys.push(StateKey::number(StateTree::Lines, contract)),
            Op::SetCredential { number, .. }
            | Op::RestoreCredential { number, .. }
            | Op::RemoveCredential { number }
            | Op::LoginAttempt { number, .. } => keys.push(StateKey::number(StateTree::Credentials, number)),
            Op::PutSession { key, .. }
            | Op::TouchSession { key, .. }
            | Op::SetFlash { key, .. }
            | Op::TakeFlash { key, .. }
            | Op::RemoveSession { key } => keys.push(StateKey::session(key)),
            Op::RemoveSessions { .. } | Op::SweepSessions { .. } | Op::Sync => {}
        }
        keys.into_iter().map(|k| Ok((k.clone(), self.state_value(&k)?))).collect()
    }

    /// Counts one login attempt on `number`'s credential, if it is still the one with
    /// `hash` (R-S2, R-S3): the only place a failure count changes.
    fn login_attempt_here(
        &self,
        number: &PhoneNumber,
        hash: &str,
        matched: bool,
        now: DateTime<Utc>,
    ) -> Result<Attempt, StoreError> {
        let Some(mut record) = self.credential(number)? else { return Ok(Attempt::Unknown) };
        if record.hash != hash {
            return Ok(Attempt::Changed);
        }
        if record.invalidated {
            return Ok(Attempt::Locked);
        }
        if record.kind == CredentialKind::Temporary && now >= record.set_at + TEMPORARY_VALIDITY {
            return Ok(Attempt::Expired);
        }
        let attempt = if matched {
            let must_change = record.kind == CredentialKind::Temporary || now >= record.set_at + PASSWORD_LIFETIME;
            if record.failures == 0 {
                return Ok(Attempt::Accepted { kind: record.kind, must_change });
            }
            record.failures = 0;
            Attempt::Accepted { kind: record.kind, must_change }
        } else {
            record.failures += 1;
            record.invalidated = record.failures >= record.kind.max_failures();
            Attempt::Wrong { kind: record.kind, locked: record.invalidated }
        };
        self.credentials.insert(number.as_str(), serde_json::to_vec(&record)?)?;
        Ok(attempt)
    }

    /// The stored value of `key` (what the owner publishes after an op).
    pub fn state_value(&self, key: &StateKey) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.state_tree(key.tree).get(key.id.as_bytes())?)
    }

    fn state_tree(&self, tree: StateTree) -> &sled::Tree {
        match tree {
            StateTree::Lines => &self.lines,
            StateTree::Numbers => &self.numbers,
            StateTree::Credentials => &self.credentials,
            StateTree::Sessions => &self.sessions,
            StateTree::Faxes => &self.faxes,
            StateTree::FaxDocuments => &self.fax_documents,
        }
    }

    /// Applies values read from the state topic (`None`: the key was deleted), then
    /// records `position` as the next offset to read with the owner epoch in force
    /// there (one batch: a restart reads on with the epoch of its position), and the
    /// requests answered (node, request id), and tells the listeners of every number
    /// whose record changed. A value applied twice is the same value: a node that
    /// stops between the two steps applies a few records again, harmlessly.
    pub fn apply_state(
        &self,
        values: &[(StateKey, Option<Vec<u8>>)],
        position: i64,
        epoch: Option<i64>,
        answered: &[(String, u64)],
    ) -> Result<Vec<Unreadable>, StoreError> {
        // Plain writes, each key's in order, not sled batches: at 10 000 000 numbers
        // batches of 20 000 records applied half as fast and held their records twice
        // in memory. The position is written after every value is (the threads below
        // are done), and sled keeps writes in order, so a crash between loses no value
        // the position claims.
        // Records no version could read (written into the topic by mistake) are passed
        // over: failing the batch would stop this view, and every node's, for good.
        let unreadable = std::sync::Mutex::new(Vec::new());
        let passed_over = |key: &StateKey, why: String| {
            unreadable.lock().expect("unreadable lock").push(Unreadable { key: key.encode(), why });
        };
        let apply = |(key, value): &(StateKey, Option<Vec<u8>>)| {
            let number = match key.tree {
                StateTree::Numbers => match PhoneNumber::parse(&key.id) {
                    Ok(number) => Some(number),
                    Err(e) => {
                        passed_over(key, e.to_string());
                        return Ok(None);
                    }
                },
                _ => None,
            };
            let tree = self.state_tree(key.tree);
            match value {
                Some(raw) => tree.insert(key.id.as_bytes(), raw.as_slice())?,
                None => tree.remove(key.id.as_bytes())?,
            };
            let Some(number) = number else { return Ok(None) };
            // Only what the index of subscribed numbers and the listeners need: the
            // rest is read when the number is looked up.
            #[derive(serde::Deserialize)]
            struct Contracted {
                services: Services,
            }
            let contracted = match value.as_deref().map(serde_json::from_slice::<Contracted>).transpose() {
                Ok(contracted) => contracted,
                Err(e) => {
                    // Kept as written: the number's lookups fail (and say so) until a
                    // good record replaces it; its services count as none meanwhile.
                    passed_over(key, e.to_string());
                    None
                }
            };
            let services = contracted.map(|c| c.services);
            // The index before the position (sled keeps writes in order): written after
            // it, a node killed between the two had the number out of its index for good.
            self.index_subscribed(&number, services.is_some_and(|s| s.call))?;
            // Whether anyone listens is looked at after the write, record by record: a
            // listener registered while this batch is applied (the resolver, at start)
            // either reads this write in its first scan or is told of it.
            if self.listeners.read().expect("listener lock").is_empty() {
                return Ok(None);
            }
            Ok::<_, StoreError>(Some((number, services)))
        };
        // On several threads, each key's records on one, in their order: sled's work
        // limits a catch-up (the applier's thread had three quarters of a node's CPU
        // samples). On this 2-core machine 1.09 times as fast at a million lines, no
        // faster at ten million (BENCHMARKS.md). A record that fails leaves the
        // position where it was: the next try writes the same values again.
        let mut changed = Vec::new();
        for applied in super::batch::by_key(values, super::batch::threads(), |(key, _)| key, apply) {
            changed.extend(applied?);
        }
        let meta = self.meta()?;
        // A node's requests are answered in the order it numbered them: its last one
        // in the batch stands for all (a batch names each request twice, by its last
        // value and by its reply).
        let mut last: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for (node, id) in answered {
            let at = last.entry(node.as_str()).or_insert(*id);
            *at = (*at).max(*id);
        }
        for (node, id) in last {
            meta.insert(format!("{ANSWERED}{node}").as_bytes(), &id.to_be_bytes())?;
        }
        let mut at = sled::Batch::default();
        if let Some(epoch) = epoch {
            at.insert(EPOCH, &epoch.to_be_bytes());
        }
        at.insert(POSITION, &position.to_be_bytes());
        meta.apply_batch(at)?;
        self.tell_listeners(&changed);
        Ok(unreadable.into_inner().expect("unreadable lock"))
    }

    /// The owner epoch in force at [`Store::state_position`], once an owner announced.
    pub fn owner_epoch(&self) -> Result<Option<i64>, StoreError> {
        self.meta_offset(EPOCH)
    }

    /// The next offset of the state topic this store has not applied (0: none yet).
    pub fn state_position(&self) -> Result<i64, StoreError> {
        Ok(self.meta_offset(POSITION)?.unwrap_or(0))
    }

    /// An offset of the state topic kept under `key` (i64, big-endian).
    fn meta_offset(&self, key: &[u8]) -> Result<Option<i64>, StoreError> {
        let raw = self.meta()?.get(key)?;
        Ok(raw.and_then(|r| <[u8; 8]>::try_from(r.as_ref()).ok()).map(i64::from_be_bytes))
    }

    /// Sets the next offset of the state topic to apply (after publishing the store's
    /// values into an empty topic: past them).
    pub fn set_state_position(&self, position: i64) -> Result<(), StoreError> {
        self.meta()?.insert(POSITION, &position.to_be_bytes())?;
        Ok(())
    }

    /// The id of the last of `node`'s state requests whose answer this store applied:
    /// a node numbers its requests in the order it sends them, so any id up to it is
    /// answered (an owner taking over skips them).
    pub fn answered(&self, node: &str) -> Result<Option<u64>, StoreError> {
        let raw = self.meta()?.get(format!("{ANSWERED}{node}"))?;
        Ok(raw.and_then(|r| <[u8; 8]>::try_from(r.as_ref()).ok()).map(u64::from_be_bytes))
    }

    /// The state topic this store is a view of, if it has been attached to one.
    pub fn state_topic(&self) -> Result<Option<String>, StoreError> {
        Ok(self.meta()?.get(TOPIC)?.map(|raw| String::from_utf8_lossy(&raw).into_owned()))
    }

    /// Whether this store is the view of a state topic and of a cluster like this: on the
    /// embedded cluster (`embedded`) or on a real one. A store that served on the
    /// embedded cluster is a single-node store to a real cluster, whatever its topic's
    /// name: that topic was another.
    pub fn viewing(&self, topic: &str, embedded: bool) -> Result<bool, StoreError> {
        Ok(self.state_topic()?.as_deref() == Some(topic) && self.meta()?.contains_key(EMBEDDED)? == embedded)
    }

    /// Forgets where this store stood in the state topic it was a view of (its position,
    /// owner epoch, answered requests, marks), keeping its values: for a store that
    /// is no view of the topic it now meets.
    pub fn forget_state_position(&self) -> Result<(), StoreError> {
        self.meta()?.clear()?;
        Ok(())
    }

    /// The state topic this store is a node's view of, on a cluster that outlives the
    /// node: a write made to the store alone (with the node stopped) would reach no
    /// other node and be overwritten. None for a store of its own, or the view of the
    /// embedded cluster's topic, which the store's next start fills from it again.
    pub fn shared_view_of(&self) -> Result<Option<String>, StoreError> {
        if self.meta()?.contains_key(EMBEDDED)? {
            return Ok(None);
        }
        self.state_topic()
    }

    /// Marks this store as the view of `topic`, in the embedded cluster or not.
    pub fn set_state_topic(&self, topic: &str, embedded: bool) -> Result<(), StoreError> {
        let meta = self.meta()?;
        meta.insert(TOPIC, topic.as_bytes())?;
        if embedded {
            meta.insert(EMBEDDED, &[1])?;
        } else {
            meta.remove(EMBEDDED)?;
        }
        Ok(())
    }

    /// The state topic a carry-over of this store's values into it was started for and
    /// not finished ([`Store::begin_carry_over`]).
    pub fn carrying_over(&self) -> Result<Option<String>, StoreError> {
        Ok(self.meta()?.get(CARRYING)?.map(|raw| String::from_utf8_lossy(&raw).into_owned()))
    }

    /// Records, on disk, that this store's values are being carried into `topic`.
    pub fn begin_carry_over(&self, topic: &str) -> Result<(), StoreError> {
        self.meta()?.insert(CARRYING, topic.as_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// The carry-over is done: the topic has every value. On disk before it returns: a
    /// store killed a moment later and still marked would publish its values again at
    /// its next start, over what other nodes wrote meanwhile.
    pub fn end_carry_over(&self) -> Result<(), StoreError> {
        if self.meta()?.remove(CARRYING)?.is_some() {
            self.db.flush()?;
        }
        Ok(())
    }

    /// Marks this store as holding writes its state topic may lack.
    pub fn mark_diverged(&self) -> Result<(), StoreError> {
        self.meta()?.insert(DIVERGED, &[1])?;
        self.db.flush()?;
        Ok(())
    }

    /// The owner is about to carry out writes that are not in the state topic yet: until
    /// [`Store::end_owner_batch`], a crash leaves the store marked as diverged. No flush:
    /// sled keeps writes in order, so any of the batch's writes that survives a crash
    /// comes with this mark.
    pub fn begin_owner_batch(&self) -> Result<(), StoreError> {
        self.meta()?.insert(OWNER_BATCH, &[1])?;
        Ok(())
    }

    /// The owner's writes are confirmed in the state topic, and its applier has read them
    /// back without finding them fenced.
    pub fn end_owner_batch(&self) -> Result<(), StoreError> {
        self.meta()?.remove(OWNER_BATCH)?;
        Ok(())
    }

    /// Whether [`Store::mark_diverged`] was called since the view was last rebuilt, or
    /// an owner's batch was left unconfirmed.
    pub fn diverged(&self) -> Result<bool, StoreError> {
        let meta = self.meta()?;
        Ok(meta.contains_key(DIVERGED)? || meta.contains_key(OWNER_BATCH)?)
    }

    /// [`StoreError::UnknownNumber`] unless `number` is provisioned, on line `line` if
    /// that is given.
    fn check_on_line(&self, number: &PhoneNumber, line: Option<&PhoneNumber>) -> Result<(), StoreError> {
        let Some(raw) = self.numbers.get(number.as_str())? else { return Err(StoreError::UnknownNumber(*number)) };
        match line {
            Some(line) if serde_json::from_slice::<super::NumberRecord>(&raw)?.contract != *line => {
                Err(StoreError::UnknownNumber(*number))
            }
            _ => Ok(()),
        }
    }

    /// When this store last had read the state topic to its end, or began reading it
    /// from its start, if it noted it.
    pub fn caught_up_at(&self) -> Result<Option<u64>, StoreError> {
        let raw = self.meta()?.get(CAUGHT_UP_AT)?;
        Ok(raw.and_then(|r| <[u8; 8]>::try_from(r.as_ref()).ok()).map(u64::from_be_bytes))
    }

    /// Notes that this store had read the state topic to its end, or began reading it
    /// from its start, at `unix_secs`.
    pub fn set_caught_up_at(&self, unix_secs: u64) -> Result<(), StoreError> {
        self.meta()?.insert(CAUGHT_UP_AT, &unix_secs.to_be_bytes())?;
        Ok(())
    }

    /// Keeps the keys `noted` as fenced (a replaced owner's record last read of them),
    /// and forgets `cleared`.
    pub fn change_fenced(
        &self,
        noted: &std::collections::HashSet<String>,
        cleared: &std::collections::HashSet<String>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in noted {
            batch.insert(format!("{FENCED}{key}").as_bytes(), &[]);
        }
        for key in cleared {
            batch.remove(format!("{FENCED}{key}").as_bytes());
        }
        self.meta()?.apply_batch(batch)?;
        Ok(())
    }

    /// The keys [`Store::change_fenced`] keeps.
    pub fn fenced_keys(&self) -> Result<Vec<String>, StoreError> {
        self.meta()?
            .scan_prefix(FENCED.as_bytes())
            .keys()
            .map(|key| Ok(String::from_utf8_lossy(&key?[FENCED.len()..]).into_owned()))
            .collect()
    }

    /// Notes that this store, a view, has read the state topic to its end.
    pub fn note_read_to_end(&self) -> Result<(), StoreError> {
        let meta = self.meta()?;
        if !meta.contains_key(READ_TO_END)? {
            meta.insert(READ_TO_END, &[1])?;
        }
        Ok(())
    }

    /// Takes back [`Store::note_read_to_end`]: the view may have missed records since.
    pub fn forget_read_to_end(&self) -> Result<(), StoreError> {
        if self.meta()?.remove(READ_TO_END)?.is_some() {
            self.db.flush()?;
        }
        Ok(())
    }

    /// Whether this store has read its state topic to its end since it was last rebuilt
    /// ([`Store::note_read_to_end`]).
    pub fn has_read_to_end(&self) -> Result<bool, StoreError> {
        Ok(self.meta()?.contains_key(READ_TO_END)?)
    }

    /// Takes back [`Store::diverged`]: the store is the truth as it is (there is no
    /// topic to rebuild it from).
    pub fn trust_state(&self) -> Result<(), StoreError> {
        let meta = self.meta()?;
        meta.remove(DIVERGED)?;
        meta.remove(OWNER_BATCH)?;
        Ok(())
    }

    /// Empties the state trees and the position, so the view is rebuilt from the topic.
    pub fn forget_state(&self) -> Result<(), StoreError> {
        for tree in StateTree::ALL {
            self.state_tree(tree).clear()?;
        }
        self.subscribed.clear()?;
        let meta = self.meta()?;
        meta.clear()?;
        self.db.flush()?;
        Ok(())
    }

    /// Every key and value of the state trees (carrying a single-node store over).
    pub fn state_entries(&self) -> impl Iterator<Item = Result<(StateKey, sled::IVec), StoreError>> + '_ {
        StateTree::ALL.into_iter().flat_map(move |tree| {
            self.state_tree(tree).iter().map(move |kv| {
                let (key, value) = kv?;
                let id = String::from_utf8(key.to_vec())
                    .map_err(|_| StoreError::State(format!("{} holds a key that is not text", tree.name())))?;
                Ok((StateKey { tree, id }, value))
            })
        })
    }

    /// Whether the state trees hold anything.
    pub fn has_state(&self) -> Result<bool, StoreError> {
        Ok(StateTree::ALL.iter().any(|t| !self.state_tree(*t).is_empty()))
    }

    fn meta(&self) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(META_TREE)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> PhoneNumber {
        PhoneNumber::parse(s).unwrap()
    }

    /// R-S3 without a state owner (a store of its own: tools, a single test): wrong
    /// logins carried out at the same moment on several threads are each counted, as the
    /// single owner counts them. Each read the count and wrote it back over the others'.
    #[test]
    fn r_s3_wrong_logins_carried_out_at_once_here_are_each_counted() {
        const THREADS: u32 = 8;
        let store = Store::temporary().unwrap();
        let now = chrono::Utc::now();
        let record = CredentialRecord {
            hash: "h1".into(),
            kind: CredentialKind::Password,
            set_at: now,
            failures: 0,
            invalidated: false,
        };
        let numbers: Vec<PhoneNumber> = (0..5).map(|i| n(&format!("03123456{i:02}"))).collect();
        for number in &numbers {
            store.set_credential(number, &record).unwrap();
        }
        let at_once = std::sync::Barrier::new(THREADS as usize);
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                scope.spawn(|| {
                    for number in &numbers {
                        at_once.wait();
                        let wrong = Op::LoginAttempt { number: *number, hash: "h1".into(), matched: false, now };
                        store.submit(wrong).unwrap();
                    }
                });
            }
        });
        let counted: Vec<u32> = numbers.iter().map(|x| store.credential(x).unwrap().unwrap().failures).collect();
        assert_eq!(counted, vec![THREADS; numbers.len()]);
    }

    #[test]
    fn a_state_key_reads_back_and_reply_keys_are_no_state_keys() {
        let key = StateKey::number(StateTree::Credentials, &n("0312345678"));
        assert_eq!(StateKey::decode(key.encode().as_bytes()), Some(key));
        let session = StateKey { tree: StateTree::Sessions, id: "9f2c".into() };
        assert_eq!(StateKey::decode(session.encode().as_bytes()), Some(session));
        assert_eq!(StateKey::decode(b"reply/9f2c"), None);
    }

    /// docs/cluster.md, "A paused owner is fenced": the applier may find this node's
    /// records fenced while the owner carries out its next batch; the end of that batch
    /// leaves the store to be rebuilt all the same.
    #[test]
    fn a_store_found_diverged_during_an_owner_batch_stays_diverged_after_it() {
        let store = Store::temporary().unwrap();
        store.begin_owner_batch().unwrap();
        assert!(store.diverged().unwrap(), "a batch not yet confirmed");
        store.mark_diverged().unwrap();
        store.end_owner_batch().unwrap();
        assert!(store.diverged().unwrap(), "found fenced meanwhile: rebuilt at the next start");
        store.forget_state().unwrap();
        store.begin_owner_batch().unwrap();
        store.end_owner_batch().unwrap();
        assert!(!store.diverged().unwrap(), "a batch confirmed and read back");
    }

    /// A state owner's store and a view that applies what the owner publishes, as
    /// another node's store does.
    struct Mirrored {
        owner: Store,
        view: Store,
        position: i64,
    }

    impl Mirrored {
        fn new() -> Self {
            Self { owner: Store::temporary().unwrap(), view: Store::temporary().unwrap(), position: 0 }
        }

        /// Carries `op` out on the owner and applies what it published to the view.
        fn apply(&mut self, op: Op) -> Result<Reply, StoreError> {
            let (reply, changed) = self.owner.attempt(&op);
            let published: Vec<(StateKey, Option<Vec<u8>>)> = match changed {
                Changed::Keys(touched) => touched
                    .iter()
                    .map(|k| (k.clone(), self.owner.state_value(k).unwrap().map(|v| v.to_vec())))
                    .collect(),
                Changed::Values(written) => {
                    written.into_values().into_iter().map(|(k, v)| (k, v.map(|v| v.to_vec()))).collect()
                }
            };
            self.position += 1;
            self.view.apply_state(&published, self.position, None, &[]).unwrap();
            reply
        }
    }

    /// An upsert of line `numbers` (the first its contract), each with call notification.
    fn upsert(numbers: &[&str]) -> Op {
        let numbers: Vec<PhoneNumber> = numbers.iter().map(|x| n(x)).collect();
        Op::UpsertLine {
            line: LineRecord { contract: numbers[0], numbers: numbers.clone(), unit: None },
            numbers: numbers.iter().map(|x| (*x, Services { call: true, fax: false }, None)).collect(),
        }
    }

    fn password() -> CredentialRecord {
        CredentialRecord {
            hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
            kind: CredentialKind::Password,
            set_at: Utc::now(),
            failures: 0,
            invalidated: false,
        }
    }

    /// The owner publishes what an op touched; another store applying those values has
    /// the same line, numbers and credentials (R-L3, R-M3: a moved number included).
    #[test]
    fn r_m3_values_an_op_touched_applied_elsewhere_give_the_same_state() {
        let mut mirrored = Mirrored::new();
        mirrored.apply(upsert(&["0312345678", "0312345679"])).unwrap();
        mirrored.apply(Op::SetCredential { number: n("0312345679"), record: password() }).unwrap();
        // 0312345679 moves to another line: it leaves the first, without its credential.
        mirrored.apply(upsert(&["0612345678", "0312345679"])).unwrap();
        for store in [&mirrored.owner, &mirrored.view] {
            assert_eq!(store.line(&n("0312345678")).unwrap().unwrap().numbers, vec![n("0312345678")]);
            assert_eq!(store.number(&n("0312345679")).unwrap().unwrap().contract, n("0612345678"));
            assert_eq!(store.credential(&n("0312345679")).unwrap(), None);
        }
        assert_eq!(mirrored.view.state_position().unwrap(), 3);
    }

    /// An upsert that fails part way (here a number record the owner cannot read) has
    /// written what came before the failure into the owner's store: published all the
    /// same, every other store holds it too, and no node mails or logs in by what the
    /// owner removed (R-M3).
    #[test]
    fn r_m3_what_an_upsert_failing_part_way_wrote_reaches_the_other_stores() {
        let mut mirrored = Mirrored::new();
        mirrored.apply(upsert(&["0312345678", "0312345679"])).unwrap();
        mirrored.apply(Op::SetCredential { number: n("0312345679"), record: password() }).unwrap();
        mirrored.owner.numbers.insert("0312345670", &b"{not a number record"[..]).unwrap();

        let failed = mirrored.apply(upsert(&["0312345678", "0312345670"]));
        assert!(matches!(failed, Err(StoreError::UnreadableNumber { .. })), "{failed:?}");
        // 0312345679 left the line before the failure.
        for (name, store) in [("owner", &mirrored.owner), ("view", &mirrored.view)] {
            assert_eq!(store.number(&n("0312345679")).unwrap(), None, "{name}");
            assert_eq!(store.credential(&n("0312345679")).unwrap(), None, "{name}");
            let subscribed: Vec<PhoneNumber> = store.subscribed_numbers().map(Result::unwrap).collect();
            assert!(!subscribed.contains(&n("0312345679")), "{name}");
        }
    }

    /// A line removed on the owner (its contract ended) is gone from every store: its
    /// numbers, their credentials (which ends their site sessions) and the subscribed
    /// index (R-L3, R-M3).
    #[test]
    fn r_m3_a_removed_line_is_gone_from_every_store() {
        let mut mirrored = Mirrored::new();
        mirrored.apply(upsert(&["0312345678", "0312345679"])).unwrap();
        mirrored.apply(upsert(&["0612345678"])).unwrap();
        mirrored.apply(Op::SetCredential { number: n("0312345679"), record: password() }).unwrap();

        let reply = mirrored.apply(Op::RemoveLine { contract: n("0312345678") }).unwrap();
        assert_eq!(
            reply,
            Reply::Upserted(Upserted {
                moved: vec![],
                removed: vec![n("0312345678"), n("0312345679")],
                ..Upserted::default()
            })
        );
        for (name, store) in [("owner", &mirrored.owner), ("view", &mirrored.view)] {
            assert_eq!(store.line(&n("0312345678")).unwrap(), None, "{name}");
            assert_eq!(store.number(&n("0312345679")).unwrap(), None, "{name}");
            assert_eq!(store.credential(&n("0312345679")).unwrap(), None, "{name}");
            let subscribed: Vec<PhoneNumber> = store.subscribed_numbers().map(Result::unwrap).collect();
            assert_eq!(subscribed, [n("0612345678")], "{name}");
        }
    }

    /// R-L3: an owner's answer lists at most so many moved and so many removed numbers
    /// (the first, in order) and counts the rest, so that it fits in a record; read by a
    /// node of a version before the counts, it is the same answer with fewer numbers.
    #[test]
    fn r_l3_an_answer_lists_numbers_up_to_a_bound_and_counts_the_rest() {
        let numbers = |from: u64, count: u64| (from..from + count).map(|i| n(&format!("03{i:08}"))).collect::<Vec<_>>();
        let moved: Vec<_> = numbers(0, 3).into_iter().map(|x| (x, n("0612345678"))).collect();
        let mut upserted = Upserted { moved: moved.clone(), removed: numbers(10, 4), ..Upserted::default() };
        assert_eq!(upserted.list_at_most(5, 2), (3, 2));
        assert_eq!((upserted.moved, upserted.removed.len()), (moved, 2));
        assert_eq!((upserted.moved_not_listed, upserted.removed_not_listed), (0, 2));
        let mut upserted = Upserted { removed: numbers(10, 4), ..Upserted::default() };
        assert_eq!(upserted.list_at_most(10, 0), (0, 0));
        assert_eq!((upserted.removed.len(), upserted.removed_not_listed), (0, 4));
        let plain = serde_json::to_string(&Upserted { removed: numbers(10, 1), ..Upserted::default() }).unwrap();
        assert_eq!(plain, r#"{"moved":[],"removed":["0300000010"]}"#, "no counts written when none left out");
    }

    /// R-S3: the count is kept where the op runs; a check made against a credential set
    /// again meanwhile does not count and is asked again.
    #[test]
    fn r_s3_a_login_attempt_counts_once_and_only_against_the_credential_it_checked() {
        let store = Store::temporary().unwrap();
        let line = LineRecord { contract: n("0312345678"), numbers: vec![n("0312345678")], unit: None };
        store.upsert_line(&line, &[(n("0312345678"), Services { call: true, fax: false }, None)]).unwrap();
        let record = |hash: &str| CredentialRecord {
            hash: hash.into(),
            kind: CredentialKind::Password,
            set_at: Utc::now(),
            failures: 0,
            invalidated: false,
        };
        store.submit(Op::SetCredential { number: n("0312345678"), record: record("h1") }).unwrap();
        let attempt = |hash: &str, matched| {
            store.submit(Op::LoginAttempt { number: n("0312345678"), hash: hash.into(), matched, now: Utc::now() })
        };
        for i in 1..crate::store::PASSWORD_MAX_FAILURES {
            assert_eq!(
                attempt("h1", false).unwrap(),
                Reply::Attempt(Attempt::Wrong { kind: CredentialKind::Password, locked: false }),
                "{i}"
            );
        }
        assert_eq!(attempt("h0", false).unwrap(), Reply::Attempt(Attempt::Changed), "checked against another hash");
        assert_eq!(
            attempt("h1", false).unwrap(),
            Reply::Attempt(Attempt::Wrong { kind: CredentialKind::Password, locked: true })
        );
        assert_eq!(attempt("h1", true).unwrap(), Reply::Attempt(Attempt::Locked));
    }
}
