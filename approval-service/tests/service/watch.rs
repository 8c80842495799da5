#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `POST /v1/watch`: one long poll per filter worker for all its held
//! requests. A watch answers with the reviews it was asked to `check` that
//! have ended, or waits until one of its worker's reviews ends; answers
//! are numbered (`next`) and sent again until the filter says they
//! arrived (`after`); a mailbox the filter does not know answers with its
//! own epoch at once. While the worker watches, its holds are alive.
//! Runs on SQLite and PostgreSQL.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{assert_bad_request, assert_error, call, decide, decide_ok, ALICE};
use axum::http::StatusCode;
use axum::Router;
use countersign_approval::{app, AppState};
use serde_json::{json, Value};

/// A filter worker's id, and another's.
const W: &str = "0123456789abcdef0123456789abcdef";
const OTHER: &str = "fedcba9876543210fedcba9876543210";

/// The grace of these tests, and a pause safely longer than it.
const GRACE_MS: u64 = 300;
const PAST_GRACE: Duration = Duration::from_millis(GRACE_MS * 3);

/// Watches ask for 30 s: an answer within this came without waiting for
/// the timeout.
const PROMPT: Duration = Duration::from_secs(3);

fn replica(db: &Path) -> (AppState, Router) {
    let settings = format!("hold_grace_ms = {GRACE_MS}");
    let toml = common::config_toml(db, &settings, &[("alice", ALICE, "")]);
    let state = common::open_state(&toml);
    (state.clone(), app(state))
}

async fn service() -> (tempfile::TempDir, AppState, Router) {
    let dir = tempfile::tempdir().unwrap();
    let (state, app) = replica(&dir.path().join("watch.db"));
    (dir, state, app)
}

/// Creates a review held by worker `watcher` (request id `request_id`).
async fn create(app: &Router, watcher: &str, request_id: &str) -> String {
    let body = common::review_request(json!({"request_id": request_id, "watcher": watcher}));
    common::create_review(app, &[], body).await
}

/// `POST /v1/watch` with `body`.
async fn watch(app: &Router, body: Value) -> (StatusCode, Value) {
    call(app, "POST", "/v1/watch", &[], Some(body)).await
}

/// [`watch`] on a task of its own.
fn spawn_watch(app: &Router, body: Value) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let app = app.clone();
    tokio::spawn(async move { watch(&app, body).await })
}

/// The ids and statuses of an answer's states.
fn states(answer: &Value) -> Vec<(String, String)> {
    answer["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pair(id: &str, status: &str) -> (String, String) {
    (id.to_string(), status.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_answers_at_once_with_checked_reviews_that_ended_and_unknown_ids() {
    let (_dir, _state, app) = service().await;
    let decided = create(&app, W, "req-decided").await;
    let pending = create(&app, W, "req-pending").await;
    decide_ok(&app, &decided, ALICE, "reject", json!({"reason": "no"})).await;
    let missing = "rev_00000000000000000000000000000000";
    let t = Instant::now();
    let (status, v) = watch(
        &app,
        json!({"watcher": W, "check": [decided, pending, missing], "timeout_ms": 30_000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(t.elapsed() < PROMPT, "{:?}", t.elapsed());
    assert_eq!(states(&v), [pair(&decided, "rejected")], "{v}");
    assert_eq!(v["states"][0]["reason"], "no", "{v}");
    assert_eq!(v["unknown"], json!([missing]), "{v}");
    assert_eq!(v["epoch"].as_str().unwrap().len(), 32, "{v}");
    assert_eq!(v["next"], 0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checked_review_past_its_expiry_is_expired_by_the_watch() {
    let (_dir, _state, app) = service().await;
    let body = common::review_request(json!({"watcher": W, "hold_timeout_ms": 1}));
    let id = common::create_review(&app, &[], body).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, v) = watch(&app, json!({"watcher": W, "check": [id], "timeout_ms": 0})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(states(&v), [pair(&id, "expired")], "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_watch_is_woken_by_a_decision_and_answers_are_sent_until_taken_in() {
    let (_dir, _state, app) = service().await;
    let (_, idle) = watch(&app, json!({"watcher": W, "timeout_ms": 10})).await;
    assert_eq!(states(&idle), [], "{idle}");
    let epoch = idle["epoch"].as_str().unwrap().to_string();
    // Created with its watcher, whose mailbox is here, and never listed in
    // a `check`.
    let first = create(&app, W, "req-1").await;
    // Another worker's review does not wake this one.
    let others = create(&app, OTHER, "req-other").await;

    let waiting = spawn_watch(
        &app,
        json!({"watcher": W, "epoch": epoch, "after": idle["next"], "timeout_ms": 30_000}),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    decide_ok(&app, &others, ALICE, "approve", json!({})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "woken by another worker's review");
    let t = Instant::now();
    decide_ok(&app, &first, ALICE, "approve", json!({"reason": "fine"})).await;
    let (status, v) = tokio::time::timeout(PROMPT, waiting)
        .await
        .expect("the watch was not woken by its review's decision")
        .unwrap();
    assert!(t.elapsed() < PROMPT);
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(states(&v), [pair(&first, "approved")], "{v}");
    assert_eq!(v["states"][0]["reviewer"], "alice", "{v}");
    assert_eq!(v["epoch"], epoch.as_str());
    let next = v["next"].as_u64().unwrap();
    assert!(next > idle["next"].as_u64().unwrap(), "{v}");

    // The answer was lost: the same `after` gets the same states again.
    let (_, again) = watch(
        &app,
        json!({"watcher": W, "epoch": epoch, "after": idle["next"], "timeout_ms": 30_000}),
    )
    .await;
    assert_eq!(states(&again), states(&v), "{again}");
    assert_eq!(again["next"], next, "{again}");
    // Taken in: forgotten; nothing new, so the watch times out empty.
    let (_, empty) = watch(
        &app,
        json!({"watcher": W, "epoch": epoch, "after": next, "timeout_ms": 100}),
    )
    .await;
    assert_eq!(states(&empty), [], "{empty}");
    assert_eq!(empty["next"], next, "{empty}");

    // The next review's end comes with a higher number.
    let second = create(&app, W, "req-2").await;
    let waiting = spawn_watch(
        &app,
        json!({"watcher": W, "epoch": epoch, "after": next, "timeout_ms": 30_000}),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    decide_ok(&app, &second, ALICE, "reject", json!({"reason": "no"})).await;
    let (_, v) = tokio::time::timeout(PROMPT, waiting)
        .await
        .expect("the watch was not woken by the rejection")
        .unwrap();
    assert_eq!(states(&v), [pair(&second, "rejected")], "{v}");
    assert!(v["next"].as_u64().unwrap() > next, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_naming_another_epoch_gets_the_mailboxs_at_once() {
    let (_dir, _state, app) = service().await;
    let stale = "00000000000000000000000000000000";
    let t = Instant::now();
    let (status, v) = watch(
        &app,
        json!({"watcher": W, "epoch": stale, "after": 7, "timeout_ms": 30_000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(t.elapsed() < PROMPT, "{:?}", t.elapsed());
    let epoch = v["epoch"].as_str().unwrap();
    assert_ne!(epoch, stale);
    assert_eq!(epoch.len(), 32, "{v}");
    assert_eq!(states(&v), [], "{v}");
    // With it, the watch waits (here until its short timeout).
    let (_, v2) = watch(
        &app,
        json!({"watcher": W, "epoch": epoch, "after": v["next"], "timeout_ms": 200}),
    )
    .await;
    assert_eq!(v2["epoch"], epoch, "{v2}");
    assert_eq!(v2["next"], v["next"], "{v2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_and_creations_refuse_bad_watchers_and_too_many_ids() {
    let (_dir, _state, app) = service().await;
    for bad in ["", "0123456789ABCDEF0123456789ABCDEF", "0123", "../etc"] {
        let (status, v) = watch(&app, json!({"watcher": bad, "timeout_ms": 0})).await;
        assert_bad_request(status, &v, "watcher");
        let body = common::review_request(json!({"watcher": bad}));
        let (status, v) = call(&app, "POST", "/v1/reviews", &[], Some(body)).await;
        assert_bad_request(status, &v, "watcher");
    }
    let max = countersign_core::wire::MAX_WATCH_CHECK;
    let many: Vec<String> = (0..=max).map(|n| format!("rev_{n:032x}")).collect();
    let (status, v) = watch(&app, json!({"watcher": W, "check": many, "timeout_ms": 0})).await;
    assert_bad_request(status, &v, "check");
    let (status, v) = watch(
        &app,
        json!({"watcher": W, "check": ["rev_a", "rev/../x"], "timeout_ms": 0}),
    )
    .await;
    assert_bad_request(status, &v, "check");
    // As many as allowed are read (in chunks), and all unknown here.
    let (status, v) = watch(
        &app,
        json!({"watcher": W, "check": many[..max], "timeout_ms": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["unknown"].as_array().unwrap().len(), max);
    // Not JSON: refused like the filter API's other POSTs.
    let r = common::send(
        &app,
        "POST",
        "/v1/watch",
        &[("content-type", "text/plain")],
        json!({"watcher": W, "timeout_ms": 0}).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

/// An approval's answer that found the hold gone.
fn assert_abandoned(answer: (StatusCode, Value)) {
    let (status, v) = answer;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "review_abandoned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watching_worker_keeps_its_holds_alive_and_a_cut_off_one_does_not() {
    let (_dir, _state, app) = service().await;
    // Holds are judged once the service's start lies a grace behind.
    tokio::time::sleep(PAST_GRACE).await;
    let held = create(&app, W, "req-held").await;
    // Never polled with `/wait`; its worker watches throughout, in watches
    // shorter than the grace and in one longer.
    let until = Instant::now() + PAST_GRACE;
    // (Naming no epoch, each lists the review, as the filter's would.)
    while Instant::now() < until {
        let (status, v) = watch(
            &app,
            json!({"watcher": W, "check": [held], "timeout_ms": 50}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    let long = spawn_watch(
        &app,
        json!({"watcher": W, "check": [held], "timeout_ms": 30_000}),
    );
    tokio::time::sleep(PAST_GRACE).await;
    let (status, v) = decide(&app, &held, ALICE, "approve", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "approved", "{v}");
    let (_, answer) = tokio::time::timeout(PROMPT, long).await.unwrap().unwrap();
    assert_eq!(states(&answer), [pair(&held, "approved")], "{answer}");

    // The worker's watch is cut off (Envoy went away): after the grace,
    // an approval finds its hold gone.
    let gone = create(&app, W, "req-gone").await;
    let cut = spawn_watch(
        &app,
        json!({"watcher": W, "epoch": answer["epoch"], "after": answer["next"],
               "timeout_ms": 30_000}),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!cut.is_finished(), "the watch had nothing to wait for");
    cut.abort();
    tokio::time::sleep(PAST_GRACE).await;
    assert_abandoned(decide(&app, &gone, ALICE, "approve", json!({})).await);
}

/// A watch that names no epoch lists every review its worker waits for:
/// the mailbox's backlog is covered by that read and not sent again (with
/// watches alternating between replicas, each would otherwise get the
/// other's whole backlog back at once, forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_naming_no_epoch_gets_no_backlog_but_what_it_checks() {
    let (_dir, _state, app) = service().await;
    let (_, first) = watch(&app, json!({"watcher": W, "timeout_ms": 10})).await;
    let waited = create(&app, W, "req-1").await;
    let pending = create(&app, W, "req-2").await;
    decide_ok(&app, &waited, ALICE, "approve", json!({})).await;
    // The backlog holds `waited`'s end; a watch naming the epoch gets it.
    let (_, named) = watch(
        &app,
        json!({"watcher": W, "epoch": first["epoch"], "after": first["next"], "timeout_ms": 10}),
    )
    .await;
    assert_eq!(states(&named), [pair(&waited, "approved")], "{named}");
    // Naming none, with the one review still waited for: nothing comes
    // back, the watch waits (here: its short timeout) past the backlog.
    let t = Instant::now();
    let (_, fresh) = watch(
        &app,
        json!({"watcher": W, "check": [pending], "timeout_ms": 300}),
    )
    .await;
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "answered at once: {fresh}"
    );
    assert_eq!(states(&fresh), [], "{fresh}");
    assert_eq!(fresh["epoch"], first["epoch"], "{fresh}");
    assert!(
        fresh["next"].as_u64().unwrap() >= named["next"].as_u64().unwrap(),
        "{fresh}"
    );
}

/// The reviews a worker says are gone (their callers went away) are
/// cancelled, as their own cancellation would have; an approval of one is
/// refused instead of answered 200 for a hold nobody waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_a_watch_says_are_gone_are_cancelled() {
    let (_dir, _state, app) = service().await;
    let (_, first) = watch(&app, json!({"watcher": W, "timeout_ms": 10})).await;
    let left = create(&app, W, "req-1").await;
    let decided = create(&app, W, "req-2").await;
    decide_ok(&app, &decided, ALICE, "approve", json!({})).await;
    let (status, v) = watch(
        &app,
        json!({"watcher": W, "epoch": first["epoch"], "after": first["next"],
               "gone": [left, decided], "timeout_ms": 10}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, answer) = decide(&app, &left, ALICE, "approve", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let (_, detail) = common::get_as(&app, ALICE, &format!("/api/reviews/{left}")).await;
    assert_eq!(detail["status"], "cancelled", "{detail}");
    // A decided one stays as decided.
    let (_, detail) = common::get_as(&app, ALICE, &format!("/api/reviews/{decided}")).await;
    assert_eq!(detail["status"], "approved", "{detail}");
}

/// One answer carries at most about a MiB of states (edited bodies): the
/// rest comes with the next watch, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_edits_are_spread_over_several_answers() {
    let (_dir, _state, app) = service().await;
    let (_, first) = watch(&app, json!({"watcher": W, "timeout_ms": 10})).await;
    let big = "x".repeat(400 * 1024);
    let mut ids = Vec::new();
    for n in 0..4 {
        let id = create(&app, W, &format!("req-{n}")).await;
        let edited = json!({"model": "gpt-x", "messages": [{"role": "user", "content": big}]});
        decide_ok(
            &app,
            &id,
            ALICE,
            "edit",
            json!({"body": edited.to_string()}),
        )
        .await;
        ids.push(id);
    }
    let (mut epoch, mut after) = (first["epoch"].clone(), first["next"].clone());
    let mut seen = Vec::new();
    let mut answers = 0;
    while seen.len() < ids.len() && answers < 10 {
        let (_, v) = watch(
            &app,
            json!({"watcher": W, "epoch": epoch, "after": after, "timeout_ms": 10}),
        )
        .await;
        assert!(
            v.to_string().len() < 1536 * 1024,
            "{} bytes",
            v.to_string().len()
        );
        seen.extend(states(&v).into_iter().map(|(id, _)| id));
        (epoch, after) = (v["epoch"].clone(), v["next"].clone());
        answers += 1;
    }
    assert_eq!(seen, ids);
    assert!(answers > 1, "one answer carried them all");
}
