//! 電話番号選択 (R-C2): which numbers a session may configure, and `GET /numbers`, the
//! choice among them when the login credential covers several.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use engine::phone::PhoneNumber;
use engine::store::{AuthUnit, Store, StoreError};

use super::{html, require_session, Gate, SiteError, SiteState};

/// The numbers with call notification (着信お知らせメール) contracted that a login with
/// `login` may see and change, in the line's order (R-A1..R-A3, R-C2):
///
/// - unit `line`, and the `admin_user` administrator (the login is the contract
///   number): every number of the line with `services.call`;
/// - unit `number`, an `admin_user` user, or a line whose unit is not set yet: the login
///   number only, if it has `services.call`.
pub fn call_numbers(store: &Store, login: &PhoneNumber) -> Result<Vec<PhoneNumber>, StoreError> {
    let Some(record) = store.number(login)? else { return Ok(Vec::new()) };
    let line = store.line(&record.contract)?;
    let whole_line = match line.as_ref().and_then(|line| line.unit) {
        Some(AuthUnit::Line) => true,
        Some(AuthUnit::AdminUser) => *login == record.contract,
        Some(AuthUnit::Number) | None => false,
    };
    let candidates = match line {
        Some(line) if whole_line => line.numbers,
        _ => vec![*login],
    };
    let mut numbers = Vec::with_capacity(candidates.len());
    for number in candidates {
        if store.number(&number)?.is_some_and(|record| record.services.call) {
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

/// The page for a number the session may not see: the same whether the number does not
/// exist or belongs to someone else.
pub fn not_found() -> Response {
    let body = "<p>指定された電話番号の設定は表示できません。</p>\n<p><a href=\"/\">メニューへ戻る</a></p>\n";
    (StatusCode::NOT_FOUND, Html(html::page("ページが見つかりません", body))).into_response()
}

/// The settings page's path for `number`.
/// Each of `numbers` with its settings at a glance: 開始/停止, the destinations whose
/// 送信 is checked, and the send conditions (R-N1, R-N2, R-N4), each number a link to
/// its settings page.
pub fn state_table(store: &Store, numbers: &[PhoneNumber]) -> Result<String, StoreError> {
    let mut rows = String::new();
    for number in numbers {
        let Some(record) = store.number(number)? else { continue };
        let call = &record.call;
        let state = if call.enabled {
            "<span class=\"state-on\">開始</span>"
        } else {
            "<span class=\"state-off\">停止</span>"
        };
        let sending: Vec<String> =
            call.destinations.iter().filter(|d| d.send).map(|d| html::escape(d.address.as_str())).collect();
        let sending = if sending.is_empty() { "なし".to_owned() } else { sending.join("<br>") };
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

pub fn call_settings_path(number: &PhoneNumber) -> String {
    format!("/numbers/{}/call", number.as_str())
}

/// `GET /numbers`: 電話番号選択 for 着信お知らせメール.
pub async fn show(State(state): State<SiteState>, headers: HeaderMap) -> Result<Response, SiteError> {
    let authed = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    let login = authed.session.number;
    let (numbers, table) = state
        .read(move |store| {
            let numbers = call_numbers(store, &login)?;
            let table = state_table(store, &numbers)?;
            Ok((numbers, table))
        })
        .await?;
    let body = if numbers.is_empty() {
        "<p>着信お知らせメールをご契約の電話番号がありません。</p>\n".to_owned()
    } else {
        format!("<p>設定する電話番号を選んでください。</p>\n{table}")
    };
    let body = format!("{body}<p><a href=\"/\">メニューへ戻る</a></p>\n");
    Ok(Html(html::page("電話番号選択", &body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixture, n, ADDITIONAL, CONTRACT, FAX_ONLY, OTHER_LINE};

    #[test]
    fn r_c2_call_numbers_follow_the_unit_and_the_role() {
        let f = fixture();
        let both = vec![n(CONTRACT), n(ADDITIONAL)];
        let cases: [(Option<AuthUnit>, &str, Vec<PhoneNumber>); 10] = [
            (None, CONTRACT, vec![n(CONTRACT)]),
            (Some(AuthUnit::Line), CONTRACT, both.clone()),
            (Some(AuthUnit::Line), ADDITIONAL, both.clone()),
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
