//! JSON over HTTP for an IVR platform (Asterisk, FreeSWITCH): the platform answers the
//! phone, plays the prompts this API names and posts the keys the caller pressed.
//!
//! ```text
//! POST /ivr/calls              {"caller":"0312345678"}
//!   200 {"call_id":"…","prompt":"SELECT_UNIT","text":"…","awaiting":"SELECT_UNIT","ends":false}
//!   403 {"error":"refused","message":"…"}          caller not on a provisioned line (R-I1)
//! POST /ivr/calls/{id}/digits  {"digits":"1"}
//!   200 {"call_id":"…","prompt":"ENTER_PASSWORD","text":"0312345678番の…","awaiting":"ENTER_PASSWORD","ends":false}
//!   404 {"error":"unknown_call","message":"…"}     ended, idle too long, or never started
//!   421 {"error":"other_node","message":"…"}       answered by another node (or by this
//!                                                  one before a restart)
//!   409 {"error":"entry_under_way","message":"…"}  the call's previous entry is still
//!                                                  being handled (a retry sent early)
//! ```
//!
//! A call that ends says why in `prompt` and `text` (DONE, or ENDED after the third
//! invalid entry, R-I6); the platform hangs up whenever `ends` is true. `awaiting` names
//! the entry the next digits answer.
//! Calls live in memory; a call without a request for [`IDLE_TIMEOUT`] is forgotten
//! (the platform has hung up), so a restart only drops calls in progress. A call id
//! begins with the answering process's tag, so digits sent to another node (or to this
//! one after a restart) are told so, not that the call ended.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Duration, Utc};
use dashmap::DashMap;
use engine::config::IpRange;
use engine::error_event::ErrorEvent;
use engine::telemetry::{IvrCall, Metrics};

use super::call::{Call, IvrError, Step};
use super::prompt::PromptId;
use super::Ivr;
use crate::failure::{self, Failed, Reporter};

/// How long a call may go without a request before it is forgotten.
pub const IDLE_TIMEOUT: Duration = Duration::minutes(5);

/// The router's state: the IVR handles and the calls in progress.
#[derive(Clone)]
pub struct ApiState {
    ivr: Ivr,
    /// Begins every call id this process gives: random per process, so a call id tells
    /// whether this process answered it.
    tag: Arc<str>,
    /// Calls in progress by call id.
    calls: Arc<DashMap<String, Arc<LiveCall>>>,
    /// Held while a new call's caller is counted and its call inserted, so two calls
    /// starting at once cannot both see room under [`MAX_CALLS_PER_CALLER`].
    admitting: Arc<std::sync::Mutex<()>>,
    idle_timeout: Duration,
    /// `admin.ivr_addresses`: besides loopback, the peers answered. The API trusts the
    /// caller ID it is sent, so anyone else could set a temporary password for any number.
    platforms: Arc<[IpRange]>,
    /// Calls counted by outcome, temporary passwords set, failed requests.
    metrics: Metrics,
}

struct LiveCall {
    /// Locked on a blocking thread for each entry: the last one hashes the password.
    call: Mutex<Call>,
    /// Who called, readable without waiting for the lock ([`MAX_CALLS_PER_CALLER`]).
    caller: engine::phone::PhoneNumber,
    /// Unix milliseconds of the last request, to forget abandoned calls.
    last_seen_ms: AtomicI64,
}

impl LiveCall {
    fn idle(&self, now: DateTime<Utc>) -> Duration {
        Duration::milliseconds(now.timestamp_millis() - self.last_seen_ms.load(Ordering::Relaxed))
    }
}

impl ApiState {
    pub fn new(ivr: Ivr) -> Self {
        let tag = format!("{:08x}", rand::random::<u32>()).into();
        Self {
            ivr,
            tag,
            calls: Arc::default(),
            admitting: Arc::default(),
            idle_timeout: IDLE_TIMEOUT,
            platforms: Arc::from([]),
            metrics: Metrics::new(),
        }
    }

    /// Counts calls and failed requests in the engine's `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Answers `platforms` (`admin.ivr_addresses`) besides loopback.
    pub fn with_platforms(mut self, platforms: &[IpRange]) -> Self {
        self.platforms = platforms.into();
        self
    }

    /// Replaces [`IDLE_TIMEOUT`].
    pub fn with_idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    /// Calls in progress (metrics, tests).
    pub fn live_calls(&self) -> usize {
        self.calls.len()
    }

    /// Forgets every call idle for longer than the timeout.
    fn sweep(&self, now: DateTime<Utc>) {
        self.calls.retain(|_, live| {
            let live = live.idle(now) < self.idle_timeout;
            if !live {
                self.metrics.ivr_call(IvrCall::Abandoned);
            }
            live
        });
    }
}

/// The largest request body the IVR API reads: a caller id or a few digits.
pub const BODY_LIMIT: usize = 4 * 1024;

/// The IVR API's routes, ready to be merged into the admin app or served alone.
pub fn router(state: ApiState) -> Router {
    let failures = Reporter { metrics: state.metrics.clone(), event: ErrorEvent::IvrRequest };
    Router::new()
        .route("/ivr/calls", post(start_call))
        .route("/ivr/calls/{id}/digits", post(digits))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), from_platform))
        .layer(axum::middleware::map_response_with_state(failures, failure::report))
        .with_state(state)
}

#[derive(serde::Deserialize)]
struct StartRequest {
    /// Caller ID as the platform has it.
    caller: String,
}

#[derive(serde::Deserialize)]
struct DigitsRequest {
    /// The keys of one entry, e.g. `"1"`, `"0312345678#"`, `"12345678"`.
    digits: String,
}

#[derive(Debug, serde::Serialize)]
struct StepResponse {
    call_id: String,
    prompt: Option<PromptId>,
    text: Option<String>,
    awaiting: Option<PromptId>,
    ends: bool,
}

impl StepResponse {
    fn new(call_id: String, step: Step) -> Self {
        let (prompt, text) = step.prompt.map(|p| (p.id, p.text)).unzip();
        Self { call_id, prompt, text, awaiting: step.awaiting, ends: step.ends }
    }
}

/// Answers only loopback and `admin.ivr_addresses`: 403 `not_platform` to anyone else.
/// (A request without a peer is a test calling the router directly.)
async fn from_platform(
    State(state): State<ApiState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<crate::site::Peer>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(peer) = peer.map(|p| p.0 .0.addr.ip().to_canonical()) {
        if !peer.is_loopback() && !state.platforms.iter().any(|range| range.contains(peer)) {
            tracing::warn!(%peer, "IVR API request refused: not from admin.ivr_addresses");
            return ApiError::NotPlatform.into_response();
        }
    }
    next.run(request).await
}

async fn start_call(
    State(state): State<ApiState>,
    body: Result<Json<StartRequest>, JsonRejection>,
) -> Result<Json<StepResponse>, ApiError> {
    let Json(request) = body?;
    let now = state.ivr.clock.now();
    state.sweep(now);
    // Two small sled reads, and for a caller this node does not show, an exchange with
    // the state owner before the refusal (`Call::start`): on a blocking thread.
    let ivr = state.ivr.clone();
    let started = tokio::task::spawn_blocking(move || Call::start(&ivr, &request.caller))
        .await
        .map_err(|e| IvrError::Store(e.into()))?;
    let (call, step) = started.inspect_err(|e| {
        if matches!(e, IvrError::NoCallerId | IvrError::NotProvisioned(_)) {
            state.metrics.ivr_call(IvrCall::Refused);
        }
    })?;
    let caller = call.caller();
    let call_id = format!("{}-{:032x}", state.tag, rand::random::<u128>());
    let live = LiveCall { call: Mutex::new(call), caller, last_seen_ms: AtomicI64::new(now.timestamp_millis()) };
    {
        // The lock guards no data: a panic while it was held left nothing half done.
        let _admitting = state.admitting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = state.calls.iter().filter(|live| live.caller == caller).count();
        if open >= MAX_CALLS_PER_CALLER {
            tracing::info!(%caller, open, "temporary-password call refused: too many open from this number");
            state.metrics.ivr_call(IvrCall::Busy);
            return Err(ApiError::Busy);
        }
        state.calls.insert(call_id.clone(), Arc::new(live));
    }
    Ok(Json(StepResponse::new(call_id, step)))
}

async fn digits(
    State(state): State<ApiState>,
    Path(call_id): Path<String>,
    body: Result<Json<DigitsRequest>, JsonRejection>,
) -> Result<Json<StepResponse>, ApiError> {
    let Json(request) = body?;
    let now = state.ivr.clock.now();
    // Cloned out so no map guard is held across the await below.
    let Some(live) = state.calls.get(&call_id).map(|entry| Arc::clone(entry.value())) else {
        return Err(match call_id.split_once('-') {
            Some((tag, _)) if tag != &*state.tag => ApiError::OtherNode,
            _ => ApiError::UnknownCall,
        });
    };
    if live.idle(now) >= state.idle_timeout {
        if state.calls.remove(&call_id).is_some() {
            state.metrics.ivr_call(IvrCall::Abandoned);
        }
        return Err(ApiError::UnknownCall);
    }
    live.last_seen_ms.store(now.timestamp_millis(), Ordering::Relaxed);
    // The entry that completes the call hashes the password (argon2): off the workers,
    // and within the process's cap on hashes at once, as the site's logins.
    let step = state
        .ivr
        .credentials
        .spawn_hashing(move || match live.call.try_lock() {
            Ok(mut call) => call.input(&request.digits).map(|step| (step, call.number_left())).map_err(ApiError::from),
            // An entry of this call still handled (a platform retrying it) is refused,
            // not waited for while holding a permit the site's logins need.
            Err(std::sync::TryLockError::WouldBlock) => Err(ApiError::EntryUnderWay),
            Err(std::sync::TryLockError::Poisoned(_)) => {
                Err(ApiError::Internal("a previous entry of this call panicked".into()))
            }
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let (step, number_left) = step;
    if step.ends {
        state.calls.remove(&call_id);
        if step.prompt.as_ref().is_some_and(|p| p.id == PromptId::Done) {
            state.metrics.ivr_call(IvrCall::Done);
            state.metrics.temporary_password_set();
        } else if number_left {
            state.metrics.ivr_call(IvrCall::NumberLeft);
        } else {
            state.metrics.ivr_call(IvrCall::InvalidEntries);
        }
    }
    Ok(Json(StepResponse::new(call_id, step)))
}

/// Why a request failed; answered as `{"error": code, "message": …}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Refused(IvrError),
    #[error("no such call: it ended, was idle too long, or never started; start a new call")]
    UnknownCall,
    #[error(
        "this call was answered by another node, or by this one before a restart: a call's digits go to the node \
         that answered it; start a new call if that node is gone"
    )]
    OtherNode,
    #[error("{message}")]
    BadRequest { status: StatusCode, message: String },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{MAX_CALLS_PER_CALLER} calls from this number are already open: end one first")]
    Busy,
    #[error("this call's previous entry is still being handled: send the next once it is answered")]
    EntryUnderWay,
    #[error("this address is not the IVR platform's (admin.ivr_addresses)")]
    NotPlatform,
}

/// Calls one number may have open at once: a phone has one line, and a few cover a
/// platform retrying; without a cap, requests from one caller id could fill the map.
pub const MAX_CALLS_PER_CALLER: usize = 3;

impl From<IvrError> for ApiError {
    fn from(e: IvrError) -> Self {
        match e {
            e if e.is_refusal() => Self::Refused(e),
            IvrError::Ended => Self::UnknownCall,
            e => Self::Internal(e.to_string()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self::BadRequest { status: rejection.status(), message: rejection.body_text() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::Refused(_) => (StatusCode::FORBIDDEN, "refused"),
            Self::Busy => (StatusCode::TOO_MANY_REQUESTS, "busy"),
            Self::EntryUnderWay => (StatusCode::CONFLICT, "entry_under_way"),
            Self::NotPlatform => (StatusCode::FORBIDDEN, "not_platform"),
            Self::UnknownCall => (StatusCode::NOT_FOUND, "unknown_call"),
            Self::OtherNode => (StatusCode::MISDIRECTED_REQUEST, "other_node"),
            Self::BadRequest { status, .. } => (*status, "bad_request"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let message = match &self {
            Self::Internal(_) => "internal error; the call can be retried".to_owned(),
            other => other.to_string(),
        };
        let mut response = (status, Json(serde_json::json!({ "error": code, "message": message }))).into_response();
        if let Self::Internal(reason) = self {
            response.extensions_mut().insert(Failed(reason));
        }
        response
    }
}

#[cfg(test)]
mod tests;
