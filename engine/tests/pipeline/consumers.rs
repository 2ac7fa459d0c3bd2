//! `engine.consumers`: several consumer threads in one engine, members of one consumer
//! group, share the partitions and still send each mail once.

use crate::helpers::*;

const CALLS: usize = 40;

/// Each CDR is produced twice, the copy under another key (so, mostly, into another
/// partition, read by the other thread): one mail per call all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumer_threads_share_the_partitions_and_send_each_mail_once() {
    let h = Harness::new(4).await;
    let engine = h.engine_with(&[("CALLNOTIFY__ENGINE__CONSUMERS", "2")]).await;
    // The harness's three CDR topics and its fax topic, of 4 partitions each.
    engine.wait_partitions_shared(2, 16).await;
    let cdrs = missed_calls_to_ten(&engine, "03300000", "lanes", CALLS);
    h.produce(TOPIC, &cdrs).await;
    let copies: Vec<String> = cdrs.iter().rev().cloned().collect();
    h.produce(TOPIC, &copies).await;
    h.mails(CALLS).await;
    engine.wait_metric("callnotify_mails_duplicate_total", CALLS as f64).await;
    let held: Vec<f64> =
        (0..2).map(|n| engine.metric(&format!("callnotify_consumer_partitions{{consumer=\"{n}\"}}"))).collect();
    assert_eq!(held, [8.0, 8.0], "the group shares the 16 partitions out between the two threads");

    let all = h.mails_after_control_call(&engine, CALLS + 1).await;
    let stopped = engine.stop().await;
    assert_each_call_once(&all, CALLS + 1);
    // Every CDR read but the one that sent its call's mail was found already sent: the
    // copies, and any CDR a rebalance had read again (delivery is at least once).
    let consumed = stopped.metric("callnotify_cdrs_consumed_total");
    assert!(consumed >= (2 * CALLS + 1) as f64, "{consumed} CDRs read");
    assert_eq!(
        stopped.metric("callnotify_mails_duplicate_total"),
        consumed - (CALLS + 1) as f64,
        "every copy found already sent"
    );
    assert_eq!(stopped.metric("callnotify_cdrs_in_flight"), 0.0, "both threads' CDRs finished");
}

/// The errors counted when a partition was assigned and left unread.
const UNREAD: &str = "callnotify_errors_total{stage=\"source\",error=\"partition_unread\"}";

/// librdkafka issue 5586 (docs/cluster.md, "Partitions left unread"): when a consumer
/// cannot look up an assigned partition's committed offset (a broker answers "not
/// coordinator", as after a coordinator's loss), librdkafka keeps the partition and never
/// reads it. Here the first lookups of the CDR consumer and of the state owner fail so.
/// Both partitions are assigned again 15 to 20 s later: the owner carries out an import
/// (R-L3), whose wait is counted as a stall, and the missed call is notified (R-N1). Before: the import waited 60 s for an
/// owner that never read its request, and the call was never notified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_n1_partitions_whose_committed_offsets_could_not_be_looked_up_are_assigned_again_and_read() {
    unread_partitions_are_assigned_again_and_read(&[]).await;
}

/// The same with a cooperative assignor (`partition.assignment.strategy`, as a carrier
/// may set in `kafka.properties`): only the unread partitions are taken off and assigned
/// again (`unread::assign_again`'s incremental branch), and they are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_n1_with_a_cooperative_assignor_unread_partitions_are_assigned_again_and_read() {
    unread_partitions_are_assigned_again_and_read(&[(
        "CALLNOTIFY__KAFKA__PROPERTIES__PARTITION_ASSIGNMENT_STRATEGY",
        "cooperative-sticky",
    )])
    .await;
}

async fn unread_partitions_are_assigned_again_and_read(env: &[(&str, &str)]) {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let h = Harness::new(1).await;
    h.kafka.on_cluster(|cluster| {
        cluster.request_errors(RDKafkaApiKey::OffsetFetch, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR; 3]);
    });
    let engine = h.engine_with(env).await;
    let cdrs = missed_calls_to_ten(&engine, "03400000", "unread", 1);
    h.produce(TOPIC, &cdrs).await;
    h.mails(1).await;
    assert!(engine.metric(UNREAD) >= 2.0, "raised for the operator, for each: {}", engine.metric(UNREAD));
    // The import waited more than 10 s for its answer: raised by the node it waited on.
    let stalled = engine.metric("callnotify_errors_total{stage=\"state\",error=\"stalled\"}");
    assert!(stalled >= 1.0, "the writes' wait is counted: {stalled}");
    engine.stop().await;
}

/// Offsets held back while the partition changelogs do not confirm.
const UNCONFIRMED: &str = "callnotify_errors_total{stage=\"state\",error=\"changelog_unconfirmed\"}";

/// docs/cluster.md ("A CDR partition's sent records and retries"): a commit waits for
/// the partition changelogs to confirm their records. When they have not within 10 s
/// (a changelog partition without a leader, as while its broker is lost), the offsets
/// are not committed this time, it is raised, and the engine goes on reading and
/// notifying (R-N1); once the partition has a leader again, its records are confirmed
/// and the offsets committed (the engine stops cleanly). Before, the consumer stopped
/// and the engine exited ("changelog records not confirmed within 10s"): a rehearsal's
/// three-broker run, a broker killed for 10 s, never sent 2 520 of its 3 600 mails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_n1_a_changelog_without_a_leader_holds_back_commits_not_the_engine() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let cdrs = missed_calls_to_ten(&engine, "03500000", "leaderless", 2);
    let sent_topic = engine::embedded::CHANGELOG_TOPICS[0];
    h.kafka.on_cluster(move |cluster| cluster.partition_leader(sent_topic, 0, None).expect("leaderless"));
    h.produce(TOPIC, &cdrs[..1]).await;
    h.mails(1).await;
    engine.wait_metric(UNCONFIRMED, 1.0).await;

    h.produce(TOPIC, &cdrs[1..]).await;
    h.mails(2).await;
    h.kafka.on_cluster(move |cluster| cluster.partition_leader(sent_topic, 0, Some(1)).expect("led again"));
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_mails_sent_total"), 2.0);
}

/// docs/delivery.md: a stop while a changelog partition has no leader closed the
/// producer with the sent records of mails just sent unconfirmed, and said nothing: the
/// partition's next reader, without them, may send those mails again. It is said now,
/// as an ERROR and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_sent_records_unconfirmed_at_a_stop_are_said() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let cdrs = missed_calls_to_ten(&engine, "03700000", "unflushed", 1);
    let sent_topic = engine::embedded::CHANGELOG_TOPICS[0];
    h.kafka.on_cluster(move |cluster| cluster.partition_leader(sent_topic, 0, None).expect("leaderless"));
    h.produce(TOPIC, &cdrs).await;
    h.mails(1).await;
    let stopped = engine.stop().await;
    let unflushed = r#"callnotify_errors_total{stage="state",error="changelog_unflushed"}"#;
    assert_eq!(stopped.metric(unflushed), 1.0);
}

/// docs/cluster.md ("A CDR partition's sent records and retries"): while a changelog
/// partition has no leader, the node goes on reading between its commits: the calls of
/// the first seconds (three commits' time, one call after the other) are all notified
/// before the held-back commit is raised, 10 s after its records were published
/// (R-N1). Before, each commit waited those 10 s on the consumer's thread, which read
/// nothing meanwhile: a call made after the first commit began waited for the raise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_n1_a_changelog_without_a_leader_does_not_hold_up_the_reading() {
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let cdrs = missed_calls_to_ten(&engine, "03600000", "reading", 1000);
    let sent_topic = engine::embedded::CHANGELOG_TOPICS[0];
    h.kafka.on_cluster(move |cluster| cluster.partition_leader(sent_topic, 0, None).expect("leaderless"));
    let started = std::time::Instant::now();
    let mut notified = 0;
    while notified < cdrs.len() && (notified < 2 || started.elapsed() < 3 * engine::source::COMMIT_INTERVAL) {
        h.produce(TOPIC, &cdrs[notified..=notified]).await;
        notified += 1;
        h.mails(notified).await;
        assert_eq!(engine.metric(UNCONFIRMED), 0.0, "call {notified} was notified only after the raise");
    }

    h.kafka.on_cluster(move |cluster| cluster.partition_leader(sent_topic, 0, Some(1)).expect("led again"));
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_mails_sent_total"), notified as f64);
}

/// R-M4 (a delayed mail is never silently dropped), docs/cluster.md: a partition whose
/// changelogs cannot be restored when it is assigned (its sent-records partition without
/// a leader, a broker lost) is not read until they are, tried again every second. It
/// used to be read at once, as a partition this node did not read: a mail deferred then
/// was set aside, never tried again, and forgotten a day after its give-up age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_a_partition_whose_changelogs_are_not_restored_waits_for_them_and_its_mails_are_sent() {
    let h = Harness::new(1).await;
    let sent_topic = engine::embedded::CHANGELOG_TOPICS[0];
    h.kafka.on_cluster(move |cluster| cluster.partition_leader(sent_topic, 0, None).expect("leaderless"));
    let engine = h.engine().await;
    let restore_failed = "callnotify_errors_total{stage=\"state\",error=\"changelog_restore\"}";
    engine.wait_metric(restore_failed, 1.0).await;
    // Each try that fails again counts too: counted once, the partition left unread
    // for good let CallnotifyChangelogRestoreFailing go quiet after two minutes.
    engine.wait_metric(restore_failed, 2.0).await;
    h.sink.fail_next(testkit::smtp::SmtpStage::DataEnd, 451, 1);
    h.produce(TOPIC, &missed_calls_to_ten(&engine, "03700000", "unrestored", 1)).await;

    h.kafka.on_cluster(move |cluster| cluster.partition_leader(sent_topic, 0, Some(1)).expect("led again"));
    let mails = h.mails(1).await;
    assert_each_call_once(&mails, 1);
    let stopped = engine.stop().await;
    assert_eq!(stopped.metric("callnotify_mails_retried_total"), 1.0, "deferred once, then sent");
}

/// R-M4, docs/cluster.md: a partition waiting for its changelogs stays unread when the
/// unread partitions of its consumer are assigned again (librdkafka issue 5586,
/// [`UNREAD`]); read before its last reader's sent records are restored, a CDR read again
/// would send its mail a second time. (librdkafka kept the pause across that assign
/// here; the engine pauses it again all the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_m4_a_partition_waiting_for_its_changelogs_stays_unread_when_unread_ones_are_assigned_again() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let h = Harness::new(1).await;
    let a = h.node("a").await;
    let cdrs = missed_calls_to_ten(&a, "03800000", "restored", 1);
    h.produce(TOPIC, &cdrs).await;
    h.mails(1).await;
    a.stop().await;

    // Node b starts on a store of its own, its sent-records partition without a leader
    // and its first committed-offset lookups failing.
    let sent_topic = engine::embedded::CHANGELOG_TOPICS[0];
    h.kafka.on_cluster(move |cluster| {
        cluster.partition_leader(sent_topic, 0, None).expect("leaderless");
        cluster.request_errors(RDKafkaApiKey::OffsetFetch, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR; 3]);
    });
    let b = h.node("b").await;
    b.wait_metric("callnotify_errors_total{stage=\"state\",error=\"changelog_restore\"}", 1.0).await;
    b.wait_metric(UNREAD, 1.0).await;
    // The exchange sends the call's CDR again (read again, as after a crash).
    h.produce(TOPIC, &cdrs).await;
    h.kafka.on_cluster(move |cluster| cluster.partition_leader(sent_topic, 0, Some(1)).expect("led again"));

    let mails = h.mails_after_control_call(&b, 2).await;
    assert_each_call_once(&mails, 2);
    b.stop().await;
}

/// A partition paused while the mail server held the engine's mails, moved to another
/// member of the group and then given back, is read again (librdkafka keeps a
/// partition's pause across its revocation, and the engine resumed only the partitions
/// it still had: CDRs of one given back waited for a restart, unread and unnoticed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_moved_to_another_member_and_given_back_is_read_again() {
    const LIMIT: usize = 2;
    const LATER: usize = 12;
    let h = Harness::new(2).await;
    let engine = h
        .engine_with(&[
            ("CALLNOTIFY__ENGINE__MAX_IN_FLIGHT", &LIMIT.to_string()),
            // Long enough for the other member to join while the engine is paused.
            ("CALLNOTIFY__SMTP__TIMEOUT_SECS", "8"),
            ("CALLNOTIFY__SMTP__RETRY_FIRST_DELAY_MS", "100"),
        ])
        .await;
    let paused = "callnotify_consumer_paused{consumer=\"0\"}";
    engine.wait_partitions_shared(1, 8).await; // four topics of two partitions
    h.sink.after_data(testkit::smtp::DataFault::Hang, LIMIT);
    h.produce(TOPIC, &missed_calls_to_ten(&engine, "03400000", "held", LIMIT)).await;
    engine.wait_metric(paused, 1.0).await;

    // Another member joins and takes a partition of the CDR topic while it is paused.
    let member: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", h.kafka.bootstrap_servers())
        .set("group.id", "test")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .expect("consumer");
    rdkafka::consumer::Consumer::subscribe(&member, &[TOPIC]).expect("subscribe");
    testkit::wait::until(
        WAIT,
        || "the other member never got a partition".into(),
        || {
            let _ = member.poll(std::time::Duration::from_millis(100));
            rdkafka::consumer::Consumer::assignment(&member).is_ok_and(|a| a.count() > 0)
        },
    )
    .await;
    // The held mails time out into the retry queue: the engine reads on.
    testkit::wait::until(WAIT, || "never resumed".into(), || engine.metric(paused) == 0.0).await;
    // The member leaves: the engine has every partition again.
    drop(member);
    engine.wait_partitions_shared(1, 8).await;

    h.produce(TOPIC, &missed_calls_to_ten(&engine, "03500000", "later", LATER)).await;
    let mails = h.mails(LIMIT + LATER).await;
    assert_each_call_once(&mails, LIMIT + LATER);
    engine.stop().await;
}

/// A commit the broker refuses (here the group's rights; as well a group rebalancing or
/// its coordinator moving) was logged at debug only and counted nowhere: an operator saw
/// only the lag grow. It is raised (stage source, error `offset_commit`), and the
/// engine goes on notifying (R-N1); the offsets go with the next commit once the broker
/// takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_n1_a_refused_commit_is_raised_and_the_engine_goes_on() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    const REFUSED: &str = "callnotify_errors_total{stage=\"source\",error=\"offset_commit\"}";
    let h = Harness::new(1).await;
    let engine = h.engine().await;
    let cdrs = missed_calls_to_ten(&engine, "03500000", "refused", 2);
    h.kafka.on_cluster(|cluster| {
        let refusals = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 50];
        cluster.request_errors(RDKafkaApiKey::OffsetCommit, &refusals);
    });
    h.produce(TOPIC, &cdrs[..1]).await;
    h.mails(1).await;
    engine.wait_metric(REFUSED, 1.0).await;
    h.produce(TOPIC, &cdrs[1..]).await;
    h.mails(2).await;
    h.kafka.on_cluster(|cluster| cluster.clear_request_errors(RDKafkaApiKey::OffsetCommit));
    let all = h.mails_after_control_call(&engine, 3).await;
    assert_each_call_once(&all, 3);
    engine.stop().await;
}
