//! The operator's dead-letter tools: list the records, replay the CDRs once their cause
//! is fixed (R-M4: failures are recorded and can be acted on).

use std::collections::BTreeMap;

use engine::dead_letter::review::{self, Filter, Replay};

use crate::helpers::*;

/// `review::list` and `review::replay` on a blocking thread (they wait on Kafka).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// R-M4: canonical CDRs written to a topic configured as asterisk are dead-lettered; the
/// operator lists them, fixes the topic's format, replays them (a dry run first), and
/// each call is notified once; a second replay sends nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_cdrs_dead_lettered_by_a_wrong_topic_format_are_replayed_once_it_is_fixed() {
    let h = Harness::new(1).await;
    let first = h.engine().await;
    first.provision(&[plain_subscriber("0312345678", "taro@example.jp")]);
    let cdrs: Vec<String> =
        (1..=2).map(|i| cdr(&format!("fix-{i}"), "0312345678", Some("09011112222"), "allowed", "no_answer")).collect();
    h.produce(ASTERISK_TOPIC, &cdrs).await;
    first.wait_metric(r#"callnotify_dead_letters_total{kind="cdr"}"#, 2.0).await;
    first.stop().await;

    let brokers = h.kafka.bootstrap_servers().to_owned();
    let list = |filter: Filter| {
        let brokers = brokers.clone();
        blocking(move || review::list(&brokers, &BTreeMap::new(), DEAD_LETTER_TOPIC, &filter).unwrap())
    };
    let replay = |dry_run: bool| {
        let brokers = brokers.clone();
        let filter = Filter { kind: Some("cdr".into()), ..Filter::default() };
        blocking(move || review::replay(&brokers, &BTreeMap::new(), DEAD_LETTER_TOPIC, &filter, dry_run).unwrap())
    };
    let listed = list(Filter::default()).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().all(|l| l.kind() == "cdr" && l.record["topic"] == ASTERISK_TOPIC && !l.replayed));
    assert!(list(Filter { kind: Some("mail".into()), ..Filter::default() }).await.is_empty());
    assert!(list(Filter { reason: Some("no such reason".into()), ..Filter::default() }).await.is_empty());
    let since = Some(chrono::Utc::now() + chrono::TimeDelta::minutes(1));
    assert!(list(Filter { since, ..Filter::default() }).await.is_empty(), "none written after now");

    let dry = replay(true).await;
    assert_eq!((dry.replayed.len(), dry.already), (2, 0));
    assert!(list(Filter::default()).await.iter().all(|l| !l.replayed), "a dry run changes nothing");

    // The fix: the topic's format as the exchange writes it.
    let topics = format!(r#"[{{name="{TOPIC}",format="canonical"}},{{name="{ASTERISK_TOPIC}",format="canonical"}}]"#);
    let fixed = h.engine_with(&[("CALLNOTIFY__KAFKA__TOPICS", &topics)]).await;
    let done = replay(false).await;
    assert_eq!(done.replayed, listed.iter().map(|l| (l.partition, l.offset)).collect::<Vec<_>>());
    let mails = h.mails(2).await;
    assert_each_call_once(&mails, 2);

    assert_eq!(replay(false).await, Replay { replayed: Vec::new(), already: 2, mails: 0 }, "each record once");
    assert!(list(Filter::default()).await.iter().all(|l| l.replayed));
    let stopped = fixed.stop().await;
    assert_eq!(stopped.metric("callnotify_mails_sent_total"), 2.0);
    assert_eq!(stopped.metric(r#"callnotify_dead_letters_total{kind="cdr"}"#), 0.0, "they decode now");
}
