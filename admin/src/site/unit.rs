//! 認証単位変更: `GET/POST /unit` (R-O2, R-O3), offered only to a session whose login
//! number is the line's contract number; any other login gets the same 404 as a guessed
//! URL.
//!
//! - Unit `line` → `number` (R-O3): the subscriber enters the current password.
//!   Afterwards the contract number keeps its credential and every additional number's
//!   credential is removed, so each needs a new temporary password by phone.
//! - Unit `number` → `line` (R-O2): the subscriber enters the password of the contract
//!   number and of every additional number that logs in (call or fax notification; one
//!   without a password yet gets a temporary one by phone first). Every one is checked
//!   (each wrong one counts as a failed attempt, R-S2/R-S3) and the page names each number
//!   that failed; unless all are right nothing changes. Afterwards the contract number's
//!   password is the line's, and the additional numbers' credentials are removed.
//! - Unit `admin_user`, or no unit yet: SERVICE.md describes no change from or to
//!   `admin_user`, so the page says the change is not offered here; the unit is chosen
//!   by phone instead (R-I7).
//!
//! A change ends every session of the line's numbers (the login unit, and so what each
//! login covers and its idle timeout, changed) and sends the browser to the login page
//! with a notice.

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use engine::phone::PhoneNumber;
use engine::store::{AuthUnit, LineRecord, Store, StoreError};

use super::session::Session;
use super::{csrf, html, redirect, require_session, with_cookies, Authed, Gate, SiteError, SiteState};
use crate::credentials::LoginFailure;

/// Where the browser goes after a change to unit `number` (R-O3).
pub const DONE_NUMBER: &str = "/login?notice=unit_number";
/// Where the browser goes after a change to unit `line` (R-O2).
pub const DONE_LINE: &str = "/login?notice=unit_line";

const STALE: &str = "認証単位が別の画面で変更されています。内容を確認して、もう一度操作してください。";
const WRONG: &str = "パスワードが正しくありません。";
const EMPTY: &str = "パスワードを入力してください。";

/// The login page's notice for the query `query` of [`DONE_NUMBER`] or [`DONE_LINE`], or of a
/// session ended for a reason the subscriber must know.
pub fn login_notice(query: Option<&str>) -> Option<&'static str> {
    match query? {
        "notice=unit_number" => Some(
            "認証単位を電話番号単位に変更しました。契約番号と、そのパスワードでログインしてください。\
             追加番号でログインするには、仮パスワード設定ダイヤルで仮パスワードを設定してください。",
        ),
        "notice=unit_line" => Some(
            "認証単位を回線単位に変更しました。契約番号と、そのパスワード（回線のパスワード）でログインしてください。",
        ),
        "notice=invalidated" => Some(
            "パスワードを続けて誤って入力されたため、パスワードが無効になりました。\
             ご契約の回線の電話から仮パスワード設定ダイヤルで仮パスワードを設定してください。",
        ),
        "notice=expired" => Some(
            "仮パスワードの有効期限（24時間）が過ぎたため、仮パスワードが無効になりました。\
             ご契約の回線の電話から仮パスワード設定ダイヤルで仮パスワードを設定し直してください。",
        ),
        "notice=logout" => Some("ログアウトしました。共用のパソコンなどをお使いの場合は、ブラウザーを閉じてください。"),
        "notice=ended" => Some(
            "一定時間操作がなかったか、パスワードが変更されたため、ログアウトしました。もう一度ログインしてください。\
             （入力中の内容は保存されていません。）",
        ),
        _ => None,
    }
}

/// The line of `login` if `login` is its contract number: only then is /unit offered.
pub fn contract_line(store: &Store, login: &PhoneNumber) -> Result<Option<LineRecord>, StoreError> {
    let Some(record) = store.number(login)? else { return Ok(None) };
    if record.contract != *login {
        return Ok(None);
    }
    store.line(login)
}

/// The numbers whose passwords R-O2 asks for: the contract number first (its password
/// becomes the line's), then every additional number that logs in (call or fax
/// notification): after the change the line's login reaches its settings and faxes.
pub fn numbers_to_confirm(store: &Store, line: &LineRecord) -> Result<Vec<PhoneNumber>, StoreError> {
    let mut numbers = vec![line.contract];
    for number in &line.numbers {
        if *number != line.contract
            && store.number(number)?.is_some_and(|record| record.services.call || record.services.fax)
        {
            numbers.push(*number);
        }
    }
    Ok(numbers)
}

/// The form field of `number`'s password on the R-O2 page.
fn field_name(number: &PhoneNumber) -> String {
    format!("pw_{}", number.as_str())
}

/// The value of the hidden `from` field: the unit the form was made for.
fn unit_name(unit: Option<AuthUnit>) -> &'static str {
    match unit {
        Some(AuthUnit::Line) => "line",
        Some(AuthUnit::Number) => "number",
        Some(AuthUnit::AdminUser) => "admin_user",
        None => "",
    }
}

pub async fn show(State(state): State<SiteState>, headers: HeaderMap) -> Result<Response, SiteError> {
    let authed = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    let Some((line, numbers)) = load(&state, authed.session.number).await? else {
        return contract_only(&state, authed.session.number).await;
    };
    page(&authed.session, &line, &numbers, &[])
}

/// /unit for a login that is not the line's contract number (a number credential, an
/// admin_user user): what it is for and who can do it, not "not found".
async fn contract_only(state: &SiteState, login: PhoneNumber) -> Result<Response, SiteError> {
    let by_phone = state.read(move |store| phone_route(store, &login)).await?;
    // A line under `number` whose contract number has no service has no password for it
    // (R-I3): the phone is its way to the line unit (R-I2, R-I7). Not said to others: an
    // admin_user user is refused unit 1 by phone, and a line whose contract number logs
    // in changes here, with every number's password (R-O2).
    let by_phone = if by_phone {
        "<p>ご契約の回線の電話から仮パスワード設定ダイヤル（06-6480-6430）に電話し、「1」（回線単位）を選んで\
         仮パスワードを設定すると、回線単位に変更できます。変更後は回線の契約番号と仮パスワードでログインし、\
         この電話番号のパスワードは使えなくなります。</p>\n"
    } else {
        ""
    };
    let body = format!(
        "<p>認証単位の変更は、回線の契約番号でログインしたときにできます。\
         この電話番号のログインでは変更できません。</p>\n{by_phone}<p><a href=\"/\">メニューへ戻る</a></p>\n"
    );
    Ok((StatusCode::FORBIDDEN, Html(html::page("認証単位変更", &body))).into_response())
}

/// Whether `login`'s line is under `number` and its contract number has no service, so
/// no password to log in with and change the unit here.
fn phone_route(store: &Store, login: &PhoneNumber) -> Result<bool, StoreError> {
    let Some(record) = store.number(login)? else { return Ok(false) };
    let Some(line) = store.line(&record.contract)? else { return Ok(false) };
    let contract_has_service =
        store.number(&line.contract)?.is_some_and(|contract| contract.services.call || contract.services.fax);
    Ok(line.unit == Some(AuthUnit::Number) && !contract_has_service)
}

pub async fn submit(
    State(state): State<SiteState>,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response, SiteError> {
    let Form(fields) = form?;
    let field = |name: &str| fields.iter().find(|(key, _)| key == name).map_or("", |(_, value)| value.as_str());
    let Authed { id, session } = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    if !csrf::matches(Some(&session.csrf), field("csrf")) {
        return Err(SiteError::Csrf);
    }
    let Some((line, numbers)) = load(&state, session.number).await? else {
        return contract_only(&state, session.number).await;
    };
    // A form made for another unit (changed meanwhile in another window, R-S9) changes
    // nothing.
    if field("from") != unit_name(line.unit) {
        return page(&session, &line, &numbers, &[STALE.to_owned()]);
    }
    let now = state.clock.now();
    match line.unit {
        Some(AuthUnit::Line) => {
            // R-O3: the line's password, which is the contract number's.
            let password = field("password");
            if password.is_empty() {
                return page(&session, &line, &numbers, &[EMPTY.to_owned()]);
            }
            match state.credentials.verify_async(line.contract, password.to_owned(), now).await? {
                Ok(_) => {}
                Err(LoginFailure::Wrong) => {
                    tracing::info!(number = %line.contract, "site unit change to number: wrong password");
                    return page(&session, &line, &numbers, &[WRONG.to_owned()]);
                }
                Err(failure) => return credential_gone(&state, &id, &line.contract, failure).await,
            }
            change(&state, &line, AuthUnit::Number).await?;
            ended(&state, &line, DONE_NUMBER).await
        }
        Some(AuthUnit::Number) => {
            // R-O2: every number's password, all right, or nothing changes.
            let missing: Vec<String> = numbers
                .iter()
                .filter(|number| field(&field_name(number)).is_empty())
                .map(|number| format!("{}番の{EMPTY}", number.as_str()))
                .collect();
            if !missing.is_empty() {
                return page(&session, &line, &numbers, &missing);
            }
            let mut errors = Vec::new();
            let mut contract_gone = None;
            for number in &numbers {
                let password = field(&field_name(number)).to_owned();
                match state.credentials.verify_async(*number, password, now).await? {
                    Ok(_) => {}
                    Err(LoginFailure::Wrong) => errors.push(format!("{}番の{WRONG}", number.as_str())),
                    Err(failure) if *number == line.contract => contract_gone = Some(failure),
                    Err(_) => errors.push(format!(
                        "{}番のパスワードは使えません（無効になったか、設定されていません）。\
                         仮パスワード設定ダイヤルで仮パスワードを設定してから、もう一度操作してください。",
                        number.as_str()
                    )),
                }
            }
            if let Some(failure) = contract_gone {
                return credential_gone(&state, &id, &line.contract, failure).await;
            }
            if !errors.is_empty() {
                tracing::info!(line = %line.contract, failed = errors.len(), "site unit change to line refused");
                return page(&session, &line, &numbers, &errors);
            }
            change(&state, &line, AuthUnit::Line).await?;
            ended(&state, &line, DONE_LINE).await
        }
        Some(AuthUnit::AdminUser) | None => page(&session, &line, &numbers, &[]),
    }
}

/// Sets `line`'s unit to `unit` and removes the credentials of its additional numbers:
/// after R-O3 each needs a new temporary password by phone; after R-O2 the contract
/// number's password is the only one the line logs in with. The credentials go first
/// ([`Store::change_line_unit`]).
async fn change(state: &SiteState, line: &LineRecord, unit: AuthUnit) -> Result<(), SiteError> {
    let (store, line) = (state.store.clone(), line.clone());
    tokio::task::spawn_blocking(move || -> Result<(), SiteError> {
        let additional: Vec<PhoneNumber> =
            line.numbers.iter().filter(|number| **number != line.contract).copied().collect();
        store.change_line_unit(&line.contract, unit, &additional)?;
        tracing::info!(line = %line.contract, ?unit, "site unit changed");
        Ok(())
    })
    .await?
}

/// The line of `login` if it is the contract number (else `None`: no /unit), and the
/// numbers whose passwords R-O2 asks for; read off the async workers.
async fn load(state: &SiteState, login: PhoneNumber) -> Result<Option<(LineRecord, Vec<PhoneNumber>)>, SiteError> {
    state
        .read(move |store| {
            let Some(line) = contract_line(store, &login)? else { return Ok(None) };
            let numbers = numbers_to_confirm(store, &line)?;
            Ok(Some((line, numbers)))
        })
        .await
}

/// Ends every session of `line`'s numbers and sends the browser to `location`.
async fn ended(state: &SiteState, line: &LineRecord, location: &'static str) -> Result<Response, SiteError> {
    state.sessions.remove_line(&line.numbers).await?;
    Ok(with_cookies(redirect(location), [state.set_cookie(&state.session_cookie(), None)]))
}

/// The contract number's credential died under the session (locked by wrong entries,
/// or removed): as on the password page, the session ends.
async fn credential_gone(
    state: &SiteState,
    id: &str,
    contract: &PhoneNumber,
    failure: LoginFailure,
) -> Result<Response, SiteError> {
    tracing::info!(number = %contract, outcome = ?failure, "site unit change: credential unusable");
    super::credential_died(state, id, failure).await
}

/// The page for `line`'s current unit, with `errors` above the form.
fn page(
    session: &Session,
    line: &LineRecord,
    numbers: &[PhoneNumber],
    errors: &[String],
) -> Result<Response, SiteError> {
    let contract = html::escape(line.contract.as_str());
    let from = html::csrf_field(&session.csrf)
        + &format!("<input type=\"hidden\" name=\"from\" value=\"{}\">\n", unit_name(line.unit));
    let max = super::password::ENTERED_MAX_LEN;
    let additional: Vec<&PhoneNumber> = line.numbers.iter().filter(|number| **number != line.contract).collect();
    let body = match line.unit {
        Some(AuthUnit::Line) => {
            let lose = if additional.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = additional.iter().map(|number| html::escape(number.as_str())).collect();
                format!(
                    "<p>追加番号（{}）は、変更後、仮パスワード設定ダイヤル（06-6480-6430）で仮パスワードを\
                     設定するまでログインできません。</p>\n",
                    list.join("、")
                )
            };
            format!(
                "<p>現在の認証単位: 回線単位</p>\n<p>電話番号単位に変更すると、契約番号（{contract}）には\
                 今のパスワードでログインします。</p>\n{lose}{errors}\
                 <form method=\"post\" action=\"/unit\">\n{from}\
                 <p><label for=\"password\">パスワード</label><br>\n\
                 <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" \
                 maxlength=\"{max}\" required></p>\n\
                 <p><button type=\"submit\">電話番号単位に変更する</button></p>\n</form>\n",
                errors = html::errors(errors),
            )
        }
        Some(AuthUnit::Number) => {
            let fields: String = numbers
                .iter()
                .map(|number| {
                    let name = html::escape(&field_name(number));
                    format!(
                        "<p><label for=\"{name}\">{number}番のパスワード</label><br>\n\
                         <input id=\"{name}\" name=\"{name}\" type=\"password\" autocomplete=\"off\" \
                         maxlength=\"{max}\" required></p>\n",
                        number = html::escape(number.as_str()),
                    )
                })
                .collect();
            format!(
                "<p>現在の認証単位: 電話番号単位</p>\n<p>回線単位に変更するには、着信お知らせメール\
                 またはFAXお知らせメールをご契約の電話番号すべてのパスワードを入力してください。変更後は、契約番号（{contract}）と\
                 そのパスワードで回線のすべての電話番号を設定します。追加番号のパスワードは削除されます。</p>\n\
                 {errors}<form method=\"post\" action=\"/unit\">\n{from}{fields}\
                 <p><button type=\"submit\">回線単位に変更する</button></p>\n</form>\n",
                errors = html::errors(errors),
            )
        }
        Some(AuthUnit::AdminUser) | None => {
            let why = if line.unit.is_some() {
                "管理者/ユーザー単位の回線では、このサイトで認証単位を変更することはできません。"
            } else {
                "この回線の認証単位はまだ設定されていません。"
            };
            format!(
                "<p>{why}認証単位は、仮パスワード設定ダイヤル（06-6480-6430）で仮パスワードを設定するときに\
                 選べます。</p>\n"
            )
        }
    };
    let body = format!("{body}<p><a href=\"/\">メニューへ戻る</a></p>\n");
    Ok(Html(html::page("認証単位変更", &body)).into_response())
}
