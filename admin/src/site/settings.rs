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
//! The password check and the test mail are [`super::destinations`]', shared with the
//! FAXお知らせメール page.

use std::collections::HashMap;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use engine::phone::PhoneNumber;
use engine::render::MailService;
use engine::store::{CallSettings, StoreError};

use super::destinations::{
    confirm_change, redirect_to, send_test, test_row, Confirmed, FIX_ROWS, SAVED, SAVED_QUERY, STALE, TESTED,
};
use super::numbers::{allowed_number, call_settings_path, not_found};
use super::password::max_len;
use super::session::Session;
use super::settings_form::{render, Entered, RowErrors};
use super::{csrf, html, require_session, Authed, Gate, SiteError, SiteState};

/// How this page names itself in the log.
const PAGE: &str = "call settings";

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
    let notice = if query.as_deref() == Some(SAVED_QUERY) { SAVED } else { "" };
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
        match confirm_change(&state, &id, &session, &fields, &number, PAGE).await? {
            Confirmed::Yes => {}
            Confirmed::Refused(why) => {
                return Ok(Html(settings_page(&view, "", &entered, &[why.to_owned()])).into_response());
            }
            Confirmed::Ended(response) => return Ok(response),
        }
    }

    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.save_call_settings(&number, version, settings)).await? {
        Ok(saved) => {
            tracing::info!(login = %session.number, %number, version = saved, "call settings saved");
            state.metrics.settings_saved();
            Ok(redirect_to(&format!("{}?{SAVED_QUERY}", call_settings_path(&number))))
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
    let Some(row) = test_row(&row) else { return Ok(not_found()) };

    let entered = Entered::from_fields(&fields);
    let tested = send_test(&state, &session, number, row, &entered.destinations, PAGE, MailService::Call).await?;
    // Post/Redirect/Get: the page with the outcome is shown by the GET the browser is
    // sent to, once; a reload shows the saved settings and sends no second mail.
    let view = View::new(&state, &number, &session);
    let rows = RowErrors { destinations: tested.rows, ..RowErrors::default() };
    let page = settings_page_rows(&view, &tested.notice, &entered, &tested.errors, &rows);
    let path = call_settings_path(&number);
    state.sessions.set_flash(&id, path.clone(), page).await?;
    Ok(redirect_to(&format!("{path}?{TESTED}")))
}
