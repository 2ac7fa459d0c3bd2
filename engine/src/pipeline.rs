//! One CDR through decode → resolve → filter → dedup → render, exactly as the consumer
//! thread runs it; what comes out is the mails to send, as a [`Mails`] value. Kafka,
//! offsets and backpressure are the source's; sending is deliver's. The benches call
//! [`classify`], the first half, so what they measure is what runs.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

use crate::address::DestinationAddress;
use crate::decode::{check_times, decode, decode_fax, CallEvent, CdrFormat, DecodeError, FaxEvent};
use crate::error_event::ErrorEvent;
use crate::fax::document::{to_pdf, DocumentError};
use crate::filter::{decide, Skip};
use crate::phone::PhoneNumber;
use crate::render::{FaxPdf, Mail, Origin, RenderError, Renderer};
use crate::resolve::{Resolver, Subscription};
use crate::store::{Claimed, Claims, FaxRecord, SentKey, StoreError};
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
    pub mails: KeyedMails,
    /// Mails another reader of the same message holds the claim of
    /// ([`crate::store::Claims::claim_once_let_go`]): the message is done only once that
    /// reader lets them go, and they are sent if it let them go unsent.
    pub contested: KeyedMails,
    /// A received fax to keep for the site before any of its mails goes out: they
    /// link to it (R-F1).
    pub keep: Option<Box<FaxToKeep>>,
}

/// A received fax on its way into the store ([`crate::store::Store::keep_fax`]).
pub struct FaxToKeep {
    pub record: FaxRecord,
    pub document: Vec<u8>,
}

/// Rendered mails with their sent-record keys.
pub type KeyedMails = Vec<(SentKey, Mail)>;

/// What becomes of one message, every stage done.
pub enum Outcome {
    /// Not a CDR: it goes to the dead letters.
    Rejected(DecodeError),
    /// Nothing to send: the call was filtered, or each of its mails is sent already.
    Nothing,
    /// Mails to send: claimed by this reading until [`Claims::release`], or contested
    /// ([`Mails::contested`]).
    Send(Mails),
}

/// The stages the consumer thread runs; cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    pub resolver: Resolver,
    pub renderer: Renderer,
    pub claims: Arc<Claims>,
    pub metrics: Metrics,
    /// `engine.max_call_age_hours`: older calls are stale, and so are older faxes' mails.
    pub max_call_age: TimeDelta,
    /// `store.fax_retention_days`: a fax older than that is not kept (it would stay one
    /// hour at most, and a deleted one's record read again would bring it back).
    pub fax_retention: TimeDelta,
}

impl Pipeline {
    /// Runs one message through every stage at `now`, counting what becomes of it.
    /// Fails only if the store cannot be read: the CDR must then not be skipped.
    pub fn run(&self, format: CdrFormat, payload: &[u8], now: DateTime<Utc>) -> Result<Outcome, StoreError> {
        let outcome =
            if format == CdrFormat::Fax { self.run_fax(payload, now) } else { self.run_call(format, payload, now) };
        match outcome {
            // One number's record this version cannot read stops neither this partition
            // nor the node: its CDR goes to the dead letters, to be replayed once the
            // line is provisioned again.
            Err(StoreError::UnreadableNumber { number, why }) => {
                let rejected = DecodeError::UnreadableSubscriber(format!("{number}: {why}"));
                self.metrics.rejected(rejected.reason());
                Ok(Outcome::Rejected(rejected))
            }
            outcome => outcome,
        }
    }

    fn run_call(&self, format: CdrFormat, payload: &[u8], now: DateTime<Utc>) -> Result<Outcome, StoreError> {
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
        Ok(if mails.mails.is_empty() && mails.contested.is_empty() { Outcome::Nothing } else { Outcome::Send(mails) })
    }

    /// Dedup and render: a mail per checked destination not sent already, claimed here
    /// or contested.
    fn render(&self, Notify { call, subscription }: Notify<'_>) -> Result<Mails, StoreError> {
        let at = (call.ended_at.timestamp(), &call.called, call.call_id.as_ref());
        let (mails, contested) =
            self.claim_and_render(at, &subscription.recipients, |recipient| self.renderer.render(&call, recipient))?;
        let origin =
            Origin { call_id: call.call_id.into_owned(), called: call.called, ended_at: call.ended_at, source: None };
        Ok(Mails { origin, mails, contested, keep: None })
    }

    /// For each of `recipients` whose mail about notification `(at, called, id)` is not
    /// sent already, its mail rendered by `render`: with its claim (the first list), or,
    /// if another reader holds the claim, contested (the second). A mail that does not
    /// render is counted and logged, and its claim let go.
    fn claim_and_render<'r>(
        &self,
        (at, called, id): (i64, &PhoneNumber, &str),
        recipients: impl IntoIterator<Item = &'r DestinationAddress>,
        render: impl Fn(&DestinationAddress) -> Result<Mail, RenderError>,
    ) -> Result<(KeyedMails, KeyedMails), StoreError> {
        let recipients = recipients.into_iter();
        let mut mails = Vec::with_capacity(recipients.size_hint().0);
        let mut contested = Vec::new();
        let mut listed: Vec<&str> = Vec::with_capacity(recipients.size_hint().0);
        for recipient in recipients {
            // An address listed twice (an import does not refuse it), or in other cases
            // of its letters (one mailbox), gets one mail: a second claim of one key
            // would wait on the first, held by this same reading.
            if listed.iter().any(|earlier| earlier.eq_ignore_ascii_case(recipient.as_str())) {
                continue;
            }
            listed.push(recipient.as_str());
            let key = SentKey::new(at, called, id, recipient.as_str());
            let claimed = match self.claims.claim(&key) {
                Ok(Claimed::Sent) => {
                    self.metrics.duplicate();
                    continue;
                }
                Ok(claimed) => claimed,
                Err(e) => {
                    // The message will be read again: nothing of it stays claimed.
                    for (key, _) in &mails {
                        self.claims.release(key);
                    }
                    return Err(e);
                }
            };
            match render(recipient) {
                Ok(mail) if claimed == Claimed::Mine => mails.push((key, mail)),
                Ok(mail) => contested.push((key, mail)),
                Err(e) => {
                    if claimed == Claimed::Mine {
                        self.claims.release(&key);
                    }
                    self.metrics.failed(Failure::Render);
                    crate::error_event!(
                        self.metrics,
                        ErrorEvent::Render,
                        call_id = %id,
                        %recipient,
                        error = %e,
                        "mail could not be rendered"
                    );
                }
            }
        }
        Ok((mails, contested))
    }

    /// A fax record (R-F1): decoded with its document checked, kept for the site if the
    /// called number has fax notification contracted, and mailed to each checked
    /// destination while the service is started. Counted as a CDR is.
    fn run_fax(&self, payload: &[u8], now: DateTime<Utc>) -> Result<Outcome, StoreError> {
        let fax = match decode_fax(payload).and_then(|fax| check_fax_time(fax, now)) {
            Ok(fax) => fax,
            Err(e) => {
                self.metrics.rejected(e.reason());
                return Ok(Outcome::Rejected(e));
            }
        };
        // Read before the fax counts as decoded: one whose record cannot be read is
        // counted rejected instead ([`Pipeline::run`]), as a call is.
        let number = self.resolver.store().number(&fax.called)?;
        self.metrics.decoded();
        // A fax past its retention may have expired from the store already: not kept
        // again. One younger is kept for the site whenever it is read (an engine behind,
        // a dead letter replayed once the engine is mended), but mailed only while a
        // call would be: older, its mail is stale.
        let age = now - fax.received_at;
        if age >= self.fax_retention {
            self.metrics.filtered(Skip::Stale);
            return Ok(Outcome::Nothing);
        }
        let stale = age > self.max_call_age;
        // A fax received before the number moved to this line was its previous
        // subscriber's: neither kept for this one nor mailed (R-M3).
        let Some(number) = number.filter(|n| n.services.fax && !n.before_moving_in(fax.received_at)) else {
            self.metrics.filtered(Skip::NotSubscribed);
            return Ok(Outcome::Nothing);
        };
        let FaxEvent { fax_id, called, caller, received_at, pages, kind, document } = fax;
        let record = FaxRecord {
            number: called,
            fax_id: fax_id.into_owned(),
            sender: crate::render::caller_text(&caller).into_owned(),
            received_at,
            pages,
            kind,
            size: document.len() as u64,
            read: false,
            deleted: false,
        };
        // The mails' dedup keys and Message-IDs never meet a call's with the same id.
        let notification = format!("{}{}", crate::decode::FAX_NOTIFICATION, record.fax_id);
        let (mut mails, mut contested) = (Vec::new(), Vec::new());
        if stale {
            self.metrics.filtered(Skip::Stale);
        } else if !number.fax.enabled {
            self.metrics.filtered(Skip::Stopped);
        } else if !number.fax.destinations.iter().any(|d| d.send) {
            self.metrics.filtered(Skip::NoDestination);
        } else {
            self.metrics.notified();
            let made = number.fax.attach_pdf.then(|| to_pdf(&document, crate::fax::ATTACHED_PDF_AT_MOST));
            let pdf = match &made {
                None => FaxPdf::NotAsked,
                Some(Ok(pdf)) => FaxPdf::Attached(pdf),
                Some(Err(DocumentError::TooLarge { .. })) => FaxPdf::TooLarge,
                Some(Err(e)) => {
                    // Checked by decode, so not expected; the link still leads to the fax.
                    tracing::warn!(fax_id = %record.fax_id, error = %e, "no PDF of the fax: its mails go without it");
                    FaxPdf::Unavailable
                }
            };
            let recipients = number.fax.destinations.iter().filter(|d| d.send).map(|d| &d.address);
            (mails, contested) =
                self.claim_and_render((received_at.timestamp(), &called, &notification), recipients, |to| {
                    self.renderer.render_fax(&record, to, pdf)
                })?;
        }
        let origin = Origin { call_id: notification, called, ended_at: received_at, source: None };
        Ok(Outcome::Send(Mails { origin, mails, contested, keep: Some(Box::new(FaxToKeep { record, document })) }))
    }
}

/// A fax's reception time must be one a fax can have, as a call's times must
/// ([`check_times`]).
fn check_fax_time(fax: FaxEvent<'_>, now: DateTime<Utc>) -> Result<FaxEvent<'_>, DecodeError> {
    let (field, time) = ("received_at", fax.received_at);
    if time < crate::decode::EARLIEST_CALL {
        return Err(DecodeError::Implausible { field, time, why: "before 2000" });
    }
    if time > now + crate::decode::FUTURE_SLACK {
        return Err(DecodeError::Implausible { field, time, why: "more than a day ahead of the engine's clock" });
    }
    Ok(fax)
}
