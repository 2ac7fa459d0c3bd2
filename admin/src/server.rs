//! The admin HTTP servers that `callnotify serve` runs beside the engine, on the
//! engine's store: the settings site for subscribers, and the IVR platform's API on an
//! address of its own, since the API trusts the caller ID it is sent and must never be
//! reachable where the site is.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use engine::config::PasswordPolicy;
use engine::deliver::TestMailer;
use engine::store::Store;

use crate::clock::SharedClock;
use crate::credentials::{CredentialError, Credentials};
use crate::ivr::api::{router, ApiState};
use crate::ivr::Ivr;
use crate::site::{self, SiteState};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {key} {addr}: {source}")]
    Bind { key: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Credentials(#[from] CredentialError),
}

/// The running servers: where each listens, and their tasks.
pub struct Servers {
    pub site: SocketAddr,
    pub ivr: SocketAddr,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Servers {
    /// Waits until both have shut down.
    pub async fn wait(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Binds the site on `site_listen` and the IVR API on `ivr_listen` and serves both
/// until `shutdown()` completes (called once per server). `test_mailer` sends the
/// site's 送信テスト mails (R-N2); without one the site says they are not available.
/// `password_policy` is the site's rule for new passwords (`admin.password_policy`).
pub async fn serve<F>(
    site_listen: SocketAddr,
    ivr_listen: SocketAddr,
    store: Store,
    clock: SharedClock,
    test_mailer: Option<Arc<TestMailer>>,
    password_policy: PasswordPolicy,
    shutdown: impl Fn() -> F,
) -> Result<Servers, ServerError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let credentials = Credentials::open(&store)?;
    let site_state = SiteState::new(store.clone(), credentials.clone(), clock.clone())
        .with_test_mailer(test_mailer)
        .with_password_policy(password_policy);
    let site_app = site::router(site_state);
    let ivr_app = router(ApiState::new(Ivr::new(store, credentials, clock)));
    let (site, site_task) = start("admin.listen", site_listen, site_app, shutdown()).await?;
    let (ivr, ivr_task) = start("admin.ivr_listen", ivr_listen, ivr_app, shutdown()).await?;
    Ok(Servers { site, ivr, tasks: [site_task, ivr_task] })
}

async fn start(
    key: &'static str,
    listen: SocketAddr,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ServerError> {
    let bind = |source| ServerError::Bind { key, addr: listen, source };
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, server = key, "admin server stopped");
        }
    });
    Ok((addr, task))
}
