//! What an operator's Prometheus scrapes.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_as_prometheus_text_and_count_the_path() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
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

    let response = get(engine.metrics_addr, "/metrics").await;
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
    assert!(get(engine.metrics_addr, "/healthz").await.ends_with("ok\n"));
    // Counted once the server's 250 is read, which may trail the sink's own count.
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_mails_sent_total"), 1.0);
    assert_eq!(stopped.metric("callnotify_notification_latency_seconds_count"), 1.0);
}
