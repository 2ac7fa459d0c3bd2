//! The mail server's circuit breaker: a server that stops answering (or cannot be
//! reached) must not hold the pipeline.
//!
//! Without it, every first attempt against a hung server waits out `smtp.timeout_secs`
//! before its mail reaches the retry queue; the CDRs behind those mails pile up to
//! `engine.max_in_flight` and the consumers pause, so CDRs that need no mail wait too.
//! After [`FAILURES_TO_OPEN`] such failures in a row the breaker opens: first attempts
//! go straight to the retry queue, and the attempts waiting on the server are given up
//! and queued too. While it is open one attempt at a time may go through each cool-down
//! (a probe); the first success closes it.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use crate::telemetry::Metrics;

/// Server failures in a row (no answer in time, no connection) that open the breaker.
pub const FAILURES_TO_OPEN: u32 = 3;

pub struct Breaker {
    /// Server failures since the last success.
    failures: AtomicU32,
    /// While open: until when (unix ms) only a probe may go through; 0 when closed.
    open_until_ms: AtomicI64,
    /// How long it stays open before the next probe.
    cool_down: Duration,
    /// Woken when it opens, so attempts waiting on the server give up and queue.
    opened: tokio::sync::Notify,
    metrics: Metrics,
}

/// What the breaker lets a mail do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Closed: go ahead.
    Go,
    /// Open, and this attempt is the cool-down's probe: go ahead, or give it back
    /// ([`Breaker::give_back`]) if the mail is not tried after all.
    Probe(Probe),
    /// Open: queue the mail, due at this time (unix ms).
    Wait(i64),
}

/// The probe of one cool-down: the cool-down's end it took (`was`) and the next one's it
/// set (`next`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    was: i64,
    next: i64,
}

impl Breaker {
    pub fn new(cool_down: Duration, metrics: Metrics) -> Self {
        metrics.smtp_circuit_open(false);
        Self {
            failures: AtomicU32::new(0),
            open_until_ms: AtomicI64::new(0),
            cool_down,
            opened: tokio::sync::Notify::new(),
            metrics,
        }
    }

    /// Whether an attempt may go to the server at `now_ms`. Past the cool-down, the
    /// first caller becomes the probe and the next cool-down starts.
    pub fn admit(&self, now_ms: i64) -> Admit {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return Admit::Go;
        }
        if now_ms < until {
            return Admit::Wait(until);
        }
        let next = now_ms + self.cool_down.as_millis() as i64;
        match self.open_until_ms.compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Admit::Probe(Probe { was: until, next }),
            Err(0) => Admit::Go,
            Err(other) => Admit::Wait(other),
        }
    }

    /// A probe whose mail was not tried (flood control held it back): the next caller
    /// may probe, instead of the server waiting a whole cool-down untried. Nothing, if
    /// the breaker moved on meanwhile (closed, or opened again).
    pub fn give_back(&self, probe: Probe) {
        let _ = self.open_until_ms.compare_exchange(probe.next, probe.was, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The server failed to answer, or could not be reached.
    pub fn failed(&self, now_ms: i64) {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures < FAILURES_TO_OPEN {
            return;
        }
        let until = now_ms + self.cool_down.as_millis() as i64;
        if self.open_until_ms.fetch_max(until, Ordering::AcqRel) == 0 {
            tracing::warn!(
                failures,
                cool_down = ?self.cool_down,
                "the mail server is not answering: new mails go to the retry queue until it does"
            );
            self.metrics.smtp_circuit_open(true);
            self.opened.notify_waiters();
        }
    }

    /// The server answered (accepting or refusing the mail).
    pub fn answered(&self) {
        self.failures.store(0, Ordering::Release);
        if self.open_until_ms.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("the mail server answers again: mails are sent as usual");
            self.metrics.smtp_circuit_open(false);
        }
    }

    /// Completes when the breaker opens next.
    pub async fn opens(&self) {
        self.opened.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_failures_open_it_one_probe_per_cool_down_and_an_answer_closes_it() {
        let metrics = Metrics::new();
        let breaker = Breaker::new(Duration::from_secs(2), metrics.clone());
        breaker.failed(1_000);
        breaker.failed(1_000);
        assert_eq!(breaker.admit(1_000), Admit::Go, "two failures leave it closed");
        breaker.failed(1_000);
        assert_eq!(breaker.admit(1_500), Admit::Wait(3_000), "open for the cool-down");
        assert_eq!(metrics.value("callnotify_smtp_circuit_open"), Some(1.0));

        assert_eq!(
            breaker.admit(3_000),
            Admit::Probe(Probe { was: 3_000, next: 5_000 }),
            "the first caller past the cool-down is the probe"
        );
        assert_eq!(breaker.admit(3_001), Admit::Wait(5_000), "the next waits for the next cool-down");
        breaker.failed(3_100);
        assert_eq!(breaker.admit(4_000), Admit::Wait(5_100), "a failed probe keeps it open");

        breaker.answered();
        assert_eq!(breaker.admit(4_000), Admit::Go);
        assert_eq!(metrics.value("callnotify_smtp_circuit_open"), Some(0.0));
        breaker.failed(4_000);
        assert_eq!(breaker.admit(4_000), Admit::Go, "an answer starts the count again");
    }

    /// A probe given back (its mail held back by flood control, never tried) goes to the
    /// next caller: the server is tried in this cool-down, not a cool-down later. A
    /// flood-held mail used to take the probe, and mails waited a whole cool-down more.
    #[test]
    fn a_probe_given_back_goes_to_the_next_caller() {
        let breaker = Breaker::new(Duration::from_secs(2), Metrics::new());
        for _ in 0..FAILURES_TO_OPEN {
            breaker.failed(1_000);
        }
        let Admit::Probe(probe) = breaker.admit(3_000) else { panic!("the probe") };
        breaker.give_back(probe);
        assert_eq!(breaker.admit(3_001), Admit::Probe(Probe { was: 3_000, next: 5_001 }), "the next caller probes");
        // Given back after the breaker closed: it stays closed.
        breaker.answered();
        breaker.give_back(probe);
        assert_eq!(breaker.admit(3_002), Admit::Go);
    }
}
