//! The admin HTTP server that `callnotify serve` runs beside the engine, on the
//! engine's store: the IVR platform's API and the settings site.

use std::future::Future;
use std::net::SocketAddr;

use engine::store::Store;

use crate::clock::SharedClock;
use crate::credentials::{CredentialError, Credentials};
use crate::ivr::api::{router, ApiState};
use crate::ivr::Ivr;
use crate::site::{self, SiteState};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on admin.listen {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Credentials(#[from] CredentialError),
}

/// Binds `listen` and serves until `shutdown` completes. Returns the bound address
/// (useful with port 0) and the server task.
pub async fn serve(
    listen: SocketAddr,
    store: Store,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ServerError> {
    let credentials = Credentials::open(&store)?;
    let site = site::router(SiteState::new(store.clone(), credentials.clone(), clock.clone()));
    let app = router(ApiState::new(Ivr::new(store, credentials, clock))).merge(site);
    let bind = |source| ServerError::Bind { addr: listen, source };
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "admin server stopped");
        }
    });
    Ok((addr, task))
}
