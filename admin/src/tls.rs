//! HTTPS for the settings site without a proxy in front (R-S8): `admin.tls_cert` and
//! `admin.tls_key` become a rustls server configuration, and [`TlsListener`] hands axum
//! connections whose handshake has completed.
//!
//! Handshakes run in tasks of their own, so a client that connects and says nothing
//! holds up no one else; one that takes longer than [`HANDSHAKE_TIMEOUT`] is dropped.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener as _;
use engine::http::{Guarded, GuardedIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake is done, waiting for axum to take them.
const READY_BACKLOG: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {key} {path}: {source}")]
    Read { key: &'static str, path: PathBuf, source: io::Error },
    #[error("{key} {path}: {reason}")]
    Pem { key: &'static str, path: PathBuf, reason: String },
    #[error("admin.tls_cert and admin.tls_key do not make a usable server certificate: {0}")]
    Config(#[from] tokio_rustls::rustls::Error),
}

/// Reads the PEM certificate chain at `cert` and the private key at `key` into a server
/// configuration that speaks TLS 1.2 and 1.3 and offers HTTP/1.1 only.
pub async fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |key_name: &'static str, path: &Path| {
        let path = path.to_owned();
        async move {
            tokio::fs::read(&path).await.map_err(|source| TlsError::Read { key: key_name, path: path.clone(), source })
        }
    };
    let pem_error = |key_name: &'static str, path: &Path, reason: String| TlsError::Pem {
        key: key_name,
        path: path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&read("admin.tls_cert", cert).await?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("admin.tls_cert", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_error("admin.tls_cert", cert, "no CERTIFICATE block in the file".to_owned()));
    }
    let private_key = PrivateKeyDer::from_pem_slice(&read("admin.tls_key", key).await?)
        .map_err(|e| pem_error("admin.tls_key", key, e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TCP connection within the listener's limits ([`engine::http`]).
type Connection = GuardedIo<TcpStream>;

/// A TCP listener that yields TLS streams, for `axum::serve`. The limits apply from the
/// TCP connection on, so a flood of handshakes is held to them too.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<Connection>, SocketAddr)>,
    local: SocketAddr,
    acceptor: JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: Guarded<TcpListener>, config: Arc<ServerConfig>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (ready_tx, ready) = mpsc::channel(READY_BACKLOG);
        let acceptor = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), ready_tx));
        Ok(Self { ready, local, acceptor })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<Connection>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop ends only with this listener; until then, nothing comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn accept_loop(
    mut listener: Guarded<TcpListener>,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<Connection>, SocketAddr)>,
) {
    loop {
        // Errors (out of file descriptors and the like) are waited out inside.
        let (tcp, peer) = listener.accept().await;
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "settings site: TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "settings site: TLS handshake timed out"),
            }
        });
    }
}
