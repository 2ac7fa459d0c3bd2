//! Test harness: a running engine on its own mock Kafka cluster, SMTP sink and store.

use std::time::Duration;

use chrono::{DateTime, Datelike, FixedOffset};

use engine::config::Settings;
use engine::embedded::EmbeddedKafka;
use engine::startup::Application;
use engine::store::Store;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use testkit::smtp::{ReceivedMail, SmtpSink};

pub const TOPIC: &str = "cdr";
pub const ASTERISK_TOPIC: &str = "cdr-asterisk";
pub const FREESWITCH_TOPIC: &str = "cdr-freeswitch";
pub const DEAD_LETTER_TOPIC: &str = "cdr-dead-letter";
/// Received faxes (R-F1).
pub const FAX_TOPIC: &str = "fax";
pub const FROM: &str = "no-reply@notify.example.jp";

/// Long enough for a consumer group to form on a loaded machine; tests finish as soon
/// as the awaited mails arrive.
pub const WAIT: Duration = Duration::from_secs(60);

/// One test's world: Kafka, a mail server and a store directory.
pub struct Harness {
    pub kafka: EmbeddedKafka,
    pub sink: SmtpSink,
    pub dir: tempfile::TempDir,
    producer: FutureProducer,
}

impl Harness {
    pub async fn new(partitions: i32) -> Self {
        // Logs show with `--nocapture` (RUST_LOG=debug for more).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
            .with_test_writer()
            .try_init();
        let topics = [TOPIC, ASTERISK_TOPIC, FREESWITCH_TOPIC, FAX_TOPIC, DEAD_LETTER_TOPIC];
        let kafka = EmbeddedKafka::start(&topics, partitions).expect("mock cluster");
        let sink = SmtpSink::start(0).await.expect("smtp sink");
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .create()
            .expect("producer");
        Self { kafka, sink, dir: tempfile::tempdir().expect("tempdir"), producer }
    }

    /// Settings of an engine in group `group`, with `extra` environment overrides.
    pub fn settings(&self, extra: &[(&str, &str)]) -> Settings {
        let mut env: Vec<(String, String)> = [
            ("CALLNOTIFY__KAFKA__BROKERS", self.kafka.bootstrap_servers().to_owned()),
            ("CALLNOTIFY__KAFKA__GROUP_ID", "test".to_owned()),
            (
                "CALLNOTIFY__KAFKA__TOPICS",
                format!(
                    r#"[{{name="{TOPIC}",format="canonical"}},{{name="{ASTERISK_TOPIC}",format="asterisk"}},{{name="{FREESWITCH_TOPIC}",format="freeswitch"}},{{name="{FAX_TOPIC}",format="fax"}}]"#
                ),
            ),
            ("CALLNOTIFY__KAFKA__DEAD_LETTER_TOPIC", DEAD_LETTER_TOPIC.to_owned()),
            ("CALLNOTIFY__KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS", "20".to_owned()),
            // The mock cluster waits out a departed member's session before rebalancing.
            ("CALLNOTIFY__KAFKA__PROPERTIES__SESSION_TIMEOUT_MS", "6000".to_owned()),
            ("CALLNOTIFY__KAFKA__PROPERTIES__HEARTBEAT_INTERVAL_MS", "500".to_owned()),
            ("CALLNOTIFY__STORE__PATH", self.dir.path().join("store").display().to_string()),
            ("CALLNOTIFY__SMTP__FROM", format!("着信お知らせメール <{FROM}>")),
            ("CALLNOTIFY__SMTP__RETRY_FIRST_DELAY_MS", "20".to_owned()),
            ("CALLNOTIFY__SMTP__RETRY_MAX_DELAY_MS", "200".to_owned()),
            ("CALLNOTIFY__ENGINE__SHUTDOWN_GRACE_SECS", "20".to_owned()),
            ("CALLNOTIFY__METRICS__LISTEN", "127.0.0.1:0".to_owned()),
        ]
        .into_iter()
        .chain(self.sink.engine_env())
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Settings::load_from(None, env).expect("test settings")
    }

    pub async fn engine(&self) -> TestEngine {
        self.engine_with(&[]).await
    }

    pub async fn engine_with(&self, extra: &[(&str, &str)]) -> TestEngine {
        TestEngine::start(self.settings(extra)).await
    }

    /// Produces `payloads` to `topic`, keyed by their index, in order.
    pub async fn produce(&self, topic: &str, payloads: &[String]) {
        let keyed: Vec<(String, String)> =
            payloads.iter().enumerate().map(|(i, p)| (i.to_string(), p.clone())).collect();
        self.produce_keyed(topic, &keyed).await;
    }

    /// Produces each (key, payload) of `records` to `topic`, in order.
    pub async fn produce_keyed(&self, topic: &str, records: &[(String, String)]) {
        for (key, payload) in records {
            self.producer
                .send(FutureRecord::to(topic).key(key).payload(payload), Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)
                .expect("produce");
        }
    }

    /// Produces `payload` to partition `partition` of `topic`.
    pub async fn produce_to(&self, topic: &str, partition: i32, payload: &str) {
        self.producer
            .send(FutureRecord::<(), _>::to(topic).partition(partition).payload(payload), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }

    /// Waits for exactly `n` mails in all (panics with what arrived if fewer do).
    pub async fn mails(&self, n: usize) -> Vec<ReceivedMail> {
        let mails = self.sink.wait_for(n, WAIT).await;
        assert!(mails.len() >= n, "expected {n} mails, got {}: {:#?}", mails.len(), summary(&mails));
        mails
    }

    /// Provisions a control number through `engine`, calls it and waits for `n` mails in
    /// all, the control's among them: a mail sent twice before it would have arrived by
    /// then.
    pub async fn mails_after_control_call(&self, engine: &TestEngine, n: usize) -> Vec<ReceivedMail> {
        engine.provision(&[plain_subscriber("0698765432", "control@example.jp")]);
        self.produce(TOPIC, &[cdr("control", "0698765432", None, "withheld", "no_answer")]).await;
        self.mails(n).await
    }

    /// Reads every record of the dead-letter topic so far, waiting for at least `n`.
    pub fn dead_letters(&self, n: usize) -> Vec<serde_json::Value> {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.kafka.bootstrap_servers())
            .set("group.id", "dead-letter-reader")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[DEAD_LETTER_TOPIC]).expect("subscribe");
        let deadline = std::time::Instant::now() + WAIT;
        let mut records = Vec::new();
        while records.len() < n && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                records.push(serde_json::from_slice(m.payload().unwrap_or_default()).expect("dead letter is JSON"));
            }
        }
        records
    }
}

/// A running engine; `stop` drains it like SIGTERM does.
pub struct TestEngine {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub store: Store,
    /// Where `/metrics` is served.
    pub metrics_addr: std::net::SocketAddr,
    metrics: engine::telemetry::Metrics,
}

impl TestEngine {
    pub async fn start(settings: Settings) -> Self {
        Self::start_with_clock(settings, None).await
    }

    /// An engine whose store reads `clock`.
    pub async fn start_with_clock(settings: Settings, clock: Option<engine::store::Clock>) -> Self {
        let app = Application::build_with_clock(settings, clock).await.expect("engine starts");
        let store = app.store().clone();
        let metrics = app.metrics().clone();
        let metrics_addr = app.metrics_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Self { stop, task, store, metrics_addr, metrics }
    }

    /// A GET of the operator endpoint: the whole HTTP response.
    pub async fn get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics_addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    /// Provisions JSON Lines, as `callnotify provision import` does.
    pub fn provision(&self, lines: &[String]) {
        let report = engine::provision::import(&self.store, lines.join("\n").as_bytes()).expect("import");
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    }

    /// The value of one metric series, e.g. `callnotify_cdrs_filtered_total{reason="stopped"}`.
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics, series)
    }

    /// Whether the metrics show `series` at all (`metric` reads a missing one as 0).
    pub fn shows(&self, series: &str) -> bool {
        self.metrics.value(series).is_some()
    }

    /// Waits until the metrics show `series` at all.
    pub async fn wait_shown(&self, series: &str) {
        self.wait_until(|| format!("{series} never shown"), || self.shows(series)).await;
    }

    /// Waits until a metric series reaches `value`: the engine's own account of having
    /// handled a CDR, for steps that must come after it.
    pub async fn wait_metric(&self, series: &str, value: f64) {
        self.wait_until(|| format!("{series} never reached {value}"), || self.metric(series) >= value).await;
    }

    /// Waits until the group has shared `partitions` out among the engine's `consumers`
    /// threads, each holding some: CDRs produced after this are read by the threads that
    /// keep them, not again by another after a join's rebalance (on a loaded machine a
    /// thread can join the group late).
    pub async fn wait_partitions_shared(&self, consumers: usize, partitions: usize) {
        let held = || -> Vec<f64> {
            (0..consumers)
                .map(|n| self.metric(&format!("callnotify_consumer_partitions{{consumer=\"{n}\"}}")))
                .collect()
        };
        let shared = || {
            let held = held();
            held.iter().all(|&h| h > 0.0) && held.iter().sum::<f64>() == partitions as f64
        };
        self.wait_until(|| format!("partitions never shared out: {:?}", held()), shared).await;
    }

    /// Polls until `done` holds; after [`WAIT`], fails saying `what`.
    async fn wait_until(&self, what: impl Fn() -> String, done: impl Fn() -> bool) {
        testkit::wait::until(WAIT, what, done).await;
    }

    /// Stops the engine (draining, as on SIGTERM) and returns its final metrics: what
    /// happens after a mail's 250 reply (counting it sent) is done by then.
    pub async fn stop(self) -> Stopped {
        drop(self.store);
        let _ = self.stop.send(());
        self.task.await.expect("engine task").expect("engine stops cleanly");
        Stopped { metrics: self.metrics }
    }
}

impl TestEngine {
    /// Waits for the engine to stop by itself (not asked to) and returns why it did.
    pub async fn failed(self) -> String {
        let ended = tokio::time::timeout(WAIT, self.task).await.expect("the engine stops by itself");
        match ended.expect("engine task") {
            Ok(()) => panic!("the engine stopped without an error"),
            Err(e) => format!("{e:#}"),
        }
    }
}

/// A stopped engine's metrics.
pub struct Stopped {
    metrics: engine::telemetry::Metrics,
}

impl Stopped {
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics, series)
    }
}

fn metric(metrics: &engine::telemetry::Metrics, series: &str) -> f64 {
    metrics.value(series).unwrap_or(0.0)
}

pub use testkit::line::Subscriber;

/// A subscriber with every call notified to `address`.
pub fn plain_subscriber(number: &str, address: &str) -> String {
    Subscriber::new(number, &[(address, true)]).line()
}

pub use testkit::cdr::{call_start, cdr, cdr_at};

/// The mail's 着信日時 line for a call that started at `t` (R-M2): the date, the
/// weekday and the time in Japan, as a subscriber reads them.
pub fn jst_line(t: DateTime<FixedOffset>) -> String {
    let local = t.with_timezone(&FixedOffset::east_opt(9 * 3600).expect("JST"));
    let weekday = ["月", "火", "水", "木", "金", "土", "日"][local.weekday().num_days_from_monday() as usize];
    format!("着信日時：{}({weekday}) {}（日本時間）", local.format("%Y年%m月%d日"), local.format("%H:%M:%S"))
}

/// A decoded received mail, for assertions.
pub struct Parsed {
    pub from: String,
    pub subject: String,
    pub body: String,
    pub message_id: String,
    pub auto_submitted: Option<String>,
    pub raw: String,
}

pub fn parse(mail: &ReceivedMail) -> Parsed {
    let m = mail_parser::MessageParser::default().parse(&mail.data).expect("a MIME message");
    Parsed {
        from: m.from().and_then(|f| f.first()).and_then(|a| a.address()).unwrap_or_default().to_owned(),
        subject: m.subject().unwrap_or_default().to_owned(),
        body: m.body_text(0).map(|b| b.into_owned()).unwrap_or_default(),
        message_id: m.message_id().unwrap_or_default().to_owned(),
        auto_submitted: m.header_raw("Auto-Submitted").map(|v| v.trim().to_owned()),
        raw: String::from_utf8_lossy(&mail.data).into_owned(),
    }
}

/// (recipient, subject) of each mail, for failure messages.
pub fn summary(mails: &[ReceivedMail]) -> Vec<(Vec<String>, String)> {
    mails.iter().map(|m| (m.rcpt_to.clone(), parse(m).subject)).collect()
}

/// Provisions ten plain subscribers, `{prefix}00` to `{prefix}09`, each mailed at
/// `NUMBER@example.jp`, and returns `calls` CDRs of missed calls to them in turn, with
/// call ids `{id}-0`, `{id}-1`…
/// `calls` missed calls to `called` from 09011112222, ids `{id}-0`, `{id}-1`, …
pub fn missed_calls(called: &str, id: &str, calls: usize) -> Vec<String> {
    (0..calls).map(|i| cdr(&format!("{id}-{i}"), called, Some("09011112222"), "allowed", "no_answer")).collect()
}

pub fn missed_calls_to_ten(engine: &TestEngine, prefix: &str, id: &str, calls: usize) -> Vec<String> {
    let numbers: Vec<String> = (0..10).map(|i| format!("{prefix}{i:02}")).collect();
    engine.provision(&numbers.iter().map(|n| plain_subscriber(n, &format!("{n}@example.jp"))).collect::<Vec<_>>());
    (0..calls)
        .map(|i| cdr(&format!("{id}-{i}"), &numbers[i % numbers.len()], Some("09011112222"), "allowed", "no_answer"))
        .collect()
}

/// Asserts that `mails` notify `calls` calls, each once.
pub fn assert_each_call_once(mails: &[ReceivedMail], calls: usize) {
    let mut by_id: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for mail in mails {
        *by_id.entry(parse(mail).message_id).or_default() += 1;
    }
    assert_eq!(by_id.len(), calls, "every call notified: {by_id:?}");
    assert!(by_id.values().all(|&n| n == 1), "none twice: {by_id:?}");
}
