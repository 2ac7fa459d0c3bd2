//! R-S8: with `admin.tls_cert` and `admin.tls_key` the settings site speaks HTTPS itself,
//! checked with a real TLS client that trusts the test CA in the workspace's
//! `tests/fixtures/tls`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use admin::clock::SystemClock;
use admin::server::{bind_all, ServerError, Servers};
use engine::config::{AdminSettings, Settings};
use engine::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

fn fixture(name: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "tests", "fixtures", "tls", name].iter().collect();
    path.to_str().unwrap().to_owned()
}

/// `[admin]` on free loopback ports, with `extra` environment overrides.
fn admin_settings(extra: &[(&str, String)]) -> Result<AdminSettings, engine::config::ConfigError> {
    // An https:// address for a site served over TLS, as the configuration asks.
    let secure =
        extra.iter().any(|(k, _)| *k == "CALLNOTIFY__ADMIN__TLS_CERT" || *k == "CALLNOTIFY__ADMIN__BEHIND_TLS_PROXY");
    let scheme = if secure { "https" } else { "http" };
    let mut env = vec![
        ("CALLNOTIFY__ADMIN__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("CALLNOTIFY__ADMIN__IVR_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("CALLNOTIFY__ADMIN__PUBLIC_URL".to_owned(), format!("{scheme}://localhost")),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    Ok(Settings::load_from(None, env)?.admin)
}

fn tls_settings() -> AdminSettings {
    admin_settings(&[
        ("CALLNOTIFY__ADMIN__TLS_CERT", fixture("site.crt")),
        ("CALLNOTIFY__ADMIN__TLS_KEY", fixture("site.key")),
    ])
    .unwrap()
}

async fn start(admin: &AdminSettings) -> Result<Servers, ServerError> {
    bind_all(admin).await?.serve(
        admin,
        Store::temporary().unwrap(),
        SystemClock::shared(),
        None,
        engine::telemetry::Metrics::new(),
        tokio_util::sync::CancellationToken::new(),
    )
}

/// A TLS client that trusts only the test CA.
fn connector() -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(fixture("ca.crt")).unwrap()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// `GET path` over HTTPS; the whole response as text.
async fn https_get(addr: SocketAddr, path: &str) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector().connect(ServerName::try_from("localhost").unwrap(), tcp).await.expect("handshake");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await.unwrap();
    String::from_utf8(response).unwrap()
}

fn header_lines<'a>(response: &'a str, name: &str) -> Vec<&'a str> {
    let head = response.split("\r\n\r\n").next().unwrap();
    head.lines().filter(|line| line.to_ascii_lowercase().starts_with(&format!("{name}:"))).collect()
}

#[tokio::test]
async fn r_s8_the_site_serves_https_with_secure_cookies_and_hsts() {
    let servers = start(&tls_settings()).await.unwrap();
    assert_eq!(servers.site_url, format!("https://{}", servers.site));

    let response = https_get(servers.site, "/login").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("ログイン"));
    assert_eq!(header_lines(&response, "strict-transport-security"), ["strict-transport-security: max-age=31536000"]);
    let cookies = header_lines(&response, "set-cookie");
    assert!(
        cookies.iter().any(|c| c.contains("__Host-callnotify_csrf=") && c.contains("; Secure") && c.contains("Path=/")),
        "{cookies:?}"
    );
}

#[tokio::test]
async fn r_s8_plain_http_to_the_tls_port_gets_no_page() {
    let servers = start(&tls_settings()).await.unwrap();
    let mut tcp = TcpStream::connect(servers.site).await.unwrap();
    tcp.write_all(b"GET /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    let _ = tcp.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    assert!(!text.contains("ログイン") && !text.contains("HTTP/1.1 200"), "{text}");
}

#[tokio::test]
async fn r_s8_a_silent_client_does_not_hold_up_the_next_one() {
    let servers = start(&tls_settings()).await.unwrap();
    // Connects and never starts its handshake.
    let _silent = TcpStream::connect(servers.site).await.unwrap();
    assert!(https_get(servers.site, "/login").await.starts_with("HTTP/1.1 200"));
}

/// The site's and the IVR API's addresses are taken before the engine starts (a taken
/// one stops the node before it joins its consumer groups) but refuse connections until
/// served: a proxy or the IVR platform turns to another node at once, instead of its
/// requests waiting through this node's catch-up.
#[tokio::test]
async fn bound_addresses_refuse_connections_until_served() {
    let admin = admin_settings(&[]).unwrap();
    let bound = bind_all(&admin).await.unwrap();
    let (site, ivr) = bound.addresses();
    for addr in [site, ivr] {
        let refused = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{addr}");
    }
    let servers = bound
        .serve(
            &admin,
            Store::temporary().unwrap(),
            SystemClock::shared(),
            None,
            engine::telemetry::Metrics::new(),
            tokio_util::sync::CancellationToken::new(),
        )
        .unwrap();
    assert_eq!((servers.site, servers.ivr), (site, ivr));
    TcpStream::connect(site).await.unwrap();
}

#[tokio::test]
async fn without_tls_the_site_is_plain_http_with_neither_secure_cookies_nor_hsts() {
    let servers = start(&admin_settings(&[]).unwrap()).await.unwrap();
    assert_eq!(servers.site_url, format!("http://{}", servers.site));
    let mut tcp = TcpStream::connect(servers.site).await.unwrap();
    tcp.write_all(b"GET /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(header_lines(&response, "strict-transport-security").is_empty());
    assert!(header_lines(&response, "set-cookie").iter().all(|c| !c.contains("Secure")));
}

#[tokio::test]
async fn behind_a_tls_proxy_the_site_speaks_http_but_sets_secure_cookies_and_hsts() {
    let admin = admin_settings(&[("CALLNOTIFY__ADMIN__BEHIND_TLS_PROXY", "true".to_owned())]).unwrap();
    let servers = start(&admin).await.unwrap();
    let mut tcp = TcpStream::connect(servers.site).await.unwrap();
    tcp.write_all(b"GET /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert_eq!(header_lines(&response, "strict-transport-security").len(), 1);
    assert!(header_lines(&response, "set-cookie")
        .iter()
        .any(|c| c.starts_with("set-cookie: __Host-") && c.contains("; Secure")));
    // The page not found that answers an address which does not decode, too.
    let mut tcp = TcpStream::connect(servers.site).await.unwrap();
    tcp.write_all(b"GET /numbers/%FF/call HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    assert_eq!(header_lines(&response, "strict-transport-security").len(), 1, "{response}");
}

#[tokio::test]
async fn an_unreadable_or_wrong_certificate_file_is_a_clear_startup_error() {
    let missing = admin_settings(&[
        ("CALLNOTIFY__ADMIN__TLS_CERT", "/nonexistent/site.crt".to_owned()),
        ("CALLNOTIFY__ADMIN__TLS_KEY", fixture("site.key")),
    ])
    .unwrap();
    let e = start(&missing).await.err().expect("refused").to_string();
    assert!(e.contains("admin.tls_cert") && e.contains("/nonexistent/site.crt"), "{e}");

    // The key where the certificate belongs: no CERTIFICATE block.
    let swapped = admin_settings(&[
        ("CALLNOTIFY__ADMIN__TLS_CERT", fixture("site.key")),
        ("CALLNOTIFY__ADMIN__TLS_KEY", fixture("site.key")),
    ])
    .unwrap();
    let e = start(&swapped).await.err().expect("refused").to_string();
    assert!(e.contains("admin.tls_cert") && e.contains("CERTIFICATE"), "{e}");

    // A key that does not belong to the certificate.
    let mismatched = admin_settings(&[
        ("CALLNOTIFY__ADMIN__TLS_CERT", fixture("ca.crt")),
        ("CALLNOTIFY__ADMIN__TLS_KEY", fixture("site.key")),
    ])
    .unwrap();
    assert!(start(&mismatched).await.is_err());
}
