//! One test per call-notification rule, through Kafka → engine → SMTP, with the
//! received MIME decoded. "No mail" is shown by a later control call whose mail does
//! arrive (CDRs of one partition are handled in order) and by the filter's metric.

use crate::helpers::*;

const CALLED: &str = "0312345678";
const CONTROL: &str = "0698765432";
const CONTROL_TO: &str = "control@example.jp";

fn recipients(mails: &[testkit::smtp::ReceivedMail]) -> Vec<String> {
    let mut r: Vec<String> = mails.iter().flat_map(|m| m.rcpt_to.clone()).collect();
    r.sort();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_n1_a_stopped_service_sends_nothing_and_a_start_applies_to_the_next_call() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let stopped = Subscriber { enabled: false, ..Subscriber::new(CALLED, &[("taro@example.jp", true)]) };
    engine.provision(&[stopped.line(), plain_subscriber(CONTROL, CONTROL_TO)]);

    h.produce(
        TOPIC,
        &[
            cdr("n1-a", CALLED, Some("09011112222"), "allowed", "no_answer"),
            cdr("n1-b", CONTROL, None, "withheld", "no_answer"),
        ],
    )
    .await;
    let mails = h.mails(1).await;
    assert_eq!(recipients(&mails), vec![CONTROL_TO]);
    assert_eq!(engine.metric(r#"callnotify_cdrs_filtered_total{reason="stopped"}"#), 1.0);

    // 開始 saved (as the settings site does): the very next call is notified.
    let number = engine::phone::PhoneNumber::parse(CALLED).unwrap();
    let mut settings = engine.store.number(&number).unwrap().unwrap().call;
    settings.enabled = true;
    engine.store.save_call_settings(&number, settings.version, settings.clone()).unwrap();
    h.produce(TOPIC, &[cdr("n1-c", CALLED, Some("09011112222"), "allowed", "no_answer")]).await;
    let mails = h.mails(2).await;
    assert_eq!(mails[1].rcpt_to, vec!["taro@example.jp"]);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_n2_only_checked_destinations_receive_the_mail() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let destinations = [
        ("a@example.jp", true),
        ("b@example.jp", false),
        ("c@example.jp", true),
        ("d@example.jp", false),
        ("e.e@mobile.example.ne.jp", true),
    ];
    let sub = Subscriber::new(CALLED, &destinations);
    engine.provision(&[sub.line(), plain_subscriber(CONTROL, CONTROL_TO)]);

    h.produce(
        TOPIC,
        &[
            cdr("n2-a", CALLED, Some("09011112222"), "allowed", "answered"),
            cdr("n2-b", CONTROL, None, "withheld", "no_answer"),
        ],
    )
    .await;
    let mails = h.mails(4).await;
    assert_eq!(recipients(&mails), vec!["a@example.jp", "c@example.jp", CONTROL_TO, "e.e@mobile.example.ne.jp"]);
    for mail in &mails {
        assert_eq!(mail.rcpt_to.len(), 1, "each address gets its own mail (R-M3: no shared To)");
        let parsed = parse(mail);
        assert!(!parsed.raw.contains("b@example.jp") && !parsed.raw.contains("d@example.jp"));
    }
    engine.stop().await;
}

/// R-N4: both checks, all four combinations, against a designated/other caller that
/// answered/missed. Each subscriber has its own address so the mails can be told apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_n4_send_conditions_in_all_four_combinations() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let designated = [("09011112222", true)];
    let combos = [
        ("0310000001", "all@example.jp", false, false),
        ("0310000002", "missed@example.jp", false, true),
        ("0310000003", "designated@example.jp", true, false),
        ("0310000004", "both@example.jp", true, true),
    ];
    let lines: Vec<String> = combos
        .iter()
        .map(|(number, address, designated_only, missed_only)| {
            let to = [(*address, true)];
            Subscriber {
                designated_only: *designated_only,
                missed_only: *missed_only,
                designated: &designated,
                ..Subscriber::new(number, &to)
            }
            .line()
        })
        .collect();
    engine.provision(&lines);

    let calls = [
        ("desig-answered", "09011112222", "answered"),
        ("desig-missed", "09011112222", "no_answer"),
        ("other-answered", "09099998888", "answered"),
        ("other-missed", "09099998888", "busy"),
    ];
    let mut cdrs = Vec::new();
    for (number, ..) in &combos {
        for (id, caller, outcome) in &calls {
            cdrs.push(cdr(&format!("{number}-{id}"), number, Some(caller), "allowed", outcome));
        }
    }
    h.produce(TOPIC, &cdrs).await;
    let mails = h.mails(4 + 2 + 2 + 1).await;
    // Nothing more is on its way: a control call after them arrives as the 10th mail.
    engine.provision(&[plain_subscriber(CONTROL, CONTROL_TO)]);
    h.produce(TOPIC, &[cdr("control", CONTROL, None, "withheld", "no_answer")]).await;
    let all = h.mails(10).await;
    assert_eq!(all.len(), 10, "{:#?}", summary(&all));

    let ids_for = |address: &str| {
        let mut ids: Vec<String> = mails
            .iter()
            .filter(|m| m.rcpt_to == [address])
            .map(|m| {
                let subject = parse(m).subject;
                let caller = if subject.contains("09011112222") { "desig" } else { "other" };
                let answered = if subject.contains("応答あり") { "answered" } else { "missed" };
                format!("{caller}-{answered}")
            })
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids_for("all@example.jp"), ["desig-answered", "desig-missed", "other-answered", "other-missed"]);
    assert_eq!(ids_for("missed@example.jp"), ["desig-missed", "other-missed"]);
    assert_eq!(ids_for("designated@example.jp"), ["desig-answered", "desig-missed"]);
    assert_eq!(ids_for("both@example.jp"), ["desig-missed"]);
    assert_eq!(engine.metric(r#"callnotify_cdrs_filtered_total{reason="answered"}"#), 4.0);
    assert_eq!(engine.metric(r#"callnotify_cdrs_filtered_total{reason="not_designated"}"#), 3.0);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_n5_unchecked_designated_entries_are_ignored() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let sub = Subscriber {
        designated_only: true,
        designated: &[("09011112222", true), ("09033334444", false)],
        ..Subscriber::new(CALLED, &[("taro@example.jp", true)])
    };
    engine.provision(&[sub.line()]);

    h.produce(
        TOPIC,
        &[
            cdr("n5-unchecked", CALLED, Some("09033334444"), "allowed", "no_answer"),
            cdr("n5-checked", CALLED, Some("+819011112222"), "allowed", "no_answer"),
        ],
    )
    .await;
    let mails = h.mails(1).await;
    assert_eq!(mails.len(), 1);
    assert!(parse(&mails[0]).body.contains("発信者番号：09011112222"));
    assert_eq!(engine.metric(r#"callnotify_cdrs_filtered_total{reason="not_designated"}"#), 1.0);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_n6_withheld_callers_are_not_notified_when_designated_only() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let sub = Subscriber {
        designated_only: true,
        designated: &[("09011112222", true)],
        ..Subscriber::new(CALLED, &[("taro@example.jp", true)])
    };
    engine.provision(&[sub.line()]);

    // The exchange knows the number but the caller withheld it: still no mail.
    h.produce(
        TOPIC,
        &[
            cdr("n6-withheld", CALLED, Some("09011112222"), "withheld", "no_answer"),
            cdr("n6-shown", CALLED, Some("09011112222"), "allowed", "no_answer"),
        ],
    )
    .await;
    let mails = h.mails(1).await;
    assert_eq!(mails.len(), 1);
    let parsed = parse(&mails[0]);
    assert!(parsed.body.contains("発信者番号：09011112222"), "{}", parsed.body);
    assert_eq!(engine.metric(r#"callnotify_cdrs_filtered_total{reason="withheld"}"#), 1.0);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_n7_withheld_unavailable_and_payphone_callers_are_notified_and_named() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);

    h.produce(
        TOPIC,
        &[
            cdr("n7-withheld", CALLED, Some("09011112222"), "withheld", "no_answer"),
            cdr("n7-unavailable", CALLED, None, "unavailable", "no_answer"),
            cdr("n7-payphone", CALLED, None, "payphone", "no_answer"),
        ],
    )
    .await;
    let mails = h.mails(3).await;
    let mut shown: Vec<String> = mails
        .iter()
        .map(|m| {
            let body = parse(m).body;
            assert!(!body.contains("09011112222"), "a withheld number is never revealed: {body}");
            body.lines().find_map(|l| l.strip_prefix("発信者番号：")).unwrap().to_owned()
        })
        .collect();
    shown.sort();
    assert_eq!(shown, ["公衆電話", "表示圏外", "非通知"]);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m1_r_m2_the_mail_is_japanese_mime_from_the_no_reply_sender_with_the_call_details() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    engine.provision(&[plain_subscriber(CALLED, "taro@example.jp")]);

    h.produce(
        TOPIC,
        &[
            cdr("m-missed", CALLED, Some("+81-90-1111-2222"), "allowed", "no_answer"),
            cdr("m-answered", CALLED, Some("0612345678"), "allowed", "answered"),
        ],
    )
    .await;
    let mails = h.mails(2).await;
    let missed = mails.iter().map(parse).find(|p| p.subject.contains("09011112222")).expect("missed-call mail");
    let answered = mails.iter().map(parse).find(|p| p.subject.contains("0612345678")).expect("answered-call mail");

    // R-M1: fixed no-reply sender, auto-generated, MIME-encoded Japanese.
    assert_eq!(missed.from, FROM);
    assert_eq!(missed.auto_submitted.as_deref(), Some("auto-generated"));
    assert!(missed.raw.contains("Subject: =?utf-8?"), "subject is RFC 2047 encoded:\n{}", missed.raw);
    assert!(missed.raw.contains("charset=utf-8"));
    assert!(missed.raw.lines().all(|l| l.is_ascii()), "headers and body are 7-bit on the wire");
    assert_eq!(missed.subject, "【着信お知らせ】09011112222から0312345678への着信（応答なし）");

    // R-M2: called, caller (R-L2 digits), date and time in JST, answered or not.
    assert!(missed.body.contains("着信番号：0312345678"), "{}", missed.body);
    assert!(missed.body.contains("発信者番号：09011112222"));
    assert!(missed.body.contains(&jst_line(call_start())), "{}", missed.body);
    assert!(missed.body.contains("応答：応答できませんでした"));
    assert!(answered.body.contains("応答：応答しました"));
    assert!(answered.subject.ends_with("（応答あり）"));
    assert_ne!(missed.message_id, answered.message_id);
    engine.stop().await;
}
