//! 設定サイト (the subscriber settings site), server-rendered HTML that works without
//! JavaScript: login, the forced password change and logout (SERVICE.md §4,
//! R-S1..R-S7), and behind [`require_session`] the choice of service and number (§5),
//! the 着信お知らせメール settings (§6), and the FAXお知らせメール settings and received
//! faxes (§9, R-F1).
//!
//! Every response carries strict security headers ([`security_headers`]); every form
//! carries a CSRF token ([`csrf`]); no GET changes state.
//!
//! # Layout
//!
//! - [`html`]: escaping and the page frame.
//! - [`csrf`]: tokens and their comparison.
//! - [`session`]: server-side sessions and their timeouts (R-S7).
//! - [`login`]: `GET/POST /login`, `POST /logout` (R-S1..R-S3).
//! - [`password`]: the R-S5 policy and `GET/POST /password` (R-S4).
//! - [`menu`]: `GET /`, the menu after login: サービス選択 (R-C1).
//! - [`numbers`]: which numbers a session may configure, `GET /numbers` and `GET /fax`
//!   (R-C2).
//! - [`settings`]: `GET/POST /numbers/{number}/call`, the settings of R-N1..R-N5, and
//!   `POST /numbers/{number}/call/test/{row}`, R-N2's 送信テスト.
//! - [`settings_form`]: that page's form: parsing per row and HTML.
//! - [`form_parts`]: what the call and fax forms share: 開始/停止 and the 送信先 rows.
//! - [`destinations`]: what both settings pages do with 送信先: the current password a
//!   change needs, 送信テスト.
//! - [`fax_settings`]: `GET/POST /numbers/{number}/fax` and
//!   `POST /numbers/{number}/fax/test/{row}`, FAXお知らせメール設定 (R-F1).
//! - [`fax`]: `GET /numbers/{number}/faxes` (受信FAX一覧) and `/fax/{number}/{ms}/{fax_id}`,
//!   a received fax, its page pictures, its PDF and its deletion (R-F1).
//! - [`unit`]: `GET/POST /unit`, 認証単位変更 (R-O2, R-O3), for the contract number.

pub mod csrf;
pub mod destinations;
pub mod fax;
pub mod fax_settings;
pub mod form_parts;
pub mod html;
pub mod login;
pub mod menu;
pub mod numbers;
pub mod password;
pub mod session;
pub mod settings;
pub mod settings_form;
pub mod settings_page;
pub mod throttle;
pub mod unit;

use std::fmt;
use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::DefaultBodyLimit;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE, STRICT_TRANSPORT_SECURITY,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use engine::config::{IpRange, PasswordPolicy};
use engine::deliver::TestMailer;
use engine::error_event::ErrorEvent;
use engine::store::{Store, StoreError};
use engine::telemetry::Metrics;

use crate::clock::SharedClock;
use crate::credentials::{CredentialError, CredentialKind, Credentials, LoginFailure, LoginOk};
use crate::failure::{self, Failed, Reporter};
use session::{Session, Sessions};

/// The connection a request came on, handed to the handlers as `ConnectInfo<Peer>` by
/// the server (axum gives `SocketAddr` only for a bare `TcpListener`).
#[derive(Debug, Clone)]
pub struct Peer {
    /// Where it came from: the login throttle counts by it.
    pub addr: std::net::SocketAddr,
    /// Its requests being answered: the listener's idle limit waits for them.
    pub answering: engine::http::Answering,
}

impl AsRef<engine::http::Answering> for Peer {
    fn as_ref(&self) -> &engine::http::Answering {
        &self.answering
    }
}

/// What the site's handlers share; cheap to clone.
#[derive(Clone)]
pub struct SiteState {
    /// Lines and numbers: the unit that sets a session's idle timeout (R-S7).
    pub(crate) store: Store,
    /// Login and password change (R-S2..R-S6).
    pub(crate) credentials: Credentials,
    /// Sessions' timeouts and the credentials' 24 h / 60-day rules.
    pub(crate) clock: SharedClock,
    /// Who is logged in, server-side; the browser holds only the id.
    pub(crate) sessions: Sessions,
    /// Whether the site is reached over TLS only (R-S8): then cookies get `Secure` and
    /// the `__Host-` prefix, which browsers refuse to set over plain HTTP.
    pub(crate) secure: bool,
    /// Sends the 送信テスト mail of R-N2; `None`: the button answers that test mails
    /// are not available.
    pub(crate) test_mailer: Option<Arc<TestMailer>>,
    /// The rule for new passwords, and whether a password expires (R-S5, R-S6, or ASVS).
    pub(crate) password_policy: PasswordPolicy,
    /// Wrong logins per client address ([`throttle`]).
    pub(crate) throttle: Arc<throttle::Throttle>,
    /// Turns for fax renderings ([`fax::RENDERING_AT_ONCE`]).
    pub(crate) rendering: Arc<tokio::sync::Semaphore>,
    /// Behind a TLS-terminating proxy the client's address is the last one the proxy
    /// added to `X-Forwarded-For`, not the connection's.
    pub(crate) behind_proxy: bool,
    /// `admin.proxy_addresses`: besides loopback, the peers whose `X-Forwarded-For` counts.
    proxies: Arc<[IpRange]>,
    /// Logins, saves and test mails counted, and failed requests with them.
    pub(crate) metrics: Metrics,
}

impl SiteState {
    /// Runs `read` against the store on a blocking thread: sled may have to fetch pages
    /// from disk, and the site's handlers run on the async workers.
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, SiteError> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || read(&store)).await??)
    }

    pub fn new(store: Store, credentials: Credentials, clock: SharedClock) -> Self {
        Self {
            store: store.clone(),
            credentials,
            clock,
            sessions: Sessions::new(store),
            secure: false,
            test_mailer: None,
            password_policy: PasswordPolicy::default(),
            throttle: Arc::default(),
            rendering: Arc::new(tokio::sync::Semaphore::new(fax::RENDERING_AT_ONCE)),
            behind_proxy: false,
            proxies: Arc::from([]),
            metrics: Metrics::new(),
        }
    }

    /// Counts logins, saves, test mails and failed requests in the engine's `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Takes the client's address from the proxy's `X-Forwarded-For` (set with
    /// `admin.behind_tls_proxy`), for the login throttle, when the request comes from
    /// loopback or one of `proxies` (`admin.proxy_addresses`).
    pub fn with_proxy(mut self, behind_proxy: bool, proxies: &[IpRange]) -> Self {
        self.behind_proxy = behind_proxy;
        self.proxies = proxies.into();
        self
    }

    /// The client's address: the connection's, or behind the proxy the last address
    /// it added to `X-Forwarded-For` (anything before it the client could have written),
    /// with a port or without. A request without a usable one (no header, `unknown`)
    /// goes under the proxy's own address: such requests share one brake rather than
    /// go unbraked.
    ///
    /// The header is read only from the proxy (loopback, or `admin.proxy_addresses`): a
    /// client reaching the listener directly could write a fresh one per login. (A
    /// request without a peer is a test calling the router directly.)
    pub(crate) fn client(&self, peer: Option<std::net::SocketAddr>, headers: &HeaderMap) -> Option<std::net::IpAddr> {
        // A dual-stack listener sees an IPv4 proxy as ::ffff:a.b.c.d.
        let from_proxy = peer
            .map(|p| p.ip().to_canonical())
            .is_none_or(|ip| ip.is_loopback() || self.proxies.iter().any(|range| range.contains(ip)));
        if self.behind_proxy && from_proxy {
            let last = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).next_back();
            let forwarded = last.and_then(|v| v.rsplit(',').next()).map(str::trim).and_then(|last| {
                last.parse().ok().or_else(|| last.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
            });
            if forwarded.is_some() {
                return forwarded;
            }
        }
        peer.map(|p| p.ip())
    }

    /// Lets the 送信テスト button of R-N2 send test mails with `mailer`.
    pub fn with_test_mailer(mut self, mailer: Option<Arc<TestMailer>>) -> Self {
        self.test_mailer = mailer;
        self
    }

    /// Sets the rule for new passwords (`admin.password_policy`). With
    /// [`PasswordPolicy::Asvs`] a password older than 60 days no longer forces a change
    /// (R-S6 is the seed's rule); a temporary password still does (R-S4).
    pub fn with_password_policy(mut self, policy: PasswordPolicy) -> Self {
        self.password_policy = policy;
        self
    }

    /// Whether a login `ok` must change the password before anything else (R-S4).
    pub(crate) fn must_change(&self, ok: LoginOk) -> bool {
        match (self.password_policy, ok.kind) {
            (PasswordPolicy::Asvs, CredentialKind::Password) => false,
            _ => ok.must_change,
        }
    }

    /// Marks the site as served over TLS (directly or behind a terminating proxy).
    pub fn with_secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }

    /// The live sessions (metrics, tests).
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    fn cookie_name(&self, base: &str) -> String {
        if self.secure {
            format!("__Host-{base}")
        } else {
            base.to_owned()
        }
    }

    /// The session cookie's name.
    pub fn session_cookie(&self) -> String {
        self.cookie_name(SESSION_COOKIE)
    }

    /// The pre-session CSRF cookie's name (login form).
    pub fn csrf_cookie(&self) -> String {
        self.cookie_name(CSRF_COOKIE)
    }

    /// A `Set-Cookie` value for `name=value`; `None` deletes the cookie. The session
    /// cookie is `SameSite=Strict`; the login form's token cookie `Lax`, so that a login
    /// page opened from a link in a mail (a fax's) reuses the browser's token rather
    /// than replace it under the login tabs already open (R-S9); a cross-site form
    /// post still goes without it ([`csrf`]).
    fn set_cookie(&self, name: &str, value: Option<&str>) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        let same_site = if name == self.csrf_cookie() { "Lax" } else { "Strict" };
        let value = match value {
            Some(value) => format!("{name}={value}; HttpOnly; SameSite={same_site}; Path=/{secure}"),
            None => format!("{name}=; HttpOnly; SameSite={same_site}; Path=/; Max-Age=0{secure}"),
        };
        HeaderValue::from_str(&value).expect("cookie names and tokens are ASCII")
    }
}

impl fmt::Debug for SiteState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteState")
            .field("sessions", &self.sessions.len())
            .field("secure", &self.secure)
            .field("test_mailer", &self.test_mailer.is_some())
            .field("password_policy", &self.password_policy)
            .finish()
    }
}

/// Base name of the session cookie.
pub const SESSION_COOKIE: &str = "callnotify_session";
/// Base name of the pre-session CSRF cookie.
pub const CSRF_COOKIE: &str = "callnotify_csrf";

/// The largest form body the site reads: its forms are a few fields (five addresses
/// and a list of callers at most), and a body is held in memory until it is whole.
pub const BODY_LIMIT: usize = 64 * 1024;
/// `/unit`'s: it carries the password of every number of a line that logs in (R-O2).
pub const UNIT_BODY_LIMIT: usize = 1024 * 1024;

/// The site's routes, ready to be merged into the admin app or served alone.
pub fn router(state: SiteState) -> Router {
    use fax_settings::FaxPage;
    use settings::CallPage;
    let routes = Router::new()
        .route("/", get(menu::show))
        .route("/login", get(login::show).post(login::submit))
        .route("/logout", post(login::logout))
        .route("/password", get(password::show).post(password::submit))
        .route("/unit", get(unit::show).post(unit::submit).layer(DefaultBodyLimit::max(UNIT_BODY_LIMIT)))
        .route("/numbers", get(numbers::show))
        .route("/numbers/{number}/call", get(settings_page::show::<CallPage>).post(settings_page::submit::<CallPage>))
        .route("/numbers/{number}/call/test/{row}", post(settings_page::test_mail::<CallPage>))
        .route("/fax", get(numbers::show_fax))
        .route("/numbers/{number}/fax", get(settings_page::show::<FaxPage>).post(settings_page::submit::<FaxPage>))
        .route("/numbers/{number}/fax/test/{row}", post(settings_page::test_mail::<FaxPage>))
        .route("/numbers/{number}/faxes", get(fax::list))
        .route("/fax/{number}/{ms}/{fax_id}", get(fax::show))
        .route("/fax/{number}/{ms}/{fax_id}/pages/{page}", get(fax::page))
        .route("/fax/{number}/{ms}/{fax_id}/pdf", get(fax::pdf))
        .route("/fax/{number}/{ms}/{fax_id}/delete", post(fax::delete))
        .route("/style.css", get(stylesheet))
        .fallback(page_not_found)
        .method_not_allowed_fallback(method_not_allowed);
    // Inside HSTS: the page it answers instead goes with the site's headers.
    let routes = routes.layer(axum::middleware::map_response(unreadable_address));
    let routes =
        if state.secure { routes.layer(axum::middleware::map_response(strict_transport_security)) } else { routes };
    let failures = Reporter { metrics: state.metrics.clone(), event: ErrorEvent::SiteRequest };
    routes
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::map_response_with_state(failures, failure::report))
        .with_state(state)
}

async fn stylesheet() -> Response {
    ([(CONTENT_TYPE, "text/css; charset=utf-8")], html::STYLE).into_response()
}

/// A page of the site's own, in Japanese, where the browser would show its English one.
fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    let body = format!("<p>{}</p>\n<p><a href=\"/\">メニューへ戻る</a></p>\n", html::escape(message));
    (status, Html(html::page(title, &body))).into_response()
}

async fn page_not_found() -> Response {
    error_page(
        StatusCode::NOT_FOUND,
        "ページが見つかりません",
        "お探しのページは見つかりませんでした。アドレスをご確認ください。",
    )
}

/// axum's own answer to an address whose parts do not decode (`/numbers/%FF/call`):
/// English plain text naming the route's parameter. The page was not found.
async fn unreadable_address(response: Response) -> Response {
    let plain =
        response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/plain"));
    if response.status() == StatusCode::BAD_REQUEST && plain {
        return page_not_found().await;
    }
    response
}

async fn method_not_allowed() -> Response {
    error_page(
        StatusCode::METHOD_NOT_ALLOWED,
        "この操作はできません",
        "このページでは、その操作はできません。メニューから操作し直してください。",
    )
}

/// HSTS on a site reached over TLS (R-S8): for a year, browsers that have seen the site
/// go to it over HTTPS only, even when a subscriber types or follows an `http://` link.
pub async fn strict_transport_security(mut response: Response) -> Response {
    response.headers_mut().insert(STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    response
}

/// Headers on every site response: no framing, no foreign scripts or plugins, no
/// referrer leaking the site's paths, and no caching of pages that show a subscriber's
/// settings on a shared computer.
pub async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    );
    // frame-ancestors' forerunner, for the old phones' browsers that know only it.
    headers.insert(HeaderName::from_static("x-frame-options"), HeaderValue::from_static("DENY"));
    headers.insert(HeaderName::from_static("x-content-type-options"), HeaderValue::from_static("nosniff"));
    headers.insert(HeaderName::from_static("referrer-policy"), HeaderValue::from_static("no-referrer"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The value of cookie `name` in the request, if any.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(key, value)| (key == name).then_some(value))
}

/// `303 See Other` to `location`: after a POST, the browser GETs the next page, so a
/// reload does not resubmit the form.
pub fn redirect(location: &str) -> Response {
    let location = HeaderValue::from_str(location).expect("a path of the site's is a valid header");
    (StatusCode::SEE_OTHER, [(LOCATION, location)]).into_response()
}

/// A logged-in request: the session id and a snapshot of the session.
#[derive(Debug, Clone)]
pub struct Authed {
    pub id: String,
    pub session: Session,
}

/// Which pages stay reachable while the password must be changed (R-S4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Any page but the password change and logout.
    PasswordChanged,
    /// The password change and logout themselves.
    Any,
}

/// Why a request has no usable session, and where the browser goes instead.
#[derive(Debug)]
pub enum Denied {
    /// No session: to the login page.
    Login,
    /// The browser's session ended (idle, or its credential replaced): to the login
    /// page, which says so.
    Ended,
    /// The session's credential was invalidated by wrong entries made elsewhere (R-S2,
    /// R-S3): to the login page, which says a new temporary password is set by phone.
    Invalidated,
    /// The password must be changed first (R-S4).
    ChangePassword,
    /// The sessions could not be read: the site's error page.
    Failed(SiteError),
}

impl Denied {
    /// What the login page is told of why the browser is there (`notice=…`), if
    /// anything: for the redirect here and for a fax link's (its `fax=…` added).
    pub fn login_notice(&self) -> Option<&'static str> {
        match self {
            Self::Ended => Some("ended"),
            Self::Invalidated => Some("invalidated"),
            Self::Login | Self::ChangePassword | Self::Failed(_) => None,
        }
    }
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Self::Login | Self::Ended | Self::Invalidated => match self.login_notice() {
                Some(notice) => redirect(&format!("/login?notice={notice}")),
                None => redirect("/login"),
            },
            Self::ChangePassword => redirect("/password"),
            Self::Failed(e) => e.into_response(),
        }
    }
}

/// The request's live session, its idle timeout restarted; or why there is none.
pub async fn require_session(state: &SiteState, headers: &HeaderMap, gate: Gate) -> Result<Authed, Denied> {
    let id = cookie(headers, &state.session_cookie()).ok_or(Denied::Login)?;
    let touched = state.sessions.touch(id, state.clock.now()).await;
    let session = touched.map_err(|e| Denied::Failed(e.into()))?.ok_or(Denied::Ended)?;
    // The credential it logged in with must still be the number's: a new temporary
    // password by phone, a unit change or the number leaving its line ends the session.
    // A credential that cannot be read is an error, not a replaced one.
    // One invalidated by wrong entries made elsewhere (another browser, a guesser) is
    // said so: the subscriber is sent to the phone, not to a login that cannot work.
    let (credentials, number) = (state.credentials.clone(), session.number);
    let record = tokio::task::spawn_blocking(move || credentials.record(&number)).await;
    let current = record.map_err(|e| Denied::Failed(e.into()))?.map_err(|e| Denied::Failed(e.into()))?;
    let ours = current.filter(|r| r.stamp() == session.credential);
    if ours.as_ref().is_none_or(|r| r.invalidated) {
        tracing::info!(number = %session.number, "site session ended: its credential was replaced, removed or invalidated");
        state.sessions.remove(id).await.map_err(|e| Denied::Failed(e.into()))?;
        return Err(if ours.is_some() { Denied::Invalidated } else { Denied::Ended });
    }
    if session.must_change && gate == Gate::PasswordChanged {
        return Err(Denied::ChangePassword);
    }
    Ok(Authed { id: id.to_owned(), session })
}

/// Why a site request failed.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("CSRF token missing or wrong")]
    Csrf,
    #[error("malformed form: {0}")]
    Form(#[from] FormRejection),
    #[error("a form value the site does not offer: {0}")]
    BadForm(String),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// A fax document the engine kept that no longer shows (R-F1).
    #[error("fax document: {0}")]
    Document(#[from] engine::fax::document::DocumentError),
}

impl IntoResponse for SiteError {
    fn into_response(self) -> Response {
        let mut failed = None;
        let (status, title, message) = match &self {
            Self::Csrf => (
                StatusCode::FORBIDDEN,
                "エラー",
                "不正なリクエストです。ページを開き直してから、もう一度操作してください。",
            ),
            Self::Form(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "エラー",
                "送信された内容が大きすぎます。ページを開き直してから、もう一度操作してください。",
            ),
            Self::Form(_) | Self::BadForm(_) => {
                (StatusCode::BAD_REQUEST, "エラー", "入力内容を読み取れませんでした。もう一度操作してください。")
            }
            Self::Credentials(_) | Self::Store(_) | Self::Join(_) | Self::Document(_) => {
                failed = Some(Failed(self.to_string()));
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "システムエラー",
                    "システムエラーが発生しました。しばらくしてから、もう一度お試しください。",
                )
            }
        };
        let body = format!("<p>{}</p>\n<p><a href=\"/\">トップへ戻る</a></p>\n", html::escape(message));
        let mut response = (status, Html(html::page(title, &body))).into_response();
        if let Some(failed) = failed {
            response.extensions_mut().insert(failed);
        }
        response
    }
}

/// A session whose credential died under it (`failure`: invalidated by wrong entries
/// on one of its pages, or its 24 hours over) ends, and the browser goes to the login
/// page, told why and that a new temporary password is set by phone (R-S2, R-S3): the
/// session's holder knew the password, so saying so tells a guesser nothing.
async fn credential_died(state: &SiteState, id: &str, failure: LoginFailure) -> Result<Response, SiteError> {
    state.sessions.remove(id).await?;
    let location = match failure {
        LoginFailure::Invalidated | LoginFailure::Locked => "/login?notice=invalidated",
        LoginFailure::Expired => "/login?notice=expired",
        LoginFailure::Wrong | LoginFailure::Unknown => "/login",
    };
    Ok(with_cookies(redirect(location), [state.set_cookie(&state.session_cookie(), None)]))
}

/// Appends `Set-Cookie` headers to `response`.
fn with_cookies(mut response: Response, cookies: impl IntoIterator<Item = HeaderValue>) -> Response {
    for cookie in cookies {
        response.headers_mut().append(SET_COOKIE, cookie);
    }
    response
}

#[cfg(test)]
mod fax_tests;
#[cfg(test)]
mod settings_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod unit_tests;
