//! Provisioning into the running engine over its operator endpoint (R-L3): the write
//! governs the very next CDR, without a restart.

use crate::helpers::*;

async fn post(url: String, jsonl: String) -> engine::ops::ProvisionResponse {
    tokio::task::spawn_blocking(move || engine::ops::post_provision(&url, jsonl.as_bytes(), ""))
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

/// One raw request to `addr`; the status code and body of the answer.
async fn raw_post(addr: std::net::SocketAddr, headers: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /provision HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, answer.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned()))
}

/// Any web page open on the operator's machine could post to the operator endpoint
/// (a form, or `text/plain` without a preflight) and rewrite subscribers' addresses.
/// A browser's request (it sends `Origin` or `Sec-Fetch-Site`) and a body that is not
/// JSON Lines are refused before anything is read; with `metrics.provision_token` set,
/// the token is needed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_l3_provisioning_refuses_cross_site_requests_other_bodies_and_a_missing_token() {
    let h = Harness::new(1).await;
    let engine = h.engine_with(&[("CALLNOTIFY__METRICS__PROVISION_TOKEN", "op-token-1")]).await;
    let line = Subscriber::new("0312345678", &[("attacker@evil.example", true)]).line();
    let ndjson = "Content-Type: application/x-ndjson\r\nAuthorization: Bearer op-token-1\r\n";
    for (headers, status) in [
        ("Content-Type: text/plain\r\nAuthorization: Bearer op-token-1\r\nOrigin: http://evil.example\r\n", 403),
        (&format!("{ndjson}Sec-Fetch-Site: cross-site\r\n"), 403),
        ("Content-Type: application/x-www-form-urlencoded\r\nAuthorization: Bearer op-token-1\r\n", 415),
        ("Content-Type: application/x-ndjson\r\n", 401),
        ("Content-Type: application/x-ndjson\r\nAuthorization: Bearer op-token-2\r\n", 401),
    ] {
        let (got, body) = raw_post(engine.metrics_addr, headers, &line).await;
        assert_eq!(got, status, "{headers:?}: {body}");
    }
    assert!(engine.store.number(&"0312345678".parse().unwrap()).unwrap().is_none(), "nothing was applied");

    let (got, body) = raw_post(engine.metrics_addr, ndjson, &line).await;
    assert_eq!(got, 200, "{body}");
    assert!(engine.store.number(&"0312345678".parse().unwrap()).unwrap().is_some());
    engine.stop().await;
}

/// R-L3 through a node: a line reaching a stored record the state owner cannot read is
/// rejected naming the number, and the import goes on. The owner's refusal came back as
/// a bare message, and the import stopped there (a 500), at the same line every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_l3_a_line_reaching_a_record_the_owner_cannot_read_is_rejected_and_the_rest_apply() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let url = format!("http://{}", engine.metrics_addr);
    let line = r#"{"contract":"0312340001","numbers":[{"number":"0312340001"},{"number":"0312340002"}]}"#;
    assert!(post(url.clone(), line.to_owned()).await.rejected.is_empty());
    // The owner's own store (one node: it is the owner) holds a record it cannot read.
    engine.store.open_tree("numbers").unwrap().insert("0312340002", &b"{x"[..]).unwrap();

    let other = r#"{"contract":"0612340001","numbers":[{"number":"0612340001"}]}"#;
    let report = post(url, format!("{line}\n{other}")).await;
    assert_eq!(report.error, None, "the import went on");
    assert_eq!(report.rejected.len(), 1, "{:?}", report.rejected);
    assert_eq!(report.rejected[0].line, 1);
    assert!(report.rejected[0].reason.starts_with("the record of 0312340002 cannot be read"), "{:?}", report.rejected);
    assert_eq!(report.lines, 1, "the other line applied");
    engine.stop().await;
}

/// `lines` import lines of `numbers` numbers each (with call notification), line l's
/// contract `06` and l·1000 in 8 digits, its numbers those after it.
fn lines_of_many_numbers(lines: u64, numbers: u64) -> Vec<String> {
    (0..lines)
        .map(|l| {
            let numbers: Vec<String> =
                (0..numbers).map(|n| format!(r#"{{"number":"06{:08}","services":["call"]}}"#, l * 1000 + n)).collect();
            format!(r#"{{"contract":"06{:08}","numbers":[{}]}}"#, l * 1000, numbers.join(","))
        })
        .collect()
}

/// R-L3 through a node: an import's lines travel to the state owner in request records
/// of 200 lines, whatever their size. Lines of many numbers made records past what the
/// producer takes (here the operator's `message.max.bytes` of 150 kB; at Kafka's default
/// 1 MB, lines of a few hundred numbers did the same): the import stopped at its first
/// line with "Message size too large", though each line was valid and small enough
/// alone. Requests are sized by their bytes too, within the operator's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_l3_lines_of_many_numbers_are_imported_through_a_node_within_its_record_size() {
    let h = Harness::new(1).await;
    let engine = h.engine_with(&[("CALLNOTIFY__KAFKA__PROPERTIES__MESSAGE_MAX_BYTES", "150000")]).await;
    let url = format!("http://{}", engine.metrics_addr);
    // 220 lines of 30 numbers: about 1.3 kB each as an op, 260 kB for 200 of them.
    let lines = lines_of_many_numbers(220, 30);
    let report = post(url, lines.join("\n")).await;
    assert_eq!(report.error, None);
    assert!(report.rejected.is_empty(), "{:?}", report.rejected.first());
    assert_eq!((report.lines, report.numbers), (220, 6_600));
    engine.stop().await;
}

/// R-L3 through a node: the state owner's answer lists the numbers an import removed or
/// moved, every one. Lines of many numbers removed in one request made an answer of
/// megabytes, past what the owner's producer takes (here the operator's
/// `message.max.bytes`, as a state topic left at Kafka's default would refuse a larger
/// one): the owner could not publish it and stopped its node, and every next owner took
/// the same request and stopped too. The answer lists the first numbers and counts the
/// rest, as the import's report does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_l3_removing_lines_of_many_numbers_through_a_node_answers_within_a_record() {
    let h = Harness::new(1).await;
    // Records of 150 kB at most (a small limit keeps the state topic below the 5 MB
    // the mock cluster keeps of a partition, which a lagging reader would lose).
    let engine = h.engine_with(&[("CALLNOTIFY__KAFKA__PROPERTIES__MESSAGE_MAX_BYTES", "150000")]).await;
    let url = format!("http://{}", engine.metrics_addr);
    let contract = |l: u64| format!("06{:08}", l * 1000);
    // 15 lines of 1 000 numbers: their removal lists 15 000 numbers, about 195 kB.
    let lines = lines_of_many_numbers(15, 1000);
    // A first line once the node owns the requests: the mock cluster keeps 5 MB of a
    // partition, and requests waiting for an owner still joining would pass out of it.
    let first = r#"{"contract":"0699999999","numbers":[{"number":"0699999999"}]}"#;
    assert_eq!(post(url.clone(), first.to_owned()).await.lines, 1);
    let report = post(url.clone(), lines.join("\n")).await;
    assert_eq!((report.error, report.lines), (None, 15));

    let removals: Vec<String> =
        (0..15u64).map(|l| format!(r#"{{"contract":"{}","remove":true}}"#, contract(l))).collect();
    let report = post(url, removals.join("\n")).await;
    assert_eq!(report.error, None);
    assert_eq!(report.removed.len() + report.removed_not_listed, 15_000, "every removed number counted");
    let first = engine::phone::PhoneNumber::parse("0600000001").unwrap();
    assert!(engine.store.number(&first).unwrap().is_none(), "removed");
    engine.stop().await;
}
