//! 受信FAX (R-F1: "the fax itself can be viewed on the site after login"): the list of a
//! number's received faxes, each fax's page with its pages as pictures, the fax as a
//! PDF, and its deletion.
//!
//! - `GET /numbers/{number}/faxes`: 受信FAX一覧, newest first, 未読 marked.
//! - `GET /fax/{number}/{ms}/{fax_id}`: one fax, the address a fax mail links to
//!   (`engine::store::FaxRecord::key`). Showing it marks it read.
//! - `GET /fax/{number}/{ms}/{fax_id}/pages/{n}.png`: page `n` (from 1) as a PNG.
//! - `GET /fax/{number}/{ms}/{fax_id}/pdf`: the whole fax as a PDF download.
//! - `POST /fax/{number}/{ms}/{fax_id}/delete`: deletes it, back to the list.
//!
//! Every route needs a session, a number among the session's fax numbers
//! ([`allowed_fax_number`], R-A1..R-A3) and a fax of that number that is not deleted
//! ([`engine::store::Store::fax`]). Anything else — another subscriber's fax, a guessed
//! id, a deleted fax, a malformed address — is the same 404, so an address reveals
//! nothing about faxes the session may not see. Pictures and PDFs are made from the
//! stored document when asked for, on the blocking threads (decoding a page is work).

use std::collections::HashMap;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, RawQuery, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use engine::fax::document::{page_png, pdf_pictures, to_pdf, DocumentError, DocumentKind};
use engine::phone::PhoneNumber;
use engine::render::{format_jst, jst};
use engine::store::FaxRecord;

use super::numbers::{allowed_fax_number, fax_settings_path, faxes_path, not_found};
use super::{csrf, html, require_session, Authed, Denied, Gate, SiteError, SiteState};

/// The query of the list after a deletion.
const DELETED_QUERY: &str = "deleted=1";

/// A fax's address as the URL gives it: `/fax/{number}/{ms}/{fax_id}`.
type FaxAddress = (String, String, String);

/// Whether `ms` and `fax_id` can be the key segments the engine writes: 13 digits, and
/// 1–64 of `A-Z a-z 0-9 . _ : @ -`. Anything else is not looked up at all.
fn well_formed(ms: &str, fax_id: &str) -> bool {
    ms.len() == 13
        && ms.bytes().all(|b| b.is_ascii_digit())
        && (1..=64).contains(&fax_id.len())
        && fax_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

/// `number/ms/fax_id` if it can be a fax's key: what a login page carries to show that
/// fax once logged in (a subscriber following the fax mail's link). Only ever a path
/// under `/fax/` of this site is made of it, so it redirects nowhere else.
pub(super) fn fax_to_show(raw: &str) -> Option<&str> {
    let mut parts = raw.split('/');
    let (number, ms, fax_id) = (parts.next()?, parts.next()?, parts.next()?);
    let number_ok = (10..=11).contains(&number.len()) && number.bytes().all(|b| b.is_ascii_digit());
    (parts.next().is_none() && number_ok && well_formed(ms, fax_id)).then_some(raw)
}

/// The fax at `address` if the session of `login` may see it: its number is one of the
/// session's fax numbers and the fax is that number's and not deleted. `None` for
/// anything else, whatever the reason.
async fn fax_of(state: &SiteState, login: PhoneNumber, address: FaxAddress) -> Result<Option<FaxRecord>, SiteError> {
    let (raw, ms, fax_id) = address;
    if !well_formed(&ms, &fax_id) {
        return Ok(None);
    }
    state
        .read(move |store| {
            let Some(number) = allowed_fax_number(store, &login, &raw)? else { return Ok(None) };
            store.fax(&number, &format!("{number}/{ms}/{fax_id}"))
        })
        .await
}

/// The answer for a fax the session may not see: one page for every reason.
fn fax_not_found() -> Response {
    let body = "<p>指定されたFAXは表示できません。</p>\n\
                <p><a href=\"/\">メニューへ戻る</a></p>\n";
    (StatusCode::NOT_FOUND, Html(html::page("ページが見つかりません", body))).into_response()
}

/// [`fax_not_found`] for the page of a fax (`key`, well-formed) that the session may not
/// see: the fax mail's link of another number of the line (under the `number` unit)
/// shows once logged in with that number, so the page says so and its logout leads to
/// that login, the fax carried. Said for any such link whether or not the fax is there:
/// nothing is told of another number's faxes.
fn fax_of_another_login(key: &str, csrf: &str) -> Response {
    let body = format!(
        "<p>指定されたFAXは表示できません（削除されたFAXか、ログイン中の電話番号では見られないFAXです）。</p>\n\
         <p>同じ回線の別の電話番号に届いたFAXのお知らせメールからお越しの場合は、FAXが届いた電話番号でログインし直してください。\
         下のボタンでログアウトすると、ログイン後にこのFAXを表示します。</p>\n\
         <form method=\"post\" action=\"/logout\">\n{}<input type=\"hidden\" name=\"fax\" value=\"{}\">\n\
         <p><button type=\"submit\">ログアウトして別の番号でログイン</button></p>\n</form>\n\
         <p><a href=\"/\">メニューへ戻る</a></p>\n",
        html::csrf_field(csrf),
        html::escape(key)
    );
    (StatusCode::NOT_FOUND, Html(html::page("ページが見つかりません", &body))).into_response()
}

/// A fax's page on the site.
pub fn fax_path(record: &FaxRecord) -> String {
    format!("/fax/{}", record.key())
}

/// `GET /numbers/{number}/faxes`: 受信FAX一覧.
pub async fn list(
    State(state): State<SiteState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, SiteError> {
    let authed = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    let login = authed.session.number;
    let found = state
        .read(move |store| {
            let Some(number) = allowed_fax_number(store, &login, &raw)? else { return Ok(None) };
            Ok(Some((number, store.faxes_of(&number)?)))
        })
        .await?;
    let Some((number, faxes)) = found else { return Ok(not_found()) };

    let notice = if query.as_deref() == Some(DELETED_QUERY) {
        "<p class=\"notice\" role=\"status\">削除しました。</p>\n"
    } else {
        ""
    };
    let list = if faxes.is_empty() {
        "<p>受信したFAXはありません。</p>\n".to_owned()
    } else {
        let rows: String = faxes
            .iter()
            .map(|fax| {
                let unread = if fax.read { "" } else { "<span class=\"unread\">未読</span>" };
                format!(
                    "<tr><th scope=\"row\"><a href=\"{path}\">{time}</a></th><td>{sender}</td>\
                     <td>{pages}枚</td><td>{unread}</td></tr>\n",
                    path = html::escape(&fax_path(fax)),
                    time = html::escape(&format_jst(fax.received_at)),
                    sender = html::escape(&fax.sender),
                    pages = fax.pages,
                )
            })
            .collect();
        format!(
            "<table>\n<caption>新しい順</caption>\n<thead><tr><th scope=\"col\">受信日時</th>\
             <th scope=\"col\">送信元</th><th scope=\"col\">枚数</th><th scope=\"col\">状態</th></tr></thead>\n\
             <tbody>\n{rows}</tbody>\n</table>\n"
        )
    };
    let body = format!(
        "<p>電話番号: {number}</p>\n{notice}{list}<p><a href=\"{settings}\">FAXお知らせメール設定</a></p>\n\
         <p><a href=\"/\">メニューへ戻る</a></p>\n{logout}",
        number = html::escape(number.as_str()),
        settings = html::escape(&fax_settings_path(&number)),
        logout = html::logout_form(&authed.session.csrf),
    );
    Ok(Html(html::page("受信FAX一覧", &body)).into_response())
}

/// Fax renderings (a page as a PNG, the fax as a PDF, a PDF fax's pages tried) a node
/// runs at once: each takes a core for up to seconds, on the blocking threads the node's
/// mail delivery shares. The others wait their turn.
pub(crate) const RENDERING_AT_ONCE: usize = 2;

/// [`SiteState::read`] for a rendering, once one of [`RENDERING_AT_ONCE`] is free. The
/// turn goes with the rendering, not the request: a client hanging up does not end a
/// rendering on the blocking pool, so it does not free its turn either.
async fn rendering<T: Send + 'static>(
    state: &SiteState,
    render: impl FnOnce(&engine::store::Store) -> Result<T, engine::store::StoreError> + Send + 'static,
) -> Result<T, SiteError> {
    let turn = state.rendering.clone().acquire_owned().await.expect("the rendering semaphore is never closed");
    state
        .read(move |store| {
            let _turn = turn;
            render(store)
        })
        .await
}

/// Which of the fax's pages can be shown as pictures. A TIFF's all: the engine decoded
/// every page before keeping it. A PDF was only loaded, and a page of it may hold no fax
/// image (text, a vector drawing): those are tried here, so the page can say so.
fn pictures(record: &FaxRecord, document: &[u8]) -> Vec<bool> {
    match record.kind {
        DocumentKind::Tiff => vec![true; record.pages as usize],
        DocumentKind::Pdf => {
            let mut shown = pdf_pictures(document);
            shown.resize(record.pages as usize, false);
            shown
        }
    }
}

/// `GET /fax/{number}/{ms}/{fax_id}`: one received fax, its details and its pages.
/// Showing it marks it read (the list's 未読 mark is a read receipt, not a setting).
pub async fn show(
    State(state): State<SiteState>,
    headers: HeaderMap,
    Path(address): Path<FaxAddress>,
) -> Result<Response, SiteError> {
    let asked = format!("{}/{}/{}", address.0, address.1, address.2);
    let authed = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => {
            // The fax mail's link: the login page (not logged in) or the password change
            // first due (R-S4), then this fax.
            let next = match (&denied, fax_to_show(&asked)) {
                (Denied::Login | Denied::Ended | Denied::Invalidated, Some(key)) => {
                    let notice = denied.login_notice().map(|n| format!("notice={n}&")).unwrap_or_default();
                    format!("/login?{notice}fax={key}")
                }
                (Denied::ChangePassword, Some(key)) => format!("/password?fax={key}"),
                _ => return Ok(denied.into_response()),
            };
            return Ok(super::redirect(&next));
        }
    };
    let Some(record) = fax_of(&state, authed.session.number, address).await? else {
        return Ok(match fax_to_show(&asked) {
            Some(key) => fax_of_another_login(key, &authed.session.csrf),
            None => fax_not_found(),
        });
    };
    let (key, unread, kept) = (record.key(), !record.read, record.clone());
    if unread {
        // Not under a rendering's turn: it waits on the state owner.
        let key = key.clone();
        state.read(move |store| store.mark_fax_read(&key)).await?;
    }
    // A TIFF's pages are all shown (decoded before it was kept): only a PDF's are tried.
    let document =
        move |store: &engine::store::Store| Ok(store.fax_document(&key)?.map(|document| pictures(&kept, &document)));
    let shown = match record.kind {
        DocumentKind::Pdf => rendering(&state, document).await?,
        DocumentKind::Tiff => state.read(document).await?,
    };
    let Some(shown) = shown else { return Ok(fax_not_found()) };

    let path = fax_path(&record);
    let pdf = html::escape(&format!("{path}/pdf"));
    let pages: String = shown
        .iter()
        .zip(1..)
        .map(|(picture, n)| {
            if *picture {
                format!(
                    "<p class=\"fax-page\"><img src=\"{src}\" alt=\"{n}ページ目\"></p>\n",
                    src = html::escape(&format!("{path}/pages/{n}.png"))
                )
            } else {
                format!("<p class=\"hint\">{n}ページ目は画像で表示できません。<a href=\"{pdf}\">PDF</a>でご覧ください。</p>\n")
            }
        })
        .collect();
    let body = format!(
        "<table>\n<tbody>\n<tr><th scope=\"row\">受信日時</th><td>{time}</td></tr>\n\
         <tr><th scope=\"row\">送信元</th><td>{sender}</td></tr>\n\
         <tr><th scope=\"row\">受信番号</th><td>{number}</td></tr>\n\
         <tr><th scope=\"row\">枚数</th><td>{count}枚</td></tr>\n</tbody>\n</table>\n\
         <p><a href=\"{pdf}\">PDFでダウンロード</a></p>\n{pages}\
         <h2>このFAXを削除</h2>\n<p>削除したFAXは元に戻せません。</p>\n\
         <form method=\"post\" action=\"{delete}\">\n{csrf}<p><button type=\"submit\" class=\"secondary\">削除する</button></p>\n</form>\n\
         <p><a href=\"{list}\">受信FAX一覧へ戻る</a></p>\n<p><a href=\"/\">メニューへ戻る</a></p>\n{logout}",
        time = html::escape(&format_jst(record.received_at)),
        sender = html::escape(&record.sender),
        number = html::escape(record.number.as_str()),
        count = record.pages,
        delete = html::escape(&format!("{path}/delete")),
        csrf = html::csrf_field(&authed.session.csrf),
        list = html::escape(&faxes_path(&record.number)),
        logout = html::logout_form(&authed.session.csrf),
    );
    Ok(Html(html::page("受信FAX", &body)).into_response())
}

/// `n` of a page picture's last segment, `{n}.png`, counted from 1.
fn picture_number(segment: &str) -> Option<u32> {
    let digits = segment.strip_suffix(".png")?;
    let n: u32 = digits.parse().ok()?;
    (n >= 1 && n.to_string() == digits).then_some(n)
}

/// `GET /fax/{number}/{ms}/{fax_id}/pages/{n}.png`: page `n` as a PNG; not found past
/// the last page, or for a PDF page that has no picture to show.
pub async fn page(
    State(state): State<SiteState>,
    headers: HeaderMap,
    Path((raw, ms, fax_id, segment)): Path<(String, String, String, String)>,
) -> Result<Response, SiteError> {
    let authed = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    let Some(record) = fax_of(&state, authed.session.number, (raw, ms, fax_id)).await? else {
        return Ok(fax_not_found());
    };
    let Some(n) = picture_number(&segment).filter(|n| *n <= record.pages) else { return Ok(fax_not_found()) };
    let key = record.key();
    let picture =
        rendering(&state, move |store| Ok(store.fax_document(&key)?.map(|doc| page_png(&doc, n - 1)))).await?;
    match picture {
        Some(Ok(png)) => Ok(([(CONTENT_TYPE, "image/png")], png).into_response()),
        None => Ok(fax_not_found()),
        Some(Err(error)) => unshown(&record, error),
    }
}

/// A page that did not become a picture: not found when the document allows it (no such
/// page, a PDF page without a fax image, which the fax's page already says); a TIFF the
/// engine checked before keeping it that no longer decodes is a failure of ours.
fn unshown(record: &FaxRecord, error: DocumentError) -> Result<Response, SiteError> {
    match (record.kind, error) {
        (_, DocumentError::PageOutOfRange { .. } | DocumentError::NotAnImagePage { .. }) => Ok(fax_not_found()),
        (DocumentKind::Pdf, error) => {
            tracing::info!(fax = %record.key(), %error, "a PDF fax page cannot be shown as a picture");
            Ok(fax_not_found())
        }
        (DocumentKind::Tiff, error) => Err(error.into()),
    }
}

/// `GET /fax/{number}/{ms}/{fax_id}/pdf`: the fax as a PDF to save, named after its
/// number and reception time (JST).
pub async fn pdf(
    State(state): State<SiteState>,
    headers: HeaderMap,
    Path(address): Path<FaxAddress>,
) -> Result<Response, SiteError> {
    let authed = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    let Some(record) = fax_of(&state, authed.session.number, address).await? else { return Ok(fax_not_found()) };
    let key = record.key();
    let made =
        rendering(&state, move |store| Ok(store.fax_document(&key)?.map(|doc| to_pdf(&doc, DOWNLOAD_PDF_AT_MOST))));
    let pdf = match made.await? {
        None => return Ok(fax_not_found()),
        Some(Err(DocumentError::TooLarge { .. })) => return Ok(too_large_for_a_pdf(&record)),
        Some(made) => made?,
    };
    let name = format!(
        "attachment; filename=\"fax-{}-{}.pdf\"",
        record.number.as_str(),
        record.received_at.with_timezone(&jst()).format("%Y%m%d-%H%M%S")
    );
    let disposition = HeaderValue::from_str(&name).expect("digits and dashes are a valid header");
    Ok(([(CONTENT_TYPE, HeaderValue::from_static("application/pdf")), (CONTENT_DISPOSITION, disposition)], pdf)
        .into_response())
}

/// The largest PDF the site makes of a fax: a TIFF whose pages share their data can
/// declare a PDF of gigabytes. Far above any real fax's (docs/fax.md: records up to 16 MiB).
const DOWNLOAD_PDF_AT_MOST: usize = 64 << 20;

/// A fax too large to download as one PDF: its pages still show one by one.
fn too_large_for_a_pdf(record: &FaxRecord) -> Response {
    let body = format!(
        "<p>このFAXはPDFにするには大きすぎるため、ダウンロードできません。ページごとにご覧ください。</p>\n\
         <p><a href=\"{}\">FAXへ戻る</a></p>\n",
        html::escape(&fax_path(record))
    );
    (StatusCode::UNPROCESSABLE_ENTITY, Html(html::page("ダウンロードできません", &body))).into_response()
}

/// `POST /fax/{number}/{ms}/{fax_id}/delete`: deletes the fax (its document at once; the
/// engine keeps a small record so the same fax is not kept again) and shows the list.
pub async fn delete(
    State(state): State<SiteState>,
    headers: HeaderMap,
    Path(address): Path<FaxAddress>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Result<Response, SiteError> {
    let Form(fields) = form?;
    let Authed { session, .. } = match require_session(&state, &headers, Gate::PasswordChanged).await {
        Ok(authed) => authed,
        Err(denied) => return Ok(denied.into_response()),
    };
    if !csrf::matches(Some(&session.csrf), fields.get("csrf").map_or("", String::as_str)) {
        return Err(SiteError::Csrf);
    }
    let Some(record) = fax_of(&state, session.number, address).await? else { return Ok(fax_not_found()) };
    let key = record.key();
    let deleted = state.read(move |store| store.delete_fax(&key)).await?;
    tracing::info!(login = %session.number, fax = %record.key(), deleted, "fax deleted");
    Ok(super::redirect(&format!("{}?{DELETED_QUERY}", faxes_path(&record.number))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_segments_the_engine_writes_are_looked_up() {
        assert!(well_formed("1764000000000", "hylafax-000123"));
        assert!(well_formed("0000000000000", "a.b_c:d@e-f"));
        assert!(well_formed("1764000000000", &"x".repeat(64)));
        for (ms, id) in [
            ("176400000000", "id"),
            ("17640000000000", "id"),
            ("176400000000a", "id"),
            ("1764000000000", ""),
            ("1764000000000", &"x".repeat(65)),
            ("1764000000000", "a/b"),
            ("1764000000000", "a b"),
            ("1764000000000", "ｆａｘ"),
        ] {
            assert!(!well_formed(ms, id), "{ms} {id}");
        }
    }

    #[test]
    fn page_pictures_are_numbered_from_one() {
        assert_eq!(picture_number("1.png"), Some(1));
        assert_eq!(picture_number("12.png"), Some(12));
        for segment in ["0.png", "01.png", "1", "1.PNG", "-1.png", "a.png", ".png", "1.png.png"] {
            assert_eq!(picture_number(segment), None, "{segment}");
        }
    }
}
