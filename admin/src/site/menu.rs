//! `GET /`: the menu after login. The settings pages (R-C1, R-C2, §6) will add their
//! links here; today it offers the password change and logout.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};

use super::{html, require_session, Gate, SiteState};

pub async fn show(State(state): State<SiteState>, headers: HeaderMap) -> Response {
    let authed = match require_session(&state, &headers, Gate::PasswordChanged) {
        Ok(authed) => authed,
        Err(denied) => return denied.into_response(),
    };
    let body = format!(
        "<p>ログイン中の電話番号: {number}</p>\n<ul>\n<li><a href=\"/password\">パスワード変更</a></li>\n</ul>\n{logout}",
        number = html::escape(authed.session.number.as_str()),
        logout = logout_form(&authed.session.csrf),
    );
    Html(html::page("メニュー", &body)).into_response()
}

/// The ログアウト button: a form, because logout changes state and so must be a POST
/// with the session's CSRF token.
pub fn logout_form(csrf: &str) -> String {
    format!(
        "<form method=\"post\" action=\"/logout\">\n{}<p><button type=\"submit\">ログアウト</button></p>\n</form>\n",
        html::csrf_field(csrf)
    )
}
