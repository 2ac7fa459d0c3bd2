//! The system under test, in-process: a mock Kafka cluster, the engine, an SMTP sink,
//! the settings site and the IVR platform's API, each on a random loopback port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use engine::config::Settings;
use engine::embedded::EmbeddedKafka;
use engine::startup::Application;
use engine::telemetry::Metrics;
use rdkafka::producer::{FutureProducer, FutureRecord};
use testkit::smtp::{ReceivedMail, SmtpSink};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::WAIT;

pub const TOPIC: &str = "cdr";
/// Received faxes (R-F1).
pub const FAX_TOPIC: &str = "fax";
const DEAD_LETTER_TOPIC: &str = "cdr-dead-letter";
const FROM: &str = "no-reply@notify.example.jp";

/// 契約番号 of the test line: the login number under the `line` unit (R-A1).
pub const CONTRACT: &str = "0312345678";
/// 追加番号 of the test line, also with call notification: the number configured.
pub const ADDITIONAL: &str = "0312345679";

/// One line with two call-notification numbers, so a `line` login covers both and
/// 電話番号選択 appears (R-C2); no settings yet, as after a new contract.
const LINE: &str = concat!(
    r#"{"contract":"0312345678","numbers":[{"number":"0312345678","services":["call"]},"#,
    r#"{"number":"0312345679","services":["call"]}]}"#,
);

/// A running world; dropping it stops everything (the engine without draining).
pub struct World {
    pub sink: SmtpSink,
    /// `http://127.0.0.1:PORT`, the settings site.
    pub site: String,
    /// The IVR platform's API.
    ivr: SocketAddr,
    metrics: Metrics,
    producer: FutureProducer,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    engine: tokio::task::JoinHandle<anyhow::Result<()>>,
    _kafka: EmbeddedKafka,
    _dir: tempfile::TempDir,
}

impl World {
    /// The world of the call journey: [`LINE`] provisioned.
    pub async fn start() -> Self {
        Self::start_with(&[LINE]).await
    }

    /// A world with `lines` provisioned (provisioning JSON Lines, docs/provisioning.md).
    pub async fn start_with(lines: &[&str]) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
            .with_test_writer()
            .try_init();
        let kafka = EmbeddedKafka::start(&[TOPIC, FAX_TOPIC, DEAD_LETTER_TOPIC], 1).expect("mock cluster");
        let sink = SmtpSink::start(0).await.expect("smtp sink");
        let dir = tempfile::tempdir().expect("tempdir");
        // Bound first: the fax mail links to the site (admin.public_url).
        let site_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let site_url = format!("http://{}", site_listener.local_addr().expect("local addr"));
        let settings = settings(&kafka, &sink, &dir, &site_url);
        let test_mailer = engine::deliver::TestMailer::new(&settings.smtp).expect("test mailer");

        let app = Application::build(settings).await.expect("engine starts");
        let store = app.store().clone();
        let metrics = app.metrics().clone();
        let report = engine::provision::import(&store, lines.join("\n").as_bytes()).expect("import");
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let engine = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));

        let credentials = admin::credentials::Credentials::open(&store).expect("credentials");
        let clock = admin::clock::SystemClock::shared();
        let ivr = admin::ivr::Ivr::new(store.clone(), credentials.clone(), clock.clone());
        let ivr = serve(admin::ivr::api::router(admin::ivr::api::ApiState::new(ivr))).await;
        let site = admin::site::SiteState::new(store, credentials, clock).with_test_mailer(Some(Arc::new(test_mailer)));
        serve_on(site_listener, admin::site::router(site));

        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .create()
            .expect("producer");
        Self { sink, site: site_url, ivr, metrics, producer, stop: Some(stop), engine, _kafka: kafka, _dir: dir }
    }

    /// The site's URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.site)
    }

    /// Calls the IVR from `caller` and keys each entry of `keys` in turn, as a
    /// subscriber does on the phone (R-I1..R-I7); returns the last prompt's id.
    pub async fn phone_ivr(&self, caller: &str, keys: &[&str]) -> String {
        let mut step = post_json(self.ivr, "/ivr/calls", &serde_json::json!({ "caller": caller })).await;
        let call_id = step["call_id"].as_str().expect("a call id").to_owned();
        for digits in keys {
            assert_eq!(step["ends"], false, "the call ended early: {step}");
            let path = format!("/ivr/calls/{call_id}/digits");
            step = post_json(self.ivr, &path, &serde_json::json!({ "digits": digits })).await;
        }
        assert_eq!(step["ends"], true, "the call is still waiting: {step}");
        step["prompt"].as_str().unwrap_or_default().to_owned()
    }

    /// Produces one CDR to the engine's topic; one partition keeps CDRs in order.
    pub async fn produce(&self, cdr: &str) {
        self.producer
            .send(FutureRecord::to(TOPIC).key("browser").payload(cdr), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }

    /// Produces one fax record (docs/fax.md) to the fax topic.
    pub async fn produce_fax(&self, record: &str) {
        self.producer
            .send(FutureRecord::to(FAX_TOPIC).key("browser").payload(record), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }

    /// The site's address, for requests made beside the browser.
    pub fn site_addr(&self) -> SocketAddr {
        self.site.trim_start_matches("http://").parse().expect("the site's address")
    }

    /// Waits for at least `n` mails in all.
    pub async fn mails(&self, n: usize) -> Vec<ReceivedMail> {
        let mails = self.sink.wait_for(n, WAIT).await;
        let to: Vec<_> = mails.iter().map(|m| &m.rcpt_to).collect();
        assert!(mails.len() >= n, "expected {n} mails, got {}: {to:?}", mails.len());
        mails
    }

    /// Waits until a metric series (e.g. `callnotify_cdrs_filtered_total{reason="answered"}`)
    /// reaches `value`: the engine's account of having handled a CDR that sends nothing.
    pub async fn wait_metric(&self, series: &str, value: f64) {
        let current = || self.metrics.value(series).unwrap_or(0.0);
        testkit::wait::until(
            WAIT,
            || format!("{series} stayed at {}, never reached {value}", current()),
            || current() >= value,
        )
        .await;
    }

    /// Stops the engine as SIGTERM does.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.engine).await.expect("engine task").expect("engine stops cleanly");
    }
}

/// The engine's settings, as `Harness::settings` of the pipeline tests builds them:
/// `CALLNOTIFY__*` overrides over the built-in defaults.
fn settings(kafka: &EmbeddedKafka, sink: &SmtpSink, dir: &tempfile::TempDir, site: &str) -> Settings {
    let env = [
        ("CALLNOTIFY__KAFKA__BROKERS", kafka.bootstrap_servers().to_owned()),
        ("CALLNOTIFY__KAFKA__GROUP_ID", "browser".to_owned()),
        (
            "CALLNOTIFY__KAFKA__TOPICS",
            format!(r#"[{{name="{TOPIC}",format="canonical"}},{{name="{FAX_TOPIC}",format="fax"}}]"#),
        ),
        ("CALLNOTIFY__ADMIN__PUBLIC_URL", site.to_owned()),
        ("CALLNOTIFY__KAFKA__DEAD_LETTER_TOPIC", DEAD_LETTER_TOPIC.to_owned()),
        ("CALLNOTIFY__KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS", "20".to_owned()),
        ("CALLNOTIFY__KAFKA__PROPERTIES__SESSION_TIMEOUT_MS", "6000".to_owned()),
        ("CALLNOTIFY__KAFKA__PROPERTIES__HEARTBEAT_INTERVAL_MS", "500".to_owned()),
        ("CALLNOTIFY__STORE__PATH", dir.path().join("store").display().to_string()),
        ("CALLNOTIFY__SMTP__FROM", format!("着信お知らせメール <{FROM}>")),
        ("CALLNOTIFY__ENGINE__SHUTDOWN_GRACE_SECS", "20".to_owned()),
        ("CALLNOTIFY__METRICS__LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let env = env.into_iter().chain(sink.engine_env()).map(|(k, v)| (k.to_owned(), v));
    Settings::load_from(None, env).expect("test settings")
}

/// Serves `router` on a random loopback port for the rest of the test.
async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    serve_on(listener, router);
    addr
}

/// Serves `router` on `listener` for the rest of the test.
fn serve_on(listener: tokio::net::TcpListener, router: axum::Router) {
    tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
}

/// `POST path` with a JSON body over plain HTTP/1.1, as an IVR platform does; the
/// answer must be 200 with a JSON body.
async fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, body) = http(addr, &request).await;
    assert_eq!(status, 200, "POST {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {body}"))
}

/// Sends one raw HTTP/1.1 request with `Connection: close`; returns the status and body.
pub async fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let (status, _, body) = http_bytes(addr, request).await;
    (status, String::from_utf8(body).expect("UTF-8 response"))
}

/// [`http`] for any body: the status, the header block and the body's bytes.
pub async fn http_bytes(addr: SocketAddr, request: &str) -> (u16, String, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read response");
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    (status, head, response[split + 4..].to_vec())
}

/// A canonical CDR (docs/cdr-formats.md) of a call to `called` from `caller`
/// (presentation allowed) at [`testkit::cdr::call_start`]; `outcome` as in the format.
pub fn cdr(call_id: &str, called: &str, caller: &str, outcome: &str) -> String {
    testkit::cdr::cdr(call_id, called, Some(caller), "allowed", outcome)
}
