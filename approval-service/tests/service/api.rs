#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! HTTP behaviour of the approval service, through `app(state)` in-process
//! and through `run` on a real socket.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{
    assert_error, bearer, call, decide, get_as, send, spawn_wait, wait, Fixture, ALICE, BOB,
    FILTER_HEADER,
};
use axum::http::StatusCode;
use axum::Router;
use countersign_approval::{app, AppState};
use serde_json::{json, Value};

/// alice (group `security`) and bob.
const REVIEWERS: [(&str, &str, &str); 2] = [
    ("alice", ALICE, "groups = [\"security\"]"),
    ("bob", BOB, ""),
];

fn open_state(db: &Path, extra: &str) -> AppState {
    common::open_state(&common::config_toml(db, extra, &REVIEWERS))
}

fn fixture(extra: &str) -> Fixture {
    common::fixture("sub/dir/test.db", |db| {
        common::config_toml(db, extra, &REVIEWERS)
    })
}

/// A review of a four-message conversation.
fn create_body(hold_timeout_ms: u64) -> Value {
    common::review_request(json!({
        "authority": "llm.internal",
        "route": "chat",
        "stream": true,
        "rule": "all",
        "prompt": [
            {"role": "system", "text": "be nice"},
            {"role": "user", "text": "first question"},
            {"role": "assistant", "text": "answer"},
            {"role": "user", "text": "x".repeat(300)}
        ],
        "hold_timeout_ms": hold_timeout_ms
    }))
}

async fn create(app: &Router, hold_timeout_ms: u64) -> String {
    common::create_review(app, &[], create_body(hold_timeout_ms)).await
}

/// The filter ends a review: `POST /v1/reviews/{id}/{action}` (`expire`,
/// `cancel`).
async fn end_review(app: &Router, id: &str, action: &str) -> (StatusCode, Value) {
    call(
        app,
        "POST",
        &format!("/v1/reviews/{id}/{action}"),
        &[],
        None,
    )
    .await
}

#[tokio::test]
async fn health_and_ready() {
    let f = fixture("");
    let (s, v) = call(&f.app, "GET", "/healthz", &[], None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"status": "ok"})));
    let (s, _) = call(&f.app, "GET", "/readyz", &[], None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = call(&f.app, "GET", "/nope", &[], None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");
}

#[tokio::test]
async fn create_validates_and_clamps() {
    let f = fixture("");
    let before = countersign_approval::now_ms();
    let (s, v) = call(
        &f.app,
        "POST",
        "/v1/reviews",
        &[],
        Some(create_body(10_000_000_000)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let exp = v["expires_at_ms"].as_u64().unwrap();
    assert!(exp >= before + 86_400_000 && exp <= countersign_approval::now_ms() + 86_400_000);

    let mut bad_body = create_body(1000);
    bad_body["body"] = json!("not json {");
    for bad in [bad_body, json!({"model": "x"})] {
        let (s, v) = call(&f.app, "POST", "/v1/reviews", &[], Some(bad)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_error(&v, "bad_request");
    }
}

#[tokio::test]
async fn a_retried_creation_with_the_same_key_returns_the_same_review() {
    let f = fixture("");
    let body = common::merged(
        create_body(60_000),
        json!({"idempotency_key": "req-1:00ab:review"}),
    );
    let (status, first) =
        common::call(&f.app, "POST", "/v1/reviews", &[], Some(body.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (status, again) = common::call(&f.app, "POST", "/v1/reviews", &[], Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["status"], "pending");
    // Decided meanwhile: the retry answers with the decision.
    let id = first["id"].as_str().unwrap();
    common::decide_ok(&f.app, id, ALICE, "approve", json!({})).await;
    let body = common::merged(
        create_body(60_000),
        json!({"idempotency_key": "req-1:00ab:review"}),
    );
    let (_, again) = common::call(&f.app, "POST", "/v1/reviews", &[], Some(body)).await;
    assert_eq!(
        (again["id"].as_str(), again["status"].as_str()),
        (Some(id), Some("approved"))
    );
    // The same key on another request (another body, request id or
    // caller) never attaches it to this (approved) review.
    for other in [
        json!({"idempotency_key": "req-1:00ab:review", "body": "{\"model\":\"evil\",\"messages\":[]}"}),
        json!({"idempotency_key": "req-1:00ab:review", "request_id": "req-2"}),
        json!({"idempotency_key": "req-1:00ab:review", "caller": "svc-b"}),
    ] {
        let body = common::merged(create_body(60_000), other.clone());
        let (status, v) = common::call(&f.app, "POST", "/v1/reviews", &[], Some(body)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{other}: {v}");
        assert!(v.get("id").is_none(), "{v}");
    }
    // Another key, or none, is another review.
    let other = common::merged(
        create_body(60_000),
        json!({"idempotency_key": "req-1:00ac:review"}),
    );
    let (status, v) = common::call(&f.app, "POST", "/v1/reviews", &[], Some(other)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(v["id"], first["id"]);
    create(&f.app, 60_000).await;
    create(&f.app, 60_000).await;
    let (_, list) = common::get_as(&f.app, ALICE, "/api/reviews").await;
    assert_eq!(list["reviews"].as_array().unwrap().len(), 4, "{list}");
}

#[tokio::test]
async fn wait_returns_pending_after_timeout() {
    let f = fixture("");
    let id = create(&f.app, 60_000).await;
    let t = Instant::now();
    let (s, v) = wait(&f.app, &id, Some(200)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "pending");
    assert!(
        t.elapsed() >= Duration::from_millis(190),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(f.state.waiting_reviews(), 0);

    let (s, v) = wait(&f.app, "rev_nope", Some(10)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");
}

#[tokio::test]
async fn wait_is_capped_by_max_long_poll() {
    let f = fixture("max_long_poll_ms = 150");
    let id = create(&f.app, 60_000).await;
    let t = Instant::now();
    let (_, v) = wait(&f.app, &id, Some(20000)).await;
    assert_eq!(v["status"], "pending");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn wait_is_woken_by_approve() {
    let f = fixture("");
    let id = create(&f.app, 60_000).await;
    let t = Instant::now();
    let waiter = spawn_wait(&f.app, &id, 10000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.state.waiting_reviews(), 1);
    let (s, d) = decide(&f.app, &id, ALICE, "approve", json!({"reason": "fine"})).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    assert_eq!(d["status"], "approved");
    assert_eq!(d["reviewer"], "alice");
    let (s, v) = waiter.await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "approved");
    assert_eq!(v["reviewer"], "alice");
    assert_eq!(v["reason"], "fine");
    assert_eq!(v["edited_body"], Value::Null);
    assert_eq!(f.state.waiting_reviews(), 0);

    // A decided review answers a wait at once.
    let t = Instant::now();
    let (_, v) = wait(&f.app, &id, Some(10000)).await;
    assert_eq!(v["status"], "approved");
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// A decision made here wakes its long polls with the state it committed:
/// they answer with it instead of each reading the review again (after a
/// bulk approval those reads queued behind the decisions). Shown with a
/// state the database does not have: the poll answers with it.
#[tokio::test]
async fn a_decision_wakes_its_polls_with_the_committed_state() {
    let f = fixture("");
    let id = create(&f.app, 60_000).await;
    let waiter = spawn_wait(&f.app, &id, 10000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.state.waiting_reviews(), 1);
    f.state.wake_final(countersign_core::wire::ReviewState {
        id: id.clone(),
        status: countersign_core::wire::ReviewStatus::Approved,
        expires_at_ms: 1,
        reviewer: Some("pushed".into()),
        reason: None,
        edited_body: Some("{}".into()),
    });
    let (s, v) = waiter.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "approved");
    assert_eq!(v["reviewer"], "pushed");
    assert_eq!(v["edited_body"], "{}");

    // A plain wake (another replica's change, an expiry) has the poll read
    // the review: still pending here.
    let waiter = spawn_wait(&f.app, &id, 300);
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.state.wake(&id);
    let (_, v) = waiter.await.unwrap();
    assert_eq!(v["status"], "pending");
}

#[tokio::test]
async fn many_waiters_all_woken_only_for_their_review() {
    let f = fixture("");
    let a = create(&f.app, 60_000).await;
    let b = create(&f.app, 60_000).await;
    let mut waiters = Vec::new();
    for id in [&a, &a, &a, &b] {
        let (app, id) = (f.app.clone(), id.clone());
        waiters.push(tokio::spawn(async move {
            let t = Instant::now();
            let (_, v) = wait(&app, &id, Some(1500)).await;
            (v["status"].as_str().unwrap().to_string(), t.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.state.waiting_reviews(), 2);
    let (s, _) = decide(&f.app, &a, BOB, "reject", json!({"reason": "no"})).await;
    assert_eq!(s, StatusCode::OK);
    let mut results = Vec::new();
    for w in waiters {
        results.push(w.await.unwrap());
    }
    for (status, elapsed) in &results[..3] {
        assert_eq!(status, "rejected");
        assert!(*elapsed < Duration::from_millis(1000), "{elapsed:?}");
    }
    assert_eq!(results[3].0, "pending");
    assert!(results[3].1 >= Duration::from_millis(1400));
    assert_eq!(f.state.waiting_reviews(), 0);
}

#[tokio::test]
async fn pending_review_expires_during_wait() {
    let f = fixture("");
    let id = create(&f.app, 300).await;
    let t = Instant::now();
    let (_, v) = wait(&f.app, &id, Some(10000)).await;
    assert_eq!(v["status"], "expired");
    assert_eq!(v["reason"], "hold timeout");
    assert_eq!(v["reviewer"], Value::Null);
    assert!(t.elapsed() < Duration::from_secs(5));
    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("expired"),
        "{v}"
    );
}

#[tokio::test]
async fn sweeper_expires_overdue_reviews() {
    let f = fixture("");
    let id = create(&f.app, 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(f.state.sweep_once().await.unwrap(), 1);
    let (_, v) = wait(&f.app, &id, None).await;
    assert_eq!(v["status"], "expired");
}

#[tokio::test]
async fn reject_needs_reason() {
    let f = fixture("");
    let id = create(&f.app, 60_000).await;
    // No reason, a blank one, one too long.
    for body in [
        json!({}),
        json!({"reason": ""}),
        json!({"reason": "   "}),
        json!({"reason": "x".repeat(2001)}),
    ] {
        let (s, v) = decide(&f.app, &id, ALICE, "reject", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_error(&v, "bad_request");
    }
    let (s, v) = decide(
        &f.app,
        &id,
        ALICE,
        "reject",
        json!({"reason": "leaks secrets"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "rejected");
    assert_eq!(v["reason"], "leaks secrets");
    assert!(v["decided_at_ms"].as_u64().is_some());
    let (s, v) = decide(&f.app, &id, BOB, "approve", json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["error"]["message"], "review already rejected by alice");
    let (s, _) = decide(&f.app, "rev_unknown", BOB, "approve", json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn edit_stores_edited_body() {
    let f = fixture("");
    let id = create(&f.app, 60_000).await;
    for bad in [
        json!({"body": [1, 2]}),
        json!({"body": "not json"}),
        json!({"body": "[1]"}),
        json!({}),
    ] {
        let (s, v) = decide(&f.app, &id, ALICE, "edit", bad.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_error(&v, "bad_request");
    }
    let (s, v) = decide(
        &f.app,
        &id,
        ALICE,
        "edit",
        json!({"body": "{ \"model\": \"small\",\n \"messages\": [{\"role\":\"user\",\"content\":\"hi\"}] }", "reason": "smaller model"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "approved");
    assert_eq!(
        v["edited_body"],
        "{\"model\":\"small\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
    );
    assert_eq!(v["body"], "{\"model\":\"gpt-x\",\"messages\":[]}");
    let (_, w) = wait(&f.app, &id, None).await;
    assert_eq!(
        w["edited_body"],
        "{\"model\":\"small\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
    );
    assert_eq!(w["reason"], "smaller model");

    // An object body works too and keeps key order.
    let id = create(&f.app, 60_000).await;
    let (s, v) = decide(
        &f.app,
        &id,
        BOB,
        "edit",
        json!({"body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "a": 1}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let edited: Value = serde_json::from_str(v["edited_body"].as_str().unwrap()).unwrap();
    assert_eq!(
        edited,
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "a": 1})
    );
}

/// An edit the filter would refuse at release is refused when it is
/// submitted (400 `invalid_edit`, naming what is wrong) and changes
/// nothing: the review stays pending, without an edit or an approval, and
/// a valid edit is taken after it.
async fn refused_edit_then_valid(app: &Router, id: &str, invalid: &str, wrong: &str, valid: &str) {
    let (s, v) = decide(app, id, ALICE, "edit", json!({"body": invalid})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "invalid_edit");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(wrong), "{message}");
    assert!(message.contains("the review is still pending"), "{message}");
    let (_, detail) = get_as(app, BOB, &format!("/api/reviews/{id}")).await;
    assert_eq!(detail["status"], "pending");
    assert_eq!(detail["edited_body"], Value::Null);
    assert_eq!(detail["approvals"], json!([]));
    let (s, v) = decide(app, id, ALICE, "edit", json!({"body": valid})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "approved");
    assert_eq!(v["edited_body"], valid);
}

#[tokio::test]
async fn an_invalid_edit_of_a_prompt_is_refused_and_the_review_stays_pending() {
    let f = fixture("");
    let id = create(&f.app, 60_000).await;
    refused_edit_then_valid(
        &f.app,
        &id,
        r#"{"model":"gpt-x","messages":[{"role":"user","content":{"text":"hi"}}]}"#,
        "the reviewer's edited request is invalid: ",
        r#"{"model":"gpt-x","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
}

/// A review of a model's answer (`kind`: `tool_call` or `response`).
async fn create_answer_review(app: &Router, kind: &str, answer: String) -> String {
    let fields = json!({"kind": kind, "stream": false, "body": answer});
    common::create_review(app, &[], common::merged(create_body(60_000), fields)).await
}

#[tokio::test]
async fn an_invalid_edit_of_tool_calls_is_refused_and_the_review_stays_pending() {
    let f = fixture("");
    let answer = |arguments: &str| {
        json!({"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,
            "finish_reason":"tool_calls","message":{"role":"assistant","content":null,
            "tool_calls":[{"id":"call_1","type":"function",
                "function":{"name":"delete_file","arguments":arguments}}]}}]})
        .to_string()
    };
    let id = create_answer_review(&f.app, "tool_call", answer(r#"{"path":"/srv"}"#)).await;
    refused_edit_then_valid(
        &f.app,
        &id,
        &answer(r#"{"path": "/tmp"#),
        "the arguments of tool call 0 must be a JSON object",
        &answer(r#"{"path":"/tmp"}"#),
    )
    .await;
}

#[tokio::test]
async fn an_invalid_edit_of_an_answer_is_refused_and_the_review_stays_pending() {
    let f = fixture("");
    let answer = |reason: &str, text: &str| {
        json!({"id":"chatcmpl-1","object":"chat.completion","choices":[
            {"index":0,"finish_reason":reason,"message":{"role":"assistant","content":text}}]})
        .to_string()
    };
    let id = create_answer_review(&f.app, "response", answer("stop", "internal only")).await;
    refused_edit_then_valid(
        &f.app,
        &id,
        &answer("length", "ask the help desk"),
        "only the answer's text may change",
        &answer("stop", "ask the help desk"),
    )
    .await;
}

#[tokio::test]
async fn reviewer_api_needs_valid_token() {
    let f = fixture("");
    let id = create(&f.app, 60_000).await;
    let cases: [&[(&str, &str)]; 4] = [
        &[],
        &[("authorization", "Bearer wrong")],
        &[("authorization", "Basic YWxpY2U6eA==")],
        &[("authorization", "Bearer ")],
    ];
    for headers in cases {
        for (method, uri) in [
            ("GET", "/api/me".to_string()),
            ("GET", "/api/reviews".to_string()),
            ("GET", format!("/api/reviews/{id}")),
            ("POST", format!("/api/reviews/{id}/approve")),
        ] {
            let r = send(&f.app, method, &uri, headers, "{}").await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{method} {uri} {headers:?}"
            );
            assert_eq!(r.header("www-authenticate"), "Bearer");
        }
    }
    let (s, v) = get_as(&f.app, ALICE, "/api/me").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"name": "alice", "groups": ["security"]}));
    // The review is untouched.
    let (_, v) = wait(&f.app, &id, None).await;
    assert_eq!(v["status"], "pending");
}

#[tokio::test]
async fn filter_token_enforced_when_configured() {
    let f = fixture(&common::filter_token_setting());
    let auth = bearer(ALICE);
    for headers in [
        &[][..],
        &[("x-countersign-filter-token", "wrong")],
        // A reviewer token is not a filter token.
        &[("authorization", &auth)],
    ] {
        let (s, v) = call(
            &f.app,
            "POST",
            "/v1/reviews",
            headers,
            Some(create_body(1000)),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_error(&v, "unauthorized");
    }

    let ok = [FILTER_HEADER];
    let (s, v) = call(&f.app, "POST", "/v1/reviews", &ok, Some(create_body(1000))).await;
    assert_eq!(s, StatusCode::CREATED);
    let id = v["id"].as_str().unwrap().to_string();
    for (method, path) in [("GET", "wait"), ("POST", "expire"), ("POST", "cancel")] {
        let uri = format!("/v1/reviews/{id}/{path}");
        let (s, _) = call(&f.app, method, &uri, &[], None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri}");
        let (s, _) = call(&f.app, method, &uri, &ok, None).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
    }
}

#[tokio::test]
async fn concurrent_decisions_have_one_winner() {
    let f = fixture("");
    let id = create(&f.app, 60_000).await;
    let mut tasks = Vec::new();
    for n in 0..20 {
        let app = f.app.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let (token, action) = if n % 2 == 0 {
                (ALICE, "approve")
            } else {
                (BOB, "reject")
            };
            decide(
                &app,
                &id,
                token,
                action,
                json!({"reason": format!("task {n}")}),
            )
            .await
        }));
    }
    let mut ok = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        let (s, v) = t.await.unwrap();
        match s {
            StatusCode::OK => ok.push(v),
            StatusCode::CONFLICT => {
                assert_error(&v, "conflict");
                conflicts += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(ok.len(), 1);
    assert_eq!(conflicts, 19);
    let (_, w) = wait(&f.app, &id, None).await;
    assert_eq!(w["status"], ok[0]["status"]);
    assert_eq!(w["reason"], ok[0]["reason"]);
}

#[tokio::test]
async fn expire_and_cancel_give_one_outcome() {
    let f = fixture("");
    // Pending -> expired; later approve conflicts.
    let id = create(&f.app, 60_000).await;
    let (s, v) = end_review(&f.app, &id, "expire").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "expired");
    assert_eq!(v["reviewer"], Value::Null);
    assert_eq!(v["reason"], "hold timeout");
    let (s, _) = decide(&f.app, &id, ALICE, "approve", json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    // Cancel of an expired review keeps it expired.
    let (_, v) = end_review(&f.app, &id, "cancel").await;
    assert_eq!(v["status"], "expired");

    // Approved -> expire returns the approval unchanged.
    let id = create(&f.app, 60_000).await;
    let (s, _) = decide(&f.app, &id, BOB, "approve", json!({"reason": "ok"})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = end_review(&f.app, &id, "expire").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "approved");
    assert_eq!(v["reviewer"], "bob");
    assert_eq!(v["reason"], "ok");

    // Cancel of pending.
    let id = create(&f.app, 60_000).await;
    let (_, v) = end_review(&f.app, &id, "cancel").await;
    assert_eq!(v["status"], "cancelled");
    let (s, v) = decide(&f.app, &id, ALICE, "reject", json!({"reason": "r"})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("cancelled"));

    let (s, _) = end_review(&f.app, "rev_nope", "expire").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn list_and_detail() {
    let f = fixture("");
    let a = create(&f.app, 60_000).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let b = create(&f.app, 60_000).await;
    decide(&f.app, &a, ALICE, "approve", json!({})).await;

    let (s, v) = get_as(&f.app, BOB, "/api/reviews").await;
    assert_eq!(s, StatusCode::OK);
    let list = v["reviews"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], b.as_str(), "newest first");
    assert_eq!(list[1]["id"], a.as_str());
    let first = &list[0];
    assert_eq!(first["preview"], "x".repeat(200));
    assert_eq!(first["model"], "gpt-x");
    assert_eq!(first["api"], "openai_chat");
    assert_eq!(first["stream"], true);
    assert!(first.get("body").is_none());

    let (_, v) = get_as(&f.app, BOB, "/api/reviews?status=pending").await;
    assert_eq!(v["reviews"].as_array().unwrap().len(), 1);
    assert_eq!(v["reviews"][0]["id"], b.as_str());
    let (_, v) = get_as(&f.app, BOB, "/api/reviews?limit=1").await;
    assert_eq!(v["reviews"].as_array().unwrap().len(), 1);
    let before = v["reviews"][0]["created_at_ms"].as_u64().unwrap();
    let (_, v) = get_as(&f.app, BOB, &format!("/api/reviews?before_ms={before}")).await;
    assert_eq!(v["reviews"][0]["id"], a.as_str());
    let (s, v) = get_as(&f.app, BOB, "/api/reviews?status=bogus").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "bad_request");
    let (s, _) = get_as(&f.app, BOB, "/api/reviews?limit=-1").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let (s, d) = get_as(&f.app, BOB, &format!("/api/reviews/{b}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(d["prompt"].as_array().unwrap().len(), 4);
    assert_eq!(d["prompt"][0], json!({"role": "system", "text": "be nice"}));
    assert_eq!(d["body"], "{\"model\":\"gpt-x\",\"messages\":[]}");
    assert_eq!(d["method"], "POST");
    assert_eq!(d["authority"], "llm.internal");
    assert_eq!(d["hold_timeout_ms"], 60_000);
    assert_eq!(d["route"], "chat");
    assert_eq!(d["caller"], "svc-a");
    assert_eq!(d["rule"], "all");
    assert_eq!(d["request_id"], "req-1");
    let (s, _) = get_as(&f.app, BOB, "/api/reviews/rev_nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn reviews_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("restart.db");
    let id = {
        let state = open_state(&db, "");
        let id = create(&app(state.clone()), 60_000).await;
        drop(state);
        id
    };
    let state = open_state(&db, "");
    let app = app(state.clone());
    let (s, v) = wait(&app, &id, Some(0)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "pending");

    let waiter = spawn_wait(&app, &id, 10000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let (s, _) = decide(&app, &id, ALICE, "approve", json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = waiter.await.unwrap();
    assert_eq!(v["status"], "approved");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn body_limit_and_bad_json() {
    let f = fixture("");
    // Several MiB bodies are accepted.
    let mut big = create_body(1000);
    big["body"] = json!(format!("{{\"pad\":\"{}\"}}", "a".repeat(6 * 1024 * 1024)));
    let (s, _) = call(&f.app, "POST", "/v1/reviews", &[], Some(big)).await;
    assert_eq!(s, StatusCode::CREATED);
    // Over 16 MiB is refused.
    let mut huge = create_body(1000);
    huge["body"] = json!(format!("{{\"pad\":\"{}\"}}", "a".repeat(17 * 1024 * 1024)));
    let (s, v) = call(&f.app, "POST", "/v1/reviews", &[], Some(huge)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&v, "payload_too_large");

    let json = [("content-type", "application/json")];
    let r = send(&f.app, "POST", "/v1/reviews", &json, "{not json").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

/// A web page a reviewer opens may POST across sites without asking first
/// (no CORS preflight) only as a form or plain text. Without a filter
/// token configured (the shipped loopback example), such a page wrote
/// records into the chain, filed reviews and cancelled them: the filter API
/// takes `application/json` only, as the filter sends it.
#[tokio::test]
async fn the_filter_api_takes_json_only() {
    let f = fixture("");
    let id = create(&f.app, 60_000).await;
    let record = json!({"request_id": "req-x", "received_at_ms": 1, "caller": "mallory",
        "decision": "allowed", "api": "openai_chat", "method": "POST",
        "path": "/v1/chat/completions", "model": "m", "prompt": [], "body": "{}"});
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonp"),
    ] {
        let headers: Vec<(&str, &str)> = content_type
            .map(|t| ("content-type", t))
            .into_iter()
            .collect();
        for (uri, body) in [
            ("/v1/records".to_string(), record.to_string()),
            ("/v1/reviews".to_string(), create_body(60_000).to_string()),
            (format!("/v1/reviews/{id}/cancel"), String::new()),
        ] {
            let r = send(&f.app, "POST", &uri, &headers, body).await;
            assert_eq!(
                r.status,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{uri} {content_type:?}"
            );
            assert_error(&r.json(), "unsupported_media_type");
        }
    }
    let (s, v) = call(
        &f.app,
        "GET",
        &format!("/v1/reviews/{id}/wait?timeout_ms=0"),
        &[],
        None,
    )
    .await;
    assert_eq!(
        (s, &v["status"]),
        (StatusCode::OK, &json!("pending")),
        "{v}"
    );
    let (_, records) = get_as(&f.app, ALICE, "/api/records").await;
    assert_eq!(records["records"], json!([]), "{records}");
    // With a charset, it is JSON.
    let headers = [("content-type", "Application/JSON; charset=utf-8")];
    let r = send(
        &f.app,
        "POST",
        &format!("/v1/reviews/{id}/cancel"),
        &headers,
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // The record refused above is one the API takes as JSON.
    let r = send(&f.app, "POST", "/v1/records", &headers, record.to_string()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
}

// ------------------------------------------------------------ real socket

/// A minimal HTTP/1.1 client (std blocking socket on a blocking thread), so
/// the test exercises the real listener without an HTTP client dependency.
async fn raw_http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Value) {
    use std::io::{Read, Write};
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let text = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    let status: u16 = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1;
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn run_serves_and_shuts_down_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(open_state(&dir.path().join("tcp.db"), "")).await;
    let addr = server.addr;

    let (s, v) = raw_http(addr, "GET", "/healthz", "").await;
    assert_eq!((s, v), (200, json!({"status": "ok"})));
    let (s, v) = raw_http(
        addr,
        "POST",
        "/v1/reviews",
        &create_body(60_000).to_string(),
    )
    .await;
    assert_eq!(s, 201);
    let id = v["id"].as_str().unwrap().to_string();

    // A long poll in flight must not hold shutdown for its whole timeout.
    let waiter = tokio::spawn(async move {
        raw_http(
            addr,
            "GET",
            &format!("/v1/reviews/{id}/wait?timeout_ms=30000"),
            "",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    server.shut_down().await;
    let (s, v) = waiter.await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(v["status"], "pending");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn reviews_of_tool_calls_keep_their_kind_and_calls() {
    let f = fixture("");
    let prompt_review = create(&f.app, 60_000).await;
    let answer = json!({"choices":[{"message":{"tool_calls":[
        {"id":"call_1","type":"function","function":{"name":"delete_file","arguments":"{\"path\":\"/srv\"}"}}]}}]});
    let tool_review = common::create_review(
        &f.app,
        &[],
        common::merged(
            create_body(60_000),
            json!({
                "kind": "tool_call",
                "body": answer.to_string(),
                "tool_calls": [{"id": "call_1", "name": "delete_file", "arguments": "{\"path\":\"/srv\"}"}],
            }),
        ),
    )
    .await;
    let ids = |v: &Value| -> Vec<String> {
        v["reviews"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, all) = get_as(&f.app, BOB, "/api/reviews").await;
    assert_eq!(ids(&all), [tool_review.clone(), prompt_review.clone()]);
    assert_eq!(all["reviews"][0]["kind"], "tool_call");
    assert_eq!(all["reviews"][1]["kind"], "prompt");
    let (_, tools) = get_as(&f.app, BOB, "/api/reviews?kind=tool_call").await;
    assert_eq!(ids(&tools), vec![tool_review.clone()]);
    let (_, prompts) = get_as(&f.app, BOB, "/api/reviews?kind=prompt&status=pending").await;
    assert_eq!(ids(&prompts), vec![prompt_review.clone()]);
    let (s, _) = get_as(&f.app, BOB, "/api/reviews?kind=bogus").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let (_, detail) = get_as(&f.app, BOB, &format!("/api/reviews/{tool_review}")).await;
    assert_eq!(detail["kind"], "tool_call");
    assert_eq!(detail["tool_calls"][0]["name"], "delete_file");
    assert_eq!(detail["tool_calls"][0]["arguments"], "{\"path\":\"/srv\"}");
    let (_, detail) = get_as(&f.app, BOB, &format!("/api/reviews/{prompt_review}")).await;
    assert_eq!(detail["tool_calls"], json!([]));
    assert!(detail.get("answer").is_none());
}

#[tokio::test]
async fn a_review_of_an_answers_text_shows_its_texts_in_order() {
    let f = fixture("");
    // An OpenAI chat answer (the fixture's api) with two choices: their
    // texts, as the filter reads them; ids, roles and reasons are none.
    let answer = json!({"id":"chatcmpl-1","object":"chat.completion","choices":[
        {"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"internal only: [EMAIL]"}},
        {"index":1,"finish_reason":"stop","message":{"role":"assistant","content":"second"}}]});
    let id = common::create_review(
        &f.app,
        &[],
        common::merged(
            create_body(60_000),
            json!({"kind": "response", "stream": false, "body": answer.to_string()}),
        ),
    )
    .await;
    let (_, detail) = get_as(&f.app, BOB, &format!("/api/reviews/{id}")).await;
    assert_eq!(detail["kind"], "response");
    assert_eq!(
        detail["answer"],
        json!(["internal only: [EMAIL]", "second"])
    );
    assert_eq!(detail["body"], answer.to_string());
}
