//! `callnotify dead-letters replay`: the CDRs of dead letters back into their topics
//! ([`dead_letter::review`]) and the mails back into the retry queue, each record once.
//!
//! A mail record holds the mail as a retry-queue entry: it is queued again due now, as
//! a fresh first attempt (its give-up age starts again), with its Message-ID, and sent
//! by the next `serve` on this store, whichever CDR partitions it reads. The store is
//! the engine's, so mails are replayed with `serve` stopped; CDRs need only the cluster.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, TimeDelta, Utc};

use crate::config::Settings;
use crate::dead_letter::review::{self, Filter, Letter, ReviewError};
use crate::decode::CdrFormat;
use crate::deliver::queue::{EntryError, Queued, RetryQueue};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Review(#[from] ReviewError),
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
    /// Records that cannot be replayed (partition, offset, why): a CDR record without its
    /// CDR, a mail record without its mail, one that is no dead letter, a CDR the cluster
    /// refused to take back. Left alone, the others replayed.
    pub unreadable: Vec<(i32, i64, String)>,
    /// CDRs [`CdrCheck`] held back (partition, offset, why): their engines would not
    /// notify them now; not marked, so a replay after the fix puts them back. And mail
    /// records whose mail was left out (too large for the topic), which none can send.
    pub held_back: Vec<(i32, i64, String)>,
    /// CDRs put back whose marker the cluster refused (partition, offset, why): a next
    /// replay puts them back again (the sent records keep their mails to one each). One
    /// refused for good stops the CDRs' step there (its why says so).
    pub unmarked: Vec<(i32, i64, String)>,
    /// Why the mails' step stopped, after the CDRs above were replayed (the store could
    /// not be opened, say): the mails not listed above were not.
    pub mails_failed: Option<String>,
}

/// What the engines reading a CDR's topic would do with it, by the replaying tool's
/// configuration (the engines': `callnotify.toml`): a CDR they would dead-letter again or
/// filter as stale is not put back, and not marked replayed, so a replay after the fix
/// (the topic's format, a raised `engine.max_call_age_hours`) still can.
#[derive(Debug, Clone, Default)]
pub struct CdrCheck {
    /// `kafka.topics`' formats; a topic not listed is put back unjudged.
    formats: HashMap<String, CdrFormat>,
    /// `engine.max_call_age_hours`.
    max_age: TimeDelta,
}

impl CdrCheck {
    pub fn new(settings: &Settings) -> Self {
        Self {
            formats: settings.kafka.topics.iter().map(|t| (t.name.clone(), t.format)).collect(),
            max_age: TimeDelta::hours(settings.engine.max_call_age_hours as i64),
        }
    }

    /// Why the CDR `raw` of `topic` should not be put back at `now`, if so.
    pub fn why_not(&self, topic: &str, raw: &[u8], now: DateTime<Utc>) -> Option<String> {
        // Faxes are kept for the site long after their mail would be stale.
        let format = self.formats.get(topic).copied().filter(|f| *f != CdrFormat::Fax)?;
        let named = format.as_str();
        let call = match crate::decode::decode(format, raw) {
            Ok(call) => call,
            Err(e) => {
                return Some(format!(
                    "it does not decode as {named} (the format kafka.topics gives {topic}): {e}; put back, it would \
                     be dead-lettered again"
                ))
            }
        };
        if let Err(e) = crate::decode::check_times(&call, now) {
            return Some(format!("{e}; put back, it would be dead-lettered again"));
        }
        let age = now - call.ended_at;
        (age > self.max_age).then(|| {
            format!(
                "its call ended {} h ago, past engine.max_call_age_hours ({}): put back, it would be filtered as \
                 stale; raise that for the replay and for the engines that read {topic}, then lower it again",
                age.num_hours(),
                self.max_age.num_hours()
            )
        })
    }
}

/// The store's tree of the dead letters whose mails it has queued (`topic/partition/offset/at`,
/// the letter's time too: a topic recreated numbers its records from 0 again):
/// a replay run again after one that queued them but did not mark them in the topic (it
/// stopped, or the cluster did not answer) marks them without queuing them again.
pub const QUEUED_LETTERS_TREE: &str = "replayed_letters";

/// Replays the records of `topic` that `filter` lets through, the CDRs `check` passes;
/// `open_store` is called only if there are mails to queue. CDRs first: a failure in
/// the mails' step is told in [`Replayed::mails_failed`] beside the CDRs already
/// replayed.
pub fn replay<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    filter: &Filter,
    dry_run: bool,
    check: &CdrCheck,
    open_store: impl FnOnce() -> Result<Store, E>,
) -> Result<Replayed, ReplayError> {
    let judge = |source: &str, raw: &[u8]| check.why_not(source, raw, Utc::now());
    let done = review::replay(brokers, properties, topic, filter, dry_run, &judge)?;
    let mut replayed = Replayed {
        cdrs: done.replayed,
        already: done.already,
        unreadable: done.unreplayable,
        held_back: done.held_back,
        unmarked: done.unmarked,
        ..Replayed::default()
    };
    let mut entries: Vec<(&Letter, Queued)> = Vec::new();
    for letter in &done.mails {
        let entry = serde_json::from_value::<Queued>(letter.record["entry"].clone())
            .map_err(EntryError::from)
            .and_then(|entry| entry.to_mail().map(|_| entry));
        match entry {
            Ok(entry) => entries.push((letter, entry)),
            // Left out when the dead-letter topic refused the record with it: said when it
            // was written; no replay can send it, so it fails none.
            Err(_) if letter.record["entry"]["mail_left_out"].is_string() => {
                let why = letter.record["entry"]["mail_left_out"].as_str().unwrap_or_default();
                replayed.held_back.push((
                    letter.partition,
                    letter.offset,
                    format!("no mail to send again: the mail was {why}"),
                ))
            }
            Err(e) => {
                replayed.unreadable.push((letter.partition, letter.offset, format!("no mail to send again: {e}")))
            }
        }
    }
    if entries.is_empty() || dry_run {
        replayed.mails = entries.iter().map(|(l, _)| (l.partition, l.offset)).collect();
        return Ok(replayed);
    }
    let queued = open_store()
        .map_err(|e| ReplayError::Open(e.into()))
        .and_then(|store| Ok(queue_mails(&store, topic, &entries, Utc::now())?));
    if let Err(e) = queued {
        replayed.mails_failed = Some(e.to_string());
        return Ok(replayed);
    }
    for (letter, _) in entries {
        if let Err(e) = review::mark(brokers, properties, topic, letter) {
            // Queued all the same: the next replay marks it without queuing it again.
            replayed.mails_failed =
                Some(format!("marking dead letter {}/{} replayed: {e}", letter.partition, letter.offset));
            break;
        }
        replayed.mails.push((letter.partition, letter.offset));
    }
    Ok(replayed)
}

/// Queues the mails of `letters` (of dead-letter topic `topic`) in `store`'s retry
/// queue, due `now`, each once: not a letter this store queued before (a replay that
/// stopped before marking it), nor a mail the queue holds already (dead-lettered twice).
/// A copy of one set aside here (its partition moved away) goes: this node sends it.
/// On disk when it returns, before the letters are marked in the topic.
pub fn queue_mails(
    store: &Store,
    topic: &str,
    letters: &[(&Letter, Queued)],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let queue = RetryQueue::open(store)?;
    let queued_letters = store.open_tree(QUEUED_LETTERS_TREE)?;
    let mut in_queue = queue.sent_keys()?;
    for (letter, entry) in letters {
        let at = letter.record["at"].as_str().unwrap_or_default();
        let letter_key = format!("{topic}/{}/{}/{at}", letter.partition, letter.offset);
        if queued_letters.contains_key(&letter_key)? {
            continue;
        }
        let key = entry.sent_key()?;
        if in_queue.insert(key.as_bytes().to_vec()) {
            queue.push(&fresh(entry, now), now.timestamp_millis(), now.timestamp().max(0) as u64)?;
            queue.drop_set_aside(key.as_bytes())?;
        }
        // After its entry: sled keeps writes in order, so a crash keeps this mark only
        // with the entry.
        queued_letters.insert(letter_key, &now.timestamp_millis().to_be_bytes())?;
    }
    store.flush_blocking()?;
    Ok(())
}

/// `entry` as a first attempt made `now`, sent by the node it is replayed into: no
/// longer its call's partition's. A node reads only some partitions, and the operator
/// cannot choose which; kept, the mail waited (set aside) for its partition to be assigned
/// to this node, for ever if it never was. So it is in this node's store only, like
/// every mail of a single-node engine.
fn fresh(entry: &Queued, now: DateTime<Utc>) -> Queued {
    Queued { attempts: 1, first_failed_ms: now.timestamp_millis(), source: None, ..entry.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::DestinationAddress;
    use crate::phone::PhoneNumber;
    use crate::render::{Origin, Renderer};

    fn letter(offset: i64) -> (Letter, Queued) {
        let renderer = Renderer::new("no-reply@notify.example.jp".parse().unwrap());
        let called = PhoneNumber::parse("0312345678").unwrap();
        let to = DestinationAddress::parse("taro@example.jp").unwrap();
        let mail = renderer.render_test(called.as_str(), &to, "n", crate::render::MailService::Call).unwrap();
        let ended_at = DateTime::from_timestamp(1_764_000_000, 0).unwrap();
        let origin = Origin { call_id: "refused-1".into(), called, ended_at, source: None };
        let entry = Queued::new(&mail, &origin, "550 5.1.1 no such user", ended_at);
        (Letter { partition: 0, offset, record: serde_json::Value::Null, replayed: false }, entry)
    }

    /// R-M4, docs/operating.md: a replay that queued a dead letter's mail and stopped
    /// before marking the letter in the topic is run again: the mail is not queued a
    /// second time, also after a `serve` in between sent it (and took it out of the
    /// queue). Queued again under a new due time it was sent twice.
    #[test]
    fn r_m4_a_replay_run_again_before_its_letters_were_marked_queues_no_mail_twice() {
        let store = Store::temporary().unwrap();
        let queue = RetryQueue::open(&store).unwrap();
        let (first, entry) = letter(7);
        let t0 = DateTime::from_timestamp(1_765_000_000, 0).unwrap();
        queue_mails(&store, "dl", &[(&first, entry.clone())], t0).unwrap();
        assert_eq!(queue.len(), 1);

        queue_mails(&store, "dl", &[(&first, entry.clone())], t0 + chrono::TimeDelta::minutes(5)).unwrap();
        assert_eq!(queue.len(), 1, "queued once");
        // A serve sent it meanwhile.
        let (slot, _) = queue.due(i64::MAX, &Default::default(), 10).unwrap().pop().unwrap();
        queue.remove(&slot).unwrap();
        queue_mails(&store, "dl", &[(&first, entry.clone())], t0 + chrono::TimeDelta::hours(1)).unwrap();
        assert!(queue.is_empty(), "not queued again once sent");

        // Another letter of the same mail (it failed again after its replay) is queued.
        let (later, _) = letter(9);
        queue_mails(&store, "dl", &[(&later, entry.clone())], t0 + chrono::TimeDelta::hours(2)).unwrap();
        assert_eq!(queue.len(), 1, "a new dead letter of it is replayed");

        // The dead-letter topic recreated: a new letter at a number used before.
        let (slot, _) = queue.due(i64::MAX, &Default::default(), 10).unwrap().pop().unwrap();
        queue.remove(&slot).unwrap();
        let (mut anew, _) = letter(7);
        anew.record = serde_json::json!({"at": "2026-12-06T15:00:00Z"});
        queue_mails(&store, "dl", &[(&anew, entry)], t0 + chrono::TimeDelta::hours(3)).unwrap();
        assert_eq!(queue.len(), 1, "a letter of a recreated topic is not one replayed before");
    }

    /// R-M4, docs/cluster.md: a node set a mail aside when its partition moved away; the
    /// next owner was refused for good and dead-lettered it. Replayed into the first
    /// node's store, the letter was marked replayed but its mail was not queued: its
    /// set-aside copy counted as in the queue, and it waited for a partition that
    /// dropped it as dead-lettered. Now it is queued to be sent, its set-aside copy gone.
    #[test]
    fn r_m4_a_replayed_mail_set_aside_here_is_queued_to_be_sent() {
        let store = Store::temporary().unwrap();
        let queue = RetryQueue::open(&store).unwrap();
        let (letter, entry) = letter(7);
        let source = crate::store::PartitionId { topic: "cdr".into(), partition: 3 };
        let set_aside = Queued { source: Some(source), ..entry.clone() };
        let parked = store.open_tree(crate::deliver::queue::PARKED_TREE).unwrap();
        // Its slot: when it is due, then its mail's sent key.
        let mut slot = 1_764_000_060_000u64.to_be_bytes().to_vec();
        slot.extend_from_slice(set_aside.sent_key().unwrap().as_bytes());
        parked.insert(slot, serde_json::to_vec(&set_aside).unwrap()).unwrap();

        let now = DateTime::from_timestamp(1_765_000_000, 0).unwrap();
        queue_mails(&store, "dl", &[(&letter, entry)], now).unwrap();
        assert_eq!(queue.len(), 1, "queued to be sent by this node");
        assert!(parked.is_empty(), "the set-aside copy is gone: it would be sent again");
    }
}
