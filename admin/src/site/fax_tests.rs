//! The FAXお知らせメール pages over HTTP (R-F1 with R-A1..R-A3, R-C1, R-N1..R-N3, R-S9):
//! received faxes listed, shown, downloaded and deleted only by the sessions their
//! number belongs to, and the fax settings saved like the call settings.
//!
//! Faxes are kept with `Store::keep_fax` and a real fax document:
//! `engine/tests/fixtures/fax/fine-g4.tif` (three A4 pages, T.6, as `tiffcp` writes
//! them; made by `scripts/make-fax-fixtures.sh`), and a one-page PDF without a fax image
//! built here.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use chrono::Duration;
use engine::config::Settings;
use engine::deliver::TestMailer;
use engine::fax::document::inspect;
use engine::store::FaxRecord;
use engine::store::{AuthUnit, FaxSettings};
use testkit::smtp::SmtpSink;
use tower::ServiceExt;

use super::settings_tests::ready;
use super::tests::{app, app_with_test_mailer, get, logged_in, post, App, Reply, PASSWORD};
use crate::testing::{n, t0, CONTRACT, FAX_ONLY};

/// Three pages, T.6.
const FINE_G4: &[u8] = include_bytes!("../../../engine/tests/fixtures/fax/fine-g4.tif");
const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
/// Another subscriber's line: one number with both services.
const STRANGER: &str = "0611112222";

/// Keeps a fax for `number`, received `minutes` before [`t0`], as the engine would.
fn keep(app: &App, number: &str, minutes: i64, fax_id: &str, document: &[u8]) -> FaxRecord {
    let inspected = inspect(document).unwrap();
    let record = FaxRecord {
        number: n(number),
        fax_id: fax_id.to_owned(),
        sender: "0612345678".to_owned(),
        received_at: t0() - Duration::minutes(minutes),
        pages: inspected.pages,
        kind: inspected.kind,
        size: document.len() as u64,
        read: false,
        deleted: false,
    };
    assert!(app.f.store.keep_fax(record.clone(), document.to_vec()).unwrap());
    record
}

fn fax_url(record: &FaxRecord) -> String {
    format!("/fax/{}", record.key())
}

fn stored_fax(app: &App, record: &FaxRecord) -> Option<FaxRecord> {
    app.f.store.fax(&record.number, &record.key()).unwrap()
}

fn faxes(number: &str) -> String {
    format!("/numbers/{number}/faxes")
}

fn settings(number: &str) -> String {
    format!("/numbers/{number}/fax")
}

/// A response whose body may be binary (a picture, a PDF).
struct Raw {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

async fn fetch(app: &App, uri: &str, cookies: &str) -> Raw {
    let request = Request::get(uri).header("cookie", cookies).body(Body::empty()).unwrap();
    let response = super::router(app.state.clone()).oneshot(request).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let body = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap().to_vec();
    Raw { status, headers, body }
}

/// The fax number's subscriber logged in (a number-unit line: the login reaches
/// [`FAX_ONLY`] only).
async fn fax_subscriber(app: &App) -> String {
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::Number).unwrap();
    app.f.credentials.set_password_async(n(FAX_ONLY), PASSWORD.into(), t0()).await.unwrap();
    logged_in(app, FAX_ONLY, PASSWORD).await
}

/// Provisions `jsonl` (more lines) into the app's store.
fn provision(app: &App, jsonl: &str) {
    let report = engine::provision::import(&app.f.store, jsonl.as_bytes()).unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
}

#[tokio::test]
async fn r_f1_a_received_fax_is_listed_unread_and_its_page_shows_every_page_and_marks_it_read() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    let older = keep(&app, FAX_ONLY, 60, "hylafax-000122", FINE_G4);
    let fax = keep(&app, FAX_ONLY, 5, "hylafax-000123", FINE_G4);
    assert_eq!(fax.pages, 3);

    let list = get(&app, &faxes(FAX_ONLY), &cookies).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    let newer_at = list.body.find(&fax_url(&fax)).expect("the fax is listed");
    assert!(newer_at < list.body.find(&fax_url(&older)).expect("both listed"), "newest first");
    assert_eq!(list.body.matches("未読").count(), 2, "{}", list.body);
    assert!(list.body.contains(&engine::render::format_jst(fax.received_at)), "受信日時 in JST");
    assert!(list.body.contains("0612345678") && list.body.contains("3枚"), "{}", list.body);

    let page = get(&app, &fax_url(&fax), &cookies).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert_eq!(page.body.matches("<img ").count(), 3, "{}", page.body);
    for n in 1..=3 {
        let img = format!("<img src=\"{}/pages/{n}.png\" alt=\"{n}ページ目\">", fax_url(&fax));
        assert!(page.body.contains(&img), "{img}");
    }
    assert!(page.body.contains(&format!("href=\"{}/pdf\"", fax_url(&fax))));
    assert!(page.body.contains(&format!("action=\"{}/delete\"", fax_url(&fax))));
    assert!(stored_fax(&app, &fax).unwrap().read, "showing it marks it read");
    assert!(!stored_fax(&app, &older).unwrap().read, "only that one");

    let list = get(&app, &faxes(FAX_ONLY), &cookies).await;
    assert_eq!(list.body.matches("未読").count(), 1, "{}", list.body);
}

#[tokio::test]
async fn r_f1_an_empty_list_says_there_are_no_faxes() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    let list = get(&app, &faxes(FAX_ONLY), &cookies).await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(list.body.contains("受信したFAXはありません。"), "{}", list.body);
    assert!(!list.body.contains("<table"));
}

#[tokio::test]
async fn r_f1_pages_are_served_as_pngs_and_the_fax_as_a_pdf_download() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    let fax = keep(&app, FAX_ONLY, 5, "hylafax-000123", FINE_G4);

    for page in 1..=3 {
        let png = fetch(&app, &format!("{}/pages/{page}.png", fax_url(&fax)), &cookies).await;
        assert_eq!(png.status, StatusCode::OK, "page {page}");
        assert_eq!(png.headers["content-type"], "image/png");
        assert_eq!(png.headers["cache-control"], "no-store");
        assert!(png.body.starts_with(PNG_SIGNATURE), "page {page}");
    }
    for past in ["4.png", "0.png", "01.png", "1", "1.gif"] {
        let missing = fetch(&app, &format!("{}/pages/{past}", fax_url(&fax)), &cookies).await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND, "{past}");
    }

    let pdf = fetch(&app, &format!("{}/pdf", fax_url(&fax)), &cookies).await;
    assert_eq!(pdf.status, StatusCode::OK);
    assert_eq!(pdf.headers["content-type"], "application/pdf");
    assert_eq!(pdf.headers["cache-control"], "no-store");
    // Received at t0 - 5 min = 2025-11-25 00:55:00 JST.
    assert_eq!(pdf.headers["content-disposition"], "attachment; filename=\"fax-0312345670-20251125-005500.pdf\"");
    assert!(pdf.body.starts_with(b"%PDF"));
}

/// R-F1: renderings of fax pages wait for one of RENDERING_AT_ONCE: any number asked
/// at once took a core and a blocking thread each (a few hundred took every thread the
/// node's mail delivery shares). A page asked while every turn is taken is served once
/// one is free.
#[tokio::test]
async fn r_f1_fax_pages_are_rendered_a_few_at_a_time() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    let fax = keep(&app, FAX_ONLY, 5, "hylafax-000123", FINE_G4);
    let taken = app.state.rendering.acquire_many(super::fax::RENDERING_AT_ONCE as u32).await.unwrap();
    let page = format!("{}/pages/1.png", fax_url(&fax));
    let waiting = fetch(&app, &page, &cookies);
    tokio::pin!(waiting);
    let early = tokio::time::timeout(StdDuration::from_millis(300), &mut waiting).await;
    assert!(early.is_err(), "rendered while every turn was taken");
    drop(taken);
    let png = tokio::time::timeout(StdDuration::from_secs(10), waiting).await.unwrap();
    assert_eq!(png.status, StatusCode::OK);
}

/// A minimal one-page PDF whose page is a vector drawing: no fax image to show.
fn drawing_only_pdf() -> Vec<u8> {
    let content = "100 100 m 300 300 l S";
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R >>".to_owned(),
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()),
    ];
    let mut pdf = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend(format!("{} 0 obj\n{object}\nendobj\n", i + 1).bytes());
    }
    let xref = pdf.len();
    pdf.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).bytes());
    for offset in offsets {
        pdf.extend(format!("{offset:010} 00000 n \n").bytes());
    }
    pdf.extend(format!("trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n", objects.len() + 1).bytes());
    pdf
}

/// A PDF page without a fax image is not a broken picture: the page says so and offers
/// the PDF, which is the fax server's own, unchanged.
#[tokio::test]
async fn r_f1_a_pdf_page_without_a_fax_image_is_explained_and_offered_as_the_pdf() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    let document = drawing_only_pdf();
    let fax = keep(&app, FAX_ONLY, 5, "gateway:42", &document);

    let page = get(&app, &fax_url(&fax), &cookies).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert_eq!(page.body.matches("<img ").count(), 0, "{}", page.body);
    assert!(page.body.contains("1ページ目は画像で表示できません。"), "{}", page.body);
    assert!(page.body.contains(&format!("<a href=\"{}/pdf\">PDF</a>でご覧ください", fax_url(&fax))));
    let png = fetch(&app, &format!("{}/pages/1.png", fax_url(&fax)), &cookies).await;
    assert_eq!(png.status, StatusCode::NOT_FOUND);
    let pdf = fetch(&app, &format!("{}/pdf", fax_url(&fax)), &cookies).await;
    assert_eq!((pdf.status, pdf.body), (StatusCode::OK, document));
}

/// R-F1: a fax whose PDF would pass what the site makes (its pages share one dense
/// strip: a record of half a megabyte declaring a PDF of about 75 MB) is not downloaded
/// as one; the answer says why and leads back to the fax, whose pages still show.
#[tokio::test]
async fn r_f1_a_fax_too_large_for_one_pdf_is_refused_with_why_and_its_pages_still_show() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    let dense = testkit::fax::checkered_tiff(50, 1728, 2296);
    assert!(dense.len() < 1 << 20, "a small record: {} bytes", dense.len());
    let fax = keep(&app, FAX_ONLY, 5, "dense-50", &dense);

    let pdf = fetch(&app, &format!("{}/pdf", fax_url(&fax)), &cookies).await;
    assert_eq!(pdf.status, StatusCode::UNPROCESSABLE_ENTITY);
    let body = String::from_utf8(pdf.body).unwrap();
    assert!(body.contains("PDFにするには大きすぎるため"), "{body}");
    assert!(body.contains(&format!("<a href=\"{}\">FAXへ戻る</a>", fax_url(&fax))), "{body}");
    let png = fetch(&app, &format!("{}/pages/50.png", fax_url(&fax)), &cookies).await;
    assert_eq!(png.status, StatusCode::OK);
    assert!(png.body.starts_with(PNG_SIGNATURE));
}

#[tokio::test]
async fn r_f1_delete_needs_the_csrf_token_then_the_fax_and_its_urls_are_gone() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    let fax = keep(&app, FAX_ONLY, 5, "hylafax-000123", FINE_G4);
    let delete = format!("{}/delete", fax_url(&fax));

    for body in [String::new(), format!("csrf={}", super::csrf::new_token())] {
        let refused = post(&app, &delete, &cookies, &body).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{body}");
        assert!(stored_fax(&app, &fax).is_some(), "nothing deleted");
    }

    let csrf = get(&app, &fax_url(&fax), &cookies).await.csrf();
    let deleted = post(&app, &delete, &cookies, &format!("csrf={csrf}")).await;
    assert_eq!(deleted.location(), Some(format!("{}?deleted=1", faxes(FAX_ONLY)).as_str()));
    assert!(stored_fax(&app, &fax).is_none());
    let list = get(&app, deleted.location().unwrap(), &cookies).await;
    assert!(list.body.contains("削除しました。"), "{}", list.body);
    assert!(!list.body.contains(&fax_url(&fax)) && list.body.contains("受信したFAXはありません。"));

    for url in [fax_url(&fax), format!("{}/pages/1.png", fax_url(&fax)), format!("{}/pdf", fax_url(&fax))] {
        assert_eq!(fetch(&app, &url, &cookies).await.status, StatusCode::NOT_FOUND, "{url}");
    }
    assert_eq!(post(&app, &delete, &cookies, &format!("csrf={csrf}")).await.status, StatusCode::NOT_FOUND);
}

/// Every fax address answers another subscriber (another line, or a number-unit login on
/// the same line without the fax number) exactly as one that does not exist: the same
/// 404 page, whether the fax is someone else's, guessed, or malformed.
#[tokio::test]
async fn r_f1_another_subscriber_gets_the_same_404_for_every_fax_url() {
    let app = app();
    let owner = fax_subscriber(&app).await;
    let fax = keep(&app, FAX_ONLY, 5, "hylafax-000123", FINE_G4);
    provision(
        &app,
        &format!(r#"{{"contract":"{STRANGER}","numbers":[{{"number":"{STRANGER}","services":["call","fax"]}}]}}"#),
    );
    let own = keep(&app, STRANGER, 5, "hylafax-000999", FINE_G4);
    app.f.credentials.set_password_async(n(STRANGER), PASSWORD.into(), t0()).await.unwrap();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let stranger = logged_in(&app, STRANGER, PASSWORD).await;
    let neighbour = logged_in(&app, CONTRACT, PASSWORD).await;
    assert_eq!(get(&app, &fax_url(&own), &stranger).await.status, StatusCode::OK, "their own fax shows");

    let base = fax_url(&fax);
    let guesses = [
        base.clone(),
        format!("/fax/{STRANGER}/{}", fax.key().split_once('/').unwrap().1),
        format!("/fax/{FAX_ONLY}/{:013}/hylafax-000124", fax.received_at.timestamp_millis()),
        format!("/fax/{FAX_ONLY}/176400000/hylafax-000123"),
        format!("/fax/{FAX_ONLY}/{:013}/{}", fax.received_at.timestamp_millis(), "x".repeat(65)),
        format!("/fax/03-1234-5670/{:013}/hylafax-000123", fax.received_at.timestamp_millis()),
    ];
    for cookies in [&stranger, &neighbour] {
        let csrf = get(&app, "/", cookies).await.csrf();
        // The page of a fax address the site makes (the first three) says to log in with
        // the fax's number, naming the address it was given; every other answer is one
        // page. Neither tells whether there is such a fax.
        let (mut shown, mut pages) = (Vec::new(), Vec::new());
        for (i, url) in guesses.iter().enumerate() {
            for path in [url.clone(), format!("{url}/pages/1.png"), format!("{url}/pdf")] {
                let reply = fetch(&app, &path, cookies).await;
                assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
                match (i < 3, &path == url) {
                    (true, true) => {
                        let key = url.strip_prefix("/fax/").unwrap();
                        shown.push(String::from_utf8(reply.body).unwrap().replace(key, "KEY"));
                    }
                    _ => pages.push(reply.body),
                }
            }
            let deleted = post(&app, &format!("{url}/delete"), cookies, &format!("csrf={csrf}")).await;
            assert_eq!(deleted.status, StatusCode::NOT_FOUND, "{url}");
            pages.push(deleted.body.into_bytes());
        }
        assert!(pages.windows(2).all(|w| w[0] == w[1]), "one page for every reason");
        assert!(shown.windows(2).all(|w| w[0] == w[1]), "one page for every fax address: {shown:?}");
        assert!(shown[0].contains("FAXが届いた電話番号でログインし直してください"), "{}", shown[0]);
        for path in [faxes(FAX_ONLY), settings(FAX_ONLY)] {
            assert_eq!(get(&app, &path, cookies).await.status, StatusCode::NOT_FOUND, "{path}");
        }
        let form = format!("csrf={csrf}&version=0&enabled=on");
        assert_eq!(post(&app, &settings(FAX_ONLY), cookies, &form).await.status, StatusCode::NOT_FOUND);
        let test = format!("{}/test/0", settings(FAX_ONLY));
        assert_eq!(
            post(&app, &test, cookies, &format!("{form}&dest_0=a@example.jp")).await.status,
            StatusCode::NOT_FOUND
        );
    }
    let kept = stored_fax(&app, &fax).expect("not deleted");
    assert!(!kept.read, "not marked read by anyone else");
    assert_eq!(app.f.store.number(&n(FAX_ONLY)).unwrap().unwrap().fax, FaxSettings::default());
    assert_eq!(get(&app, &base, &owner).await.status, StatusCode::OK, "the owner still sees it");
}

/// R-A1: a line login reaches every number of the line, the fax number's faxes too.
#[tokio::test]
async fn r_a1_r_f1_a_line_login_reads_the_lines_faxes() {
    let app = app();
    let fax = keep(&app, FAX_ONLY, 5, "hylafax-000123", FINE_G4);
    let cookies = ready(&app, AuthUnit::Line, CONTRACT).await;
    assert_eq!(get(&app, &fax_url(&fax), &cookies).await.status, StatusCode::OK);
    assert!(get(&app, &faxes(FAX_ONLY), &cookies).await.body.contains(&fax_url(&fax)));
}

#[tokio::test]
async fn r_f1_the_fax_pages_need_a_session_and_the_changed_password() {
    let app = app();
    let fax = keep(&app, FAX_ONLY, 5, "hylafax-000123", FINE_G4);
    for url in [format!("{}/pdf", fax_url(&fax)), faxes(FAX_ONLY), settings(FAX_ONLY), "/fax".into()] {
        assert_eq!(get(&app, &url, "").await.location(), Some("/login"), "{url}");
    }
    // The fax itself (the mail's link) logs in to it.
    let login = format!("/login?fax={}", fax.key());
    assert_eq!(get(&app, &fax_url(&fax), "").await.location(), Some(login.as_str()));
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::Number).unwrap();
    app.f.credentials.set_temporary_async(n(FAX_ONLY), "12345678".into(), t0()).await.unwrap();
    let cookies = logged_in(&app, FAX_ONLY, "12345678").await;
    let change = format!("/password?fax={}", fax.key());
    assert_eq!(get(&app, &fax_url(&fax), &cookies).await.location(), Some(change.as_str()), "the change, then the fax");
    assert!(!stored_fax(&app, &fax).unwrap().read);
}

/// R-F1, R-S3: a fax mail's link opened in a browser whose session's password was
/// invalidated meanwhile leads to the login page saying so, the fax shown after it.
#[tokio::test]
async fn r_f1_r_s3_a_fax_link_with_an_invalidated_password_says_so_and_keeps_the_fax() {
    let app = app();
    let fax = keep(&app, FAX_ONLY, 5, "hylafax-000123", FINE_G4);
    let cookies = ready(&app, AuthUnit::Line, CONTRACT).await;
    for _ in 0..10 {
        let verdict = app.f.credentials.verify_async(n(CONTRACT), "wrong-one-1".into(), t0()).await.unwrap();
        assert!(verdict.is_err(), "a wrong password is refused");
    }
    assert!(app.f.credentials.record(&n(CONTRACT)).unwrap().unwrap().invalidated);
    let login = format!("/login?notice=invalidated&fax={}", fax.key());
    assert_eq!(get(&app, &fax_url(&fax), &cookies).await.location(), Some(login.as_str()));
}

/// The settings page of `number` and a form body with its csrf and version plus `extra`.
async fn form(app: &App, cookies: &str, number: &str, extra: &str) -> String {
    let page = get(app, &settings(number), cookies).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let start = page.body.find("name=\"version\" value=\"").expect("a version field") + 22;
    let version = page.body[start..].split('"').next().unwrap();
    format!("csrf={}&version={version}&{extra}", page.csrf())
}

async fn save(app: &App, cookies: &str, extra: &str) -> Reply {
    let body = form(app, cookies, FAX_ONLY, extra).await;
    post(app, &settings(FAX_ONLY), cookies, &body).await
}

fn stored(app: &App) -> FaxSettings {
    app.f.store.number(&n(FAX_ONLY)).unwrap().unwrap().fax
}

#[tokio::test]
async fn r_f1_r_n1_r_n2_fax_settings_save_start_checked_destinations_and_the_pdf_attachment() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    let page = get(&app, &settings(FAX_ONLY), &cookies).await;
    assert!(page.body.contains("FAXお知らせメール設定") && page.body.contains("FAXをPDFで添付する"));
    assert!(page.body.contains(&format!("href=\"{}\"", faxes(FAX_ONLY))), "links the received faxes");
    assert!(page.body.contains("name=\"dest_4\"") && !page.body.contains("name=\"dest_5\""), "five rows");

    let rows: String = (0..6).map(|i| format!("&dest_{i}=a{i}@example.jp&send_{i}=on")).collect();
    let saved = save(&app, &cookies, &format!("enabled=on&attach_pdf=on&current={PASSWORD}{rows}")).await;
    assert_eq!(saved.location(), Some("/numbers/0312345670/fax?saved=1"), "{}", saved.body);
    let s = stored(&app);
    assert!(s.enabled && s.attach_pdf && s.version == 1, "{s:?}");
    let got: Vec<(&str, bool)> = s.destinations.iter().map(|d| (d.address.as_str(), d.send)).collect();
    let want: Vec<(String, bool)> = (0..5).map(|i| (format!("a{i}@example.jp"), true)).collect();
    assert_eq!(got, want.iter().map(|(a, s)| (a.as_str(), *s)).collect::<Vec<_>>(), "no sixth row");
    assert_eq!(app.f.store.number(&n(FAX_ONLY)).unwrap().unwrap().call, Default::default(), "calls untouched");

    let shown = get(&app, saved.location().unwrap(), &cookies).await;
    assert!(shown.body.contains("設定しました。"));
    assert!(shown.body.contains("name=\"enabled\" value=\"on\" checked"));
    assert!(shown.body.contains("name=\"attach_pdf\" value=\"on\" checked"));

    // One unchecked: a destination change, so the password again; 停止 and no PDF.
    let rows: String = (0..5).map(|i| format!("&dest_{i}=a{i}@example.jp&send_{i}=on")).collect();
    let rows = rows.replace("&send_3=on", "");
    let saved = save(&app, &cookies, &format!("enabled=off&current={PASSWORD}{rows}")).await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    let s = stored(&app);
    assert!(!s.enabled && !s.attach_pdf && !s.destinations[3].send && s.destinations[4].send, "{s:?}");
}

#[tokio::test]
async fn r_n2_fax_destination_changes_need_the_current_password() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    let rows = "enabled=on&dest_0=a@example.jp&send_0=on";
    let missing = save(&app, &cookies, rows).await;
    assert!(missing.body.contains("現在のパスワードを入力してください"), "{}", missing.body);
    let wrong = save(&app, &cookies, &format!("{rows}&current=wrong123")).await;
    assert!(wrong.body.contains("現在のパスワードが正しくありません"), "{}", wrong.body);
    assert_eq!(app.f.credentials.record(&n(FAX_ONLY)).unwrap().unwrap().failures, 1, "counts towards R-S3");
    assert_eq!(stored(&app), FaxSettings::default());
    // Without a destination change, no password.
    let started = save(&app, &cookies, "enabled=on").await;
    assert_eq!(started.status, StatusCode::SEE_OTHER, "{}", started.body);
    assert!(stored(&app).enabled);
}

#[tokio::test]
async fn r_n3_an_invalid_fax_destination_is_refused_beside_its_row() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    let extra = format!("enabled=on&dest_0=ok@example.jp&dest_2=bad@@example.jp&send_2=on&current={PASSWORD}");
    let reply = save(&app, &cookies, &extra).await;
    assert_eq!(reply.status, StatusCode::OK);
    let row = reply.body.split("name=\"dest_2\"").nth(1).unwrap().split("</p>").next().unwrap();
    assert!(row.contains("「@」を1つだけ"), "beside row 3: {row}");
    assert!(reply.body.contains("value=\"bad@@example.jp\""), "the entered value is kept");
    assert!(!reply.body.contains(PASSWORD), "the password is not echoed");
    assert_eq!(stored(&app), FaxSettings::default());
}

#[tokio::test]
async fn r_s9_a_stale_fax_settings_form_is_refused_with_409() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    let first = form(&app, &cookies, FAX_ONLY, "enabled=on&attach_pdf=on").await;
    let second = form(&app, &cookies, FAX_ONLY, "enabled=off").await;
    assert_eq!(post(&app, &settings(FAX_ONLY), &cookies, &first).await.status, StatusCode::SEE_OTHER);
    let refused = post(&app, &settings(FAX_ONLY), &cookies, &second).await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert!(refused.body.contains("別の画面で変更されています"), "{}", refused.body);
    let s = stored(&app);
    assert!(s.enabled && s.attach_pdf && s.version == 1, "the first save survives: {s:?}");
}

#[tokio::test]
async fn the_fax_settings_form_takes_only_offered_values_and_its_csrf_token() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    for extra in ["enabled=maybe", "enabled=on&attach_pdf=yes", "enabled=on&send_0=1&dest_0=a@example.jp"] {
        let refused = save(&app, &cookies, extra).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{extra}");
    }
    for body in ["version=0&enabled=on".to_owned(), format!("version=0&enabled=on&csrf={}", super::csrf::new_token())] {
        assert_eq!(post(&app, &settings(FAX_ONLY), &cookies, &body).await.status, StatusCode::FORBIDDEN, "{body}");
    }
    assert_eq!(stored(&app), FaxSettings::default());
}

#[tokio::test]
async fn r_n2_fax_send_test_mails_the_typed_address_once_and_saves_nothing() {
    let sink = SmtpSink::start(0).await.unwrap();
    let env = sink.engine_env();
    let config = Settings::load_from(None, env.map(|(k, v)| (k.to_owned(), v))).unwrap();
    let app = app_with_test_mailer(Some(Arc::new(TestMailer::new(&config.smtp).unwrap())));
    let cookies = fax_subscriber(&app).await;

    let page = get(&app, &settings(FAX_ONLY), &cookies).await;
    let button =
        format!("formaction=\"{}/test/1\" aria-label=\"送信先2に送信テスト\">送信テスト</button>", settings(FAX_ONLY));
    assert!(page.body.contains(&button), "{}", page.body);
    let body = form(&app, &cookies, FAX_ONLY, "enabled=on&dest_1=fax@example.jp").await;
    let posted = post(&app, &format!("{}/test/1", settings(FAX_ONLY)), &cookies, &body).await;
    let location = format!("{}?tested=1", settings(FAX_ONLY));
    assert_eq!(posted.location(), Some(location.as_str()), "{}", posted.body);
    let shown = get(&app, &location, &cookies).await;
    assert!(shown.body.contains("fax@example.jp にテストメールを送信しました。"), "{}", shown.body);
    assert!(shown.body.contains("value=\"fax@example.jp\""), "the form as typed");
    let mails = sink.wait_for(1, StdDuration::from_secs(10)).await;
    assert_eq!(mails[0].rcpt_to, ["fax@example.jp"]);
    let mail = mail_parser::MessageParser::default().parse(&mails[0].data).unwrap();
    assert_eq!(mail.subject(), Some("【FAXお知らせ】送信テスト"), "the fax service's test mail");
    let again = get(&app, &location, &cookies).await;
    assert!(again.body.contains("value=\"fax@example.jp\""), "a reload keeps what was typed");
    assert_eq!(stored(&app), FaxSettings::default(), "nothing saved");
    assert_eq!(sink.count(), 1);
}

/// R-C1, R-F1: サービス選択 offers FAXお知らせメール for the number that has it, says
/// there is none otherwise, and a login reaching several fax numbers chooses first.
#[tokio::test]
async fn r_c1_r_f1_the_menu_links_the_fax_settings_or_says_there_are_none() {
    let app = app();
    let cookies = fax_subscriber(&app).await;
    let menu = get(&app, "/", &cookies).await.body;
    assert!(menu.contains(&format!("<a href=\"{}\">FAXお知らせメール</a>", settings(FAX_ONLY))), "{menu}");
    assert!(menu.contains(&format!("<a href=\"{}\">受信FAX一覧</a>", faxes(FAX_ONLY))), "{menu}");
    assert!(menu.contains("着信お知らせメール（ご契約の電話番号がありません）"), "no call service: {menu}");

    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let call_only = logged_in(&app, CONTRACT, PASSWORD).await;
    let menu = get(&app, "/", &call_only).await.body;
    assert!(menu.contains("FAXお知らせメール（ご契約の電話番号がありません）"), "{menu}");
    assert!(!menu.contains("/fax"), "no fax link: {menu}");

    let second = "0611112223";
    provision(
        &app,
        &format!(
            r#"{{"contract":"{STRANGER}","numbers":[{{"number":"{STRANGER}","services":["call","fax"]}},{{"number":"{second}","services":["fax"]}}]}}"#
        ),
    );
    app.f.store.set_line_unit(&n(STRANGER), AuthUnit::Line).unwrap();
    keep(&app, second, 5, "hylafax-1", FINE_G4);
    app.f.credentials.set_password_async(n(STRANGER), PASSWORD.into(), t0()).await.unwrap();
    let both = logged_in(&app, STRANGER, PASSWORD).await;
    let menu = get(&app, "/", &both).await.body;
    assert!(menu.contains("<a href=\"/fax\">FAXお知らせメール</a>（電話番号選択）"), "{menu}");
    let choice = get(&app, "/fax", &both).await;
    assert_eq!(choice.status, StatusCode::OK);
    for number in [STRANGER, second] {
        assert!(choice.body.contains(&format!("href=\"{}\"", settings(number))), "{number}");
        assert!(choice.body.contains(&format!("href=\"{}\"", faxes(number))), "{number}");
    }
    assert_eq!(choice.body.matches("（未読1件）").count(), 1, "{}", choice.body);
    assert!(!choice.body.contains(FAX_ONLY), "another line's number");
}

/// R-F1, R-S1: the fax mail's link followed without a session leads to the login page,
/// which shows that fax once logged in; only a fax address of this site is carried, so
/// the login never redirects anywhere else, and a password that must be changed first
/// still is (R-S4).
#[tokio::test]
async fn r_f1_r_s1_the_mail_s_link_logs_in_then_shows_the_fax() {
    let app = app();
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::Number).unwrap();
    app.f.credentials.set_password_async(n(FAX_ONLY), PASSWORD.into(), t0()).await.unwrap();
    let fax = keep(&app, FAX_ONLY, 5, "hylafax-000123", FINE_G4);
    let key = fax.key();

    let followed = get(&app, &fax_url(&fax), "").await;
    let login_path = format!("/login?fax={key}");
    assert_eq!((followed.status, followed.location()), (StatusCode::SEE_OTHER, Some(login_path.as_str())));
    let page = get(&app, &login_path, "").await;
    let token = page.cookie_value(super::CSRF_COOKIE).expect("a pre-session CSRF cookie");
    assert!(page.body.contains(&format!("<input type=\"hidden\" name=\"fax\" value=\"{key}\">")), "{}", page.body);

    let log_in = |fax: String| {
        let (app, token) = (&app, token.clone());
        async move {
            let cookies = format!("{}={token}", super::CSRF_COOKIE);
            let form = format!("number={FAX_ONLY}&password={PASSWORD}&csrf={token}&fax={fax}");
            post(app, "/login", &cookies, &form).await
        }
    };
    let reply = log_in(key.clone()).await;
    assert_eq!(reply.location(), Some(fax_url(&fax).as_str()), "straight to the fax");
    for elsewhere in ["%2F%2Fevil.example%2Fx", "https%3A%2F%2Fevil.example", "..%2F..%2Fnumbers", "0312345670%2Fx%2Fy"]
    {
        assert_eq!(log_in(elsewhere.to_owned()).await.location(), Some("/"), "{elsewhere}");
    }
    let unknown = get(&app, "/login?fax=%2F%2Fevil.example", "").await;
    assert!(!unknown.body.contains("name=\"fax\""), "not carried: {}", unknown.body);

    // A temporary password: the password change comes first (R-S4), then the fax (it
    // was the menu, the fax the subscriber came for to be found again).
    app.f.credentials.set_temporary_async(n(FAX_ONLY), "20261204".into(), t0()).await.unwrap();
    let cookies = format!("{}={token}", super::CSRF_COOKIE);
    let form = format!("number={FAX_ONLY}&password=20261204&csrf={token}&fax={key}");
    let reply = post(&app, "/login", &cookies, &form).await;
    let change = format!("/password?fax={key}");
    assert_eq!(reply.location(), Some(change.as_str()));
    let session = format!("{}={}", super::SESSION_COOKIE, reply.cookie_value(super::SESSION_COOKIE).unwrap());
    let page = get(&app, &change, &session).await;
    assert!(page.body.contains(&format!("<input type=\"hidden\" name=\"fax\" value=\"{key}\">")), "{}", page.body);
    let form = format!("current=20261204&new={PASSWORD}x&confirm={PASSWORD}x&csrf={}&fax={key}", page.csrf());
    let changed = post(&app, "/password", &session, &form).await;
    assert_eq!(changed.location(), Some(fax_url(&fax).as_str()), "then the fax: {}", changed.body);

    // Already logged in with the change still due, the link goes the same way.
    app.f.credentials.set_temporary_async(n(FAX_ONLY), "20261205".into(), t0()).await.unwrap();
    let form = format!("number={FAX_ONLY}&password=20261205&csrf={token}");
    let reply = post(&app, "/login", &cookies, &form).await;
    let due = format!("{}={}", super::SESSION_COOKIE, reply.cookie_value(super::SESSION_COOKIE).unwrap());
    assert_eq!(get(&app, &fax_url(&fax), &due).await.location(), Some(change.as_str()));
    // A fax key the site does not make is carried nowhere.
    for bad in ["%2F%2Fevil.example", "%22%3E%3Cscript%3E"] {
        let page = get(&app, &format!("/password?fax={bad}"), &due).await;
        assert!(!page.body.contains("name=\"fax\""), "{bad}: {}", page.body);
    }
}

/// R-F1, R-A2: under the `number` unit, a subscriber logged in with one number of the
/// line follows the fax mail's link of another (a fax-only number): the page said only
/// 「指定されたFAXは表示できません」, as for a fax that is gone, and the fax's address
/// was lost. Now it says to log in with the number the fax came to, and its logout
/// leads to the login that shows the fax. It says so for any well-formed link, whether
/// or not there is such a fax: nothing is told of another number's faxes.
#[tokio::test]
async fn r_f1_r_a2_a_fax_link_of_another_number_of_the_line_leads_to_its_login() {
    let app = app();
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::Number).unwrap();
    app.f.credentials.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    let fax = keep(&app, FAX_ONLY, 5, "hylafax-000124", FINE_G4);
    let key = fax.key();
    let session = logged_in(&app, CONTRACT, PASSWORD).await;

    let page = get(&app, &fax_url(&fax), &session).await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    assert!(page.body.contains("FAXが届いた電話番号でログインし直してください"), "{}", page.body);
    assert!(page.body.contains(&format!("<input type=\"hidden\" name=\"fax\" value=\"{key}\">")), "{}", page.body);
    let form = format!("csrf={}&fax={key}", page.csrf());
    let out = post(&app, "/logout", &session, &form).await;
    let login = format!("/login?notice=logout&fax={key}");
    assert_eq!(out.location(), Some(login.as_str()));
    assert!(get(&app, "/", &session).await.location().is_some_and(|to| to.starts_with("/login")), "logged out");

    // A key the site does not make is not carried through the logout.
    let session = logged_in(&app, CONTRACT, PASSWORD).await;
    let page = get(&app, "/", &session).await;
    let form = format!("csrf={}&fax=%2F%2Fevil.example", page.csrf());
    assert_eq!(post(&app, "/logout", &session, &form).await.location(), Some("/login?notice=logout"));
}
