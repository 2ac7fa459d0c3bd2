//! `GET/POST /login` and `POST /logout` (R-S1..R-S3, R-S7).
//!
//! Every failed login (no credential, wrong password, invalidated, expired temporary
//! password, malformed number) gets the same status and the same page, so the site
//! does not tell a stranger which numbers have a credential or which are locked; the
//! reason goes to the log only.

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use engine::phone::PhoneNumber;
use engine::telemetry::{Login, Metrics};

use super::form_parts::typed_number;
use super::session::{idle_timeout_for, new_session};
use super::{cookie, csrf, html, require_session, with_cookies, Gate, SiteError, SiteState};
use crate::credentials::{LoginFailure, LoginOk};

/// The one answer to every failed login.
pub const FAILURE_MESSAGE: &str = "電話番号またはパスワードが正しくありません。";
/// A login sent with a field blank (a browser that ignores `required`).
const NUMBER_MISSING: &str = "電話番号を入力してください。";
const PASSWORD_MISSING: &str = "パスワードを入力してください。";
/// Past the login throttle ([`super::throttle`]).
pub const THROTTLED_MESSAGE: &str =
    "ログインの失敗が続いたため、しばらくログインできません。15分ほどたってからもう一度お試しください。";

/// The login form's fields. All default to empty, so a missing CSRF field is refused as
/// a CSRF failure (403) rather than as a malformed form.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct LoginForm {
    /// 電話番号: half-width digits, no hyphen (R-S1).
    number: String,
    password: String,
    csrf: String,
    /// A fax to show once logged in (`number/ms/id`), carried from the fax mail's link.
    fax: String,
}

/// The log line of one login attempt: the number and the outcome, never the password.
struct LoginAttempt<'a> {
    number: &'a str,
    outcome: Result<LoginOk, Refusal>,
}

/// Why a login was refused, as logged.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Credential(LoginFailure),
    /// Not a phone number (R-L2): no credential was consulted.
    Malformed,
}

impl LoginAttempt<'_> {
    /// Logs the attempt and counts it in `callnotify_site_logins_total`.
    fn emit(&self, metrics: &Metrics) {
        metrics.login(match self.outcome {
            Ok(_) => Login::Ok,
            Err(Refusal::Credential(LoginFailure::Wrong | LoginFailure::Invalidated)) => Login::Wrong,
            Err(Refusal::Credential(LoginFailure::Unknown)) => Login::Unknown,
            Err(Refusal::Credential(LoginFailure::Locked)) => Login::Locked,
            Err(Refusal::Credential(LoginFailure::Expired)) => Login::Expired,
            Err(Refusal::Malformed) => Login::Malformed,
        });
        match self.outcome {
            Ok(ok) => tracing::info!(number = self.number, outcome = "ok", kind = ?ok.kind,
                must_change = ok.must_change, "site login"),
            Err(Refusal::Credential(failure)) => {
                tracing::info!(number = self.number, outcome = ?failure, "site login refused")
            }
            // The input is not a number; log its length only, it may be a mistyped password.
            Err(Refusal::Malformed) => {
                tracing::info!(number_len = self.number.len(), outcome = "malformed", "site login refused")
            }
        }
    }
}

/// The login page, with a pre-session CSRF token: the browser's, if it already has a
/// well-formed one (so several open tabs keep working, R-S9), or a new one.
pub async fn show(State(state): State<SiteState>, RawQuery(query): RawQuery, headers: HeaderMap) -> Response {
    // `notice=…` says why the browser is here; `fax=…` which fax it came for.
    let query = query.unwrap_or_default();
    let mut pairs = query.split('&');
    let notice = pairs.clone().find_map(|pair| super::unit::login_notice(Some(pair)));
    let fax = pairs.find_map(|pair| pair.strip_prefix("fax=")).and_then(super::fax::fax_to_show).unwrap_or("");
    let name = state.csrf_cookie();
    let page = |token: &str| Html(login_page_with(token, notice, None, "", fax)).into_response();
    match cookie(&headers, &name).filter(|token| csrf::well_formed(token)) {
        Some(token) => page(token),
        None => {
            let token = csrf::new_token();
            let set = state.set_cookie(&name, Some(&token));
            with_cookies(page(&token), [set])
        }
    }
}

pub async fn submit(
    State(state): State<SiteState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<super::Peer>>>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Result<Response, SiteError> {
    let Form(form) = form?;
    let csrf_cookie = state.csrf_cookie();
    let token = cookie(&headers, &csrf_cookie);
    if !csrf::matches(token, &form.csrf) {
        tracing::info!("site login refused: CSRF token missing or wrong");
        return Err(SiteError::Csrf);
    }
    // A blank field is asked for, neither checked nor counted (R-S2/R-S3 count wrong
    // passwords): phones that ignore `required` invalidated temporary passwords.
    let blank = match (form.number.trim().is_empty(), form.password.is_empty()) {
        (true, _) => Some(NUMBER_MISSING),
        (false, true) => Some(PASSWORD_MISSING),
        (false, false) => None,
    };
    if let Some(missing) = blank {
        let fax = super::fax::fax_to_show(&form.fax).unwrap_or("");
        return Ok(Html(login_page_with(&form.csrf, None, Some(missing), &form.number, fax)).into_response());
    }
    let now = state.clock.now();
    let client = state.client(peer.map(|p| p.0 .0.addr), &headers);
    // Taken before the password is checked, so attempts sent at once cannot all pass.
    let attempt = match client.map(|client| state.throttle.begin(client, now)) {
        Some(None) => {
            tracing::info!(client = ?client, "site login not checked: too many wrong logins from this address");
            state.metrics.login(Login::Throttled);
            // What was typed stays, as after a wrong login: the number and the fax to show.
            let fax = super::fax::fax_to_show(&form.fax).unwrap_or("");
            let page = login_page_with(&form.csrf, None, Some(THROTTLED_MESSAGE), &form.number, fax);
            return Ok((StatusCode::TOO_MANY_REQUESTS, Html(page)).into_response());
        }
        Some(Some(attempt)) => Some(attempt),
        None => None,
    };
    let typed = typed_number(&form.number);
    let verdict = match typed {
        Ok(number) => match state.credentials.verify_stamped_async(number, form.password, now).await {
            Ok((verdict, stamp)) => verdict.map(|ok| (number, ok, stamp)).map_err(Refusal::Credential),
            // Not counted against the address: a state owner failing over (a minute
            // without answers) would brake every address, and behind a proxy without
            // `X-Forwarded-For` the whole site. R-S2/R-S3 count per number all the same.
            Err(e) => {
                if let Some(attempt) = attempt {
                    attempt.unchecked();
                }
                return Err(e.into());
            }
        },
        Err(_) => Err(Refusal::Malformed),
    };
    // Logged as the number it is, however typed (a lockout is looked for by number).
    let logged = typed.as_ref().map_or(form.number.as_str(), PhoneNumber::as_str);
    LoginAttempt { number: logged, outcome: verdict.map(|(_, ok, _)| ok) }.emit(&state.metrics);
    let (number, ok, stamp) = match verdict {
        Ok(found) => {
            if let Some(attempt) = attempt {
                attempt.right();
            }
            found
        }
        // The token matched the cookie, so it is ours and safe to render again.
        Err(_) => {
            if let Some(attempt) = attempt {
                attempt.failed();
            }
            let fax = super::fax::fax_to_show(&form.fax).unwrap_or("");
            let page = login_page_with(&form.csrf, None, Some(FAILURE_MESSAGE), &form.number, fax);
            return Ok(Html(page).into_response());
        }
    };

    // A browser logging in again leaves its old session behind, server-side too.
    if let Some(old) = cookie(&headers, &state.session_cookie()) {
        state.sessions.remove(old).await?;
    }
    state.sessions.sweep(now).await?;
    let idle_timeout = state.read(move |store| idle_timeout_for(store, &number)).await?;
    let must_change = state.must_change(ok);
    // The session keeps the stamp of the credential the password was checked against: one
    // set again since (a temporary password by phone) ends it at its next request.
    let id = state.sessions.create(new_session(number, ok.kind, must_change, idle_timeout, now, stamp)).await?;
    // The fax the browser came for, after the password change if it must come first
    // (R-S4).
    let next = match (super::fax::fax_to_show(&form.fax), must_change) {
        (Some(fax), true) => format!("/password?fax={fax}"),
        (None, true) => "/password".to_owned(),
        (Some(fax), false) => format!("/fax/{fax}"),
        (None, false) => "/".to_owned(),
    };
    // The login form's token cookie stays: another login tab still submits (R-S9).
    let cookies = [state.set_cookie(&state.session_cookie(), Some(&id))];
    Ok(with_cookies(super::redirect(&next), cookies))
}

/// The logout form's one field.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct LogoutForm {
    csrf: String,
    /// A fax to show after the next login (a fax link of another number of the line).
    #[serde(default)]
    fax: Option<String>,
}

/// Ends the session server-side at once (R-S7) and drops the cookie.
pub async fn logout(
    State(state): State<SiteState>,
    headers: HeaderMap,
    form: Result<Form<LogoutForm>, FormRejection>,
) -> Result<Response, SiteError> {
    let Form(form) = form?;
    let authed = match require_session(&state, &headers, Gate::Any).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    if !csrf::matches(Some(&authed.session.csrf), &form.csrf) {
        // A tab left open from before a login in another tab carries an older token:
        // the subscriber is asked once more, on a form of this session (R-S7, R-S9),
        // rather than refused with the session left on.
        let body = format!(
            "<p>ログアウトするには、下のボタンを押してください。</p>\n{}",
            super::html::logout_form(&authed.session.csrf)
        );
        return Ok((StatusCode::FORBIDDEN, Html(super::html::page("ログアウト", &body))).into_response());
    }
    state.sessions.remove(&authed.id).await?;
    tracing::info!(number = %authed.session.number, "site logout");
    let next = match form.fax.as_deref().and_then(super::fax::fax_to_show) {
        Some(key) => format!("/login?notice=logout&fax={key}"),
        None => "/login?notice=logout".to_owned(),
    };
    Ok(with_cookies(super::redirect(&next), [state.set_cookie(&state.session_cookie(), None)]))
}

/// The login page, with the number field filled in (a failed login keeps what was
/// typed) and the fax to show after it, if any (checked by [`super::fax::fax_to_show`]).
fn login_page_with(csrf: &str, notice: Option<&str>, error: Option<&str>, number: &str, fax: &str) -> String {
    let errors = html::errors(&error.map(str::to_owned).into_iter().collect::<Vec<_>>());
    let notice = notice
        .map_or(String::new(), |notice| format!("<p class=\"notice\" role=\"status\">{}</p>\n", html::escape(notice)));
    let fax = match fax {
        "" => String::new(),
        fax => format!(
            "<p class=\"hint\">ログインすると、お知らせしたFAXを表示します。</p>\n\
             <input type=\"hidden\" name=\"fax\" value=\"{}\">\n",
            html::escape(fax)
        ),
    };
    let body = format!(
        "{notice}{errors}<p class=\"hint\">はじめてご利用の方は、ご契約の回線の電話から仮パスワード設定ダイヤル\
         （06-6480-6430）に電話して、仮パスワードを設定してからログインしてください。</p>\n\
         <form method=\"post\" action=\"/login\">\n{csrf}{fax}\
         <p><label for=\"number\">電話番号</label><br>\n\
         <input id=\"number\" name=\"number\" type=\"text\" inputmode=\"numeric\" autocomplete=\"username\" \
         maxlength=\"20\" required value=\"{number}\" aria-describedby=\"number-help\"><br>\n\
         <small id=\"number-help\">本サービスを契約している電話番号を、市外局番から、半角数字でハイフンなしで\
         入力してください。ログイン時の認証単位が「回線単位」で、追加番号に本サービスを契約されている場合は、\
         お客さま電話番号（契約番号）を入力してください。</small></p>\n\
         <p><label for=\"password\">パスワード</label><br>\n\
         <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" \
         maxlength=\"{max}\" required></p>\n\
         <p><button type=\"submit\">ログイン</button></p>\n</form>\n\
         <p>パスワードをお忘れの場合や、ロックされた場合は、ご契約の回線から仮パスワード設定ダイヤル\
         （06-6480-6430）に電話して仮パスワードを設定してください。</p>\n",
        csrf = html::csrf_field(csrf),
        max = super::password::ENTERED_MAX_LEN,
        // Kept as typed, but never more of it than a mistyped number could be.
        number = html::escape(&number.chars().take(20).collect::<String>()),
    );
    html::page("ログイン", &body)
}
