//! Stopping the engine mid-stream and starting it again with the same group and store:
//! every CDR is notified exactly once.

use std::collections::HashMap;

use crate::helpers::*;

const CALLS: usize = 90;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_stream_notifies_every_cdr_exactly_once() {
    let h = Harness::new(3).await;
    // A slow mail rate and few CDRs in flight: the first engine is stopped with most
    // CDRs not yet read and some mails on their way.
    let slow = [("CALLNOTIFY__SMTP__RATE_PER_SECOND", "30"), ("CALLNOTIFY__ENGINE__MAX_IN_FLIGHT", "4")];
    let first = h.engine_with(&slow).await;
    let numbers: Vec<String> = (0..10).map(|i| format!("03100000{i:02}")).collect();
    let lines: Vec<String> = numbers.iter().map(|n| plain_subscriber(n, &format!("{n}@example.jp"))).collect();
    first.provision(&lines);

    let cdrs: Vec<String> = (0..CALLS)
        .map(|i| cdr(&format!("restart-{i}"), &numbers[i % numbers.len()], Some("09011112222"), "allowed", "no_answer"))
        .collect();
    h.produce(TOPIC, &cdrs).await;
    h.mails(CALLS / 4).await;
    first.stop().await;
    let after_first = h.sink.count();
    assert!(after_first < CALLS, "the first engine was stopped mid-stream ({after_first} of {CALLS} sent)");

    let second = h.engine().await;
    let mails = h.mails(CALLS).await;
    // Anything sent twice would have arrived by the time a control call is through.
    second.provision(&[plain_subscriber("0698765432", "control@example.jp")]);
    h.produce(TOPIC, &[cdr("control", "0698765432", None, "withheld", "no_answer")]).await;
    let all = h.mails(CALLS + 1).await;
    second.stop().await;

    let mut by_id: HashMap<String, usize> = HashMap::new();
    for mail in &mails {
        *by_id.entry(parse(mail).message_id).or_default() += 1;
    }
    assert_eq!(by_id.len(), CALLS, "every CDR notified");
    assert!(by_id.values().all(|&n| n == 1), "none twice: {by_id:?}");
    assert_eq!(all.len(), CALLS + 1, "nothing else arrived");
}
