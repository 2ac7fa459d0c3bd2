//! 電話番号選択 (R-C2): which numbers a session may configure, and the choice among them
//! when the login credential covers several: `GET /numbers` for 着信お知らせメール,
//! `GET /fax` for FAXお知らせメール (R-F1), each number with its settings at a glance.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use engine::phone::PhoneNumber;
use engine::store::{AuthUnit, Destination, Services, Store, StoreError};

use super::{html, require_session, Gate, SiteError, SiteState};

/// The numbers with call notification (着信お知らせメール) contracted that a login with
/// `login` may see and change, in the line's order (R-A1..R-A3, R-C2):
///
/// - unit `line`, and the `admin_user` administrator (the login is the contract
///   number): every number of the line with `services.call`;
/// - unit `number`, an `admin_user` user, or a line whose unit is not set yet: the login
///   number only, if it has `services.call`.
pub fn call_numbers(store: &Store, login: &PhoneNumber) -> Result<Vec<PhoneNumber>, StoreError> {
    reachable_numbers(store, login, |services| services.call)
}

/// The numbers with fax notification (FAXお知らせメール) contracted that a login with
/// `login` may see and change, and whose received faxes it may read (R-F1: the same
/// site and login): the rule of [`call_numbers`], for `services.fax`.
pub fn fax_numbers(store: &Store, login: &PhoneNumber) -> Result<Vec<PhoneNumber>, StoreError> {
    reachable_numbers(store, login, |services| services.fax)
}

/// The numbers `login` reaches by its unit (R-A1..R-A3) that have contracted the service
/// `contracted` picks.
fn reachable_numbers(
    store: &Store,
    login: &PhoneNumber,
    contracted: impl Fn(&Services) -> bool,
) -> Result<Vec<PhoneNumber>, StoreError> {
    let Some(record) = store.number(login)? else { return Ok(Vec::new()) };
    let line = store.line(&record.contract)?;
    // Only the contract number's login reaches the whole line (R-A1, R-A3). Under `line`
    // an additional number has no password; one it got anyway (a change of unit by phone
    // that set it and then failed to set the unit) reaches that number only.
    let whole_line = match line.as_ref().and_then(|line| line.unit) {
        Some(AuthUnit::Line | AuthUnit::AdminUser) => *login == record.contract,
        Some(AuthUnit::Number) | None => false,
    };
    let candidates = match line {
        Some(line) if whole_line => line.numbers,
        _ => vec![*login],
    };
    let mut numbers = Vec::with_capacity(candidates.len());
    for number in candidates {
        if store.number(&number)?.is_some_and(|record| contracted(&record.services)) {
            numbers.push(number);
        }
    }
    Ok(numbers)
}

/// `raw`, the number in a URL, if it is one of the session's call numbers; `None` for
/// anything else, so a guessed URL never shows another subscriber's settings.
pub fn allowed_number(store: &Store, login: &PhoneNumber, raw: &str) -> Result<Option<PhoneNumber>, StoreError> {
    let Ok(number) = PhoneNumber::parse(raw) else { return Ok(None) };
    Ok(call_numbers(store, login)?.contains(&number).then_some(number))
}

/// `raw`, the number in a URL, if it is one of the session's fax numbers; `None` for
/// anything else, so a guessed URL never shows another subscriber's settings or faxes.
pub fn allowed_fax_number(store: &Store, login: &PhoneNumber, raw: &str) -> Result<Option<PhoneNumber>, StoreError> {
    let Ok(number) = PhoneNumber::parse(raw) else { return Ok(None) };
    Ok(fax_numbers(store, login)?.contains(&number).then_some(number))
}

/// The page for a number the session may not see: the same whether the number does not
/// exist or belongs to someone else.
pub fn not_found() -> Response {
    let body = "<p>指定された電話番号の設定は表示できません。</p>\n<p><a href=\"/\">メニューへ戻る</a></p>\n";
    (StatusCode::NOT_FOUND, Html(html::page("ページが見つかりません", body))).into_response()
}

/// Each of `numbers` with its settings at a glance: 開始/停止, the destinations whose
/// 送信 is checked, and the send conditions (R-N1, R-N2, R-N4), each number a link to
/// its settings page.
pub fn state_table(store: &Store, numbers: &[PhoneNumber]) -> Result<String, StoreError> {
    let mut rows = String::new();
    for number in numbers {
        let Some(record) = store.number(number)? else { continue };
        let call = &record.call;
        let state = state_cell(call.enabled);
        let sending = sending_cell(&call.destinations);
        let conditions = match (call.missed_only, call.designated_only) {
            (false, false) => "すべての着信",
            (true, false) => "応答できなかった着信のみ",
            (false, true) => "指定した電話番号からの着信のみ",
            (true, true) => "指定した電話番号からの、応答できなかった着信のみ",
        };
        rows.push_str(&format!(
            "<tr><th scope=\"row\"><a href=\"{path}\">{number}</a></th><td>{state}</td><td>{sending}</td><td>{conditions}</td></tr>\n",
            path = html::escape(&call_settings_path(number)),
            number = html::escape(number.as_str()),
        ));
    }
    Ok(format!(
        "<table>\n<caption>着信お知らせメールの設定</caption>\n<thead><tr><th scope=\"col\">電話番号</th>\
         <th scope=\"col\">状態</th><th scope=\"col\">送信先</th><th scope=\"col\">お知らせする着信</th></tr></thead>\n\
         <tbody>\n{rows}</tbody>\n</table>\n"
    ))
}

/// The 着信お知らせメール settings page's path for `number`.
/// 開始 or 停止 (R-N1), marked up for the settings tables.
fn state_cell(enabled: bool) -> &'static str {
    if enabled {
        "<span class=\"state-on\">開始</span>"
    } else {
        "<span class=\"state-off\">停止</span>"
    }
}

/// The addresses whose 送信 is checked (R-N2), or なし.
fn sending_cell(destinations: &[Destination]) -> String {
    let sending: Vec<String> =
        destinations.iter().filter(|d| d.send).map(|d| html::escape(d.address.as_str())).collect();
    if sending.is_empty() {
        "なし".to_owned()
    } else {
        sending.join("<br>")
    }
}

/// Each of the fax `numbers` with its FAXお知らせメール settings at a glance (開始/停止,
/// the destinations whose 送信 is checked) and its received faxes, how many unread.
pub fn fax_state_table(store: &Store, numbers: &[PhoneNumber]) -> Result<String, StoreError> {
    let mut rows = String::new();
    for number in numbers {
        let Some(record) = store.number(number)? else { continue };
        let unread = store.faxes_of(number)?.iter().filter(|fax| !fax.read).count();
        let unread = if unread == 0 { String::new() } else { format!("（未読{unread}件）") };
        rows.push_str(&format!(
            "<tr><th scope=\"row\"><a href=\"{path}\">{number}</a></th><td>{state}</td><td>{sending}</td>\
             <td><a href=\"{faxes}\">受信FAX一覧</a>{unread}</td></tr>\n",
            path = html::escape(&fax_settings_path(number)),
            number = html::escape(number.as_str()),
            state = state_cell(record.fax.enabled),
            sending = sending_cell(&record.fax.destinations),
            faxes = html::escape(&faxes_path(number)),
        ));
    }
    Ok(format!(
        "<table>\n<caption>FAXお知らせメールの設定</caption>\n<thead><tr><th scope=\"col\">電話番号</th>\
         <th scope=\"col\">状態</th><th scope=\"col\">送信先</th><th scope=\"col\">受信したFAX</th></tr></thead>\n\
         <tbody>\n{rows}</tbody>\n</table>\n"
    ))
}

pub fn call_settings_path(number: &PhoneNumber) -> String {
    format!("/numbers/{}/call", number.as_str())
}

/// The FAXお知らせメール settings page's path for `number`.
pub fn fax_settings_path(number: &PhoneNumber) -> String {
    format!("/numbers/{}/fax", number.as_str())
}

/// 受信FAX一覧's path for `number`.
pub fn faxes_path(number: &PhoneNumber) -> String {
    format!("/numbers/{}/faxes", number.as_str())
}

/// 電話番号選択 of one service: its numbers for a login, their table, and its words.
struct Chooser {
    numbers: fn(&Store, &PhoneNumber) -> Result<Vec<PhoneNumber>, StoreError>,
    table: fn(&Store, &[PhoneNumber]) -> Result<String, StoreError>,
    /// Shown when the login reaches none.
    none: &'static str,
    prompt: &'static str,
    title: &'static str,
}

const CALL_CHOOSER: Chooser = Chooser {
    numbers: call_numbers,
    table: state_table,
    none: "着信お知らせメールをご契約の電話番号がありません。",
    prompt: "設定する電話番号を選んでください。",
    title: "電話番号選択",
};

const FAX_CHOOSER: Chooser = Chooser {
    numbers: fax_numbers,
    table: fax_state_table,
    none: "FAXお知らせメールをご契約の電話番号がありません。",
    prompt: "設定する電話番号、または受信したFAXを見る電話番号を選んでください。",
    title: "電話番号選択（FAXお知らせメール）",
};

/// `GET /numbers`: 電話番号選択 for 着信お知らせメール.
pub async fn show(State(state): State<SiteState>, headers: HeaderMap) -> Result<Response, SiteError> {
    choose(&state, &headers, &CALL_CHOOSER).await
}

/// `GET /fax`: 電話番号選択 for FAXお知らせメール.
pub async fn show_fax(State(state): State<SiteState>, headers: HeaderMap) -> Result<Response, SiteError> {
    choose(&state, &headers, &FAX_CHOOSER).await
}

async fn choose(state: &SiteState, headers: &HeaderMap, chooser: &'static Chooser) -> Result<Response, SiteError> {
    let authed = match require_session(state, headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    let login = authed.session.number;
    let (numbers, table) = state
        .read(move |store| {
            let numbers = (chooser.numbers)(store, &login)?;
            let table = (chooser.table)(store, &numbers)?;
            Ok((numbers, table))
        })
        .await?;
    let body = if numbers.is_empty() {
        format!("<p>{}</p>\n", chooser.none)
    } else {
        format!("<p>{}</p>\n{table}", chooser.prompt)
    };
    let body = format!("{body}<p><a href=\"/\">メニューへ戻る</a></p>\n");
    Ok(Html(html::page(chooser.title, &body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixture, n, ADDITIONAL, CONTRACT, FAX_ONLY, OTHER_LINE};

    /// R-A1: under `line` only the contract number's login reaches the line. An
    /// additional number's password under `line` (left by a change of unit by phone that
    /// failed half way) reached every number of the line.
    #[test]
    fn r_c2_call_numbers_follow_the_unit_and_the_role() {
        let f = fixture();
        let both = vec![n(CONTRACT), n(ADDITIONAL)];
        let cases: [(Option<AuthUnit>, &str, Vec<PhoneNumber>); 10] = [
            (None, CONTRACT, vec![n(CONTRACT)]),
            (Some(AuthUnit::Line), CONTRACT, both.clone()),
            (Some(AuthUnit::Line), ADDITIONAL, vec![n(ADDITIONAL)]),
            (Some(AuthUnit::Number), CONTRACT, vec![n(CONTRACT)]),
            (Some(AuthUnit::Number), ADDITIONAL, vec![n(ADDITIONAL)]),
            (Some(AuthUnit::Number), FAX_ONLY, vec![]),
            (Some(AuthUnit::AdminUser), CONTRACT, both.clone()),
            (Some(AuthUnit::AdminUser), ADDITIONAL, vec![n(ADDITIONAL)]),
            (Some(AuthUnit::AdminUser), FAX_ONLY, vec![]),
            (Some(AuthUnit::Line), "0311112222", vec![]),
        ];
        for (unit, login, expected) in cases {
            if let Some(unit) = unit {
                f.store.set_line_unit(&n(CONTRACT), unit).unwrap();
            }
            assert_eq!(call_numbers(&f.store, &n(login)).unwrap(), expected, "{unit:?} {login}");
            assert!(!call_numbers(&f.store, &n(login)).unwrap().contains(&n(OTHER_LINE)));
        }
    }

    /// R-F1: the same login reaches the fax numbers by the same rule (R-A1..R-A3).
    #[test]
    fn r_f1_fax_numbers_follow_the_unit_and_the_role_like_call_numbers() {
        let f = fixture();
        let cases: [(Option<AuthUnit>, &str, Vec<PhoneNumber>); 8] = [
            (None, CONTRACT, vec![]),
            (None, FAX_ONLY, vec![n(FAX_ONLY)]),
            (Some(AuthUnit::Line), CONTRACT, vec![n(FAX_ONLY)]),
            (Some(AuthUnit::Line), ADDITIONAL, vec![]),
            (Some(AuthUnit::Number), CONTRACT, vec![]),
            (Some(AuthUnit::Number), FAX_ONLY, vec![n(FAX_ONLY)]),
            (Some(AuthUnit::AdminUser), CONTRACT, vec![n(FAX_ONLY)]),
            (Some(AuthUnit::AdminUser), ADDITIONAL, vec![]),
        ];
        for (unit, login, expected) in cases {
            if let Some(unit) = unit {
                f.store.set_line_unit(&n(CONTRACT), unit).unwrap();
            }
            assert_eq!(fax_numbers(&f.store, &n(login)).unwrap(), expected, "{unit:?} {login}");
        }
        f.store.set_line_unit(&n(CONTRACT), AuthUnit::Line).unwrap();
        let login = n(CONTRACT);
        assert_eq!(allowed_fax_number(&f.store, &login, FAX_ONLY).unwrap(), Some(n(FAX_ONLY)));
        for raw in [CONTRACT, ADDITIONAL, OTHER_LINE, "03-1234-5670", ""] {
            assert_eq!(allowed_fax_number(&f.store, &login, raw).unwrap(), None, "{raw}");
        }
    }

    #[test]
    fn r_c2_a_url_outside_the_session_numbers_is_refused() {
        let f = fixture();
        f.store.set_line_unit(&n(CONTRACT), AuthUnit::Line).unwrap();
        let login = n(CONTRACT);
        assert_eq!(allowed_number(&f.store, &login, ADDITIONAL).unwrap(), Some(n(ADDITIONAL)));
        for raw in [OTHER_LINE, FAX_ONLY, "03-1234-5679", "../0312345679", ""] {
            assert_eq!(allowed_number(&f.store, &login, raw).unwrap(), None, "{raw}");
        }
    }
}
