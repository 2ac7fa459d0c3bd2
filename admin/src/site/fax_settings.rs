//! FAXお知らせメール設定: `GET/POST /numbers/{number}/fax` and
//! `POST /numbers/{number}/fax/test/{row}` (R-F1: the same site and login as for calls).
//!
//! What a fax mail needs: 開始/停止 (R-N1) and up to five 送信先 with their 送信 checks and
//! 送信テスト buttons (R-N2, R-N3), as on the call page and built from the same parts
//! ([`super::form_parts`], [`super::destinations`]), and, beyond the seed,
//! 「FAXをPDFで添付する」 for subscribers who read their mail where the site is out of
//! reach. A fax has no caller conditions, so there are no R-N4/R-N5 sections.
//!
//! The call page's rules hold here too, by the same handlers ([`super::settings_page`]):
//! a save from a stale form is refused (R-S9), a change of the destinations needs the
//! current password, every form carries the session's CSRF token, and a 送信テスト answers
//! by Post/Redirect/Get. A number that is not one of the session's fax numbers is not
//! found, whatever the reason.

use std::collections::HashMap;

use engine::phone::PhoneNumber;
use engine::render::MailService;
use engine::store::{Destination, FaxSettings, Store, StoreError};

use super::form_parts::{
    check_attr, check_form_choices, destination_rows, destination_rows_from_fields, destinations_fieldset,
    enabled_fieldset, form_start, parse_destinations, ChoiceError, CurrentPassword, Row,
};
use super::html;
use super::numbers::{allowed_fax_number, fax_settings_path, faxes_path};
use super::settings_page::{SettingsPage, View};

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
    password: CurrentPassword,
) -> String {
    let mut out = form_start(action, csrf, entered.version);
    out += &enabled_fieldset(entered.enabled);
    out += &destinations_fieldset(action, &entered.destinations, rows, password);
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

/// `GET/POST /numbers/{number}/fax`, `POST /numbers/{number}/fax/test/{row}`: the
/// handlers of [`super::settings_page`] for this page.
pub(super) struct FaxPage;

impl SettingsPage for FaxPage {
    type Settings = FaxSettings;
    type Form = FaxEntered;
    type Rows = HashMap<usize, String>;
    const NAME: &'static str = "fax settings";
    const SERVICE: MailService = MailService::Fax;

    fn path(number: &PhoneNumber) -> String {
        fax_settings_path(number)
    }

    /// Another subscriber's number, or a number without fax, is `None`.
    fn settings_of(
        store: &Store,
        login: &PhoneNumber,
        raw: &str,
    ) -> Result<Option<(PhoneNumber, FaxSettings)>, StoreError> {
        let Some(number) = allowed_fax_number(store, login, raw)? else { return Ok(None) };
        Ok(store.number(&number)?.map(|record| (number, record.fax)))
    }

    fn destinations(settings: &FaxSettings) -> &[Destination] {
        &settings.destinations
    }

    fn form_of(settings: &FaxSettings) -> FaxEntered {
        FaxEntered::from_settings(settings)
    }

    fn form_from(fields: &HashMap<String, String>) -> FaxEntered {
        FaxEntered::from_fields(fields)
    }

    fn check_choices(fields: &HashMap<String, String>) -> Result<(), ChoiceError> {
        FaxEntered::check_choices(fields)
    }

    fn version(form: &FaxEntered) -> Option<u64> {
        form.version
    }

    fn destination_rows(form: &FaxEntered) -> &[Row] {
        &form.destinations
    }

    fn parse(form: &FaxEntered) -> Result<FaxSettings, HashMap<usize, String>> {
        form.parse()
    }

    fn destination_errors(rows: HashMap<usize, String>) -> HashMap<usize, String> {
        rows
    }

    fn render(
        view: &View<'_>,
        notice: &str,
        entered: &FaxEntered,
        errors: &[String],
        rows: &HashMap<usize, String>,
    ) -> String {
        let notice = if notice.is_empty() {
            String::new()
        } else {
            format!("<p class=\"notice\" role=\"status\">{}</p>\n", html::escape(notice))
        };
        let path = fax_settings_path(view.number);
        let body = format!(
            "<p>電話番号: {number}</p>\n{notice}<p><a href=\"{faxes}\">受信FAX一覧</a>（受信したFAXを見る）</p>\n\
             {errors}{form}<p><a href=\"{path}\">保存されている設定を開く</a></p>\n\
             <p><a href=\"/\">メニューへ戻る</a></p>\n{logout}",
            number = html::escape(view.number.as_str()),
            faxes = html::escape(&faxes_path(view.number)),
            errors = html::errors(errors),
            form = render(&path, &view.session.csrf, entered, rows, view.password),
            path = html::escape(&path),
            logout = html::logout_form(&view.session.csrf),
        );
        html::page("FAXお知らせメール設定", &body)
    }

    fn save(store: &Store, number: &PhoneNumber, version: u64, settings: FaxSettings) -> Result<u64, StoreError> {
        store.save_fax_settings(number, version, settings)
    }
}
