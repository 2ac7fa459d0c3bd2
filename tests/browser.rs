//! The settings site in a real browser: a subscriber's first visit, end to end, in a
//! headless Chromium driven through chromedriver, against the engine on a mock Kafka
//! cluster and a real SMTP sink (all in this process, on random loopback ports).
//!
//! The journey: a temporary password by phone (IVR) → login → the forced password
//! change → 電話番号選択 → settings: 開始, two destinations (one not checked), 送信テスト,
//! the send conditions and three designated numbers → save (with Enter) → a save from a
//! stale second window refused → logout. Then calls arrive as CDRs, and only the call
//! the settings let through is notified, only to the checked address.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`bash scripts/setup.sh`); fails,
//! never skips, without them. Screenshots of every page go to
//! `$CARGO_TARGET_TMPDIR/browser-journey/`.

// Helpers live beside this file in browser/ (a crate root's `mod` would look in tests/);
// tests/browser_fax.rs shares them, and each journey uses part of them.
#[allow(dead_code)]
#[path = "browser/chrome.rs"]
mod chrome;
#[allow(dead_code)]
#[path = "browser/world.rs"]
mod world;

use std::path::PathBuf;
use std::time::Duration;

use chrome::{Browser, Chromedriver};
use fantoccini::key::Key;
use world::{cdr, World, ADDITIONAL, CONTRACT};

/// Bound of every wait on a condition (a page, a mail, a metric).
pub const WAIT: Duration = Duration::from_secs(60);

/// The 8 digits keyed on the phone (R-I5).
const TEMPORARY: &str = "20261124";
/// The subscriber's own password (R-S5).
const PASSWORD: &str = "Notify2026";
/// 送信先 with 送信 checked: gets notifications.
const CHECKED: &str = "taro@example.jp";
/// 送信先 with 送信 unchecked: gets the test mail it asks for, never a notification.
const UNCHECKED: &str = "hanako.mobile@example.jp";
/// 指定番号 with 指定 checked (R-N5).
const DESIGNATED: [&str; 2] = ["09011112222", "0667778888"];
/// Entered in the designated list but with 指定 unchecked: does not count (R-N5).
const NOT_DESIGNATED: &str = "09055556666";

/// Added from a second window (R-S9); 指定 checked.
const EXTRA_DESIGNATED: &str = "0612340000";

/// The settings form's visible 設定 button (an off-screen one comes first, for Enter; the
/// 送信テスト buttons carry a `formaction`).
const SAVE: &str = "form[action$=\"/call\"] p > button:not([formaction])";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_i_r_s4_r_s9_r_c2_r_n1_r_n2_r_n4_r_n5_first_visit_in_a_browser_then_calls_are_notified() {
    let shots = screenshot_dir();
    let driver = Chromedriver::start(&shots.join("chromedriver.log"));
    let mut world = World::start().await;
    let mut browser = driver.browser(shots).await;

    // R-I2, R-I5, R-I7: unit 1 (line) from the contract number, 8 digits twice.
    assert_eq!(world.phone_ivr(CONTRACT, &["1", TEMPORARY, TEMPORARY]).await, "DONE");

    log_in_and_change_password(&mut browser, &world).await;
    choose_number(&mut browser).await;
    set_destinations_and_send_test(&mut browser, &world).await;
    set_conditions_and_save(&mut browser, &world).await;
    check_saved_after_reload(&mut browser, &world).await;
    a_stale_window_does_not_overwrite(&mut browser, &world).await;
    log_out(&mut browser, &world).await;
    browser.close().await;
    drop(driver);

    calls_are_notified_to_the_checked_address_only(&mut world).await;
}

/// `$CARGO_TARGET_TMPDIR/browser-journey/`, emptied of an earlier run's screenshots.
fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-journey");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    println!("screenshots: {}", dir.display());
    dir
}

/// R-S1, R-S4: the temporary password logs in, but only to the password change, which
/// nothing else gets past; after it, the menu.
async fn log_in_and_change_password(browser: &mut Browser, world: &World) {
    browser.open(&world.url("/login"), "ログイン").await;
    browser.shot("login").await;
    browser.fill("number", CONTRACT).await;
    browser.fill("password", TEMPORARY).await;
    browser.click("form[action=\"/login\"] button[type=\"submit\"]").await;

    browser.expect_page("パスワード変更").await;
    assert!(browser.body().await.contains("仮パスワード、または設定から60日を過ぎたパスワードでログインしました"));
    browser.shot("password-change").await;
    // Any other page leads back here until the password is changed.
    browser.open(&world.url("/numbers"), "パスワード変更").await;

    browser.fill("current", TEMPORARY).await;
    browser.fill("new", PASSWORD).await;
    browser.fill("confirm", PASSWORD).await;
    browser.click("form[action=\"/password\"] button[type=\"submit\"]").await;
    browser.expect_page("メニュー").await;
    assert!(browser.body().await.contains(&format!("ログイン中の電話番号: {CONTRACT}")));
    browser.shot("menu").await;
}

/// R-C1, R-C2: 着信お知らせメール, then the number among the line's two.
async fn choose_number(browser: &mut Browser) {
    browser.click_link("着信お知らせメール").await;
    browser.expect_page("電話番号選択").await;
    let list = browser.text("table").await;
    assert!(list.contains(CONTRACT) && list.contains(ADDITIONAL), "{list}");
    browser.shot("numbers").await;

    browser.click_link(ADDITIONAL).await;
    browser.expect_page("着信お知らせメール設定").await;
    assert!(browser.body().await.contains(&format!("電話番号: {ADDITIONAL}")));
    assert!(browser.checked("input[name=\"enabled\"][value=\"off\"]").await, "a new number starts stopped");
    browser.shot("settings").await;
}

/// R-N1, R-N2: 開始, two destinations, and 送信テスト of the unchecked one: the mail
/// goes to the address as typed, the page shows the server's answer and keeps what
/// was typed.
async fn set_destinations_and_send_test(browser: &mut Browser, world: &World) {
    browser.click("input[name=\"enabled\"][value=\"on\"]").await;
    browser.fill("dest_0", CHECKED).await;
    browser.check("send_0", true).await;
    browser.fill("dest_1", UNCHECKED).await;
    browser.check("send_1", false).await;

    browser.click("button[formaction$=\"/call/test/1\"]").await;
    let status = browser.wait_text("p[role=\"status\"]", "にテストメールを送信しました").await;
    assert!(status.starts_with(UNCHECKED), "{status}");
    let mails = world.mails(1).await;
    assert_eq!(mails[0].rcpt_to, [UNCHECKED]);
    assert_eq!(subject(&mails[0]), "【着信お知らせ】送信テスト");

    assert!(browser.checked("input[name=\"enabled\"][value=\"on\"]").await);
    assert_eq!(browser.value("dest_0").await, CHECKED);
    assert!(browser.checked("input[name=\"send_0\"]").await);
    assert_eq!(browser.value("dest_1").await, UNCHECKED);
    assert!(!browser.checked("input[name=\"send_1\"]").await);
    browser.shot("send-test").await;
}

/// R-N4, R-N5: both send conditions, two designated numbers and one left unchecked (a
/// new page offers three empty rows);
/// the destinations changed, so the current password goes with the save.
async fn set_conditions_and_save(browser: &mut Browser, world: &World) {
    browser.check("designated_only", true).await;
    browser.check("missed_only", true).await;
    for (i, number) in DESIGNATED.iter().enumerate() {
        browser.fill(&format!("designated_{i}"), number).await;
        browser.check(&format!("designate_{i}"), true).await;
    }
    browser.fill("designated_2", NOT_DESIGNATED).await;
    browser.check("designate_2", false).await;
    // Typed, then Enter, as most people save: the form's first submit button is a
    // 設定 laid out off-screen, so Enter saves rather than sending destination 1 a test mail.
    browser.fill("current", &format!("{PASSWORD}{}", char::from(Key::Enter))).await;
    browser.wait_text("p[role=\"status\"]", "設定しました。").await;
    browser.expect_page("着信お知らせメール設定").await;
    assert_eq!(world.sink.count(), 1, "Enter sent a test mail instead of saving");
    browser.shot("saved").await;
}

/// What was saved is what a fresh page shows.
async fn check_saved_after_reload(browser: &mut Browser, world: &World) {
    browser.open(&world.url(&format!("/numbers/{ADDITIONAL}/call")), "着信お知らせメール設定").await;
    assert!(browser.checked("input[name=\"enabled\"][value=\"on\"]").await, "開始");
    assert_eq!(browser.value("dest_0").await, CHECKED);
    assert!(browser.checked("input[name=\"send_0\"]").await);
    assert_eq!(browser.value("dest_1").await, UNCHECKED);
    assert!(!browser.checked("input[name=\"send_1\"]").await);
    assert!(browser.checked("input[name=\"designated_only\"]").await);
    assert!(browser.checked("input[name=\"missed_only\"]").await);
    for (i, number) in DESIGNATED.iter().enumerate() {
        assert_eq!(browser.value(&format!("designated_{i}")).await, *number);
        assert!(browser.checked(&format!("input[name=\"designate_{i}\"]")).await, "designate_{i}");
    }
    assert_eq!(browser.value("designated_2").await, NOT_DESIGNATED);
    assert!(!browser.checked("input[name=\"designate_2\"]").await);
    assert_eq!(browser.value("current").await, "", "a password is never put back into a page");
    browser.shot("reloaded").await;
}

/// R-S9: two windows on the same settings. A save from the second wins; the first,
/// still showing the older settings, is refused (409) with a request to reload, and
/// the reload shows the second window's save.
async fn a_stale_window_does_not_overwrite(browser: &mut Browser, world: &World) {
    let settings = world.url(&format!("/numbers/{ADDITIONAL}/call"));
    let first = browser.client.window().await.expect("window");
    let second = browser.client.new_window(true).await.expect("a second tab").handle;
    browser.client.switch_to_window(second.clone()).await.expect("switch");
    browser.open(&settings, "着信お知らせメール設定").await;
    browser.fill("designated_3", EXTRA_DESIGNATED).await;
    browser.check("designate_3", true).await;
    browser.click(SAVE).await;
    browser.wait_text("p[role=\"status\"]", "設定しました。").await;
    browser.shot("second-window-saved").await;

    browser.client.switch_to_window(first.clone()).await.expect("switch back");
    browser.check("missed_only", false).await;
    browser.click(SAVE).await;
    browser.wait_text("ul.errors", "別の画面で変更されています").await;
    assert!(!browser.checked("input[name=\"missed_only\"]").await, "what was typed is shown again");
    browser.shot("stale-refused").await;

    browser.open(&settings, "着信お知らせメール設定").await;
    assert!(browser.checked("input[name=\"missed_only\"]").await, "the stale save changed nothing");
    assert_eq!(browser.value("designated_3").await, EXTRA_DESIGNATED);
    browser.client.switch_to_window(second).await.expect("switch");
    browser.client.close_window().await.expect("close the second tab");
    browser.client.switch_to_window(first).await.expect("switch back");
}

/// R-O4, R-S7: logout ends the session at once; the settings are out of reach.
async fn log_out(browser: &mut Browser, world: &World) {
    browser.click("form[action=\"/logout\"] button[type=\"submit\"]").await;
    browser.expect_page("ログイン").await;
    browser.shot("logged-out").await;
    browser.open(&world.url(&format!("/numbers/{ADDITIONAL}/call")), "ログイン").await;
    assert_eq!(browser.path().await, "/login");
}

/// R-N1, R-N2, R-N4, R-N5 as the browser set them: an answered call and a call from the
/// unchecked number send nothing; a missed call from a designated number is notified
/// to the checked address and never to the unchecked one.
async fn calls_are_notified_to_the_checked_address_only(world: &mut World) {
    world.produce(&cdr("c-answered", ADDITIONAL, DESIGNATED[0], "answered")).await;
    world.produce(&cdr("c-unchecked", ADDITIONAL, NOT_DESIGNATED, "no_answer")).await;
    world.produce(&cdr("c-missed", ADDITIONAL, DESIGNATED[1], "no_answer")).await;

    world.mails(2).await;
    world.wait_metric("callnotify_cdrs_filtered_total{reason=\"answered\"}", 1.0).await;
    world.wait_metric("callnotify_cdrs_filtered_total{reason=\"not_designated\"}", 1.0).await;
    // Stopping drains mails in flight: whatever the engine meant to send is in the sink.
    world.stop().await;

    let notifications: Vec<_> = world.sink.mails().into_iter().filter(|m| !subject(m).contains("送信テスト")).collect();
    let to: Vec<_> = notifications.iter().map(|m| m.rcpt_to.clone()).collect();
    assert_eq!(to, [[CHECKED]], "one notification, to the checked address only");
    let body = body(&notifications[0]);
    assert!(body.contains(&format!("着信番号：{ADDITIONAL}")), "{body}");
    assert!(body.contains(&format!("発信者番号：{}", DESIGNATED[1])), "{body}");
    assert!(body.contains("応答できませんでした"), "{body}");
}

fn subject(mail: &testkit::smtp::ReceivedMail) -> String {
    let parsed = mail_parser::MessageParser::default().parse(&mail.data).expect("a MIME message");
    parsed.subject().unwrap_or_default().to_owned()
}

fn body(mail: &testkit::smtp::ReceivedMail) -> String {
    let parsed = mail_parser::MessageParser::default().parse(&mail.data).expect("a MIME message");
    parsed.body_text(0).map(|b| b.into_owned()).unwrap_or_default()
}
