//! What the store holds for a line and a number: the records of R-L1, the settings of
//! R-N1..R-N5, the site's credentials (R-S2, R-S3, R-S6), and their limits. The settings
//! site (the admin crate) sets and checks credentials; the store keeps them, drops them
//! with their number (R-M3), and provisioning exports and restores them. A number's fax
//! settings and the received faxes kept for the site (R-F1, [`super::faxes`]).
//!
//! Records are read leniently: a field this version does not know (a newer version's,
//! in a cluster being upgraded one node at a time) is passed over. What an operator or
//! another node sends is read strictly instead ([`crate::strict_json`]).

use std::fmt;

use chrono::{DateTime, Utc};

use crate::address::DestinationAddress;
use crate::fax::document::DocumentKind;
use crate::phone::PhoneNumber;

use super::StoreError;

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

impl LineRecord {
    /// Whether the line needs no record of its own: its contract number alone, no
    /// unit set ([`crate::store::Store::line`]).
    pub fn implicit(&self) -> bool {
        self.numbers == [self.contract] && self.unit.is_none()
    }
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
    /// Left out of a record while it is the default: numbers without fax settings are
    /// stored as before.
    #[serde(default, skip_serializing_if = "FaxSettings::is_default")]
    pub fax: FaxSettings,
    /// When the number moved to this line from another (unix seconds): its calls and
    /// faxes from before then were the previous subscriber's (R-M3), however late their
    /// records are read. Left out for a number provisioned here first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_in_at: Option<i64>,
}

impl NumberRecord {
    /// Whether something that happened at `at` (a call's start, a fax's reception) was
    /// for this number's previous subscriber, on the line it moved from.
    pub fn before_moving_in(&self, at: chrono::DateTime<chrono::Utc>) -> bool {
        before_moving_in(self.moved_in_at, at)
    }
}

/// Whether `at` came before `moved_in_at` ([`NumberRecord::moved_in_at`]).
pub fn before_moving_in(moved_in_at: Option<i64>, at: chrono::DateTime<chrono::Utc>) -> bool {
    moved_in_at.is_some_and(|moved| at.timestamp() < moved)
}

/// FAXお知らせメール settings of one number (R-F1): start/stop and destinations as for
/// calls (R-N1..R-N3); a fax has no caller conditions.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FaxSettings {
    /// 開始 (true) / 停止 (false). Off until the subscriber starts it.
    #[serde(default)]
    pub enabled: bool,
    /// 送信先メールアドレス, at most [`MAX_DESTINATIONS`] (R-N2).
    #[serde(default)]
    pub destinations: Vec<Destination>,
    /// Beyond the seed: each mail carries the fax as a PDF, for subscribers who read
    /// mail where the site is out of reach.
    #[serde(default)]
    pub attach_pdf: bool,
    /// Bumped by every save, so a save from a stale form can be refused (R-S9).
    #[serde(default)]
    pub version: u64,
}

impl FaxSettings {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the limit of R-N2.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_destinations(&self.destinations)
    }
}

/// 着信お知らせメール settings of one number (R-N1..R-N5).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
pub struct Destination {
    pub address: DestinationAddress,
    /// Only checked addresses receive notifications.
    pub send: bool,
}

/// お知らせ対象電話番号: a number and its 指定 check (R-N5).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
        check_destinations(&self.destinations)?;
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

/// The limit of R-N2, for call and fax settings alike.
fn check_destinations(destinations: &[Destination]) -> Result<(), StoreError> {
    if destinations.len() > MAX_DESTINATIONS {
        return Err(StoreError::TooMany {
            what: "destination addresses",
            max: MAX_DESTINATIONS,
            given: destinations.len(),
        });
    }
    Ok(())
}

/// A temporary password is valid for 24 hours from being set (R-I8, R-S2).
pub const TEMPORARY_VALIDITY: chrono::Duration = chrono::Duration::hours(24);
/// A password must be changed this long after it was set (R-S6).
pub const PASSWORD_LIFETIME: chrono::Duration = chrono::Duration::days(60);

/// Consecutive wrong entries that invalidate a temporary password (R-S2).
pub const TEMPORARY_MAX_FAILURES: u32 = 3;
/// Consecutive wrong entries that invalidate a password (R-S3).
pub const PASSWORD_MAX_FAILURES: u32 = 10;

/// Which kind of secret a credential is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// 仮パスワード: 8 digits set by phone; must be changed at first login (R-S4).
    Temporary,
    /// パスワード: chosen by the subscriber on the site (R-S5).
    Password,
}

impl CredentialKind {
    /// Consecutive wrong entries that invalidate it (R-S2, R-S3).
    pub fn max_failures(self) -> u32 {
        match self {
            Self::Temporary => TEMPORARY_MAX_FAILURES,
            Self::Password => PASSWORD_MAX_FAILURES,
        }
    }
}

/// The stored state of one login number's credential.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CredentialRecord {
    /// argon2id PHC string (algorithm, parameters, salt, hash); never the password.
    pub hash: String,
    pub kind: CredentialKind,
    /// When it was set: the start of the 24 h (R-I8) and 60-day (R-S6) periods.
    pub set_at: DateTime<Utc>,
    /// Consecutive wrong entries since it was set or last entered right (R-S2, R-S3).
    pub failures: u32,
    /// Set by the last allowed wrong entry; only a new temporary password clears it.
    pub invalidated: bool,
}

impl CredentialRecord {
    /// Tells this credential from any other the number had or will have: every set
    /// hashes with a fresh salt. A site session keeps the stamp it logged in with and
    /// ends when the number's credential no longer has it (a new temporary password by
    /// phone, a unit change, the number removed or moved to another line).
    pub fn stamp(&self) -> u64 {
        stamp_of(&self.hash)
    }
}

/// The [`CredentialRecord::stamp`] of a credential whose hash is `hash`.
pub fn stamp_of(hash: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hash.hash(&mut hasher);
    hasher.finish()
}

impl fmt::Debug for CredentialRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A hash in a log is an offline guessing target; leave it out.
        f.debug_struct("CredentialRecord")
            .field("hash", &"<argon2id>")
            .field("kind", &self.kind)
            .field("set_at", &self.set_at)
            .field("failures", &self.failures)
            .field("invalidated", &self.invalidated)
            .finish()
    }
}

/// However active, a site session ends this long after login, so a stolen cookie that
/// is kept busy does not live for ever.
pub const SESSION_ABSOLUTE_TIMEOUT: chrono::Duration = chrono::Duration::hours(12);

/// One logged-in browser of the settings site. Kept in the shared state (under a hash
/// of its id, never the id the browser holds), so any node serves it and a logout or
/// an idle timeout ends it on all of them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionRecord {
    /// The login number: whose settings this session may read and change.
    pub number: PhoneNumber,
    /// What the subscriber logged in with (temporary password or password).
    pub kind: CredentialKind,
    /// Every page but the password change and logout redirects there until it is done
    /// (R-S4).
    pub must_change: bool,
    /// Start of the [`SESSION_ABSOLUTE_TIMEOUT`].
    pub created_at: DateTime<Utc>,
    /// Start of the idle timeout; moved by every request.
    pub last_seen: DateTime<Utc>,
    /// How long this session may be idle (R-S7), fixed at login from the line's unit.
    pub idle_timeout_secs: i64,
    /// The token every form of this session carries (CSRF).
    pub csrf: String,
    /// The login credential's [`CredentialRecord::stamp`]: the session lasts only as
    /// long as that credential does.
    pub credential: u64,
    /// A page rendered by a POST for the GET it redirects to (Post/Redirect/Get):
    /// (path, HTML), shown once, so a reload repeats nothing.
    pub flash: Option<(String, String)>,
}

impl SessionRecord {
    /// How long this session may be idle (R-S7).
    pub fn idle_timeout(&self) -> chrono::Duration {
        chrono::Duration::seconds(self.idle_timeout_secs)
    }

    /// Whether it has ended by `now`: idle too long, or past the absolute timeout.
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        now - self.last_seen >= self.idle_timeout() || now - self.created_at >= SESSION_ABSOLUTE_TIMEOUT
    }
}

/// The tree of received faxes ([`super::faxes`]), and of their documents.
pub const FAXES_TREE: &str = "faxes";
pub const FAX_DOCUMENTS_TREE: &str = "fax_documents";

/// What the site lists of a received fax.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FaxRecord {
    /// The fax number it was sent to.
    pub number: PhoneNumber,
    pub fax_id: String,
    /// 送信元 as the subscriber sees it: the number, or 非通知 and the like (R-N7).
    pub sender: String,
    pub received_at: DateTime<Utc>,
    pub pages: u32,
    pub kind: DocumentKind,
    /// The document's size in bytes.
    pub size: u64,
    /// Opened on the site (the list's unread mark).
    #[serde(default)]
    pub read: bool,
    /// Deleted by the subscriber: listed nowhere, its document gone; the record stays
    /// until it expires so the fax is not kept again.
    #[serde(default)]
    pub deleted: bool,
}

impl FaxRecord {
    /// Its key in both trees, and its address on the site after `/fax/`.
    pub fn key(&self) -> String {
        fax_key(&self.number, self.received_at, &self.fax_id)
    }
}

/// `number/received ms/fax id`: see the module docs.
pub fn fax_key(number: &PhoneNumber, received_at: DateTime<Utc>, fax_id: &str) -> String {
    format!("{number}/{:013}/{fax_id}", received_at.timestamp_millis().max(0))
}

/// A fax's document on its way to the state owner: base64 in the op's JSON.
#[derive(Clone)]
pub struct DocumentBytes(pub Vec<u8>);

impl serde::Serialize for DocumentBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> serde::Deserialize<'de> for DocumentBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text.as_bytes()).map(Self).map_err(serde::de::Error::custom)
    }
}

/// What of a stored number record says whose it is: its line's contract number, read
/// without the rest of the record.
#[derive(serde::Deserialize)]
pub(super) struct OfLine {
    pub(super) contract: PhoneNumber,
}
