//! The site over HTTP with `oneshot`, a provisioned store and a manual clock.

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::Router;
use chrono::Duration;
use engine::store::AuthUnit;
use tower::ServiceExt;

use super::*;
use crate::testing::{fixture, n, t0, Fixture, ADDITIONAL, CONTRACT, FAX_ONLY, OTHER_LINE};

pub(super) const PASSWORD: &str = "abcd1234";
pub(super) const TEMPORARY: &str = "12345678";

pub(super) struct App {
    pub(super) f: Fixture,
    pub(super) state: SiteState,
    router: Router,
}

pub(super) fn app() -> App {
    app_with_test_mailer(None)
}

/// [`app`] with `admin.password_policy = policy`.
pub(super) fn app_with_policy(policy: engine::config::PasswordPolicy) -> App {
    let f = fixture();
    let state = site_state(&f).with_password_policy(policy);
    App { router: router(state.clone()), state, f }
}

/// [`app`] whose 送信テスト button sends with `mailer` (R-N2).
pub(super) fn app_with_test_mailer(mailer: Option<Arc<TestMailer>>) -> App {
    let f = fixture();
    let state = site_state(&f).with_test_mailer(mailer);
    App { router: router(state.clone()), state, f }
}

/// The site on the fixture's store, its credentials counting lockouts in the site's
/// metrics as `serve` wires them.
fn site_state(f: &Fixture) -> SiteState {
    let metrics = Metrics::new();
    let credentials = f.credentials.clone().counting_in(metrics.clone());
    SiteState::new(f.store.clone(), credentials, f.clock.clone()).with_metrics(metrics)
}

impl App {
    /// One series of the site's metrics, 0 if not shown.
    pub(super) fn metric(&self, series: &str) -> f64 {
        self.state.metrics.value(series).unwrap_or(0.0)
    }
}

pub(super) struct Reply {
    pub(super) status: StatusCode,
    headers: HeaderMap,
    pub(super) body: String,
}

impl Reply {
    pub(super) fn location(&self) -> Option<&str> {
        self.headers.get(LOCATION).map(|v| v.to_str().unwrap())
    }

    /// The whole `Set-Cookie` line for cookie `name`.
    fn set_cookie(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}=");
        self.headers.get_all(SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_owned()).find(|v| v.starts_with(&prefix))
    }

    /// The value `Set-Cookie` gives cookie `name`.
    pub(super) fn cookie_value(&self, name: &str) -> Option<String> {
        let line = self.set_cookie(name)?;
        Some(line[name.len() + 1..].split(';').next().unwrap().to_owned())
    }

    /// The hidden CSRF field of the page's (first) form.
    pub(super) fn csrf(&self) -> String {
        let start = self.body.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
        self.body[start..start + 32].to_owned()
    }
}

pub(super) async fn send(app: &App, request: Request<Body>) -> Reply {
    let response = app.router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    Reply { status, headers, body: String::from_utf8(bytes.to_vec()).unwrap() }
}

pub(super) async fn get(app: &App, uri: &str, cookies: &str) -> Reply {
    send(app, Request::get(uri).header("cookie", cookies).body(Body::empty()).unwrap()).await
}

pub(super) async fn post(app: &App, uri: &str, cookies: &str, form: &str) -> Reply {
    let request = Request::post(uri)
        .header("cookie", cookies)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(form.to_owned()));
    send(app, request.unwrap()).await
}

/// The login form's CSRF token, as cookie and field.
async fn login_token(app: &App) -> String {
    let page = get(app, "/login", "").await;
    let token = page.cookie_value(CSRF_COOKIE).expect("a pre-session CSRF cookie");
    assert_eq!(page.csrf(), token);
    token
}

async fn login_with(app: &App, token: &str, extra_cookies: &str, number: &str, password: &str) -> Reply {
    let cookies = format!("{CSRF_COOKIE}={token}{extra_cookies}");
    post(app, "/login", &cookies, &format!("number={number}&password={password}&csrf={token}")).await
}

pub(super) async fn login(app: &App, number: &str, password: &str) -> Reply {
    let token = login_token(app).await;
    login_with(app, &token, "", number, password).await
}

/// Logs in and returns the `Cookie` header of the new session.
pub(super) async fn logged_in(app: &App, number: &str, password: &str) -> String {
    let reply = login(app, number, password).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    format!("{SESSION_COOKIE}={}", reply.cookie_value(SESSION_COOKIE).unwrap())
}

#[tokio::test]
async fn r_s1_login_sets_an_httponly_strict_session_cookie_with_a_new_id() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let token = login_token(&app).await;

    let reply = login_with(&app, &token, "", CONTRACT, PASSWORD).await;
    assert_eq!((reply.status, reply.location()), (StatusCode::SEE_OTHER, Some("/")));
    let line = reply.set_cookie(SESSION_COOKIE).unwrap();
    assert!(line.contains("; HttpOnly") && line.contains("; SameSite=Strict") && line.contains("; Path=/"), "{line}");
    assert!(!line.contains("Secure"), "no TLS yet: {line}");
    let first = reply.cookie_value(SESSION_COOKIE).unwrap();
    assert_ne!(first, token, "the session id is not the pre-login token");
    assert_eq!(reply.set_cookie(CSRF_COOKIE), None, "the login form's token stays for other login tabs");
    let menu = get(&app, "/", &format!("{SESSION_COOKIE}={first}")).await;
    assert_eq!(menu.status, StatusCode::OK);
    assert!(menu.body.contains("メニュー") && menu.body.contains("ログアウト"));
    assert!(menu.body.contains("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"));

    // Logging in again from a browser holding a session: a new id, the old one ends.
    let again = login_with(&app, &token, &format!("; {SESSION_COOKIE}={first}"), CONTRACT, PASSWORD).await;
    let second = again.cookie_value(SESSION_COOKIE).unwrap();
    assert_ne!(first, second);
    assert_eq!(get(&app, "/", &format!("{SESSION_COOKIE}={first}")).await.location(), Some("/login?notice=ended"));
    assert_eq!(get(&app, "/", &format!("{SESSION_COOKIE}={second}")).await.status, StatusCode::OK);
    assert_eq!(app.state.sessions().len(), 1);
}

#[tokio::test]
async fn r_s1_every_login_failure_gets_the_same_status_and_body() {
    let app = app();
    let c = &app.f.credentials;
    // Wrong password: CONTRACT has a password. Unknown: OTHER_LINE has no credential.
    c.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    // Locked: three wrong temporary passwords (R-S2).
    c.set_temporary_async(n(ADDITIONAL), TEMPORARY.into(), t0()).await.unwrap();
    for _ in 0..3 {
        c.verify_async(n(ADDITIONAL), "00000000".into(), t0()).await.unwrap().unwrap_err();
    }
    // Expired: a temporary password set 25 hours ago (R-I8).
    c.set_temporary_async(n(FAX_ONLY), TEMPORARY.into(), t0() - Duration::hours(25)).await.unwrap();

    let token = login_token(&app).await;
    let attempts = [
        (OTHER_LINE, TEMPORARY),
        (CONTRACT, "wrong123"),
        (ADDITIONAL, TEMPORARY),
        (FAX_ONLY, TEMPORARY),
        ("03-1234", PASSWORD),
    ];
    let mut replies = Vec::new();
    for (number, password) in attempts {
        let reply = login_with(&app, &token, "", number, password).await;
        assert!(reply.set_cookie(SESSION_COOKIE).is_none(), "{number}");
        // The page keeps the number as typed, whatever the failure; apart from it, the
        // same bytes.
        let typed = format!("value=\"{}\"", html::escape(number));
        assert!(reply.body.contains(&typed), "{number}: the number is kept");
        replies.push((number, reply.status, reply.body.replace(&typed, "value=\"\"")));
    }
    let (_, status, body) = &replies[0];
    assert_eq!(*status, StatusCode::OK);
    assert!(body.contains(login::FAILURE_MESSAGE));
    for (number, other_status, other_body) in &replies[1..] {
        assert_eq!((other_status, other_body), (status, body), "{number}");
    }
    assert!(app.state.sessions().is_empty());
}

#[tokio::test]
async fn r_s2_three_wrong_temporary_passwords_then_the_right_one_fails() {
    let app = app();
    app.f.credentials.set_temporary_async(n(CONTRACT), TEMPORARY.into(), t0()).await.unwrap();
    for _ in 0..3 {
        let reply = login(&app, CONTRACT, "87654321").await;
        assert!(reply.body.contains(login::FAILURE_MESSAGE));
    }
    let reply = login(&app, CONTRACT, TEMPORARY).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.contains(login::FAILURE_MESSAGE));
    assert!(reply.set_cookie(SESSION_COOKIE).is_none());

    // What the operator's dashboard shows of it: three wrong, one lockout by R-S2, the
    // right password then refused as locked.
    assert_eq!(app.metric(r#"callnotify_site_logins_total{result="wrong"}"#), 3.0);
    assert_eq!(app.metric(r#"callnotify_site_lockouts_total{rule="r_s2_temporary_password"}"#), 1.0);
    assert_eq!(app.metric(r#"callnotify_site_lockouts_total{rule="r_s3_password"}"#), 0.0);
    assert_eq!(app.metric(r#"callnotify_site_logins_total{result="locked"}"#), 1.0);
    assert_eq!(app.metric(r#"callnotify_site_logins_total{result="ok"}"#), 0.0);
}

#[tokio::test]
async fn r_s4_a_temporary_password_login_must_change_the_password_first() {
    let app = app();
    app.f.credentials.set_temporary_async(n(CONTRACT), TEMPORARY.into(), t0()).await.unwrap();
    let reply = login(&app, CONTRACT, TEMPORARY).await;
    assert_eq!(reply.location(), Some("/password"));
    let cookies = format!("{SESSION_COOKIE}={}", reply.cookie_value(SESSION_COOKIE).unwrap());
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/password"));

    let page = get(&app, "/password", &cookies).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("現在のパスワード") && page.body.contains("新しいパスワード（確認）"));
    let csrf = page.csrf();
    // R-S5 refusals are shown on the page and change nothing.
    let form = |new: &str, confirm: &str| format!("current={TEMPORARY}&new={new}&confirm={confirm}&csrf={csrf}");
    let refused = post(&app, "/password", &cookies, &form("87654321", "87654321")).await;
    assert_eq!(refused.status, StatusCode::OK);
    assert!(refused.body.contains("英字を1文字以上"), "{}", refused.body);
    let refused = post(&app, "/password", &cookies, &form(PASSWORD, "abcd12345")).await;
    assert!(refused.body.contains("一致しません"), "{}", refused.body);
    let wrong_current = format!("current=00000000&new={PASSWORD}&confirm={PASSWORD}&csrf={csrf}");
    let refused = post(&app, "/password", &cookies, &wrong_current).await;
    assert!(refused.body.contains("現在のパスワードが正しくありません"), "{}", refused.body);

    let changed = post(&app, "/password", &cookies, &form(PASSWORD, PASSWORD)).await;
    assert_eq!(changed.location(), Some("/?notice=password"));
    let renewed = format!("{SESSION_COOKIE}={}", changed.cookie_value(SESSION_COOKIE).unwrap());
    assert_ne!(renewed, cookies, "a new session id after the change");
    assert_eq!(get(&app, "/", &renewed).await.status, StatusCode::OK);
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));
    let reply = login(&app, CONTRACT, PASSWORD).await;
    assert_eq!(reply.location(), Some("/"), "the new password logs in without a forced change");
}

#[tokio::test]
async fn r_s4_a_password_older_than_60_days_must_be_changed_first() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0() - Duration::days(61)).await.unwrap();
    let reply = login(&app, CONTRACT, PASSWORD).await;
    assert_eq!(reply.location(), Some("/password"));
}

/// Logs in under `unit` and checks the session survives `idle - 1s` twice but not `idle`.
async fn assert_idle_timeout(unit: AuthUnit, number: &str, idle: Duration) {
    let app = app();
    app.f.store.set_line_unit(&n(CONTRACT), unit).unwrap();
    app.f.credentials.set_password_async(n(number), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, number, PASSWORD).await;
    for _ in 0..2 {
        app.f.clock.advance(idle - Duration::seconds(1));
        assert_eq!(get(&app, "/", &cookies).await.status, StatusCode::OK, "{unit:?}");
    }
    app.f.clock.advance(idle);
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"), "{unit:?}");
    assert!(app.state.sessions().is_empty());
}

#[tokio::test]
async fn r_s7_idle_timeout_is_10_minutes_for_the_line_unit() {
    assert_idle_timeout(AuthUnit::Line, CONTRACT, Duration::minutes(10)).await;
    assert_idle_timeout(AuthUnit::AdminUser, CONTRACT, Duration::minutes(10)).await;
}

#[tokio::test]
async fn r_s7_idle_timeout_is_30_minutes_for_the_number_unit() {
    assert_idle_timeout(AuthUnit::Number, ADDITIONAL, Duration::minutes(30)).await;
    assert_idle_timeout(AuthUnit::AdminUser, ADDITIONAL, Duration::minutes(30)).await;
}

#[tokio::test]
async fn r_o4_r_s7_logout_ends_the_session_server_side() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    let csrf = get(&app, "/", &cookies).await.csrf();

    let refused = post(&app, "/logout", &cookies, "").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(app.state.sessions().len(), 1, "no logout without the token");

    let reply = post(&app, "/logout", &cookies, &format!("csrf={csrf}")).await;
    assert_eq!(reply.location(), Some("/login?notice=logout"));
    assert!(reply.set_cookie(SESSION_COOKIE).unwrap().contains("Max-Age=0"));
    assert!(app.state.sessions().is_empty());
    // The browser might keep the cookie; the server no longer knows it.
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));
    assert_eq!(get(&app, "/password", &cookies).await.location(), Some("/login?notice=ended"));
}

#[tokio::test]
async fn csrf_missing_or_wrong_is_403_on_post_login_and_post_password() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let token = login_token(&app).await;
    let credentials = format!("number={CONTRACT}&password={PASSWORD}");
    let attempts = [
        (format!("{CSRF_COOKIE}={token}"), credentials.clone()),
        (format!("{CSRF_COOKIE}={token}"), format!("{credentials}&csrf={}", csrf::new_token())),
        (String::new(), format!("{credentials}&csrf={token}")),
        (format!("{CSRF_COOKIE}="), format!("{credentials}&csrf=")),
    ];
    for (cookies, form) in attempts {
        let reply = post(&app, "/login", &cookies, &form).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{cookies} {form}");
        assert!(reply.body.contains("不正なリクエストです。"));
        assert!(reply.set_cookie(SESSION_COOKIE).is_none());
    }
    assert!(app.state.sessions().is_empty());

    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    let change = format!("current={PASSWORD}&new=efgh5678&confirm=efgh5678");
    for form in [change.clone(), format!("{change}&csrf={token}")] {
        let reply = post(&app, "/password", &cookies, &form).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{form}");
    }
    assert_eq!(login(&app, CONTRACT, PASSWORD).await.location(), Some("/"), "the password is unchanged");
}

#[tokio::test]
async fn security_headers_are_on_every_site_response() {
    let app = app();
    let replies = [
        get(&app, "/login", "").await,
        get(&app, "/", "").await,
        post(&app, "/login", "", "").await,
        get(&app, "/logout", "").await,
    ];
    for reply in replies {
        let h = &reply.headers;
        assert_eq!(
            h["content-security-policy"],
            "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
            "{}",
            reply.status
        );
        assert_eq!(h["x-frame-options"], "DENY", "browsers without frame-ancestors");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert_eq!(h["cache-control"], "no-store");
    }
}

/// An address whose parts do not decode got axum's English plain text naming the
/// route's parameter ("Invalid URL: Invalid UTF-8 in `number`"): it is a page not found.
#[tokio::test]
async fn an_address_that_does_not_decode_is_a_page_not_found() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    for path in ["/numbers/%FF/call", "/fax/%FF/1/2", "/numbers/%C3%28/faxes"] {
        for session in ["", cookies.as_str()] {
            let reply = get(&app, path, session).await;
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
            assert!(reply.body.contains("お探しのページは見つかりませんでした。"), "{path}: {}", reply.body);
            assert!(!reply.body.contains("Invalid"), "{path}");
        }
    }
}

#[tokio::test]
async fn r_s8_secure_sites_use_host_prefixed_secure_cookies() {
    let f = fixture();
    f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let state = SiteState::new(f.store.clone(), f.credentials.clone(), f.clock.clone()).with_secure(true);
    let app = App { router: router(state.clone()), state, f };
    let page = get(&app, "/login", "").await;
    let name = format!("__Host-{CSRF_COOKIE}");
    let token = page.cookie_value(&name).unwrap();
    assert!(page.set_cookie(&name).unwrap().contains("; Secure"));
    let form = format!("number={CONTRACT}&password={PASSWORD}&csrf={token}");
    let reply = post(&app, "/login", &format!("{name}={token}"), &form).await;
    let session = reply.set_cookie(&format!("__Host-{SESSION_COOKIE}")).unwrap();
    assert!(session.contains("; Secure") && session.contains("; HttpOnly"), "{session}");
}

/// A passphrase of 40 characters with spaces (ASVS policy).
const PASSPHRASE: &str = "the quick brown fox jumps over lazy dogs";

#[tokio::test]
async fn asvs_policy_a_password_older_than_60_days_does_not_force_a_change() {
    use engine::config::PasswordPolicy;
    let app = app_with_policy(PasswordPolicy::Asvs);
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0() - Duration::days(61)).await.unwrap();
    let reply = login(&app, CONTRACT, PASSWORD).await;
    assert_eq!(reply.location(), Some("/"), "no forced expiry under ASVS");
    let cookies = format!("{SESSION_COOKIE}={}", reply.cookie_value(SESSION_COOKIE).unwrap());
    assert_eq!(get(&app, "/", &cookies).await.status, StatusCode::OK);

    // A temporary password still forces the change (R-S4).
    app.f.credentials.set_temporary_async(n(ADDITIONAL), TEMPORARY.into(), t0()).await.unwrap();
    assert_eq!(login(&app, ADDITIONAL, TEMPORARY).await.location(), Some("/password"));
}

#[tokio::test]
async fn asvs_policy_accepts_a_40_character_passphrase_with_spaces() {
    use engine::config::PasswordPolicy;
    assert_eq!(PASSPHRASE.chars().count(), 40);
    let encoded = PASSPHRASE.replace(' ', "+");

    // The seed policy (R-S5) refuses it.
    let seed = app();
    seed.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&seed, CONTRACT, PASSWORD).await;
    let csrf = get(&seed, "/password", &cookies).await.csrf();
    let form = format!("current={PASSWORD}&new={encoded}&confirm={encoded}&csrf={csrf}");
    let refused = post(&seed, "/password", &cookies, &form).await;
    assert_eq!(refused.status, StatusCode::OK);
    assert!(refused.body.contains("半角英数字"), "{}", refused.body);

    let app = app_with_policy(PasswordPolicy::Asvs);
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    let page = get(&app, "/password", &cookies).await;
    assert!(page.body.contains("maxlength=\"64\"") && !page.body.contains("pattern="), "{}", page.body);
    let csrf = page.csrf();
    let form = format!("current={PASSWORD}&new={encoded}&confirm={encoded}&csrf={csrf}");
    let changed = post(&app, "/password", &cookies, &form).await;
    assert_eq!(changed.location(), Some("/?notice=password"), "{}", changed.body);
    let login_page = get(&app, "/login", "").await;
    let max = maxlength(&login_page.body, "password");
    assert!(max.is_some_and(|max| max >= 64), "the login form takes the passphrase: {max:?}");
    assert_eq!(login(&app, CONTRACT, &encoded).await.location(), Some("/"));
    let record = app.f.credentials.record(&n(CONTRACT)).unwrap().unwrap();
    assert_eq!(record.kind, crate::credentials::CredentialKind::Password);
}

#[tokio::test]
async fn r_o1_a_password_change_needs_the_current_password_and_the_new_one_twice() {
    const NEW: &str = "wxyz9876";
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    let change = |current: &str, new: &str, confirm: &str| {
        let (app, cookies) = (&app, cookies.clone());
        let form = format!("current={current}&new={new}&confirm={confirm}");
        async move {
            let csrf = get(app, "/password", &cookies).await.csrf();
            post(app, "/password", &cookies, &format!("{form}&csrf={csrf}")).await
        }
    };

    let wrong_current = change("abcd9999", NEW, NEW).await;
    assert_eq!(wrong_current.location(), None, "not changed without the current password");
    let mismatch = change(PASSWORD, NEW, "wxyz9875").await;
    assert_eq!(mismatch.location(), None, "not changed unless typed twice the same");
    assert_eq!(login(&app, CONTRACT, PASSWORD).await.location(), Some("/"), "the old password still works");

    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    let csrf = get(&app, "/password", &cookies).await.csrf();
    let changed =
        post(&app, "/password", &cookies, &format!("current={PASSWORD}&new={NEW}&confirm={NEW}&csrf={csrf}")).await;
    assert_eq!(changed.location(), Some("/?notice=password"));
    let confirmed = get(&app, "/?notice=password", &changed_cookies(&changed)).await;
    assert!(confirmed.body.contains("パスワードを変更しました。"), "a confirmation: {}", confirmed.body);
    assert_ne!(login(&app, CONTRACT, PASSWORD).await.location(), Some("/"), "the old password is gone");
    assert_eq!(login(&app, CONTRACT, NEW).await.location(), Some("/"));
}

/// R-S7, R-S9: ログアウト in a tab opened before a change of password in another tab
/// logs out; in one opened before a new login in another tab, the subscriber is asked
/// once more on a form of the current session, and that logs out. Both answered 403
/// 「不正なリクエストです」 and left the new session logged in.
#[tokio::test]
async fn r_s7_logout_from_a_tab_opened_before_a_password_change_or_a_new_login_logs_out() {
    const NEW: &str = "wxyz9876";
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    let old_tab = get(&app, "/", &cookies).await.csrf();
    let csrf = get(&app, "/password", &cookies).await.csrf();
    let changed =
        post(&app, "/password", &cookies, &format!("current={PASSWORD}&new={NEW}&confirm={NEW}&csrf={csrf}")).await;
    let cookies = changed_cookies(&changed);
    let out = post(&app, "/logout", &cookies, &format!("csrf={old_tab}")).await;
    assert_eq!(out.location(), Some("/login?notice=logout"), "{}", out.body);
    let said = get(&app, "/login?notice=logout", "").await;
    assert!(said.body.contains("ログアウトしました。"), "a subscriber on a shared PC is told: {}", said.body);
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));

    let first = logged_in(&app, CONTRACT, NEW).await;
    let old_tab = get(&app, "/", &first).await.csrf();
    let cookies = logged_in(&app, CONTRACT, NEW).await;
    let asked = post(&app, "/logout", &cookies, &format!("csrf={old_tab}")).await;
    assert_eq!(asked.status, StatusCode::FORBIDDEN);
    assert!(asked.body.contains("ログアウトするには"), "{}", asked.body);
    assert_eq!(get(&app, "/", &cookies).await.status, StatusCode::OK, "not logged out by a stale token");
    let out = post(&app, "/logout", &cookies, &format!("csrf={}", asked.csrf())).await;
    assert_eq!(out.location(), Some("/login?notice=logout"));
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));
}

/// R-A1 (the manual's ※1 on the login step): a line-unit subscriber whose service is on
/// an additional number logs in with the contract number, and the login page says so.
/// It did not: they typed the additional number, were refused as a wrong password, and
/// braked after five tries.
#[tokio::test]
async fn r_a1_the_login_page_says_line_unit_subscribers_log_in_with_the_contract_number() {
    let page = get(&app(), "/login", "").await;
    assert!(page.body.contains("「回線単位」で、追加番号に本サービスを契約されている場合は"), "{}", page.body);
    assert!(page.body.contains("お客さま電話番号（契約番号）を入力してください"), "{}", page.body);
}

/// R-S9: two login tabs (two fax mails' links opened, say): logged in with the first,
/// the second still logs in; and the token's cookie goes with a link followed from a
/// mail (`SameSite=Lax`), so a login page opened that way reuses it. The second tab's
/// login was refused 403 「不正なリクエスト」, what was typed and the fax lost.
#[tokio::test]
async fn r_s9_a_second_login_tab_still_logs_in() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let page = get(&app, "/login", "").await;
    let cookie = page.set_cookie(CSRF_COOKIE).unwrap();
    assert!(cookie.contains("; SameSite=Lax"), "{cookie}");
    let token = page.csrf();
    let first = login_with(&app, &token, "", CONTRACT, PASSWORD).await;
    assert_eq!(first.location(), Some("/"));
    // The browser's cookies after the first login, as it keeps them.
    let mut jar = vec![changed_cookies(&first)];
    if first.set_cookie(CSRF_COOKIE).is_none_or(|set| !set.contains("Max-Age=0")) {
        jar.push(format!("{CSRF_COOKIE}={token}"));
    }
    let form = format!("number={CONTRACT}&password={PASSWORD}&csrf={token}");
    let second = post(&app, "/login", &jar.join("; "), &form).await;
    assert_eq!((second.status, second.location()), (StatusCode::SEE_OTHER, Some("/")), "{}", second.body);
    assert!(second.set_cookie(SESSION_COOKIE).unwrap().contains("; SameSite=Strict"));
}

/// The `Cookie` header of the session a reply set.
fn changed_cookies(reply: &Reply) -> String {
    format!("{SESSION_COOKIE}={}", reply.cookie_value(SESSION_COOKIE).unwrap())
}

/// Keys `entries` on the temporary-password line as `caller`; the last step.
fn phone(app: &App, caller: &str, entries: &[&str]) -> crate::ivr::Step {
    let (mut call, mut step) = crate::ivr::Call::start(&app.f.ivr, caller).unwrap();
    for keys in entries {
        step = call.input(keys).unwrap();
    }
    step
}

/// R-I7, R-S7: a new temporary password set by phone replaces the number's credential,
/// and the browsers logged in with the old one are logged out (they stayed in, up to
/// 12 hours: a subscriber resetting a password someone else knew did not lock them out).
#[tokio::test]
async fn r_i7_a_temporary_password_by_phone_ends_the_sessions_of_the_old_credential() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    assert_eq!(get(&app, "/", &cookies).await.status, StatusCode::OK);

    let done = phone(&app, CONTRACT, &["1", TEMPORARY, TEMPORARY]);
    assert!(done.ends);
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));
    assert!(app.state.sessions().is_empty());
}

/// R-I7 with R-O2: on a number-unit line an additional number keys 1 (line unit); the
/// contract number gets the temporary password, and the additional number's own
/// password, which now would list every number of the line, no longer logs in, nor does
/// its open session go on.
#[tokio::test]
async fn r_i7_r_o2_a_change_to_line_unit_by_phone_ends_the_other_numbers_passwords() {
    let app = app();
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::Number).unwrap();
    app.f.credentials.set_password_async(n(ADDITIONAL), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, ADDITIONAL, PASSWORD).await;

    phone(&app, ADDITIONAL, &["1", TEMPORARY, TEMPORARY]);
    assert_eq!(app.f.store.line(&n(CONTRACT)).unwrap().unwrap().unit, Some(AuthUnit::Line));
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));
    assert_eq!(login(&app, ADDITIONAL, PASSWORD).await.status, StatusCode::OK, "the login page again: refused");
    assert!(app.f.credentials.record(&n(ADDITIONAL)).unwrap().is_none());
    // The line logs in with the contract number's temporary password (R-A1).
    assert_eq!(login(&app, CONTRACT, TEMPORARY).await.location(), Some("/password"));
}

/// R-S3: a password invalidated by ten wrong logins made elsewhere (another browser, a
/// guesser) while its subscriber is logged in ends their session, and the login page
/// says it is invalidated and to set a temporary password by phone. It said they had
/// been idle or the password changed, and to log in again, which could never work.
#[tokio::test]
async fn r_s3_a_password_invalidated_elsewhere_ends_the_session_saying_so() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    for i in 0..10 {
        login_from(&app, &format!("198.51.100.{i}"), CONTRACT, "wrong-one-1").await;
    }
    assert!(app.f.credentials.record(&n(CONTRACT)).unwrap().unwrap().invalidated);
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=invalidated"));
    assert!(app.state.sessions().is_empty(), "the session ended");
}

/// R-S2, R-S4: logged in with a temporary password, the subscriber types a wrong current
/// password on the forced change three times. The third invalidates it: they were told
/// only 「現在のパスワードが正しくありません」, and the next submit said they had been
/// idle. Now the third ends the session and the login page says why and what to do.
#[tokio::test]
async fn r_s2_a_temporary_password_invalidated_on_the_password_page_is_said_so() {
    let app = app();
    app.f.credentials.set_temporary_async(n(CONTRACT), TEMPORARY.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, TEMPORARY).await;
    let mut last = None;
    for _ in 0..3 {
        let csrf = get(&app, "/password", &cookies).await.csrf();
        let form = format!("current=87654321&new=wxyz9876&confirm=wxyz9876&csrf={csrf}");
        last = Some(post(&app, "/password", &cookies, &form).await);
    }
    let invalidated = last.unwrap();
    assert_eq!(invalidated.location(), Some("/login?notice=invalidated"));
    let page = get(&app, "/login?notice=invalidated", "").await;
    assert!(page.body.contains("無効になりました") && page.body.contains("仮パスワード設定ダイヤル"), "{}", page.body);
    assert!(app.state.sessions().is_empty(), "the session ended");
}

/// R-S2, R-I8: a temporary password whose 24 hours run out while its session is on the
/// password page ends the session, and the login page says why and that a new one is
/// set by phone. It led to the login page with nothing said, where the next login was
/// refused as a wrong number or password.
#[tokio::test]
async fn r_s2_a_temporary_password_expiring_on_the_password_page_is_said_so() {
    let app = app();
    let set_at = t0() - Duration::hours(24) + Duration::minutes(1);
    app.f.credentials.set_temporary_async(n(CONTRACT), TEMPORARY.into(), set_at).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, TEMPORARY).await;
    let csrf = get(&app, "/password", &cookies).await.csrf();
    app.f.clock.advance(Duration::minutes(2));
    let form = format!("current={TEMPORARY}&new=wxyz9876&confirm=wxyz9876&csrf={csrf}");
    let expired = post(&app, "/password", &cookies, &form).await;
    assert_eq!(expired.location(), Some("/login?notice=expired"));
    let page = get(&app, "/login?notice=expired", "").await;
    assert!(
        page.body.contains("有効期限（24時間）") && page.body.contains("仮パスワード設定ダイヤル"),
        "{}",
        page.body
    );
    assert!(app.state.sessions().is_empty(), "the session ended");
}

/// R-S7, R-A3, docs/site.md ("a unit change ends them"): on a number-unit line the
/// contract holder is logged in (their number only, 30 minutes idle); an additional
/// number keys 3 (admin/user). The contract number keeps its credential, but its
/// session went on as it was, now the administrator's of every number, still with 30
/// minutes idle instead of 10. Every session of the line ends, as a unit change on the
/// site does.
#[tokio::test]
async fn r_s7_a_change_to_admin_user_unit_by_phone_ends_the_sessions_of_the_line() {
    let app = app();
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::Number).unwrap();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;

    assert!(phone(&app, ADDITIONAL, &["3", TEMPORARY, TEMPORARY]).ends);
    assert_eq!(app.f.store.line(&n(CONTRACT)).unwrap().unwrap().unit, Some(AuthUnit::AdminUser));
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));
    // The administrator logs in again, under the new unit's rules.
    assert_eq!(login(&app, CONTRACT, PASSWORD).await.location(), Some("/"));
}

/// R-A3: on an admin_user line a user (an additional number) may set only their own
/// password by phone. Keying 1 or 2 set the administrator's credential and gave the user
/// every number of the line; now it is an invalid entry and nothing changes.
#[tokio::test]
async fn r_a3_a_user_cannot_take_the_administrators_credential_by_phone() {
    let app = app();
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::AdminUser).unwrap();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    for key in ["1", "2"] {
        let step = phone(&app, ADDITIONAL, &[key]);
        assert_eq!(step.prompt.map(|p| p.id), Some(crate::ivr::PromptId::Invalid), "{key}");
    }
    assert_eq!(app.f.credentials.record(&n(CONTRACT)).unwrap().unwrap().kind, CredentialKind::Password);
    assert_eq!(app.f.store.line(&n(CONTRACT)).unwrap().unwrap().unit, Some(AuthUnit::AdminUser));
    // The user's own password still comes by keying 3.
    assert!(phone(&app, ADDITIONAL, &["3", TEMPORARY, TEMPORARY]).ends);
    assert_eq!(app.f.credentials.record(&n(ADDITIONAL)).unwrap().unwrap().kind, CredentialKind::Temporary);
}

/// R-M3, R-L3: a number the operator moves to another contract (listed there directly,
/// or removed from its line and provisioned again later) arrives with nothing of its
/// previous subscriber: the old password neither logs in nor keeps a session, and the
/// old destinations are gone, so the new subscriber's calls never reach the old
/// subscriber's addresses. The import reports the move.
#[tokio::test]
async fn r_m3_a_number_moved_to_another_contract_keeps_no_password_session_or_destination() {
    let import = |app: &App, jsonl: &str| engine::provision::import(&app.f.store, jsonl.as_bytes()).unwrap();
    let old_owner = r#"{"contract":"0312345678","numbers":[{"number":"0312345678","services":["call"]},{"number":"0312345679","services":["call"],"settings":{"enabled":true,"destinations":[{"address":"old-owner@example.jp","send":true}]}}]}"#;
    let moved_line = r#"{"contract":"0398765432","numbers":[{"number":"0398765432","services":["call"]},{"number":"0312345679","services":["call"]}]}"#;
    let without = r#"{"contract":"0312345678","numbers":[{"number":"0312345678","services":["call"]}]}"#;

    // Listed under the other contract directly.
    let app = app();
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::Number).unwrap();
    import(&app, old_owner);
    app.f.credentials.set_password_async(n(ADDITIONAL), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, ADDITIONAL, PASSWORD).await;
    let report = import(&app, moved_line);
    assert_eq!(report.moved, [(1, n(ADDITIONAL), n(CONTRACT))]);
    let record = app.f.store.number(&n(ADDITIONAL)).unwrap().unwrap();
    assert_eq!(record.contract, n(OTHER_LINE));
    assert!(record.call.destinations.is_empty() && !record.call.enabled, "{:?}", record.call);
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));
    assert_eq!(login(&app, ADDITIONAL, PASSWORD).await.status, StatusCode::OK, "refused");

    // Removed from its line, provisioned to another later.
    let app = self::app();
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::Number).unwrap();
    import(&app, old_owner);
    app.f.credentials.set_password_async(n(ADDITIONAL), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, ADDITIONAL, PASSWORD).await;
    import(&app, without);
    assert!(app.f.credentials.record(&n(ADDITIONAL)).unwrap().is_none());
    import(&app, moved_line);
    assert_eq!(login(&app, ADDITIONAL, PASSWORD).await.status, StatusCode::OK, "refused");
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));
    assert!(app.f.store.number(&n(ADDITIONAL)).unwrap().unwrap().call.destinations.is_empty());
}

/// R-A1, R-A2, R-L3: a number-unit line's additional number has a password of its own;
/// the operator imports the line with `"unit":"line"` (an older export, say). That
/// password logged in and reached every number of the line, the contract number's
/// destinations too. A unit changed by provisioning now removes the credentials the new
/// unit does not use, as a change by phone or on the site does.
#[tokio::test]
async fn r_a1_a_line_provisioned_to_line_unit_keeps_no_additional_number_s_password() {
    let app = app();
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::Number).unwrap();
    app.f.credentials.set_password_async(n(ADDITIONAL), PASSWORD.into(), t0()).await.unwrap();
    app.f.credentials.set_password_async(n(CONTRACT), "abcd5678".into(), t0()).await.unwrap();
    let cookies = logged_in(&app, ADDITIONAL, PASSWORD).await;

    let line_unit = r#"{"contract":"0312345678","unit":"line","numbers":[{"number":"0312345678","services":["call"]},{"number":"0312345679","services":["call"]},{"number":"0312345670","services":["fax"]}]}"#;
    let report = engine::provision::import(&app.f.store, line_unit.as_bytes()).unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(app.f.store.line(&n(CONTRACT)).unwrap().unwrap().unit, Some(AuthUnit::Line));
    assert!(app.f.credentials.record(&n(ADDITIONAL)).unwrap().is_none());
    assert_eq!(login(&app, ADDITIONAL, PASSWORD).await.status, StatusCode::OK, "the login page again: refused");
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));
    // The line logs in with the contract number's password, which stays (R-A1).
    assert_eq!(login(&app, CONTRACT, "abcd5678").await.location(), Some("/"));
    // Imported again unchanged, nothing more is removed.
    engine::provision::import(&app.f.store, line_unit.as_bytes()).unwrap();
    assert!(app.f.credentials.record(&n(CONTRACT)).unwrap().is_some());

    // To admin_user: the users' passwords reach their own numbers only, and stay; from
    // there to number, the additional numbers' go (as on the site, R-O3).
    let with_unit = |unit: &str| line_unit.replace(r#""unit":"line""#, &format!(r#""unit":"{unit}""#));
    engine::provision::import(&app.f.store, with_unit("admin_user").as_bytes()).unwrap();
    app.f.credentials.set_password_async(n(ADDITIONAL), PASSWORD.into(), t0()).await.unwrap();
    engine::provision::import(&app.f.store, with_unit("admin_user").as_bytes()).unwrap();
    assert!(app.f.credentials.record(&n(ADDITIONAL)).unwrap().is_some(), "a user's password stays");
    engine::provision::import(&app.f.store, with_unit("number").as_bytes()).unwrap();
    assert!(app.f.credentials.record(&n(ADDITIONAL)).unwrap().is_none());
    assert!(app.f.credentials.record(&n(CONTRACT)).unwrap().is_some(), "the contract number's stays");
}

/// R-S7: a unit the operator changes by provisioning ends the line's open sessions, as a
/// change by phone does. The contract number's session, logged in under the number unit,
/// went on with the whole line in reach and the number unit's idle timeout.
#[tokio::test]
async fn r_s7_a_unit_changed_by_provisioning_ends_the_line_s_sessions() {
    let app = app();
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::Number).unwrap();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    let line = |unit: &str| {
        format!(
            r#"{{"contract":"0312345678","unit":"{unit}","numbers":[{{"number":"0312345678","services":["call"]}},{{"number":"0312345679","services":["call"]}},{{"number":"0312345670","services":["fax"]}}]}}"#
        )
    };
    engine::provision::import(&app.f.store, line("number").as_bytes()).unwrap();
    assert_eq!(get(&app, "/", &cookies).await.status, StatusCode::OK, "the same unit: the session goes on");
    engine::provision::import(&app.f.store, line("line").as_bytes()).unwrap();
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));
    assert!(app.state.sessions().is_empty());
    assert_eq!(login(&app, CONTRACT, PASSWORD).await.location(), Some("/"), "the password stays (R-A1)");
}

/// Behind the TLS proxy the brake's address is the last one the proxy added to
/// `X-Forwarded-For`, with a port or without; a request without a usable one is braked
/// under the proxy's own address. Those had no address: their logins went unbraked.
#[tokio::test]
async fn behind_the_proxy_every_login_has_an_address_to_brake() {
    let state = app().state.clone().with_proxy(true, &["10.0.0.1".parse().unwrap()]);
    let proxy: std::net::SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let forwarded = |v: &str| {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-forwarded-for", v.parse().unwrap());
        state.client(Some(proxy), &headers)
    };
    assert_eq!(forwarded("192.0.2.9, 198.51.100.7"), Some("198.51.100.7".parse().unwrap()));
    assert_eq!(forwarded("198.51.100.7:41234"), Some("198.51.100.7".parse().unwrap()));
    assert_eq!(forwarded("[2001:db8::7]:41234"), Some("2001:db8::7".parse().unwrap()));
    assert_eq!(forwarded("unknown"), Some(proxy.ip()));
    assert_eq!(state.client(Some(proxy), &axum::http::HeaderMap::new()), Some(proxy.ip()));
}

/// With `admin.behind_tls_proxy`, a client that reaches the site directly (not
/// through the proxy) wrote itself a fresh `X-Forwarded-For` per login and was never
/// braked: the header now counts only from loopback and `admin.proxy_addresses`.
#[tokio::test]
async fn behind_the_proxy_a_client_reaching_the_site_directly_cannot_name_its_address() {
    let state = app().state.clone().with_proxy(true, &["10.0.0.1".parse().unwrap()]);
    let mut headers = axum::http::HeaderMap::new();
    headers.insert("x-forwarded-for", "198.51.100.7".parse().unwrap());
    let direct: std::net::SocketAddr = "203.0.113.5:5000".parse().unwrap();
    assert_eq!(state.client(Some(direct), &headers), Some(direct.ip()));
    let local: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
    assert_eq!(state.client(Some(local), &headers), Some("198.51.100.7".parse().unwrap()), "a proxy on this host");
    // A dual-stack listener sees the IPv4 proxy as ::ffff:10.0.0.1.
    let mapped: std::net::SocketAddr = "[::ffff:10.0.0.1]:5000".parse().unwrap();
    assert_eq!(state.client(Some(mapped), &headers), Some("198.51.100.7".parse().unwrap()), "the proxy, mapped");
}

/// A load balancer whose machines come and go is named by its subnet
/// (`admin.proxy_addresses = ["10.0.4.0/24"]`): each of its machines is a proxy, and a
/// client outside it still cannot name its address.
#[tokio::test]
async fn behind_the_proxy_its_machines_are_named_by_their_subnet() {
    let state = app().state.clone().with_proxy(true, &["10.0.4.0/24".parse().unwrap()]);
    let mut headers = axum::http::HeaderMap::new();
    headers.insert("x-forwarded-for", "198.51.100.7".parse().unwrap());
    for proxy in ["10.0.4.1:5000", "10.0.4.200:5000", "[::ffff:10.0.4.9]:5000"] {
        let proxy: std::net::SocketAddr = proxy.parse().unwrap();
        assert_eq!(state.client(Some(proxy), &headers), Some("198.51.100.7".parse().unwrap()), "{proxy}");
    }
    let outside: std::net::SocketAddr = "10.0.5.1:5000".parse().unwrap();
    assert_eq!(state.client(Some(outside), &headers), Some(outside.ip()));
}

/// A login form sent from `client` (the connection's address, as `serve` hands it on).
async fn login_from(app: &App, client: &str, number: &str, password: &str) -> Reply {
    send(app, login_request_from(app, client, number, password).await).await
}

async fn login_request_from(app: &App, client: &str, number: &str, password: &str) -> Request<Body> {
    let token = login_token(app).await;
    let peer = super::Peer { addr: format!("{client}:40000").parse().unwrap(), answering: Default::default() };
    Request::post("/login")
        .header("cookie", format!("{CSRF_COOKIE}={token}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .extension(axum::extract::ConnectInfo(peer))
        .body(Body::from(format!("number={number}&password={password}&csrf={token}")))
        .unwrap()
}

/// The login throttle (docs/site.md; the trade-off against R-S3 in `site::throttle`): past 5
/// wrong logins in 15 minutes an address is answered 429 without its attempts being
/// checked, so they neither guess nor count towards R-S3 (nothing slowed a client down:
/// anyone could invalidate a password with 10 quick guesses); another address still
/// logs in, and after the window the first may try again.
#[tokio::test]
async fn r_s3_wrong_logins_from_one_address_are_slowed_and_not_counted_against_the_number() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    for _ in 0..throttle::MAX_FAILURES {
        assert_eq!(login_from(&app, "192.0.2.1", CONTRACT, "wrong1234").await.status, StatusCode::OK);
    }
    let slowed = login_from(&app, "192.0.2.1", CONTRACT, PASSWORD).await;
    assert_eq!(slowed.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(slowed.body.contains(login::THROTTLED_MESSAGE), "{}", slowed.body);
    assert!(slowed.body.contains(&format!("value=\"{CONTRACT}\"")), "the number typed is kept: {}", slowed.body);
    assert_eq!(app.f.credentials.record(&n(CONTRACT)).unwrap().unwrap().failures, throttle::MAX_FAILURES);

    assert_eq!(login_from(&app, "192.0.2.2", CONTRACT, PASSWORD).await.location(), Some("/"), "another address");
    app.f.clock.advance(throttle::WINDOW);
    assert_eq!(login_from(&app, "192.0.2.1", CONTRACT, PASSWORD).await.location(), Some("/"), "after the window");
}

/// A client that hangs up while its password is being checked (or waits its turn for
/// it) does not get past the brake: a check under way goes on and counts against the
/// number (R-S3), and the attempt counts against the address. Before, an attempt whose
/// handler went away counted for nothing, so hanging up on every try invalidated a
/// password at full speed. (How far each got before the hang-up depends on the other
/// tests' checks, which share the process's argon2 permits: not asserted.)
#[tokio::test]
async fn r_s3_wrong_logins_whose_clients_hang_up_mid_check_are_braked_all_the_same() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    for _ in 0..throttle::MAX_FAILURES {
        let request = login_request_from(&app, "192.0.2.1", CONTRACT, "wrong1234").await;
        let mut answer = std::pin::pin!(app.router.clone().oneshot(request));
        // Up to the password check (under way, or waiting for a permit): hung up on.
        assert!(futures_util::poll!(answer.as_mut()).is_pending(), "answered before the check");
    }
    let braked = login_from(&app, "192.0.2.1", CONTRACT, PASSWORD).await;
    assert_eq!(braked.status, StatusCode::TOO_MANY_REQUESTS);
}

/// Wrong logins sent at once from one address do not pass the brake together: only
/// [`throttle::MAX_FAILURES`] of them are checked while the others are answered 429, so
/// ten sent at once cannot invalidate a password (R-S3) as ten in a row could not.
#[tokio::test]
async fn r_s3_wrong_logins_sent_at_once_from_one_address_are_braked_like_ones_in_a_row() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let attempts = (0..10).map(|_| login_from(&app, "192.0.2.1", CONTRACT, "wrong1234"));
    let replies = futures_util::future::join_all(attempts).await;
    let braked = replies.iter().filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!(
        braked,
        10 - throttle::MAX_FAILURES as usize,
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let record = app.f.credentials.record(&n(CONTRACT)).unwrap().unwrap();
    assert_eq!(record.failures, throttle::MAX_FAILURES, "only the checked ones count");
    assert!(!record.invalidated, "the password still works");
    assert_eq!(login_from(&app, "192.0.2.2", CONTRACT, PASSWORD).await.location(), Some("/"), "from another address");
}

/// Every page carries the site's header and its stylesheet (served by the site itself,
/// so the strict CSP holds); unknown pages and methods answer in Japanese instead of an
/// empty body the browser shows as its own English error; a session that ended sends
/// the browser to a login page that says why, and a failed login keeps the number.
#[tokio::test]
async fn pages_are_styled_errors_are_japanese_and_an_ended_session_says_so() {
    let app = app();
    let login_page = get(&app, "/login", "").await;
    assert!(login_page.body.contains("<link rel=\"stylesheet\" href=\"/style.css\">"), "{}", login_page.body);
    assert!(login_page.body.contains("ひかり電話設定サイト"));
    assert!(login_page.body.contains("はじめてご利用の方は"), "the first-time hint");
    let css = get(&app, "/style.css", "").await;
    assert_eq!(css.status, StatusCode::OK);
    assert_eq!(css.headers.get("content-type").unwrap(), "text/css; charset=utf-8");
    assert!(css.body.contains("header.site"));

    let missing = get(&app, "/no-such-page", "").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.body.contains("ページが見つかりません"), "{}", missing.body);
    let wrong = post(&app, "/style.css", "", "").await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(wrong.body.contains("この操作はできません"), "{}", wrong.body);

    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    app.f.clock.advance(Duration::hours(1));
    let ended = get(&app, "/", &cookies).await;
    assert_eq!(ended.location(), Some("/login?notice=ended"));
    let page = get(&app, "/login?notice=ended", "").await;
    assert!(page.body.contains("一定時間操作がなかったか"), "{}", page.body);

    let failed = login(&app, CONTRACT, "wrong1234").await;
    assert!(failed.body.contains(&format!("value=\"{CONTRACT}\"")), "the number is kept: {}", failed.body);
}

/// A session whose credential cannot be read (a damaged record) gets the site's error
/// page and stays: it was taken for a replaced credential, the session removed and the
/// subscriber told they had been idle or changed their password.
#[tokio::test]
async fn a_credential_that_cannot_be_read_is_an_error_page_not_an_ended_session() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    let credentials = app.f.store.open_tree("credentials").unwrap();
    let good = credentials.insert(CONTRACT, b"{not a record".as_slice()).unwrap().expect("the credential");
    let failed = get(&app, "/", &cookies).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR, "{:?}", failed.location());
    assert_eq!(app.state.sessions().len(), 1, "the session stays");
    credentials.insert(CONTRACT, good).unwrap();
    assert_eq!(get(&app, "/", &cookies).await.status, StatusCode::OK, "and goes on once it reads");
}

/// A request that fails on our side answers the subscriber a Japanese 500 page without
/// the cause, and the operator gets the cause logged and counted as a site error.
#[tokio::test]
async fn a_request_failing_on_our_side_is_a_500_page_and_a_counted_error() {
    let metrics = Metrics::new();
    let response = SiteError::Store(StoreError::FlusherStopped).into_response();
    let reporter = Reporter { metrics: metrics.clone(), event: ErrorEvent::SiteRequest };
    let response = failure::report(State(reporter.clone()), response).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert!(body.contains("システムエラーが発生しました") && !body.contains("flusher"), "{body}");
    assert_eq!(metrics.value(r#"callnotify_errors_total{stage="site",error="request"}"#), Some(1.0));

    let refused = failure::report(State(reporter), SiteError::Csrf.into_response()).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(metrics.value(r#"callnotify_errors_total{stage="site",error="request"}"#), Some(1.0), "ours only");
}

/// A state owner that, right after the first op named `at`, carries out `then` too (a
/// write from elsewhere landing between two of a request's).
struct ThenAlso {
    store: engine::store::Store,
    at: &'static str,
    then: std::sync::Mutex<Option<engine::store::state::Op>>,
}

impl engine::store::state::StateWriter for ThenAlso {
    fn send(self: Arc<Self>, ops: Vec<engine::store::state::Op>) -> engine::store::state::Answers {
        let mut answers = Vec::new();
        for op in &ops {
            answers.push(self.store.execute(op).map(|(reply, _)| reply));
            if op.name() == self.at {
                if let Some(then) = self.then.lock().unwrap().take() {
                    self.store.execute(&then).unwrap();
                }
            }
        }
        Box::new(move || answers)
    }
}

/// R-M3: a number moved to another line while its subscriber changed its password (after
/// the current one was checked) gets no password from it, and the session ends. The new
/// password was set on the number all the same: its old subscriber logged in to the
/// number another subscriber now holds.
#[tokio::test]
async fn r_m3_a_number_moved_during_a_password_change_gets_no_password_from_it() {
    let app = app();
    let cookies = temporary_session(&app, ADDITIONAL).await;
    let csrf = get(&app, "/password", &cookies).await.csrf();
    let call = engine::store::Services { call: true, fax: false };
    let moved = engine::store::state::Op::UpsertLine {
        line: engine::store::LineRecord {
            contract: n(OTHER_LINE),
            numbers: vec![n(OTHER_LINE), n(ADDITIONAL)],
            unit: None,
        },
        numbers: vec![(n(OTHER_LINE), call, None), (n(ADDITIONAL), call, None)],
    };
    let owner = ThenAlso { store: app.f.store.clone(), at: "login_attempt", then: std::sync::Mutex::new(Some(moved)) };
    app.f.store.attach_writer(Arc::new(owner));

    let form = format!("current={TEMPORARY}&new={PASSWORD}&confirm={PASSWORD}&csrf={csrf}");
    let reply = post(&app, "/password", &cookies, &form).await;
    assert_eq!(app.f.store.number(&n(ADDITIONAL)).unwrap().unwrap().contract, n(OTHER_LINE), "it moved");
    assert_eq!(app.f.credentials.record(&n(ADDITIONAL)).unwrap(), None, "no password on the moved number");
    assert_eq!(reply.location(), Some("/login"));
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"), "the session ended");
}

/// R-S2: a blank current password on the password page is asked for, not checked: a
/// browser that ignores `required` (a フレッツフォン's) sent it, and each one counted as
/// a wrong entry; three invalidated the temporary password.
#[tokio::test]
async fn r_s2_a_blank_current_password_is_asked_for_not_counted() {
    let app = app();
    let cookies = temporary_session(&app, CONTRACT).await;
    let csrf = get(&app, "/password", &cookies).await.csrf();
    for _ in 0..3 {
        let form = format!("current=&new={PASSWORD}&confirm={PASSWORD}&csrf={csrf}");
        let reply = post(&app, "/password", &cookies, &form).await;
        assert!(reply.body.contains("現在のパスワードを入力してください。"), "{}", reply.body);
    }
    assert_eq!(app.f.credentials.record(&n(CONTRACT)).unwrap().unwrap().failures, 0);
    assert_eq!(get(&app, "/password", &cookies).await.status, StatusCode::OK, "still logged in");
}

/// R-S2/R-S3 count wrong passwords: a blank one is not a try. A phone that ignores
/// `required` sent three blank logins and invalidated a new temporary password (and
/// five braked its address); the other password fields already asked instead.
#[tokio::test]
async fn r_s2_a_blank_login_is_asked_for_not_counted() {
    let app = app();
    app.f.credentials.set_temporary_async(n(CONTRACT), TEMPORARY.into(), t0()).await.unwrap();
    for _ in 0..6 {
        let blank = login_from(&app, "198.51.100.7", CONTRACT, "").await;
        assert_eq!(blank.status, StatusCode::OK, "asked again, not braked");
        assert!(blank.body.contains("パスワードを入力してください。"), "{}", blank.body);
        assert!(blank.body.contains(&format!("value=\"{CONTRACT}\"")), "the number stays");
        let no_number = login_from(&app, "198.51.100.7", "", TEMPORARY).await;
        assert!(no_number.body.contains("電話番号を入力してください。"), "{}", no_number.body);
    }
    assert_eq!(app.f.credentials.record(&n(CONTRACT)).unwrap().unwrap().failures, 0);
    let reply = login_from(&app, "198.51.100.7", CONTRACT, TEMPORARY).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "the temporary password still logs in: {}", reply.body);
}

/// The site's forms are a few fields: a body past the limit is refused, in Japanese,
/// before it is read whole (axum read up to 2 MiB, and a connection sending one slowly
/// held that much for minutes). `/unit` carries a password per number of a line and
/// takes more.
#[tokio::test]
async fn a_form_past_the_limit_is_refused_before_it_is_read() {
    let app = app();
    let token = login_token(&app).await;
    let padded = format!("number={CONTRACT}&password={PASSWORD}&csrf={token}&pad={}", "x".repeat(super::BODY_LIMIT));
    let reply = post(&app, "/login", &format!("{CSRF_COOKIE}={token}"), &padded).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(reply.body.contains("送信された内容が大きすぎます。"), "{}", reply.body);
    app.f.store.set_line_unit(&n(CONTRACT), engine::store::AuthUnit::Number).unwrap();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    let csrf = get(&app, "/unit", &cookies).await.csrf();
    let large = format!("csrf={csrf}&pad={}", "x".repeat(2 * super::BODY_LIMIT));
    assert_ne!(post(&app, "/unit", &cookies, &large).await.status, StatusCode::PAYLOAD_TOO_LARGE, "/unit takes more");
    let huge = format!("csrf={csrf}&pad={}", "x".repeat(super::UNIT_BODY_LIMIT));
    assert_eq!(post(&app, "/unit", &cookies, &huge).await.status, StatusCode::PAYLOAD_TOO_LARGE);
}

/// The `maxlength` of the input `id` in `html`.
fn maxlength(html: &str, id: &str) -> Option<usize> {
    let input = &html[html.find(&format!("<input id=\"{id}\""))?..];
    let input = &input[..input.find('>')?];
    let at = input.find("maxlength=\"")? + "maxlength=\"".len();
    input[at..].split('"').next()?.parse().ok()
}

/// R-S3: a field that takes a password already set takes any either policy allows: a
/// passphrase set under `asvs` (or restored from an export) still logs in after the
/// operator switched back to `seed`. Those fields had `seed`'s maxlength of 12: browsers
/// cut the passphrase, every try was wrong, and ten invalidated the password.
#[tokio::test]
async fn r_s3_a_long_password_set_under_one_policy_is_typed_whole_under_the_other() {
    use engine::config::PasswordPolicy;
    let passphrase = "correct horse battery staple, twice over: correct horse battery!";
    assert_eq!(passphrase.chars().count(), 64);
    let app = app_with_policy(PasswordPolicy::Seed);
    app.f.credentials.set_password_async(n(CONTRACT), passphrase.into(), t0()).await.unwrap();
    let page = get(&app, "/login", "").await;
    assert!(maxlength(&page.body, "password").is_some_and(|max| max >= 64), "{}", page.body);
    let reply = login(&app, CONTRACT, passphrase).await;
    assert_eq!(reply.location(), Some("/"), "it logs in");
    let cookies = format!("{SESSION_COOKIE}={}", reply.cookie_value(SESSION_COOKIE).unwrap());
    let page = get(&app, "/password", &cookies).await;
    assert!(maxlength(&page.body, "current").is_some_and(|max| max >= 64), "{}", page.body);
    assert_eq!(maxlength(&page.body, "new"), Some(12), "a new one keeps to the policy");
}

/// R-I7: a temporary password set by phone while a login's password was being checked
/// ends the session that login makes: the password proved the credential before it. The
/// session took the new credential's stamp (read after the check) and went on.
#[tokio::test]
async fn r_i7_a_temporary_password_set_during_a_login_ends_the_session_it_makes() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let by_phone = engine::store::CredentialRecord {
        hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$bmV3bmV3bmV3bmV3bmV3bg".into(),
        kind: engine::store::CredentialKind::Temporary,
        set_at: t0(),
        failures: 0,
        invalidated: false,
    };
    let then = engine::store::state::Op::SetCredential { number: n(CONTRACT), record: by_phone };
    let owner = ThenAlso { store: app.f.store.clone(), at: "login_attempt", then: std::sync::Mutex::new(Some(then)) };
    app.f.store.attach_writer(Arc::new(owner));

    let reply = login(&app, CONTRACT, PASSWORD).await;
    assert_eq!(reply.location(), Some("/"), "the password was right when checked");
    let cookies = format!("{SESSION_COOKIE}={}", reply.cookie_value(SESSION_COOKIE).unwrap());
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));
}

/// The password page leads back to the menu once the change is not a must (R-S4): it had
/// only the form and ログアウト, the one page without a way back.
#[tokio::test]
async fn the_password_page_leads_back_to_the_menu_unless_the_change_is_a_must() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    assert!(get(&app, "/password", &cookies).await.body.contains("<a href=\"/\">メニューへ戻る</a>"));
    let forced = temporary_session(&app, ADDITIONAL).await;
    assert!(!get(&app, "/password", &forced).await.body.contains("メニューへ戻る"), "the menu waits for the change");
}

/// R-S1: a number typed as people type it (hyphens, spaces, a Japanese input method's
/// full-width digits) logs in: it was a wrong login, counted against the address, and
/// the browser's `pattern` said nothing of why.
#[tokio::test]
async fn r_s1_a_number_typed_with_hyphens_spaces_or_full_width_digits_logs_in() {
    let app = app();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    for typed in ["03-1234-5678", " 0312345678 ", "０３１２３４５６７８", "03－1234－5678"] {
        assert_eq!(login(&app, typed, PASSWORD).await.location(), Some("/"), "{typed}");
    }
    let page = get(&app, "/login", "").await;
    assert!(!page.body.contains("pattern="), "the server says what is wrong: {}", page.body);
}

/// A session of `number` logged in with a temporary password, its change still due
/// (R-S4): its `Cookie` header.
async fn temporary_session(app: &App, number: &str) -> String {
    app.f.credentials.set_temporary_async(n(number), TEMPORARY.into(), t0()).await.unwrap();
    let reply = login(app, number, TEMPORARY).await;
    format!("{SESSION_COOKIE}={}", reply.cookie_value(SESSION_COOKIE).unwrap())
}
