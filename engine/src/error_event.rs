//! Errors an operator must see: each is one [`ErrorEvent`], raised with
//! [`error_event!`](macro@crate::error_event), which logs it at ERROR and counts it in
//! `callnotify_errors_total{stage, error}` in one step (after Vector's internal events).
//! A leaf module: every stage may raise errors, the store included, without depending on
//! the metrics' labels of the others.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// An error an operator must see, as `callnotify_errors_total{stage, error}` labels it.
/// Raised with [`error_event!`](macro@crate::error_event), which logs it at ERROR and counts
/// it in one step: no error is logged without being counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorEvent {
    /// The store's file system has less room than `store.min_free_mb`.
    DiskLow,
    /// Before a revocation's commit, the store could not be flushed.
    RevokeFlush,
    /// A committed offset is out of the partition's range.
    OffsetOutOfRange,
    /// The broker refused a commit of CDR offsets (tried again at the next commit).
    OffsetCommit,
    /// A partition assigned to a CDR consumer or to the state owner was not read for
    /// 15 s (its committed offset not fetched: librdkafka issue 5586): assigned again.
    PartitionUnread,
    /// A mail could not be rendered from its call.
    Render,
    /// A received fax could not be kept for the site (the state owner did not answer,
    /// the store failed): its mails wait, and it is tried again.
    FaxKeep,
    /// A mail's sent record or retry-queue entry is not stored yet (tried again).
    DeliveryStore,
    /// The retry queue could not be read.
    RetryQueueRead,
    /// A retry-queue entry could not be read back: removed.
    RetryQueueUnreadable,
    /// A retry-queue entry cannot be sent as it is: removed.
    RetryQueueUnsendable,
    /// A retry-queue entry could not be rescheduled.
    RetryQueueReschedule,
    /// After a retried mail, the store could not be flushed.
    RetryQueueFlush,
    /// A sent mail's retry-queue entry could not be removed: it may be sent again.
    RetryQueueRemove,
    /// The retry-queue entries of partitions given up could not be set aside.
    RetryQueuePark,
    /// A dead-letter record is not written yet (its CDR stays uncommitted).
    DeadLetterWrite,
    /// The sent journal could not be written or emptied: the store is flushed instead.
    Journal,
    /// The store could not be flushed (tried again).
    StoreFlush,
    /// The operator endpoint stopped serving.
    OperatorEndpoint,
    /// An import over `POST /provision` failed.
    Provision,
    /// A request to the settings site failed (the store, a blocking task).
    SiteRequest,
    /// A request to the IVR API failed.
    IvrRequest,
    /// The settings site or the IVR API stopped serving.
    AdminListener,
    /// The state topic could not be read (tried again).
    StateRead,
    /// Records read from the state topic could not be applied to this node's store (its
    /// disk, usually; tried again every second).
    StateApply,
    /// The state owner could not publish a write to the state topic: the node stops,
    /// and rebuilds its store from the topic at its next start.
    StatePublish,
    /// Writes of subscriber state wait: the state owner has had its records unconfirmed
    /// for 10 s (a broker lost), or could not read the state topic (raised at once), or
    /// a node's write has waited 10 s for the owner's answer (no owner reads the
    /// requests); raised again every 10 s while it lasts.
    StateStalled,
    /// A state record written by an owner that another had replaced (a pause longer
    /// than its session) was ignored; the current owner writes the key again. When the
    /// record is this node's own, the node stops and rebuilds its store.
    StateFenced,
    /// A sent record or retry-queue change was not written to its partition's
    /// changelog: offsets are no longer committed.
    ChangelogWrite,
    /// A record of the state topic no version writes (its key or value unreadable) was
    /// passed over by a node's view.
    StateUnreadable,
    /// A retry entry larger than its changelog takes (a fax mail with a large PDF) was
    /// kept in its node's queue only: sent from there, lost with the node.
    ChangelogTooLarge,
    /// The partition changelogs have not confirmed their records within 10 s at a
    /// commit (a partition's leader lost): offsets are not committed this time (the CDRs
    /// stay uncommitted, nothing is lost); tried again at the next commit.
    ChangelogUnconfirmed,
    /// A newly assigned partition's changelogs could not be restored: it is not read
    /// until they are (tried again after 1 s, then at doubling intervals up to 30 s).
    ChangelogRestore,
    /// At the engine's stop, changelog records were still unconfirmed when the
    /// producer was closed (a changelog partition's leader lost then): the mails they
    /// record as sent may be sent again by the partition's next reader.
    ChangelogUnflushed,
}

impl ErrorEvent {
    pub const ALL: [ErrorEvent; 34] = [
        ErrorEvent::DiskLow,
        ErrorEvent::RevokeFlush,
        ErrorEvent::OffsetOutOfRange,
        ErrorEvent::OffsetCommit,
        ErrorEvent::PartitionUnread,
        ErrorEvent::Render,
        ErrorEvent::FaxKeep,
        ErrorEvent::DeliveryStore,
        ErrorEvent::RetryQueueRead,
        ErrorEvent::RetryQueueUnreadable,
        ErrorEvent::RetryQueueUnsendable,
        ErrorEvent::RetryQueueReschedule,
        ErrorEvent::RetryQueueFlush,
        ErrorEvent::RetryQueueRemove,
        ErrorEvent::RetryQueuePark,
        ErrorEvent::DeadLetterWrite,
        ErrorEvent::Journal,
        ErrorEvent::StoreFlush,
        ErrorEvent::OperatorEndpoint,
        ErrorEvent::Provision,
        ErrorEvent::SiteRequest,
        ErrorEvent::IvrRequest,
        ErrorEvent::AdminListener,
        ErrorEvent::StateRead,
        ErrorEvent::StateApply,
        ErrorEvent::StatePublish,
        ErrorEvent::StateStalled,
        ErrorEvent::StateFenced,
        ErrorEvent::ChangelogWrite,
        ErrorEvent::ChangelogTooLarge,
        ErrorEvent::StateUnreadable,
        ErrorEvent::ChangelogUnconfirmed,
        ErrorEvent::ChangelogRestore,
        ErrorEvent::ChangelogUnflushed,
    ];

    /// The `stage` label: the part of the engine it happened in.
    pub fn stage(self) -> &'static str {
        use ErrorEvent::*;
        match self {
            RevokeFlush | OffsetOutOfRange | OffsetCommit | PartitionUnread => "source",
            Render | FaxKeep => "pipeline",
            DeliveryStore => "deliver",
            RetryQueueRead | RetryQueueUnreadable | RetryQueueUnsendable | RetryQueueReschedule | RetryQueueFlush
            | RetryQueueRemove | RetryQueuePark => "retry_queue",
            DeadLetterWrite => "dead_letters",
            DiskLow | Journal | StoreFlush => "store",
            OperatorEndpoint | Provision => "operator",
            SiteRequest | AdminListener => "site",
            IvrRequest => "ivr",
            StateRead | StateApply | StatePublish | StateStalled | StateFenced | StateUnreadable | ChangelogWrite
            | ChangelogTooLarge | ChangelogUnconfirmed | ChangelogRestore | ChangelogUnflushed => "state",
        }
    }

    /// The `error` label.
    pub fn as_str(self) -> &'static str {
        use ErrorEvent::*;
        match self {
            DiskLow => "disk_low",
            RevokeFlush => "revoke_flush",
            OffsetOutOfRange => "offset_out_of_range",
            OffsetCommit => "offset_commit",
            PartitionUnread => "partition_unread",
            Render => "render",
            FaxKeep => "fax_keep",
            DeliveryStore => "store_write",
            RetryQueueRead => "read",
            RetryQueueUnreadable => "unreadable_entry",
            RetryQueueUnsendable => "unsendable_entry",
            RetryQueueReschedule => "reschedule",
            RetryQueueFlush => "store_flush",
            RetryQueueRemove => "remove",
            RetryQueuePark => "park",
            DeadLetterWrite => "write",
            Journal => "journal",
            StoreFlush => "flush",
            OperatorEndpoint => "listener",
            Provision => "provision",
            SiteRequest | IvrRequest => "request",
            AdminListener => "listener",
            StateRead => "read",
            StateApply => "apply",
            StatePublish => "publish",
            StateStalled => "stalled",
            StateFenced => "fenced",
            StateUnreadable => "unreadable_record",
            ChangelogWrite => "changelog_write",
            ChangelogTooLarge => "changelog_too_large",
            ChangelogUnconfirmed => "changelog_unconfirmed",
            ChangelogRestore => "changelog_restore",
            ChangelogUnflushed => "changelog_unflushed",
        }
    }
}

/// Logs an [`ErrorEvent`] at ERROR with its `stage` and `error` labels and the given
/// fields and message (as `tracing::error!` takes them), and counts it in
/// `callnotify_errors_total`: the one way the engine reports an error.
///
/// `$metrics` is anything that [`CountErrors`]: the engine's `Metrics`, or an
/// [`ErrorCounter`] where the metrics come later than the part that reports.
#[macro_export]
macro_rules! error_event {
    ($metrics:expr, $event:expr, $($rest:tt)+) => {{
        let event: $crate::error_event::ErrorEvent = $event;
        $crate::error_event::CountErrors::count_error(&$metrics, event);
        ::tracing::error!(stage = event.stage(), error_kind = event.as_str(), $($rest)+);
    }};
}

/// Where errors are counted: the engine's metrics implement it.
pub trait CountErrors: Send + Sync {
    fn count_error(&self, event: ErrorEvent);
}

/// The counter to count errors in, for a part built before it (the store): errors
/// before [`ErrorCounter::set`] are logged only.
#[derive(Clone, Default)]
pub struct ErrorCounter(Arc<OnceLock<Arc<dyn CountErrors>>>);

impl ErrorCounter {
    pub fn set(&self, counter: impl CountErrors + 'static) {
        let _ = self.0.set(Arc::new(counter));
    }
}

impl CountErrors for ErrorCounter {
    fn count_error(&self, event: ErrorEvent) {
        if let Some(counter) = self.0.get() {
            counter.count_error(event);
        }
    }
}

/// When a wait that lasts is raised: at its first sight, then at most once a period,
/// so that a wait shorter than the period is counted too and a long one is not counted
/// once per look.
pub(crate) struct RaiseEvery {
    period: Duration,
    last: Option<Instant>,
}

impl RaiseEvery {
    pub(crate) const fn new(period: Duration) -> Self {
        Self { period, last: None }
    }

    /// Whether the wait seen at `now` is raised (and counts as raised from then on).
    pub(crate) fn due(&mut self, now: Instant) -> bool {
        if self.last.is_some_and(|at| now.saturating_duration_since(at) < self.period) {
            return false;
        }
        self.last = Some(now);
        true
    }

    /// The wait is over: the next one is raised at its first sight.
    pub(crate) fn reset(&mut self) {
        self.last = None;
    }
}
