//! Metrics: one place that names every metric (served by [`crate::ops`]).
//!
//! Each engine owns its recorder (not the process-global one), so several engines in one
//! test process never mix their numbers. Handles are registered once at start-up; the
//! hot path only bumps atomics. Names follow `callnotify_<noun>_<unit>_total` with
//! low-cardinality labels.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

use crate::decode::Rejection;
use crate::error_event::{CountErrors, ErrorEvent};
use crate::filter::Skip;

pub const CDRS_CONSUMED: &str = "callnotify_cdrs_consumed_total";
pub const CDRS_DECODED: &str = "callnotify_cdrs_decoded_total";
pub const CDRS_REJECTED: &str = "callnotify_cdrs_rejected_total";
pub const CDRS_FILTERED: &str = "callnotify_cdrs_filtered_total";
pub const CDRS_NOTIFIED: &str = "callnotify_cdrs_notified_total";
pub const FAXES_KEPT: &str = "callnotify_faxes_kept_total";
pub const MAILS_SENT: &str = "callnotify_mails_sent_total";
pub const MAILS_FAILED: &str = "callnotify_mails_failed_total";
pub const MAILS_DELAYED: &str = "callnotify_mails_delayed_total";
pub const MAILS_RETRIED: &str = "callnotify_mails_retried_total";
pub const MAILS_WITHDRAWN: &str = "callnotify_mails_withdrawn_total";
pub const MAILS_DUPLICATE: &str = "callnotify_mails_duplicate_total";
pub const DEAD_LETTERS: &str = "callnotify_dead_letters_total";
pub const DEAD_LETTER_WRITE_ERRORS: &str = "callnotify_dead_letter_write_errors_total";
pub const LATENCY: &str = "callnotify_notification_latency_seconds";
pub const IN_FLIGHT: &str = "callnotify_cdrs_in_flight";
pub const CONSUMER_LAG: &str = "callnotify_consumer_lag_messages";
pub const CONSUMER_PARTITIONS: &str = "callnotify_consumer_partitions";
pub const CONSUMER_PAUSED: &str = "callnotify_consumer_paused";
pub const OFFSETS_SKIPPED: &str = "callnotify_offsets_skipped_total";
pub const RETRY_QUEUE: &str = "callnotify_retry_queue_mails";
pub const SMTP_CONNECTIONS: &str = "callnotify_smtp_connections_opened_total";
pub const SMTP_CIRCUIT_OPEN: &str = "callnotify_smtp_circuit_open";
pub const STORE_FREE: &str = "callnotify_store_free_bytes";
pub const STORE_DISK_LOW: &str = "callnotify_store_disk_low";
pub const STATE_OWNER: &str = "callnotify_state_owner";
pub const STARTING: &str = "callnotify_starting";
pub const STATE_APPLIED: &str = "callnotify_state_applied_offset";
pub const ERRORS: &str = "callnotify_errors_total";
pub const SITE_LOGINS: &str = "callnotify_site_logins_total";
pub const SITE_LOCKOUTS: &str = "callnotify_site_lockouts_total";
pub const SETTINGS_SAVED: &str = "callnotify_settings_saved_total";
pub const TEST_MAILS: &str = "callnotify_test_mails_total";
pub const IVR_CALLS: &str = "callnotify_ivr_calls_total";
pub const TEMPORARY_PASSWORDS: &str = "callnotify_temporary_passwords_total";
pub const CONNECTIONS_REFUSED: &str = "callnotify_connections_refused_total";

/// An enum of metric label values with `ALL` and `as_str`.
macro_rules! labels {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }

            fn index(self) -> usize {
                Self::ALL.iter().position(|v| *v == self).expect("every value is in ALL")
            }
        }
    };
}

labels! {
    /// How a login on the settings site ended (`callnotify_site_logins_total{result}`).
    Login {
        Ok => "ok",
        /// A wrong password (R-S2, R-S3 count it).
        Wrong => "wrong",
        /// No credential for the number.
        Unknown => "unknown",
        /// The credential is invalidated by wrong passwords.
        Locked => "locked",
        /// A temporary password past its 24 hours (R-I8).
        Expired => "expired",
        /// Not a phone number.
        Malformed => "malformed",
        /// Not checked: too many wrong logins from the client's address.
        Throttled => "throttled",
    }
}

labels! {
    /// Which rule locked a credential (`callnotify_site_lockouts_total{rule}`).
    Lockout {
        /// R-S2: 3 wrong entries of a temporary password.
        TemporaryPassword => "r_s2_temporary_password",
        /// R-S3: 10 wrong entries of a password.
        Password => "r_s3_password",
    }
}

labels! {
    /// What became of a 送信テスト (`callnotify_test_mails_total{result}`).
    TestMail {
        Sent => "sent",
        /// The server refused it, or could not take it now.
        Failed => "failed",
        /// Past the per-line limit of test mails a minute.
        Limited => "limited",
    }
}

labels! {
    /// How a call to the temporary-password line ended (`callnotify_ivr_calls_total{outcome}`).
    IvrCall {
        /// A temporary password was set (R-I7).
        Done => "done",
        /// Ended after too many invalid entries (R-I6).
        InvalidEntries => "invalid_entries",
        /// Ended because the number to set left the caller's line during the call (R-M3).
        NumberLeft => "number_left",
        /// No caller ID, or not a number of a provisioned line (R-I1).
        Refused => "refused",
        /// Too many calls open from the caller.
        Busy => "busy",
        /// Hung up or idle past the timeout before the end.
        Abandoned => "abandoned",
    }
}

labels! {
    /// Which of a listener's limits closed a connection at once
    /// (`callnotify_connections_refused_total{limit}`, [`crate::http::Limits`]).
    ConnectionLimit {
        /// The listener holds its most connections.
        ListenerFull => "listener_full",
        /// The client's address (a proxy's, behind one) holds its most.
        PerClient => "per_client",
    }
}

/// The listeners whose refusals are counted (`callnotify_connections_refused_total{listener}`).
pub const LISTENERS: [&str; 3] = ["admin.listen", "admin.ivr_listen", "metrics.listen"];

/// The value of one series in Prometheus text (what `/metrics` serves), e.g.
/// `callnotify_cdrs_filtered_total{reason="stopped"}`; `None` if it is not there.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

labels! {
    /// Why a mail failed for good, as `callnotify_mails_failed_total` labels it.
    Failure {
        /// The server refused it (5xx), or it can never be sent as it is.
        Permanent => "permanent",
        /// It could not be rendered into a message.
        Render => "render",
        /// Still failing temporarily at `smtp.retry_give_up_secs`.
        Expired => "expired",
        /// Its retry-queue entry could not be read back (a damaged or foreign entry).
        Unreadable => "unreadable",
    }
}

/// Every metric handle of one engine; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    consumed: Counter,
    decoded: Counter,
    rejected: [Counter; Rejection::ALL.len()],
    filtered: [Counter; Skip::ALL.len()],
    notified: Counter,
    faxes_kept: Counter,
    sent: Counter,
    failed: Vec<Counter>,
    delayed_rate: Counter,
    delayed_flood: Counter,
    retried: Counter,
    withdrawn: Counter,
    duplicate: Counter,
    dead_letters_cdr: Counter,
    dead_letters_mail: Counter,
    dead_letter_errors_cdr: Counter,
    dead_letter_errors_mail: Counter,
    latency: Histogram,
    offsets_skipped: Counter,
    smtp_connections: Counter,
    in_flight: Gauge,
    /// What `in_flight` shows, read when the metrics are rendered: the consumer threads
    /// change it from several threads at once, so a value set after each change could
    /// be overtaken by an older one.
    in_flight_count: OnceLock<Arc<AtomicUsize>>,
    retry_queue: Gauge,
    smtp_circuit_open: Gauge,
    store_free: Gauge,
    store_disk_low: Gauge,
    state_owner: Gauge,
    starting: Gauge,
    state_applied: Gauge,
    errors: [Counter; ErrorEvent::ALL.len()],
    logins: Vec<Counter>,
    lockouts: Vec<Counter>,
    test_mails: Vec<Counter>,
    ivr_calls: Vec<Counter>,
    settings_saved: Counter,
    temporary_passwords: Counter,
    /// By listener ([`LISTENERS`]), then limit.
    connections_refused: Vec<Counter>,
    /// Partitions per consumer thread, as last assigned: what `/readyz` sums.
    assigned: std::sync::Mutex<Vec<usize>>,
    /// What `smtp_circuit_open` shows, readable for `/readyz`.
    circuit_open: std::sync::atomic::AtomicBool,
}

const METADATA: Metadata<'static> = Metadata::new("callnotify", Level::INFO, None);

fn counter(r: &PrometheusRecorder, name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
    let key = Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, *v)).collect::<Vec<_>>());
    r.register_counter(&key, &METADATA)
}

impl Metrics {
    /// A fresh recorder with every metric registered and described.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(LATENCY.into()),
                &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
            )
            .expect("buckets are not empty")
            .build_recorder();
        let r = &recorder;
        let describe = |name: &'static str, unit: Option<Unit>, text: &'static str| {
            r.describe_counter(name.into(), unit, SharedString::const_str(text));
        };
        describe(CDRS_CONSUMED, Some(Unit::Count), "CDR messages read from Kafka");
        describe(CDRS_DECODED, Some(Unit::Count), "CDRs decoded into a call");
        describe(
            CDRS_REJECTED,
            Some(Unit::Count),
            "CDRs that did not decode, by reason (sent to the dead-letter topic)",
        );
        describe(CDRS_FILTERED, Some(Unit::Count), "Calls that send no mail, by reason");
        describe(
            CDRS_NOTIFIED,
            Some(Unit::Count),
            "Calls whose settings call for mails, as read (a CDR read again counts again; its mails are not sent twice)",
        );
        describe(
            FAXES_KEPT,
            Some(Unit::Count),
            "Received faxes kept for the site by this node (R-F1; a fax read again is not counted again)",
        );
        describe(
            OFFSETS_SKIPPED,
            Some(Unit::Count),
            "Offsets the broker passed over between CDRs read from one partition (transaction markers, compaction, or lost CDRs)",
        );
        describe(MAILS_SENT, Some(Unit::Count), "Mails accepted by the mail server (or written to the outbox)");
        describe(
            MAILS_FAILED,
            Some(Unit::Count),
            "Mails that failed for good, by reason (permanent and expired ones go to the dead-letter topic)",
        );
        describe(
            MAILS_DELAYED,
            Some(Unit::Count),
            "Mails held back by rate limits, by limit (global rate or per-recipient flood)",
        );
        describe(
            MAILS_RETRIED,
            Some(Unit::Count),
            "Mails put (back) into the retry queue: temporary failures, or unsent at shutdown or revocation",
        );
        describe(
            MAILS_WITHDRAWN,
            Some(Unit::Count),
            "Queued mails not sent: the subscriber stopped the service, unchecked or removed the address, or the number left its line meanwhile",
        );
        describe(
            MAILS_DUPLICATE,
            Some(Unit::Count),
            "Mails not sent again because a replayed CDR had already sent them",
        );
        describe(DEAD_LETTERS, Some(Unit::Count), "Records written to the dead-letter topic, by kind");
        describe(ERRORS, Some(Unit::Count), "Errors logged at ERROR, by the stage they happened in and what failed");
        describe(SITE_LOGINS, Some(Unit::Count), "Logins on the settings site, by result");
        describe(
            SITE_LOCKOUTS,
            Some(Unit::Count),
            "Credentials locked by consecutive wrong passwords, by rule (R-S2, R-S3)",
        );
        describe(SETTINGS_SAVED, Some(Unit::Count), "Settings saved on the site (the call and the fax pages)");
        describe(TEST_MAILS, Some(Unit::Count), "Test mails (送信テスト) asked for on the site, by result");
        describe(IVR_CALLS, Some(Unit::Count), "Calls to the temporary-password line, by how they ended");
        describe(TEMPORARY_PASSWORDS, Some(Unit::Count), "Temporary passwords set by phone (R-I7)");
        describe(
            CONNECTIONS_REFUSED,
            Some(Unit::Count),
            "Connections the site's, the IVR API's and the operator endpoint's listeners closed at once, by listener and the limit reached",
        );
        describe(
            DEAD_LETTER_WRITE_ERRORS,
            Some(Unit::Count),
            "Dead-letter writes the broker did not confirm in time, by kind (each is tried again; its CDR waits)",
        );
        describe(
            SMTP_CONNECTIONS,
            Some(Unit::Count),
            "SMTP sessions opened to the mail server (connected, greeted, TLS and AUTH done)",
        );
        r.describe_histogram(
            LATENCY.into(),
            Some(Unit::Seconds),
            "From the call's end to the mail server's acceptance".into(),
        );
        r.describe_gauge(IN_FLIGHT.into(), Some(Unit::Count), "CDRs whose mails are being sent".into());
        r.describe_gauge(
            RETRY_QUEUE.into(),
            Some(Unit::Count),
            "Mails in the durable retry queue, waiting for their next attempt".into(),
        );
        r.describe_gauge(
            SMTP_CIRCUIT_OPEN.into(),
            None,
            "1 while the mail server is not answering and new mails go straight to the retry queue (circuit breaker)"
                .into(),
        );
        r.describe_gauge(
            CONSUMER_LAG.into(),
            Some(Unit::Count),
            "Messages behind the partition's end, by topic and partition".into(),
        );
        r.describe_gauge(
            CONSUMER_PARTITIONS.into(),
            Some(Unit::Count),
            "Partitions assigned to each consumer thread (engine.consumers)".into(),
        );
        r.describe_gauge(STORE_FREE.into(), Some(Unit::Bytes), "Bytes free on the store's file system".into());
        r.describe_gauge(
            STORE_DISK_LOW.into(),
            None,
            "1 while the store's file system has less than store.min_free_mb free and no CDR is read".into(),
        );
        r.describe_gauge(
            STATE_OWNER.into(),
            None,
            "1 while this node carries out the writes of subscriber state (the state owner)".into(),
        );
        r.describe_gauge(
            STARTING.into(),
            None,
            "1 while this node starts: its operator endpoint answers, it catches up with the subscriber state \
             and reads no CDR yet"
                .into(),
        );
        r.describe_gauge(
            STATE_APPLIED.into(),
            Some(Unit::Count),
            "Next offset of the state topic this node's store has not applied".into(),
        );
        r.describe_gauge(
            CONSUMER_PAUSED.into(),
            None,
            "1 while a consumer thread has paused its partitions for mails to drain (backpressure)".into(),
        );

        let inner = Inner {
            consumed: counter(r, CDRS_CONSUMED, &[]),
            decoded: counter(r, CDRS_DECODED, &[]),
            rejected: Rejection::ALL.map(|reason| counter(r, CDRS_REJECTED, &[("reason", reason.as_str())])),
            filtered: Skip::ALL.map(|skip| counter(r, CDRS_FILTERED, &[("reason", skip.as_str())])),
            notified: counter(r, CDRS_NOTIFIED, &[]),
            faxes_kept: counter(r, FAXES_KEPT, &[]),
            sent: counter(r, MAILS_SENT, &[]),
            failed: Failure::ALL.iter().map(|v| counter(r, MAILS_FAILED, &[("reason", v.as_str())])).collect(),
            delayed_rate: counter(r, MAILS_DELAYED, &[("limit", "rate")]),
            delayed_flood: counter(r, MAILS_DELAYED, &[("limit", "flood")]),
            retried: counter(r, MAILS_RETRIED, &[]),
            withdrawn: counter(r, MAILS_WITHDRAWN, &[]),
            duplicate: counter(r, MAILS_DUPLICATE, &[]),
            dead_letters_cdr: counter(r, DEAD_LETTERS, &[("kind", "cdr")]),
            dead_letters_mail: counter(r, DEAD_LETTERS, &[("kind", "mail")]),
            dead_letter_errors_cdr: counter(r, DEAD_LETTER_WRITE_ERRORS, &[("kind", "cdr")]),
            dead_letter_errors_mail: counter(r, DEAD_LETTER_WRITE_ERRORS, &[("kind", "mail")]),
            latency: r.register_histogram(&Key::from_static_name(LATENCY), &METADATA),
            offsets_skipped: counter(r, OFFSETS_SKIPPED, &[]),
            smtp_connections: counter(r, SMTP_CONNECTIONS, &[]),
            in_flight: r.register_gauge(&Key::from_static_name(IN_FLIGHT), &METADATA),
            in_flight_count: OnceLock::new(),
            retry_queue: r.register_gauge(&Key::from_static_name(RETRY_QUEUE), &METADATA),
            smtp_circuit_open: r.register_gauge(&Key::from_static_name(SMTP_CIRCUIT_OPEN), &METADATA),
            store_free: r.register_gauge(&Key::from_static_name(STORE_FREE), &METADATA),
            store_disk_low: r.register_gauge(&Key::from_static_name(STORE_DISK_LOW), &METADATA),
            state_owner: r.register_gauge(&Key::from_static_name(STATE_OWNER), &METADATA),
            starting: r.register_gauge(&Key::from_static_name(STARTING), &METADATA),
            state_applied: r.register_gauge(&Key::from_static_name(STATE_APPLIED), &METADATA),
            errors: ErrorEvent::ALL.map(|e| counter(r, ERRORS, &[("stage", e.stage()), ("error", e.as_str())])),
            logins: Login::ALL.iter().map(|v| counter(r, SITE_LOGINS, &[("result", v.as_str())])).collect(),
            lockouts: Lockout::ALL.iter().map(|v| counter(r, SITE_LOCKOUTS, &[("rule", v.as_str())])).collect(),
            test_mails: TestMail::ALL.iter().map(|v| counter(r, TEST_MAILS, &[("result", v.as_str())])).collect(),
            ivr_calls: IvrCall::ALL.iter().map(|v| counter(r, IVR_CALLS, &[("outcome", v.as_str())])).collect(),
            settings_saved: counter(r, SETTINGS_SAVED, &[]),
            temporary_passwords: counter(r, TEMPORARY_PASSWORDS, &[]),
            connections_refused: LISTENERS
                .iter()
                .flat_map(|listener| {
                    ConnectionLimit::ALL.iter().map(|limit| {
                        counter(r, CONNECTIONS_REFUSED, &[("listener", listener), ("limit", limit.as_str())])
                    })
                })
                .collect(),
            assigned: Default::default(),
            circuit_open: Default::default(),
            recorder,
        };
        Self { inner: Arc::new(inner) }
    }

    /// The value of one series as [`Metrics::render`] shows it (see [`series_value`]).
    pub fn value(&self, series: &str) -> Option<f64> {
        series_value(&self.render(), series)
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        if let Some(count) = self.inner.in_flight_count.get() {
            self.inner.in_flight.set(count.load(Ordering::Relaxed) as f64);
        }
        self.inner.recorder.handle().render()
    }

    pub fn consumed(&self) {
        self.inner.consumed.increment(1);
    }
    pub fn decoded(&self) {
        self.inner.decoded.increment(1);
    }
    pub fn rejected(&self, reason: Rejection) {
        let i = Rejection::ALL.iter().position(|r| *r == reason).expect("every Rejection is in ALL");
        self.inner.rejected[i].increment(1);
    }
    pub fn filtered(&self, skip: Skip) {
        let i = Skip::ALL.iter().position(|s| *s == skip).expect("every Skip is in ALL");
        self.inner.filtered[i].increment(1);
    }
    pub fn notified(&self) {
        self.inner.notified.increment(1);
    }
    pub fn fax_kept(&self) {
        self.inner.faxes_kept.increment(1);
    }
    pub fn sent(&self, latency: Duration) {
        self.inner.sent.increment(1);
        self.inner.latency.record(latency.as_secs_f64());
    }
    pub fn failed(&self, reason: Failure) {
        self.inner.failed[reason.index()].increment(1);
    }
    pub fn delayed_by_rate(&self) {
        self.inner.delayed_rate.increment(1);
    }
    pub fn delayed_by_flood(&self) {
        self.inner.delayed_flood.increment(1);
    }
    pub fn retried(&self) {
        self.inner.retried.increment(1);
    }
    pub fn withdrawn(&self) {
        self.inner.withdrawn.increment(1);
    }
    pub fn duplicate(&self) {
        self.inner.duplicate.increment(1);
    }
    pub fn dead_letter(&self, mail: bool) {
        if mail { &self.inner.dead_letters_mail } else { &self.inner.dead_letters_cdr }.increment(1);
    }
    pub fn dead_letter_write_failed(&self, mail: bool) {
        if mail { &self.inner.dead_letter_errors_mail } else { &self.inner.dead_letter_errors_cdr }.increment(1);
    }
    /// `callnotify_cdrs_in_flight` shows `count` from now on (the consumer threads'
    /// shared total; set once per engine).
    pub fn count_in_flight(&self, count: Arc<AtomicUsize>) {
        let _ = self.inner.in_flight_count.set(count);
    }
    pub fn retry_queue(&self, n: usize) {
        self.inner.retry_queue.set(n as f64);
    }
    /// Counts entries in or out as they happen, so concurrent sends cannot leave a
    /// stale length behind (as setting the length read after each change could).
    pub fn retry_queue_changed(&self, by: i64) {
        self.inner.retry_queue.increment(by as f64);
    }
    /// From librdkafka's statistics, every few seconds per partition.
    pub fn consumer_lag(&self, topic: &str, partition: i32, lag: i64) {
        let key = Key::from_parts(
            CONSUMER_LAG,
            vec![Label::new("topic", topic.to_owned()), Label::new("partition", partition.to_string())],
        );
        self.inner.recorder.register_gauge(&key, &METADATA).set(lag as f64);
    }
    /// After each rebalance, the partitions consumer thread `consumer` now holds.
    pub fn consumer_partitions(&self, consumer: usize, partitions: usize) {
        let key = Key::from_parts(CONSUMER_PARTITIONS, vec![Label::new("consumer", consumer.to_string())]);
        self.inner.recorder.register_gauge(&key, &METADATA).set(partitions as f64);
        let mut assigned = self.inner.assigned.lock().expect("assigned lock");
        if assigned.len() <= consumer {
            assigned.resize(consumer + 1, 0);
        }
        assigned[consumer] = partitions;
    }

    pub fn login(&self, result: Login) {
        self.inner.logins[result.index()].increment(1);
    }
    pub fn lockout(&self, rule: Lockout) {
        self.inner.lockouts[rule.index()].increment(1);
    }
    pub fn test_mail(&self, result: TestMail) {
        self.inner.test_mails[result.index()].increment(1);
    }
    pub fn ivr_call(&self, outcome: IvrCall) {
        self.inner.ivr_calls[outcome.index()].increment(1);
    }
    pub fn settings_saved(&self) {
        self.inner.settings_saved.increment(1);
    }
    pub fn temporary_password_set(&self) {
        self.inner.temporary_passwords.increment(1);
    }
    /// A connection `listener` (one of [`LISTENERS`]; another is not counted) closed at
    /// once, at `limit`.
    pub fn connection_refused(&self, listener: &str, limit: ConnectionLimit) {
        if let Some(at) = LISTENERS.iter().position(|l| *l == listener) {
            self.inner.connections_refused[at * ConnectionLimit::ALL.len() + limit.index()].increment(1);
        }
    }

    /// Partitions assigned to the consumer threads of this engine, in all (`/readyz`).
    pub fn partitions_assigned(&self) -> usize {
        self.inner.assigned.lock().expect("assigned lock").iter().sum()
    }

    /// Whether the mail server's circuit breaker is open (`/readyz`).
    pub fn smtp_circuit_is_open(&self) -> bool {
        self.inner.circuit_open.load(Ordering::Relaxed)
    }
    /// Offsets a broker passed over between two CDRs read from one partition.
    pub fn offsets_skipped(&self, n: u64) {
        self.inner.offsets_skipped.increment(n);
    }
    /// The mail server's circuit breaker opened (the server is not answering) or closed.
    pub fn store_free_bytes(&self, free: u64) {
        self.inner.store_free.set(free as f64);
    }
    /// This node became the state owner (`true`) or stopped being it.
    pub fn state_owner(&self, owner: bool) {
        self.inner.state_owner.set(if owner { 1.0 } else { 0.0 });
    }
    /// The node starts (catching up with the subscriber state) until `false`.
    pub fn starting(&self, starting: bool) {
        self.inner.starting.set(if starting { 1.0 } else { 0.0 });
    }
    /// The store has applied the state topic up to (not including) `next`.
    pub fn state_applied(&self, next: i64) {
        self.inner.state_applied.set(next as f64);
    }
    pub fn store_disk_low(&self, low: bool) {
        self.inner.store_disk_low.set(if low { 1.0 } else { 0.0 });
    }
    pub fn smtp_circuit_open(&self, open: bool) {
        self.inner.smtp_circuit_open.set(if open { 1.0 } else { 0.0 });
        self.inner.circuit_open.store(open, Ordering::Relaxed);
    }
    pub fn smtp_connection_opened(&self) {
        self.inner.smtp_connections.increment(1);
    }
    /// Backpressure: `consumer` paused its partitions (engine.max_in_flight reached and
    /// nothing finishing), or resumed them.
    pub fn consumer_paused(&self, consumer: usize, paused: bool) {
        let key = Key::from_parts(CONSUMER_PAUSED, vec![Label::new("consumer", consumer.to_string())]);
        self.inner.recorder.register_gauge(&key, &METADATA).set(if paused { 1.0 } else { 0.0 });
    }
}

impl CountErrors for Metrics {
    fn count_error(&self, event: ErrorEvent) {
        let i = ErrorEvent::ALL.iter().position(|e| *e == event).expect("every ErrorEvent is in ALL");
        self.inner.errors[i].increment(1);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every error has its own series from the start (an alert on it needs no first
    /// occurrence), and raising it counts it there.
    #[test]
    fn every_error_event_has_its_own_series_at_zero_and_raising_one_counts_it() {
        let metrics = Metrics::new();
        let series = |e: ErrorEvent| format!("{ERRORS}{{stage=\"{}\",error=\"{}\"}}", e.stage(), e.as_str());
        let names: std::collections::HashSet<String> = ErrorEvent::ALL.iter().map(|e| series(*e)).collect();
        assert_eq!(names.len(), ErrorEvent::ALL.len(), "two events share a series");
        assert!(ErrorEvent::ALL.iter().all(|e| metrics.value(&series(*e)) == Some(0.0)));

        crate::error_event!(metrics, ErrorEvent::Journal, path = "/x", "sent journal not written");
        assert_eq!(metrics.value(&series(ErrorEvent::Journal)), Some(1.0));
        assert_eq!(metrics.value(&series(ErrorEvent::StoreFlush)), Some(0.0));

        // The store reports before the metrics exist: logged only, then counted.
        let counter = crate::error_event::ErrorCounter::default();
        crate::error_event!(counter, ErrorEvent::StoreFlush, "store flush failed");
        counter.set(metrics.clone());
        crate::error_event!(counter, ErrorEvent::StoreFlush, "store flush failed");
        assert_eq!(metrics.value(&series(ErrorEvent::StoreFlush)), Some(1.0));
    }
}
