//! One CDR through decode → resolve → filter, exactly as the consumer thread runs it.
//! The benches call this same function, so what they measure is what runs.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

use crate::decode::{check_times, decode, CallEvent, CdrFormat, DecodeError};
use crate::filter::{decide, Skip};
use crate::resolve::{Resolver, Subscription};
use crate::store::StoreError;

/// What becomes of one message.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// Not a CDR: it goes to the dead letters.
    Rejected(DecodeError),
    /// A call that sends no mail, and why.
    Filtered(Skip),
    /// A call to notify at the subscription's checked destinations.
    Notify { call: CallEvent<'a>, subscription: Arc<Subscription> },
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
    let subscription = resolver.resolve(&call.called)?;
    if let Err(skip) = decide(subscription.as_deref(), &call) {
        return Ok(Verdict::Filtered(skip));
    }
    let subscription = subscription.expect("decide refuses a call without a subscription");
    Ok(Verdict::Notify { call, subscription })
}
