//! 着信お知らせメール設定: `GET/POST /numbers/{number}/call`, one page per number with
//! the four sections of R-N1..R-N5 in one form ([`super::settings_form`]).
//!
//! A save carries the version the form was rendered from and the store refuses it if
//! the settings changed since (R-S9), so a second browser window never silently
//! overwrites the first. Changing the destination addresses needs the current password:
//! whoever finds a logged-in browser must not be able to divert the notifications.
//!
//! Each destination row's 送信テスト button (R-N2) posts the whole form to
//! `POST /numbers/{number}/call/test/{row}` ([`test_mail`]): a test mail goes to the
//! address as typed in that row, and the form comes back as typed, nothing saved.

use std::collections::HashMap;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, RawQuery, State};
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use engine::address::DestinationAddress;
use engine::deliver::{TestMailError, TEST_MAILS_PER_MINUTE};
use engine::phone::PhoneNumber;
use engine::store::{CallSettings, StoreError, MAX_DESTINATIONS};
use engine::telemetry::TestMail;

use super::numbers::{allowed_number, call_settings_path, not_found};
use super::password::max_len;
use super::session::Session;
use super::settings_form::{address_message, render, Entered, RowErrors};
use super::{csrf, html, redirect, require_session, with_cookies, Authed, Gate, SiteError, SiteState};
use crate::credentials::LoginFailure;

const SAVED: &str = "設定しました。";
const FIX_ROWS: &str = "入力内容に誤りがあります。各欄のメッセージを確認してください。設定は保存されていません。";
const NEED_PASSWORD: &str =
    "送信先メールアドレスを変更するには、現在のパスワードを入力してください。設定は保存されていません。";
const WRONG_PASSWORD: &str = "現在のパスワードが正しくありません。設定は保存されていません。";
const TEST_UNAVAILABLE: &str = "現在、テストメールの送信はご利用いただけません。";
const TEST_FIX_ROW: &str =
    "入力内容に誤りがあります。欄のメッセージを確認してください。テストメールは送信されていません。";
const STALE: &str = "この設定は、別の画面で変更されています。ここで入力した内容は保存されていません。\
                     ページを開き直して、最新の設定を確認してから、もう一度設定してください。";

/// The number a URL names, if `login` may see it, with its stored settings; `None` for
/// anything else (another subscriber's number, a number re-provisioned away).
async fn settings_of(
    state: &SiteState,
    login: PhoneNumber,
    raw: String,
) -> Result<Option<(PhoneNumber, CallSettings)>, SiteError> {
    state
        .read(move |store| {
            let Some(number) = allowed_number(store, &login, &raw)? else { return Ok(None) };
            Ok(store.number(&number)?.map(|record| (number, record.call)))
        })
        .await
}

/// What every rendering of the settings page needs besides the form's values.
struct View<'a> {
    number: &'a PhoneNumber,
    session: &'a Session,
    /// The longest password the policy allows, for the 現在のパスワード field.
    password_max: usize,
}

impl<'a> View<'a> {
    fn new(state: &SiteState, number: &'a PhoneNumber, session: &'a Session) -> Self {
        Self { number, session, password_max: max_len(state.password_policy) }
    }
}

fn settings_page(view: &View<'_>, notice: &str, entered: &Entered, errors: &[String]) -> String {
    settings_page_rows(view, notice, entered, errors, &RowErrors::default())
}

fn settings_page_rows(view: &View<'_>, notice: &str, entered: &Entered, errors: &[String], rows: &RowErrors) -> String {
    let notice =
        if notice.is_empty() { String::new() } else { format!("<p role=\"status\">{}</p>\n", html::escape(notice)) };
    let path = call_settings_path(view.number);
    let body = format!(
        "<p>電話番号: {number}</p>\n{notice}{errors}{form}<p><a href=\"{path}\">保存されている設定を開く</a></p>\n\
         <p><a href=\"/\">メニューへ戻る</a></p>\n{logout}",
        number = html::escape(view.number.as_str()),
        errors = html::errors(errors),
        form = render(&path, &view.session.csrf, entered, rows, view.password_max),
        path = html::escape(&path),
        logout = html::logout_form(&view.session.csrf),
    );
    html::page("着信お知らせメール設定", &body)
}

pub async fn show(
    State(state): State<SiteState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, SiteError> {
    let authed = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    let Some((number, settings)) = settings_of(&state, authed.session.number, raw).await? else {
        return Ok(not_found());
    };
    if query.as_deref() == Some(TESTED) {
        if let Some(page) = state.sessions.take_flash(&authed.id, &call_settings_path(&number)).await? {
            return Ok(Html(page).into_response());
        }
    }
    let notice = if query.as_deref() == Some("saved=1") { SAVED } else { "" };
    let view = View::new(&state, &number, &authed.session);
    let page = settings_page(&view, notice, &Entered::from_settings(&settings), &[]);
    Ok(Html(page).into_response())
}

pub async fn submit(
    State(state): State<SiteState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Result<Response, SiteError> {
    let Form(fields) = form?;
    let Authed { id, session } = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    if !csrf::matches(Some(&session.csrf), fields.get("csrf").map_or("", String::as_str)) {
        return Err(SiteError::Csrf);
    }
    let Some((number, current)) = settings_of(&state, session.number, raw).await? else { return Ok(not_found()) };
    if let Err(why) = Entered::check_choices(&fields) {
        tracing::info!(%number, %why, "settings form refused: a value the form does not offer");
        return Err(SiteError::BadForm(why.to_string()));
    }

    let entered = Entered::from_fields(&fields);
    let view = View::new(&state, &number, &session);
    let Some(version) = entered.version else { return Ok(stale(&view, &entered)) };
    let settings = match entered.parse() {
        Ok(settings) => settings,
        Err(rows) => {
            let page = settings_page_rows(&view, "", &entered, &[FIX_ROWS.to_owned()], &rows);
            return Ok(Html(page).into_response());
        }
    };

    if settings.destinations != current.destinations {
        let password = fields.get("current").cloned().unwrap_or_default();
        if password.is_empty() {
            return Ok(Html(settings_page(&view, "", &entered, &[NEED_PASSWORD.to_owned()])).into_response());
        }
        // A wrong entry here counts towards the credential's lock like one at login
        // (R-S3), so this field cannot be used to guess the password without limit.
        match state.credentials.verify_async(session.number, password, state.clock.now()).await? {
            Ok(_) => {}
            Err(LoginFailure::Wrong) => {
                tracing::info!(login = %session.number, %number, "call settings: wrong current password");
                let page = settings_page(&view, "", &entered, &[WRONG_PASSWORD.to_owned()]);
                return Ok(Html(page).into_response());
            }
            // The credential died under the session (locked by wrong entries): a new one
            // must be set by phone, so the session ends as after a failed login.
            Err(failure) => {
                tracing::info!(login = %session.number, outcome = ?failure, "call settings: credential unusable");
                state.sessions.remove(&id).await?;
                return Ok(with_cookies(redirect("/login"), [state.set_cookie(&state.session_cookie(), None)]));
            }
        }
    }

    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.save_call_settings(&number, version, settings)).await? {
        Ok(saved) => {
            tracing::info!(login = %session.number, %number, version = saved, "call settings saved");
            state.metrics.settings_saved();
            Ok(redirect_to(&format!("{}?saved=1", call_settings_path(&number))))
        }
        Err(StoreError::StaleVersion { current }) => {
            tracing::info!(login = %session.number, %number, version, current, "call settings: stale form refused");
            Ok(stale(&view, &entered))
        }
        Err(error) => Err(error.into()),
    }
}

/// `409 Conflict`: the form was rendered from settings that changed since (R-S9). The
/// entered values are shown again but not saved; the version field stays the old one, so
/// resubmitting this page is refused too and the subscriber must reload.
fn stale(view: &View<'_>, entered: &Entered) -> Response {
    let page = settings_page(view, "", entered, &[STALE.to_owned()]);
    (StatusCode::CONFLICT, Html(page)).into_response()
}

fn test_sent(address: &DestinationAddress) -> String {
    format!(
        "{} にテストメールを送信しました。届いたことを確認してから「送信」にチェックを入れて設定してください。",
        address.as_str()
    )
}

/// Why the test mail did not go, in the subscriber's words; the server's own reply is
/// kept beside it for whoever the subscriber asks for help.
fn test_failed(address: &DestinationAddress, error: &TestMailError) -> String {
    let address = address.as_str();
    match error {
        TestMailError::TooMany => format!(
            "送信テストは1回線につき1分間に{TEST_MAILS_PER_MINUTE}回までです。しばらくしてからもう一度お試しください。"
        ),
        TestMailError::Refused(reply) => format!(
            "{address} あてのテストメールは、メールサーバーに受け取りを拒否されました。メールアドレスに誤りがないかご確認ください。（サーバーの応答: {reply}）"
        ),
        TestMailError::NotNow(reply) => format!(
            "{address} あてのテストメールを、いま送信できませんでした。しばらくしてからもう一度お試しください。（サーバーの応答: {reply}）"
        ),
        TestMailError::Render(_) => {
            format!("{address} あてのテストメールを作成できませんでした。しばらくしてからもう一度お試しください。")
        }
    }
}

fn test_empty(row: usize) -> String {
    format!("送信先{}にメールアドレスを入力してから、「送信テスト」を押してください。", row + 1)
}

/// `POST /numbers/{number}/call/test/{row}`: 送信テスト (R-N2). Sends a test mail to the
/// address typed in destination row `row` (checked by R-N3), before it is saved, and
/// shows the form again exactly as typed with the outcome. Nothing is saved, so no
/// password is asked: the mail goes only to the address typed, never diverts anything.
pub async fn test_mail(
    State(state): State<SiteState>,
    headers: HeaderMap,
    Path((raw, row)): Path<(String, String)>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Result<Response, SiteError> {
    let Form(fields) = form?;
    let Authed { id, session } = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    if !csrf::matches(Some(&session.csrf), fields.get("csrf").map_or("", String::as_str)) {
        return Err(SiteError::Csrf);
    }
    let Some((number, _)) = settings_of(&state, session.number, raw).await? else { return Ok(not_found()) };
    let Some(row) = row.parse::<usize>().ok().filter(|row| *row < MAX_DESTINATIONS) else { return Ok(not_found()) };

    let entered = Entered::from_fields(&fields);
    let (notice, errors, rows) = test_outcome(&state, &session, number, row, &entered).await?;
    // Post/Redirect/Get: the page with the outcome is shown by the GET the browser is
    // sent to, once; a reload shows the saved settings and sends no second mail.
    let view = View::new(&state, &number, &session);
    let page = settings_page_rows(&view, &notice, &entered, &errors, &rows);
    let path = call_settings_path(&number);
    state.sessions.set_flash(&id, path.clone(), page).await?;
    Ok(redirect_to(&format!("{path}?{TESTED}")))
}

/// `303 See Other` to a path of this number's.
fn redirect_to(location: &str) -> Response {
    let location = HeaderValue::from_str(location).expect("a path of digits is a valid header");
    (StatusCode::SEE_OTHER, [(LOCATION, location)]).into_response()
}

/// The query of the GET after a 送信テスト.
const TESTED: &str = "tested=1";

/// Sends the test mail of destination row `row` as typed in `entered`; what the page
/// then says: a notice, errors above the form, and an error beside the row.
async fn test_outcome(
    state: &SiteState,
    session: &Session,
    number: PhoneNumber,
    row: usize,
    entered: &Entered,
) -> Result<(String, Vec<String>, RowErrors), SiteError> {
    let Some(mailer) = state.test_mailer.as_deref() else {
        return Ok((String::new(), vec![TEST_UNAVAILABLE.to_owned()], RowErrors::default()));
    };
    let text = &entered.destinations[row].text;
    if text.is_empty() {
        return Ok((String::new(), vec![test_empty(row)], RowErrors::default()));
    }
    let address = match DestinationAddress::parse(text) {
        Ok(address) => address,
        Err(error) => {
            let mut rows = RowErrors::default();
            rows.destinations.insert(row, address_message(&error));
            return Ok((String::new(), vec![TEST_FIX_ROW.to_owned()], rows));
        }
    };
    let line = state.read(move |store| Ok(store.number(&number)?.map_or(number, |record| record.contract))).await?;
    Ok(match mailer.send(&line, &number, &address).await {
        Ok(()) => {
            tracing::info!(login = %session.number, %number, row, "call settings: test mail sent");
            state.metrics.test_mail(TestMail::Sent);
            (test_sent(&address), Vec::new(), RowErrors::default())
        }
        Err(error) => {
            tracing::info!(login = %session.number, %number, row, %error, "call settings: test mail refused");
            let limited = matches!(error, TestMailError::TooMany);
            state.metrics.test_mail(if limited { TestMail::Limited } else { TestMail::Failed });
            (String::new(), vec![test_failed(&address, &error)], RowErrors::default())
        }
    })
}
