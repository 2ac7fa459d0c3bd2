//! Filter stage: whether a call is notified, by the subscriber's rules (R-N1, R-N2,
//! R-N4..R-N7). A pure function of the subscription and the call.

use crate::decode::{CallEvent, Caller};
use crate::resolve::Subscription;

/// Why a call sends no mail; each has a label in `callnotify_cdrs_filtered_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The called number has no call notification contracted.
    NotSubscribed,
    /// 停止: the subscriber stopped the service (R-N1).
    Stopped,
    /// No destination has its 送信 check on (R-N2).
    NoDestination,
    /// 応答できなかった着信のみ is on and the call was answered (R-N4).
    Answered,
    /// 指定した電話番号からの着信のみ is on and the caller withheld the number (R-N6).
    Withheld,
    /// 指定した電話番号からの着信のみ is on and the caller is not designated (R-N4, R-N5).
    NotDesignated,
    /// The call ended longer than `engine.max_call_age_hours` before its CDR was read.
    Stale,
}

impl Skip {
    pub const ALL: [Skip; 7] = [
        Skip::NotSubscribed,
        Skip::Stopped,
        Skip::NoDestination,
        Skip::Answered,
        Skip::Withheld,
        Skip::NotDesignated,
        Skip::Stale,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NotSubscribed => "not_subscribed",
            Skip::Stopped => "stopped",
            Skip::NoDestination => "no_destination",
            Skip::Answered => "answered",
            Skip::Withheld => "withheld",
            Skip::NotDesignated => "not_designated",
            Skip::Stale => "stale",
        }
    }
}

/// Decides whether `call` is notified under `subscription` (`None`: no service).
/// `Ok` carries the subscription whose recipients get the mail.
pub fn decide<'s>(subscription: Option<&'s Subscription>, call: &CallEvent<'_>) -> Result<&'s Subscription, Skip> {
    let sub = subscription.ok_or(Skip::NotSubscribed)?;
    // A call to the number before it moved to this line was its previous subscriber's,
    // however late its CDR is read (R-M3).
    if crate::store::records::before_moving_in(sub.moved_in_at, call.started_at) {
        return Err(Skip::NotSubscribed);
    }
    if !sub.enabled {
        return Err(Skip::Stopped);
    }
    if sub.recipients.is_empty() {
        return Err(Skip::NoDestination);
    }
    if sub.missed_only && !call.is_missed() {
        return Err(Skip::Answered);
    }
    if sub.designated_only {
        match call.caller {
            Caller::Withheld => return Err(Skip::Withheld),
            Caller::Number(n) if sub.designated.contains(&n) => {}
            // 表示圏外 and 公衆電話 carry no number, so they cannot be designated.
            _ => return Err(Skip::NotDesignated),
        }
    }
    Ok(sub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::DestinationAddress;
    use crate::decode::Outcome;
    use crate::phone::PhoneNumber;
    use std::borrow::Cow;

    fn n(s: &str) -> PhoneNumber {
        PhoneNumber::parse(s).unwrap()
    }

    fn sub() -> Subscription {
        Subscription {
            number: n("0312345678"),
            enabled: true,
            recipients: vec![DestinationAddress::parse("a@example.jp").unwrap()],
            designated_only: false,
            missed_only: false,
            designated: vec![n("09011112222")],
            moved_in_at: None,
        }
    }

    fn call(caller: Caller, outcome: Outcome) -> CallEvent<'static> {
        let t = chrono::DateTime::from_timestamp(1_764_000_000, 0).unwrap();
        CallEvent {
            call_id: Cow::Borrowed("c-1"),
            called: n("0312345678"),
            caller,
            started_at: t,
            answered_at: (outcome == Outcome::Answered).then_some(t),
            ended_at: t,
            outcome,
        }
    }

    fn designated() -> Caller {
        Caller::Number(n("09011112222"))
    }

    fn stranger() -> Caller {
        Caller::Number(n("09099998888"))
    }

    #[test]
    fn r_n1_a_stopped_service_sends_nothing() {
        let s = Subscription { enabled: false, ..sub() };
        assert_eq!(decide(Some(&s), &call(designated(), Outcome::NoAnswer)), Err(Skip::Stopped));
        assert_eq!(decide(None, &call(designated(), Outcome::NoAnswer)), Err(Skip::NotSubscribed));
    }

    #[test]
    fn r_n2_no_checked_destination_sends_nothing() {
        let s = Subscription { recipients: vec![], ..sub() };
        assert_eq!(decide(Some(&s), &call(designated(), Outcome::NoAnswer)), Err(Skip::NoDestination));
    }

    /// R-N4: the two checks are independent; every combination against every kind of call.
    #[test]
    fn r_n4_send_conditions_all_four_combinations() {
        use Outcome::{Answered, Busy, Forwarded, NoAnswer};
        let ok = Ok(());
        #[rustfmt::skip]
        let table = [
            // designated_only, missed_only, caller, outcome, expected
            (false, false, stranger(),   Answered,  ok),
            (false, false, stranger(),   NoAnswer,  ok),
            (false, false, designated(), Answered,  ok),
            (false, true,  stranger(),   Answered,  Err(Skip::Answered)),
            (false, true,  stranger(),   NoAnswer,  ok),
            (false, true,  stranger(),   Busy,      ok),
            (false, true,  stranger(),   Forwarded, ok),
            (true,  false, stranger(),   NoAnswer,  Err(Skip::NotDesignated)),
            (true,  false, designated(), Answered,  ok),
            (true,  false, designated(), NoAnswer,  ok),
            (true,  true,  designated(), Answered,  Err(Skip::Answered)),
            (true,  true,  designated(), NoAnswer,  ok),
            (true,  true,  stranger(),   NoAnswer,  Err(Skip::NotDesignated)),
            (true,  true,  stranger(),   Answered,  Err(Skip::Answered)),
        ];
        for (designated_only, missed_only, caller, outcome, want) in table {
            let s = Subscription { designated_only, missed_only, ..sub() };
            let got = decide(Some(&s), &call(caller, outcome)).map(|_| ());
            assert_eq!(got, want, "designated_only={designated_only} missed_only={missed_only} {caller:?} {outcome:?}");
        }
    }

    #[test]
    fn r_n5_only_checked_designated_numbers_count() {
        // Subscription keeps only checked entries (see resolve); an unchecked one is absent.
        let s = Subscription { designated_only: true, designated: vec![], ..sub() };
        assert_eq!(decide(Some(&s), &call(designated(), Outcome::NoAnswer)), Err(Skip::NotDesignated));
    }

    #[test]
    fn r_n6_withheld_callers_are_never_notified_with_designated_only() {
        for missed_only in [false, true] {
            let s = Subscription { designated_only: true, missed_only, ..sub() };
            assert_eq!(decide(Some(&s), &call(Caller::Withheld, Outcome::NoAnswer)), Err(Skip::Withheld));
        }
        let s = Subscription { designated_only: true, ..sub() };
        for caller in [Caller::Unavailable, Caller::Payphone] {
            assert_eq!(decide(Some(&s), &call(caller, Outcome::NoAnswer)), Err(Skip::NotDesignated));
        }
    }

    #[test]
    fn r_n7_withheld_unavailable_and_payphone_are_notified_without_designated_only() {
        for caller in [Caller::Withheld, Caller::Unavailable, Caller::Payphone] {
            assert!(decide(Some(&sub()), &call(caller, Outcome::NoAnswer)).is_ok(), "{caller:?}");
        }
    }
}
