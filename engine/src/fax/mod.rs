//! FAXお知らせメール (R-F1): received faxes from Kafka, notified by mail and kept for
//! the settings site.

pub mod document;

/// The largest record the engine writes (librdkafka's `message.max.bytes` of the
/// producers that may carry a fax: the state owner's and requests', the dead letters'):
/// 32 MiB, room for a fax record of up to 16 MiB and its document in base64 once more.
/// The topics they write need `max.message.bytes` at least as large for faxes that big
/// (README, "Fax records").
pub const MESSAGE_MAX_BYTES: &str = "33554432";

use std::time::Duration;

use crate::store::Store;

/// Every hour, has the faxes received more than `retention_days` ago forgotten
/// (`store.fax_retention_days`): on every node, so the expiry does not wait for any one
/// of them; the state owner carries out each request, and a second finds nothing left.
pub async fn expire_hourly(store: Store, retention_days: u64, stop: tokio_util::sync::CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let before = chrono::Utc::now() - chrono::TimeDelta::days(retention_days as i64);
        let store = store.clone();
        let expired = tokio::select! {
            () = stop.cancelled() => return,
            expired = tokio::task::spawn_blocking(move || store.expire_faxes(before)) => expired,
        };
        match expired {
            Ok(Ok(())) => tracing::debug!(retention_days, "faxes past their retention removed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "removing old faxes failed; will try again in an hour"),
            Err(e) => tracing::warn!(error = %e, "removing old faxes failed; will try again in an hour"),
        }
    }
}
