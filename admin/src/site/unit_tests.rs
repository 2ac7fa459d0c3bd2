//! 認証単位変更 over HTTP (R-O2, R-O3), with the helpers of [`super::tests`].

use axum::http::StatusCode;
use engine::store::AuthUnit;

use super::tests::{app, get, logged_in, login, post, App, PASSWORD, TEMPORARY};
use super::unit::{DONE_LINE, DONE_NUMBER};
use super::SESSION_COOKIE;
use crate::credentials::CredentialRecord;
use crate::testing::{n, t0, ADDITIONAL, CONTRACT, FAX_ONLY};

/// The additional number's own password under unit `number`.
const OTHER_PASSWORD: &str = "efgh5678";

fn unit(app: &App) -> Option<AuthUnit> {
    app.f.store.line(&n(CONTRACT)).unwrap().unwrap().unit
}

fn record(app: &App, number: &str) -> Option<CredentialRecord> {
    app.f.credentials.record(&n(number)).unwrap()
}

/// A line with `unit`, passwords on every number, and the contract number logged in.
async fn setup(unit: AuthUnit) -> (App, String) {
    let app = app();
    app.f.store.set_line_unit(&n(CONTRACT), unit).unwrap();
    let c = &app.f.credentials;
    c.set_password_async(n(CONTRACT), PASSWORD.into(), t0()).await.unwrap();
    c.set_password_async(n(ADDITIONAL), OTHER_PASSWORD.into(), t0()).await.unwrap();
    c.set_password_async(n(FAX_ONLY), OTHER_PASSWORD.into(), t0()).await.unwrap();
    let cookies = logged_in(&app, CONTRACT, PASSWORD).await;
    (app, cookies)
}

/// The R-O2 form: the contract number's password, and `additional` for each other number.
fn o2_form(csrf: &str, contract: &str, additional: &str) -> String {
    format!("csrf={csrf}&from=number&pw_{CONTRACT}={contract}&pw_{ADDITIONAL}={additional}&pw_{FAX_ONLY}={additional}")
}

#[tokio::test]
async fn r_o3_line_to_number_keeps_the_contract_credential_and_removes_the_others() {
    let (app, cookies) = setup(AuthUnit::Line).await;
    let menu = get(&app, "/", &cookies).await;
    assert!(menu.body.contains("<a href=\"/unit\">認証単位変更</a>"), "{}", menu.body);
    let page = get(&app, "/unit", &cookies).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("電話番号単位に変更する") && page.body.contains(ADDITIONAL), "{}", page.body);
    let csrf = page.csrf();
    let contract_before = record(&app, CONTRACT).unwrap();

    // Refused: an empty or wrong password changes nothing; the wrong one counts (R-S3).
    let empty = post(&app, "/unit", &cookies, &format!("csrf={csrf}&from=line&password=")).await;
    assert!(empty.body.contains("パスワードを入力してください"), "{}", empty.body);
    assert_eq!(record(&app, CONTRACT).unwrap().failures, 0, "an empty field is no attempt");
    let wrong = post(&app, "/unit", &cookies, &format!("csrf={csrf}&from=line&password=wrong123")).await;
    assert_eq!(wrong.status, StatusCode::OK);
    assert!(wrong.body.contains("パスワードが正しくありません"), "{}", wrong.body);
    assert_eq!(unit(&app), Some(AuthUnit::Line));
    assert_eq!(record(&app, CONTRACT).unwrap().failures, 1);
    assert!(record(&app, ADDITIONAL).is_some());

    let done = post(&app, "/unit", &cookies, &format!("csrf={csrf}&from=line&password={PASSWORD}")).await;
    assert_eq!(done.location(), Some(DONE_NUMBER));
    assert_eq!(done.cookie_value(SESSION_COOKIE).as_deref(), Some(""), "the cookie is dropped");
    assert_eq!(unit(&app), Some(AuthUnit::Number));
    let contract_after = record(&app, CONTRACT).unwrap();
    assert_eq!((contract_after.hash, contract_after.set_at), (contract_before.hash, contract_before.set_at));
    assert_eq!(record(&app, ADDITIONAL), None, "a new temporary password by phone is needed");
    assert_eq!(record(&app, FAX_ONLY), None);
    assert!(app.state.sessions().is_empty(), "the session ended");
    assert_eq!(get(&app, "/", &cookies).await.location(), Some("/login?notice=ended"));

    let notice = get(&app, DONE_NUMBER, "").await;
    assert!(notice.body.contains("電話番号単位に変更しました"), "{}", notice.body);
    assert_eq!(login(&app, CONTRACT, PASSWORD).await.location(), Some("/"));
    assert_eq!(login(&app, ADDITIONAL, OTHER_PASSWORD).await.location(), None, "refused");
}

#[tokio::test]
async fn r_o2_number_to_line_needs_every_password_and_then_the_contract_one_is_the_line_s() {
    let (app, cookies) = setup(AuthUnit::Number).await;
    let other = logged_in(&app, ADDITIONAL, OTHER_PASSWORD).await;
    let page = get(&app, "/unit", &cookies).await;
    assert_eq!(page.status, StatusCode::OK);
    // The fax-only number's too: after the change the line's login reads its faxes.
    for number in [CONTRACT, ADDITIONAL, FAX_ONLY] {
        assert!(page.body.contains(&format!("name=\"pw_{number}\"")), "{number}: {}", page.body);
    }
    let csrf = page.csrf();
    let without_fax_number =
        format!("csrf={csrf}&from=number&pw_{CONTRACT}={PASSWORD}&pw_{ADDITIONAL}={OTHER_PASSWORD}");
    let refused = post(&app, "/unit", &cookies, &without_fax_number).await;
    assert!(refused.body.contains(&format!("{FAX_ONLY}番の")), "{}", refused.body);
    assert_eq!(unit(&app), Some(AuthUnit::Number), "nothing changed");
    assert!(record(&app, FAX_ONLY).is_some());

    let done = post(&app, "/unit", &cookies, &o2_form(&csrf, PASSWORD, OTHER_PASSWORD)).await;
    assert_eq!(done.location(), Some(DONE_LINE), "{}", done.body);
    assert_eq!(unit(&app), Some(AuthUnit::Line));
    assert!(record(&app, CONTRACT).is_some());
    assert_eq!(record(&app, ADDITIONAL), None);
    assert_eq!(record(&app, FAX_ONLY), None);
    assert!(app.state.sessions().is_empty(), "every session of the line ended");
    assert_eq!(get(&app, "/", &other).await.location(), Some("/login?notice=ended"));

    let notice = get(&app, DONE_LINE, "").await;
    assert!(notice.body.contains("回線単位に変更しました"), "{}", notice.body);
    let line = logged_in(&app, CONTRACT, PASSWORD).await;
    let numbers = get(&app, "/numbers", &line).await;
    assert!(numbers.body.contains(CONTRACT) && numbers.body.contains(ADDITIONAL), "{}", numbers.body);
}

#[tokio::test]
async fn r_o2_a_wrong_password_names_the_number_counts_and_changes_nothing() {
    let (app, cookies) = setup(AuthUnit::Number).await;
    let csrf = get(&app, "/unit", &cookies).await.csrf();

    let missing = post(&app, "/unit", &cookies, &o2_form(&csrf, PASSWORD, "")).await;
    assert!(missing.body.contains(&format!("{ADDITIONAL}番のパスワードを入力してください")), "{}", missing.body);
    assert_eq!(record(&app, ADDITIONAL).unwrap().failures, 0);

    let wrong = post(&app, "/unit", &cookies, &o2_form(&csrf, PASSWORD, "wrong123")).await;
    assert_eq!(wrong.status, StatusCode::OK);
    assert!(wrong.body.contains(&format!("{ADDITIONAL}番のパスワードが正しくありません")), "{}", wrong.body);
    assert!(!wrong.body.contains(&format!("{CONTRACT}番のパスワードが正しくありません")));
    assert_eq!(unit(&app), Some(AuthUnit::Number));
    assert_eq!(record(&app, ADDITIONAL).unwrap().failures, 1, "a failed attempt (R-S3)");
    assert!(record(&app, FAX_ONLY).is_some());

    // A number without a usable credential (e.g. never set) fails too, and is named.
    app.f.credentials.remove(&n(ADDITIONAL)).unwrap();
    let unknown = post(&app, "/unit", &cookies, &o2_form(&csrf, PASSWORD, OTHER_PASSWORD)).await;
    assert!(unknown.body.contains(&format!("{ADDITIONAL}番のパスワードは使えません")), "{}", unknown.body);
    assert_eq!(unit(&app), Some(AuthUnit::Number));
    assert_eq!(get(&app, "/", &cookies).await.status, StatusCode::OK, "the session goes on");
}

#[tokio::test]
async fn r_o2_r_o3_csrf_missing_or_wrong_is_403() {
    for (unit_before, form) in [
        (AuthUnit::Line, format!("from=line&password={PASSWORD}")),
        (AuthUnit::Number, format!("from=number&pw_{CONTRACT}={PASSWORD}&pw_{ADDITIONAL}={OTHER_PASSWORD}")),
    ] {
        let (app, cookies) = setup(unit_before).await;
        for body in [form.clone(), format!("{form}&csrf={}", super::csrf::new_token())] {
            let reply = post(&app, "/unit", &cookies, &body).await;
            assert_eq!(reply.status, StatusCode::FORBIDDEN, "{body}");
        }
        assert_eq!(unit(&app), Some(unit_before));
        assert!(record(&app, ADDITIONAL).is_some());
    }
}

#[tokio::test]
async fn r_o2_r_o3_a_login_other_than_the_contract_number_cannot_reach_unit() {
    let (app, contract) = setup(AuthUnit::Number).await;
    let cookies = logged_in(&app, ADDITIONAL, OTHER_PASSWORD).await;
    let menu = get(&app, "/", &cookies).await;
    assert!(!menu.body.contains("/unit"), "{}", menu.body);
    // What the page is for and who can use it (it answered "not found" for a number).
    let page = get(&app, "/unit", &cookies).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(page.body.contains("認証単位の変更は、回線の契約番号でログインしたときにできます。"), "{}", page.body);
    assert!(!page.body.contains("06-6480-6430"), "its contract number logs in: no phone route: {}", page.body);
    let csrf = menu.csrf();
    let form = format!("csrf={csrf}&from=number&pw_{CONTRACT}={PASSWORD}&pw_{ADDITIONAL}={OTHER_PASSWORD}");
    assert_eq!(post(&app, "/unit", &cookies, &form).await.status, StatusCode::FORBIDDEN);
    assert_eq!(unit(&app), Some(AuthUnit::Number));
    // Without a session, to the login page.
    assert_eq!(get(&app, "/unit", "").await.location(), Some("/login"));
    assert_eq!(get(&app, "/unit", &contract).await.status, StatusCode::OK);
}

#[tokio::test]
async fn r_o2_r_o3_unit_needs_the_forced_password_change_first() {
    let app = app();
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::Line).unwrap();
    app.f.credentials.set_temporary_async(n(CONTRACT), TEMPORARY.into(), t0()).await.unwrap();
    let reply = login(&app, CONTRACT, TEMPORARY).await;
    let cookies = format!("{SESSION_COOKIE}={}", reply.cookie_value(SESSION_COOKIE).unwrap());
    assert_eq!(get(&app, "/unit", &cookies).await.location(), Some("/password"));
}

#[tokio::test]
async fn admin_user_lines_are_not_offered_the_unit_change() {
    let (app, cookies) = setup(AuthUnit::AdminUser).await;
    let page = get(&app, "/unit", &cookies).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body.contains("管理者/ユーザー単位の回線では")
            && !page.body.contains("<form method=\"post\" action=\"/unit\"")
    );
    let csrf = get(&app, "/", &cookies).await.csrf();
    for form in [
        format!("csrf={csrf}&from=admin_user&password={PASSWORD}"),
        format!("csrf={csrf}&from=line&password={PASSWORD}"),
    ] {
        let reply = post(&app, "/unit", &cookies, &form).await;
        assert_eq!(reply.status, StatusCode::OK, "{form}");
    }
    assert_eq!(unit(&app), Some(AuthUnit::AdminUser));
    assert!(record(&app, ADDITIONAL).is_some());
}

#[tokio::test]
async fn r_o3_a_form_made_for_another_unit_changes_nothing() {
    let (app, cookies) = setup(AuthUnit::Line).await;
    let csrf = get(&app, "/unit", &cookies).await.csrf();
    // Changed to `number` meanwhile (another window): the stale `line` form is refused.
    app.f.store.set_line_unit(&n(CONTRACT), AuthUnit::Number).unwrap();
    let reply = post(&app, "/unit", &cookies, &format!("csrf={csrf}&from=line&password={PASSWORD}")).await;
    assert!(reply.body.contains("別の画面で変更されています"), "{}", reply.body);
    assert_eq!(unit(&app), Some(AuthUnit::Number));
    assert!(record(&app, ADDITIONAL).is_some());
}

/// A state owner that fails at the first op named `at`: from then on every write fails
/// (it stopped answering, as after a write the sender waited out: 60 s), or, if it goes
/// on, that op alone (its store refused it) and it carries out the rest.
struct FailsAt {
    store: engine::store::Store,
    at: &'static str,
    goes_on: bool,
    failed: std::sync::atomic::AtomicBool,
}

impl FailsAt {
    fn attached(app: &App, at: &'static str, goes_on: bool) {
        let owner = FailsAt { store: app.f.store.clone(), at, goes_on, failed: Default::default() };
        app.f.store.attach_writer(std::sync::Arc::new(owner));
    }
}

impl engine::store::state::StateWriter for FailsAt {
    fn send(self: std::sync::Arc<Self>, ops: Vec<engine::store::state::Op>) -> engine::store::state::Answers {
        use std::sync::atomic::Ordering;
        let answers: Vec<_> = ops
            .iter()
            .map(|op| {
                let first = op.name() == self.at && !self.failed.swap(true, Ordering::SeqCst);
                if first || (!self.goes_on && self.failed.load(Ordering::SeqCst)) {
                    return Err(engine::store::StoreError::State("no state owner answered".into()));
                }
                self.store.execute(op).map(|(reply, _)| reply)
            })
            .collect();
        Box::new(move || answers)
    }
}

/// R-O2, R-A1: a change to the line unit whose writes fail part-way (the state owner
/// stops answering) never leaves an additional number's password logging in with the
/// line's reach. The unit was set first and the passwords removed after it: with the
/// removals failed, each additional number logged in to every number of the line.
#[tokio::test]
async fn r_o2_a_change_failing_part_way_leaves_no_additional_password_with_the_line_s_reach() {
    // The owner stops answering at the first removal; or refuses it alone and goes on
    // with the rest of the request (the unit, sent with the removals, was set).
    for goes_on in [false, true] {
        let (app, cookies) = setup(AuthUnit::Number).await;
        let csrf = get(&app, "/unit", &cookies).await.csrf();
        FailsAt::attached(&app, "remove_credential", goes_on);
        let failed = post(&app, "/unit", &cookies, &o2_form(&csrf, PASSWORD, OTHER_PASSWORD)).await;
        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
        let reach_of_additional = unit(&app) == Some(AuthUnit::Line) && record(&app, ADDITIONAL).is_some();
        assert!(!reach_of_additional, "the additional number's password logs in to the whole line ({goes_on})");
        assert_eq!(unit(&app), Some(AuthUnit::Number), "the unit did not change ({goes_on})");
    }
}

/// R-O2, R-I2, R-I3: a line under `number` whose contract number has no service has no
/// password for it, so nobody can log in with it and change the unit here: the page
/// said only to log in with it. It names the way that is left, by phone, and what it
/// takes away.
#[tokio::test]
async fn r_o2_a_line_whose_contract_number_has_no_service_is_shown_the_phone_route() {
    let (app, _) = setup(AuthUnit::Number).await;
    let line = app.f.store.line(&n(CONTRACT)).unwrap().unwrap();
    let services = |number: &str| app.f.store.number(&n(number)).unwrap().unwrap().services;
    let numbers = [
        (n(CONTRACT), engine::store::Services::default(), None),
        (n(ADDITIONAL), services(ADDITIONAL), None),
        (n(FAX_ONLY), services(FAX_ONLY), None),
    ];
    app.f.store.upsert_line(&line, &numbers).unwrap();
    let cookies = logged_in(&app, ADDITIONAL, OTHER_PASSWORD).await;
    let page = get(&app, "/unit", &cookies).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(
        page.body.contains("仮パスワード設定ダイヤル（06-6480-6430）") && page.body.contains("「1」"),
        "{}",
        page.body
    );
    assert!(page.body.contains("この電話番号のパスワードは使えなくなります"), "{}", page.body);
}
