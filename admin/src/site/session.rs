//! Server-side sessions in memory. The browser holds only a random 128-bit id; what it
//! stands for (who is logged in, whether they must change the password first) stays on
//! the server, so logout and timeouts take effect at once (R-S7) and nothing in the
//! cookie can be forged or replayed after the session ends.
//!
//! Memory only: a restart logs everyone out, which for a settings site is a fair price
//! for not storing session secrets on disk.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use dashmap::DashMap;
use engine::phone::PhoneNumber;
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
pub const ABSOLUTE_TIMEOUT: Duration = Duration::hours(12);

/// One logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// The login number: whose settings this session may read and change.
    pub number: PhoneNumber,
    /// What the subscriber logged in with (temporary password or password).
    pub kind: CredentialKind,
    /// Every page but the password change and logout redirects there until it is done
    /// (R-S4).
    pub must_change: bool,
    /// Start of the [`ABSOLUTE_TIMEOUT`].
    pub created_at: DateTime<Utc>,
    /// Start of the idle timeout; moved by every request.
    pub last_seen: DateTime<Utc>,
    /// How long this session may be idle (R-S7), fixed at login from the line's unit.
    pub idle_timeout: Duration,
    /// The token every form of this session carries (CSRF).
    pub csrf: String,
    /// The login credential's [`crate::credentials::CredentialRecord::stamp`]: the
    /// session lasts only as long as that credential does.
    pub credential: u64,
    /// A page rendered by a POST for the GET it redirects to (Post/Redirect/Get):
    /// (path, HTML), shown once, so a reload repeats nothing.
    pub flash: Option<(String, String)>,
}

impl Session {
    /// A session for `number` logged in at `now`.
    pub fn new(
        number: PhoneNumber,
        kind: CredentialKind,
        must_change: bool,
        idle_timeout: Duration,
        now: DateTime<Utc>,
        credential: u64,
    ) -> Self {
        let csrf = csrf::new_token();
        Self { number, kind, must_change, created_at: now, last_seen: now, idle_timeout, csrf, credential, flash: None }
    }

    fn expired(&self, now: DateTime<Utc>) -> bool {
        now - self.last_seen >= self.idle_timeout || now - self.created_at >= ABSOLUTE_TIMEOUT
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
        Some(AuthUnit::AdminUser) if *number != record.contract => IDLE_TIMEOUT_NUMBER,
        Some(AuthUnit::Line | AuthUnit::AdminUser) | None => IDLE_TIMEOUT_LINE,
    })
}

/// The live sessions by id; cheap to clone. Every access is a short map operation, and
/// no guard is ever held across an `.await`.
#[derive(Clone, Default)]
pub struct Sessions {
    map: Arc<DashMap<String, Session>>,
}

impl Sessions {
    /// Stores `session` under a new random id and returns the id. Ids are never reused,
    /// so a login always yields an id the browser has not seen before (session
    /// fixation).
    pub fn create(&self, session: Session) -> String {
        let id = format!("{:032x}", rand::random::<u128>());
        self.map.insert(id.clone(), session);
        id
    }

    /// The session `id` at `now`, its idle timeout restarted; `None` if there is none or
    /// it has expired (and then it is forgotten).
    pub fn touch(&self, id: &str, now: DateTime<Utc>) -> Option<Session> {
        let mut entry = self.map.get_mut(id)?;
        if entry.expired(now) {
            drop(entry);
            self.map.remove(id);
            return None;
        }
        entry.last_seen = now;
        Some(entry.clone())
    }

    /// Keeps `html` for session `id`'s next GET of `path` ([`Session::flash`]).
    pub fn set_flash(&self, id: &str, path: String, html: String) {
        if let Some(mut session) = self.map.get_mut(id) {
            session.flash = Some((path, html));
        }
    }

    /// The page kept for session `id`'s GET of `path`, once.
    pub fn take_flash(&self, id: &str, path: &str) -> Option<String> {
        let mut session = self.map.get_mut(id)?;
        match session.flash.take() {
            Some((kept, html)) if kept == path => Some(html),
            _ => None,
        }
    }

    /// Ends session `id` (logout, or a fresh login from the same browser).
    pub fn remove(&self, id: &str) {
        self.map.remove(id);
    }

    /// Ends every session of `number` except `keep`: after a password change, a browser
    /// logged in with the old password must not stay in.
    pub fn remove_number(&self, number: &PhoneNumber, keep: &str) {
        self.map.retain(|id, session| session.number != *number || id == keep);
    }

    /// Forgets expired sessions, so abandoned ones do not accumulate.
    pub fn sweep(&self, now: DateTime<Utc>) {
        self.map.retain(|_, session| !session.expired(now));
    }

    /// Live sessions (metrics, tests).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no live sessions.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
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

    #[test]
    fn sessions_expire_when_idle_and_after_the_absolute_timeout() {
        let sessions = Sessions::default();
        let session = Session::new(n(CONTRACT), CredentialKind::Password, false, IDLE_TIMEOUT_NUMBER, t0(), 7);
        let id = sessions.create(session);
        let mut now = t0();
        // Active every 29 minutes: alive until the absolute timeout.
        while now + Duration::minutes(29) < t0() + ABSOLUTE_TIMEOUT {
            now += Duration::minutes(29);
            assert!(sessions.touch(&id, now).is_some(), "{now}");
        }
        assert!(sessions.touch(&id, t0() + ABSOLUTE_TIMEOUT).is_none());
        assert!(sessions.is_empty(), "an expired session is forgotten");
    }
}
