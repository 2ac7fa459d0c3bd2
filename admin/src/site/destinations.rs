//! 送信先メールアドレス (R-N2, R-N3) as the 着信お知らせメール and FAXお知らせメール settings
//! pages both handle them ([`super::settings`], [`super::fax_settings`]): the current
//! password a change of them needs, the 送信テスト of one row, and the messages and
//! redirects of a save.
//!
//! One place for both pages, so a rule learnt on one (a wrong password counts towards
//! the lock; a test mail is sent once, Post/Redirect/Get) cannot be missing on the other.

use std::collections::HashMap;

use axum::response::Response;
use engine::address::DestinationAddress;
use engine::deliver::{TestMailError, TEST_MAILS_PER_MINUTE};
use engine::phone::PhoneNumber;
use engine::render::MailService;
use engine::store::MAX_DESTINATIONS;
use engine::telemetry::TestMail;

use super::form_parts::{address_message, Row};
use super::session::Session;
use super::{SiteError, SiteState};
use crate::credentials::LoginFailure;

pub(super) const SAVED: &str = "設定しました。";
pub(super) const FIX_ROWS: &str =
    "入力内容に誤りがあります。各欄のメッセージを確認してください。設定は保存されていません。";
const NEED_PASSWORD: &str =
    "送信先メールアドレスや「送信」のチェックを変更するには、現在のパスワードを入力してください。\
                             設定は保存されていません。";
/// A form of a session's page from before a login in another tab (its token is the old
/// session's): shown again as typed, with this session's token.
pub(super) const LOGGED_IN_AGAIN: &str = "別の画面でログインし直したため、この画面の内容はまだ保存されていません。\
                                          内容を確かめて、もう一度ボタンを押してください。";
const WRONG_PASSWORD: &str = "現在のパスワードが正しくありません。設定は保存されていません。";
const TEST_UNAVAILABLE: &str = "現在、テストメールの送信はご利用いただけません。";
const TEST_FIX_ROW: &str =
    "入力内容に誤りがあります。欄のメッセージを確認してください。テストメールは送信されていません。";
pub(super) const STALE: &str = "この設定は、別の画面で変更されています。ここで入力した内容は保存されていません。\
                                ページを開き直して、最新の設定を確認してから、もう一度設定してください。";

/// The query of the GET after a 送信テスト, which shows the page kept as a flash.
pub(super) const TESTED: &str = "tested=1";
/// The query of the GET after a save.
pub(super) const SAVED_QUERY: &str = "saved=1";

/// Whether a change of the destinations may be saved.
pub(super) enum Confirmed {
    /// The current password was given and is right.
    Yes,
    /// Not saved: the message to show above the form (`why`), and beside the password
    /// field (`beside`).
    Refused { why: &'static str, beside: &'static str },
    /// The credential became unusable (locked by wrong entries): the session has ended
    /// and the browser goes to the login page.
    Ended(Response),
}

/// Checks the current password (field `current`) a change of the destinations needs:
/// whoever finds a logged-in browser must not be able to divert the notifications.
/// `page` names the settings page in the log.
pub(super) async fn confirm_change(
    state: &SiteState,
    id: &str,
    session: &Session,
    fields: &HashMap<String, String>,
    number: &PhoneNumber,
    page: &'static str,
) -> Result<Confirmed, SiteError> {
    let password = fields.get("current").cloned().unwrap_or_default();
    if password.is_empty() {
        return Ok(Confirmed::Refused {
            why: NEED_PASSWORD, beside: "現在のパスワードを入力してください。"
        });
    }
    // A wrong entry here counts towards the credential's lock like one at login
    // (R-S3), so this field cannot be used to guess the password without limit.
    match state.credentials.verify_async(session.number, password, state.clock.now()).await? {
        Ok(_) => Ok(Confirmed::Yes),
        Err(LoginFailure::Wrong) => {
            tracing::info!(login = %session.number, %number, "{page}: wrong current password");
            Ok(Confirmed::Refused {
                why: WRONG_PASSWORD, beside: "現在のパスワードが正しくありません。"
            })
        }
        // The credential died under the session (locked by wrong entries): a new one
        // must be set by phone, so the session ends as after a failed login.
        Err(failure) => {
            tracing::info!(login = %session.number, outcome = ?failure, "{page}: credential unusable");
            Ok(Confirmed::Ended(super::credential_died(state, id, failure).await?))
        }
    }
}

/// The destination row a 送信テスト URL names, if the form has it.
pub(super) fn test_row(raw: &str) -> Option<usize> {
    raw.parse::<usize>().ok().filter(|row| *row < MAX_DESTINATIONS)
}

/// What the page says after a 送信テスト.
#[derive(Debug, Default)]
pub(super) struct Tested {
    /// Above the form, as a notice: the mail went.
    pub notice: String,
    /// Above the form, as errors: why it did not.
    pub errors: Vec<String>,
    /// Beside the row: why its address was refused (R-N3).
    pub rows: HashMap<usize, String>,
}

impl Tested {
    fn error(message: String) -> Self {
        Self { errors: vec![message], ..Self::default() }
    }
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

/// Sends the test mail of destination row `row` as typed in `rows` (checked by R-N3),
/// before it is saved. Nothing is saved, so no password is asked: the mail goes only to
/// the address typed, never diverts anything. `page` names the settings page in the log;
/// `service` is whose test mail it is.
pub(super) async fn send_test(
    state: &SiteState,
    session: &Session,
    number: PhoneNumber,
    row: usize,
    rows: &[Row],
    page: &'static str,
    service: MailService,
) -> Result<Tested, SiteError> {
    let Some(mailer) = state.test_mailer.as_deref() else {
        return Ok(Tested::error(TEST_UNAVAILABLE.to_owned()));
    };
    let text = rows.get(row).map_or("", |row| row.text.as_str());
    if text.is_empty() {
        return Ok(Tested::error(test_empty(row)));
    }
    let address = match DestinationAddress::parse(text) {
        Ok(address) => address,
        Err(error) => {
            let mut tested = Tested::error(TEST_FIX_ROW.to_owned());
            tested.rows.insert(row, address_message(&error));
            return Ok(tested);
        }
    };
    let line = state.read(move |store| Ok(store.number(&number)?.map_or(number, |record| record.contract))).await?;
    Ok(match mailer.send(&line, &number, &address, service).await {
        Ok(()) => {
            tracing::info!(login = %session.number, %number, row, "{page}: test mail sent");
            state.metrics.test_mail(TestMail::Sent);
            Tested { notice: test_sent(&address), ..Tested::default() }
        }
        Err(error) => {
            tracing::info!(login = %session.number, %number, row, %error, "{page}: test mail refused");
            let limited = matches!(error, TestMailError::TooMany);
            state.metrics.test_mail(if limited { TestMail::Limited } else { TestMail::Failed });
            Tested::error(test_failed(&address, &error))
        }
    })
}
