//! FAXお知らせメール in a real browser (R-F1): a subscriber starts fax mail on the site,
//! a fax arrives as a record on Kafka, its mail links to it, and the subscriber reads it
//! on the site, downloads it as a PDF and deletes it; another subscriber never sees it.
//! Headless Chromium through chromedriver, against the engine on a mock Kafka cluster
//! and a real SMTP sink, all in this process (as `tests/browser.rs`).
//!
//! The owner comes back through the mail's link logged out: the login leads to the fax.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`bash scripts/setup.sh`); fails, never
//! skips, without them. Screenshots go to `$CARGO_TARGET_TMPDIR/browser-fax/`.

// The call journey's helpers (tests/browser.rs); this test uses part of them.
#[allow(dead_code)]
#[path = "browser/chrome.rs"]
mod chrome;
#[allow(dead_code)]
#[path = "browser/world.rs"]
mod world;

use std::path::PathBuf;
use std::time::Duration;

use chrome::{Browser, Chromedriver};
use world::{http_bytes, World};

/// Bound of every wait on a condition (a page, a mail, a metric).
pub const WAIT: Duration = Duration::from_secs(60);

/// The fax subscriber's number: a line of its own, fax only.
const FAX_NUMBER: &str = "0312345670";
/// Another subscriber with fax, on another line.
const OTHER: &str = "0612345670";
const LINES: [&str; 2] = [
    r#"{"contract":"0312345670","numbers":[{"number":"0312345670","services":["fax"]}]}"#,
    r#"{"contract":"0612345670","numbers":[{"number":"0612345670","services":["fax"]}]}"#,
];
/// The 8 digits keyed on the phone (R-I5), and the password chosen after (R-S5).
const TEMPORARY: &str = "20261204";
const PASSWORD: &str = "Faxes2026";
const DESTINATION: &str = "fax-inbox@example.jp";
/// A three-page A4 fax, T.6 (G4), as `tiffcp -c g4` writes it.
const FAX: &[u8] = include_bytes!("../engine/tests/fixtures/fax/fine-g4.tif");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_f1_r_n1_r_n2_a_fax_is_mailed_with_its_link_read_downloaded_and_deleted_on_the_site() {
    let shots = screenshot_dir();
    let driver = Chromedriver::start(&shots.join("chromedriver.log"));
    let world = World::start_with(&LINES).await;
    let mut browser = driver.browser(shots).await;

    first_login(&mut browser, &world, FAX_NUMBER).await;
    start_fax_mail(&mut browser).await;

    // R-F1: a fax arrives; its mail goes to the checked address with the link.
    world.produce_fax(&testkit::fax::record("hylafax-000123", FAX_NUMBER, FAX, 3)).await;
    let mails = world.mails(1).await;
    assert_eq!(mails[0].rcpt_to, [DESTINATION]);
    let mail = mail_parser::MessageParser::default().parse(&mails[0].data).expect("a MIME message");
    assert_eq!(mail.subject(), Some(format!("【FAXお知らせ】0612345678から{FAX_NUMBER}へのFAX（3枚）").as_str()));
    let body = mail.body_text(0).expect("a text body").into_owned();
    let link = body.lines().find(|l| l.starts_with(&world.site)).expect("a link to the site").trim().to_owned();
    assert!(link.starts_with(&world.url(&format!("/fax/{FAX_NUMBER}/"))), "{link}");

    // The list shows it unread; its page shows every page as a picture.
    browser.open(&world.url("/"), "メニュー").await;
    browser.click_link("受信FAX一覧").await;
    browser.expect_page("受信FAX一覧").await;
    let list = browser.text("table").await;
    assert!(list.contains("0612345678") && list.contains("未読"), "{list}");
    browser.shot("fax-list").await;
    browser.open(&link, "受信FAX").await;
    assert_eq!(pictures_shown(&browser).await, 3, "the three pages, each loaded");
    browser.shot("fax-pages").await;
    browser.click_link("受信FAX一覧へ戻る").await;
    browser.expect_page("受信FAX一覧").await;
    assert!(!browser.text("table").await.contains("未読"), "read once shown");

    // The PDF, as the download link serves it to this session.
    let cookies = session_cookie(&browser).await;
    let (status, head, pdf) = get(&world, &format!("{}/pdf", path_of(&link)), &cookies).await;
    assert_eq!(status, 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/pdf"), "{head}");
    assert!(pdf.starts_with(b"%PDF-") && pdf.len() > 1000, "a PDF of the fax");

    // Another subscriber gets the page every unknown address gets (R-M3).
    log_out(&mut browser).await;
    first_login(&mut browser, &world, OTHER).await;
    browser.open(&link, "ページが見つかりません").await;
    browser.shot("other-subscriber-404").await;
    let other = session_cookie(&browser).await;
    for path in [path_of(&link), format!("{}/pdf", path_of(&link)), format!("{}/pages/1.png", path_of(&link))] {
        assert_eq!(get(&world, &path, &other).await.0, 404, "{path}");
    }
    browser.open(&world.url("/"), "メニュー").await;
    log_out(&mut browser).await;

    // The owner follows the mail's link logged out: the login leads to the fax. Deleted,
    // it is gone from the list and its address answers 404.
    browser.open(&link, "ログイン").await;
    assert!(browser.body().await.contains("ログインすると、お知らせしたFAXを表示します。"));
    browser.shot("login-for-the-fax").await;
    log_in_here(&browser, FAX_NUMBER, PASSWORD).await;
    browser.expect_page("受信FAX").await;
    browser.click("form[action$=\"/delete\"] button[type=\"submit\"]").await;
    browser.expect_page("受信FAX一覧").await;
    browser.wait_text("p[role=\"status\"]", "削除しました").await;
    assert!(!browser.body().await.contains("0612345678"), "no fax listed");
    browser.shot("fax-deleted").await;
    browser.open(&link, "ページが見つかりません").await;
    browser.close().await;
}

/// `$CARGO_TARGET_TMPDIR/browser-fax/`, emptied of an earlier run's screenshots.
fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-fax");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    println!("screenshots: {}", dir.display());
    dir
}

/// R-I2, R-I7, R-S4: a temporary password by phone (unit 1), the first login with it and
/// the forced password change; ends on the menu.
async fn first_login(browser: &mut Browser, world: &World, number: &str) {
    assert_eq!(world.phone_ivr(number, &["1", TEMPORARY, TEMPORARY]).await, "DONE");
    log_in(browser, world, number, TEMPORARY).await;
    browser.expect_page("パスワード変更").await;
    browser.fill("current", TEMPORARY).await;
    browser.fill("new", PASSWORD).await;
    browser.fill("confirm", PASSWORD).await;
    browser.click("form[action=\"/password\"] button[type=\"submit\"]").await;
    browser.expect_page("メニュー").await;
}

async fn log_in(browser: &mut Browser, world: &World, number: &str, password: &str) {
    browser.open(&world.url("/login"), "ログイン").await;
    log_in_here(browser, number, password).await;
}

/// Fills in and sends the login page shown.
async fn log_in_here(browser: &Browser, number: &str, password: &str) {
    browser.fill("number", number).await;
    browser.fill("password", password).await;
    browser.click("form[action=\"/login\"] button[type=\"submit\"]").await;
}

async fn log_out(browser: &mut Browser) {
    browser.click("form[action=\"/logout\"] button[type=\"submit\"]").await;
    browser.expect_page("ログイン").await;
}

/// R-C1, R-N1, R-N2: サービス選択 → FAXお知らせメール, 開始 and one checked destination,
/// saved with the current password (the destinations changed).
async fn start_fax_mail(browser: &mut Browser) {
    browser.shot("menu").await;
    browser.click_link("FAXお知らせメール").await;
    browser.expect_page("FAXお知らせメール設定").await;
    assert!(browser.checked("input[name=\"enabled\"][value=\"off\"]").await, "a new number starts stopped");
    browser.click("input[name=\"enabled\"][value=\"on\"]").await;
    browser.fill("dest_0", DESTINATION).await;
    browser.check("send_0", true).await;
    browser.fill("current", PASSWORD).await;
    browser.click("form[action$=\"/fax\"] p > button:not([formaction])").await;
    browser.wait_text("p[role=\"status\"]", "設定しました。").await;
    browser.shot("fax-settings-saved").await;
}

/// How many pictures the page shows, each loaded and decoded by the browser (0 if any
/// is broken).
async fn pictures_shown(browser: &Browser) -> u64 {
    let script = "const done = arguments[arguments.length - 1];\n\
                  Promise.all(Array.from(document.images).map(i => i.decode().then(() => i.naturalWidth > 0, () => false)))\n\
                  .then(ok => done(ok.every(x => x) ? ok.length : 0));";
    let shown = browser.client.execute_async(script, Vec::new()).await.expect("the script runs");
    shown.as_u64().expect("a count")
}

/// The browser's session cookie, as a `Cookie` header value.
async fn session_cookie(browser: &Browser) -> String {
    let cookies = browser.client.get_all_cookies().await.expect("cookies");
    cookies.iter().map(|c| format!("{}={}", c.name(), c.value())).collect::<Vec<_>>().join("; ")
}

/// The path of a site URL.
fn path_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.find('/').map_or("/".to_owned(), |i| rest[i..].to_owned())
}

/// A GET of the site with `cookies`, beside the browser: status, headers, body.
async fn get(world: &World, path: &str, cookies: &str) -> (u16, String, Vec<u8>) {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {}\r\nCookie: {cookies}\r\nConnection: close\r\n\r\n", world.site_addr());
    http_bytes(world.site_addr(), &request).await
}
