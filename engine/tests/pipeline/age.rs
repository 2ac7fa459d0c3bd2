//! How old a call may be (docs/delivery.md: the dedup window and stale
//! calls): a call that ended more than `engine.max_call_age_hours` before its CDR is
//! read is counted and not notified, whenever and however often it is read; times no
//! call can have go to the dead letters.

use chrono::TimeDelta;

use crate::helpers::*;

const CALLED: &str = "0312345678";
const STALE: &str = r#"callnotify_cdrs_filtered_total{reason="stale"}"#;

/// A backlog read late (an outage, an exchange catching up, a replayed topic): calls
/// older than the maximum age send nothing, the one older than the sent records'
/// retention included, and reading the whole topic again after a restart (a new group,
/// so from the start) sends nothing more: each call's mail once or never, never twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_older_than_the_maximum_age_send_nothing_even_read_again_after_a_restart() {
    let h = Harness::new(1).await;
    let first = h.engine().await;
    first.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);
    let now = call_start();
    let cdrs = [
        // Older than store.sent_retention_days (7): no record of it could be kept.
        cdr_at(now - TimeDelta::days(8), "eight-days", CALLED, Some("09011112222"), "allowed", "no_answer"),
        // A day and an hour: past engine.max_call_age_hours (24).
        cdr_at(now - TimeDelta::hours(25), "yesterday", CALLED, Some("09011112222"), "allowed", "no_answer"),
        // Twenty-three hours: still notified.
        cdr_at(now - TimeDelta::hours(23), "this-morning", CALLED, Some("09011112222"), "allowed", "no_answer"),
    ];
    h.produce(TOPIC, &cdrs).await;
    let mails = h.mails(1).await;
    first.wait_metric(STALE, 2.0).await;
    first.stop().await;
    assert!(parse(&mails[0]).body.contains(&jst_line(now - TimeDelta::hours(23))), "{}", parse(&mails[0]).body);

    let again = h.engine_with(&[("CALLNOTIFY__KAFKA__GROUP_ID", "read-it-all-again")]).await;
    again.wait_metric(STALE, 2.0).await;
    let all = h.mails_after_control_call(&again, 2).await;
    let stopped = again.stop().await;
    assert_eq!(all.len(), 2, "the 23-hour-old call once, and the control call: {:#?}", summary(&all));
    assert_eq!(stopped.metric("callnotify_mails_duplicate_total"), 1.0, "the second reading found the sent record");
}

/// CDRs an exchange with an unset or broken clock writes (dated 1900, 1970 or 9999)
/// are not calls: they go to the dead letters with the field and the reason, counted
/// as `implausible_time`, and nothing is mailed (the 1900 one used to be, and pushed
/// the latency histogram's sum to 5.8e9 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_dated_1900_or_9999_are_dead_lettered_not_mailed() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);
    let at = |t: &str| t.parse().unwrap();
    h.produce(
        TOPIC,
        &[
            cdr_at(
                at("1900-01-01T09:00:00+09:00"),
                "nineteen-hundred",
                CALLED,
                Some("09011112222"),
                "allowed",
                "no_answer",
            ),
            cdr_at(at("1970-01-01T09:00:00+09:00"), "epoch", CALLED, Some("09011112222"), "allowed", "no_answer"),
            cdr_at(at("9999-12-31T09:00:00+09:00"), "far-ahead", CALLED, Some("09011112222"), "allowed", "no_answer"),
        ],
    )
    .await;
    let mut records = h.dead_letters(3);
    records.sort_by_key(|r| r["offset"].as_i64());
    assert_eq!(records.len(), 3, "{records:#?}");
    for (record, year) in records.iter().zip(["1900", "1970", "9999"]) {
        let reason = record["reason"].as_str().unwrap();
        assert!(reason.contains("started_at") && reason.contains(year), "{reason}");
    }
    assert!(records[0]["reason"].as_str().unwrap().contains("before 2000"));
    assert!(records[2]["reason"].as_str().unwrap().contains("ahead of the engine's clock"));
    assert_eq!(engine.metric(r#"callnotify_cdrs_rejected_total{reason="implausible_time"}"#), 3.0);

    let all = h.mails_after_control_call(&engine, 1).await;
    engine.stop().await;
    assert_eq!(all.len(), 1, "only the control call: {:#?}", summary(&all));
}
