//! The admin HTTP servers that `callnotify serve` runs beside the engine, on the
//! engine's store: the settings site for subscribers, and the IVR platform's API on an
//! address of its own, since the API trusts the caller ID it is sent and must never be
//! reachable where the site is.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use engine::config::AdminSettings;
use engine::deliver::TestMailer;
use engine::error_event::ErrorEvent;
use engine::http::Guarded;
use engine::store::Store;
use engine::telemetry::Metrics;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::SharedClock;
use crate::credentials::{CredentialError, Credentials};
use crate::ivr::api::{router, ApiState};
use crate::ivr::Ivr;
use crate::site::{self, Peer, SiteState};
use crate::tls::{self, TlsError, TlsListener};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {key} {addr}: {source}")]
    Bind { key: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The running servers: where each listens, and their tasks.
pub struct Servers {
    pub site: SocketAddr,
    pub ivr: SocketAddr,
    /// The site's address as subscribers' browsers open it: `https://` when it serves
    /// TLS itself.
    pub site_url: String,
    tasks: TaskTracker,
}

impl Servers {
    /// Waits until both have shut down.
    pub async fn wait(self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// The site's and the IVR API's addresses, bound, and the site's certificate read: all
/// `serve` can fail on, found before the engine joins its consumer groups, which a node
/// that then exited would leave without a word (its partitions stalled until the
/// session timeout). Bound, not listening: until [`Bound::serve`] a connection is
/// refused, so a proxy or the IVR platform turns to another node at once instead of
/// waiting on this one through its catch-up.
pub struct Bound {
    site: (tokio::net::TcpSocket, SocketAddr),
    ivr: (tokio::net::TcpSocket, SocketAddr),
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// Reads `admin.tls_cert` and `admin.tls_key` (if set) and binds `admin.listen` and
/// `admin.ivr_listen`; [`Bound::serve`] serves them.
pub async fn bind_all(admin: &AdminSettings) -> Result<Bound, ServerError> {
    let tls = match (&admin.tls_cert, &admin.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key).await?),
        _ => None,
    };
    let site = bind("admin.listen", admin.listen)?;
    let ivr = bind("admin.ivr_listen", admin.ivr_listen)?;
    Ok(Bound { site, ivr, tls })
}

impl Bound {
    /// The site's and the IVR API's addresses (port 0 given: the ones picked).
    pub fn addresses(&self) -> (SocketAddr, SocketAddr) {
        (self.site.1, self.ivr.1)
    }

    /// Serves the site on `admin.listen` (over TLS with `admin.tls_cert` and
    /// `admin.tls_key`) and the IVR API on `admin.ivr_listen` until `shutdown` is
    /// cancelled. `test_mailer` sends the site's 送信テスト mails (R-N2); without one the
    /// site says they are not available.
    pub fn serve(
        self,
        admin: &AdminSettings,
        store: Store,
        clock: SharedClock,
        test_mailer: Option<Arc<TestMailer>>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<Servers, ServerError> {
        let tasks = TaskTracker::new();
        let credentials = Credentials::open(&store)?.counting_in(metrics.clone());
        let site_state = SiteState::new(store.clone(), credentials.clone(), clock.clone())
            .with_test_mailer(test_mailer)
            .with_password_policy(admin.password_policy)
            .with_secure(admin.secure())
            .with_proxy(admin.behind_tls_proxy, &admin.proxy_addresses)
            .with_metrics(metrics.clone());
        let site_app = site::router(site_state);
        let ivr_state = ApiState::new(Ivr::new(store, credentials, clock)).with_platforms(&admin.ivr_addresses);
        let ivr_app = router(ivr_state.with_metrics(metrics.clone()));

        let (site_listener, site) = listen("admin.listen", self.site)?;
        let (ivr_listener, ivr) = listen("admin.ivr_listen", self.ivr)?;
        let site_listener = Guarded::new(site_listener, admin.limits(), "admin.listen").counting_in(metrics.clone());
        let site_url = match self.tls {
            Some(config) => {
                let listener = TlsListener::new(site_listener, config).map_err(|source| ServerError::Bind {
                    key: "admin.listen",
                    addr: admin.listen,
                    source,
                })?;
                spawn(&tasks, &metrics, "admin.listen", listener, site_app, shutdown.clone());
                format!("https://{site}")
            }
            None => {
                spawn(&tasks, &metrics, "admin.listen", site_listener, site_app, shutdown.clone());
                format!("http://{site}")
            }
        };
        let ivr_listener = Guarded::new(ivr_listener, admin.limits(), "admin.ivr_listen").counting_in(metrics.clone());
        spawn(&tasks, &metrics, "admin.ivr_listen", ivr_listener, ivr_app, shutdown);
        Ok(Servers { site, ivr, site_url, tasks })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Guarded<tokio::net::TcpListener>>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Guarded<tokio::net::TcpListener>>) -> Self {
        Peer { addr: *stream.remote_addr(), answering: stream.io().answering() }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Peer { addr: *stream.remote_addr(), answering: stream.io().get_ref().0.answering() }
    }
}

/// A socket bound to `addr`, not listening yet, and the address it got (port 0 picks a
/// free one).
fn bind(key: &'static str, addr: SocketAddr) -> Result<(tokio::net::TcpSocket, SocketAddr), ServerError> {
    let error = |source| ServerError::Bind { key, addr, source };
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
    let socket = socket.map_err(error)?;
    // As `TcpListener::bind` does: a restart takes its port back at once.
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(addr).map_err(error)?;
    let local = socket.local_addr().map_err(error)?;
    Ok((socket, local))
}

/// Starts listening on a socket of [`bind`].
fn listen(
    key: &'static str,
    (socket, addr): (tokio::net::TcpSocket, SocketAddr),
) -> Result<(tokio::net::TcpListener, SocketAddr), ServerError> {
    let listener = socket.listen(1024).map_err(|source| ServerError::Bind { key, addr, source })?;
    Ok((listener, addr))
}

/// Serves `app` on `listener`, on a task of `tasks`, until `shutdown` is cancelled.
fn spawn<L>(
    tasks: &TaskTracker,
    metrics: &Metrics,
    key: &'static str,
    listener: L,
    app: Router,
    shutdown: CancellationToken,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
    Peer: for<'a> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    let metrics = metrics.clone();
    tasks.spawn(async move {
        // The peer's address reaches the handlers: the login throttle counts by it. A
        // request being answered (a save waiting for the state owner, a test mail for a
        // slow mail server) holds its connection's idle limit off.
        let app = app.layer(axum::middleware::from_fn(engine::http::keep_open_while_answering::<Peer>));
        let app = app.into_make_service_with_connect_info::<Peer>();
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
            engine::error_event!(metrics, ErrorEvent::AdminListener, error = %e, server = key, "admin server stopped");
        }
    });
}
