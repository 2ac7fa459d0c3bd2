//! Stopping the engine mid-stream and starting it again with the same group and store:
//! every CDR is notified exactly once.

use crate::helpers::*;

const CALLS: usize = 90;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_stream_notifies_every_cdr_exactly_once() {
    restart_mid_stream("1").await;
}

/// The same with `engine.consumers = 2`: both threads give their partitions up at the
/// stop, and the next engine's threads take them over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_stream_with_two_consumer_threads_notifies_every_cdr_exactly_once() {
    restart_mid_stream("2").await;
}

async fn restart_mid_stream(consumers: &str) {
    let h = Harness::new(3).await;
    // A slow mail rate and few CDRs in flight: the first engine is stopped with most
    // CDRs not yet read and some mails on their way.
    let slow = [
        ("CALLNOTIFY__SMTP__RATE_PER_SECOND", "30"),
        ("CALLNOTIFY__ENGINE__MAX_IN_FLIGHT", "4"),
        ("CALLNOTIFY__ENGINE__CONSUMERS", consumers),
    ];
    let first = h.engine_with(&slow).await;
    let cdrs = missed_calls_to_ten(&first, "03100000", "restart", CALLS);
    h.produce(TOPIC, &cdrs).await;
    h.mails(CALLS / 4).await;
    first.stop().await;
    let after_first = h.sink.count();
    assert!(after_first < CALLS, "the first engine was stopped mid-stream ({after_first} of {CALLS} sent)");

    let second = h.engine_with(&[("CALLNOTIFY__ENGINE__CONSUMERS", consumers)]).await;
    h.mails(CALLS).await;
    let all = h.mails_after_control_call(&second, CALLS + 1).await;
    let stopped = second.stop().await;
    assert_each_call_once(&all, CALLS + 1);
    // The second engine went on where the first had committed, most likely inside a
    // batch of the producer's; the mock cluster hands out whole batches.
    assert_eq!(stopped.metric("callnotify_offsets_skipped_total"), 0.0, "no CDR passed over");
}

/// Graceful shutdown (docs/delivery.md): mails still waiting when the grace
/// period runs short are durably queued and their CDRs committed, so the next start
/// sends them from the queue, each once, without reading a CDR again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mails_not_sent_within_the_shutdown_grace_are_queued_and_sent_after_the_restart() {
    const WAITING: usize = 10;
    let h = Harness::new(1).await;
    // One mail a second: most of them are still waiting for the rate limit at the stop.
    let slow = [("CALLNOTIFY__SMTP__RATE_PER_SECOND", "1"), ("CALLNOTIFY__ENGINE__SHUTDOWN_GRACE_SECS", "2")];
    let first = h.engine_with(&slow).await;
    let numbers: Vec<String> = (0..WAITING).map(|i| format!("03200000{i:02}")).collect();
    first.provision(&numbers.iter().map(|n| plain_subscriber(n, &format!("{n}@example.jp"))).collect::<Vec<_>>());
    let cdrs: Vec<String> = (0..WAITING)
        .map(|i| cdr(&format!("grace-{i}"), &numbers[i], Some("09011112222"), "allowed", "no_answer"))
        .collect();
    h.produce(TOPIC, &cdrs).await;
    first.wait_metric("callnotify_cdrs_notified_total", WAITING as f64).await;
    let stopped = first.stop().await;
    let (sent, queued) =
        (stopped.metric("callnotify_mails_sent_total"), stopped.metric("callnotify_retry_queue_mails"));
    assert!(queued >= 1.0, "the stop came while mails were waiting (sent {sent})");
    assert_eq!(sent + queued, WAITING as f64, "every mail was sent or queued");

    let second = h.engine().await;
    h.mails(WAITING).await;
    let all = h.mails_after_control_call(&second, WAITING + 1).await;
    let stopped = second.stop().await;
    assert_each_call_once(&all, WAITING + 1);
    assert_eq!(
        stopped.metric("callnotify_cdrs_consumed_total"),
        1.0,
        "the first engine committed every CDR it had read; only the control CDR is new"
    );
    assert_eq!(stopped.metric("callnotify_retry_queue_mails"), 0.0);
}
