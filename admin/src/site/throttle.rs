//! A per-client brake on wrong logins. R-S2 and R-S3 count wrong passwords per number
//! and invalidate the credential (3 for a temporary password, 10 for a password); they
//! do nothing against one client guessing at many numbers, and let anyone who knows a
//! number invalidate its password at full speed. This counts wrong logins per client
//! address: past [`MAX_FAILURES`] within [`WINDOW`] the client's next attempts are
//! answered "try later" without being checked, so they neither guess nor count towards
//! R-S3.
//!
//! The trade-off: R-S3 stays as written, so a stranger can still invalidate a password,
//! but no longer from one address in a burst: 10 wrong entries take more than a window
//! (15 minutes) from one address. An IPv6 client is one address per /64
//! ([`engine::http::client_block`]). An invalidated password is never a lock-out
//! for good either: the subscriber sets a temporary password by phone from the line
//! (R-I1), which no stranger can. The brake is per address, so a subscriber on another
//! address is not slowed by someone else's guessing.

use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use dashmap::DashMap;

/// Wrong logins one client address may make within [`WINDOW`].
pub const MAX_FAILURES: u32 = 5;
/// The window the failures are counted in: the last 15 minutes at each attempt.
pub const WINDOW: Duration = Duration::minutes(15);
/// Addresses tracked at most; past it, windows that have passed are dropped.
const MAX_TRACKED: usize = 100_000;

/// Per client address: its wrong logins in the window, and attempts being checked now.
#[derive(Default)]
pub struct Throttle {
    tallies: DashMap<IpAddr, Tally>,
}

struct Tally {
    /// When the wrong logins within the window were (at most [`MAX_FAILURES`]): the
    /// window slides over them, so no burst gets a fresh allowance at a window's turn.
    failed_at: Vec<DateTime<Utc>>,
    /// Attempts whose password is being checked: each may turn out wrong, so they count
    /// against the allowance until it is known (attempts sent at once would otherwise
    /// all pass before the first failure is counted).
    checking: u32,
}

impl Throttle {
    /// Starts an attempt of `client` at `now`, if it may make one; `None` past its wrong
    /// logins (those being checked included) within the window.
    pub fn begin(self: &Arc<Self>, client: IpAddr, now: DateTime<Utc>) -> Option<Attempt> {
        let client = engine::http::client_block(client);
        if self.tallies.len() >= MAX_TRACKED {
            self.tallies.retain(|_, t| t.checking > 0 || t.failed_at.iter().any(|at| now - *at < WINDOW));
        }
        let mut tally = self.tallies.entry(client).or_insert(Tally { failed_at: Vec::new(), checking: 0 });
        tally.failed_at.retain(|at| now - *at < WINDOW);
        if tally.failed_at.len() as u32 + tally.checking >= MAX_FAILURES {
            return None;
        }
        tally.checking += 1;
        Some(Attempt { throttle: self.clone(), client, at: now, wrong: true })
    }
}

/// A login attempt being checked, from [`Throttle::begin`]. Dropped before its verdict
/// ([`Attempt::right`], [`Attempt::unchecked`]), it counts as wrong: a client that closes
/// its connection mid-check drops its handler, while the check goes on and counts against
/// the number's R-S2/R-S3 allowance all the same. Counted as right, a client could
/// invalidate a password at full speed from one address by hanging up on every try.
pub struct Attempt {
    throttle: Arc<Throttle>,
    client: IpAddr,
    /// When it was made: the window starts at the first wrong one.
    at: DateTime<Utc>,
    wrong: bool,
}

impl Attempt {
    /// The attempt was wrong: it counts within the window.
    pub fn failed(self) {}

    /// The password was right: the attempt counts for nothing.
    pub fn right(mut self) {
        self.wrong = false;
    }

    /// The password could not be checked (the store failed): it counts for nothing.
    pub fn unchecked(mut self) {
        self.wrong = false;
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(mut tally) = self.throttle.tallies.get_mut(&self.client) {
            tally.checking -= 1;
            if self.wrong {
                // Within the allowance: `begin` counted this attempt in it.
                tally.failed_at.push(self.at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::t0;

    #[test]
    fn a_client_past_its_wrong_logins_waits_out_the_window_and_others_do_not() {
        let throttle = Arc::new(Throttle::default());
        let (guesser, other): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for i in 0..MAX_FAILURES {
            throttle.begin(guesser, t0() + Duration::seconds(i.into())).expect("within the allowance").failed();
        }
        assert!(throttle.begin(guesser, t0() + Duration::minutes(1)).is_none());
        assert!(throttle.begin(other, t0() + Duration::minutes(1)).is_some(), "another address is not slowed");
        assert!(throttle.begin(guesser, t0() + WINDOW).is_some(), "after the window");
    }

    /// Attempts being checked count until they are known: right ones then count for
    /// nothing.
    #[test]
    fn attempts_being_checked_count_until_they_turn_out_right() {
        let throttle = Arc::new(Throttle::default());
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        let mut checking: Vec<Attempt> = (0..MAX_FAILURES).map(|_| throttle.begin(client, t0()).unwrap()).collect();
        assert!(throttle.begin(client, t0()).is_none(), "all of the allowance is being checked");
        checking.pop().unwrap().right();
        let next = throttle.begin(client, t0()).expect("a right one gave its place back");
        checking.into_iter().for_each(Attempt::failed);
        next.failed();
        assert!(throttle.begin(client, t0()).is_none());
    }

    /// The window starts at the first wrong login, not at a right one before it.
    #[test]
    fn the_window_starts_at_the_first_wrong_login() {
        let throttle = Arc::new(Throttle::default());
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        throttle.begin(client, t0()).expect("a right login").right();
        for i in 0..MAX_FAILURES {
            let at = t0() + Duration::minutes(14) + Duration::seconds(i.into());
            throttle.begin(client, at).expect("within the allowance").failed();
        }
        assert!(throttle.begin(client, t0() + Duration::minutes(16)).is_none(), "15 minutes from the first wrong one");
        assert!(throttle.begin(client, t0() + Duration::minutes(29)).is_some());
    }

    /// One wrong login, then four just before the 15 minutes from it are over: five more
    /// came through just after (the window started afresh), nine wrong entries in a
    /// second from one address. The window slides: one more, then braked.
    #[test]
    fn wrong_logins_at_a_window_s_end_do_not_get_a_fresh_allowance() {
        let throttle = Arc::new(Throttle::default());
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        throttle.begin(client, t0()).expect("the first").failed();
        let late = t0() + WINDOW - Duration::seconds(1);
        for _ in 1..MAX_FAILURES {
            throttle.begin(client, late).expect("within the allowance").failed();
        }
        let after = t0() + WINDOW;
        throttle.begin(client, after).expect("the first one's place, freed").failed();
        assert!(throttle.begin(client, after).is_none(), "the four of a second ago still count");
        assert!(throttle.begin(client, late + WINDOW).is_some(), "once they are 15 minutes old");
    }

    /// A client with an IPv6 /64 has 2^64 addresses: braked as one.
    #[test]
    fn an_ipv6_client_is_braked_by_its_64_block() {
        let throttle = Arc::new(Throttle::default());
        for i in 0..MAX_FAILURES {
            let client: IpAddr = format!("2001:db8:1:2::{i:x}").parse().unwrap();
            throttle.begin(client, t0()).expect("within the allowance").failed();
        }
        assert!(throttle.begin("2001:db8:1:2:ffff::9".parse().unwrap(), t0()).is_none());
        assert!(throttle.begin("2001:db8:1:3::1".parse().unwrap(), t0()).is_some(), "another /64");
    }

    /// An attempt whose handler went away before its verdict (the client closed its
    /// connection mid-check, while the check went on) counts as wrong: hanging up on
    /// every try does not get past the brake.
    #[test]
    fn attempts_dropped_before_their_verdict_count_as_wrong() {
        let throttle = Arc::new(Throttle::default());
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            drop(throttle.begin(client, t0()).expect("within the allowance"));
        }
        assert!(throttle.begin(client, t0()).is_none(), "braked after {MAX_FAILURES} abandoned attempts");
    }
}
