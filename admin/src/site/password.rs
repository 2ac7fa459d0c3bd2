//! パスワード変更: `GET/POST /password`. Forced after a login with a temporary password
//! or a password older than 60 days (R-S4); the new password follows [`check_policy`]
//! (R-S5), or with `admin.password_policy = "asvs"` [`check_asvs`] (OWASP ASVS 5.0).

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use engine::config::PasswordPolicy;

use super::session::Session;
use super::{csrf, html, require_session, with_cookies, Authed, Gate, SiteError, SiteState};
use crate::credentials::{CredentialKind, LoginFailure};

/// Shortest new password (R-S5).
pub const MIN_LEN: usize = 8;
/// Longest new password (R-S5).
pub const MAX_LEN: usize = 12;
/// Longest new password under the ASVS policy (ASVS 5.0 asks that at least 64 be
/// allowed).
pub const ASVS_MAX_LEN: usize = 64;

/// Why a new password is refused; the messages are shown on the page as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyViolation {
    #[error("新しいパスワードは半角英数字（0-9、A-Z、a-z）で入力してください。")]
    Charset,
    #[error("新しいパスワードは8文字以上12文字以内で入力してください。")]
    Length,
    #[error("新しいパスワードには英字を1文字以上含めてください。")]
    DigitsOnly,
    #[error("新しいパスワードには現在のパスワードと異なるものを入力してください。")]
    SameAsCurrent,
    #[error("新しいパスワードは8文字以上64文字以内で入力してください。")]
    AsvsLength,
}

/// R-S5: 8 to 12 half-width alphanumerics `[0-9A-Za-z]`, not digits only, not the
/// current password. Pure, so the rule is tested by a table.
pub fn check_policy(current: &str, new: &str) -> Result<(), PolicyViolation> {
    if !new.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(PolicyViolation::Charset);
    }
    // ASCII from here on, so bytes are characters.
    if !(MIN_LEN..=MAX_LEN).contains(&new.len()) {
        return Err(PolicyViolation::Length);
    }
    if new.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PolicyViolation::DigitsOnly);
    }
    if new == current {
        return Err(PolicyViolation::SameAsCurrent);
    }
    Ok(())
}

/// OWASP ASVS 5.0: 8 to 64 characters (Unicode scalar values) of any kind, spaces and
/// non-ASCII included, no composition rule, not the current password.
pub fn check_asvs(current: &str, new: &str) -> Result<(), PolicyViolation> {
    if !(MIN_LEN..=ASVS_MAX_LEN).contains(&new.chars().count()) {
        return Err(PolicyViolation::AsvsLength);
    }
    if new == current {
        return Err(PolicyViolation::SameAsCurrent);
    }
    Ok(())
}

/// The rule of `policy` for a new password.
pub fn check(policy: PasswordPolicy, current: &str, new: &str) -> Result<(), PolicyViolation> {
    match policy {
        PasswordPolicy::Seed => check_policy(current, new),
        PasswordPolicy::Asvs => check_asvs(current, new),
    }
}

/// The `maxlength` of the fields that take a password already set: any either policy
/// allows (64 characters, up to two UTF-16 units each), whatever the policy now, so that
/// a browser never cuts one set under the other policy (or restored from an export) and
/// every try counts as wrong (R-S3).
pub const ENTERED_MAX_LEN: usize = 2 * ASVS_MAX_LEN;

/// The longest password `policy` allows: the `maxlength` of a new password's fields.
pub fn max_len(policy: PasswordPolicy) -> usize {
    match policy {
        PasswordPolicy::Seed => MAX_LEN,
        PasswordPolicy::Asvs => ASVS_MAX_LEN,
    }
}

const MISMATCH: &str = "新しいパスワードと確認用のパスワードが一致しません。";
const WRONG_CURRENT: &str = "現在のパスワードが正しくありません。";
const NO_CURRENT: &str = "現在のパスワードを入力してください。";

/// The password form's fields; all default to empty so a missing CSRF field is a 403.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct PasswordForm {
    /// 現在のパスワード: the temporary one, the expired one, or the current one (R-S4).
    current: String,
    /// 新しいパスワード.
    new: String,
    /// 新しいパスワード（確認）.
    confirm: String,
    csrf: String,
    /// The fax a mail's link brought the subscriber for, shown once the change is done.
    fax: String,
}

pub async fn show(State(state): State<SiteState>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let fax = query.as_deref().and_then(|q| q.strip_prefix("fax=")).and_then(super::fax::fax_to_show).unwrap_or("");
    match require_session(&state, &headers, Gate::Any).await {
        Ok(authed) => Html(password_page(&authed.session, state.password_policy, &[], fax)).into_response(),
        Err(denied) => denied.into_response(),
    }
}

pub async fn submit(
    State(state): State<SiteState>,
    headers: HeaderMap,
    form: Result<Form<PasswordForm>, FormRejection>,
) -> Result<Response, SiteError> {
    let Form(form) = form?;
    let Authed { id, session } = match require_session(&state, &headers, Gate::Any).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    if !csrf::matches(Some(&session.csrf), &form.csrf) {
        return Err(SiteError::Csrf);
    }
    let fax = super::fax::fax_to_show(&form.fax).unwrap_or("").to_owned();
    let fax = fax.as_str();
    // Cheap checks first: a typo in the new password should not cost an attempt at the
    // current one (R-S2, R-S3 count consecutive wrong entries).
    let mut errors = Vec::new();
    // A blank current password is not a wrong one: a browser that ignores `required`
    // (a フレッツフォン's, a 携帯電話's) sent it, and three of them invalidated a
    // temporary password (R-S2).
    if form.current.is_empty() {
        errors.push(NO_CURRENT.to_owned());
    }
    if let Err(violation) = check(state.password_policy, &form.current, &form.new) {
        errors.push(violation.to_string());
    }
    if form.new != form.confirm {
        errors.push(MISMATCH.to_owned());
    }
    if !errors.is_empty() {
        return Ok(Html(password_page(&session, state.password_policy, &errors, fax)).into_response());
    }

    // The line the number is on, read before the check: see the set below.
    let contract = {
        let (store, number) = (state.store.clone(), session.number);
        match tokio::task::spawn_blocking(move || store.number(&number)).await?? {
            Some(record) => record.contract,
            None => return super::credential_died(&state, &id, LoginFailure::Unknown).await,
        }
    };
    let now = state.clock.now();
    match state.credentials.verify_async(session.number, form.current, now).await? {
        Ok(_) => {}
        Err(LoginFailure::Wrong) => {
            tracing::info!(number = %session.number, "site password change: wrong current password");
            let errors = [WRONG_CURRENT.to_owned()];
            return Ok(Html(password_page(&session, state.password_policy, &errors, fax)).into_response());
        }
        // The credential died under the session (locked by the wrong entries above, or
        // the temporary password's 24 hours ran out): a new one must be set by phone.
        Err(failure) => {
            tracing::info!(number = %session.number, outcome = ?failure, "site password change: credential unusable");
            return super::credential_died(&state, &id, failure).await;
        }
    }
    // Only while the number is on the line it was on before the check: one moved (or
    // whose line was removed) meanwhile is someone else's (R-M3); its session ends.
    let Some(credential) =
        state.credentials.set_password_on_line_async(session.number, contract, form.new, now).await?
    else {
        return super::credential_died(&state, &id, LoginFailure::Unknown).await;
    };
    tracing::info!(number = %session.number, "site password changed");

    // A new session id for the new credential, and no other browser stays logged in with
    // the old password.
    // The session keeps the stamp of the password it set: one set again after it (a
    // temporary password by phone) ends it at its next request.
    state.sessions.remove(&id).await?;
    // Its CSRF token stays: the subscriber's other tabs, opened before the change, can
    // still save (a stale form there is told so and keeps what was typed, R-S9) and
    // log out (R-S7). Only a login makes a new one.
    let renewed = Session { kind: CredentialKind::Password, must_change: false, credential, ..session };
    let number = renewed.number;
    let new_id = state.sessions.create(renewed).await?;
    state.sessions.remove_number(&number, &new_id).await?;
    // The fax a mail's link brought the subscriber for, once the change is done.
    let next = if fax.is_empty() { "/?notice=password".to_owned() } else { format!("/fax/{fax}") };
    Ok(with_cookies(super::redirect(&next), [state.set_cookie(&state.session_cookie(), Some(&new_id))]))
}

fn password_page(session: &Session, policy: PasswordPolicy, errors: &[String], fax: &str) -> String {
    let max = max_len(policy);
    let (rule, hint) = match policy {
        PasswordPolicy::Seed => (
            format!("pattern=\"[0-9A-Za-z]{{8,12}}\" minlength=\"{MIN_LEN}\" maxlength=\"{max}\""),
            "半角英数字8〜12文字。数字だけのもの、現在のパスワードと同じものは使えません。",
        ),
        PasswordPolicy::Asvs => (
            format!("minlength=\"{MIN_LEN}\" maxlength=\"{max}\""),
            "8〜64文字。空白や全角文字も使えます。長い文（パスフレーズ）がおすすめです。\
             現在のパスワードと同じものは使えません。",
        ),
    };
    let notice = if session.must_change {
        "<p>仮パスワード、または設定から60日を過ぎたパスワードでログインしました。\
         ご利用の前に、新しいパスワードを設定してください。</p>\n"
    } else {
        ""
    };
    let body = format!(
        "{notice}{errors}<form method=\"post\" action=\"/password\">\n{csrf}{fax}\
         <p><label for=\"current\">現在のパスワード</label><br>\n\
         <input id=\"current\" name=\"current\" type=\"password\" autocomplete=\"current-password\" \
         maxlength=\"{ENTERED_MAX_LEN}\" required></p>\n\
         <p><label for=\"new\">新しいパスワード</label><br>\n\
         <input id=\"new\" name=\"new\" type=\"password\" autocomplete=\"new-password\" \
         {rule} required><br>\n\
         <small>{hint}</small></p>\n\
         <p><label for=\"confirm\">新しいパスワード（確認）</label><br>\n\
         <input id=\"confirm\" name=\"confirm\" type=\"password\" autocomplete=\"new-password\" \
         maxlength=\"{max}\" required></p>\n\
         <p><button type=\"submit\">変更する</button></p>\n</form>\n{menu}{logout}",
        errors = html::errors(errors),
        csrf = html::csrf_field(&session.csrf),
        fax = if fax.is_empty() {
            String::new()
        } else {
            format!("<input type=\"hidden\" name=\"fax\" value=\"{}\">\n", html::escape(fax))
        },
        logout = html::logout_form(&session.csrf),
        // Back to the menu, unless the change is what the menu waits for (R-S4).
        menu = if session.must_change { "" } else { "<p><a href=\"/\">メニューへ戻る</a></p>\n" },
    );
    html::page("パスワード変更", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r_s5_password_policy_table() {
        use PolicyViolation::*;
        let current = "12345678";
        let cases: &[(&str, Result<(), PolicyViolation>)] = &[
            ("abcd1234", Ok(())),
            ("abcdefgh", Ok(())),
            ("ABCDEFGH", Ok(())),
            ("a1234567", Ok(())),
            ("Abc123456789", Ok(())),
            ("abc1234", Err(Length)),
            ("abc1234567890", Err(Length)),
            ("", Err(Length)),
            ("87654321", Err(DigitsOnly)),
            ("123456789012", Err(DigitsOnly)),
            ("abc_1234", Err(Charset)),
            ("abcd 1234", Err(Charset)),
            ("ａｂｃｄ1234", Err(Charset)),
            ("パスワード1234", Err(Charset)),
            ("abcd-123", Err(Charset)),
        ];
        for (new, expected) in cases {
            assert_eq!(check_policy(current, new), *expected, "{new:?}");
        }
        assert_eq!(check_policy("abcd1234", "abcd1234"), Err(SameAsCurrent));
        assert_eq!(check_policy("abcd1234", "ABCD1234"), Ok(()), "case matters");
        assert_eq!(check(PasswordPolicy::Seed, current, "abcd 1234"), Err(Charset), "seed is R-S5");
    }

    #[test]
    fn asvs_password_policy_table() {
        use PolicyViolation::*;
        let current = "12345678";
        let long_ascii = "a".repeat(64);
        let too_long = "a".repeat(65);
        let long_kana = "あ".repeat(64);
        let cases: &[(&str, Result<(), PolicyViolation>)] = &[
            ("abcd1234", Ok(())),
            ("87654321", Ok(())),
            ("abcdefgh", Ok(())),
            ("correct horse battery staple", Ok(())),
            ("abcd 1234", Ok(())),
            ("abc_1234!", Ok(())),
            ("ａｂｃｄ1234", Ok(())),
            ("パスワード1234", Ok(())),
            ("ぱすわーどです", Err(AsvsLength)),
            ("ぱすわーどですよ", Ok(())),
            ("        ", Ok(())),
            (&long_ascii, Ok(())),
            (&long_kana, Ok(())),
            (&too_long, Err(AsvsLength)),
            ("abc1234", Err(AsvsLength)),
            ("", Err(AsvsLength)),
        ];
        for (new, expected) in cases {
            assert_eq!(check_asvs(current, new), *expected, "{new:?}");
            assert_eq!(check(PasswordPolicy::Asvs, current, new), *expected, "{new:?}");
        }
        assert_eq!(check_asvs(current, current), Err(SameAsCurrent));
        assert_eq!(check_asvs("pass phrase", "pass phrase"), Err(SameAsCurrent));
        assert_eq!(check_asvs("pass phrase", "Pass phrase"), Ok(()), "case matters");
    }
}
