//! The IVR flow, rule by rule (R-I1..R-I8).

use chrono::Duration;
use engine::store::state::Op;
use engine::store::{AuthUnit, Store};

use super::*;
use crate::clock::Clock;
use crate::credentials::{CredentialKind, LoginFailure, LoginOk};
use crate::testing::{fixture, n, Fixture, ADDITIONAL, CONTRACT, FAX_ONLY, OTHER_LINE};

const PASSWORD: &str = "12345678";

fn id(step: &Step) -> Option<PromptId> {
    step.prompt.as_ref().map(|p| p.id)
}

fn text(step: &Step) -> &str {
    step.prompt.as_ref().map_or("", |p| p.text.as_str())
}

fn start(f: &Fixture, caller: &str) -> Call {
    Call::start(&f.ivr, caller).unwrap().0
}

/// Asserts an INVALID step that waits for `awaiting` again.
fn assert_invalid(step: &Step, awaiting: PromptId) {
    assert_eq!(id(step), Some(PromptId::Invalid), "{step:?}");
    assert_eq!(text(step), "入力された番号が正しくありません。もう一度押してください。");
    assert_eq!(step.awaiting, Some(awaiting));
    assert!(!step.ends);
}

#[test]
fn r_i1_a_call_from_a_line_is_answered_with_select_unit() {
    let f = fixture();
    let (_, step) = Call::start(&f.ivr, CONTRACT).unwrap();
    assert_eq!(id(&step), Some(PromptId::SelectUnit));
    assert_eq!(text(&step), "仮パスワード設定をする単位を選択します。回線単位に設定する場合は1、電話番号単位に設定する場合は2、管理者/ユーザー単位に設定する場合は3を入力してください。");
    assert_eq!((step.awaiting, step.ends), (Some(PromptId::SelectUnit), false));
    let (call, _) = Call::start(&f.ivr, "+81 3-1234-5679").unwrap();
    assert_eq!(call.caller(), n(ADDITIONAL), "caller IDs are normalised");
}

#[test]
fn r_i1_other_callers_are_refused() {
    let f = fixture();
    for caller in ["0399999999", "09011112222", "110"] {
        let err = Call::start(&f.ivr, caller).unwrap_err();
        assert!(matches!(err, IvrError::NotProvisioned(_)), "{caller}: {err:?}");
        assert!(err.is_refusal());
    }
    for withheld in ["", "anonymous"] {
        let err = Call::start(&f.ivr, withheld).unwrap_err();
        assert!(matches!(err, IvrError::NoCallerId), "{withheld:?}: {err:?}");
        assert!(err.is_refusal());
    }
}

/// A node's view of the shared state that has not yet applied a write another node
/// made: it applies it before the answer to this node's next write, as the state
/// topic's order has it (docs/cluster.md).
struct Lagging {
    view: Store,
    elsewhere: std::sync::Mutex<Vec<Op>>,
}

impl engine::store::state::StateWriter for Lagging {
    fn send(self: std::sync::Arc<Self>, ops: Vec<Op>) -> engine::store::state::Answers {
        for op in self.elsewhere.lock().unwrap().drain(..) {
            self.view.execute(&op).unwrap();
        }
        let answers: Vec<_> = ops.iter().map(|op| self.view.execute(op).map(|(reply, _)| reply)).collect();
        Box::new(move || answers)
    }
}

/// R-I1 on a cluster: a line provisioned through another node a moment ago, which this
/// node's view does not show yet, is answered, not refused; a caller on no line is still
/// refused once the view has caught up. Before, the first lookup in the view decided.
#[test]
fn r_i1_a_line_just_provisioned_through_another_node_is_answered() {
    // The write as another node's owner carried it out.
    let elsewhere = Store::temporary().unwrap();
    let line = r#"{"contract":"0398765432","numbers":[{"number":"0398765432","services":["call"]}]}"#;
    engine::provision::import(&elsewhere, line.as_bytes()).unwrap();
    let record = elsewhere.number(&n("0398765432")).unwrap().unwrap();
    let provisioned = Op::UpsertLine {
        line: elsewhere.line(&record.contract).unwrap().unwrap(),
        numbers: vec![(record.number, record.services, Some(record.call))],
    };

    let view = Store::temporary().unwrap();
    let lagging =
        std::sync::Arc::new(Lagging { view: view.clone(), elsewhere: std::sync::Mutex::new(vec![provisioned]) });
    view.attach_writer(lagging.clone());
    let ivr =
        Ivr::new(view.clone(), Credentials::open(&view).unwrap(), crate::clock::ManualClock::new(chrono::Utc::now()));

    let (call, step) = Call::start(&ivr, "0398765432").expect("answered");
    assert_eq!((call.caller(), id(&step)), (n("0398765432"), Some(PromptId::SelectUnit)));
    let err = Call::start(&ivr, "0399999999").unwrap_err();
    assert!(matches!(err, IvrError::NotProvisioned(_)), "{err:?}");
}

/// The shared state with no owner answering (the cluster unreachable, or an older
/// owner during an upgrade): every write fails.
struct NoOwner;

impl engine::store::state::StateWriter for NoOwner {
    fn send(self: std::sync::Arc<Self>, ops: Vec<Op>) -> engine::store::state::Answers {
        let answers =
            ops.iter().map(|_| Err(engine::store::StoreError::State("no state owner answered".into()))).collect();
        Box::new(move || answers)
    }
}

/// R-I1: when the state owner does not answer the lookup's sync, a caller this node's
/// view lacks is refused as before (most are on no line), not answered with an error.
#[test]
fn r_i1_without_the_state_owner_s_answer_a_caller_the_view_lacks_is_refused() {
    let f = fixture();
    f.store.attach_writer(std::sync::Arc::new(NoOwner));
    let err = Call::start(&f.ivr, "0399999999").unwrap_err();
    assert!(matches!(err, IvrError::NotProvisioned(_)), "{err:?}");
    assert!(Call::start(&f.ivr, CONTRACT).is_ok(), "a caller the view shows is answered");
}

#[test]
fn r_i2_unit_1_targets_the_contract_number_even_from_an_additional_number() {
    let f = fixture();
    let mut call = start(&f, ADDITIONAL);
    let step = call.input("1").unwrap();
    assert_eq!(id(&step), Some(PromptId::EnterPassword));
    assert_eq!(text(&step), "0312345678番の仮パスワードの設定を行います。設定したい仮パスワードを入力してください。");
}

#[test]
fn r_i3_unit_2_asks_for_a_number_of_the_line_ending_with_hash() {
    let f = fixture();
    let mut call = start(&f, CONTRACT);
    let step = call.input("2").unwrap();
    assert_eq!(id(&step), Some(PromptId::EnterNumber));
    assert_eq!(text(&step), "仮パスワードを設定する電話番号を市外局番から入力し、最後に#を押してください。");
    let step = call.input("0312345679#").unwrap();
    assert_eq!(id(&step), Some(PromptId::EnterPassword));
    assert!(text(&step).starts_with("0312345679番の"), "{step:?}");
}

#[test]
fn r_i3_anything_else_is_invalid_and_asked_again() {
    let f = fixture();
    let other_line = format!("{OTHER_LINE}#");
    for keys in ["0312345679", "03-1234-5679#", "#", "", "0312345679##", "*", &other_line, "0399999999#"] {
        let mut call = start(&f, CONTRACT);
        call.input("2").unwrap();
        assert_invalid(&call.input(keys).unwrap(), PromptId::EnterNumber);
        let step = call.input("0312345679#").unwrap();
        assert_eq!(id(&step), Some(PromptId::EnterPassword), "{keys:?} then a good number");
    }
}

#[test]
fn r_i4_unit_3_from_the_contract_number_asks_for_a_number_as_unit_2() {
    let f = fixture();
    let mut call = start(&f, CONTRACT);
    assert_eq!(id(&call.input("3").unwrap()), Some(PromptId::EnterNumber));
    assert_invalid(&call.input(&format!("{OTHER_LINE}#")).unwrap(), PromptId::EnterNumber);
    let step = call.input(&format!("{CONTRACT}#")).unwrap();
    assert!(text(&step).starts_with("0312345678番の"), "the administrator's own number: {step:?}");
}

#[test]
fn r_i4_unit_3_from_an_additional_number_targets_that_number() {
    let f = fixture();
    let mut call = start(&f, ADDITIONAL);
    let step = call.input("3").unwrap();
    assert_eq!(id(&step), Some(PromptId::EnterPassword));
    assert!(text(&step).starts_with("0312345679番の"), "{step:?}");
}

#[test]
fn r_i3_r_i6_an_invalid_unit_is_asked_again() {
    let f = fixture();
    for keys in ["0", "4", "12", "", "#", "1#"] {
        let mut call = start(&f, CONTRACT);
        assert_invalid(&call.input(keys).unwrap(), PromptId::SelectUnit);
        assert_eq!(id(&call.input("1").unwrap()), Some(PromptId::EnterPassword));
    }
}

#[test]
fn r_i5_the_temporary_password_is_exactly_8_digits() {
    let f = fixture();
    for keys in ["1234567", "123456789", "1234567a", "1234567#", "12345678#", "１２３４５６７８", ""] {
        let mut call = start(&f, CONTRACT);
        call.input("1").unwrap();
        assert_invalid(&call.input(keys).unwrap(), PromptId::EnterPassword);
        let step = call.input(PASSWORD).unwrap();
        assert_eq!(id(&step), Some(PromptId::Confirm), "{keys:?} then 8 digits");
        assert_eq!(text(&step), "確認のためにもう一度仮パスワードを入力してください。");
    }
}

#[test]
fn r_i5_the_keyed_password_never_shows_in_debug_output() {
    let f = fixture();
    let mut call = start(&f, CONTRACT);
    call.input("1").unwrap();
    call.input("97531864").unwrap();
    let debug = format!("{call:?}");
    assert!(debug.contains("Confirm") && !debug.contains("97531864"), "{debug}");
}

#[test]
fn r_i5_a_malformed_confirmation_is_asked_again() {
    let f = fixture();
    let mut call = start(&f, CONTRACT);
    call.input("1").unwrap();
    call.input(PASSWORD).unwrap();
    assert_invalid(&call.input("1234").unwrap(), PromptId::Confirm);
    assert_eq!(id(&call.input(PASSWORD).unwrap()), Some(PromptId::Done));
}

#[test]
fn r_i5_a_confirmation_that_differs_starts_password_entry_over() {
    let f = fixture();
    let mut call = start(&f, CONTRACT);
    call.input("1").unwrap();
    call.input(PASSWORD).unwrap();
    assert_invalid(&call.input("87654321").unwrap(), PromptId::EnterPassword);
    assert_eq!(f.credentials.record(&n(CONTRACT)).unwrap(), None, "nothing stored");
    call.input("87654321").unwrap();
    let step = call.input("87654321").unwrap();
    assert_eq!(id(&step), Some(PromptId::Done));
    assert_eq!(
        f.credentials.verify(&n(CONTRACT), "87654321", f.clock.now()).unwrap().map(|ok| ok.kind),
        Ok(CredentialKind::Temporary)
    );
}

#[test]
fn r_i6_three_invalid_entries_at_one_step_end_the_call_saying_to_dial_again() {
    let f = fixture();
    let mut call = start(&f, CONTRACT);
    assert_invalid(&call.input("9").unwrap(), PromptId::SelectUnit);
    assert_invalid(&call.input("9").unwrap(), PromptId::SelectUnit);
    let step = call.input("9").unwrap();
    assert_eq!(step, Step { prompt: Some(Prompt::new(PromptId::Ended)), awaiting: None, ends: true });
    assert_eq!(text(&step), "入力された番号が正しくありません。お手数ですが、もう一度おかけ直しください。");
    assert!(matches!(call.input("1"), Err(IvrError::Ended)), "the subscriber must dial again");
}

#[test]
fn r_i6_invalid_entries_count_across_steps() {
    let f = fixture();
    let mut call = start(&f, CONTRACT);
    assert_invalid(&call.input("7").unwrap(), PromptId::SelectUnit);
    call.input("2").unwrap();
    assert_invalid(&call.input(OTHER_LINE).unwrap(), PromptId::EnterNumber);
    call.input("0312345679#").unwrap();
    let step = call.input("123").unwrap();
    assert!(step.ends && step.prompt.as_ref().is_some_and(|p| p.id == PromptId::Ended), "{step:?}");
    assert_eq!(f.credentials.record(&n(ADDITIONAL)).unwrap(), None);
    assert_eq!(f.store.line(&n(CONTRACT)).unwrap().unwrap().unit, None, "no unit set");
}

/// Keys a whole call and returns the last step.
fn dial(f: &Fixture, caller: &str, keys: &[&str]) -> Step {
    let mut call = start(f, caller);
    keys.iter().map(|k| call.input(k).unwrap()).last().unwrap()
}

#[test]
fn r_i7_done_stores_the_password_hashed_for_the_target_and_sets_the_unit() {
    let cases = [
        (CONTRACT, vec!["1"], CONTRACT, AuthUnit::Line),
        (ADDITIONAL, vec!["1"], CONTRACT, AuthUnit::Line),
        (CONTRACT, vec!["2", "0312345679#"], ADDITIONAL, AuthUnit::Number),
        // R-F1 (same site and login), R-A2: a number with the fax service only gets a
        // credential of its own too (it was INVALID: only the line unit let it log in).
        (CONTRACT, vec!["2", "0312345670#"], FAX_ONLY, AuthUnit::Number),
        (CONTRACT, vec!["3", "0312345670#"], FAX_ONLY, AuthUnit::AdminUser),
        (CONTRACT, vec!["3", "0312345678#"], CONTRACT, AuthUnit::AdminUser),
        (ADDITIONAL, vec!["3"], ADDITIONAL, AuthUnit::AdminUser),
    ];
    for (caller, unit_keys, target, unit) in cases {
        let f = fixture();
        let keys: Vec<&str> = unit_keys.into_iter().chain([PASSWORD, PASSWORD]).collect();
        let step = dial(&f, caller, &keys);
        assert_eq!(id(&step), Some(PromptId::Done), "{caller} {keys:?}");
        assert_eq!(
            text(&step),
            format!("{target}番の仮パスワードの設定が完了しました。ご利用ありがとうございました。")
        );
        assert_eq!((step.awaiting, step.ends), (None, true));
        let ok = f.credentials.verify(&n(target), PASSWORD, f.clock.now()).unwrap();
        assert_eq!(ok, Ok(LoginOk { kind: CredentialKind::Temporary, must_change: true }), "{caller} {keys:?}");
        assert!(!f.credentials.record(&n(target)).unwrap().unwrap().hash.contains(PASSWORD));
        assert_eq!(f.store.line(&n(CONTRACT)).unwrap().unwrap().unit, Some(unit), "{caller} {keys:?}");
    }
}

#[test]
fn r_i7_done_replaces_earlier_credential_state() {
    let f = fixture();
    f.credentials.set_password(&n(CONTRACT), "oldpass1", f.clock.now()).unwrap();
    for _ in 0..10 {
        f.credentials.verify(&n(CONTRACT), "wrong123", f.clock.now()).unwrap().unwrap_err();
    }
    assert_eq!(f.credentials.verify(&n(CONTRACT), "oldpass1", f.clock.now()).unwrap(), Err(LoginFailure::Locked));
    dial(&f, CONTRACT, &["1", PASSWORD, PASSWORD]);
    let record = f.credentials.record(&n(CONTRACT)).unwrap().unwrap();
    assert_eq!((record.kind, record.failures, record.invalidated), (CredentialKind::Temporary, 0, false));
    assert!(f.credentials.verify(&n(CONTRACT), PASSWORD, f.clock.now()).unwrap().is_ok());
}

#[test]
fn r_i8_the_temporary_password_is_valid_for_24_hours_from_done() {
    let f = fixture();
    f.clock.advance(Duration::minutes(90));
    dial(&f, CONTRACT, &["1", PASSWORD, PASSWORD]);
    let done = f.clock.now();
    f.clock.advance(Duration::hours(24) - Duration::seconds(1));
    assert!(f.credentials.verify(&n(CONTRACT), PASSWORD, f.clock.now()).unwrap().is_ok());
    f.clock.advance(Duration::seconds(1));
    assert_eq!(f.clock.now(), done + Duration::hours(24));
    assert_eq!(f.credentials.verify(&n(CONTRACT), PASSWORD, f.clock.now()).unwrap(), Err(LoginFailure::Expired));
}

/// R-I3, R-M3: a number moved to another line while its old line's caller keyed the
/// password gets no temporary password from that call; the call ends as after a wrong
/// number. It was set all the same: the old subscriber logged in on the number another
/// subscriber now holds, and could put their own addresses on its calls.
#[test]
fn r_m3_a_number_moved_during_the_call_gets_no_temporary_password_from_it() {
    let f = fixture();
    let mut call = start(&f, CONTRACT);
    call.input("2").unwrap();
    call.input(&format!("{ADDITIONAL}#")).unwrap();
    crate::testing::move_additional_to_other_line(&f);
    call.input(PASSWORD).unwrap();
    let step = call.input(PASSWORD).unwrap();
    assert_eq!((id(&step), step.ends), (Some(PromptId::Ended), true), "{step:?}");
    assert_eq!(f.credentials.record(&n(ADDITIONAL)).unwrap(), None, "nothing set on the moved number");
}
