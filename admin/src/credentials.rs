//! 認証情報 (credentials): the password state of each login number, kept in the
//! engine's store as shared subscriber state (docs/cluster.md).
//!
//! A login number has at most one credential: a 仮パスワード (temporary password, set by
//! phone, R-I7) or a パスワード (password, set on the site). The rules:
//!
//! - a temporary password is valid for [`TEMPORARY_VALIDITY`] after it was set (R-I8,
//!   R-S2) and invalidated by [`TEMPORARY_MAX_FAILURES`] consecutive wrong entries (R-S2);
//! - a password is invalidated by [`PASSWORD_MAX_FAILURES`] consecutive wrong entries
//!   (R-S3) and expires [`PASSWORD_LIFETIME`] after it was set (R-S6): it still logs in,
//!   but the subscriber must change it first (R-S4), as after a temporary password.
//!
//! An invalidated or expired temporary password is only replaced by a new temporary
//! password set by phone ([`Credentials::set_temporary`]).
//!
//! Passwords are stored as argon2id PHC strings with OWASP's parameters. Hashing is
//! deliberately slow, so the functions here block: async code calls the `*_async`
//! wrappers, which run them on tokio's blocking pool. No function logs a password.

use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use chrono::{DateTime, Utc};
use engine::phone::PhoneNumber;
use engine::store::state::Attempt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use engine::store::{
    CredentialKind, CredentialRecord, PASSWORD_LIFETIME, PASSWORD_MAX_FAILURES, TEMPORARY_MAX_FAILURES,
    TEMPORARY_VALIDITY,
};
use engine::store::{Store, StoreError};
use engine::telemetry::{Lockout, Metrics};

/// argon2id memory cost in KiB: OWASP's minimum, 19 MiB.
pub const ARGON2_M_COST_KIB: u32 = 19_456;
/// argon2id iterations: OWASP's minimum for 19 MiB.
pub const ARGON2_T_COST: u32 = 2;
/// argon2id lanes: one, so a login occupies one blocking thread.
pub const ARGON2_P_COST: u32 = 1;
/// Argon2 computations (a check or a hash) of the async calls carried out at once in the
/// process, at most (each holds 19 MiB); the others wait their turn, on no thread. A
/// check whose request went away (its client hung up) still runs to its end: without a
/// cap, clients hanging up at once could pile hundreds of them up on tokio's blocking
/// pool (shared with the engine's store work), gigabytes in all. A permit is held for
/// the computation only, not for the state owner's answer that follows it.
pub const HASHING_AT_ONCE: usize = 8;

/// [`HASHING_AT_ONCE`] permits, shared by every [`Credentials`] of the process (the
/// site's, the IVR's).
static HASHING: std::sync::LazyLock<Arc<Semaphore>> =
    std::sync::LazyLock::new(|| Arc::new(Semaphore::new(HASHING_AT_ONCE)));

thread_local! {
    /// The permit of the call running on this blocking thread ([`Credentials::spawn_hashing`]),
    /// until its computation is over ([`hashing`]).
    static PERMIT: std::cell::RefCell<Option<OwnedSemaphorePermit>> = const { std::cell::RefCell::new(None) };
}

/// Runs `argon2`, then gives back the permit its call waited for (if it came through
/// [`Credentials::spawn_hashing`]).
fn hashing<T>(argon2: impl FnOnce() -> T) -> T {
    let done = argon2();
    PERMIT.with_borrow_mut(|permit| permit.take());
    done
}

/// A successful login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginOk {
    pub kind: CredentialKind,
    /// The subscriber must change the password before anything else (R-S4): after a
    /// temporary password, or a password older than [`PASSWORD_LIFETIME`] (R-S6).
    pub must_change: bool,
}

/// Why a login failed. Callers answer every variant the same way, so a stranger learns
/// nothing about a number; the distinction is for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginFailure {
    #[error("no credential is set for this number")]
    Unknown,
    #[error("wrong password")]
    Wrong,
    /// A wrong password that made the count of R-S2 or R-S3: the credential is invalid
    /// from now on.
    #[error("wrong password, which invalidated the credential")]
    Invalidated,
    #[error("the credential was invalidated by consecutive wrong passwords")]
    Locked,
    #[error("the temporary password is older than 24 hours")]
    Expired,
}

/// The answer to a login attempt: the outer `Result` of [`Credentials::verify`] is
/// reserved for the system failing, this one for the subscriber's password.
pub type Verdict = Result<LoginOk, LoginFailure>;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("credential store: {0}")]
    Store(#[from] StoreError),
    #[error("password hashing failed: {0}")]
    Hash(argon2::password_hash::Error),
    #[error("password hashing task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(
        "the state owner answered {CHANGED_AT_MOST} times that {0}'s credential is not the one this node shows: \
         this node's view does not follow the state topic"
    )]
    KeptChanging(PhoneNumber),
}

/// How many times a login asks the state owner again after its answer that the
/// credential changed: each answer comes once this node's view shows the owner's
/// credential, so more than a few means the view does not follow (a request each
/// time, without end, before).
const CHANGED_AT_MOST: usize = 5;

/// Handle to the credentials of the store; cheap to clone. Reads are the node's view;
/// every write (a set, a removal, a counted attempt) is an op of the store's state
/// ([`engine::store::state`]), carried out where the counts are kept.
#[derive(Clone)]
pub struct Credentials {
    store: Store,
    /// Where lockouts are counted (`callnotify_site_lockouts_total`).
    metrics: Metrics,
    /// The permits of [`HASHING_AT_ONCE`] (a test's own, to hold them).
    pub(crate) hashing: Arc<Semaphore>,
}

impl Credentials {
    /// The credentials of `store`; lockouts are counted in metrics of their own until
    /// [`Credentials::counting_in`].
    pub fn open(store: &Store) -> Result<Self, CredentialError> {
        Ok(Self { store: store.clone(), metrics: Metrics::new(), hashing: Arc::clone(&HASHING) })
    }

    /// Counts lockouts (R-S2, R-S3) in the engine's `metrics`.
    pub fn counting_in(self, metrics: Metrics) -> Self {
        Self { metrics, ..self }
    }

    /// The stored state of `number`'s credential (support tools, tests).
    pub fn record(&self, number: &PhoneNumber) -> Result<Option<CredentialRecord>, CredentialError> {
        Ok(self.store.credential(number)?)
    }

    /// Stores a temporary password for `number`, replacing any earlier credential state,
    /// invalidated or not (R-I7). Blocks for one argon2 hash.
    pub fn set_temporary(
        &self,
        number: &PhoneNumber,
        password: &str,
        now: DateTime<Utc>,
    ) -> Result<(), CredentialError> {
        self.set(number, None, CredentialKind::Temporary, password, now).map(drop)
    }

    /// [`Credentials::set_temporary`] while `number` is on the line of `contract` (the
    /// caller's, R-I3): else `false`, nothing set. A number moved to another line, or whose
    /// line was removed, during the call is someone else's now (R-M3).
    pub fn set_temporary_on_line(
        &self,
        number: &PhoneNumber,
        contract: &PhoneNumber,
        password: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, CredentialError> {
        on_line(self.set(number, Some(contract), CredentialKind::Temporary, password, now)).map(|set| set.is_some())
    }

    /// Stores a password chosen on the site for `number` (R-S4, R-O1), resetting the
    /// failure count and the 60-day period. The caller checks R-S5 first. Blocks for one
    /// argon2 hash.
    pub fn set_password(
        &self,
        number: &PhoneNumber,
        password: &str,
        now: DateTime<Utc>,
    ) -> Result<(), CredentialError> {
        self.set(number, None, CredentialKind::Password, password, now).map(drop)
    }

    fn set(
        &self,
        number: &PhoneNumber,
        line: Option<&PhoneNumber>,
        kind: CredentialKind,
        password: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, CredentialError> {
        let record =
            CredentialRecord { hash: hash_password(password)?, kind, set_at: now, failures: 0, invalidated: false };
        self.store.set_credential_on_line(number, line, &record)?;
        tracing::info!(%number, ?kind, "credential set");
        Ok(record.stamp())
    }

    /// Deletes `number`'s credential, whatever its state; returns whether there was one.
    /// Afterwards the number logs in only after a new temporary password is set by phone
    /// (R-O3, and the additional numbers after R-O2).
    pub fn remove(&self, number: &PhoneNumber) -> Result<bool, CredentialError> {
        let removed = self.store.remove_credential(number)?;
        if removed {
            tracing::info!(%number, "credential removed");
        }
        Ok(removed)
    }

    /// Checks `password` for `number` at time `now` and records the attempt (R-S2, R-S3,
    /// R-S6, R-I8). Blocks for one argon2 verification, also when the number has no
    /// usable credential, so the time taken does not tell which failure it was; for a
    /// second one when the credential was set again during the check (the new hash is
    /// checked too).
    pub fn verify(&self, number: &PhoneNumber, password: &str, now: DateTime<Utc>) -> Result<Verdict, CredentialError> {
        self.verify_stamped(number, password, now).map(|(verdict, _)| verdict)
    }

    /// [`Credentials::verify`], with the [`CredentialRecord::stamp`] of the credential
    /// the verdict is about: the one checked, which a session keeps (a credential set
    /// again after the check, by phone, is not the one the password proved).
    pub fn verify_stamped(
        &self,
        number: &PhoneNumber,
        password: &str,
        now: DateTime<Utc>,
    ) -> Result<(Verdict, u64), CredentialError> {
        // The argon2 answer and the hash it was computed against, so that a retry after
        // the credential was set again meanwhile hashes only against the new one.
        let mut checked: Option<(String, bool)> = None;
        for _ in 0..=CHANGED_AT_MOST {
            // The owner's store decides, whatever this view shows: a credential it
            // lacks, or shows locked or expired, may have been set a moment ago through
            // another node (R-I7 by phone on one, the login on the next), and the
            // owner's `Changed` comes once this view shows the credential it has. The
            // check is against the hash shown here; the owner counts it only if that is
            // still the number's (a view without one sends none, which never counts).
            let (hash, matches) = match self.record(number)? {
                None => (String::new(), false),
                Some(record) => match &checked {
                    Some((hash, matches)) if *hash == record.hash => (record.hash, *matches),
                    _ => {
                        let matches = password_matches(&record.hash, password)?;
                        checked = Some((record.hash.clone(), matches));
                        (record.hash, matches)
                    }
                },
            };
            // At least one argon2 verification whichever way it ends, so the time taken
            // does not tell which failure it was.
            let hashed = checked.is_some();
            let stamp = engine::store::stamp_of(&hash);
            let fail = |failure| {
                let verdict = if hashed { Ok(Err(failure)) } else { refuse(password, failure) };
                verdict.map(|verdict| (verdict, stamp))
            };
            // The attempt counts where the counts are kept, against the credential it
            // was checked with, one attempt after another (R-S2, R-S3): this node's
            // view may lag another node's attempts, the count never does.
            return match self.store.login_attempt(number, &hash, matches, now)? {
                Attempt::Changed => continue,
                Attempt::Unknown => fail(LoginFailure::Unknown),
                Attempt::Locked => fail(LoginFailure::Locked),
                Attempt::Expired => fail(LoginFailure::Expired),
                Attempt::Accepted { kind, must_change } => Ok((Ok(LoginOk { kind, must_change }), stamp)),
                Attempt::Wrong { kind, locked } => {
                    if locked {
                        tracing::warn!(%number, ?kind, "credential invalidated by consecutive wrong passwords");
                        self.metrics.lockout(match kind {
                            CredentialKind::Temporary => Lockout::TemporaryPassword,
                            CredentialKind::Password => Lockout::Password,
                        });
                    }
                    fail(if locked { LoginFailure::Invalidated } else { LoginFailure::Wrong })
                }
            };
        }
        Err(CredentialError::KeptChanging(*number))
    }

    /// [`Credentials::verify_stamped`] on tokio's blocking pool.
    pub async fn verify_stamped_async(
        &self,
        number: PhoneNumber,
        password: String,
        now: DateTime<Utc>,
    ) -> Result<(Verdict, u64), CredentialError> {
        self.blocking(move |c| c.verify_stamped(&number, &password, now)).await
    }

    /// [`Credentials::verify`] on tokio's blocking pool.
    pub async fn verify_async(
        &self,
        number: PhoneNumber,
        password: String,
        now: DateTime<Utc>,
    ) -> Result<Verdict, CredentialError> {
        self.blocking(move |c| c.verify(&number, &password, now)).await
    }

    /// [`Credentials::set_temporary`] on tokio's blocking pool.
    pub async fn set_temporary_async(
        &self,
        number: PhoneNumber,
        password: String,
        now: DateTime<Utc>,
    ) -> Result<(), CredentialError> {
        self.blocking(move |c| c.set_temporary(&number, &password, now)).await
    }

    /// [`Credentials::set_password`] on tokio's blocking pool, while `number` is on the
    /// line of `contract` (the line it was on when its subscriber was asked): the new
    /// credential's [`CredentialRecord::stamp`], or `None`, nothing set (R-M3).
    pub async fn set_password_on_line_async(
        &self,
        number: PhoneNumber,
        contract: PhoneNumber,
        password: String,
        now: DateTime<Utc>,
    ) -> Result<Option<u64>, CredentialError> {
        self.blocking(move |c| on_line(c.set(&number, Some(&contract), CredentialKind::Password, &password, now))).await
    }

    /// [`Credentials::set_password`] on tokio's blocking pool.
    pub async fn set_password_async(
        &self,
        number: PhoneNumber,
        password: String,
        now: DateTime<Utc>,
    ) -> Result<(), CredentialError> {
        self.blocking(move |c| c.set_password(&number, &password, now)).await
    }

    /// Runs `f` (argon2 hashing, sled I/O) off the async workers, once a permit of
    /// [`HASHING_AT_ONCE`] is free.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Self) -> Result<T, CredentialError> + Send + 'static,
    ) -> Result<T, CredentialError> {
        let this = self.clone();
        self.spawn_hashing(move || f(&this)).await?
    }

    /// Runs `f`, which may hash or check a password with these credentials (an IVR
    /// call's entry), on tokio's blocking pool once a permit of [`HASHING_AT_ONCE`] is
    /// free. The permit is given back when the computation is over, or when `f` returns.
    pub(crate) async fn spawn_hashing<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        /// Gives back the permit of this thread's call when dropped: not given back by a
        /// computation (the call failed before it, or panicked), it is given back then,
        /// not kept by a pooled thread until its next call.
        struct GiveBack;
        impl Drop for GiveBack {
            fn drop(&mut self) {
                PERMIT.with_borrow_mut(|held| held.take());
            }
        }
        let permit = Arc::clone(&self.hashing).acquire_owned().await.expect("the semaphore is never closed");
        tokio::task::spawn_blocking(move || {
            PERMIT.with_borrow_mut(|held| *held = Some(permit));
            let _give_back = GiveBack;
            f()
        })
        .await
    }
}

/// The stamp of a set on a line, if carried out: `None`, refused, the number is not on
/// it any more.
fn on_line(set: Result<u64, CredentialError>) -> Result<Option<u64>, CredentialError> {
    match set {
        Ok(stamp) => Ok(Some(stamp)),
        Err(CredentialError::Store(StoreError::UnknownNumber(number))) => {
            tracing::info!(%number, "credential not set: the number left its line meanwhile");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn hasher() -> Argon2<'static> {
    let params = Params::new(ARGON2_M_COST_KIB, ARGON2_T_COST, ARGON2_P_COST, None).expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

fn hash_password(password: &str) -> Result<String, CredentialError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(CredentialError::Hash)?;
    let hash = hashing(|| hasher().hash_password(password.as_bytes(), &salt).map(|hash| hash.to_string()));
    hash.map_err(CredentialError::Hash)
}

/// Whether `password` matches the PHC string `phc`, with the parameters stored in it.
fn password_matches(phc: &str, password: &str) -> Result<bool, CredentialError> {
    let parsed = PasswordHash::new(phc).map_err(CredentialError::Hash)?;
    match hashing(|| hasher().verify_password(password.as_bytes(), &parsed)) {
        Ok(()) => Ok(true),
        Err(argon2::password_hash::Error::Password) => Ok(false),
        Err(e) => Err(CredentialError::Hash(e)),
    }
}

/// Fails the attempt after one verification against a throwaway hash, so a refusal
/// takes as long as a wrong password.
fn refuse(password: &str, failure: LoginFailure) -> Result<Verdict, CredentialError> {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let dummy = match DUMMY.get() {
        Some(hash) => hash,
        None => {
            let hash = hash_password(&format!("{:032x}", rand::random::<u128>()))?;
            DUMMY.get_or_init(|| hash)
        }
    };
    password_matches(dummy, password)?;
    Ok(Err(failure))
}

#[cfg(test)]
mod tests;
