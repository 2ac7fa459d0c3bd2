//! The steps the call and fax settings pages share: show the stored settings, save a
//! submitted form, send a 送信テスト. A page ([`SettingsPage`]: `settings.rs`,
//! `fax_settings.rs`) says what differs (its settings, its form and their rendering,
//! how a save is stored); the order of the checks is here, once.
//!
//! A save carries the version the form was rendered from and the store refuses it if
//! the settings changed since (R-S9); a change of the destinations needs the current
//! password ([`confirm_change`]); every form carries the session's CSRF token; a
//! 送信テスト (R-N2) answers by Post/Redirect/Get. A number the page does not offer to
//! the session is not found, whatever the reason.

use std::collections::HashMap;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use engine::phone::PhoneNumber;
use engine::render::MailService;
use engine::store::{Destination, Store, StoreError};

use super::destinations::{
    confirm_change, send_test, test_row, Confirmed, FIX_ROWS, LOGGED_IN_AGAIN, SAVED, SAVED_QUERY, STALE, TESTED,
};
use super::form_parts::{ChoiceError, CurrentPassword, Row};
use super::numbers::not_found;
use super::password::ENTERED_MAX_LEN;
use super::session::Session;
use super::{csrf, require_session, Authed, Gate, SiteError, SiteState};

/// The form fields as posted.
type Fields = HashMap<String, String>;

/// What a settings page has of its own.
pub(super) trait SettingsPage: 'static {
    /// The stored settings it edits.
    type Settings: Send + 'static;
    /// Its form's values as entered (or as stored, for a fresh page), so a refused form
    /// is shown again with what the subscriber typed.
    type Form;
    /// Why rows of its form were refused, by row.
    type Rows: Default;
    /// How the page names itself in the log.
    const NAME: &'static str;
    /// Whose test mail its 送信テスト sends.
    const SERVICE: MailService;

    /// The page's path for `number`.
    fn path(number: &PhoneNumber) -> String;
    /// The number a URL names, if `login` may see it on this page, with its stored
    /// settings; `None` for anything else.
    fn settings_of(
        store: &Store,
        login: &PhoneNumber,
        raw: &str,
    ) -> Result<Option<(PhoneNumber, Self::Settings)>, StoreError>;
    fn destinations(settings: &Self::Settings) -> &[Destination];
    fn form_of(settings: &Self::Settings) -> Self::Form;
    /// The submitted fields; anything the form does not have is ignored.
    fn form_from(fields: &Fields) -> Self::Form;
    /// Whether every choice has a value the form offers.
    fn check_choices(fields: &Fields) -> Result<(), ChoiceError>;
    /// The version the form was rendered from (R-S9); `None`: missing or garbled.
    fn version(form: &Self::Form) -> Option<u64>;
    /// The 送信先 rows as typed (R-N2).
    fn destination_rows(form: &Self::Form) -> &[Row];
    /// The settings entered, version left at 0 (the store sets it); or the rows' errors.
    fn parse(form: &Self::Form) -> Result<Self::Settings, Self::Rows>;
    /// A 送信テスト's refusal of a 送信先 row's address (R-N3), as row errors.
    fn destination_errors(rows: HashMap<usize, String>) -> Self::Rows;
    /// The whole page: `notice` above the form (a status), `errors` as errors.
    fn render(view: &View<'_>, notice: &str, form: &Self::Form, errors: &[String], rows: &Self::Rows) -> String;
    /// Saves `settings` if the stored ones are still at `version`; the new version.
    fn save(store: &Store, number: &PhoneNumber, version: u64, settings: Self::Settings) -> Result<u64, StoreError>;
}

/// What every rendering of a settings page needs besides the form's values.
pub(super) struct View<'a> {
    pub number: &'a PhoneNumber,
    pub session: &'a Session,
    /// The 現在のパスワード field: its `maxlength` ([`ENTERED_MAX_LEN`]), and why the
    /// password given was refused.
    pub password: CurrentPassword,
}

impl<'a> View<'a> {
    fn new(number: &'a PhoneNumber, session: &'a Session) -> Self {
        Self { number, session, password: CurrentPassword { max: ENTERED_MAX_LEN, refused: None } }
    }

    /// The form shown again with one error above it.
    fn refused<P: SettingsPage>(&self, form: &P::Form, error: &str) -> String {
        P::render(self, "", form, &[error.to_owned()], &P::Rows::default())
    }

    /// The form shown again with its current password refused: said above the form
    /// (`error`) and beside the field (`beside`).
    fn password_refused<P: SettingsPage>(&self, form: &P::Form, error: &str, beside: &'static str) -> String {
        let view = View { password: CurrentPassword { refused: Some(beside), ..self.password }, ..*self };
        view.refused::<P>(form, error)
    }
}

/// [`SettingsPage::settings_of`] off the runtime.
async fn settings_of<P: SettingsPage>(
    state: &SiteState,
    login: PhoneNumber,
    raw: String,
) -> Result<Option<(PhoneNumber, P::Settings)>, SiteError> {
    state.read(move |store| P::settings_of(store, &login, &raw)).await
}

/// `GET`: the stored settings; after a save, with 設定しました; after a 送信テスト, the
/// page it left (once).
pub(super) async fn show<P: SettingsPage>(
    State(state): State<SiteState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, SiteError> {
    let authed = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    let Some((number, settings)) = settings_of::<P>(&state, authed.session.number, raw).await? else {
        return Ok(not_found());
    };
    // After a 送信テスト: its page, as typed, for the GETs of `?tested=1` until this page
    // is saved, tested again, or opened without it (a phone that dropped the tab while
    // its subscriber read the mail reloads it, and the address typed but not saved is
    // still there; a GET sends nothing).
    let tested = authed.session.flash.as_ref().filter(|(path, _)| *path == P::path(&number));
    if let Some((_, page)) = tested {
        if query.as_deref() == Some(TESTED) {
            return Ok(Html(page.clone()).into_response());
        }
        // The saved settings opened instead: the tested page is not kept any longer (the
        // session record, written at every request, carries it while it is).
        state.sessions.take_flash(&authed.id, &P::path(&number)).await?;
    }
    let notice = if query.as_deref() == Some(SAVED_QUERY) { SAVED } else { "" };
    let view = View::new(&number, &authed.session);
    Ok(Html(P::render(&view, notice, &P::form_of(&settings), &[], &P::Rows::default())).into_response())
}

/// A posted form's session, its CSRF token checked, and the number the URL names.
struct Posted<P: SettingsPage> {
    id: String,
    session: Session,
    number: PhoneNumber,
    current: P::Settings,
}

/// The checks before a posted form is looked at: a session past its first password,
/// the form's CSRF token, a number this page offers it. `Err`: the answer instead (the
/// login page, not found).
async fn posted<P: SettingsPage>(
    state: &SiteState,
    headers: &HeaderMap,
    raw: String,
    fields: &Fields,
) -> Result<Result<Posted<P>, Response>, SiteError> {
    let Authed { id, session } = match require_session(state, headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(Err(denied.into_response())),
    };
    let Some((number, current)) = settings_of::<P>(state, session.number, raw).await? else {
        return Ok(Err(not_found()));
    };
    if !csrf::matches(Some(&session.csrf), fields.get("csrf").map_or("", String::as_str)) {
        // A tab of this site left open from before a login in another tab carries the
        // old session's token: its form comes back as typed, with this session's,
        // saving and sending nothing (R-S9). Only when the browser says the form is this
        // site's own: a page of a sibling host (which SameSite lets send the session
        // cookie) gets the refusal, not a form it filled in with a working token for the
        // subscriber to press.
        if !own_page(headers) {
            return Err(SiteError::Csrf);
        }
        tracing::info!(page = P::NAME, %number, "settings form from before a login again: shown again, not saved");
        let page = View::new(&number, &session).refused::<P>(&P::form_from(fields), LOGGED_IN_AGAIN);
        return Ok(Err((StatusCode::FORBIDDEN, Html(page)).into_response()));
    }
    Ok(Ok(Posted { id, session, number, current }))
}

/// Whether the browser says a request comes from a page of this site: `Sec-Fetch-Site:
/// same-origin`, or, from a browser too old to send that (an old iPhone's, a phone's),
/// an `Origin` naming the host the request was sent to.
fn own_page(headers: &HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match header("sec-fetch-site") {
        Some(site) => site == "same-origin",
        None => header("origin")
            .and_then(|origin| origin.split_once("://"))
            .is_some_and(|(_, host)| header("host") == Some(host)),
    }
}

/// `POST`: saves the form, or shows it again with why not.
pub(super) async fn submit<P: SettingsPage>(
    State(state): State<SiteState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    form: Result<Form<Fields>, FormRejection>,
) -> Result<Response, SiteError> {
    let Form(fields) = form?;
    let Posted { id, session, number, current } = match posted::<P>(&state, &headers, raw, &fields).await? {
        Ok(posted) => posted,
        Err(answer) => return Ok(answer),
    };
    if let Err(why) = P::check_choices(&fields) {
        tracing::info!(page = P::NAME, %number, %why, "settings form refused: a value the form does not offer");
        return Err(SiteError::BadForm(why.to_string()));
    }

    let entered = P::form_from(&fields);
    let view = View::new(&number, &session);
    let Some(version) = P::version(&entered) else { return Ok(stale::<P>(&view, &entered)) };
    let settings = match P::parse(&entered) {
        Ok(settings) => settings,
        Err(rows) => return Ok(Html(P::render(&view, "", &entered, &[FIX_ROWS.to_owned()], &rows)).into_response()),
    };
    // A stale form first (R-S9): its rows differ from destinations saved since by
    // another window, which is no change of this form's to ask a password for.
    if P::version(&P::form_of(&current)) != Some(version) {
        tracing::info!(page = P::NAME, login = %session.number, %number, version, "stale settings form refused");
        return Ok(stale::<P>(&view, &entered));
    }
    if P::destinations(&settings) != P::destinations(&current) {
        match confirm_change(&state, &id, &session, &fields, &number, P::NAME).await? {
            Confirmed::Yes => {}
            Confirmed::Refused { why, beside } => {
                return Ok(Html(view.password_refused::<P>(&entered, why, beside)).into_response())
            }
            Confirmed::Ended(response) => return Ok(response),
        }
    }

    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || P::save(&store, &number, version, settings)).await? {
        Ok(saved) => {
            tracing::info!(page = P::NAME, login = %session.number, %number, version = saved, "settings saved");
            // The page of an earlier 送信テスト of this page is not shown again over what
            // is saved (another page's stays for it).
            if session.flash.as_ref().is_some_and(|(path, _)| *path == P::path(&number)) {
                state.sessions.take_flash(&id, &P::path(&number)).await?;
            }
            state.metrics.settings_saved();
            Ok(super::redirect(&format!("{}?{SAVED_QUERY}", P::path(&number))))
        }
        Err(StoreError::StaleVersion { current }) => {
            tracing::info!(page = P::NAME, login = %session.number, %number, version, current, "stale settings form refused");
            Ok(stale::<P>(&view, &entered))
        }
        Err(error) => Err(error.into()),
    }
}

/// `409 Conflict`: the form was rendered from settings that changed since (R-S9). The
/// entered values are shown again but not saved; the version field stays the old one, so
/// resubmitting this page is refused too and the subscriber must reload.
fn stale<P: SettingsPage>(view: &View<'_>, entered: &P::Form) -> Response {
    (StatusCode::CONFLICT, Html(view.refused::<P>(entered, STALE))).into_response()
}

/// `POST …/test/{row}`: 送信テスト (R-N2). Sends a test mail to the address typed in
/// destination row `row` (checked by R-N3), before it is saved, and shows the form again
/// exactly as typed with the outcome. Nothing is saved, so no password is asked: the
/// mail goes only to the address typed, never diverts anything.
pub(super) async fn test_mail<P: SettingsPage>(
    State(state): State<SiteState>,
    headers: HeaderMap,
    Path((raw, row)): Path<(String, String)>,
    form: Result<Form<Fields>, FormRejection>,
) -> Result<Response, SiteError> {
    let Form(fields) = form?;
    let Posted { id, session, number, .. } = match posted::<P>(&state, &headers, raw, &fields).await? {
        Ok(posted) => posted,
        Err(answer) => return Ok(answer),
    };
    let Some(row) = test_row(&row) else { return Ok(not_found()) };

    let entered = P::form_from(&fields);
    let rows = P::destination_rows(&entered);
    let tested = send_test(&state, &session, number, row, rows, P::NAME, P::SERVICE).await?;
    // Post/Redirect/Get: the page with the outcome is shown by the GET the browser is
    // sent to, and again by a reload, which sends no second mail.
    let view = View::new(&number, &session);
    let page = P::render(&view, &tested.notice, &entered, &tested.errors, &P::destination_errors(tested.rows));
    let path = P::path(&number);
    state.sessions.set_flash(&id, path.clone(), page).await?;
    Ok(super::redirect(&format!("{path}?{TESTED}")))
}
