//! A pool of SMTP connections with `TCP_NODELAY` set.
//!
//! lettre (0.11.23) writes a message's body and its closing `\r\n.\r\n` as two writes
//! on a socket with Nagle's algorithm on, so every mail waits for the server's delayed
//! ACK: about 40 ms, which caps one connection at ~25 mails/s (lettre PR #1159 fixes
//! this upstream, unreleased). This pool opens the sockets itself, with `TCP_NODELAY`,
//! and hands them to lettre's `AsyncSmtpConnection`, which still speaks the protocol
//! (EHLO, STARTTLS, AUTH, MAIL/RCPT/DATA, dot-stuffing).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use tokio::sync::Semaphore;

use crate::config::{SmtpSettings, TlsMode};

/// An idle connection older than this is closed rather than reused: servers drop idle
/// clients after a while, and a failed first command would cost a retry.
const MAX_IDLE: Duration = Duration::from_secs(30);

/// Why a send failed; sorted by the caller into retry or give up.
#[derive(Debug)]
pub enum SendError {
    /// The server or the connection answered.
    Smtp(lettre::transport::smtp::Error),
    /// No answer within `smtp.timeout_secs` (after DATA the mail may have arrived).
    Timeout,
    Connect(std::io::Error),
    Tls(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Smtp(e) => write!(f, "{e}"),
            Self::Timeout => f.write_str("the mail server did not answer in time"),
            Self::Connect(e) => write!(f, "cannot connect to the mail server: {e}"),
            Self::Tls(e) => write!(f, "TLS with the mail server failed: {e}"),
        }
    }
}

pub struct SmtpPool {
    host: String,
    port: u16,
    tls: TlsMode,
    credentials: Option<Credentials>,
    timeout: Duration,
    hello: ClientId,
    /// At most `smtp.pool_size` connections in use at once.
    permits: Semaphore,
    /// Idle connections and when they were last used; never locked across an await.
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    tls_config: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

impl SmtpPool {
    pub fn new(s: &SmtpSettings) -> Self {
        let tls_config = (s.tls == TlsMode::Tls).then(|| {
            let roots = tokio_rustls::rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            Arc::new(tokio_rustls::rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
        });
        Self {
            host: s.host.clone(),
            port: s.port,
            tls: s.tls,
            credentials: (!s.username.is_empty())
                .then(|| Credentials::new(s.username.clone(), s.password.expose().to_owned())),
            timeout: Duration::from_secs(s.timeout_secs.max(1)),
            hello: ClientId::default(),
            permits: Semaphore::new(s.pool_size as usize),
            idle: Mutex::new(Vec::new()),
            tls_config,
        }
    }

    /// Sends one message on a pooled connection. A connection that failed is closed,
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
            // A pooled connection the server closed meanwhile fails without a reply: try
            // once more at once on a new connection rather than after a retry delay.
            Err(SendError::Smtp(e)) if !fresh && without_reply(&e) => {
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

    /// One mail transaction; a connection that failed is closed (and then dropped).
    async fn transact(
        &self,
        conn: &mut AsyncSmtpConnection,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<(), SendError> {
        match tokio::time::timeout(self.timeout, conn.send(envelope, message)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                conn.abort().await;
                Err(SendError::Smtp(e))
            }
            Err(_) => Err(SendError::Timeout),
        }
    }

    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        let mut idle = self.idle.lock().expect("idle lock");
        idle.retain(|(conn, used)| used.elapsed() < MAX_IDLE && !conn.has_broken());
        idle.pop().map(|(conn, _)| conn)
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let within = |f| tokio::time::timeout(self.timeout, f);
        let tcp = within(tokio::net::TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|_| SendError::Timeout)?
            .map_err(SendError::Connect)?;
        tcp.set_nodelay(true).map_err(SendError::Connect)?;
        let stream: Box<dyn AsyncTokioStream> = match &self.tls_config {
            Some(config) => {
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| SendError::Tls(e.to_string()))?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls = tokio::time::timeout(self.timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| SendError::Timeout)?
                    .map_err(|e| SendError::Tls(e.to_string()))?;
                Box::new(ImplicitTls(tls))
            }
            None => Box::new(tcp),
        };
        let handshake = async {
            let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &self.hello).await?;
            if self.tls == TlsMode::Starttls {
                let params = TlsParameters::new(self.host.clone())?;
                conn.starttls(params, &self.hello).await?;
            }
            if let Some(credentials) = &self.credentials {
                conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials).await?;
            }
            Ok::<_, lettre::transport::smtp::Error>(conn)
        };
        tokio::time::timeout(self.timeout, handshake).await.map_err(|_| SendError::Timeout)?.map_err(SendError::Smtp)
    }
}

/// Whether a send failed without any reply from the server (a dropped connection).
fn without_reply(e: &lettre::transport::smtp::Error) -> bool {
    !e.is_permanent() && !e.is_transient()
}

/// Implicit TLS (`smtp.tls = "tls"`) on our own socket, in the shape lettre accepts.
#[derive(Debug)]
struct ImplicitTls(tokio_rustls::client::TlsStream<tokio::net::TcpStream>);

impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

impl tokio::io::AsyncRead for ImplicitTls {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ImplicitTls {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::SmtpSink;

    fn pool_for(port: u16) -> SmtpPool {
        SmtpPool::new(&crate::deliver::tests::smtp_to(port))
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
}
