//! What an operator's Prometheus scrapes.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_as_prometheus_text_and_count_the_path() {
    let h = Harness::new(1).await;
    // librdkafka reports lag with its statistics; every 100 ms here instead of 5 s.
    let engine = h.engine_with(&[("CALLNOTIFY__KAFKA__PROPERTIES__STATISTICS_INTERVAL_MS", "100")]).await;
    engine.provision(&[plain_subscriber("0312345678", "taro@example.jp")]);
    h.produce(
        TOPIC,
        &[
            cdr("m-1", "0312345678", Some("09011112222"), "allowed", "no_answer"),
            cdr("m-2", "0399999999", Some("09011112222"), "allowed", "no_answer"),
            "garbage".to_owned(),
        ],
    )
    .await;
    h.mails(1).await;
    h.dead_letters(1);

    let response = engine.get("/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("content-type: text/plain; version=0.0.4"), "{response}");
    for line in [
        "callnotify_cdrs_consumed_total 3",
        "callnotify_cdrs_decoded_total 2",
        r#"callnotify_cdrs_rejected_total{reason="syntax"} 1"#,
        r#"callnotify_cdrs_filtered_total{reason="not_subscribed"} 1"#,
        "callnotify_cdrs_notified_total 1",
        r#"callnotify_dead_letters_total{kind="cdr"} 1"#,
        "# HELP callnotify_mails_delayed_total",
    ] {
        assert!(response.lines().any(|l| l == line || l.starts_with(line)), "missing {line:?} in\n{response}");
    }
    assert!(engine.get("/healthz").await.ends_with("ok\n"));
    let ready = engine.get("/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let assigned = engine.metric("callnotify_consumer_partitions{consumer=\"0\"}");
    assert!(assigned > 0.0);
    let parts = format!("ready\nstore: ok\nconsuming: {assigned} partitions assigned\nmail server: ok\n");
    assert!(ready.ends_with(&parts), "{ready}");

    // Consumer lag per partition, from librdkafka's statistics: everything was read.
    let lag = r#"callnotify_consumer_lag_messages{topic="cdr",partition="0"} 0"#;
    let deadline = std::time::Instant::now() + WAIT;
    let mut last = String::new();
    while !last.lines().any(|l| l == lag) && std::time::Instant::now() < deadline {
        // librdkafka's statistics timer is its own: there is no clock to move.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        last = engine.get("/metrics").await;
    }
    assert!(last.lines().any(|l| l == lag), "no lag gauge at 0 in\n{last}");
    // Counted once the server's 250 is read, which may trail the sink's own count.
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_mails_sent_total"), 1.0);
    assert_eq!(stopped.metric("callnotify_notification_latency_seconds_count"), 1.0);
    assert_eq!(stopped.metric("callnotify_smtp_connections_opened_total"), 1.0, "one session for the one mail");
}
