#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Whether a held request is still there when a reviewer approves it: the
//! filter's long polls keep its hold alive (in the database, for every
//! replica) until `hold_grace_ms` after the last one ended; an approval
//! later than that ends the review `abandoned` with 409 `review_abandoned`,
//! never 200 as if something was released. Runs on SQLite and PostgreSQL.

use crate::common;

use std::path::Path;
use std::time::Duration;

use crate::common::{assert_error, decide, get_as, spawn_wait, wait, ALICE, BOB};
use axum::http::StatusCode;
use axum::Router;
use countersign_approval::{app, AppState};
use serde_json::{json, Value};

/// The grace of these tests, and a pause safely longer than it.
const GRACE_MS: u64 = 300;
const PAST_GRACE: Duration = Duration::from_millis(GRACE_MS * 3);

fn replica(db: &Path) -> (AppState, Router) {
    let settings = format!("hold_grace_ms = {GRACE_MS}");
    let toml = common::config_toml(db, &settings, &[("alice", ALICE, ""), ("bob", BOB, "")]);
    let state = common::open_state(&toml);
    (state.clone(), app(state))
}

/// A service whose start lies more than the grace behind (so holds are
/// judged at once), on its own database.
async fn service() -> (tempfile::TempDir, Router) {
    let dir = tempfile::tempdir().unwrap();
    let (_, app) = replica(&dir.path().join("holds.db"));
    tokio::time::sleep(PAST_GRACE).await;
    (dir, app)
}

async fn create(app: &Router, fields: Value) -> String {
    common::create_review(app, &[], common::review_request(fields)).await
}

async fn status_of(app: &Router, id: &str) -> Value {
    let (status, v) = get_as(app, ALICE, &format!("/api/reviews/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

async fn approve(app: &Router, id: &str) -> (StatusCode, Value) {
    decide(app, id, ALICE, "approve", json!({})).await
}

/// The answer and stored state of an approval that found the hold gone.
async fn assert_abandoned(app: &Router, id: &str, answer: (StatusCode, Value)) {
    let (status, v) = answer;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "review_abandoned");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing was released"),
        "{v}"
    );
    let review = status_of(app, id).await;
    assert_eq!(review["status"], "abandoned", "{review}");
    assert_eq!(review["reviewer"], Value::Null, "{review}");
    assert!(
        review["approvals"].as_array().unwrap().is_empty(),
        "{review}"
    );
    // The filter, should it poll again, is told so (and refuses).
    let (_, state) = wait(app, id, Some(0)).await;
    assert_eq!(state["status"], "abandoned", "{state}");
    // And a second try is a plain conflict.
    let (again, v) = approve(app, id).await;
    assert_eq!(again, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("abandoned"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_after_the_hold_stopped_polling_abandons_the_review() {
    let (_dir, app) = service().await;
    let id = create(&app, json!({})).await;
    // No long poll since creation, for longer than the grace.
    tokio::time::sleep(PAST_GRACE).await;
    let answer = approve(&app, &id).await;
    assert_abandoned(&app, &id, answer).await;
    // Listed under its status.
    let (_, list) = get_as(&app, ALICE, "/api/reviews?status=abandoned").await;
    let ids: Vec<&str> = list["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    // An edit (an approval with another body) is abandoned the same way.
    let edited = create(&app, json!({"request_id": "req-edit"})).await;
    tokio::time::sleep(PAST_GRACE).await;
    let answer = decide(&app, &edited, BOB, "edit", json!({"body": {"model": "m"}})).await;
    assert_abandoned(&app, &edited, answer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_in_progress_keeps_the_hold_alive() {
    let (_dir, app) = service().await;
    let id = create(&app, json!({})).await;
    let poll = spawn_wait(&app, &id, 20_000);
    // Longer than the grace since creation, but a waiter is attached.
    tokio::time::sleep(PAST_GRACE).await;
    let (status, v) = approve(&app, &id).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (_, state) = poll.await.unwrap();
    assert_eq!(state["status"], "approved", "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_that_ended_keeps_the_hold_alive_for_the_grace_only() {
    let (_dir, app) = service().await;
    // Within the grace after a poll's answer: the filter is about to poll again.
    let id = create(&app, json!({})).await;
    tokio::time::sleep(PAST_GRACE).await;
    let (_, state) = wait(&app, &id, Some(10)).await;
    assert_eq!(state["status"], "pending");
    let (status, v) = approve(&app, &id).await;
    assert_eq!(status, StatusCode::OK, "{v}");

    // A poll cut off (its connection closed: Envoy died) counts from then,
    // not from the end it asked for.
    let id = create(&app, json!({"request_id": "req-cut"})).await;
    let poll = spawn_wait(&app, &id, 20_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    poll.abort();
    tokio::time::sleep(PAST_GRACE).await;
    let answer = approve(&app, &id).await;
    assert_abandoned(&app, &id, answer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_without_a_hold_are_never_abandoned_and_rejections_stay_rejections() {
    let (_dir, app) = service().await;
    let asynchronous = create(&app, json!({"async_review": true})).await;
    let audit = create(&app, json!({"request_id": "req-audit", "mode": "audit"})).await;
    let rejected = create(&app, json!({"request_id": "req-rej"})).await;
    tokio::time::sleep(PAST_GRACE).await;
    for id in [&asynchronous, &audit] {
        let (status, v) = approve(&app, id).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["status"], "approved", "{v}");
    }
    // A rejection releases nothing either way: it is recorded as given.
    let (status, v) = decide(&app, &rejected, ALICE, "reject", json!({"reason": "no"})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "rejected", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hold_is_judged_from_the_database_by_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let (_, a) = replica(&db);
    tokio::time::sleep(PAST_GRACE).await;
    // The filter polls replica A; a reviewer approves on replica B, which
    // has no waiter of its own.
    let (_, b) = replica(&db);
    tokio::time::sleep(PAST_GRACE).await;
    let live = create(&a, json!({})).await;
    // Longer than the pause below; short, since on SQLite no notification
    // wakes A: its poll sees the approval when it re-reads at its end.
    let poll = spawn_wait(&a, &live, 2_000);
    let gone = create(&a, json!({"request_id": "req-gone"})).await;
    tokio::time::sleep(PAST_GRACE).await;
    let (status, v) = approve(&b, &live).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (_, state) = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state["status"], "approved", "{state}");
    let answer = approve(&b, &gone).await;
    assert_abandoned(&b, &gone, answer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_just_started_gives_the_filter_time_to_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("restart.db");
    let (_, before) = replica(&db);
    let id = create(&before, json!({})).await;
    let other = create(&before, json!({"request_id": "req-other"})).await;
    tokio::time::sleep(PAST_GRACE).await;
    // The service restarts: the filter, backing off, has not polled yet.
    let (_, after) = replica(&db);
    let (status, v) = approve(&after, &id).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // Once the grace since the start has passed, a silent hold is gone.
    tokio::time::sleep(PAST_GRACE).await;
    let answer = approve(&after, &other).await;
    assert_abandoned(&after, &other, answer).await;
}
