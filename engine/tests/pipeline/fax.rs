//! FAXお知らせメール (R-F1): fax records from Kafka are kept for the site and mailed to
//! each checked destination with a link to the fax, by the same rules as calls.

use engine::address::DestinationAddress;
use engine::store::{Destination, FaxSettings};

use testkit::fax::{record as fax_record, record_at};

use crate::helpers::*;

/// A three-page G4 TIFF Class F, as `tiffcp -c g4` writes it.
const G4: &[u8] = include_bytes!("../fixtures/fax/fine-g4.tif");
/// The same fax as a PDF, as ImageMagick writes it.
const PDF: &[u8] = include_bytes!("../fixtures/fax/fine-g4.pdf");

const FAX_NUMBER: &str = "0312345600";
const OTHER_FAX_NUMBER: &str = "0312345601";

/// Provisions `number` with fax notification contracted, and its fax settings.
fn fax_subscriber(engine: &TestEngine, number: &str, enabled: bool, destinations: &[(&str, bool)], attach_pdf: bool) {
    let line = serde_json::json!({"contract": number, "numbers": [{"number": number, "services": ["fax"]}]});
    engine.provision(&[line.to_string()]);
    let settings = FaxSettings {
        enabled,
        destinations: destinations
            .iter()
            .map(|(a, send)| Destination { address: DestinationAddress::parse(a).unwrap(), send: *send })
            .collect(),
        attach_pdf,
        version: 0,
    };
    let number = engine::phone::PhoneNumber::parse(number).unwrap();
    engine.store.save_fax_settings(&number, 0, settings).expect("fax settings saved");
}

/// R-F1, R-N2, R-M1: a received fax is kept with its document, and its mail goes to the
/// checked destination only, from the no-reply sender, with sender, pages and the link
/// to the fax on the site. The same record read again sends and keeps nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_f1_r_n2_a_received_fax_is_kept_and_mailed_to_checked_destinations_with_its_link() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    fax_subscriber(&engine, FAX_NUMBER, true, &[("fax@example.jp", true), ("not-checked@example.jp", false)], false);
    h.produce(FAX_TOPIC, &[fax_record("hylafax-1", FAX_NUMBER, G4, 3)]).await;
    let mails = h.mails(1).await;
    assert_eq!(mails[0].rcpt_to, ["fax@example.jp"]);
    let mail = parse(&mails[0]);
    assert_eq!(mail.from, FROM);
    assert_eq!(mail.subject, format!("【FAXお知らせ】0612345678から{FAX_NUMBER}へのFAX（3枚）"));
    assert!(mail.body.contains("送信元：0612345678") && mail.body.contains("枚数：3枚"), "{}", mail.body);

    let number = engine::phone::PhoneNumber::parse(FAX_NUMBER).unwrap();
    let kept = engine.store.faxes_of(&number).unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let link = format!("http://127.0.0.1:8080/fax/{}", kept[0].key());
    assert!(mail.body.contains(&link), "the link {link} in:\n{}", mail.body);
    assert_eq!((kept[0].pages, kept[0].fax_id.as_str(), kept[0].read), (3, "hylafax-1", false));
    assert_eq!(engine.store.fax_document(&kept[0].key()).unwrap().as_deref(), Some(G4), "the document as sent");

    // Read again (a replay, a partition's next reader): nothing more.
    h.produce(FAX_TOPIC, &[record_at("hylafax-1", FAX_NUMBER, G4, 3, kept[0].received_at)]).await;
    let mails = h.mails_after_control_call(&engine, 2).await;
    assert_eq!(mails.len(), 2, "{:?}", summary(&mails));
    assert_eq!(engine.store.faxes_of(&number).unwrap().len(), 1);
    assert_eq!(engine.metric("callnotify_faxes_kept_total"), 1.0, "kept once");
    engine.stop().await;
}

/// R-M3: a number moves to another line. A call made to it and a fax received for it
/// before the move, read after it (an engine behind, a dead letter replayed), went to
/// the new subscriber: the call mailed to their addresses, the fax kept on their site
/// and mailed. They were the previous subscriber's; now neither is sent nor kept, and
/// what comes after the move is the new subscriber's as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m3_calls_and_faxes_from_before_a_number_moved_lines_stay_away_from_its_new_subscriber() {
    const MOVED: &str = "0312345602";
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let line = |contract: &str| {
        serde_json::json!({"contract": contract, "numbers": [
            {"number": contract, "services": ["call"]},
            {"number": MOVED, "services": ["call", "fax"]},
        ]})
        .to_string()
    };
    engine.provision(&[line("0312345610")]);
    engine.provision(&[line("0312345620")]);
    let number = engine::phone::PhoneNumber::parse(MOVED).unwrap();
    let record = engine.store.number(&number).unwrap().unwrap();
    assert_eq!(record.contract.as_str(), "0312345620", "moved");
    let to_new = || vec![Destination { address: DestinationAddress::parse("new@example.jp").unwrap(), send: true }];
    let call = engine::store::CallSettings { enabled: true, destinations: to_new(), ..Default::default() };
    engine.store.save_call_settings(&number, record.call.version, call).unwrap();
    let fax = FaxSettings { enabled: true, destinations: to_new(), ..Default::default() };
    engine.store.save_fax_settings(&number, record.fax.version, fax).unwrap();

    let now = chrono::Utc::now();
    h.produce(
        FAX_TOPIC,
        &[record_at("before", MOVED, G4, 3, now - chrono::TimeDelta::minutes(5)), fax_record("after", MOVED, G4, 3)],
    )
    .await;
    let jst = now.with_timezone(&chrono::FixedOffset::east_opt(9 * 3600).unwrap());
    h.produce(
        TOPIC,
        &[
            cdr("call-before", MOVED, Some("09011112222"), "allowed", "no_answer"),
            cdr_at(jst, "call-after", MOVED, Some("09011112222"), "allowed", "no_answer"),
        ],
    )
    .await;
    let mails = h.mails_after_control_call(&engine, 3).await;
    let to_new = mails.iter().filter(|m| m.rcpt_to == ["new@example.jp"]).count();
    assert_eq!(to_new, 2, "the call and the fax after the move: {:?}", summary(&mails));
    let kept = engine.store.faxes_of(&number).unwrap();
    assert_eq!(kept.iter().map(|f| f.fax_id.as_str()).collect::<Vec<_>>(), ["after"]);
    assert_eq!(engine.metric("callnotify_cdrs_filtered_total{reason=\"not_subscribed\"}"), 2.0);
    engine.stop().await;
}

/// R-F1, R-N1: with the fax service stopped the fax is still kept for the site, and no
/// mail goes out; a fax to a number without the fax service is not kept at all. One
/// older than `engine.max_call_age_hours` (its mail stale, as a call's would be) is kept
/// for the site all the same, unmailed (it was dropped, never to be seen: an engine
/// behind by a day, a dead letter replayed the next day); one past
/// `store.fax_retention_days` is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_f1_r_n1_a_stopped_fax_service_keeps_the_fax_and_mails_nobody() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    fax_subscriber(&engine, FAX_NUMBER, false, &[("fax@example.jp", true)], false);
    engine.provision(&[plain_subscriber(OTHER_FAX_NUMBER, "call-only@example.jp")]);
    let two_days_ago = chrono::Utc::now() - chrono::TimeDelta::days(2);
    let past_retention = chrono::Utc::now() - chrono::TimeDelta::days(31);
    h.produce(
        FAX_TOPIC,
        &[
            fax_record("stopped-1", FAX_NUMBER, G4, 3),
            fax_record("no-fax-service", OTHER_FAX_NUMBER, G4, 3),
            // Older than engine.max_call_age_hours: kept, not mailed.
            record_at("stale-1", FAX_NUMBER, G4, 3, two_days_ago),
            // Older than store.fax_retention_days (30): neither.
            record_at("expired-1", FAX_NUMBER, G4, 3, past_retention),
        ],
    )
    .await;
    let mails = h.mails_after_control_call(&engine, 1).await;
    assert_eq!(summary(&mails).len(), 1, "only the control call's mail: {:?}", summary(&mails));
    let kept = |n: &str| engine.store.faxes_of(&engine::phone::PhoneNumber::parse(n).unwrap()).unwrap().len();
    // Kept after the control call's mail, perhaps: each fax is kept by a task of its own.
    let ids = || -> Vec<String> {
        let number = engine::phone::PhoneNumber::parse(FAX_NUMBER).unwrap();
        engine.store.faxes_of(&number).unwrap().into_iter().map(|f| f.fax_id).collect()
    };
    testkit::wait::until(WAIT, || format!("the stale fax is not kept: {:?}", ids()), || ids().len() >= 2).await;
    assert_eq!(ids(), ["stopped-1", "stale-1"], "the stale fax is kept, the one past its retention not");
    assert_eq!(kept(OTHER_FAX_NUMBER), 0);
    assert_eq!(engine.metric(r#"callnotify_cdrs_filtered_total{reason="stale"}"#), 2.0);
    engine.stop().await;
}

/// R-F1 (beyond the seed): with 「PDFで添付」 each mail carries the fax as a PDF; a PDF
/// record is accepted as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_f1_a_fax_can_come_attached_as_a_pdf() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    fax_subscriber(&engine, FAX_NUMBER, true, &[("fax@example.jp", true)], true);
    h.produce(FAX_TOPIC, &[fax_record("tiff-1", FAX_NUMBER, G4, 3), fax_record("pdf-1", FAX_NUMBER, PDF, 3)]).await;
    let mails = h.mails(2).await;
    for mail in &mails {
        let parsed = mail_parser::MessageParser::default().parse(&mail.data).unwrap();
        let pdf = parsed.attachment(0).expect("a PDF attached");
        assert!(mail_parser::MimeHeaders::is_content_type(pdf, "application", "pdf"));
        assert!(pdf.contents().starts_with(b"%PDF-"), "a PDF");
    }
    engine.stop().await;
}

/// R-F1: a fax whose PDF would be larger than a mail carries (a relay commonly refuses
/// a mail over 10 MB, and then nobody hears of the fax) is mailed with its link only, and
/// the mail says why. Its pages share one dense strip: a record of half a megabyte whose
/// PDF is about 12 MB. It used to be attached whatever its size (and such a TIFF of
/// a thousand pages made a PDF of gigabytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_f1_a_fax_too_large_to_attach_is_mailed_with_its_link_and_says_why() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    fax_subscriber(&engine, FAX_NUMBER, true, &[("fax@example.jp", true)], true);
    let dense = testkit::fax::checkered_tiff(8, 1728, 2296);
    h.produce(FAX_TOPIC, &[fax_record("dense-1", FAX_NUMBER, &dense, 8)]).await;
    let mails = h.mails(1).await;
    let parsed = mail_parser::MessageParser::default().parse(&mails[0].data).unwrap();
    assert!(parsed.attachment(0).is_none(), "no PDF attached");
    let body = parsed.body_text(0).unwrap();
    assert!(body.contains("大きいため") && body.contains("/fax/"), "{body}");
    assert!(mails[0].data.len() < 64 << 10, "the mail is small: {} bytes", mails[0].data.len());
    engine.stop().await;
}

/// R-M4: a fax record that is not one (its page count wrong, its document no fax, a
/// time no fax can have, a field missing) goes to the dead letters with the reason, and nothing is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_malformed_fax_records_go_to_the_dead_letters_with_their_reason() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    fax_subscriber(&engine, FAX_NUMBER, true, &[("fax@example.jp", true)], false);
    let no_id = serde_json::json!({"called": FAX_NUMBER, "presentation": "withheld",
        "received_at": chrono::Utc::now().to_rfc3339(), "pages": 1, "document_base64": ""});
    h.produce(
        FAX_TOPIC,
        &[
            fax_record("wrong-pages", FAX_NUMBER, G4, 2),
            fax_record("png", FAX_NUMBER, b"\x89PNG\r\n\x1a\n", 1),
            record_at("y2k", FAX_NUMBER, G4, 3, chrono::DateTime::from_timestamp(900_000_000, 0).unwrap()),
            no_id.to_string(),
        ],
    )
    .await;
    let mut letters = h.dead_letters(4);
    // Each is written by a task of its own: in the records' order only by their offsets.
    letters.sort_by_key(|l| l["offset"].as_i64());
    let reasons: Vec<&str> = letters.iter().map(|l| l["reason"].as_str().unwrap_or_default()).collect();
    assert_eq!(letters.len(), 4, "{letters:?}");
    assert!(reasons[0].contains("pages") && reasons[0].contains("3 page"), "{reasons:?}");
    assert!(reasons[1].contains("document_base64"), "{reasons:?}");
    assert!(reasons[2].contains("received_at") && reasons[2].contains("before 2000"), "{reasons:?}");
    assert!(reasons[3].contains("fax_id"), "{reasons:?}");
    assert!(letters.iter().all(|l| l["format"] == "fax" && l["topic"] == FAX_TOPIC), "{letters:?}");
    let number = engine::phone::PhoneNumber::parse(FAX_NUMBER).unwrap();
    assert!(engine.store.faxes_of(&number).unwrap().is_empty());
    engine.stop().await;
}

/// R-F1 with several nodes (docs/cluster.md): faxes read by either of two nodes are
/// kept on both, document and all, so either node's site shows any of them; a delete on
/// one reaches the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_f1_a_fax_read_by_one_node_is_kept_on_every_node_and_deleted_everywhere() {
    let h = Harness::new(4).await;
    let (a, b) = (h.node("a").await, h.node("b").await);
    // Three CDR topics and the fax topic, of four partitions: eight each.
    a.wait_partitions_shared(1, 8).await;
    b.wait_partitions_shared(1, 8).await;
    let numbers: Vec<String> = (0..8).map(|i| format!("03200000{i:02}")).collect();
    for number in &numbers {
        fax_subscriber(&a, number, true, &[(&format!("{number}@example.jp"), true)], false);
    }
    let records: Vec<String> = numbers.iter().map(|x| fax_record(&format!("f-{x}"), x, G4, 3)).collect();
    h.produce(FAX_TOPIC, &records).await;
    h.mails(8).await;

    let kept = |store: &engine::store::Store, number: &str| {
        let number = engine::phone::PhoneNumber::parse(number).unwrap();
        let faxes = store.faxes_of(&number).unwrap();
        faxes.first().and_then(|f| store.fax_document(&f.key()).unwrap()).is_some_and(|d| d.as_ref() == G4)
    };
    for store in [&a.store, &b.store] {
        testkit::wait::until(WAIT, || "a fax missing on a node".into(), || numbers.iter().all(|x| kept(store, x)))
            .await;
    }

    let first = engine::phone::PhoneNumber::parse(&numbers[0]).unwrap();
    let key = b.store.faxes_of(&first).unwrap()[0].key();
    assert!(b.store.delete_fax(&key).unwrap());
    testkit::wait::until(
        WAIT,
        || "the delete never reached node A".into(),
        || a.store.faxes_of(&first).unwrap().is_empty() && a.store.fax_document(&key).unwrap().is_none(),
    )
    .await;
    let (a, b) = (a.stop().await, b.stop().await);
    let sent = |s: &Stopped| s.metric("callnotify_mails_sent_total");
    assert_eq!(sent(&a) + sent(&b), 8.0, "each fax mailed once");
    assert!(sent(&a) > 0.0 && sent(&b) > 0.0, "both nodes read faxes: {} and {}", sent(&a), sent(&b));
}

/// R-F1, R-M4: a fax whose keeping waits on a state owner that does not answer while its
/// partition is taken away and given back to the same node is mailed once the owner
/// answers, and kept once. Before, the record read again found its mail claimed by the
/// first read and passed it over as being sent; the first read, its try failed a
/// minute later, then let the mail go: never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_f1_a_fax_read_again_while_its_first_read_waits_on_the_state_owner_is_mailed_once() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    const KEEP_FAILED: &str = r#"callnotify_errors_total{stage="pipeline",error="fax_keep"}"#;
    let h = Harness::new(1).await;
    let engine = h.engine_with(&[("CALLNOTIFY__ENGINE__SHUTDOWN_GRACE_SECS", "4")]).await;
    fax_subscriber(&engine, FAX_NUMBER, true, &[("fax@example.jp", true)], false);
    h.produce(FAX_TOPIC, &[fax_record("owner-away-1", FAX_NUMBER, G4, 3)]).await;
    // From now no state request reaches an owner: every write fails with a retriable
    // error until the request's 30 s are up (the broker's replicas out of sync).
    h.kafka.on_cluster(|c| {
        c.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 100_000])
    });
    engine.wait_metric("callnotify_cdrs_consumed_total", 1.0).await;

    let bootstrap = h.kafka.bootstrap_servers().to_owned();
    tokio::task::spawn_blocking(move || join_and_leave(&bootstrap, FAX_TOPIC)).await.unwrap();
    engine.wait_metric("callnotify_cdrs_consumed_total", 2.0).await;
    // The first read's try has failed (its request not written within 30 s).
    engine.wait_metric(KEEP_FAILED, 1.0).await;
    h.kafka.on_cluster(|c| c.clear_request_errors(RDKafkaApiKey::Produce));

    let mails = h.mails(1).await;
    assert_eq!(mails[0].rcpt_to, ["fax@example.jp"]);
    let mails = h.mails_after_control_call(&engine, 2).await;
    assert_eq!(mails.len(), 2, "the fax mailed once: {:?}", summary(&mails));
    let number = engine::phone::PhoneNumber::parse(FAX_NUMBER).unwrap();
    assert_eq!(engine.store.faxes_of(&number).unwrap().len(), 1);
    assert_eq!(engine.metric("callnotify_faxes_kept_total"), 1.0, "kept once");
    engine.stop().await;
}

/// A consumer joins the engines' group on `topic`, waits until the group has shared the
/// partitions out again, and leaves: each of `topic`'s partitions is taken from the
/// engine and, by the time it has left, given back.
fn join_and_leave(bootstrap: &str, topic: &str) {
    use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
    use std::sync::atomic::{AtomicBool, Ordering};
    struct Member(AtomicBool);
    impl rdkafka::ClientContext for Member {}
    impl ConsumerContext for Member {
        fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
            if matches!(rebalance, Rebalance::Assign(_)) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
    }
    let member: BaseConsumer<Member> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "test")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create_with_context(Member(AtomicBool::new(false)))
        .expect("member");
    member.subscribe(&[topic]).expect("subscribe");
    let deadline = std::time::Instant::now() + WAIT;
    while !member.context().0.load(Ordering::SeqCst) {
        assert!(std::time::Instant::now() < deadline, "the group never took the member in");
        let _ = member.poll(std::time::Duration::from_millis(100));
    }
}
