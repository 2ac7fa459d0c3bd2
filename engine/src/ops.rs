//! The operator's HTTP endpoint on `metrics.listen`: Prometheus metrics, a health
//! check, and provisioning into the running engine (the CLI's `provision import --url`),
//! whose writes reach the resolve stage at once. Keep it off public networks: it
//! changes subscribers' data without a login.
//!
//! It answers from the start of the engine, before the catch-up with the state topic
//! (minutes at carrier scale): `/metrics` and `/healthz` then, `/readyz` saying it
//! starts, `/provision` refused until the engine is built ([`Endpoint::serve`]). A node
//! catching up is not "down" to Prometheus, and its catch-up can be watched.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Secret;
use crate::disk::DiskWatch;
use crate::error_event::ErrorEvent;
use crate::phone::PhoneNumber;
use crate::provision::{import, ImportReport};
use crate::store::Store;
use crate::telemetry::Metrics;

/// Largest provisioning upload: a few million lines of JSON. The upload is imported as
/// it arrives, never held whole: memory stays at a few chunks and one line whatever
/// the size; past this many bytes the rest is refused (413).
pub const MAX_UPLOAD: usize = 1 << 30;

/// Chunks of an upload on their way to the import: what memory an upload takes.
const CHUNKS_IN_FLIGHT: usize = 4;

#[derive(Clone)]
struct Ops {
    metrics: Metrics,
    /// Set once the engine is built; until then it starts.
    serving: Arc<OnceLock<Serving>>,
    /// `metrics.provision_token`: when set, `POST /provision` wants it as a bearer token.
    token: Secret,
    max_upload: usize,
    /// `metrics.listen` is reached from other machines: `POST /provision` wants the token.
    beyond_loopback: bool,
}

/// What `POST /provision` answers, and what the CLI prints from it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ProvisionResponse {
    pub lines: usize,
    pub numbers: usize,
    /// `{line, reason}` of the input lines not applied (the first
    /// [`crate::provision::MAX_LISTED`]).
    pub rejected: Vec<Rejected>,
    /// Lines rejected beyond those listed.
    #[serde(default)]
    pub rejected_not_listed: usize,
    /// Numbers that moved from another line (R-M3: they lost the old subscriber's
    /// password and settings).
    #[serde(default)]
    pub moved: Vec<Moved>,
    /// Moves beyond those listed.
    #[serde(default)]
    pub moved_not_listed: usize,
    /// Numbers their line no longer lists: removed, with their password, settings and
    /// faxes.
    #[serde(default)]
    pub removed: Vec<Removed>,
    /// Removals beyond those listed.
    #[serde(default)]
    pub removed_not_listed: usize,
    /// Why the upload was cut short (413) or the import stopped (500), if it was: the
    /// lines reported applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Rejected {
    pub line: usize,
    pub reason: String,
}

/// A number provisioned onto a line from another line.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Moved {
    /// The input line that moved it.
    pub line: usize,
    pub number: String,
    /// The contract number of the line it was on.
    pub from: String,
}

/// A number removed from its line: the line's input line no longer listed it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Removed {
    pub line: usize,
    pub number: String,
}

impl From<ImportReport> for ProvisionResponse {
    fn from(r: ImportReport) -> Self {
        let rejected = r.rejected.into_iter().map(|(line, reason)| Rejected { line, reason }).collect();
        let moved = r
            .moved
            .into_iter()
            .map(|(line, number, from)| Moved {
                line,
                number: number.as_str().to_owned(),
                from: from.as_str().to_owned(),
            })
            .collect();
        let removed =
            r.removed.into_iter().map(|(line, number)| Removed { line, number: number.as_str().to_owned() }).collect();
        Self {
            lines: r.lines,
            numbers: r.numbers,
            rejected,
            rejected_not_listed: r.rejected_not_listed,
            moved,
            moved_not_listed: r.moved_not_listed,
            removed,
            removed_not_listed: r.removed_not_listed,
            error: None,
        }
    }
}

/// What the CLI prints from an answer: the report it carries (numbers that do not
/// parse, from an engine of another version, left out).
impl From<ProvisionResponse> for ImportReport {
    fn from(r: ProvisionResponse) -> Self {
        let number = |n: &str| PhoneNumber::parse(n).ok();
        Self {
            lines: r.lines,
            numbers: r.numbers,
            rejected: r.rejected.into_iter().map(|r| (r.line, r.reason)).collect(),
            rejected_not_listed: r.rejected_not_listed,
            moved: r.moved.into_iter().filter_map(|m| Some((m.line, number(&m.number)?, number(&m.from)?))).collect(),
            removed: r.removed.into_iter().filter_map(|m| Some((m.line, number(&m.number)?))).collect(),
            moved_not_listed: r.moved_not_listed,
            removed_not_listed: r.removed_not_listed,
        }
    }
}

/// What the endpoint serves once the engine is built.
struct Serving {
    store: Store,
    /// Whether the store's disk has room, for `/readyz`.
    disk: DiskWatch,
}

/// The operator endpoint, answering from before the engine's catch-up ([`listen`]).
pub struct Endpoint {
    addr: SocketAddr,
    serving: Arc<OnceLock<Serving>>,
    /// Where `callnotify_starting` is shown.
    metrics: Metrics,
}

impl Endpoint {
    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The engine is built: `/readyz` reports on it, `/provision` writes to `store`.
    pub fn serve(&self, store: Store, disk: DiskWatch) {
        let _ = self.serving.set(Serving { store, disk });
        self.metrics.starting(false);
    }
}

/// Serves, on a task of `tasks`, until `shutdown` is cancelled: at once `/metrics` and
/// `/healthz`, the rest once [`Endpoint::serve`] says the engine is built.
pub async fn listen(
    settings: &crate::config::MetricsSettings,
    metrics: Metrics,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> std::io::Result<Endpoint> {
    let (errors, starting) = (metrics.clone(), metrics.clone());
    starting.starting(true);
    let beyond_loopback = !settings.listen.ip().is_loopback();
    let serving = Arc::new(OnceLock::new());
    let ops = Ops {
        metrics,
        serving: Arc::clone(&serving),
        token: settings.provision_token.clone(),
        max_upload: MAX_UPLOAD,
        beyond_loopback,
    };
    let listen = settings.listen;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route("/provision", post(provision))
        .with_state(ops)
        // An upload's body may take longer than a request head may (the idle limit,
        // longer than the state owner's wait, still closes a half-sent one).
        .layer(axum::middleware::from_fn(crate::http::note_request_head::<crate::http::Answering>));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tasks.spawn(async move {
        let listener = crate::http::Guarded::new(listener, crate::http::Limits::OPERATOR, "metrics.listen")
            .counting_in(errors.clone());
        let app = app.into_make_service_with_connect_info::<crate::http::Answering>();
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
            crate::error_event!(errors, ErrorEvent::OperatorEndpoint, error = %e, "operator endpoint stopped");
        }
    });
    Ok(Endpoint { addr, serving, metrics: starting })
}

/// `/readyz`'s answer while the engine starts.
const STARTING: &str = "not ready\nstarting: catching up with the subscriber state topic, then indexing \
                        subscriptions (callnotify_state_applied_offset shows how far)\n";

/// `ok` while the process serves (a liveness probe): whatever keeps it from reading
/// CDRs is for `/readyz`, and a restart would not mend it.
async fn health() -> &'static str {
    "ok\n"
}

/// `ready` (200) or `not ready` (503), then one line per part with its state: the store
/// (its disk has room, or why reading is paused), the consumers (partitions assigned)
/// and the mail server (answering, or not and mails wait in the retry queue, which
/// keeps the engine ready: nothing is lost). While the engine starts, that it does.
async fn ready(State(ops): State<Ops>) -> Response {
    let Some(serving) = ops.serving.get() else {
        return (StatusCode::SERVICE_UNAVAILABLE, STARTING).into_response();
    };
    let mut ready = true;
    let store = match serving.disk.reason() {
        // Not the number count: sled counts a tree by walking it, and this runs on an
        // async worker at every probe.
        None => "ok".to_owned(),
        Some(why) => {
            ready = false;
            why
        }
    };
    let consuming = match ops.metrics.partitions_assigned() {
        0 => {
            ready = false;
            "no partition assigned (yet): joining the consumer group, or more consumers than partitions".to_owned()
        }
        n => format!("{n} partitions assigned"),
    };
    let mail = if ops.metrics.smtp_circuit_is_open() {
        "not answering: mails wait in the retry queue and are sent when it answers"
    } else {
        "ok"
    };
    let body = format!(
        "{}\nstore: {store}\nconsuming: {consuming}\nmail server: {mail}\n",
        if ready { "ready" } else { "not ready" }
    );
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, body).into_response()
}

async fn metrics_text(State(ops): State<Ops>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], ops.metrics.render())
}

/// JSON Lines in, the import report out: 200 if every line was applied, 422 if some
/// were rejected (the others are applied), 413 past [`MAX_UPLOAD`] bytes (the lines
/// before applied), 500 if the store failed. Only for the operator's tools: a browser's
/// request (one with `Origin` or `Sec-Fetch-Site`), or a body that is not JSON Lines, is
/// refused before anything is imported, so no web page open on the operator's machine can
/// change subscribers' data; with `metrics.provision_token` set, the token is needed. A
/// refused upload is read and dropped (up to the limit) so its client gets the refusal.
async fn provision(State(ops): State<Ops>, headers: HeaderMap, body: Body) -> Response {
    let store = match ops.admit(&headers) {
        Ok(store) => store,
        Err((status, why)) => {
            // Read and dropped, so the client gets the refusal instead of a reset (hyper
            // closes a connection whose request body was left unread): up to the upload
            // limit and REFUSED_READ_WITHIN, so a client without the token holds nothing
            // longer (a stop waits for requests under way).
            let drop_upload = async {
                let mut stream = body.into_data_stream();
                let mut dropped = 0usize;
                while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut stream).await {
                    dropped += chunk.len();
                    if dropped > ops.max_upload {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(REFUSED_READ_WITHIN, drop_upload).await;
            return (status, Json(serde_json::json!({"error": why}))).into_response();
        }
    };
    let (sender, incoming) = tokio::sync::mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
    // Dropped when the upload ends or passes the limit: the import ends with what it has.
    let mut chunks = Some(sender);
    let importing = tokio::task::spawn_blocking(move || {
        import(&store, std::io::BufReader::new(ChunkReader { incoming, chunk: Bytes::new() }))
    });
    let (mut received, mut cut) = (0usize, None);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                cut = Some((StatusCode::BAD_REQUEST, format!("the upload broke off after {received} bytes: {e}")));
                break;
            }
        };
        received += chunk.len();
        if cut.is_some() || chunks.is_none() {
            // Past the limit, or once the import ended early (the store failed), the
            // rest is read and dropped, so the client gets its answer instead of a
            // reset; up to four times the limit, then the connection ends.
            if received > ops.max_upload.saturating_mul(5) {
                break;
            }
            continue;
        }
        if received > ops.max_upload {
            cut = Some((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the upload is larger than {} MiB: the lines before that were applied (the last one may be \
                     cut short and rejected); send the rest as a file of its own",
                    ops.max_upload >> 20
                ),
            ));
            chunks = None;
            continue;
        }
        let Some(sender) = &chunks else { break };
        if sender.send(chunk).await.is_err() {
            chunks = None; // the import ended early: the store failed
        }
    }
    drop(chunks);
    match importing.await {
        Ok(Ok(report)) => {
            let mut response = ProvisionResponse::from(report);
            let status = match cut {
                Some((status, why)) => {
                    tracing::warn!(received, lines = response.lines, "provisioning upload cut short: {why}");
                    response.error = Some(why);
                    status
                }
                None if response.rejected.is_empty() => StatusCode::OK,
                None => StatusCode::UNPROCESSABLE_ENTITY,
            };
            tracing::info!(lines = response.lines, rejected = response.rejected.len(), "provisioned over HTTP");
            (status, Json(serde_json::to_value(response).expect("report serialises"))).into_response()
        }
        Ok(Err(e)) => {
            crate::error_event!(ops.metrics, ErrorEvent::Provision, error = %e, "provisioning over HTTP failed");
            // With what it did before it stopped: its moves and removals happened.
            let mut response = ProvisionResponse::from(*e.done);
            response.error = Some(e.failure.to_string());
            (StatusCode::INTERNAL_SERVER_ERROR, Json(serde_json::to_value(response).expect("report serialises")))
                .into_response()
        }
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, Json(serde_json::json!({"error": e.to_string()}))).into_response()
        }
    }
}

/// How long a refused upload is read (and dropped) before its refusal is sent.
const REFUSED_READ_WITHIN: Duration = Duration::from_secs(10);

impl Ops {
    /// Refuses a request that is not from the operator's tools (see [`provision`]).
    fn admit(&self, headers: &HeaderMap) -> Result<Store, (StatusCode, &'static str)> {
        let refuse = |status: StatusCode, why: &'static str| Err((status, why));
        if headers.contains_key(header::ORIGIN) || headers.contains_key("sec-fetch-site") {
            return refuse(
                StatusCode::FORBIDDEN,
                "a browser may not provision: use `callnotify provision import --url`",
            );
        }
        let token = self.token.expose();
        if token.is_empty() && self.beyond_loopback {
            return refuse(
                StatusCode::FORBIDDEN,
                "metrics.listen is reachable from other machines: set metrics.provision_token to provision through it",
            );
        }
        if !token.is_empty() {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let matches = given.is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes()));
            if !matches {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "metrics.provision_token is set: send it as `Authorization: Bearer …`",
                );
            }
        }
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if !["application/x-ndjson", "application/jsonl", "application/json"].contains(&media.as_str()) {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send JSON Lines as Content-Type: application/x-ndjson (or application/json)",
            );
        }
        match self.serving.get() {
            Some(serving) => Ok(serving.store.clone()),
            None => refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the engine is starting (catching up with the subscriber state): send again once /readyz answers ready",
            ),
        }
    }
}

/// Compares without stopping at the first difference, so the time taken does not tell
/// how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The upload's chunks as a blocking reader, for the import on its blocking thread.
struct ChunkReader {
    incoming: tokio::sync::mpsc::Receiver<Bytes>,
    chunk: Bytes,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.incoming.blocking_recv() {
                Some(chunk) => self.chunk = chunk,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len());
        out[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
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
    #[error(
        "the engine at {url} closed the connection without an answer (it stopped, or it found no state owner \
         for longer than its operator endpoint waits): some lines may be imported; importing the file again is safe"
    )]
    Unanswered { url: String },
    #[error(
        "the engine at {url} did not answer for {idle:?} (hung or stopped): some lines may be imported; importing \
         the file again is safe"
    )]
    Silent { url: String, idle: Duration },
    #[error(
        "reading the lines to send: {0}; the lines sent before it may be imported: importing the file again is \
         safe"
    )]
    Input(std::io::Error),
}

/// Sends JSON Lines to a running engine's `POST /provision` (blocking; for the CLI), with
/// `token` (`metrics.provision_token`) as a bearer token if it is not empty. The lines
/// go as they are read, in chunks (chunked transfer coding), so a file of any size
/// takes a 64 KiB buffer here, as it takes bounded memory in the engine.
pub fn post_provision(url: &str, jsonl: impl std::io::Read, token: &str) -> Result<ProvisionResponse, ClientError> {
    post_provision_within(url, jsonl, token, SILENT_AT_MOST)
}

/// How long `provision import --url` waits on an engine that neither takes the next
/// lines nor answers. The engine answers within seconds of the last line, and waits
/// for a state owner up to its own limit, well below this.
const SILENT_AT_MOST: Duration = Duration::from_secs(300);

/// [`post_provision`], giving up once the engine has been silent for `idle` (connecting,
/// taking lines, answering).
fn post_provision_within(
    url: &str,
    mut jsonl: impl std::io::Read,
    token: &str,
    idle: Duration,
) -> Result<ProvisionResponse, ClientError> {
    use std::io::Read;
    let authority = url
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/').trim_end_matches("/provision"))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| ClientError::Url(url.to_owned()))?;
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ClientError::Silent { url: url.to_owned(), idle }
        }
        _ => ClientError::Io { url: url.to_owned(), source },
    };
    // Not reached: nothing was sent.
    let mut stream = connect(authority, idle).map_err(|source| ClientError::Io { url: url.to_owned(), source })?;
    stream.set_read_timeout(Some(idle)).and_then(|()| stream.set_write_timeout(Some(idle))).map_err(io)?;
    let mut upload = stream.try_clone().map_err(io)?;
    match send_lines(&mut upload, authority, &mut jsonl, token) {
        Ok(()) => {}
        Err(Sending::Input(e)) => return Err(ClientError::Input(e)),
        // The engine may have answered and closed before the upload ended (a wrong
        // token, a file over the limit): its answer says why, not "cannot reach".
        Err(Sending::Io(e)) => {
            let mut response = Vec::new();
            let _ = stream.read_to_end(&mut response);
            if response.is_empty() {
                return Err(io(e));
            }
            return answer(url, &String::from_utf8_lossy(&response));
        }
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(io)?;
    answer(url, &response)
}

/// A connection to `authority` (`host:port`), each of its addresses tried for `within`.
fn connect(authority: &str, within: Duration) -> std::io::Result<std::net::TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for addr in authority.to_socket_addrs()? {
        match std::net::TcpStream::connect_timeout(&addr, within) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))
}

/// Why an upload stopped: its input, or the connection.
enum Sending {
    Input(std::io::Error),
    Io(std::io::Error),
}

/// The request head, then `jsonl` in chunks.
fn send_lines(
    stream: &mut std::net::TcpStream,
    authority: &str,
    jsonl: &mut impl std::io::Read,
    token: &str,
) -> Result<(), Sending> {
    use std::io::Write;
    let authorization = if token.is_empty() { String::new() } else { format!("Authorization: Bearer {token}\r\n") };
    write!(
        stream,
        "POST /provision HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/x-ndjson\r\n\
         {authorization}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .map_err(Sending::Io)?;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match jsonl.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Sending::Input(e)),
        };
        write!(stream, "{n:x}\r\n").map_err(Sending::Io)?;
        stream.write_all(&chunk[..n]).map_err(Sending::Io)?;
        stream.write_all(b"\r\n").map_err(Sending::Io)?;
    }
    stream.write_all(b"0\r\n\r\n").map_err(Sending::Io)
}

/// The engine's answer to an upload, read whole.
fn answer(url: &str, response: &str) -> Result<ProvisionResponse, ClientError> {
    if response.is_empty() {
        return Err(ClientError::Unanswered { url: url.to_owned() });
    }
    let status: u16 = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    match status {
        200 | 413 | 422 => {
            serde_json::from_str(body).map_err(|_| ClientError::Answer { status, body: body.to_owned() })
        }
        // The import stopped: what it did before is in the report, the error with it.
        500 => match serde_json::from_str::<ProvisionResponse>(body) {
            Ok(report) if report.error.is_some() => Ok(report),
            _ => Err(ClientError::Answer { status, body: body.to_owned() }),
        },
        _ => Err(ClientError::Answer { status, body: body.to_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine that answers before the upload is over and closes (a wrong token, a
    /// file over the limit) is heard: the operator reads its answer, not "cannot reach
    /// the engine", and chases the token rather than the network.
    #[test]
    fn an_answer_given_before_the_upload_ended_is_what_the_import_says() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let engine = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            let body = r#"{"error":"a wrong or missing provisioning token"}"#;
            let answer = format!(
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).unwrap();
            // Closed with the upload unread: the client's next writes fail.
        });
        let line = r#"{"contract":"0312345678","numbers":[{"number":"0312345678"}]}"#.to_owned() + "\n";
        // 13 MB: more than the sockets' buffers take while nobody reads.
        let lines = line.repeat(200_000);
        let error = post_provision(&url, lines.as_bytes(), "wrong").expect_err("refused");
        engine.join().unwrap();
        match error {
            ClientError::Answer { status: 401, body } => assert!(body.contains("token"), "{body}"),
            other => panic!("not the engine's answer: {other}"),
        }
    }

    /// Reads an upload's request to its last chunk, as an engine would before answering.
    fn read_upload(stream: &mut std::net::TcpStream) {
        use std::io::Read;
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.ends_with(b"0\r\n\r\n") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "the request ended early");
            request.extend_from_slice(&buf[..n]);
        }
    }

    /// An engine that closes the connection without answering (it stopped, or its idle
    /// limit passed while the import waited for the state owner) is named as such, with
    /// what to do: not "the engine answered 0".
    #[test]
    fn an_import_whose_connection_closes_unanswered_says_so_and_that_importing_again_is_safe() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let engine = std::thread::spawn(move || {
            read_upload(&mut listener.accept().unwrap().0);
        });
        let line = r#"{"contract":"0312345678","numbers":[{"number":"0312345678"}]}"#;
        let error = post_provision(&url, line.as_bytes(), "").expect_err("no answer");
        engine.join().unwrap();
        let said = error.to_string();
        assert!(said.contains("closed the connection without an answer"), "{said}");
        assert!(said.contains("importing the file again is safe"), "{said}");
    }

    /// An engine that takes the upload and never answers (stopped with SIGSTOP, hung)
    /// left `provision import --url`, and the load tester's `state` waiting on it, for
    /// good: it gives up once the engine has been silent for its idle limit, saying so.
    #[test]
    fn an_import_the_engine_never_answers_gives_up_after_its_idle_limit() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (held, hold) = std::sync::mpsc::channel::<()>();
        let engine = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            read_upload(&mut stream);
            // Silent, the connection open, until the test ends.
            let _ = hold.recv();
        });
        let line = r#"{"contract":"0312345678","numbers":[{"number":"0312345678"}]}"#;
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(post_provision_within(&url, line.as_bytes(), "", Duration::from_millis(300)));
        });
        let error = outcome.recv_timeout(Duration::from_secs(20)).expect("gave up").expect_err("no answer");
        let said = error.to_string();
        assert!(said.contains("did not answer"), "{said}");
        assert!(said.contains("importing the file again is safe"), "{said}");
        drop(held);
        engine.join().unwrap();
    }

    /// docs/provisioning.md: an upload refused before it is read (here a wrong token) gets
    /// its refusal whatever its size. The engine answered at once and closed the
    /// connection while the client still sent, and `provision import --url` said it
    /// could not reach the engine (connection reset by peer).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_refused_before_it_is_read_gets_its_refusal_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let disk = DiskWatch::new(dir.path(), 1, metrics.clone());
        let settings = crate::config::MetricsSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            provision_token: serde_json::from_str("\"right\"").unwrap(),
        };
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let endpoint = listen(&settings, metrics, &tasks, shutdown.clone()).await.unwrap();
        endpoint.serve(Store::temporary().unwrap(), disk);
        let url = format!("http://{}", endpoint.addr());
        let lines: String = (0..100_000)
            .map(|i| format!(r#"{{"contract":"03{i:08}","numbers":[{{"number":"03{i:08}"}}]}}"#) + "\n")
            .collect();
        let refused =
            tokio::task::spawn_blocking(move || post_provision(&url, lines.as_bytes(), "wrong")).await.unwrap();
        match refused {
            Err(ClientError::Answer { status: 401, body }) => assert!(body.contains("provision_token"), "{body}"),
            other => panic!("not the refusal: {other:?}"),
        }
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
    }

    /// A refused upload whose body never ends (a client that stopped sending, or sends a
    /// byte a minute) is read for [`REFUSED_READ_WITHIN`] at most, then gets its refusal:
    /// it holds neither its handler nor an engine's stop longer. On a paused clock.
    #[tokio::test(start_paused = true)]
    async fn a_refused_upload_that_never_ends_gets_its_refusal_after_a_bounded_read() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let ops = Ops {
            serving: serving(Store::temporary().unwrap(), DiskWatch::new(dir.path(), 1, metrics.clone())),
            metrics,
            token: serde_json::from_str("\"right\"").unwrap(),
            max_upload: MAX_UPLOAD,
            beyond_loopback: false,
        };
        let endless = Body::from_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>());
        let started = tokio::time::Instant::now();
        let answered =
            tokio::time::timeout(Duration::from_secs(3600), provision(State(ops), HeaderMap::new(), endless))
                .await
                .expect("answered, not held for an hour");
        assert_eq!(answered.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(started.elapsed(), REFUSED_READ_WITHIN);
    }

    /// `POST /provision` writes subscribers, credentials included: on a listener other
    /// machines reach (deploy/callnotify.toml's 0.0.0.0, for Prometheus) it is refused
    /// until `metrics.provision_token` is set. A missing secrets file left it open to
    /// anyone who reached the port.
    #[tokio::test]
    async fn provisioning_beyond_loopback_without_a_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let store = Store::temporary().unwrap();
        let open = Ops {
            serving: serving(store.clone(), DiskWatch::new(dir.path(), 1, metrics.clone())),
            metrics,
            token: Secret::default(),
            max_upload: MAX_UPLOAD,
            beyond_loopback: true,
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/x-ndjson".parse().unwrap());
        let line = r#"{"contract":"0312345678","numbers":[{"number":"0312345678"}]}"#;
        let answered = provision(State(open.clone()), headers.clone(), Body::from(line)).await;
        assert_eq!(answered.status(), StatusCode::FORBIDDEN);
        assert!(store.line(&crate::phone::PhoneNumber::parse("0312345678").unwrap()).unwrap().is_none());
        // On loopback, as the default configuration has it, no token is needed.
        let local = Ops { beyond_loopback: false, ..open };
        let answered = provision(State(local.clone()), headers, Body::from(line)).await;
        assert_eq!(answered.status(), StatusCode::OK);
    }

    /// While the engine starts (its catch-up with the state topic), the endpoint answers
    /// `/metrics` and `/healthz`, and refuses `/provision` saying to wait for `/readyz`:
    /// it was not bound until the catch-up was over (minutes at carrier scale), and
    /// Prometheus took every starting node for a dead one.
    #[tokio::test]
    async fn a_starting_engine_answers_metrics_and_health_and_refuses_provisioning_until_built() {
        let settings = crate::config::MetricsSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            provision_token: Secret::default(),
        };
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let metrics = Metrics::new();
        let endpoint = listen(&settings, metrics.clone(), &tasks, shutdown.clone()).await.unwrap();
        let (addr, url) = (endpoint.addr(), format!("http://{}", endpoint.addr()));
        let get = |path: &'static str| async move {
            let answer = testkit::http::request(addr, "GET", path, "", None).await;
            (answer.status, answer.body)
        };
        assert_eq!(get("/healthz").await, (200, "ok\n".to_owned()));
        let (status, text) = get("/metrics").await;
        assert!(status == 200 && text.contains("\ncallnotify_starting 1\n"), "{status}: {text}");
        let (status, text) = get("/readyz").await;
        assert_eq!((status, text.as_str()), (503, STARTING));
        let line = r#"{"contract":"0312345678","numbers":[{"number":"0312345678"}]}"#;
        let posted = {
            let url = url.clone();
            tokio::task::spawn_blocking(move || post_provision(&url, line.as_bytes(), "")).await.unwrap()
        };
        match posted {
            Err(ClientError::Answer { status: 503, body }) => assert!(body.contains("/readyz"), "{body}"),
            other => panic!("not refused while starting: {other:?}"),
        }

        let dir = tempfile::tempdir().unwrap();
        let store = Store::temporary().unwrap();
        endpoint.serve(store.clone(), DiskWatch::new(dir.path(), 1, metrics));
        assert!(get("/metrics").await.1.contains("\ncallnotify_starting 0\n"));
        let posted = tokio::task::spawn_blocking(move || post_provision(&url, line.as_bytes(), "")).await.unwrap();
        assert!(posted.is_ok(), "{posted:?}");
        assert!(store.line(&crate::phone::PhoneNumber::parse("0312345678").unwrap()).unwrap().is_some());
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
    }

    /// What an engine built on `store` and `disk` serves.
    fn serving(store: Store, disk: DiskWatch) -> Arc<OnceLock<Serving>> {
        Arc::new(OnceLock::from(Serving { store, disk }))
    }

    async fn readiness(ops: &Ops) -> (StatusCode, String) {
        let response = ready(State(ops.clone())).await;
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// `/readyz` is 503 until the consumers hold partitions and while the store's disk
    /// is low, each with its reason; a mail server that does not answer keeps it ready.
    #[tokio::test]
    async fn readiness_waits_for_partitions_and_room_on_disk_but_not_for_the_mail_server() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let roomy = DiskWatch::new(dir.path(), 1, metrics.clone());
        roomy.check();
        let ops = Ops {
            metrics: metrics.clone(),
            serving: Arc::new(OnceLock::new()),
            token: Secret::default(),
            max_upload: MAX_UPLOAD,
            beyond_loopback: false,
        };
        // Still catching up with the state topic: it says it starts.
        let (status, body) = readiness(&ops).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.starts_with("not ready\nstarting: catching up"), "{body}");
        let ops = Ops { serving: serving(Store::temporary().unwrap(), roomy), ..ops };

        let (status, body) = readiness(&ops).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.starts_with("not ready\n") && body.contains("consuming: no partition assigned"), "{body}");

        metrics.consumer_partitions(0, 2);
        metrics.consumer_partitions(1, 1);
        metrics.smtp_circuit_open(true);
        let (status, body) = readiness(&ops).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("consuming: 3 partitions assigned\n"), "{body}");
        assert!(body.contains("mail server: not answering: mails wait in the retry queue"), "{body}");

        // More room asked for than any disk here has.
        let full = DiskWatch::new(dir.path(), u64::MAX >> 21, metrics.clone());
        full.check();
        let (status, body) =
            readiness(&Ops { serving: serving(Store::temporary().unwrap(), full), ..ops.clone() }).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("\nstore: ") && body.contains("CDRs are not read until there is room"), "{body}");
    }
}
