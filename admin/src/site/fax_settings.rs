//! FAXお知らせメール設定: `GET/POST /numbers/{number}/fax` and
//! `POST /numbers/{number}/fax/test/{row}` (R-F1: the same site and login as for calls).
//!
//! What a fax mail needs: 開始/停止 (R-N1) and up to five 送信先 with their 送信 checks and
//! 送信テスト buttons (R-N2, R-N3), as on the call page and built from the same parts
//! ([`super::form_parts`], [`super::destinations`]), and, beyond the seed,
//! 「FAXをPDFで添付する」 for subscribers who read their mail where the site is out of
//! reach. A fax has no caller conditions, so there are no R-N4/R-N5 sections.
//!
//! The call page's rules hold here too: a save from a stale form is refused (R-S9), a
//! change of the destinations needs the current password, every form carries the
//! session's CSRF token, and a 送信テスト answers by Post/Redirect/Get. A number that is
//! not one of the session's fax numbers is not found, whatever the reason.

use std::collections::HashMap;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use engine::phone::PhoneNumber;
use engine::render::MailService;
use engine::store::{FaxSettings, StoreError};

use super::destinations::{
    confirm_change, redirect_to, send_test, test_row, Confirmed, FIX_ROWS, SAVED, SAVED_QUERY, STALE, TESTED,
};
use super::form_parts::{
    check_attr, check_form_choices, destination_rows, destination_rows_from_fields, destinations_fieldset,
    enabled_fieldset, form_start, parse_destinations, ChoiceError, Row,
};
use super::numbers::{allowed_fax_number, fax_settings_path, faxes_path, not_found};
use super::password::max_len;
use super::session::Session;
use super::{csrf, html, require_session, Authed, Gate, SiteError, SiteState};

/// How this page names itself in the log.
const PAGE: &str = "fax settings";

/// The fax form's values as entered (or as stored, for a fresh page), so a refused form
/// is shown again with what the subscriber typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaxEntered {
    /// 開始 / 停止 (R-N1).
    pub enabled: bool,
    /// 送信先メールアドレス rows (R-N2).
    pub destinations: Vec<Row>,
    /// FAXをPDFで添付する.
    pub attach_pdf: bool,
    /// The [`FaxSettings::version`] the form was rendered from (R-S9); `None` when the
    /// submitted value is missing or garbled.
    pub version: Option<u64>,
}

impl FaxEntered {
    /// The stored settings as a fresh form.
    pub fn from_settings(settings: &FaxSettings) -> Self {
        Self {
            enabled: settings.enabled,
            destinations: destination_rows(&settings.destinations),
            attach_pdf: settings.attach_pdf,
            version: Some(settings.version),
        }
    }

    /// The submitted form's fields; anything else (a 6th row, unknown names) is ignored.
    pub fn from_fields(fields: &HashMap<String, String>) -> Self {
        Self {
            enabled: fields.get("enabled").is_some_and(|v| v == "on"),
            destinations: destination_rows_from_fields(fields),
            attach_pdf: fields.get("attach_pdf").is_some_and(|v| !v.is_empty()),
            version: fields.get("version").and_then(|v| v.parse().ok()),
        }
    }

    /// Whether every choice has a value the form offers.
    pub fn check_choices(fields: &HashMap<String, String>) -> Result<(), ChoiceError> {
        check_form_choices(fields, |name| name == "attach_pdf" || name.starts_with("send_"))
    }

    /// The settings entered, version left at 0 (the store sets it); or the rows' errors.
    pub fn parse(&self) -> Result<FaxSettings, HashMap<usize, String>> {
        let mut errors = HashMap::new();
        let destinations = parse_destinations(&self.destinations, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(FaxSettings { enabled: self.enabled, destinations, attach_pdf: self.attach_pdf, version: 0 })
    }
}

/// The form's HTML: 開始/停止, the destinations, the attachment, one 設定 button.
fn render(
    action: &str,
    csrf: &str,
    entered: &FaxEntered,
    rows: &HashMap<usize, String>,
    password_max: usize,
) -> String {
    let mut out = form_start(action, csrf, entered.version);
    out += &enabled_fieldset(entered.enabled);
    out += &destinations_fieldset(action, &entered.destinations, rows, password_max);
    out += &format!(
        "<fieldset>\n<legend>添付ファイル設定</legend>\n\
         <p><label><input type=\"checkbox\" name=\"attach_pdf\" value=\"on\"{checked}> FAXをPDFで添付する</label></p>\n\
         <p><small>チェックすると、お知らせメールに受信したFAXをPDFファイルで添付します。\
         チェックしない場合は、メールのリンクから設定サイトにログインしてFAXをご覧ください。</small></p>\n\
         </fieldset>\n<p><button type=\"submit\">設定</button></p>\n</form>\n",
        checked = check_attr(entered.attach_pdf),
    );
    out
}

/// The number a URL names, if `login` may see it, with its stored fax settings; `None`
/// for anything else (another subscriber's number, a number without fax).
async fn settings_of(
    state: &SiteState,
    login: PhoneNumber,
    raw: String,
) -> Result<Option<(PhoneNumber, FaxSettings)>, SiteError> {
    state
        .read(move |store| {
            let Some(number) = allowed_fax_number(store, &login, &raw)? else { return Ok(None) };
            Ok(store.number(&number)?.map(|record| (number, record.fax)))
        })
        .await
}

/// What every rendering of the page needs besides the form's values.
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

    fn page(&self, notice: &str, entered: &FaxEntered, errors: &[String], rows: &HashMap<usize, String>) -> String {
        let notice = if notice.is_empty() {
            String::new()
        } else {
            format!("<p class=\"notice\" role=\"status\">{}</p>\n", html::escape(notice))
        };
        let path = fax_settings_path(self.number);
        let body = format!(
            "<p>電話番号: {number}</p>\n{notice}<p><a href=\"{faxes}\">受信FAX一覧</a>（受信したFAXを見る）</p>\n\
             {errors}{form}<p><a href=\"{path}\">保存されている設定を開く</a></p>\n\
             <p><a href=\"/\">メニューへ戻る</a></p>\n{logout}",
            number = html::escape(self.number.as_str()),
            faxes = html::escape(&faxes_path(self.number)),
            errors = html::errors(errors),
            form = render(&path, &self.session.csrf, entered, rows, self.password_max),
            path = html::escape(&path),
            logout = html::logout_form(&self.session.csrf),
        );
        html::page("FAXお知らせメール設定", &body)
    }

    fn refused(&self, entered: &FaxEntered, error: &str) -> String {
        self.page("", entered, &[error.to_owned()], &HashMap::new())
    }
}

/// `GET /numbers/{number}/fax`.
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
        if let Some(page) = state.sessions.take_flash(&authed.id, &fax_settings_path(&number)).await? {
            return Ok(Html(page).into_response());
        }
    }
    let notice = if query.as_deref() == Some(SAVED_QUERY) { SAVED } else { "" };
    let view = View::new(&state, &number, &authed.session);
    Ok(Html(view.page(notice, &FaxEntered::from_settings(&settings), &[], &HashMap::new())).into_response())
}

/// `POST /numbers/{number}/fax`: saves the form, or shows it again with why not.
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
    if let Err(why) = FaxEntered::check_choices(&fields) {
        tracing::info!(%number, %why, "fax settings form refused: a value the form does not offer");
        return Err(SiteError::BadForm(why.to_string()));
    }

    let entered = FaxEntered::from_fields(&fields);
    let view = View::new(&state, &number, &session);
    let Some(version) = entered.version else { return Ok(stale(&view, &entered)) };
    let settings = match entered.parse() {
        Ok(settings) => settings,
        Err(rows) => return Ok(Html(view.page("", &entered, &[FIX_ROWS.to_owned()], &rows)).into_response()),
    };
    if settings.destinations != current.destinations {
        match confirm_change(&state, &id, &session, &fields, &number, PAGE).await? {
            Confirmed::Yes => {}
            Confirmed::Refused(why) => return Ok(Html(view.refused(&entered, why)).into_response()),
            Confirmed::Ended(response) => return Ok(response),
        }
    }

    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.save_fax_settings(&number, version, settings)).await? {
        Ok(saved) => {
            tracing::info!(login = %session.number, %number, version = saved, "fax settings saved");
            state.metrics.settings_saved();
            Ok(redirect_to(&format!("{}?{SAVED_QUERY}", fax_settings_path(&number))))
        }
        Err(StoreError::StaleVersion { current }) => {
            tracing::info!(login = %session.number, %number, version, current, "fax settings: stale form refused");
            Ok(stale(&view, &entered))
        }
        Err(error) => Err(error.into()),
    }
}

/// `409 Conflict`: the form was rendered from settings that changed since (R-S9); shown
/// again as entered, with the old version, so resubmitting it is refused too.
fn stale(view: &View<'_>, entered: &FaxEntered) -> Response {
    (StatusCode::CONFLICT, Html(view.refused(entered, STALE))).into_response()
}

/// `POST /numbers/{number}/fax/test/{row}`: 送信テスト (R-N2) of a destination row as
/// typed, nothing saved; the outcome is shown by the GET the browser is sent to, once.
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

    let entered = FaxEntered::from_fields(&fields);
    let tested = send_test(&state, &session, number, row, &entered.destinations, PAGE, MailService::Fax).await?;
    let page = View::new(&state, &number, &session).page(&tested.notice, &entered, &tested.errors, &tested.rows);
    let path = fax_settings_path(&number);
    state.sessions.set_flash(&id, path.clone(), page).await?;
    Ok(redirect_to(&format!("{path}?{TESTED}")))
}
