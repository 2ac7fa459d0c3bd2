use super::*;
use chrono::Duration;

fn n(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).unwrap()
}

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_764_000_000, 0).unwrap()
}

fn credentials() -> Credentials {
    Credentials::open(&Store::temporary().unwrap()).unwrap()
}

const NUMBER: &str = "0312345678";
const TEMPORARY: &str = "12345678";
const PASSWORD: &str = "abc12345";

fn login(c: &Credentials, password: &str, at: DateTime<Utc>) -> Verdict {
    c.verify(&n(NUMBER), password, at).unwrap()
}

#[test]
fn r_i8_r_s2_a_temporary_password_is_valid_for_24_hours() {
    let c = credentials();
    c.set_temporary(&n(NUMBER), TEMPORARY, t0()).unwrap();
    let just_before = t0() + TEMPORARY_VALIDITY - Duration::seconds(1);
    assert_eq!(login(&c, TEMPORARY, just_before), Ok(LoginOk { kind: CredentialKind::Temporary, must_change: true }));
    assert_eq!(login(&c, TEMPORARY, t0() + TEMPORARY_VALIDITY), Err(LoginFailure::Expired));
}

#[test]
fn r_s4_a_temporary_password_must_be_changed_at_once() {
    let c = credentials();
    c.set_temporary(&n(NUMBER), TEMPORARY, t0()).unwrap();
    assert!(login(&c, TEMPORARY, t0()).unwrap().must_change);
}

/// The answer to the `i`-th (from 0) of consecutive wrong entries where `limit` of them
/// invalidate the credential: the last one says so (the site then tells its subscriber).
fn wrong_or_invalidating(i: u32, limit: u32) -> LoginFailure {
    if i + 1 == limit {
        LoginFailure::Invalidated
    } else {
        LoginFailure::Wrong
    }
}

#[test]
fn r_s2_three_consecutive_wrong_entries_invalidate_a_temporary_password() {
    let c = credentials();
    c.set_temporary(&n(NUMBER), TEMPORARY, t0()).unwrap();
    for i in 0..3 {
        assert_eq!(login(&c, "87654321", t0()), Err(wrong_or_invalidating(i, 3)));
    }
    assert_eq!(login(&c, TEMPORARY, t0()), Err(LoginFailure::Locked), "the right password no longer works");
    assert!(c.record(&n(NUMBER)).unwrap().unwrap().invalidated);
}

#[test]
fn r_s2_a_right_entry_resets_the_count_of_consecutive_wrong_ones() {
    let c = credentials();
    c.set_temporary(&n(NUMBER), TEMPORARY, t0()).unwrap();
    for _ in 0..2 {
        assert_eq!(login(&c, "87654321", t0()), Err(LoginFailure::Wrong));
    }
    assert!(login(&c, TEMPORARY, t0()).is_ok());
    assert_eq!(c.record(&n(NUMBER)).unwrap().unwrap().failures, 0);
    for _ in 0..2 {
        assert_eq!(login(&c, "87654321", t0()), Err(LoginFailure::Wrong));
    }
    assert!(login(&c, TEMPORARY, t0()).is_ok(), "2 + 2 wrong entries are not 3 consecutive ones");
}

#[test]
fn r_s2_concurrent_wrong_entries_each_count() {
    let c = credentials();
    c.set_temporary(&n(NUMBER), TEMPORARY, t0()).unwrap();
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || c.verify(&n(NUMBER), "87654321", t0()).unwrap())
        })
        .collect();
    let mut answers: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    answers.sort_by_key(|a| format!("{a:?}"));
    assert_eq!(answers, [Err(LoginFailure::Invalidated), Err(LoginFailure::Wrong), Err(LoginFailure::Wrong)]);
    assert_eq!(login(&c, TEMPORARY, t0()), Err(LoginFailure::Locked));
}

#[test]
fn r_s3_ten_consecutive_wrong_entries_invalidate_a_password() {
    let c = credentials();
    c.set_password(&n(NUMBER), PASSWORD, t0()).unwrap();
    for _ in 0..9 {
        assert_eq!(login(&c, "wrong123", t0()), Err(LoginFailure::Wrong));
    }
    assert_eq!(login(&c, PASSWORD, t0()), Ok(LoginOk { kind: CredentialKind::Password, must_change: false }));
    for i in 0..10 {
        assert_eq!(login(&c, "wrong123", t0()), Err(wrong_or_invalidating(i, 10)));
    }
    assert_eq!(login(&c, PASSWORD, t0()), Err(LoginFailure::Locked));
}

#[test]
fn r_s6_a_password_expires_60_days_after_it_was_set_but_still_logs_in_to_be_changed() {
    let c = credentials();
    c.set_password(&n(NUMBER), PASSWORD, t0()).unwrap();
    let just_before = t0() + PASSWORD_LIFETIME - Duration::seconds(1);
    assert_eq!(login(&c, PASSWORD, just_before), Ok(LoginOk { kind: CredentialKind::Password, must_change: false }));
    let expired = t0() + PASSWORD_LIFETIME;
    assert_eq!(login(&c, PASSWORD, expired), Ok(LoginOk { kind: CredentialKind::Password, must_change: true }));
    assert_eq!(login(&c, "wrong123", expired), Err(LoginFailure::Wrong), "an expired password is still checked");
    // A new password starts a new period.
    c.set_password(&n(NUMBER), "new12345", expired).unwrap();
    assert_eq!(login(&c, "new12345", expired), Ok(LoginOk { kind: CredentialKind::Password, must_change: false }));
}

#[test]
fn r_i7_a_temporary_password_replaces_any_earlier_state() {
    let c = credentials();
    c.set_temporary(&n(NUMBER), TEMPORARY, t0()).unwrap();
    for _ in 0..3 {
        login(&c, "87654321", t0()).unwrap_err();
    }
    let later = t0() + Duration::days(3);
    c.set_temporary(&n(NUMBER), "11112222", later).unwrap();
    assert_eq!(login(&c, "11112222", later), Ok(LoginOk { kind: CredentialKind::Temporary, must_change: true }));
    assert_eq!(login(&c, TEMPORARY, later), Err(LoginFailure::Wrong), "the old one is gone");
}

#[test]
fn a_number_without_credential_is_unknown() {
    let c = credentials();
    assert_eq!(login(&c, PASSWORD, t0()), Err(LoginFailure::Unknown));
}

#[test]
fn the_stored_hash_is_argon2id_with_owasp_parameters_and_no_password() {
    let c = credentials();
    c.set_temporary(&n(NUMBER), TEMPORARY, t0()).unwrap();
    let record = c.record(&n(NUMBER)).unwrap().unwrap();
    let parsed = PasswordHash::new(&record.hash).unwrap();
    assert_eq!(parsed.algorithm.as_str(), "argon2id");
    let params = Params::try_from(&parsed).unwrap();
    assert!(params.m_cost() >= 19_456, "m = {} KiB", params.m_cost());
    assert!(params.t_cost() >= 2, "t = {}", params.t_cost());
    assert_eq!(params.p_cost(), 1);
    let raw = serde_json::to_string(&record).unwrap();
    assert!(!raw.contains(TEMPORARY));
    assert!(!format!("{record:?}").contains(&record.hash), "Debug leaves the hash out");
}

#[tokio::test]
async fn the_async_wrappers_run_the_same_rules() {
    let c = credentials();
    c.set_password_async(n(NUMBER), PASSWORD.into(), t0()).await.unwrap();
    let ok = c.verify_async(n(NUMBER), PASSWORD.into(), t0()).await.unwrap();
    assert_eq!(ok, Ok(LoginOk { kind: CredentialKind::Password, must_change: false }));
    c.set_temporary_async(n(NUMBER), TEMPORARY.into(), t0()).await.unwrap();
    let ok = c.verify_async(n(NUMBER), TEMPORARY.into(), t0()).await.unwrap();
    assert_eq!(ok, Ok(LoginOk { kind: CredentialKind::Temporary, must_change: true }));
}

#[test]
fn r_o3_remove_deletes_the_credential_so_the_number_no_longer_logs_in() {
    let c = credentials();
    c.set_password(&n(NUMBER), PASSWORD, t0()).unwrap();
    c.set_temporary(&n("0312345679"), TEMPORARY, t0()).unwrap();
    assert!(c.remove(&n(NUMBER)).unwrap());
    assert_eq!(c.record(&n(NUMBER)).unwrap(), None);
    assert_eq!(login(&c, PASSWORD, t0()), Err(LoginFailure::Unknown));
    assert!(!c.remove(&n(NUMBER)).unwrap(), "nothing left to remove");
    assert!(c.record(&n("0312345679")).unwrap().is_some(), "other numbers keep theirs");
    // A new temporary password by phone makes it usable again (R-I7).
    c.set_temporary(&n(NUMBER), TEMPORARY, t0()).unwrap();
    assert!(login(&c, TEMPORARY, t0()).is_ok());
}

/// This node's view of the shared state, behind an owner whose store already has a
/// write made through another node a moment ago (docs/cluster.md, "A write"). Ops go to
/// the owner; its answer arrives once this view shows the values the op wrote, as the
/// reply record that follows them in the state topic does.
struct Behind {
    owner: Store,
    view: Store,
    position: std::sync::atomic::AtomicI64,
}

impl engine::store::state::StateWriter for Behind {
    fn send(self: std::sync::Arc<Self>, ops: Vec<engine::store::state::Op>) -> engine::store::state::Answers {
        let answers = ops
            .into_iter()
            .map(|op| {
                let keys: Vec<_> = self.owner.values_before(&op)?.into_iter().map(|(key, _)| key).collect();
                let reply = self.owner.submit(op)?;
                let values = keys
                    .into_iter()
                    .map(|key| Ok((key.clone(), self.owner.state_value(&key)?.map(|v| v.to_vec()))))
                    .collect::<Result<Vec<_>, engine::store::StoreError>>()?;
                let position = self.position.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.view.apply_state(&values, position, None, &[])?;
                Ok(reply)
            })
            .collect();
        Box::new(move || answers)
    }
}

/// Credentials on a node whose view lags the owner, and the owner's own credentials
/// (another node's writes, not yet applied here).
fn behind() -> (Credentials, Credentials) {
    let owner = Store::temporary().unwrap();
    let view = Store::temporary().unwrap();
    let writer = Behind { owner: owner.clone(), view: view.clone(), position: 1.into() };
    view.attach_writer(std::sync::Arc::new(writer));
    (Credentials::open(&view).unwrap(), Credentials::open(&owner).unwrap())
}

/// R-I7, R-S1 across nodes: a temporary password set by phone through node A logs in on
/// node B at once, before B has applied it. B refused it as an unknown number: once, in
/// CI, a login on another node right after the password was set.
#[test]
fn r_i7_a_password_set_through_another_node_logs_in_before_this_node_applied_it() {
    let (here, elsewhere) = behind();
    elsewhere.set_temporary(&n(NUMBER), TEMPORARY, t0()).unwrap();
    assert!(here.record(&n(NUMBER)).unwrap().is_none(), "this node has not applied it yet");
    assert_eq!(login(&here, TEMPORARY, t0()), Ok(LoginOk { kind: CredentialKind::Temporary, must_change: true }));
}

/// R-S2, R-I7 across nodes: a temporary password locked by three wrong entries is set
/// again by phone through another node; the new one logs in at once here, where the
/// view still shows the locked one. Still refused: a number nobody set a password for
/// (and no attempt counted anywhere).
#[test]
fn r_s2_a_temporary_password_set_again_elsewhere_replaces_the_locked_one_this_node_shows() {
    let (here, elsewhere) = behind();
    here.set_temporary(&n(NUMBER), TEMPORARY, t0()).unwrap();
    for i in 0..3 {
        assert_eq!(login(&here, "87654321", t0()), Err(wrong_or_invalidating(i, 3)));
    }
    elsewhere.set_temporary(&n(NUMBER), "24681357", t0()).unwrap();
    assert!(here.record(&n(NUMBER)).unwrap().unwrap().invalidated, "this node still shows the locked one");
    assert_eq!(login(&here, "24681357", t0()), Ok(LoginOk { kind: CredentialKind::Temporary, must_change: true }));

    assert_eq!(here.verify(&n("0398765432"), TEMPORARY, t0()).unwrap(), Err(LoginFailure::Unknown));
    assert!(elsewhere.record(&n("0398765432")).unwrap().is_none());
}

/// R-S2 across nodes, the other way: this node shows the temporary password locked,
/// while the owner's store has it usable again with the same hash (an export taken
/// before the lock, imported again: `provision import` restores credentials as they
/// were). The right password logs in and counts nothing wrong; it was sent unchecked,
/// as wrong, and counted against the restored credential.
#[test]
fn r_s2_a_credential_restored_elsewhere_is_checked_against_its_password_not_counted_wrong() {
    let (here, elsewhere) = behind();
    let line = format!(r#"{{"contract":"{NUMBER}","numbers":[{{"number":"{NUMBER}","services":["call"]}}]}}"#);
    engine::provision::import(&here.store, line.as_bytes()).unwrap();
    here.set_temporary(&n(NUMBER), TEMPORARY, t0()).unwrap();
    let before_the_lock = here.record(&n(NUMBER)).unwrap().unwrap();
    for i in 0..3 {
        assert_eq!(login(&here, "87654321", t0()), Err(wrong_or_invalidating(i, 3)));
    }
    elsewhere.store.restore_credential(&n(NUMBER), &before_the_lock).unwrap();
    assert!(here.record(&n(NUMBER)).unwrap().unwrap().invalidated, "this node still shows it locked");
    assert_eq!(login(&here, TEMPORARY, t0()), Ok(LoginOk { kind: CredentialKind::Temporary, must_change: true }));
    assert_eq!(elsewhere.record(&n(NUMBER)).unwrap().unwrap().failures, 0);
}

/// No more than [`HASHING_AT_ONCE`] argon2 computations of the async calls run at once,
/// however many are asked for (logins whose clients hung up go on; each holds 19 MiB):
/// the others wait their turn, and every one runs. A permit goes back once its
/// computation is over, before the rest of its call (the state owner's answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argon2_computations_run_at_most_hashing_at_once_at_a_time() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let c = credentials();
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let held_after = Arc::new(AtomicBool::new(false));
    let calls = (0..3 * HASHING_AT_ONCE).map(|_| {
        let (running, most, held_after) = (running.clone(), most.clone(), held_after.clone());
        c.blocking(move |_| {
            hashing(|| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Long enough for the others to pile up on the cap.
                std::thread::sleep(std::time::Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
            });
            // The rest of the call runs without its permit.
            if PERMIT.with_borrow(Option::is_some) {
                held_after.store(true, Ordering::SeqCst);
            }
            Ok(())
        })
    });
    let done = futures_util::future::join_all(calls).await;
    assert!(done.iter().all(Result::is_ok));
    let most = most.load(Ordering::SeqCst);
    assert!(most <= HASHING_AT_ONCE, "{most} at once");
    assert!(!held_after.load(Ordering::SeqCst), "a permit held past its computation");
}

/// A call that panics on its blocking thread gives its argon2 permit back: it stayed
/// with the pooled thread until that thread's next call, and a few panics held every
/// permit, every login waiting.
#[tokio::test]
async fn a_call_that_panics_gives_its_hashing_permit_back() {
    let mut c = credentials();
    c.hashing = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
    let panicked = c.spawn_hashing(|| panic!("an entry that panics")).await;
    assert!(panicked.is_err());
    assert_eq!(c.hashing.available_permits(), 1);
}

/// A state owner that answers every login attempt "changed" (the credential it holds is
/// not the one this view shows), as it does for a view that never comes to show it.
struct NeverShown;

impl engine::store::state::StateWriter for NeverShown {
    fn send(self: std::sync::Arc<Self>, ops: Vec<engine::store::state::Op>) -> engine::store::state::Answers {
        let answers = ops.iter().map(|_| Ok(engine::store::state::Reply::Attempt(Attempt::Changed))).collect();
        Box::new(move || answers)
    }
}

/// R-S2, R-S3: a view that never shows the owner's credential (a store restored from a
/// copy taken mid-carry-over, say) had a login ask the owner again and again, without
/// end: the site's request hung and the state topic filled with requests. It now gives
/// up after a few answers, with an error that says why.
#[test]
fn r_s2_a_login_the_owner_keeps_answering_changed_ends_with_an_error() {
    let store = Store::temporary().unwrap();
    let c = Credentials::open(&store).unwrap();
    c.set_temporary(&n(NUMBER), TEMPORARY, t0()).unwrap();
    store.attach_writer(std::sync::Arc::new(NeverShown));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(c.verify(&n(NUMBER), TEMPORARY, t0()).map(|_| ()).map_err(|e| e.to_string())));
    let ended = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the login ends");
    let error = ended.unwrap_err();
    assert!(error.contains("state owner"), "{error}");
}
