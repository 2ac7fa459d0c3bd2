//! `GET /`: the menu after login. サービス選択 (R-C1): 着信お知らせメール and
//! FAXお知らせメール (R-F1) each lead to the settings page of the only number with that
//! service, or to their 電話番号選択 when the login covers several (R-C2); the fax
//! entry links the received faxes too. Then the password change, 認証単位変更 (R-O2,
//! R-O3; for the contract number only) and logout.

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};

use super::numbers::{call_numbers, call_settings_path, fax_numbers, fax_settings_path, faxes_path};
use super::{html, require_session, Gate, SiteError, SiteState};

pub async fn show(
    State(state): State<SiteState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, SiteError> {
    let authed = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    let login = authed.session.number;
    let (numbers, faxes, contract, tables) = state
        .read(move |store| {
            let numbers = call_numbers(store, &login)?;
            let faxes = fax_numbers(store, &login)?;
            let mut tables = String::new();
            if !numbers.is_empty() {
                tables += &super::numbers::state_table(store, &numbers)?;
            }
            if !faxes.is_empty() {
                tables += &super::numbers::fax_state_table(store, &faxes)?;
            }
            Ok((numbers, faxes, super::unit::contract_line(store, &login)?.is_some(), tables))
        })
        .await?;
    let call = match numbers.as_slice() {
        [] => "着信お知らせメール（ご契約の電話番号がありません）".to_owned(),
        [only] => format!("<a href=\"{}\">着信お知らせメール</a>", html::escape(&call_settings_path(only))),
        _ => "<a href=\"/numbers\">着信お知らせメール</a>（電話番号選択）".to_owned(),
    };
    let fax = match faxes.as_slice() {
        [] => "FAXお知らせメール（ご契約の電話番号がありません）".to_owned(),
        [only] => format!(
            "<a href=\"{}\">FAXお知らせメール</a>（<a href=\"{}\">受信FAX一覧</a>）",
            html::escape(&fax_settings_path(only)),
            html::escape(&faxes_path(only)),
        ),
        _ => "<a href=\"/fax\">FAXお知らせメール</a>（電話番号選択）".to_owned(),
    };
    let unit = if contract { "<li><a href=\"/unit\">認証単位変更</a></li>\n" } else { "" };
    // After a redirect that did something (Post/Redirect/Get), what it did.
    let notice = match query.as_deref() {
        Some("notice=password") => "<p class=\"notice\" role=\"status\">パスワードを変更しました。</p>\n",
        _ => "",
    };
    let body = format!(
        "{notice}<p>ログイン中の電話番号: {number}</p>\n<h2>サービス選択</h2>\n<ul>\n<li>{call}</li>\n\
         <li>{fax}</li>\n</ul>\n{tables}\
         <h2>その他の設定</h2>\n<ul>\n<li><a href=\"/password\">パスワード変更</a></li>\n{unit}</ul>\n{logout}",
        number = html::escape(authed.session.number.as_str()),
        logout = html::logout_form(&authed.session.csrf),
    );
    Ok(Html(html::page("メニュー", &body)).into_response())
}
