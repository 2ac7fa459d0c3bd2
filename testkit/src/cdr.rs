//! Canonical CDRs (docs/cdr-formats.md) for tests.

use std::sync::LazyLock;

use chrono::{DateTime, FixedOffset, TimeDelta, Utc};

/// When this test process's calls started: ten minutes before it began, in whole
/// seconds, the same for every CDR (a CDR built twice is the same CDR, as the engine's
/// dedup needs). Recent, because the engine notifies calls up to
/// `engine.max_call_age_hours` old.
pub fn call_start() -> DateTime<FixedOffset> {
    static START: LazyLock<DateTime<FixedOffset>> = LazyLock::new(|| {
        let then = DateTime::from_timestamp(Utc::now().timestamp() - 600, 0).expect("a time");
        then.with_timezone(&FixedOffset::east_opt(9 * 3600).expect("JST"))
    });
    *START
}

/// When the calls of [`cdr`] ended: 31 s after [`call_start`].
pub fn call_end() -> DateTime<Utc> {
    (call_start() + TimeDelta::seconds(31)).to_utc()
}

/// A canonical CDR of a call at [`call_start`] lasting 31 s, answered after 5 s when
/// `outcome` is `answered`; `presentation` and `outcome` as the format spells them.
pub fn cdr(call_id: &str, called: &str, caller: Option<&str>, presentation: &str, outcome: &str) -> String {
    cdr_at(call_start(), call_id, called, caller, presentation, outcome)
}

/// [`cdr`] of a call that started at `start`.
pub fn cdr_at(
    start: DateTime<FixedOffset>,
    call_id: &str,
    called: &str,
    caller: Option<&str>,
    presentation: &str,
    outcome: &str,
) -> String {
    let at = |secs| (start + TimeDelta::seconds(secs)).to_rfc3339();
    serde_json::json!({
        "call_id": call_id,
        "called": called,
        "caller": caller,
        "presentation": presentation,
        "started_at": at(0),
        "answered_at": (outcome == "answered").then(|| at(5)),
        "ended_at": at(31),
        "outcome": outcome,
    })
    .to_string()
}
