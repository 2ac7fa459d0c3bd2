//! Polling for something a test can only observe from outside (a metric, a file, a
//! mail), with a deadline that fails the test saying what never happened.

use std::time::{Duration, Instant};

/// How often a condition is checked: often enough that a wait ends soon after the
/// condition holds, rarely enough not to load the 2 cores the engine shares.
const POLL: Duration = Duration::from_millis(20);

/// Polls `done` until it holds; after `limit`, panics with `what()`.
pub async fn until(limit: Duration, what: impl Fn() -> String, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{}", what());
        tokio::time::sleep(POLL).await;
    }
}

/// [`until`] for a test without a runtime, polling every `every` (a condition that
/// costs a request is checked less often).
pub fn blocking_until(limit: Duration, every: Duration, what: impl Fn() -> String, done: impl FnMut() -> bool) {
    let mut done = done;
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{}", what());
        std::thread::sleep(every);
    }
}
