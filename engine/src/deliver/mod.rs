//! Deliver stage: rendered mails to the mail server (or the outbox directory), under a
//! global rate limit and per-recipient flood control, with temporary failures retried
//! from a durable queue and permanent ones recorded in the dead-letter topic (R-M4).
//!
//! A mail held back by a limit waits; it is never dropped (`callnotify_mails_delayed_total`).
//! A mail whose first attempt fails temporarily goes into the [`queue::RetryQueue`] in
//! sled, is flushed, and only then reported as [`Fate::Queued`], so its CDR's offset
//! can move on; [`Deliverer::run_retries`] tries it again with exponential backoff and
//! jitter until it is accepted, refused for good, or older than `smtp.retry_give_up_secs`.
//! Every mail's sent record (the dedup key) is written and flushed right after the
//! server's answer, before its CDR counts as done: by the store's flusher thread, where
//! the records of mails finishing together share one flush. Other store I/O runs on
//! blocking threads, never on an async worker.

use std::future::Future;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use governor::clock::QuantaInstant;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, NotUntil, Quota, RateLimiter};

use self::breaker::{Admit, Breaker};
use self::client::ClientError;
use self::queue::{Entry, Queued, RetryQueue, Slot};
use self::smtp::{Ours, SendError, SmtpPool};
use crate::config::SmtpSettings;
use crate::dead_letter::DeadLetters;
use crate::error_event::ErrorEvent;
use crate::phone::PhoneNumber;
use crate::render::{Mail, MailService, Origin};
use crate::store::{SentKey, Store, StoreError};
use crate::telemetry::{Failure, Metrics};

mod breaker;
mod client;
pub mod queue;
mod smtp;

/// Where mails go.
enum Transport {
    Smtp(SmtpPool),
    /// `smtp.host` empty: one `.eml` file per mail, named after its Message-ID.
    Outbox(PathBuf),
}

/// How a failed attempt is handled.
#[derive(Debug)]
enum Attempt {
    /// 4xx, a dropped connection, a timeout: try again later.
    Temporary(String),
    /// No answer at all: a timeout, no connection, the connection dropped. Temporary,
    /// and counted by the circuit breaker ([`Deliverer::attempt`] turns it into
    /// `Temporary` once counted).
    Unanswered(String),
    /// 5xx or a mail the server can never take: record and give up.
    Permanent(String),
    /// Not tried: its CDR partition went to another reader while it waited for its
    /// turn (the rate, a connection), and that one sends it.
    Passed,
}

/// The final fate of one mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Accepted by the mail server (or written to the outbox).
    Sent,
    /// Refused for good; a dead-letter record was written.
    Failed,
    /// Failed for now; durably in the retry queue, which owns it from here.
    Queued,
}

/// Sends mails; cheap to clone, shared by every delivery task.
#[derive(Clone)]
pub struct Deliverer {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Transport,
    global: DefaultDirectRateLimiter,
    per_recipient: DefaultKeyedRateLimiter<String>,
    /// Per address over its flood limit, when the next of its waiting mails is due (unix
    /// ms): each one waiting is given its own slot, one flood period after the last, so
    /// that a thousand mails waiting for one address do not all fall due at the next
    /// slot and all but one go back into the queue (a write each, every slot).
    flood_slots: dashmap::DashMap<String, i64>,
    /// How often one address may be sent another mail past its burst.
    flood_period: Duration,
    first_delay: Duration,
    max_delay: Duration,
    give_up: Duration,
    /// Retries sent at once.
    concurrency: usize,
    metrics: Metrics,
    dead_letters: DeadLetters,
    store: Store,
    queue: RetryQueue,
    /// Woken when a mail is queued, so the retry loop sees an earlier due time.
    queued: tokio::sync::Notify,
    /// Keeps a mail server that does not answer from holding the pipeline.
    breaker: Breaker,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("smtp.from {0:?} is not an address (`Name <no-reply@example.jp>`)")]
    From(String),
    #[error("cannot create the outbox directory {path}: {source}")]
    Outbox { path: PathBuf, source: std::io::Error },
    #[error("smtp.tls_ca_file {path}: {reason}")]
    TlsCa { path: PathBuf, reason: String },
    #[error("opening the retry queue: {0}")]
    Queue(#[from] StoreError),
}

/// How long after its give-up age a retry entry set aside for a partition another node
/// reads is kept (`forget_old_aside_hourly`).
const ASIDE_AFTER_GIVE_UP: Duration = Duration::from_secs(86_400);

/// Every hour, from an hour after the start (by then this node's partitions are assigned
/// and their entries back in its queue), forgets the retry entries set aside for
/// partitions other nodes read whose mails first failed more than `give_up` and a day
/// ago ([`RetryQueue::forget_parked_failed_before`]).
pub async fn forget_old_aside_hourly(store: Store, give_up: Duration, stop: tokio_util::sync::CancellationToken) {
    const EVERY: Duration = Duration::from_secs(3600);
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let age = i64::try_from((give_up + ASIDE_AFTER_GIVE_UP).as_millis()).unwrap_or(i64::MAX);
        let cutoff_ms = Utc::now().timestamp_millis().saturating_sub(age);
        let store = store.clone();
        match tokio::task::spawn_blocking(move || RetryQueue::open(&store)?.forget_parked_failed_before(cutoff_ms))
            .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(forgotten)) => tracing::info!(
                mails = forgotten,
                "forgot retry entries set aside for partitions other nodes read, past their give-up age and a day \
                 (those nodes have sent them or given them up)"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "forgetting old retry entries set aside failed; will try again"),
            Err(e) => tracing::warn!(error = %e, "forgetting old retry entries set aside stopped; will try again"),
        }
    }
}

impl Deliverer {
    /// Opens the retry queue and takes up flood control from the store: walks of the
    /// store, so call it where blocking is allowed (`spawn_blocking`), within a tokio
    /// runtime (it spawns the task that forgets idle recipients).
    pub fn new(
        settings: &SmtpSettings,
        store: &Store,
        metrics: Metrics,
        dead_letters: DeadLetters,
    ) -> Result<Self, DeliverError> {
        let transport = Transport::new(settings, Some(metrics.clone()))?;
        let metrics_for_breaker = metrics.clone();
        let per_second = NonZeroU32::new(settings.rate_per_second).expect("config checks rate_per_second >= 1");
        let per_minute = NonZeroU32::new(settings.per_recipient_per_minute).expect("config checks >= 1");
        let queue = RetryQueue::open(store)?;
        // Entries of partitions not read yet wait aside for their reader: this node's
        // queue once their partitions are assigned to it (`PartitionLog::restore`).
        let aside = queue.park()?;
        if aside > 0 {
            tracing::info!(
                mails = aside,
                "mails queued before the start set aside until their partitions are assigned here"
            );
        }
        metrics.retry_queue(queue.len());
        let inner = Inner {
            transport,
            global: RateLimiter::direct(rate_quota(per_second)),
            per_recipient: RateLimiter::keyed(flood_quota(per_minute)),
            flood_slots: dashmap::DashMap::new(),
            flood_period: flood_period(per_minute),
            first_delay: Duration::from_millis(settings.retry_first_delay_ms.max(1)),
            max_delay: Duration::from_millis(settings.retry_max_delay_ms.max(settings.retry_first_delay_ms).max(1)),
            give_up: Duration::from_secs(settings.retry_give_up_secs),
            concurrency: settings.pool_size.max(1) as usize,
            metrics,
            dead_letters,
            store: store.clone(),
            queue,
            queued: tokio::sync::Notify::new(),
            // One probe per `smtp.timeout_secs` while the server does not answer.
            breaker: Breaker::new(Duration::from_secs(settings.timeout_secs), metrics_for_breaker),
        };
        // Flood control goes on across a restart: each mail handled in the last minute
        // takes its cell again, so a restart never grants a recipient a fresh burst.
        // (Taken all at once now, they hold back at least as much as when they went.)
        let since = (Utc::now().timestamp() - 60).max(0) as u64;
        let recent = store.recipients_handled_since(since)?;
        for recipient in &recent {
            let _ = inner.per_recipient.check_key(&mailbox(recipient));
        }
        if !recent.is_empty() {
            tracing::info!(mails = recent.len(), "flood control goes on from the mails of the last minute");
        }
        let inner = Arc::new(inner);
        tokio::spawn(forget_idle_recipients(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// Makes one attempt at `mail`: sent, refused for good (dead-lettered), or, on a
    /// temporary failure, durably queued for [`Deliverer::run_retries`]. Either way the
    /// mail's sent record `key` is on disk when this returns, so a CDR read again after
    /// a crash does not send it twice.
    ///
    /// If `stop` completes before the server has answered (the time for sending at
    /// shutdown or at a revocation is over), the attempt is dropped and the mail queued,
    /// due at once: the retry queue sends it, after the next start if shutting down.
    /// Dropped after DATA it may have arrived already, the same ambiguity as a timeout
    /// (docs/delivery.md).
    ///
    /// While the mail server is not answering (the circuit breaker is open) the mail is
    /// queued without an attempt, and an attempt waiting on the server when the breaker
    /// opens is given up and queued: its CDR is done at once, so a hung server holds
    /// neither the CDRs behind it nor more than a few mails.
    pub async fn deliver(&self, key: &SentKey, mail: &Mail, origin: &Origin, stop: impl Future<Output = ()>) -> Fate {
        let inner = &*self.inner;
        let admitted = inner.breaker.admit(Utc::now().timestamp_millis());
        if let Admit::Wait(until_ms) = admitted {
            let reply = "not tried: the mail server is not answering (circuit breaker open)";
            self.enqueue(Queued::untried(mail, origin, reply, Utc::now()), until(until_ms)).await;
            return Fate::Queued;
        }
        // Over its address's flood limit, the mail waits in the queue, not here: waiting
        // here held its CDR in flight, and an address called more often than its limit
        // filled the engine's in-flight CDRs and paused everyone's.
        let recipient = mailbox(mail.recipient.as_str());
        if let Err(not_until) = inner.per_recipient.check_key(&recipient) {
            give_back_probe(&inner.breaker, admitted);
            inner.metrics.delayed_by_flood();
            let now_ms = Utc::now().timestamp_millis();
            let due_ms = self.flood_slot(&recipient, now_ms, &not_until);
            if due_ms - now_ms >= inner.give_up.as_millis() as i64 {
                // Its turn would come after the give-up age: given up now, as it would be then.
                let reply = format!(
                    "not tried: its address's mails over smtp.per_recipient_per_minute wait longer than \
                     smtp.retry_give_up_secs ({} s)",
                    inner.give_up.as_secs()
                );
                self.give_up(mail, origin, &reply, 0, Failure::Expired).await;
                self.record(key, origin).await;
                return Fate::Failed;
            }
            self.take_flood_slot(recipient, due_ms);
            let reply = "not tried yet: its address is over smtp.per_recipient_per_minute";
            self.enqueue(Queued::untried(mail, origin, reply, Utc::now()), until(due_ms)).await;
            return Fate::Queued;
        }
        let answer = tokio::select! {
            biased;
            () = stop => None,
            () = inner.breaker.opens() => {
                Some(Err(Attempt::Temporary("given up while the mail server was not answering (circuit breaker open)".into())))
            }
            // Its CDR is in flight here: a revocation waits for it (`stop`).
            answer = self.attempt(mail, None) => Some(answer),
        };
        match answer {
            Some(Ok(())) => {
                inner.metrics.sent(latency(origin));
                self.record(key, origin).await;
                Fate::Sent
            }
            Some(Err(Attempt::Permanent(reply))) => {
                self.give_up(mail, origin, &reply, 1, Failure::Permanent).await;
                self.record(key, origin).await;
                Fate::Failed
            }
            Some(Err(Attempt::Temporary(reply) | Attempt::Unanswered(reply))) => {
                let due = jitter(inner.first_delay);
                tracing::info!(message_id = %mail.message_id, %reply, retry_in = ?due, "mail delayed, queued for retry");
                self.enqueue(Queued::new(mail, origin, &reply, Utc::now()), due).await;
                Fate::Queued
            }
            // Stopped while the server had it: an attempt, maybe delivered. (`Passed`
            // comes only from an attempt that asks whether the mail is still this node's:
            // a first attempt does not.)
            None | Some(Err(Attempt::Passed)) => {
                tracing::info!(message_id = %mail.message_id, "time for sending is over (shutdown or revocation); mail queued");
                let reply = "not sent yet when the engine stopped sending (shutdown or revocation)";
                self.enqueue(Queued::new(mail, origin, reply, Utc::now()), Duration::ZERO).await;
                Fate::Queued
            }
        }
    }

    /// Writes `key`'s sent record and flushes it: the sooner it is on disk after the
    /// server's answer, the smaller the window in which a crash makes a duplicate.
    async fn record(&self, key: &SentKey, origin: &Origin) {
        let (store, source) = (&self.inner.store, origin.source.as_ref());
        self.until_stored("sent record", || store.record_sent(key, Utc::now().timestamp().max(0) as u64, source)).await;
    }

    /// Puts `entry` in the retry queue, due in `after`, with its sent record, durably.
    async fn enqueue(&self, entry: Queued, after: Duration) {
        let inner = &*self.inner;
        let due_ms = Utc::now().timestamp_millis() + after.as_millis() as i64;
        // Written once, then flushed until that succeeds: a failed flush never queues
        // the mail a second time.
        let (_, added) = self
            .until_stored("retry queue entry", || {
                let (queue, entry) = (inner.queue.clone(), entry.clone());
                blocking(move || queue.push(&entry, due_ms, Utc::now().timestamp().max(0) as u64))
            })
            .await;
        self.until_stored("retry queue entry", || inner.store.flush()).await;
        inner.metrics.retried();
        if added {
            inner.metrics.retry_queue_changed(1);
        }
        inner.queued.notify_one();
    }

    /// Runs `write` until it succeeds. Until then the CDR's offset waits, so a failing
    /// store is retried with backoff, never skipped.
    async fn until_stored<T, F>(&self, what: &str, write: impl Fn() -> F) -> T
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            match write().await {
                Ok(done) => return done,
                Err(e) => {
                    crate::error_event!(
                        self.inner.metrics,
                        ErrorEvent::DeliveryStore,
                        error = %e,
                        retry_in = ?backoff,
                        "{what} not stored yet"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Sends the retry queue's mails as they fall due, up to `smtp.pool_size` at once,
    /// until `shutdown` completes; then waits up to `finish` for the attempts under
    /// way and drops those still waiting. Entries left are sent after the next start.
    pub async fn run_retries(self, shutdown: impl Future<Output = ()>, finish: Duration) {
        let inner = &*self.inner;
        let mut trying: std::collections::HashSet<Slot> = Default::default();
        let mut tasks: tokio::task::JoinSet<Slot> = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let room = inner.concurrency.saturating_sub(tasks.len());
            let (queue, skip) = (inner.queue.clone(), trying.clone());
            let now = Utc::now().timestamp_millis();
            // Entries refused by their changelog first: this node's only, back in the queue.
            let (owned, turn) = match blocking(move || Ok((queue.own_refused(), queue.turn(now, &skip, room)))).await {
                Ok(both) => both,
                Err(e) => (Ok(0), Err(e)),
            };
            match owned {
                Ok(back) if back > 0 => inner.metrics.retry_queue_changed(back as i64),
                Ok(_) => {}
                Err(e) => crate::error_event!(inner.metrics, ErrorEvent::RetryQueueRead, error = %e,
                    "retry entries refused by their changelog not made this node's; tried again at the next turn"),
            }
            let next_due = match turn {
                Ok(turn) => {
                    for (slot, entry) in turn.due {
                        trying.insert(slot.clone());
                        let this = self.clone();
                        tasks.spawn(async move {
                            this.retry(&slot, entry).await;
                            slot
                        });
                    }
                    turn.next_due_ms
                }
                Err(e) => {
                    crate::error_event!(inner.metrics, ErrorEvent::RetryQueueRead, error = %e, "reading the retry queue failed");
                    None
                }
            };
            // An entry due already is being tried or waits for a free slot: either way
            // a finishing attempt wakes the loop.
            let wait = match next_due.map(|due| due - Utc::now().timestamp_millis()) {
                Some(ms) if ms > 0 => Duration::from_millis(ms as u64).min(RETRY_POLL),
                _ => RETRY_POLL,
            };
            tokio::select! {
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok(slot) = done {
                        trying.remove(&slot);
                    }
                }
                () = inner.queued.notified() => {}
                () = tokio::time::sleep(wait) => {}
                () = &mut shutdown => break,
            }
        }
        let under_way = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(finish, under_way).await.is_err() {
            // An attempt dropped before the answer leaves its entry in the queue.
            tracing::info!(attempts = tasks.len(), "shutdown: retries still under way are left in the queue");
            tasks.shutdown().await;
        }
    }

    /// One more attempt at a queued mail; then it is removed (sent, or dead-lettered)
    /// or moved to its next due time.
    async fn retry(&self, slot: &Slot, entry: Entry) {
        let inner = &*self.inner;
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                crate::error_event!(inner.metrics, ErrorEvent::RetryQueueUnreadable, error = %e, "unreadable retry queue entry removed");
                inner.metrics.failed(Failure::Unreadable);
                self.unqueue(slot).await;
                return;
            }
        };
        let (mail, origin) = match entry.to_mail() {
            Ok(parts) => parts,
            Err(e) => {
                crate::error_event!(
                    inner.metrics,
                    ErrorEvent::RetryQueueUnsendable,
                    message_id = %entry.message_id,
                    error = %e,
                    "retry queue entry cannot be sent; removed"
                );
                inner.metrics.failed(Failure::Unreadable);
                self.unqueue(slot).await;
                return;
            }
        };
        // Its partition went to another reader since it was picked: that one sends it.
        if !inner.queue.sends(&entry) {
            return;
        }
        // The subscriber may have stopped the service or unchecked the address (one
        // typed wrong: a stranger's) since the mail was queued (R-N1, R-N2, R-M3).
        if self.withdrawn(&mail, &origin).await {
            tracing::info!(message_id = %mail.message_id, called = %origin.called, "queued mail withdrawn: its address no longer gets this number's mails");
            inner.metrics.withdrawn();
            self.unqueue(slot).await;
            return;
        }
        // Given up before an attempt: a mail queued before a stop of days (or restored
        // with its partition) is not sent days late; and while the server is not
        // answering, a mail failing longer than the give-up age is given up meanwhile
        // (one probe per cool-down would reach each of thousands of mails days late).
        // Before the breaker is asked: a probe taken by a mail given up went untried.
        let now_ms = Utc::now().timestamp_millis();
        if self.expired(slot, &entry, &mail, &origin, now_ms, &entry.last_reply).await {
            return;
        }
        // While the server is not answering, only the breaker's probe tries; the others
        // are spaced out by their age (each moved to every cool-down's end, a queue of
        // 180 000 mails was rewritten, whole, into the store and the changelog 6 000
        // times a second): once it answers again, a mail goes at most a tenth of its time
        // failing (5 minutes at most) later than it might have.
        let admitted = inner.breaker.admit(now_ms);
        if let Admit::Wait(until_ms) = admitted {
            let spaced = now_ms + held_spacing(now_ms - entry.first_failed_ms).as_millis() as i64;
            self.reschedule(slot, entry, until_ms.max(spaced)).await;
            return;
        }
        // Flood control holds for retries too: a recipient over its limit has the mail
        // put back until the limit allows it, without an attempt and without holding
        // one of the retry slots meanwhile.
        // A mail waiting longer than the give-up age is given up here too: an address
        // called more often than its limit for a day would otherwise queue without end.
        let recipient = mailbox(mail.recipient.as_str());
        if let Err(not_until) = inner.per_recipient.check_key(&recipient) {
            give_back_probe(&inner.breaker, admitted);
            let due_ms = self.flood_slot(&recipient, now_ms, &not_until);
            if self.expired(slot, &entry, &mail, &origin, due_ms, &entry.last_reply).await {
                return;
            }
            inner.metrics.delayed_by_flood();
            self.take_flood_slot(recipient, due_ms);
            self.reschedule(slot, entry, due_ms).await;
            return;
        }
        entry.attempts += 1;
        // Asked again once its turn comes: the rate and a free connection may take long
        // on a slow relay, and a partition revoked meanwhile is its new reader's to send.
        match self.attempt(&mail, Some(&|| inner.queue.sends(&entry))).await {
            Err(Attempt::Passed) => {
                give_back_probe(&inner.breaker, admitted);
            }
            Ok(()) => {
                inner.metrics.sent(latency(&origin));
                self.unqueue(slot).await;
                // Out of the queue on disk at once: else a crash would send it again.
                if let Err(e) = inner.store.flush().await {
                    crate::error_event!(inner.metrics, ErrorEvent::RetryQueueFlush, error = %e, "store flush after a retried mail failed");
                }
            }
            Err(Attempt::Permanent(reply)) => {
                self.give_up(&mail, &origin, &reply, entry.attempts, Failure::Permanent).await;
                self.unqueue(slot).await;
            }
            Err(Attempt::Temporary(reply) | Attempt::Unanswered(reply)) => {
                if self.expired(slot, &entry, &mail, &origin, Utc::now().timestamp_millis(), &reply).await {
                    return;
                }
                let delay = backoff(inner.first_delay, inner.max_delay, entry.attempts);
                tracing::info!(message_id = %mail.message_id, %reply, attempts = entry.attempts, retry_in = ?delay, "mail delayed again");
                inner.metrics.retried();
                entry.last_reply = reply;
                let due_ms = Utc::now().timestamp_millis() + jitter(delay).as_millis() as i64;
                self.reschedule(slot, entry, due_ms).await;
            }
        }
    }

    /// Whether `mail`'s number no longer sends its notifications to `mail`'s recipient:
    /// the service stopped, the address unchecked or gone, the number gone or moved to
    /// another line (whose settings start empty). A record that cannot be read now
    /// withdraws nothing: the mail goes as it was queued.
    async fn withdrawn(&self, mail: &Mail, origin: &Origin) -> bool {
        let (store, called) = (self.inner.store.clone(), origin.called);
        let record = match blocking(move || store.number(&called)).await {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(%called, error = %e, "queued mail's settings not readable: sent as queued");
                return false;
            }
        };
        let Some(record) = record else { return true };
        let (enabled, destinations) = match origin.service() {
            MailService::Fax => (record.services.fax && record.fax.enabled, &record.fax.destinations),
            MailService::Call => (record.services.call && record.call.enabled, &record.call.destinations),
        };
        // The same mailbox written in other case (re-saved as `taro@` for `Taro@`) still
        // gets it.
        let to = mail.recipient.as_str();
        !(enabled && destinations.iter().any(|d| d.send && d.address.as_str().eq_ignore_ascii_case(to)))
    }

    /// When a mail to `recipient`, over its flood limit at `now_ms` until `not_until`, can
    /// be tried: the limit's next slot, or the one after the last mail waiting for it.
    /// Not taken until [`Deliverer::take_flood_slot`].
    fn flood_slot(&self, recipient: &str, now_ms: i64, not_until: &NotUntil<QuantaInstant>) -> i64 {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
        let earliest = now_ms + wait.as_millis() as i64;
        self.inner.flood_slots.get(recipient).map_or(earliest, |next| (*next).max(earliest))
    }

    /// Takes `recipient`'s flood slot `due`: the next mail waiting gets the one after.
    fn take_flood_slot(&self, recipient: String, due: i64) {
        let after = due + self.inner.flood_period.as_millis() as i64;
        let mut next = self.inner.flood_slots.entry(recipient).or_insert(after);
        *next = (*next).max(after);
    }

    /// Gives `slot`'s mail up if it has been failing for the give-up age at `now_ms`
    /// (dead letter, removed from the queue; `reply`: its last): whether it did.
    async fn expired(
        &self,
        slot: &Slot,
        entry: &Queued,
        mail: &Mail,
        origin: &Origin,
        now_ms: i64,
        reply: &str,
    ) -> bool {
        let age = now_ms - entry.first_failed_ms;
        if age < self.inner.give_up.as_millis() as i64 {
            return false;
        }
        let reply = format!("gave up after {} attempts over {} s: {reply}", entry.attempts, age / 1000);
        self.give_up(mail, origin, &reply, entry.attempts, Failure::Expired).await;
        self.unqueue(slot).await;
        true
    }

    /// Moves `slot`'s entry to `due_ms`. On failure the entry stays where it was and is
    /// tried again at once.
    async fn reschedule(&self, slot: &Slot, entry: Queued, due_ms: i64) {
        let (queue, slot) = (self.inner.queue.clone(), slot.clone());
        if let Err(e) = blocking(move || queue.reschedule(&slot, &entry, due_ms)).await {
            crate::error_event!(self.inner.metrics, ErrorEvent::RetryQueueReschedule, error = %e, "retry queue reschedule failed");
        }
    }

    /// Records `mail` as failed for good: dead-letter record, metric, log.
    async fn give_up(&self, mail: &Mail, origin: &Origin, reply: &str, attempts: u32, reason: Failure) {
        tracing::warn!(message_id = %mail.message_id, %reply, attempts, reason = reason.as_str(), "mail failed for good");
        self.inner.metrics.failed(reason);
        // The mail as a retry-queue entry: what `callnotify dead-letters replay` queues
        // again, Message-ID and all.
        let entry = serde_json::to_value(Queued::new(mail, origin, reply, Utc::now())).unwrap_or_default();
        self.inner.dead_letters.mail_failed(mail, origin, reply, attempts, entry).await;
    }

    async fn unqueue(&self, slot: &Slot) {
        let (queue, slot) = (self.inner.queue.clone(), slot.clone());
        match blocking(move || queue.remove(&slot)).await {
            Ok(true) => self.inner.metrics.retry_queue_changed(-1),
            Ok(false) => {}
            Err(e) => crate::error_event!(
                self.inner.metrics,
                ErrorEvent::RetryQueueRemove,
                error = %e,
                "retry queue entry not removed; it may be sent again"
            ),
        }
    }

    /// Mails waiting in the retry queue.
    pub fn queued(&self) -> usize {
        self.inner.queue.len()
    }

    /// One send under the global rate limit; its outcome tells the circuit breaker
    /// whether the server answers.
    /// One attempt at `mail`, if `ours` (when given) still holds when it is about to go
    /// out.
    async fn attempt(&self, mail: &Mail, ours: Option<&Ours<'_>>) -> Result<(), Attempt> {
        let inner = &*self.inner;
        if inner.global.check().is_err() {
            inner.metrics.delayed_by_rate();
            inner.global.until_ready().await;
        }
        let result = inner.transport.send(mail, ours).await;
        match &result {
            Err(Attempt::Unanswered(_)) => inner.breaker.failed(Utc::now().timestamp_millis()),
            Ok(()) | Err(Attempt::Permanent(_) | Attempt::Temporary(_)) => inner.breaker.answered(),
            Err(Attempt::Passed) => {}
        }
        result
    }
}

impl Transport {
    fn new(settings: &SmtpSettings, metrics: Option<Metrics>) -> Result<Self, DeliverError> {
        if settings.host.is_empty() {
            std::fs::create_dir_all(&settings.outbox_dir)
                .map_err(|source| DeliverError::Outbox { path: settings.outbox_dir.clone(), source })?;
            Ok(Transport::Outbox(settings.outbox_dir.clone()))
        } else {
            Ok(Transport::Smtp(SmtpPool::new(settings, metrics)?))
        }
    }

    async fn send(&self, mail: &Mail, ours: Option<&Ours<'_>>) -> Result<(), Attempt> {
        match self {
            Transport::Smtp(smtp) => smtp.send(&mail.envelope, &mail.bytes, ours).await.map_err(classify),
            Transport::Outbox(_) if ours.is_some_and(|ours| !ours()) => Err(Attempt::Passed),
            Transport::Outbox(dir) => write_eml(dir, mail).await.map_err(|e| Attempt::Temporary(e.to_string())),
        }
    }
}

/// The 送信テスト button's sender (R-N2): one attempt, at once, to an address as the
/// subscriber typed it, so the answer can be shown on the page. Its own connections:
/// a test mail never waits behind notification traffic, and needs no Kafka.
pub struct TestMailer {
    transport: Transport,
    renderer: crate::render::Renderer,
    /// A logged-in browser could otherwise send mail to any address without end: keyed
    /// by line, since a line credential reaches every number of it.
    per_line: DefaultKeyedRateLimiter<PhoneNumber>,
}

/// Test mails one line (all its numbers together) may send per minute.
pub const TEST_MAILS_PER_MINUTE: u32 = 5;

/// [`TEST_MAILS_PER_MINUTE`] in any minute, all at once if the subscriber likes (one
/// address of theirs after the other), then one a minute. A quota of 5 a minute (one
/// more every 12 s) let 9 through in the first minute.
fn test_mail_quota() -> Quota {
    Quota::with_period(Duration::from_secs(60))
        .expect("a positive period")
        .allow_burst(NonZeroU32::new(TEST_MAILS_PER_MINUTE).expect("non-zero"))
}

/// Lines the test mails' limiter holds before it forgets those whose minute has passed.
const TEST_LINES_KEPT: usize = 1024;

/// Why a test mail was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TestMailError {
    #[error("the line sent {TEST_MAILS_PER_MINUTE} test mails this minute")]
    TooMany,
    /// The mail server refused the mail for good (5xx): its reply.
    #[error("refused: {0}")]
    Refused(String),
    /// The mail server could not take it now (4xx, no answer, no connection).
    #[error("not now: {0}")]
    NotNow(String),
    #[error("the test mail could not be made: {0}")]
    Render(String),
}

/// Reads the files of `settings` that sending mail reads (`smtp.tls_ca_file`), without
/// connecting: what `config check` finds before a restart would.
pub fn check_smtp_files(settings: &SmtpSettings) -> Result<(), DeliverError> {
    use crate::config::TlsMode;
    match (&settings.tls_ca_file, settings.tls) {
        (Some(path), TlsMode::Starttls | TlsMode::Tls) if !settings.host.is_empty() => {
            smtp::private_roots(path).map(drop)
        }
        _ => Ok(()),
    }
}

impl TestMailer {
    pub fn new(settings: &SmtpSettings) -> Result<Self, DeliverError> {
        let from = settings.from.parse().map_err(|_| DeliverError::From(settings.from.clone()))?;
        Ok(Self {
            transport: Transport::new(settings, None)?,
            renderer: crate::render::Renderer::new(from),
            per_line: RateLimiter::keyed(test_mail_quota()),
        })
    }

    /// Sends the test mail of `service` for `number`, on the line of contract number
    /// `line`, to `address`.
    pub async fn send(
        &self,
        line: &PhoneNumber,
        number: &PhoneNumber,
        address: &crate::address::DestinationAddress,
        service: crate::render::MailService,
    ) -> Result<(), TestMailError> {
        if self.per_line.check_key(line).is_err() {
            return Err(TestMailError::TooMany);
        }
        // Lines whose minute has passed are forgotten, once there are a few: each line
        // that ever pressed the button was kept until a restart.
        if self.per_line.len() > TEST_LINES_KEPT {
            self.per_line.retain_recent();
        }
        let nonce = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default().to_string();
        let mail = self
            .renderer
            .render_test(number.as_str(), address, &nonce, service)
            .map_err(|e| TestMailError::Render(e.to_string()))?;
        self.transport.send(&mail, None).await.map_err(|failed| match failed {
            Attempt::Permanent(reply) => TestMailError::Refused(reply),
            Attempt::Temporary(reply) | Attempt::Unanswered(reply) => TestMailError::NotNow(reply),
            // Not asked: a test mail is always this node's.
            Attempt::Passed => TestMailError::NotNow(SendError::Passed.to_string()),
        })
    }
}

/// A mail flood control holds back is not tried: if it held the breaker's probe, the
/// next mail probes.
fn give_back_probe(breaker: &Breaker, admitted: Admit) {
    if let Admit::Probe(probe) = admitted {
        breaker.give_back(probe);
    }
}

/// The flood-control key of `recipient`: the mailbox, whatever the case it was written
/// in (`Taro@` on one number and `taro@` on another reach one mailbox and share one
/// allowance).
fn mailbox(recipient: &str) -> String {
    recipient.to_ascii_lowercase()
}

/// `smtp.per_recipient_per_minute` as a limit that holds in every minute, not only on
/// average: half of it (rounded down, at least one) may go at once, the rest is spread
/// over the minute. In any 60 s a recipient gets at most the burst and what refills in
/// 60 s, which is the limit. (A quota of N a minute with a burst of N lets 2N through
/// the first minute.)
fn flood_quota(per_minute: NonZeroU32) -> Quota {
    let burst = (per_minute.get() / 2).max(1);
    Quota::with_period(flood_period(per_minute))
        .expect("a positive period")
        .allow_burst(NonZeroU32::new(burst).expect("at least 1"))
}

/// The interval [`flood_quota`] refills one mail in.
fn flood_period(per_minute: NonZeroU32) -> Duration {
    let burst = (per_minute.get() / 2).max(1);
    Duration::from_secs(60) / (per_minute.get() - burst).max(1)
}

/// `smtp.rate_per_second` as a limit that holds in every second, not only on average
/// (a quota of N a second with a burst of N sent 2N in the first second after a quiet
/// spell, and a relay limiting at N answered 421). Below 20 a second, mails go evenly
/// spaced; from 20, a twentieth of the rate may go at once and the rest is spread over
/// the second, so that the rate carried is 95 % of the setting at least.
fn rate_quota(per_second: NonZeroU32) -> Quota {
    let burst = (per_second.get() / 20).max(1);
    let refilled = if burst == 1 { per_second.get() } else { per_second.get() - burst };
    Quota::with_period(Duration::from_secs(1) / refilled)
        .expect("a positive period")
        .allow_burst(NonZeroU32::new(burst).expect("at least 1"))
}

/// Flood-control state is kept per recipient; addresses whose limit has fully
/// recovered are dropped every minute so the map does not grow with every address
/// ever seen. Ends when the deliverer is gone.
async fn forget_idle_recipients(inner: std::sync::Weak<Inner>) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    every.tick().await;
    loop {
        every.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.per_recipient.retain_recent();
        inner.per_recipient.shrink_to_fit();
        // Slots handed out that are past: nobody waits for them any more.
        let now_ms = Utc::now().timestamp_millis();
        inner.flood_slots.retain(|_, next| *next > now_ms);
    }
}

/// Sorts a failure into retry or give up: a 5xx to the mail's own commands, or a mail
/// the server can never take, is permanent; everything about the connection or the
/// session (greeting, EHLO, STARTTLS, AUTH) may pass, and so do a refused sender (the
/// same `smtp.from` for every mail: the operator's to mend) and 530, which a relay
/// wanting a login or TLS first answers to any command (RFC 4954, RFC 3207). A timeout
/// after DATA is retried although the mail may have arrived: a possible duplicate beats
/// a loss.
fn classify(e: SendError) -> Attempt {
    match &e {
        SendError::Client(ClientError::Refused(reply)) if reply.code >= 500 && reply.code != 530 => {
            Attempt::Permanent(e.to_string())
        }
        SendError::Client(ClientError::Unsendable(_)) => Attempt::Permanent(e.to_string()),
        SendError::Timeout | SendError::Connect(_) | SendError::Client(ClientError::Closed { .. }) => {
            Attempt::Unanswered(e.to_string())
        }
        SendError::Passed => Attempt::Passed,
        _ => Attempt::Temporary(e.to_string()),
    }
}

/// From now until `until_ms` (unix ms), or nothing if that has passed.
fn until(until_ms: i64) -> Duration {
    Duration::from_millis((until_ms - Utc::now().timestamp_millis()).max(0) as u64)
}

/// Writes the mail atomically (temp file, then rename), so a reader of the outbox never
/// sees half a mail and a replay overwrites the same file.
async fn write_eml(dir: &std::path::Path, mail: &Mail) -> std::io::Result<()> {
    let name: String = mail.message_id.trim_matches(['<', '>']).chars().take_while(|c| *c != '@').collect();
    let tmp = dir.join(format!(".{name}.tmp"));
    tokio::fs::write(&tmp, &mail.bytes).await?;
    tokio::fs::rename(&tmp, dir.join(format!("{name}.eml"))).await
}

/// Longest the retry loop sleeps without looking at the queue again.
const RETRY_POLL: Duration = Duration::from_secs(1);

/// The most a mail held back by the open breaker is spaced out.
const HELD_AT_MOST: Duration = Duration::from_secs(300);

/// How far a mail the open breaker holds back is moved, by how long it has failed: a
/// tenth of that, at most [`HELD_AT_MOST`]. A queue held for an hour is rewritten every
/// five minutes, not at every cool-down.
fn held_spacing(failing_ms: i64) -> Duration {
    Duration::from_millis((failing_ms.max(0) / 10) as u64).min(HELD_AT_MOST)
}

/// From the call's end to now.
fn latency(origin: &Origin) -> Duration {
    (Utc::now() - origin.ended_at).to_std().unwrap_or_default()
}

/// The wait before attempt `attempts + 1`: `first`, doubling per attempt, at most `max`.
fn backoff(first: Duration, max: Duration, attempts: u32) -> Duration {
    first.saturating_mul(1u32.checked_shl(attempts.saturating_sub(1)).unwrap_or(u32::MAX)).min(max)
}

/// Runs store I/O on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(StoreError::Task(e)))
}

/// Up to ±20 % random spread, so retries of many mails do not arrive together.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let factor = 0.8 + f64::from(nanos % 1000) / 2500.0;
    d.mul_f64(factor)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::address::DestinationAddress;
    use crate::config::Settings;
    use testkit::smtp::{SmtpSink, SmtpStage};

    /// The default SMTP settings, pointed at a test sink on `port`.
    pub(crate) fn smtp_to(port: u16) -> SmtpSettings {
        let env = testkit::smtp::engine_env(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        Settings::load_from(None, env.map(|(k, v)| (k.to_owned(), v))).unwrap().smtp
    }

    /// When a limiter of `quota` on a clock the test moves lets a sender through, asked
    /// every 100 ms for five minutes (ms from the start); and the most of those in any
    /// 60 s.
    fn asked_every_100_ms_for_five_minutes(quota: Quota) -> (Vec<u64>, usize) {
        use governor::clock::FakeRelativeClock;
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::direct_with_clock(quota, clock.clone());
        let mut sent: Vec<u64> = Vec::new();
        for tick in 0..3_000u64 {
            if limiter.check().is_ok() {
                sent.push(tick * 100);
            }
            clock.advance(Duration::from_millis(100));
        }
        let most = sent.iter().map(|&from| sent.iter().filter(|&&t| t >= from && t < from + 60_000).count()).max();
        (sent, most.unwrap_or(0))
    }

    /// R-M3's flood control on a clock the test moves: a recipient sent to as often as
    /// the limiter allows, every 100 ms for five minutes, never gets more than
    /// `per_recipient_per_minute` mails in any 60 s (the plain quota let twice that
    /// through the first minute), and still gets the limit's worth per minute on the whole.
    #[test]
    fn r_m3_the_flood_limit_holds_in_every_minute_not_only_on_average() {
        for limit in [1u32, 2, 5, 30, 60] {
            let (sent, most) = asked_every_100_ms_for_five_minutes(flood_quota(NonZeroU32::new(limit).unwrap()));
            assert!(most <= limit as usize, "limit {limit}: {most} in one minute");
            let per_minute = sent.len() as f64 / 5.0;
            assert!(per_minute >= f64::from(limit) / 2.0, "limit {limit}: {per_minute} a minute on the whole");
        }
    }

    /// R-N2's 送信テスト limit on a clock the test moves: pressed every 100 ms for five
    /// minutes, a line sends no more than [`TEST_MAILS_PER_MINUTE`] test mails in any
    /// 60 s (9 before), and the first five presses all send.
    #[test]
    fn r_n2_the_test_mail_limit_holds_in_every_minute() {
        let (sent, most) = asked_every_100_ms_for_five_minutes(test_mail_quota());
        assert_eq!(most, TEST_MAILS_PER_MINUTE as usize, "{sent:?}");
        assert_eq!(sent[..TEST_MAILS_PER_MINUTE as usize], [0, 100, 200, 300, 400], "the first five presses");
    }

    /// R-M4, `smtp.rate_per_second` on a clock the test moves: sent to as fast as the limiter
    /// allows for ten seconds, never more than the setting go in any second (after a
    /// quiet spell the plain quota let nearly twice through), and 95 % of it on the whole.
    #[test]
    fn the_mail_rate_holds_in_every_second_not_only_on_average() {
        use governor::clock::FakeRelativeClock;
        for limit in [1u32, 5, 19, 20, 500, 10_000] {
            let clock = FakeRelativeClock::default();
            let limiter = RateLimiter::direct_with_clock(rate_quota(NonZeroU32::new(limit).unwrap()), clock.clone());
            // Asked every millisecond, as tokio's timer wakes a sender waiting its turn.
            let step = Duration::from_millis(1);
            let (mut sent, mut now) = (Vec::new(), Duration::ZERO);
            while now < Duration::from_secs(10) {
                while limiter.check().is_ok() {
                    sent.push(now);
                }
                clock.advance(step);
                now += step;
            }
            let mut most = 0;
            let mut from = 0;
            for (i, &t) in sent.iter().enumerate() {
                while sent[from] + Duration::from_secs(1) <= t {
                    from += 1;
                }
                most = most.max(i + 1 - from);
            }
            assert!(most <= limit as usize, "limit {limit}: {most} in one second");
            let per_second = sent.len() as f64 / 10.0;
            assert!(per_second >= 0.95 * f64::from(limit) - 0.1, "limit {limit}: {per_second} a second on the whole");
        }
    }

    #[tokio::test]
    async fn r_n2_the_send_test_mail_reaches_the_address_as_typed_or_says_why_not() {
        let sink = SmtpSink::start(0).await.unwrap();
        let mailer = TestMailer::new(&smtp_to(sink.port())).unwrap();
        let number = PhoneNumber::parse("0312345678").unwrap();
        let to = DestinationAddress::parse("taro@example.jp").unwrap();

        mailer.send(&number, &number, &to, crate::render::MailService::Call).await.expect("accepted");
        let mails = sink.wait_for(1, std::time::Duration::from_secs(10)).await;
        assert_eq!(mails[0].rcpt_to, ["taro@example.jp"]);
        let parsed = mail_parser::MessageParser::default().parse(&mails[0].data).unwrap();
        assert_eq!(parsed.subject(), Some("【着信お知らせ】送信テスト"));
        assert!(parsed.body_text(0).unwrap().contains("0312345678"));

        sink.fail_next(SmtpStage::RcptTo, 550, 1);
        let refused = mailer.send(&number, &number, &to, crate::render::MailService::Call).await.unwrap_err();
        assert!(matches!(&refused, TestMailError::Refused(reply) if reply.contains("550")), "{refused}");
    }

    /// Mails the open breaker holds back are moved by a tenth of their time failing, at
    /// most 5 minutes, not to every cool-down's end: a queue held an hour is rewritten
    /// every 5 minutes, not every 30 s; the first minutes of an outage still probe-paced.
    #[test]
    fn mails_held_by_the_open_breaker_are_spaced_by_their_age() {
        assert_eq!(held_spacing(0), Duration::ZERO, "a new one waits for the cool-down's end");
        assert_eq!(held_spacing(10 * 60_000), Duration::from_secs(60));
        assert_eq!(held_spacing(2 * 3_600_000), HELD_AT_MOST);
        assert_eq!(held_spacing(-5), Duration::ZERO, "a clock stepped back");
    }

    #[test]
    fn r_m4_a_refused_mail_is_given_up_but_a_refused_login_waits_in_the_queue() {
        use self::client::Reply;
        let reply = |code| Reply { code, text: "5.7.8 no".into() };
        let refused = |e| classify(SendError::Client(e));
        assert!(matches!(refused(ClientError::Refused(reply(550))), Attempt::Permanent(_)));
        assert!(matches!(refused(ClientError::Refused(reply(451))), Attempt::Temporary(_)));
        // Wrong credentials or a server refusing sessions are the operator's to fix: no
        // mail is given up for them.
        assert!(matches!(refused(ClientError::Session(reply(535))), Attempt::Temporary(_)));
        assert!(matches!(refused(ClientError::SenderRefused(reply(553))), Attempt::Temporary(_)), "smtp.from's");
        // Nor for a relay that wants a login or TLS first (RFC 4954, RFC 3207): it answers
        // any command so, MAIL FROM too, and every mail used to be dead-lettered at once.
        for wants in ["5.7.0 Authentication required", "5.7.0 Must issue a STARTTLS command first"] {
            let refusal = ClientError::Refused(Reply { code: 530, text: wants.into() });
            assert!(matches!(refused(refusal), Attempt::Temporary(_)), "{wants}");
        }
    }

    /// R-N2's button cannot spam: 5 test mails a minute per line, whichever of its
    /// numbers sends them (per number, a line of N numbers sent 5N); another line has
    /// its own allowance.
    #[tokio::test]
    async fn send_tests_are_limited_per_line_so_the_button_cannot_spam() {
        let sink = SmtpSink::start(0).await.unwrap();
        let mailer = TestMailer::new(&smtp_to(sink.port())).unwrap();
        let number = |s| PhoneNumber::parse(s).unwrap();
        let (line, other_line) = (number("0312345678"), number("0398765432"));
        let to = DestinationAddress::parse("taro@example.jp").unwrap();
        let numbers = [number("0312345678"), number("0312345679"), number("0312345670")];
        for i in 0..TEST_MAILS_PER_MINUTE as usize {
            mailer.send(&line, &numbers[i % 3], &to, crate::render::MailService::Call).await.unwrap();
        }
        for n in &numbers {
            assert_eq!(
                mailer.send(&line, n, &to, crate::render::MailService::Fax).await.unwrap_err(),
                TestMailError::TooMany
            );
        }
        mailer
            .send(&other_line, &other_line, &to, crate::render::MailService::Call)
            .await
            .expect("another line has its own allowance");
        assert_eq!(sink.count(), TEST_MAILS_PER_MINUTE as usize + 1);
    }
}
