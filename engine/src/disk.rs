//! Room on the store's file system. A mail server defers mail when its queue's disk runs
//! low (postfix's `queue_minfree`); the engine does the same: below `store.min_free_mb`
//! free its consumers stop reading CDRs, so the room left goes to the sent records and
//! retry-queue entries of the mails already on their way, and sled never meets a full
//! disk (an I/O error there poisons the open database until a restart). Everything else
//! stays up: the site, the IVR, `/metrics` and `/readyz`, which says why. Once there is
//! room again the consumers read on by themselves.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error_event::ErrorEvent;
use crate::telemetry::Metrics;

/// How often the free space is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Whether the store's file system has room for more CDRs; cheap to clone and ask.
#[derive(Clone)]
pub struct DiskWatch {
    inner: Arc<Inner>,
}

struct Inner {
    /// A directory on the watched file system (the store's).
    path: PathBuf,
    /// `store.min_free_mb` in bytes; 0 turns the watch off.
    min_free: u64,
    /// Below `min_free` at the last look: the consumers pause while it is set.
    low: AtomicBool,
    /// What `/readyz` says while `low` (or while the space cannot be read).
    reason: Mutex<Option<String>>,
    metrics: Metrics,
}

impl DiskWatch {
    /// Watches the file system holding `path`, which must exist.
    pub fn new(path: &Path, min_free_mb: u64, metrics: Metrics) -> Self {
        let inner = Inner {
            path: path.to_owned(),
            min_free: min_free_mb << 20,
            low: AtomicBool::new(false),
            reason: Mutex::new(None),
            metrics,
        };
        Self { inner: Arc::new(inner) }
    }

    /// Looks at the free space now, updates the state and the metrics, and logs a
    /// change. A file system whose space cannot be read counts as low: reading on
    /// without knowing is what this guards against.
    pub fn check(&self) {
        let inner = &*self.inner;
        if inner.min_free == 0 {
            return;
        }
        let (low, reason) = match fs2::available_space(&inner.path) {
            Ok(free) => {
                inner.metrics.store_free_bytes(free);
                let low = free < inner.min_free;
                let reason = low.then(|| {
                    format!(
                        "{} MiB free on the file system of {}, below store.min_free_mb ({} MiB): CDRs are \
                         not read until there is room",
                        free >> 20,
                        inner.path.display(),
                        inner.min_free >> 20
                    )
                });
                (low, reason)
            }
            Err(e) => (true, Some(format!("the free space of {} cannot be read: {e}", inner.path.display()))),
        };
        let was = inner.low.swap(low, Ordering::AcqRel);
        inner.metrics.store_disk_low(low);
        match (&reason, was) {
            (Some(why), false) => {
                crate::error_event!(inner.metrics, ErrorEvent::DiskLow, reason = %why, "consumers pause: the store's disk is low")
            }
            (None, true) => tracing::info!("the store's disk has room again: consumers read on"),
            _ => {}
        }
        *inner.reason.lock().expect("reason lock") = reason;
    }

    /// Whether the consumers are to stay paused.
    pub fn is_low(&self) -> bool {
        self.inner.low.load(Ordering::Acquire)
    }

    /// Why the consumers are paused, if they are: what is wrong with the store's disk.
    pub fn reason(&self) -> Option<String> {
        self.inner.reason.lock().expect("reason lock").clone()
    }

    /// Checks every [`CHECK_EVERY`] until `stop` is cancelled.
    pub async fn run(self, stop: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let me = self.clone();
            // statvfs is a system call on a possibly slow file system.
            let _ = tokio::task::spawn_blocking(move || me.check()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_system_with_less_room_than_asked_is_low_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let free_mb = fs2::available_space(dir.path()).unwrap() >> 20;

        let roomy = DiskWatch::new(dir.path(), 1, Metrics::new());
        roomy.check();
        assert!(!roomy.is_low() && roomy.reason().is_none());

        let metrics = Metrics::new();
        let tight = DiskWatch::new(dir.path(), free_mb + 1024, metrics.clone());
        tight.check();
        assert!(tight.is_low());
        let why = tight.reason().unwrap();
        assert!(why.contains("below store.min_free_mb") && why.contains(&dir.path().display().to_string()), "{why}");
        assert_eq!(metrics.value("callnotify_store_disk_low"), Some(1.0));

        let off = DiskWatch::new(dir.path(), 0, Metrics::new());
        off.check();
        assert!(!off.is_low());
    }
}
