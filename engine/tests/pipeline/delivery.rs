//! Delivery guarantees on the whole path: replays send nothing twice, poison CDRs and
//! refused mails are dead-lettered (R-M4) without blocking the partition, temporary
//! SMTP failures are retried from the durable queue, and given up after
//! `smtp.retry_give_up_secs`.

use testkit::smtp::{DataFault, SmtpStage};

use crate::helpers::*;

const CALLED: &str = "0312345678";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_cdr_sends_nothing_again() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    engine.provision(&[
        plain_subscriber(CALLED, "taro@example.jp"),
        plain_subscriber("0698765432", "control@example.jp"),
    ]);

    let call = cdr("replayed", CALLED, Some("09011112222"), "allowed", "no_answer");
    h.produce(TOPIC, std::slice::from_ref(&call)).await;
    h.mails(1).await;
    h.produce(TOPIC, &[call, cdr("control", "0698765432", None, "withheld", "no_answer")]).await;
    let mails = h.mails(2).await;
    assert_eq!(mails.len(), 2);
    assert_eq!(mails[1].rcpt_to, ["control@example.jp"], "the replay sent nothing");
    assert_eq!(engine.metric("callnotify_mails_duplicate_total"), 1.0);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_cdrs_go_to_the_dead_letter_topic_and_the_partition_moves_on() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);

    h.produce(
        TOPIC,
        &[
            "{not json".to_owned(),
            cdr("bad-called", "03-1234", Some("09011112222"), "allowed", "no_answer"),
            cdr("good", CALLED, Some("09011112222"), "allowed", "no_answer"),
        ],
    )
    .await;
    let mails = h.mails(1).await;
    assert!(parse(&mails[0]).body.contains("09011112222"));

    let mut records = h.dead_letters(2);
    assert_eq!(records.len(), 2, "{records:#?}");
    // Written concurrently: order them by the offset they record.
    records.sort_by_key(|r| r["offset"].as_i64());
    assert_eq!(records[0]["kind"], "cdr");
    assert_eq!(records[0]["topic"], TOPIC);
    assert_eq!(records[0]["offset"], 0);
    assert_eq!(records[0]["raw_base64"], "e25vdCBqc29u", "the raw bytes are kept");
    assert!(records[0]["reason"].as_str().unwrap().contains("JSON"), "{}", records[0]);
    assert!(records[1]["reason"].as_str().unwrap().contains("called"), "{}", records[1]);
    assert_eq!(engine.metric(r#"callnotify_cdrs_rejected_total{reason="syntax"}"#), 1.0);
    assert_eq!(engine.metric(r#"callnotify_cdrs_rejected_total{reason="invalid_field"}"#), 1.0);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_a_mail_refused_for_good_is_dead_lettered_and_counted() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    engine.provision(&[
        plain_subscriber(CALLED, "nobody@example.jp"),
        plain_subscriber("0698765432", "control@example.jp"),
    ]);

    h.sink.fail_next(SmtpStage::RcptTo, 550, 1);
    h.produce(TOPIC, &[cdr("refused", CALLED, Some("09011112222"), "allowed", "no_answer")]).await;
    let records = h.dead_letters(1);
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r["kind"], "mail");
    assert_eq!(r["call_id"], "refused");
    assert_eq!(r["called"], CALLED);
    assert_eq!(r["recipient"], "nobody@example.jp");
    assert_eq!(r["attempts"], 1, "a 5xx is never retried");
    assert!(r["smtp_reply"].as_str().unwrap().contains("550"), "{r}");

    // The partition moves on, and the refused mail is not tried again.
    h.produce(TOPIC, &[cdr("after", "0698765432", Some("09011112222"), "allowed", "no_answer")]).await;
    let mails = h.mails(1).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].rcpt_to, ["control@example.jp"]);
    assert_eq!(engine.metric(r#"callnotify_mails_failed_total{reason="permanent"}"#), 1.0);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_temporary_smtp_failures_are_retried_until_delivered() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);

    h.sink.fail_next(SmtpStage::DataEnd, 451, 3);
    h.produce(TOPIC, &[cdr("retried", CALLED, Some("09011112222"), "allowed", "no_answer")]).await;
    let mails = h.mails(1).await;
    assert_eq!(mails.len(), 1);
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_mails_retried_total"), 3.0);
    assert_eq!(stopped.metric("callnotify_mails_sent_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m3_flooded_recipients_are_delayed_not_dropped() {
    let h = Harness::new(1).await;
    let engine = h.engine_with(&[("CALLNOTIFY__SMTP__PER_RECIPIENT_PER_MINUTE", "60")]).await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);

    // 60 a minute is a burst of 30, then one every 2 s: the 31st to 34th wait.
    let cdrs: Vec<String> = missed_calls(CALLED, "flood", 34);
    h.produce(TOPIC, &cdrs).await;
    let mails = h.mails(34).await;
    assert_eq!(mails.len(), 34);
    assert!(engine.metric(r#"callnotify_mails_delayed_total{limit="flood"}"#) >= 4.0);
    engine.stop().await;
}

/// One address over its flood limit holds up nobody else: its mails wait in the retry
/// queue, and their CDRs are done. First attempts over the limit used to wait inside
/// their delivery tasks, each holding a CDR in flight: a shared mailbox called more
/// often than its limit filled `engine.max_in_flight`, the consumer paused, and every
/// other subscriber's calls waited with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m3_an_address_over_its_flood_limit_holds_up_no_other_subscriber() {
    const HOT: usize = 10;
    let h = Harness::new(1).await;
    // 2 a minute: one at once, the next a minute later.
    let engine = h
        .engine_with(&[
            ("CALLNOTIFY__SMTP__PER_RECIPIENT_PER_MINUTE", "2"),
            ("CALLNOTIFY__ENGINE__MAX_IN_FLIGHT", "5"),
            ("CALLNOTIFY__ENGINE__SHUTDOWN_GRACE_SECS", "2"),
        ])
        .await;
    engine
        .provision(&[plain_subscriber(CALLED, "office@example.jp"), plain_subscriber("0698765432", "jiro@example.jp")]);
    let mut cdrs: Vec<String> = missed_calls(CALLED, "hot", HOT);
    cdrs.push(cdr("other", "0698765432", Some("09011112222"), "allowed", "no_answer"));
    h.produce(TOPIC, &cdrs).await;
    let mails = h.mails(2).await;
    let mut to: Vec<&str> = mails.iter().map(|m| m.rcpt_to[0].as_str()).collect();
    to.sort_unstable();
    assert_eq!(to, ["jiro@example.jp", "office@example.jp"], "the other subscriber's mail waited");
    engine.wait_metric("callnotify_cdrs_consumed_total", (HOT + 1) as f64).await;
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), (HOT - 1) as f64, "the rest wait in the queue");
}

/// R-M3 counts mails per mailbox: one address written in two cases (`Office@` on one
/// number, `office@` on another) is one mailbox, and shares one allowance. Each spelling
/// used to get an allowance of its own, so a shared mailbox got twice its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m3_an_address_written_in_another_case_shares_its_flood_limit() {
    let h = Harness::new(1).await;
    // 2 a minute: one at once, the next a minute later.
    let engine = h
        .engine_with(&[
            ("CALLNOTIFY__SMTP__PER_RECIPIENT_PER_MINUTE", "2"),
            ("CALLNOTIFY__ENGINE__SHUTDOWN_GRACE_SECS", "2"),
        ])
        .await;
    engine.provision(&[
        plain_subscriber(CALLED, "Office@example.jp"),
        plain_subscriber("0698765432", "office@example.jp"),
    ]);
    h.produce(
        TOPIC,
        &[
            cdr("upper", CALLED, Some("09011112222"), "allowed", "no_answer"),
            cdr("lower", "0698765432", Some("09011112222"), "allowed", "no_answer"),
        ],
    )
    .await;
    engine.wait_metric(r#"callnotify_mails_delayed_total{limit="flood"}"#, 1.0).await;
    let stopped = engine.stop().await;
    assert_eq!(h.sink.count(), 1, "the mailbox got one mail at once, not one per spelling");
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), 1.0, "the other waits its turn");
}

/// R-M4, `smtp.retry_give_up_secs`: the mails waiting for an address over its flood
/// limit each get a turn of their own, one flood period after the other; one whose turn
/// would come after the give-up age is dead-lettered as expired at once, as it would be
/// then. They queued without end (an address called more often than its limit for a
/// day), all falling due at the next turn, and went out days late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_mails_whose_flood_turn_comes_after_the_give_up_age_are_given_up() {
    let h = Harness::new(1).await;
    // 2 a minute: one at once, then one a minute; given up after 90 s.
    let engine = h
        .engine_with(&[
            ("CALLNOTIFY__SMTP__PER_RECIPIENT_PER_MINUTE", "2"),
            ("CALLNOTIFY__SMTP__RETRY_GIVE_UP_SECS", "90"),
            ("CALLNOTIFY__ENGINE__SHUTDOWN_GRACE_SECS", "2"),
        ])
        .await;
    engine.provision(&[plain_subscriber(CALLED, "office@example.jp")]);
    let cdrs: Vec<String> = missed_calls(CALLED, "busy", 5);
    h.produce(TOPIC, &cdrs).await;
    // The first goes at once, the second waits its turn a minute on, the other three's
    // turns would come after 90 s.
    engine.wait_metric(r#"callnotify_mails_failed_total{reason="expired"}"#, 3.0).await;
    let mails = h.mails(1).await;
    assert_eq!(mails.len(), 1);
    let records = h.dead_letters(3);
    assert!(records.iter().all(|r| r["smtp_reply"].as_str().unwrap().contains("retry_give_up_secs")), "{records:?}");
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), 1.0, "the second waits its turn");
    assert_eq!(stopped.metric(r#"callnotify_mails_failed_total{reason="expired"}"#), 3.0);
}

/// Flood control used to apply to first attempts only: mails deferred by a 451 came
/// back from the retry queue all at once (57 to one address within 6 s after an
/// outage). A retried mail over its recipient's limit goes back into the queue until
/// the limit allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m3_retried_mails_keep_to_the_flood_limit() {
    let h = Harness::new(1).await;
    // 4 a minute: a burst of 2, then one every 30 s.
    let engine = h
        .engine_with(&[
            ("CALLNOTIFY__SMTP__PER_RECIPIENT_PER_MINUTE", "4"),
            ("CALLNOTIFY__ENGINE__SHUTDOWN_GRACE_SECS", "2"),
        ])
        .await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);
    h.sink.fail_next(SmtpStage::DataEnd, 451, 2);
    let cdrs: Vec<String> = missed_calls(CALLED, "deferred", 2);
    h.produce(TOPIC, &cdrs).await;
    // Both first attempts took the burst and were deferred; their retries are over it.
    engine.wait_metric(r#"callnotify_mails_delayed_total{limit="flood"}"#, 1.0).await;
    let stopped = engine.stop().await;
    assert_eq!(h.sink.count(), 0, "no retried mail went past the limit");
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), 2.0, "both wait in the queue");
}

/// R-M3 across a restart: the limiter lives in memory, but the mails of the last minute
/// are in the store, and the next engine counts them. A recipient that had its burst
/// just before a restart does not get a fresh one after it (it used to: a restart or a
/// redeploy doubled what one address could get in a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m3_a_restart_does_not_grant_a_recipient_a_fresh_flood_allowance() {
    let h = Harness::new(1).await;
    // 4 a minute: a burst of 2, then one every 30 s.
    let limited =
        [("CALLNOTIFY__SMTP__PER_RECIPIENT_PER_MINUTE", "4"), ("CALLNOTIFY__ENGINE__SHUTDOWN_GRACE_SECS", "2")];
    let first = h.engine_with(&limited).await;
    first.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);
    let call = |i: usize| cdr(&format!("flood-{i}"), CALLED, Some("09011112222"), "allowed", "no_answer");
    h.produce(TOPIC, &[call(0), call(1)]).await;
    h.mails(2).await;
    first.stop().await;

    let second = h.engine_with(&limited).await;
    h.produce(TOPIC, &[call(2)]).await;
    second.wait_metric(r#"callnotify_mails_delayed_total{limit="flood"}"#, 1.0).await;
    let stopped = second.stop().await;
    assert_eq!(h.sink.count(), 2, "the third mail waits for the limit, restart or not");
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), 1.0, "it waits in the queue, not lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_a_deferred_mail_waits_in_the_durable_queue_while_its_partition_moves_on_and_survives_a_restart() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    engine.provision(&[plain_subscriber(CALLED, "slow@example.jp"), plain_subscriber("0698765432", "fast@example.jp")]);

    h.sink.refuse_recipient("slow@example.jp", Some(451));
    h.produce(
        TOPIC,
        &[
            cdr("deferred", CALLED, Some("09011112222"), "allowed", "no_answer"),
            cdr("behind-it", "0698765432", Some("09011112222"), "allowed", "no_answer"),
        ],
    )
    .await;
    let mails = h.mails(1).await;
    assert_eq!(mails[0].rcpt_to, ["fast@example.jp"], "the CDR behind the deferred one was not held up");
    engine.wait_metric("callnotify_retry_queue_mails", 1.0).await;
    let stopped = engine.stop().await;
    assert!(stopped.metric("callnotify_mails_retried_total") >= 1.0);

    // The mail server recovers while no engine runs; the next one, on the same store
    // and group, sends the queued mail and reads neither CDR again.
    h.sink.refuse_recipient("slow@example.jp", None);
    let engine = h.engine().await;
    h.produce(TOPIC, &[cdr("after-restart", "0698765432", Some("09011112222"), "allowed", "no_answer")]).await;
    let mails = h.mails(3).await;
    let stopped = engine.stop().await;
    let mut ids: Vec<String> = mails.iter().map(|m| parse(m).message_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((mails.len(), ids.len()), (3, 3), "each mail once: {:#?}", summary(&mails));
    assert!(mails.iter().any(|m| m.rcpt_to == ["slow@example.jp"]));
    assert_eq!(stopped.metric("callnotify_cdrs_consumed_total"), 1.0, "offsets were committed past the queued mail");
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_a_mail_still_deferred_at_the_give_up_age_is_dead_lettered() {
    let h = Harness::new(1).await;
    let engine = h.engine_with(&[("CALLNOTIFY__SMTP__RETRY_GIVE_UP_SECS", "1")]).await;
    engine.provision(&[plain_subscriber(CALLED, "slow@example.jp")]);

    h.sink.refuse_recipient("slow@example.jp", Some(452));
    h.produce(TOPIC, &[cdr("expired", CALLED, Some("09011112222"), "allowed", "no_answer")]).await;
    let records = h.dead_letters(1);
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!((r["kind"].as_str(), r["call_id"].as_str()), (Some("mail"), Some("expired")));
    assert_eq!(r["recipient"], "slow@example.jp");
    assert!(r["attempts"].as_u64().unwrap() >= 2, "{r}");
    let reply = r["smtp_reply"].as_str().unwrap();
    assert!(reply.contains("gave up") && reply.contains("452"), "{reply}");

    let stopped = engine.stop().await;
    assert_eq!(stopped.metric(r#"callnotify_mails_failed_total{reason="expired"}"#), 1.0);
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), 0.0, "never retried again");
    assert_eq!(h.sink.count(), 0);
}

/// R-N2, R-M3: a mail waits in the retry queue (the server answers 451 for its
/// address), and the subscriber unchecks the address meanwhile (typed wrong: a
/// stranger's). The queued mail still went there once the server took it, for up to a
/// day; it is now withdrawn at its next turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m3_a_queued_mail_to_an_address_unchecked_meanwhile_is_not_sent() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    engine.provision(&[plain_subscriber(CALLED, "stranger@example.jp")]);
    h.sink.refuse_recipient("stranger@example.jp", Some(451));
    h.produce(TOPIC, &[cdr("queued", CALLED, Some("09011112222"), "allowed", "no_answer")]).await;
    engine.wait_metric("callnotify_mails_retried_total", 1.0).await;

    let record = engine.store.number(&engine::phone::PhoneNumber::parse(CALLED).unwrap()).unwrap().unwrap();
    let mut unchecked = record.call.clone();
    unchecked.destinations[0].send = false;
    engine.store.save_call_settings(&record.number, record.call.version, unchecked).unwrap();
    h.sink.refuse_recipient("stranger@example.jp", None);
    engine.wait_metric("callnotify_mails_withdrawn_total", 1.0).await;
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), 0.0);
    assert_eq!(h.sink.count(), 0, "nothing reached the unchecked address");
}

/// R-M3, R-N2: a queued mail whose number moved to another line meanwhile (its new
/// subscriber's settings start empty) is withdrawn; one whose address the subscriber
/// saved again in other case still goes (the same mailbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m3_a_queued_mail_of_a_moved_number_is_withdrawn_and_one_re_saved_in_other_case_is_sent() {
    const MOVED: &str = "0312345601";
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    engine.provision(&[plain_subscriber(MOVED, "old@example.jp"), plain_subscriber(CALLED, "Taro@Example.jp")]);
    h.sink.refuse_recipient("old@example.jp", Some(451));
    h.sink.refuse_recipient("Taro@Example.jp", Some(451));
    h.produce(
        TOPIC,
        &[
            cdr("moved", MOVED, Some("09011112222"), "allowed", "no_answer"),
            cdr("re-saved", CALLED, Some("09011112222"), "allowed", "no_answer"),
        ],
    )
    .await;
    engine.wait_metric("callnotify_mails_retried_total", 2.0).await;

    let other_line = serde_json::json!({"contract": "0398765432", "numbers": [
        {"number": "0398765432", "services": ["call"]}, {"number": MOVED, "services": ["call"]},
    ]});
    engine.provision(&[other_line.to_string()]);
    let number = engine::phone::PhoneNumber::parse(CALLED).unwrap();
    let record = engine.store.number(&number).unwrap().unwrap();
    let mut lower = record.call.clone();
    lower.destinations[0].address = engine::address::DestinationAddress::parse("taro@example.jp").unwrap();
    engine.store.save_call_settings(&number, record.call.version, lower).unwrap();
    h.sink.refuse_recipient("old@example.jp", None);
    h.sink.refuse_recipient("Taro@Example.jp", None);

    let mails = h.mails(1).await;
    assert_eq!(mails[0].rcpt_to, ["Taro@Example.jp"]);
    engine.wait_metric("callnotify_mails_withdrawn_total", 1.0).await;
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), 0.0);
    assert_eq!(h.sink.count(), 1, "nothing to the moved number's old address");
}

/// R-M4, `smtp.retry_give_up_secs`: a mail whose next turn comes after the give-up age
/// is given up at that turn, not tried: the age was checked only after a failed attempt,
/// so mails queued before a stop of days went out, days late, when the server took them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_a_queued_mail_past_the_give_up_age_at_its_turn_is_not_sent_late() {
    let h = Harness::new(1).await;
    let engine = h
        .engine_with(&[
            ("CALLNOTIFY__SMTP__RETRY_GIVE_UP_SECS", "1"),
            ("CALLNOTIFY__SMTP__RETRY_FIRST_DELAY_MS", "2000"),
            ("CALLNOTIFY__SMTP__RETRY_MAX_DELAY_MS", "2000"),
        ])
        .await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);
    h.sink.fail_next(SmtpStage::DataEnd, 451, 1);
    h.produce(TOPIC, &[cdr("late", CALLED, Some("09011112222"), "allowed", "no_answer")]).await;
    let records = h.dead_letters(1);
    assert_eq!((records[0]["kind"].as_str(), records[0]["call_id"].as_str()), (Some("mail"), Some("late")));
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric(r#"callnotify_mails_failed_total{reason="expired"}"#), 1.0);
    assert_eq!(h.sink.count(), 0, "not sent past its give-up age");
}

/// R-M4, `smtp.retry_give_up_secs`: mails that wait while the mail server is down (the
/// circuit breaker open) are dead-lettered as expired once they have failed that long,
/// each of them. The give-up age was checked only after an attempt, and while the
/// breaker is open only one probe per cool-down (`smtp.timeout_secs`, 30 s) is tried:
/// with 10 000 mails queued, most waited days past it, and all went out, stale, when the
/// server came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_mails_waiting_behind_an_open_circuit_breaker_are_given_up_at_the_give_up_age() {
    const MAILS: usize = 10;
    let h = Harness::new(1).await;
    // Nothing listens on the mail server's port: each attempt is refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let engine = h
        .engine_with(&[
            ("CALLNOTIFY__SMTP__PORT", &port.to_string()),
            ("CALLNOTIFY__SMTP__TIMEOUT_SECS", "30"),
            ("CALLNOTIFY__SMTP__RETRY_GIVE_UP_SECS", "2"),
        ])
        .await;
    h.produce(TOPIC, &missed_calls_to_ten(&engine, "03500000", "down", MAILS)).await;
    engine.wait_metric(r#"callnotify_mails_failed_total{reason="expired"}"#, MAILS as f64).await;
    // A mail queued behind the open breaker and never tried says so: it was said to have
    // had an attempt ("gave up after 1 attempts … not tried").
    let records = h.dead_letters(MAILS);
    let untried: Vec<_> = records.iter().filter(|r| r["smtp_reply"].as_str().unwrap().contains("not tried")).collect();
    assert!(!untried.is_empty(), "the breaker held mails untried: {records:?}");
    for r in untried {
        assert_eq!(r["attempts"], 0, "{r}");
        assert!(r["smtp_reply"].as_str().unwrap().starts_with("gave up after 0 attempts"), "{r}");
    }
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_smtp_circuit_open"), 1.0, "the server stayed down throughout");
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), 0.0);
    assert_eq!(stopped.metric(r#"callnotify_mails_failed_total{reason="expired"}"#), MAILS as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_4xx_replies_are_retried_until_delivered_and_5xx_replies_dead_lettered_at_once() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);

    let deferrals = [(SmtpStage::MailFrom, 421), (SmtpStage::RcptTo, 451), (SmtpStage::DataEnd, 452)];
    for (i, (stage, code)) in deferrals.into_iter().enumerate() {
        h.sink.fail_next(stage, code, 2);
        h.produce(TOPIC, &[cdr(&format!("deferred-{code}"), CALLED, Some("09011112222"), "allowed", "no_answer")])
            .await;
        h.mails(i + 1).await;
    }
    for (i, (stage, code)) in [(SmtpStage::RcptTo, 550), (SmtpStage::DataEnd, 554)].into_iter().enumerate() {
        h.sink.fail_next(stage, code, 1);
        h.produce(TOPIC, &[cdr(&format!("refused-{code}"), CALLED, Some("09011112222"), "allowed", "no_answer")]).await;
        engine.wait_metric(r#"callnotify_mails_failed_total{reason="permanent"}"#, i as f64 + 1.0).await;
    }
    let mut records = h.dead_letters(2);
    records.sort_by_key(|r| r["call_id"].as_str().map(str::to_owned));
    assert_eq!(records.len(), 2);
    for (r, code) in records.iter().zip(["550", "554"]) {
        assert_eq!(r["call_id"], format!("refused-{code}"));
        assert_eq!(r["attempts"], 1, "a 5xx is never retried: {r}");
        assert!(r["smtp_reply"].as_str().unwrap().contains(code), "{r}");
    }
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_mails_retried_total"), 6.0, "two deferrals of each 4xx mail");
    assert_eq!(h.sink.count(), 3);
}

/// A timeout after DATA is ambiguous: the server may have taken the mail. It is retried,
/// so the subscriber may get it twice (docs/delivery.md) but never not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_or_a_dropped_connection_after_data_is_retried() {
    let h = Harness::new(1).await;
    let engine = h.engine_with(&[("CALLNOTIFY__SMTP__TIMEOUT_SECS", "1")]).await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);

    h.sink.after_data(DataFault::Hang, 1);
    h.produce(TOPIC, &[cdr("hung", CALLED, Some("09011112222"), "allowed", "no_answer")]).await;
    h.mails(1).await;
    h.sink.after_data(DataFault::Drop, 1);
    h.produce(TOPIC, &[cdr("dropped", CALLED, Some("09011112222"), "allowed", "no_answer")]).await;
    let mails = h.mails(2).await;
    let stopped = engine.stop().await;
    assert_eq!(mails.len(), 2);
    // The hang went through the retry queue; a dropped pooled connection is resent at
    // once on a new one.
    assert!(stopped.metric("callnotify_mails_retried_total") >= 1.0);
    assert_eq!(stopped.metric("callnotify_mails_sent_total"), 2.0);
}

/// Backpressure: with `engine.max_in_flight` CDRs waiting on a mail server that does not
/// answer, the engine reads no further CDR (first by not polling, after a second by
/// pausing its partitions) and holds them all. Once the mails time out into the retry
/// queue, it reads on, and every mail arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_server_that_stops_answering_holds_the_engine_at_max_in_flight_and_nothing_is_lost() {
    held_at_max_in_flight(1).await;
}

/// The same with two consumer threads over four partitions: the limit counts both
/// threads' CDRs, so both pause, however the CDRs fall between them. Each thread may
/// read one CDR past the limit as the other reaches it (docs/architecture.md, `engine.max_in_flight`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumer_threads_are_held_together_at_max_in_flight() {
    held_at_max_in_flight(2).await;
}

async fn held_at_max_in_flight(consumers: usize) {
    const CALLS: usize = 12;
    const LIMIT: usize = 4;
    let h = Harness::new(if consumers == 1 { 1 } else { 4 }).await;
    let engine = h
        .engine_with(&[
            ("CALLNOTIFY__ENGINE__MAX_IN_FLIGHT", &LIMIT.to_string()),
            ("CALLNOTIFY__ENGINE__CONSUMERS", &consumers.to_string()),
            ("CALLNOTIFY__SMTP__TIMEOUT_SECS", "4"),
            ("CALLNOTIFY__SMTP__RETRY_FIRST_DELAY_MS", "100"),
        ])
        .await;
    let paused = |n: usize| format!("callnotify_consumer_paused{{consumer=\"{n}\"}}");
    for n in 0..consumers {
        engine.wait_shown(&paused(n)).await; // as 0, before any CDR is produced
    }
    // The harness's four topics (three of CDRs, one of faxes).
    engine.wait_partitions_shared(consumers, if consumers == 1 { 4 } else { 16 }).await;
    h.sink.after_data(DataFault::Hang, LIMIT);
    let cdrs = missed_calls_to_ten(&engine, "03400000", "held", CALLS);
    h.produce(TOPIC, &cdrs).await;

    // The pause comes a second after the limit, within the mail server's 4 s timeout.
    for n in 0..consumers {
        engine.wait_metric(&paused(n), 1.0).await;
    }
    let read = engine.metric("callnotify_cdrs_consumed_total") as usize;
    assert!((LIMIT..LIMIT + consumers).contains(&read), "{read} CDRs read: nothing beyond the limit");
    assert_eq!(engine.metric("callnotify_cdrs_in_flight"), LIMIT as f64);

    let mails = h.mails(CALLS).await;
    let stopped = engine.stop().await;
    for n in 0..consumers {
        assert_eq!(stopped.metric(&paused(n)), 0.0, "resumed once the mails timed out into the queue");
    }
    assert_each_call_once(&mails, CALLS);
    assert_eq!(stopped.metric("callnotify_cdrs_consumed_total"), CALLS as f64, "each CDR read once");
}

/// A mail server that accepts connections and never answers used to hold everything:
/// each mail waited out `smtp.timeout_secs` before reaching the retry queue, the CDRs
/// behind them piled up to `engine.max_in_flight`, the consumer paused, and CDRs that
/// need no mail waited too. Now a few unanswered attempts open the circuit breaker:
/// later mails go straight to the queue, every CDR is read without each mail trying
/// the server, and once a real server listens there every mail arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_a_mail_server_that_never_answers_holds_neither_cdrs_nor_more_than_a_few_mails() {
    const MAILS: usize = 30;
    const OTHERS: usize = 270;
    let h = Harness::new(1).await;
    // The hung server: takes every connection and says nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    let hung = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket);
        }
    });
    let engine = h
        .engine_with(&[
            ("CALLNOTIFY__SMTP__PORT", &port.to_string()),
            ("CALLNOTIFY__SMTP__TIMEOUT_SECS", "2"),
            ("CALLNOTIFY__ENGINE__MAX_IN_FLIGHT", "5"),
        ])
        .await;
    let mut cdrs = missed_calls_to_ten(&engine, "03500000", "hung", MAILS);
    cdrs.extend((0..OTHERS).map(|i| cdr(&format!("nobody-{i}"), "0699990000", None, "withheld", "no_answer")));
    h.produce(TOPIC, &cdrs).await;

    engine.wait_metric("callnotify_cdrs_consumed_total", (MAILS + OTHERS) as f64).await;
    engine.wait_metric("callnotify_retry_queue_mails", MAILS as f64).await;
    let tried = connections.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(engine.metric("callnotify_smtp_circuit_open"), 1.0);
    // Nothing is lost while it lasts: the engine stays ready and says why mails wait.
    let ready = engine.get("/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains("mail server: not answering: mails wait in the retry queue"), "{ready}");
    assert!(tried <= 8, "{tried} connections to the hung server: the mails after the first went to the queue");

    // A real server on the same port: the breaker's next probe gets an answer.
    hung.abort();
    let _ = hung.await;
    let sink = testkit::smtp::SmtpSink::start(port).await.expect("a sink on the hung server's port");
    let mails = sink.wait_for(MAILS, WAIT).await;
    let stopped = engine.stop().await;
    assert_each_call_once(&mails, MAILS);
    assert_eq!(stopped.metric("callnotify_smtp_circuit_open"), 0.0, "closed once the server answered");
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), 0.0);
}

/// A retry-queue entry that cannot be read back (damaged, or written by another
/// version) is removed and counted as `unreadable`: it was counted as a render failure,
/// which sent an operator looking at the templates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_an_unreadable_retry_queue_entry_is_removed_and_counted_as_unreadable_not_render() {
    let h = Harness::new(1).await;
    let settings = h.settings(&[]);
    {
        let store = engine::store::Store::open(&settings.store.path).expect("store");
        let retry = store.open_tree("retry").expect("the retry queue's tree");
        let mut slot = 0u64.to_be_bytes().to_vec();
        slot.extend_from_slice(b"damaged");
        retry.insert(slot, b"{not an entry".as_slice()).expect("insert");
        store.flush_blocking().expect("flush");
    }
    let engine = TestEngine::start(settings).await;
    engine.wait_metric("callnotify_mails_failed_total{reason=\"unreadable\"}", 1.0).await;
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_mails_failed_total{reason=\"render\"}"), 0.0);
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), 0.0, "the entry is gone");
    assert_eq!(
        stopped.metric("callnotify_errors_total{stage=\"retry_queue\",error=\"unreadable_entry\"}"),
        1.0,
        "the ERROR it logs is counted with it"
    );
}

/// R-M4 ("once", and never lost): a CDR read again while its mail is still on its way
/// (the same call in two partitions here; in a cluster, a partition revoked while its
/// task still writes the mail's fate and given back to this node) is done only once that
/// mail is sent or queued. Before, the second reading found the mail claimed and was done
/// at once: its offset could be committed while the mail was neither sent nor queued,
/// and a node lost then lost the mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_a_cdr_read_again_while_its_mail_is_on_its_way_is_done_only_with_that_mail() {
    const OTHER: &str = "0311112222";
    let h = Harness::new(2).await;
    let engine = h.engine_with(&[("CALLNOTIFY__SMTP__TIMEOUT_SECS", "3")]).await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp"), plain_subscriber(OTHER, "hanako@example.jp")]);
    let twice = cdr("twice", CALLED, Some("09011112222"), "allowed", "no_answer");

    // The first reading's mail: its server does not answer the end of DATA (3 s).
    h.sink.after_data(DataFault::Hang, 1);
    h.produce_to(TOPIC, 0, &twice).await;
    testkit::wait::until(WAIT, || "the first mail never reached the server".into(), || h.sink.data_faults_left() == 0)
        .await;
    // The second reading, then another call behind it in its partition: once that call's
    // mail is in, the second reading has been through the pipeline.
    h.produce_to(TOPIC, 1, &twice).await;
    h.produce_to(TOPIC, 1, &cdr("behind", OTHER, Some("09011112222"), "allowed", "no_answer")).await;
    let mails = h.mails(1).await;
    assert_eq!(mails[0].rcpt_to, vec!["hanako@example.jp".to_owned()]);
    assert_eq!(
        engine.metric("callnotify_mails_duplicate_total"),
        0.0,
        "the second reading is not done while the first one's mail is neither sent nor queued"
    );

    // The first mail times out into the retry queue and is sent from there; the second
    // reading then finds it handled.
    let mails = h.mails(2).await;
    engine.wait_metric("callnotify_mails_duplicate_total", 1.0).await;
    let stopped = engine.stop().await;
    assert_each_call_once(&mails, 2);
    assert_eq!(stopped.metric("callnotify_mails_sent_total"), 2.0);
    assert_eq!(h.sink.count(), 2, "{:#?}", summary(&h.sink.mails()));
}

/// R-N2, R-M4: an address listed twice on a number (an import does not refuse it), or
/// in other cases of its letters (one mailbox: it got a mail per spelling), gets one
/// mail per call, and the calls behind it are notified: its second listing's claim is
/// not left waiting on the first, held by the same reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_n2_an_address_listed_twice_gets_one_mail_and_holds_nothing_up() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let listed = [("taro@example.jp", true), ("taro@example.jp", true), ("Taro@Example.JP", true)];
    let twice = Subscriber::new(CALLED, &listed);
    engine.provision(&[twice.line()]);
    let calls: Vec<String> =
        (1..=2).map(|i| cdr(&format!("twice-{i}"), CALLED, Some("09011112222"), "allowed", "no_answer")).collect();
    h.produce(TOPIC, &calls).await;
    let mails = h.mails_after_control_call(&engine, 3).await;
    let stopped = engine.stop().await;
    assert_eq!(mails.len(), 3, "{:#?}", summary(&mails));
    assert_each_call_once(&mails, 3);
    assert_eq!(stopped.metric("callnotify_mails_duplicate_total"), 0.0);
}

/// R-M4: a relay refusing the sender (`smtp.from` not an address its account may use,
/// the engine's address dropped: 553, 554 5.7.1) refuses every mail alike: the
/// operator's to fix, not the mails'. They were dead-lettered at once, each (and
/// `dead-letters replay` wants the engine stopped); they wait in the retry queue and go
/// once the relay takes the sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_a_refused_sender_keeps_the_mails_for_a_retry() {
    let h = Harness::new(1).await;
    let engine = h.engine_with(&[("CALLNOTIFY__SMTP__RETRY_FIRST_DELAY_MS", "100")]).await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);
    h.sink.fail_next(testkit::smtp::SmtpStage::MailFrom, 553, 3);
    h.produce(TOPIC, &[cdr("sender-refused", CALLED, Some("09011112222"), "allowed", "no_answer")]).await;
    let mails = h.mails_after_control_call(&engine, 2).await;
    let stopped = engine.stop().await;
    assert_each_call_once(&mails, 2);
    assert_eq!(stopped.metric(r#"callnotify_dead_letters_total{kind="mail"}"#), 0.0, "none given up");
    assert!(stopped.metric("callnotify_mails_retried_total") >= 1.0);
}
