//! The settings site on several engine nodes (docs/cluster.md): three engines with their
//! own stores on one embedded Kafka, each with its own site. A subscriber's requests
//! land on any node, as behind a load balancer without sticky sessions.

use std::net::SocketAddr;
use std::time::Duration;

use engine::config::Settings;
use engine::embedded::EmbeddedKafka;
use engine::startup::Application;
use testkit::http::request as http;

const TOPIC: &str = "cdr";
const DEAD_LETTER_TOPIC: &str = "cdr-dead-letter";
const NUMBER: &str = "0312345678";
const PASSWORD: &str = "kumo2026sora";

/// One node: an engine and its settings site.
struct Node {
    site: SocketAddr,
    store: engine::store::Store,
    stop: tokio::sync::oneshot::Sender<()>,
    engine: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn node(kafka: &EmbeddedKafka, dir: &std::path::Path, name: &str) -> Node {
    let env = [
        ("CALLNOTIFY__KAFKA__BROKERS", kafka.bootstrap_servers().to_owned()),
        ("CALLNOTIFY__KAFKA__GROUP_ID", "site-cluster".to_owned()),
        ("CALLNOTIFY__KAFKA__TOPICS", format!(r#"[{{name="{TOPIC}",format="canonical"}}]"#)),
        ("CALLNOTIFY__KAFKA__DEAD_LETTER_TOPIC", DEAD_LETTER_TOPIC.to_owned()),
        ("CALLNOTIFY__KAFKA__PROPERTIES__SESSION_TIMEOUT_MS", "6000".to_owned()),
        ("CALLNOTIFY__KAFKA__PROPERTIES__HEARTBEAT_INTERVAL_MS", "500".to_owned()),
        ("CALLNOTIFY__STORE__PATH", dir.join(name).display().to_string()),
        ("CALLNOTIFY__SMTP__OUTBOX_DIR", dir.join("outbox").display().to_string()),
        ("CALLNOTIFY__METRICS__LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let settings = Settings::load_from(None, env.into_iter().map(|(k, v)| (k.to_owned(), v))).expect("settings");
    let app = Application::build(settings).await.expect("engine starts");
    let store = app.store().clone();
    let credentials = admin::credentials::Credentials::open(&store).expect("credentials");
    let site = admin::site::SiteState::new(store.clone(), credentials, admin::clock::SystemClock::shared());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let router = admin::site::router(site);
    tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let engine = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    Node { site: addr, store, stop, engine }
}

/// R-S1, R-S7: a subscriber logs in on node A; the session serves pages on node B and
/// node C; the logout on node C ends it on node A too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_s7_a_site_session_is_used_on_every_node_and_a_logout_on_one_ends_it_on_all() {
    let kafka = EmbeddedKafka::start(&[TOPIC, DEAD_LETTER_TOPIC], 1).expect("mock cluster");
    let dir = tempfile::tempdir().unwrap();
    let nodes =
        [node(&kafka, dir.path(), "a").await, node(&kafka, dir.path(), "b").await, node(&kafka, dir.path(), "c").await];
    let line = testkit::line::Subscriber::new(NUMBER, &[("taro@example.jp", true)]).line();
    let store = nodes[0].store.clone();
    tokio::task::spawn_blocking(move || {
        engine::provision::import(&store, line.as_bytes()).expect("import");
        let credentials = admin::credentials::Credentials::open(&store).expect("credentials");
        let number = engine::phone::PhoneNumber::parse(NUMBER).unwrap();
        credentials.set_password(&number, PASSWORD, chrono::Utc::now()).expect("password");
    })
    .await
    .unwrap();

    let (a, b, c) = (nodes[0].site, nodes[1].site, nodes[2].site);
    let form = http(a, "GET", "/login", "", None).await;
    let login = format!("number={NUMBER}&password={PASSWORD}&csrf={}", form.csrf());
    let pre = form.cookie_header();
    let logged_in = http(a, "POST", "/login", &pre, Some(&login)).await;
    assert_eq!((logged_in.status, logged_in.location.as_deref()), (303, Some("/")), "{}", logged_in.body);
    let (name, id) = logged_in.cookies.iter().find(|(n, _)| n.contains("session")).expect("a session cookie").clone();
    let session = format!("{name}={id}");

    for (node, site) in [("B", b), ("C", c)] {
        let menu = http(site, "GET", "/", &session, None).await;
        assert_eq!(menu.status, 200, "node {node} serves the session: {:?} {}", menu.location, menu.body);
        assert!(menu.body.contains(NUMBER), "node {node} shows the subscriber's page");
    }
    let menu = http(c, "GET", "/", &session, None).await;
    let out = http(c, "POST", "/logout", &session, Some(&format!("csrf={}", menu.csrf()))).await;
    assert_eq!(out.status, 303, "logged out on node C: {}", out.body);
    for (node, site) in [("A", a), ("B", b)] {
        let after = http(site, "GET", "/", &session, None).await;
        assert_eq!(
            (after.status, after.location.as_deref()),
            (303, Some("/login?notice=ended")),
            "the session ended on node {node} too"
        );
    }

    for node in nodes {
        let _ = node.stop.send(());
        tokio::time::timeout(Duration::from_secs(60), node.engine).await.expect("stops").unwrap().expect("cleanly");
    }
}
