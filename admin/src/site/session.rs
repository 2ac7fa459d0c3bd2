//! Server-side sessions. The browser holds only a random 128-bit id; what it stands for
//! (who is logged in, whether they must change the password first) stays on the
//! server, so logout and timeouts take effect at once (R-S7) and nothing in the cookie
//! can be forged or replayed after the session ends.
//!
//! Shared by every engine node through the store's state (docs/cluster.md): a
//! subscriber's requests may land on any node, and a logout or an idle timeout ends the
//! session on all of them. What is shared is keyed by a hash of the id, so the id a
//! browser presents is stored nowhere; every change of a session (a request's touch, a
//! flash page, a logout) is carried out where the state is kept, one after another.

use blake2::{Blake2s256, Digest};
use chrono::{DateTime, Duration, Utc};
use engine::phone::PhoneNumber;
use engine::store::state::{Op, Reply};
pub use engine::store::SessionRecord as Session;
use engine::store::{AuthUnit, Store, StoreError};

use super::csrf;
use crate::credentials::CredentialKind;

/// Idle timeout for a credential covering a whole line: unit `line` and the `admin_user`
/// administrator (R-S7). Shorter because it reaches every number of the line.
pub const IDLE_TIMEOUT_LINE: Duration = Duration::minutes(10);
/// Idle timeout for a credential covering one number: unit `number` and the
/// `admin_user` users (R-S7).
pub const IDLE_TIMEOUT_NUMBER: Duration = Duration::minutes(30);
/// However active, a session ends this long after login, so a stolen cookie that is
/// kept busy does not live for ever.
pub const ABSOLUTE_TIMEOUT: Duration = engine::store::SESSION_ABSOLUTE_TIMEOUT;

/// A session for `number` logged in at `now`, with a fresh CSRF token.
pub fn new_session(
    number: PhoneNumber,
    kind: CredentialKind,
    must_change: bool,
    idle_timeout: Duration,
    now: DateTime<Utc>,
    credential: u64,
) -> Session {
    Session {
        number,
        kind,
        must_change,
        created_at: now,
        last_seen: now,
        idle_timeout_secs: idle_timeout.num_seconds(),
        csrf: csrf::new_token(),
        credential,
        flash: None,
    }
}

/// The idle timeout for a login with `number` (R-S7): looked up through the number's
/// line and the unit chosen by phone. A line without a unit gets the shorter timeout,
/// the safe side.
pub fn idle_timeout_for(store: &Store, number: &PhoneNumber) -> Result<Duration, StoreError> {
    let Some(record) = store.number(number)? else { return Ok(IDLE_TIMEOUT_LINE) };
    let unit = store.line(&record.contract)?.and_then(|line| line.unit);
    Ok(match unit {
        Some(AuthUnit::Number) => IDLE_TIMEOUT_NUMBER,
        Some(AuthUnit::Line | AuthUnit::AdminUser) if *number != record.contract => IDLE_TIMEOUT_NUMBER,
        Some(AuthUnit::Line | AuthUnit::AdminUser) | None => IDLE_TIMEOUT_LINE,
    })
}

/// Lookups per second at the state owner of session ids this node's view does not hold.
/// Such an id is nearly always made up (a session made on another node a moment ago
/// reaches this one within a second): one per request, anyone could send the owner, and
/// every node's logins and saves behind it, a request each and hold a blocking thread
/// each, without logging in.
pub(crate) const UNKNOWN_LOOKUPS_PER_SECOND: u32 = 20;

/// How long a request whose session id is past [`UNKNOWN_LOOKUPS_PER_SECOND`] waits for
/// this node's view to show it: longer than a write takes to reach every node (p99 well
/// under a second, BENCHMARKS.md).
pub(crate) const VIEW_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The live sessions by id; cheap to clone. Every call is one op of the store's state,
/// run on tokio's blocking pool.
#[derive(Clone)]
pub struct Sessions {
    store: Store,
    /// [`UNKNOWN_LOOKUPS_PER_SECOND`], for this node.
    unknown: std::sync::Arc<governor::DefaultDirectRateLimiter>,
}

/// Where session `id` is kept: its hash, not the id itself.
fn key(id: &str) -> String {
    Blake2s256::digest(id.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    pub fn new(store: Store) -> Self {
        let rate = std::num::NonZeroU32::new(UNKNOWN_LOOKUPS_PER_SECOND).expect("not zero");
        Self::with_unknown_lookups(store, governor::Quota::per_second(rate))
    }

    /// With `quota` for the lookups of ids this node's view does not hold (tests).
    pub(crate) fn with_unknown_lookups(store: Store, quota: governor::Quota) -> Self {
        Self { store, unknown: std::sync::Arc::new(governor::RateLimiter::direct(quota)) }
    }

    async fn submit(&self, op: Op) -> Result<Reply, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.submit(op)).await?
    }

    /// Stores `session` under a new random id and returns the id. Ids are never reused,
    /// so a login always yields an id the browser has not seen before (session
    /// fixation).
    pub async fn create(&self, session: Session) -> Result<String, StoreError> {
        let id = format!("{:032x}", rand::random::<u128>());
        self.submit(Op::PutSession { key: key(&id), session }).await?;
        Ok(id)
    }

    /// The session `id` at `now`, its idle timeout restarted; `None` if there is none or
    /// it has expired (and then it is forgotten).
    ///
    /// An id this node's view does not hold goes to the state owner only within
    /// [`UNKNOWN_LOOKUPS_PER_SECOND`]; past it (made-up ids flooding in), it is taken for
    /// none unless this node's view shows it within [`VIEW_WAIT`] (a session made on
    /// another node a moment ago, or a view behind).
    pub async fn touch(&self, id: &str, now: DateTime<Utc>) -> Result<Option<Session>, StoreError> {
        let key = key(id);
        // A session this node's view holds, the common case, is looked at and touched
        // in one trip to the blocking pool.
        let (store, looked_at, touch) = (self.store.clone(), key.clone(), Op::TouchSession { key: key.clone(), now });
        let here = tokio::task::spawn_blocking(move || held(&store, &looked_at).then(|| store.submit(touch))).await?;
        let reply = match here {
            Some(reply) => reply?,
            None if self.unknown.check().is_err() && !self.shown_within(&key, VIEW_WAIT).await? => return Ok(None),
            None => self.submit(Op::TouchSession { key, now }).await?,
        };
        match reply {
            Reply::Session(session) => Ok(session),
            other => Err(StoreError::State(format!("a session touch was answered {other:?}"))),
        }
    }

    /// Whether this node's view holds the session under `key`, on a blocking thread.
    async fn held_here(&self, key: &str) -> Result<bool, StoreError> {
        let (store, key) = (self.store.clone(), key.to_owned());
        Ok(tokio::task::spawn_blocking(move || held(&store, &key)).await?)
    }

    /// Whether this node's view comes to hold the session under `key` within `wait`.
    async fn shown_within(&self, key: &str, wait: std::time::Duration) -> Result<bool, StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if self.held_here(key).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Keeps `html` for session `id`'s next GET of `path` ([`Session::flash`]).
    pub async fn set_flash(&self, id: &str, path: String, html: String) -> Result<(), StoreError> {
        self.submit(Op::SetFlash { key: key(id), path, html }).await.map(drop)
    }

    /// The page kept for session `id`'s GET of `path`, once.
    pub async fn take_flash(&self, id: &str, path: &str) -> Result<Option<String>, StoreError> {
        match self.submit(Op::TakeFlash { key: key(id), path: path.to_owned() }).await? {
            Reply::Flash(html) => Ok(html),
            other => Err(StoreError::State(format!("a flash was answered {other:?}"))),
        }
    }

    /// Ends session `id` (logout, or a fresh login from the same browser).
    pub async fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.submit(Op::RemoveSession { key: key(id) }).await.map(drop)
    }

    /// Ends every session of `number` except `keep` (empty: none kept): after a password
    /// change, a browser logged in with the old password must not stay in.
    pub async fn remove_number(&self, number: &PhoneNumber, keep: &str) -> Result<(), StoreError> {
        let keep = (!keep.is_empty()).then(|| key(keep));
        self.submit(Op::RemoveSessions { number: *number, keep }).await.map(drop)
    }

    /// Ends every session of the line of `numbers` (its unit changed).
    pub async fn remove_line(&self, numbers: &[PhoneNumber]) -> Result<(), StoreError> {
        let (store, numbers) = (self.store.clone(), numbers.to_vec());
        tokio::task::spawn_blocking(move || store.end_line_sessions(&numbers)).await?
    }

    /// Forgets expired sessions, so abandoned ones do not accumulate.
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.submit(Op::SweepSessions { now }).await.map(drop)
    }

    /// Live sessions as this node's store shows them (metrics, tests).
    pub fn len(&self) -> usize {
        self.store.session_count()
    }

    /// Whether there are no live sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether `store`'s view holds the session under `key` (one it cannot read is the
/// owner's to judge: held). Blocks.
fn held(store: &Store, key: &str) -> bool {
    store.session(key).map_or(true, |s| s.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixture, n, t0, ADDITIONAL, CONTRACT};

    #[test]
    fn r_s7_idle_timeout_follows_the_unit_and_the_role() {
        let f = fixture();
        let cases = [
            (AuthUnit::Line, CONTRACT, IDLE_TIMEOUT_LINE),
            (AuthUnit::Number, CONTRACT, IDLE_TIMEOUT_NUMBER),
            (AuthUnit::Number, ADDITIONAL, IDLE_TIMEOUT_NUMBER),
            (AuthUnit::AdminUser, CONTRACT, IDLE_TIMEOUT_LINE),
            (AuthUnit::AdminUser, ADDITIONAL, IDLE_TIMEOUT_NUMBER),
        ];
        for (unit, number, expected) in cases {
            f.store.set_line_unit(&n(CONTRACT), unit).unwrap();
            assert_eq!(idle_timeout_for(&f.store, &n(number)).unwrap(), expected, "{unit:?} {number}");
        }
    }

    #[tokio::test]
    async fn sessions_expire_when_idle_and_after_the_absolute_timeout() {
        let sessions = Sessions::new(Store::temporary().unwrap());
        let session = new_session(n(CONTRACT), CredentialKind::Password, false, IDLE_TIMEOUT_NUMBER, t0(), 7);
        let id = sessions.create(session).await.unwrap();
        let mut now = t0();
        // Active every 29 minutes: alive until the absolute timeout.
        while now + Duration::minutes(29) < t0() + ABSOLUTE_TIMEOUT {
            now += Duration::minutes(29);
            assert!(sessions.touch(&id, now).await.unwrap().is_some(), "{now}");
        }
        assert!(sessions.touch(&id, t0() + ABSOLUTE_TIMEOUT).await.unwrap().is_none());
        assert!(sessions.is_empty(), "an expired session is forgotten");
    }

    /// Carries ops out on its store, as the state owner would, counting session touches.
    struct CountingOwner {
        store: Store,
        touches: std::sync::atomic::AtomicUsize,
    }

    impl engine::store::state::StateWriter for CountingOwner {
        fn send(self: std::sync::Arc<Self>, ops: Vec<Op>) -> engine::store::state::Answers {
            let touches = ops.iter().filter(|op| matches!(op, Op::TouchSession { .. })).count();
            self.touches.fetch_add(touches, std::sync::atomic::Ordering::Relaxed);
            let answers: Vec<_> = ops.iter().map(|op| self.store.execute(op).map(|(reply, _)| reply)).collect();
            Box::new(move || answers)
        }
    }

    /// Requests with made-up session cookies (no login needed) each went to the state
    /// owner, a request and a blocking thread each: enough of them held up every node's
    /// logins and saves. Ids this node's view does not hold now go there at
    /// UNKNOWN_LOOKUPS_PER_SECOND at most (the others wait a moment for this node's view,
    /// then are taken for none); a live session is looked up every time.
    #[tokio::test]
    async fn made_up_session_ids_reach_the_state_owner_at_a_bounded_rate() {
        let store = Store::temporary().unwrap();
        let owner = std::sync::Arc::new(CountingOwner { store: store.clone(), touches: Default::default() });
        store.attach_writer(owner.clone());
        // Five in all, for a test that does not depend on how fast it runs.
        let five = governor::Quota::per_hour(std::num::NonZeroU32::new(5).unwrap());
        let sessions = Sessions::with_unknown_lookups(store, five);
        let count = || owner.touches.load(std::sync::atomic::Ordering::Relaxed);
        let made_up = (0..12u32).map(|i| format!("{:032x}", u128::from(i) << 64 | 0xfeed)).collect::<Vec<_>>();
        let touched = futures_util::future::join_all(made_up.iter().map(|id| sessions.touch(id, t0()))).await;
        assert!(touched.into_iter().all(|t| t.unwrap().is_none()));
        assert_eq!(count(), 5, "of 12, only the quota's reached the owner");

        let session = new_session(n(CONTRACT), CredentialKind::Password, false, IDLE_TIMEOUT_NUMBER, t0(), 7);
        let id = sessions.create(session).await.unwrap();
        let before = count();
        for _ in 0..50 {
            assert!(sessions.touch(&id, t0()).await.unwrap().is_some());
        }
        assert_eq!(count() - before, 50, "a live session's idle time is the owner's to keep");
    }

    /// Past the quota (made-up ids flooding in have used it), a session made on another
    /// node a moment ago is found once this node's view shows it, within [`VIEW_WAIT`];
    /// an id the view never shows is taken for none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_quota_a_session_this_node_comes_to_show_within_the_wait_is_found() {
        let store = Store::temporary().unwrap();
        let one = governor::Quota::per_hour(std::num::NonZeroU32::new(1).unwrap());
        let sessions = Sessions::with_unknown_lookups(store.clone(), one);
        let made_up = |i: u128| format!("{:032x}", i << 64 | 0xfeed);
        assert!(sessions.touch(&made_up(1), t0()).await.unwrap().is_none(), "the quota's one lookup");

        let id = made_up(2);
        let session = new_session(n(CONTRACT), CredentialKind::Password, false, IDLE_TIMEOUT_NUMBER, t0(), 7);
        // This node's applier brings it a little later (a fifth of the wait).
        let applier = tokio::spawn({
            let (store, key) = (store.clone(), key(&id));
            async move {
                tokio::time::sleep(VIEW_WAIT / 5).await;
                tokio::task::spawn_blocking(move || store.submit(Op::PutSession { key, session })).await
            }
        });
        assert!(sessions.touch(&id, t0()).await.unwrap().is_some(), "shown within the wait");
        applier.await.unwrap().unwrap().unwrap();
        assert!(sessions.touch(&made_up(3), t0()).await.unwrap().is_none(), "never shown: none");
    }

    /// What is kept is keyed by a hash: the id a browser holds is stored nowhere.
    #[tokio::test]
    async fn the_store_never_holds_a_session_id() {
        let store = Store::temporary().unwrap();
        let sessions = Sessions::new(store.clone());
        let session = new_session(n(CONTRACT), CredentialKind::Password, false, IDLE_TIMEOUT_NUMBER, t0(), 7);
        let id = sessions.create(session).await.unwrap();
        let kept: Vec<String> = store.state_entries().map(|e| e.unwrap().0.id).collect();
        assert!(kept.contains(&key(&id)) && !kept.contains(&id), "{kept:?}");
    }
}
