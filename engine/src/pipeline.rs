//! One CDR through decode → resolve → filter → dedup → render, exactly as the consumer
//! thread runs it; what comes out is the mails to send, as a [`Mails`] value. Kafka,
//! offsets and backpressure are the source's; sending is deliver's. The benches call
//! [`classify`], the first half, so what they measure is what runs.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use dashmap::DashSet;

use crate::decode::{check_times, decode, CallEvent, CdrFormat, DecodeError};
use crate::filter::{decide, Skip};
use crate::render::{Mail, Origin, Renderer};
use crate::resolve::{Resolver, Subscription};
use crate::store::{SentKey, Store, StoreError};
use crate::telemetry::{Failure, Metrics};

/// What filter hands render: a call to notify and the subscription whose checked
/// destinations get the mail.
#[derive(Debug)]
pub struct Notify<'a> {
    pub call: CallEvent<'a>,
    pub subscription: Arc<Subscription>,
}

/// What becomes of one message after decode, resolve and filter.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// Not a CDR: it goes to the dead letters.
    Rejected(DecodeError),
    /// A call that sends no mail, and why.
    Filtered(Skip),
    /// A call to notify.
    Notify(Notify<'a>),
}

/// The clock a CDR is judged by: its times must be plausible at `now`
/// ([`check_times`]), and a call that ended more than `max_age` before `now` is stale.
/// A value rather than a clock read inside, so tests and benches fix it.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub now: DateTime<Utc>,
    /// `engine.max_call_age_hours`.
    pub max_age: TimeDelta,
}

/// Decodes `payload`, finds the called number's subscription and applies its rules.
/// Fails only if the store cannot be read: the CDR must then not be skipped.
pub fn classify<'a>(
    format: CdrFormat,
    payload: &'a [u8],
    resolver: &Resolver,
    at: Now,
) -> Result<Verdict<'a>, StoreError> {
    let call = match decode(format, payload) {
        Ok(call) => call,
        Err(e) => return Ok(Verdict::Rejected(e)),
    };
    if let Err(e) = check_times(&call, at.now) {
        return Ok(Verdict::Rejected(e));
    }
    if at.now - call.ended_at > at.max_age {
        return Ok(Verdict::Filtered(Skip::Stale));
    }
    let Some(subscription) = resolver.resolve(&call.called)? else {
        return Ok(Verdict::Filtered(Skip::NotSubscribed));
    };
    Ok(match decide(Some(&subscription), &call) {
        Ok(_) => Verdict::Notify(Notify { call, subscription }),
        Err(skip) => Verdict::Filtered(skip),
    })
}

/// The mails one call causes, each with the key of its sent record, and the call they
/// are about: what the pipeline hands deliver.
pub struct Mails {
    pub origin: Origin,
    pub mails: Vec<(SentKey, Mail)>,
}

/// What becomes of one message, every stage done.
pub enum Outcome {
    /// Not a CDR: it goes to the dead letters.
    Rejected(DecodeError),
    /// Nothing to send: the call was filtered, or each of its mails is sent or being
    /// sent already.
    Nothing,
    /// Mails to send; each is claimed until [`Claims::release`].
    Send(Mails),
}

/// The dedup step's memory of mails being sent now, by sent-record key, shared by every
/// consumer thread. With the store's sent records it makes a mail go out once, however
/// often its CDR is read: a thread that reads the same CDR while the mail is on its way
/// finds the claim; one that reads it later finds the sent record, which is written
/// before the claim is released.
pub struct Claims {
    sending: DashSet<SentKey>,
    store: Store,
}

impl Claims {
    pub fn new(store: Store) -> Self {
        Self { sending: DashSet::new(), store }
    }

    /// Claims `key`'s mail for sending: `false` if it is being sent or was sent.
    pub fn claim(&self, key: &SentKey) -> Result<bool, StoreError> {
        if !self.sending.insert(key.clone()) {
            return Ok(false);
        }
        match self.store.was_sent(key) {
            Ok(false) => Ok(true),
            sent => {
                self.sending.remove(key);
                sent.map(|_| false)
            }
        }
    }

    /// Lets `key` go: its sent record is written, or its mail was given up.
    pub fn release(&self, key: &SentKey) {
        self.sending.remove(key);
    }
}

/// The stages the consumer thread runs; cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    pub resolver: Resolver,
    pub renderer: Renderer,
    pub claims: Arc<Claims>,
    pub metrics: Metrics,
    /// `engine.max_call_age_hours`: older calls are stale.
    pub max_call_age: TimeDelta,
}

impl Pipeline {
    /// Runs one message through every stage at `now`, counting what becomes of it.
    /// Fails only if the store cannot be read: the CDR must then not be skipped.
    pub fn run(&self, format: CdrFormat, payload: &[u8], now: DateTime<Utc>) -> Result<Outcome, StoreError> {
        let notify = match classify(format, payload, &self.resolver, Now { now, max_age: self.max_call_age })? {
            Verdict::Rejected(e) => {
                self.metrics.rejected(e.reason());
                return Ok(Outcome::Rejected(e));
            }
            Verdict::Filtered(skip) => {
                self.metrics.decoded();
                self.metrics.filtered(skip);
                return Ok(Outcome::Nothing);
            }
            Verdict::Notify(notify) => notify,
        };
        self.metrics.decoded();
        self.metrics.notified();
        let mails = self.render(notify)?;
        Ok(if mails.mails.is_empty() { Outcome::Nothing } else { Outcome::Send(mails) })
    }

    /// Dedup and render: a mail per checked destination not sent or being sent already.
    fn render(&self, Notify { call, subscription }: Notify<'_>) -> Result<Mails, StoreError> {
        let mut mails = Vec::with_capacity(subscription.recipients.len());
        for recipient in &subscription.recipients {
            let key = SentKey::new(call.ended_at.timestamp(), &call.called, &call.call_id, recipient.as_str());
            match self.claims.claim(&key) {
                Ok(true) => {}
                Ok(false) => {
                    self.metrics.duplicate();
                    continue;
                }
                Err(e) => {
                    // The CDR will be read again: nothing of it stays claimed.
                    for (key, _) in &mails {
                        self.claims.release(key);
                    }
                    return Err(e);
                }
            }
            match self.renderer.render(&call, recipient) {
                Ok(mail) => mails.push((key, mail)),
                Err(e) => {
                    self.claims.release(&key);
                    self.metrics.failed(Failure::Render);
                    tracing::error!(call_id = %call.call_id, %recipient, error = %e, "mail could not be rendered");
                }
            }
        }
        let origin = Origin { call_id: call.call_id.into_owned(), called: call.called, ended_at: call.ended_at };
        Ok(Mails { origin, mails })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phone::PhoneNumber;

    /// R-M4's "once": a mail is claimed by one reader of its CDR at a time, may be
    /// claimed again if it was let go without a sent record, and never once its record
    /// is written.
    #[tokio::test]
    async fn a_mail_is_claimed_once_and_never_again_after_its_record_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let claims = Claims::new(store.clone());
        let key = SentKey::new(1_764_000_000, &PhoneNumber::parse("0312345678").unwrap(), "c-1", "taro@example.jp");

        assert!(claims.claim(&key).unwrap());
        assert!(!claims.claim(&key).unwrap(), "a second reader while it is being sent");
        claims.release(&key);
        assert!(claims.claim(&key).unwrap(), "let go without a record: it may still be sent");
        store.record_sent(&key, 1_764_000_100).await.unwrap();
        claims.release(&key);
        assert!(!claims.claim(&key).unwrap(), "its record is written: never again");
    }
}
