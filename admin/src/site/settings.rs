//! 着信お知らせメール設定: `GET/POST /numbers/{number}/call`, one page per number with
//! the four sections of R-N1..R-N5 in one form ([`super::settings_form`]).
//!
//! A save carries the version the form was rendered from and the store refuses it if
//! the settings changed since (R-S9), so a second browser window never silently
//! overwrites the first. Changing the destination addresses needs the current password:
//! whoever finds a logged-in browser must not be able to divert the notifications.
//!
//! Each destination row's 送信テスト button (R-N2) posts the whole form to
//! `POST /numbers/{number}/call/test/{row}`: a test mail goes to the address as typed in
//! that row, and the form comes back as typed, nothing saved. The handlers are
//! [`super::settings_page`]'s, shared with the FAXお知らせメール page; this page gives
//! them its settings, form and rendering ([`CallPage`]).

use std::collections::HashMap;

use engine::phone::PhoneNumber;
use engine::render::MailService;
use engine::store::{CallSettings, Destination, Store, StoreError};

use super::form_parts::{ChoiceError, Row};
use super::html;
use super::numbers::{allowed_number, call_settings_path};
use super::settings_form::{render, Entered, RowErrors};
use super::settings_page::{SettingsPage, View};

/// `GET/POST /numbers/{number}/call`, `POST /numbers/{number}/call/test/{row}`: the
/// handlers of [`super::settings_page`] for this page.
pub(super) struct CallPage;

impl SettingsPage for CallPage {
    type Settings = CallSettings;
    type Form = Entered;
    type Rows = RowErrors;
    const NAME: &'static str = "call settings";
    const SERVICE: MailService = MailService::Call;

    fn path(number: &PhoneNumber) -> String {
        call_settings_path(number)
    }

    /// Another subscriber's number, or a number re-provisioned away, is `None`.
    fn settings_of(
        store: &Store,
        login: &PhoneNumber,
        raw: &str,
    ) -> Result<Option<(PhoneNumber, CallSettings)>, StoreError> {
        let Some(number) = allowed_number(store, login, raw)? else { return Ok(None) };
        Ok(store.number(&number)?.map(|record| (number, record.call)))
    }

    fn destinations(settings: &CallSettings) -> &[Destination] {
        &settings.destinations
    }

    fn form_of(settings: &CallSettings) -> Entered {
        Entered::from_settings(settings)
    }

    fn form_from(fields: &HashMap<String, String>) -> Entered {
        Entered::from_fields(fields)
    }

    fn check_choices(fields: &HashMap<String, String>) -> Result<(), ChoiceError> {
        Entered::check_choices(fields)
    }

    fn version(form: &Entered) -> Option<u64> {
        form.version
    }

    fn destination_rows(form: &Entered) -> &[Row] {
        &form.destinations
    }

    fn parse(form: &Entered) -> Result<CallSettings, RowErrors> {
        form.parse()
    }

    fn destination_errors(rows: HashMap<usize, String>) -> RowErrors {
        RowErrors { destinations: rows, ..RowErrors::default() }
    }

    fn render(view: &View<'_>, notice: &str, entered: &Entered, errors: &[String], rows: &RowErrors) -> String {
        let notice = if notice.is_empty() {
            String::new()
        } else {
            format!("<p class=\"notice\" role=\"status\">{}</p>\n", html::escape(notice))
        };
        let path = call_settings_path(view.number);
        let body = format!(
            "<p>電話番号: {number}</p>\n{notice}{errors}{form}<p><a href=\"{path}\">保存されている設定を開く</a></p>\n\
             <p><a href=\"/\">メニューへ戻る</a></p>\n{logout}",
            number = html::escape(view.number.as_str()),
            errors = html::errors(errors),
            form = render(&path, &view.session.csrf, entered, rows, view.password),
            path = html::escape(&path),
            logout = html::logout_form(&view.session.csrf),
        );
        html::page("着信お知らせメール設定", &body)
    }

    fn save(store: &Store, number: &PhoneNumber, version: u64, settings: CallSettings) -> Result<u64, StoreError> {
        store.save_call_settings(number, version, settings)
    }
}
