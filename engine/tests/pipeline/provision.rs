//! Provisioning into the running engine over its operator endpoint (R-L3): the write
//! governs the very next CDR, without a restart.

use crate::helpers::*;

async fn post(url: String, jsonl: String) -> engine::ops::ProvisionResponse {
    tokio::task::spawn_blocking(move || engine::ops::post_provision(&url, jsonl.as_bytes()))
        .await
        .unwrap()
        .expect("the endpoint answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_l3_lines_provisioned_over_http_govern_the_next_cdr() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let url = format!("http://{}", engine.metrics_addr);
    let mut subscriber = Subscriber { enabled: false, ..Subscriber::new("0312345678", &[("taro@example.jp", true)]) };

    let report =
        post(url.clone(), format!("{}\n{}", subscriber.line(), r#"{"contract":"03-1234","numbers":[]}"#)).await;
    assert_eq!((report.lines, report.numbers), (1, 1));
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].line, 2, "the bad line is named: {:?}", report.rejected);

    h.produce(TOPIC, &[cdr("p-1", "0312345678", Some("09011112222"), "allowed", "no_answer")]).await;
    // R-N1: stopped, so nothing; started over HTTP, the next call is notified.
    engine.wait_metric(r#"callnotify_cdrs_filtered_total{reason="stopped"}"#, 1.0).await;
    subscriber.enabled = true;
    let report = post(url, subscriber.line()).await;
    assert!(report.rejected.is_empty());
    h.produce(TOPIC, &[cdr("p-2", "0312345678", Some("09011112222"), "allowed", "no_answer")]).await;
    let mails = h.mails(1).await;
    assert_eq!(mails.len(), 1);
    assert!(parse(&mails[0]).message_id.len() > 10);
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric(r#"callnotify_cdrs_filtered_total{reason="stopped"}"#), 1.0, "p-1 was filtered");
    assert_eq!(stopped.metric("callnotify_mails_sent_total"), 1.0, "only p-2 was notified");
}
