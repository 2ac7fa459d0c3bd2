//! The operator's HTTP endpoint on `metrics.listen`: Prometheus metrics, a health
//! check, and provisioning into the running engine (the CLI's `provision import --url`),
//! whose writes reach the resolve stage at once. Keep it off public networks: it
//! changes subscribers' data without a login.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::provision::{import, ImportReport};
use crate::store::Store;
use crate::telemetry::Metrics;

/// Largest provisioning upload: a few million lines of JSON.
const MAX_UPLOAD: usize = 1 << 30;

#[derive(Clone)]
struct Ops {
    metrics: Metrics,
    store: Store,
}

/// What `POST /provision` answers, and what the CLI prints from it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ProvisionResponse {
    pub lines: usize,
    pub numbers: usize,
    /// `{line, reason}` of every input line not applied.
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Rejected {
    pub line: usize,
    pub reason: String,
}

impl From<ImportReport> for ProvisionResponse {
    fn from(r: ImportReport) -> Self {
        let rejected = r.rejected.into_iter().map(|(line, reason)| Rejected { line, reason }).collect();
        Self { lines: r.lines, numbers: r.numbers, rejected }
    }
}

/// Serves until `shutdown`; returns the bound address (useful with port 0).
pub async fn serve(
    listen: SocketAddr,
    metrics: Metrics,
    store: Store,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/provision", post(provision).layer(DefaultBodyLimit::max(MAX_UPLOAD)))
        .with_state(Ops { metrics, store });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "operator endpoint stopped");
        }
    });
    Ok((addr, task))
}

async fn metrics_text(State(ops): State<Ops>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], ops.metrics.render())
}

/// JSON Lines in, the import report out: 200 if every line was applied, 422 if some
/// were rejected (the others are applied), 500 if the store failed.
async fn provision(State(ops): State<Ops>, body: Bytes) -> impl IntoResponse {
    let store = ops.store.clone();
    match tokio::task::spawn_blocking(move || import(&store, body.as_ref())).await {
        Ok(Ok(report)) => {
            let response = ProvisionResponse::from(report);
            tracing::info!(lines = response.lines, rejected = response.rejected.len(), "provisioned over HTTP");
            let status = if response.rejected.is_empty() { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
            (status, Json(serde_json::to_value(response).expect("report serialises"))).into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "provisioning over HTTP failed");
            (StatusCode::INTERNAL_SERVER_ERROR, Json(serde_json::json!({"error": e.to_string()}))).into_response()
        }
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, Json(serde_json::json!({"error": e.to_string()}))).into_response()
        }
    }
}

/// Why `provision import --url` failed to get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--url must look like http://127.0.0.1:9187 (plain HTTP to the operator endpoint): {0}")]
    Url(String),
    #[error("cannot reach the engine at {url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("the engine answered {status}: {body}")]
    Answer { status: u16, body: String },
}

/// Sends JSON Lines to a running engine's `POST /provision` (blocking; for the CLI).
pub fn post_provision(url: &str, jsonl: &[u8]) -> Result<ProvisionResponse, ClientError> {
    use std::io::{Read, Write};
    let authority = url
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/').trim_end_matches("/provision"))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| ClientError::Url(url.to_owned()))?;
    let io = |source| ClientError::Io { url: url.to_owned(), source };
    let mut stream = std::net::TcpStream::connect(authority).map_err(io)?;
    write!(
        stream,
        "POST /provision HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/x-ndjson\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        jsonl.len()
    )
    .map_err(io)?;
    stream.write_all(jsonl).map_err(io)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(io)?;
    let status: u16 = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    match status {
        200 | 422 => serde_json::from_str(body).map_err(|_| ClientError::Answer { status, body: body.to_owned() }),
        _ => Err(ClientError::Answer { status, body: body.to_owned() }),
    }
}
