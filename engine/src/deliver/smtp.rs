//! A pool of SMTP connections ([`Connection`], pipelining where the server offers it),
//! with `TCP_NODELAY` set: a mail's commands and its message each go out in one write,
//! and nothing waits for the server's delayed ACK.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::extension::ClientId;
use tokio::sync::Semaphore;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::client::{ClientError, Connection, Session, TlsStart, TlsTarget};
use super::DeliverError;
use crate::config::{SmtpSettings, TlsMode};

/// An idle connection older than this is closed rather than reused: servers drop idle
/// clients after a while, and a failed first command would cost a retry.
const MAX_IDLE: Duration = Duration::from_secs(30);

/// Why a send failed; sorted by the caller into retry or give up.
#[derive(Debug)]
pub enum SendError {
    /// The server answered, or the connection or session failed.
    Client(ClientError),
    /// No answer within `smtp.timeout_secs` (after DATA the mail may have arrived).
    Timeout,
    Connect(std::io::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client(e) => write!(f, "{e}"),
            Self::Timeout => f.write_str("the mail server did not answer in time"),
            Self::Connect(e) => write!(f, "cannot connect to the mail server: {e}"),
        }
    }
}

pub struct SmtpPool {
    host: String,
    port: u16,
    tls: Option<(TlsStart, Arc<ClientConfig>)>,
    /// User and password for AUTH.
    credentials: Option<(String, String)>,
    timeout: Duration,
    /// The name given in EHLO: this host's name, or its address literal.
    hello: String,
    /// At most `smtp.pool_size` connections in use at once.
    permits: Semaphore,
    /// Idle connections and when they were last used; never locked across an await.
    idle: Mutex<Vec<(Connection, Instant)>>,
}

impl SmtpPool {
    /// Fails only on an unreadable `smtp.tls_ca_file`.
    pub fn new(s: &SmtpSettings) -> Result<Self, DeliverError> {
        let start = match s.tls {
            TlsMode::None => None,
            TlsMode::Starttls => Some(TlsStart::Starttls),
            TlsMode::Tls => Some(TlsStart::Implicit),
        };
        let tls = match start {
            Some(start) => {
                let roots = match &s.tls_ca_file {
                    Some(path) => private_roots(path)?,
                    None => RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
                };
                Some((start, Arc::new(ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())))
            }
            None => None,
        };
        Ok(Self {
            host: s.host.clone(),
            port: s.port,
            tls,
            credentials: (!s.username.is_empty()).then(|| (s.username.clone(), s.password.expose().to_owned())),
            timeout: Duration::from_secs(s.timeout_secs.max(1)),
            hello: ClientId::default().to_string(),
            permits: Semaphore::new(s.pool_size as usize),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends one message on a pooled connection. A connection that failed is dropped,
    /// not returned to the pool.
    pub async fn send(&self, envelope: &Envelope, message: &[u8]) -> Result<(), SendError> {
        let _permit = self.permits.acquire().await.expect("the pool's semaphore is never closed");
        let reused = self.take_idle();
        let fresh = reused.is_none();
        let mut conn = match reused {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        let result = match self.transact(&mut conn, envelope, message).await {
            // A pooled connection the server closed meanwhile fails before any reply: try
            // once more at once on a new connection rather than after a retry delay.
            Err(SendError::Client(ClientError::Closed { answered: false, .. })) if !fresh => {
                conn = self.connect().await?;
                self.transact(&mut conn, envelope, message).await
            }
            other => other,
        };
        if result.is_ok() {
            self.idle.lock().expect("idle lock").push((conn, Instant::now()));
        }
        result
    }

    async fn transact(&self, conn: &mut Connection, envelope: &Envelope, message: &[u8]) -> Result<(), SendError> {
        match tokio::time::timeout(self.timeout, conn.send(envelope, message)).await {
            Ok(result) => result.map_err(SendError::Client),
            Err(_) => Err(SendError::Timeout),
        }
    }

    fn take_idle(&self) -> Option<Connection> {
        let mut idle = self.idle.lock().expect("idle lock");
        idle.retain(|(_, used)| used.elapsed() < MAX_IDLE);
        idle.pop().map(|(conn, _)| conn)
    }

    async fn connect(&self) -> Result<Connection, SendError> {
        let within = |f| tokio::time::timeout(self.timeout, f);
        let tcp = within(tokio::net::TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|_| SendError::Timeout)?
            .map_err(SendError::Connect)?;
        tcp.set_nodelay(true).map_err(SendError::Connect)?;
        let tls = match &self.tls {
            Some((start, config)) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| SendError::Client(ClientError::Tls(e.to_string())))?;
                Some((*start, TlsTarget { config, name }))
            }
            None => None,
        };
        let credentials = self.credentials.as_ref().map(|(user, password)| (user.as_str(), password.as_str()));
        let session = Session { tls, hello: &self.hello, credentials };
        tokio::time::timeout(self.timeout, Connection::open(tcp, &session))
            .await
            .map_err(|_| SendError::Timeout)?
            .map_err(SendError::Client)
    }
}

/// The CA certificates in the PEM file at `path` (read once, at start).
pub(super) fn private_roots(path: &Path) -> Result<RootCertStore, DeliverError> {
    let failed = |reason: String| DeliverError::TlsCa { path: path.to_owned(), reason };
    let pem = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.map_err(|e| failed(e.to_string()))?).map_err(|e| failed(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(failed("no CERTIFICATE block in the file".into()));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::SmtpSink;

    fn pool_for(port: u16) -> SmtpPool {
        SmtpPool::new(&crate::deliver::tests::smtp_to(port)).unwrap()
    }

    fn envelope() -> Envelope {
        Envelope::new(Some("no-reply@example.jp".parse().unwrap()), vec!["taro@example.jp".parse().unwrap()]).unwrap()
    }

    #[tokio::test]
    async fn connections_are_reused_and_one_the_server_dropped_is_replaced_at_once() {
        let sink = SmtpSink::start(0).await.unwrap();
        let port = sink.port();
        let pool = pool_for(port);
        pool.send(&envelope(), b"Subject: 1\r\n\r\none").await.unwrap();
        pool.send(&envelope(), b"Subject: 2\r\n\r\ntwo").await.unwrap();
        assert_eq!(pool.idle.lock().unwrap().len(), 1, "one connection served both mails");

        // The server goes away and comes back: the pooled connection is dead.
        sink.shutdown().await;
        let sink = SmtpSink::start(port).await.unwrap();
        pool.send(&envelope(), b"Subject: 3\r\n\r\nthree").await.expect("sent on a new connection, no retry needed");
        assert_eq!(sink.wait_for(1, Duration::from_secs(10)).await.len(), 1);
    }

    #[tokio::test]
    async fn a_relay_with_a_private_ca_is_trusted_through_smtp_tls_ca_file() {
        use crate::deliver::client::tests::{acceptor, fixture, server_with};
        let ca_file = fixture("ca.crt");
        let (port, server) = server_with(&["PIPELINING"], false, Some((TlsStart::Starttls, acceptor()))).await;
        let mut settings = crate::deliver::tests::smtp_to(port);
        (settings.host, settings.tls, settings.tls_ca_file) = ("localhost".into(), TlsMode::Starttls, Some(ca_file));

        let pool = SmtpPool::new(&settings).unwrap();
        pool.send(&envelope(), b"Subject: 1\r\n\r\nprivate CA").await.expect("sent over TLS");
        drop(pool);
        let seen = server.await.unwrap();
        assert!(seen.contains(&"(TLS)".to_owned()) && seen.last().unwrap().contains("private CA"), "{seen:?}");

        // Without the file the public roots do not know the relay's CA.
        settings.tls_ca_file = None;
        let (port, _server) = server_with(&["PIPELINING"], false, Some((TlsStart::Starttls, acceptor()))).await;
        settings.port = port;
        let refused = SmtpPool::new(&settings).unwrap().send(&envelope(), b"x").await.unwrap_err();
        assert!(refused.to_string().contains("TLS"), "{refused}");
    }

    #[test]
    fn an_unusable_tls_ca_file_stops_the_start_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let mut settings = crate::deliver::tests::smtp_to(25);
        settings.tls = TlsMode::Starttls;
        for path in [not_pem, dir.path().join("missing.pem")] {
            settings.tls_ca_file = Some(path.clone());
            let Err(e) = SmtpPool::new(&settings) else { panic!("{} accepted", path.display()) };
            assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
        }
    }
}
