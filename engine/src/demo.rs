//! `callnotify demo`: the engine on embedded defaults with a sample subscriber and a few
//! sample calls, so a newcomer sees real mails within seconds.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::Settings;
use crate::decode::CdrFormat;
use crate::startup::Application;

/// One line with a subscriber who wants missed calls only, at one checked and one
/// unchecked address (R-N2, R-N4).
const SAMPLE_LINE: &str = r#"{"contract":"0312345678","numbers":[{"number":"0312345678","services":["call"],"settings":{"enabled":true,"destinations":[{"address":"taro@example.jp","send":true},{"address":"old-address@example.jp","send":false}],"designated_only":false,"missed_only":true,"designated":[]}}]}"#;

/// (caller, presentation, outcome, called, what the subscriber should see).
const SAMPLE_CALLS: [(Option<&str>, &str, &str, &str, &str); 4] = [
    (Some("+819011112222"), "allowed", "no_answer", "0312345678", "mail: missed call from 09011112222"),
    (Some("09033334444"), "allowed", "answered", "0312345678", "no mail: answered, and only missed calls are wanted"),
    (None, "withheld", "busy", "0312345678", "mail: missed call from 非通知"),
    (Some("09055556666"), "allowed", "no_answer", "0399998888", "no mail: 0399998888 has no subscription"),
];

pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // A node's configuration: its sample line would replace a real line 0312345678 in the
    // shared state, its sample calls would go to the exchanges' topic.
    anyhow::ensure!(
        settings.kafka.brokers.is_empty(),
        "the demo runs on the embedded mock cluster only, and kafka.brokers is set ({}): run it without this \
         configuration (it needs none), or `callnotify serve` to run a node",
        settings.kafka.brokers
    );
    let topic = settings
        .kafka
        .topics
        .iter()
        .find(|t| t.format == CdrFormat::Canonical)
        .context("the demo produces canonical CDRs: configure a topic with format = \"canonical\"")?
        .name
        .clone();
    let outbox = settings.smtp.host.is_empty().then(|| settings.smtp.outbox_dir.clone());
    // Polled first, before the build runs a step (registering the signal handler), so a
    // Ctrl-C while the demo sets up stops it too.
    let mut shutdown = std::pin::pin!(shutdown);
    let app = tokio::select! {
        biased;
        () = &mut shutdown => return Ok(()),
        app = Application::build(settings) => app?,
    };
    tokio::select! {
        set_up = provision_and_call(&app, &topic) => set_up?,
        () = &mut shutdown => return app.run_until_stopped(std::future::ready(())).await,
    }
    match &outbox {
        Some(dir) => println!(
            "mails are written to {}/ as .eml files (open one with any mail program)",
            std::fs::canonicalize(dir).unwrap_or(dir.clone()).display()
        ),
        None => println!("mails go to the configured SMTP server"),
    }
    println!("metrics: http://{}/metrics — press Ctrl-C to stop", app.metrics_addr());
    app.run_until_stopped(shutdown).await
}

/// The sample line into the store, then the sample calls into `topic`.
async fn provision_and_call(app: &Application, topic: &str) -> anyhow::Result<()> {
    let store = app.store().clone();
    let report =
        tokio::task::spawn_blocking(move || crate::provision::import(&store, SAMPLE_LINE.as_bytes())).await??;
    anyhow::ensure!(report.rejected.is_empty(), "sample line rejected: {:?}", report.rejected);
    println!("provisioned 0312345678: missed calls only, to taro@example.jp (old-address@example.jp unchecked)");

    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", app.bootstrap_servers())
        // A CDR the cluster does not take is an error within seconds, not librdkafka's 5 minutes.
        .set("message.timeout.ms", "10000")
        .create()
        .context("creating the demo producer")?;
    let run_id = chrono::Utc::now().timestamp_millis();
    for (i, (caller, presentation, outcome, called, expect)) in SAMPLE_CALLS.iter().enumerate() {
        let now = chrono::Utc::now();
        let cdr = serde_json::json!({
            "call_id": format!("demo-{run_id}-{i}"),
            "called": called,
            "caller": caller,
            "presentation": presentation,
            "started_at": (now - chrono::Duration::seconds(40)).to_rfc3339(),
            "answered_at": (*outcome == "answered").then(|| (now - chrono::Duration::seconds(30)).to_rfc3339()),
            "ended_at": now.to_rfc3339(),
            "outcome": outcome,
        })
        .to_string();
        producer
            .send(FutureRecord::to(topic).key(*called).payload(&cdr), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .context("producing a sample CDR")?;
        println!("produced CDR {}: {caller:?} → {called} ({outcome}) — expect {expect}", i + 1);
    }
    // The producer is dropped here, before the engine, which takes the embedded cluster
    // down with it: a client left would log that its broker is down.
    Ok(())
}
