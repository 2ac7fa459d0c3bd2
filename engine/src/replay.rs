//! `callnotify dead-letters replay`: the CDRs of dead letters back into their topics
//! ([`dead_letter::review`]) and the mails back into the retry queue, each record once.
//!
//! A mail record holds the mail as a retry-queue entry: it is queued again due now, as
//! a fresh first attempt (its give-up age starts again), with its Message-ID, and sent
//! by the next `serve` on this store, whichever CDR partitions it reads. The store is
//! the engine's, so mails are replayed with `serve` stopped; CDRs need only the cluster.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::dead_letter::review::{self, Filter, Letter, ReviewError};
use crate::deliver::queue::{EntryError, Queued, RetryQueue};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Review(#[from] ReviewError),
    #[error("dead letter {partition}/{offset} does not hold a mail to send again: {source}")]
    Entry { partition: i32, offset: i64, source: EntryError },
    #[error("queuing the mails: {0}")]
    Store(#[from] StoreError),
    #[error("opening the store for the mails: {0}")]
    Open(Box<dyn std::error::Error + Send + Sync>),
}

/// What a replay did (with `dry_run`: would do).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    pub cdrs: Vec<(i32, i64)>,
    pub mails: Vec<(i32, i64)>,
    /// Records replayed before: left alone.
    pub already: usize,
}

/// Replays the records of `topic` that `filter` lets through; `open_store` is called
/// only if there are mails to queue.
pub fn replay<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    filter: &Filter,
    dry_run: bool,
    open_store: impl FnOnce() -> Result<Store, E>,
) -> Result<Replayed, ReplayError> {
    let done = review::replay(brokers, properties, topic, filter, dry_run)?;
    let mut replayed = Replayed { cdrs: done.replayed, mails: Vec::new(), already: done.already };
    let entries: Vec<(&Letter, Queued)> = done
        .mails
        .iter()
        .map(|letter| {
            let entry = serde_json::from_value::<Queued>(letter.record["entry"].clone())
                .map_err(EntryError::from)
                .and_then(|entry| entry.to_mail().map(|_| entry));
            entry.map(|e| (letter, e)).map_err(|source| ReplayError::Entry {
                partition: letter.partition,
                offset: letter.offset,
                source,
            })
        })
        .collect::<Result<_, _>>()?;
    if entries.is_empty() || dry_run {
        replayed.mails = entries.iter().map(|(l, _)| (l.partition, l.offset)).collect();
        return Ok(replayed);
    }
    let store = open_store().map_err(|e| ReplayError::Open(e.into()))?;
    let queue = RetryQueue::open(&store)?;
    let now = Utc::now();
    for (_, entry) in &entries {
        queue.push(&fresh(entry, now), now.timestamp_millis(), now.timestamp().max(0) as u64)?;
    }
    // On disk before the records are marked: a crash between queues them once more.
    store.flush_blocking()?;
    for (letter, _) in entries {
        review::mark(brokers, properties, topic, letter)?;
        replayed.mails.push((letter.partition, letter.offset));
    }
    Ok(replayed)
}

/// `entry` as a first attempt made `now`, sent by the node it is replayed into: no
/// longer its call's partition's. A node reads only some partitions, and the operator
/// cannot choose which; kept, the mail waited (set aside) for its partition to be assigned
/// to this node, for ever if it never was. So it is in this node's store only, like
/// every mail of a single-node engine.
fn fresh(entry: &Queued, now: DateTime<Utc>) -> Queued {
    Queued { attempts: 1, first_failed_ms: now.timestamp_millis(), source: None, ..entry.clone() }
}
