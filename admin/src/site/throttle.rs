//! A per-client brake on wrong logins. R-S2 and R-S3 count wrong passwords per number
//! and invalidate the credential (3 for a temporary password, 10 for a password); they
//! do nothing against one client guessing at many numbers, and let anyone who knows a
//! number invalidate its password at full speed. This counts wrong logins per client
//! address: past [`MAX_FAILURES`] within [`WINDOW`] the client's next attempts are
//! answered "try later" without being checked, so they neither guess nor count towards
//! R-S3.
//!
//! The trade-off: R-S3 stays as written, so a stranger can still invalidate a password,
//! but no longer from one address in a burst: 10 wrong entries take at least two
//! windows (30 minutes) from one address. An invalidated password is never a lock-out
//! for good either: the subscriber sets a temporary password by phone from the line
//! (R-I1), which no stranger can. The brake is per address, so a subscriber on another
//! address is not slowed by someone else's guessing.

use std::net::IpAddr;

use chrono::{DateTime, Duration, Utc};
use dashmap::DashMap;

/// Wrong logins one client address may make within [`WINDOW`].
pub const MAX_FAILURES: u32 = 5;
/// The window the failures are counted in, from the first of them.
pub const WINDOW: Duration = Duration::minutes(15);
/// Addresses tracked at most; past it, windows that have passed are dropped.
const MAX_TRACKED: usize = 100_000;

/// Wrong logins by client address: (count, start of the window).
#[derive(Default)]
pub struct Throttle {
    failures: DashMap<IpAddr, (u32, DateTime<Utc>)>,
}

impl Throttle {
    /// Whether `client` may try a login at `now`.
    pub fn allows(&self, client: IpAddr, now: DateTime<Utc>) -> bool {
        self.failures.get(&client).is_none_or(|entry| {
            let (count, since) = *entry;
            now - since >= WINDOW || count < MAX_FAILURES
        })
    }

    /// Counts a wrong login of `client` at `now`.
    pub fn failed(&self, client: IpAddr, now: DateTime<Utc>) {
        if self.failures.len() >= MAX_TRACKED {
            self.failures.retain(|_, (_, since)| now - *since < WINDOW);
        }
        let mut entry = self.failures.entry(client).or_insert((0, now));
        let (count, since) = &mut *entry;
        if now - *since >= WINDOW {
            (*count, *since) = (0, now);
        }
        *count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::t0;

    #[test]
    fn a_client_past_its_wrong_logins_waits_out_the_window_and_others_do_not() {
        let throttle = Throttle::default();
        let (guesser, other): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for i in 0..MAX_FAILURES {
            assert!(throttle.allows(guesser, t0()), "attempt {i}");
            throttle.failed(guesser, t0() + Duration::seconds(i.into()));
        }
        assert!(!throttle.allows(guesser, t0() + Duration::minutes(1)));
        assert!(throttle.allows(other, t0() + Duration::minutes(1)), "another address is not slowed");
        assert!(throttle.allows(guesser, t0() + WINDOW), "after the window");
    }
}
