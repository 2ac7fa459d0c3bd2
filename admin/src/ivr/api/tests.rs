use axum::body::Body;
use axum::http::Request;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::clock::Clock;
use crate::credentials::CredentialKind;
use crate::testing::{fixture, n, Fixture, ADDITIONAL, CONTRACT};

fn app(f: &Fixture) -> (ApiState, Router) {
    let state = ApiState::new(f.ivr.clone());
    (state.clone(), router(state))
}

async fn post(app: &Router, uri: &str, body: &str) -> (StatusCode, Value) {
    let request = Request::post(uri).header("content-type", "application/json").body(Body::from(body.to_owned()));
    let response = app.clone().oneshot(request.unwrap()).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}: {bytes:?}")))
}

/// A call outcome as the operator's dashboard counts it.
fn outcomes(state: &ApiState, outcome: &str) -> f64 {
    state.metrics.value(&format!("callnotify_ivr_calls_total{{outcome=\"{outcome}\"}}")).unwrap_or(0.0)
}

async fn start(app: &Router, caller: &str) -> (StatusCode, Value) {
    post(app, "/ivr/calls", &json!({ "caller": caller }).to_string()).await
}

async fn key(app: &Router, call_id: &str, digits: &str) -> (StatusCode, Value) {
    post(app, &format!("/ivr/calls/{call_id}/digits"), &json!({ "digits": digits }).to_string()).await
}

#[tokio::test]
async fn r_i1_to_r_i7_a_whole_call_over_http() {
    let f = fixture();
    let (state, app) = app(&f);
    let (status, body) = start(&app, CONTRACT).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&body["prompt"], &body["awaiting"], &body["ends"]),
        (&json!("SELECT_UNIT"), &json!("SELECT_UNIT"), &json!(false))
    );
    assert!(body["text"].as_str().unwrap().starts_with("仮パスワード設定をする単位を選択します。"));
    let call_id = body["call_id"].as_str().unwrap().to_owned();
    let (tag, secret) = call_id.split_once('-').unwrap();
    assert_eq!((tag.len(), secret.len()), (8, 32), "{call_id}: this process's tag, 128 random bits");
    assert_eq!(state.live_calls(), 1);

    let (_, body) = key(&app, &call_id, "1").await;
    assert_eq!(body["prompt"], "ENTER_PASSWORD");
    assert_eq!(body["text"], "0312345678番の仮パスワードの設定を行います。設定したい仮パスワードを入力してください。");
    let (_, body) = key(&app, &call_id, "12345678").await;
    assert_eq!(body["prompt"], "CONFIRM");
    let (status, body) = key(&app, &call_id, "12345678").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["prompt"], "DONE");
    assert_eq!(body["ends"], true);
    assert_eq!(body["awaiting"], Value::Null);

    let ok = f.credentials.verify(&n(CONTRACT), "12345678", f.clock.now()).unwrap().unwrap();
    assert_eq!(ok.kind, CredentialKind::Temporary);
    assert_eq!(state.live_calls(), 0, "an ended call is forgotten");
    assert_eq!(outcomes(&state, "done"), 1.0);
    assert_eq!(state.metrics.value("callnotify_temporary_passwords_total"), Some(1.0));
    let (status, body) = key(&app, &call_id, "1").await;
    assert_eq!((status, &body["error"]), (StatusCode::NOT_FOUND, &json!("unknown_call")));
}

#[tokio::test]
async fn r_i1_a_caller_not_on_a_line_gets_a_json_403() {
    let f = fixture();
    let (state, app) = app(&f);
    for caller in ["0399999999", "anonymous"] {
        let (status, body) = start(&app, caller).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{caller}");
        assert_eq!(body["error"], "refused");
        assert!(body["message"].as_str().unwrap().contains("R-I1"), "{body}");
    }
    assert_eq!(state.live_calls(), 0);
    assert_eq!(outcomes(&state, "refused"), 2.0);
}

#[tokio::test]
async fn r_i6_the_third_invalid_entry_ends_the_call_with_words_to_say() {
    let f = fixture();
    let (state, app) = app(&f);
    let (_, body) = start(&app, CONTRACT).await;
    let call_id = body["call_id"].as_str().unwrap();
    for _ in 0..2 {
        let (_, body) = key(&app, call_id, "9").await;
        assert_eq!((&body["prompt"], &body["awaiting"]), (&json!("INVALID"), &json!("SELECT_UNIT")));
    }
    let (status, body) = key(&app, call_id, "9").await;
    assert_eq!(status, StatusCode::OK);
    let text = "入力された番号が正しくありません。お手数ですが、もう一度おかけ直しください。";
    assert_eq!(body, json!({ "call_id": call_id, "prompt": "ENDED", "text": text, "awaiting": null, "ends": true }));
    assert_eq!(state.live_calls(), 0);
    assert_eq!((outcomes(&state, "invalid_entries"), outcomes(&state, "done")), (1.0, 0.0));
    assert_eq!(state.metrics.value("callnotify_temporary_passwords_total"), Some(0.0));
}

#[tokio::test]
async fn an_unknown_call_id_is_a_json_404() {
    let f = fixture();
    let (_, app) = app(&f);
    let (status, body) = key(&app, "0123456789abcdef0123456789abcdef", "1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "unknown_call");
}

/// On several nodes (docs/ivr.md) a call's digits go to the node that answered it: sent
/// to another (a platform spreading every request over the nodes, or the answering node
/// restarted), they are told so, not that the call ended. The answering node goes on.
#[tokio::test]
async fn digits_of_a_call_answered_by_another_node_are_told_where_it_lives() {
    let f = fixture();
    let ((_, a), (_, b)) = (app(&f), app(&f));
    let (_, body) = start(&a, CONTRACT).await;
    let call_id = body["call_id"].as_str().unwrap().to_owned();
    let (status, body) = key(&b, &call_id, "1").await;
    assert_eq!((status, &body["error"]), (StatusCode::MISDIRECTED_REQUEST, &json!("other_node")));
    assert!(body["message"].as_str().unwrap().contains("the node that answered it"), "{body}");
    let (status, body) = key(&a, &call_id, "1").await;
    assert_eq!((status, &body["prompt"]), (StatusCode::OK, &json!("ENTER_PASSWORD")));
}

#[tokio::test]
async fn an_idle_call_is_forgotten() {
    let f = fixture();
    let (state, app) = app(&f);
    let (_, body) = start(&app, CONTRACT).await;
    let idle = body["call_id"].as_str().unwrap().to_owned();
    f.clock.advance(IDLE_TIMEOUT - Duration::seconds(1));
    assert_eq!(key(&app, &idle, "1").await.0, StatusCode::OK, "a request keeps the call alive");
    f.clock.advance(IDLE_TIMEOUT);
    assert_eq!(key(&app, &idle, "12345678").await.0, StatusCode::NOT_FOUND);

    let (_, body) = start(&app, CONTRACT).await;
    assert_ne!(body["call_id"].as_str().unwrap(), idle, "call ids are random");
    f.clock.advance(IDLE_TIMEOUT);
    start(&app, CONTRACT).await;
    assert_eq!(state.live_calls(), 1, "a new call sweeps abandoned ones");
    assert_eq!(outcomes(&state, "abandoned"), 2.0, "the one found idle and the one swept");
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let f = fixture();
    let (_, app) = app(&f);
    let (status, body) = post(&app, "/ivr/calls", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "bad_request");
    let (status, body) = post(&app, "/ivr/calls", r#"{"number":"0312345678"}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"], "bad_request");
}

/// One number has at most MAX_CALLS_PER_CALLER calls open at once: more are refused with
/// 429 (there was no cap: requests with one caller id could fill the call map); once one
/// ends, a new one starts; another number is not affected.
#[tokio::test]
async fn a_number_has_at_most_three_calls_open_at_once() {
    let f = fixture();
    let (state, app) = app(&f);
    let mut ids = Vec::new();
    for _ in 0..super::MAX_CALLS_PER_CALLER {
        let (status, body) = start(&app, CONTRACT).await;
        assert_eq!(status, StatusCode::OK);
        ids.push(body["call_id"].as_str().unwrap().to_owned());
    }
    let (status, body) = start(&app, CONTRACT).await;
    assert_eq!((status, &body["error"]), (StatusCode::TOO_MANY_REQUESTS, &json!("busy")));
    assert_eq!(start(&app, ADDITIONAL).await.0, StatusCode::OK, "another number of the line");
    for _ in 0..3 {
        key(&app, &ids[0], "9").await;
    }
    assert_eq!(start(&app, CONTRACT).await.0, StatusCode::OK, "one ended: room for a new one");
    assert_eq!(state.live_calls(), 4);
    assert_eq!(outcomes(&state, "busy"), 1.0);
}

/// The cap holds for calls started at the same moment on a multi-thread runtime: a
/// platform retrying a caller's call many times at once got them all open (each request
/// counted the open calls, then inserted its own, and two counting together both saw
/// room).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_started_at_once_from_one_number_keep_to_the_cap() {
    const AT_ONCE: usize = 64;
    let f = fixture();
    let (state, app) = app(&f);
    for round in 0..200 {
        let starts: Vec<_> = (0..AT_ONCE)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move { start(&app, CONTRACT).await.0 })
            })
            .collect();
        let mut opened = 0;
        for started in starts {
            if started.await.unwrap() == StatusCode::OK {
                opened += 1;
            }
        }
        assert_eq!(opened, super::MAX_CALLS_PER_CALLER, "round {round}");
        assert_eq!(state.live_calls(), super::MAX_CALLS_PER_CALLER, "round {round}");
        state.calls.clear();
    }
}

/// R-I7's hash is one of the process's argon2 computations: the entry that completes a
/// call waits for a permit of `HASHING_AT_ONCE`, as a login on the site does. It hashed
/// outside the cap, so calls completing at once added 19 MiB each on the blocking pool
/// beside the site's capped logins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_i7_the_hash_of_a_completed_call_waits_for_a_hashing_permit() {
    let f = fixture();
    let mut credentials = f.credentials.clone();
    credentials.hashing = Arc::new(tokio::sync::Semaphore::new(1));
    let (state, app) = {
        let state = ApiState::new(crate::ivr::Ivr::new(f.store.clone(), credentials.clone(), f.clock.clone()));
        (state.clone(), router(state))
    };
    let (_, body) = start(&app, CONTRACT).await;
    let call_id = body["call_id"].as_str().unwrap().to_owned();
    key(&app, &call_id, "1").await;
    key(&app, &call_id, "12345678").await;

    let held = Arc::clone(&credentials.hashing).acquire_owned().await.unwrap();
    let confirm = tokio::spawn({
        let (app, call_id) = (app.clone(), call_id.clone());
        async move { key(&app, &call_id, "12345678").await }
    });
    // Longer than one hash takes in a test build (well under a second): no clock to move
    // here, and without the permit the call would be done by then.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(!confirm.is_finished(), "the call hashed its password without a permit");
    assert!(f.credentials.record(&n(CONTRACT)).unwrap().is_none(), "nothing set while it waits");
    drop(held);
    let (status, body) = confirm.await.unwrap();
    assert_eq!((status, &body["prompt"]), (StatusCode::OK, &json!("DONE")));
    assert_eq!(outcomes(&state, "done"), 1.0);
}

/// Digits sent while the call's previous entry is still handled (a platform retrying
/// early) are refused with 409, not queued behind it holding one of the process's
/// argon2 permits, which the site's logins wait for.
#[tokio::test]
async fn digits_sent_while_the_previous_entry_is_handled_are_refused_with_409() {
    let f = fixture();
    let (state, app) = app(&f);
    let (_, body) = start(&app, CONTRACT).await;
    let call_id = body["call_id"].as_str().unwrap().to_owned();
    let live = state.calls.get(&call_id).map(|entry| Arc::clone(entry.value())).unwrap();
    // Another thread handles an entry of the call meanwhile.
    let (locked, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
    let handling = std::thread::spawn(move || {
        let _entry = live.call.lock().unwrap();
        locked.0.send(()).unwrap();
        release.1.recv().unwrap();
    });
    locked.1.recv().unwrap();
    let (status, body) = key(&app, &call_id, "1").await;
    assert_eq!((status, &body["error"]), (StatusCode::CONFLICT, &json!("entry_under_way")));
    release.0.send(()).unwrap();
    handling.join().unwrap();
    let (status, body) = key(&app, &call_id, "1").await;
    assert_eq!((status, &body["prompt"]), (StatusCode::OK, &json!("ENTER_PASSWORD")));
}

/// R-M3 over the API: a call whose number to set moved to another line while the caller
/// keyed ends with ENDED, sets nothing, and is counted as `number_left` (it was counted
/// as ending after invalid entries, which the caller never made).
#[tokio::test]
async fn r_m3_a_call_whose_number_left_the_line_ends_and_is_counted_as_such() {
    let f = fixture();
    let (state, app) = app(&f);
    let (_, body) = start(&app, CONTRACT).await;
    let call_id = body["call_id"].as_str().unwrap().to_owned();
    key(&app, &call_id, "2").await;
    key(&app, &call_id, &format!("{ADDITIONAL}#")).await;
    key(&app, &call_id, "12345678").await;
    crate::testing::move_additional_to_other_line(&f);
    let (status, body) = key(&app, &call_id, "12345678").await;
    assert_eq!((status, &body["prompt"], &body["ends"]), (StatusCode::OK, &json!("ENDED"), &json!(true)));
    assert_eq!(f.credentials.record(&n(ADDITIONAL)).unwrap(), None);
    assert_eq!((outcomes(&state, "number_left"), outcomes(&state, "invalid_entries")), (1.0, 0.0));
}

/// A request is a caller id or a few digits: a body past [`BODY_LIMIT`] is refused
/// before it is read whole (it was read up to axum's 2 MiB, and a connection sending one
/// slowly held that much for minutes).
#[tokio::test]
async fn a_body_past_the_limit_is_refused_before_it_is_read() {
    let f = fixture();
    let (_, app) = app(&f);
    let padded = json!({ "caller": CONTRACT, "pad": "x".repeat(BODY_LIMIT) }).to_string();
    let (status, body) = post(&app, "/ivr/calls", &padded).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"], "bad_request");
    let (status, _) = start(&app, CONTRACT).await;
    assert_eq!(status, StatusCode::OK, "a request of its size is answered");
}

/// R-I1: the API trusts the caller ID it is sent, so anyone reaching it could set a
/// temporary password for any number and log in as its subscriber. Only loopback and
/// `admin.ivr_addresses` are answered.
#[tokio::test]
async fn r_i1_only_the_ivr_platform_is_answered() {
    let f = fixture();
    let state = ApiState::new(f.ivr.clone()).with_platforms(&["10.0.7.0/24".parse().unwrap()]);
    let app = router(state.clone());
    let from = |peer: &str| {
        let peer = crate::site::Peer { addr: peer.parse().unwrap(), answering: Default::default() };
        let body = json!({ "caller": CONTRACT }).to_string();
        let request = Request::post("/ivr/calls")
            .header("content-type", "application/json")
            .extension(axum::extract::ConnectInfo(peer))
            .body(Body::from(body));
        let app = app.clone();
        async move { app.oneshot(request.unwrap()).await.unwrap().status() }
    };
    assert_eq!(from("203.0.113.5:40000").await, StatusCode::FORBIDDEN);
    assert_eq!(from("10.0.8.1:40000").await, StatusCode::FORBIDDEN);
    assert_eq!(state.live_calls(), 0, "no call started for a stranger");
    assert_eq!(from("10.0.7.9:40000").await, StatusCode::OK);
    assert_eq!(from("[::ffff:10.0.7.10]:40000").await, StatusCode::OK, "as a dual-stack listener sees it");
    assert_eq!(from("127.0.0.1:40000").await, StatusCode::OK, "a platform on this host");
    assert_eq!(state.live_calls(), 3);
}
