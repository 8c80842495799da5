#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Several replicas of the service on one PostgreSQL database: a decision
//! taken through one replica reaches the long polls and live feeds of the
//! others at once (LISTEN/NOTIFY), and survives lost connections.
//!
//! These run in the PostgreSQL pass of the tests
//! (`COUNTERSIGN_TEST_POSTGRES_URL`, set by `./dev test`); with SQLite there
//! is only ever one replica, and they return at once.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{ALICE, BOB};
use axum::http::StatusCode;
use axum::Router;
use countersign_approval::{app, AppState};
use serde_json::json;

/// Long polls in these tests ask for 30 s: an answer within this bound can
/// only come from a wake-up, not from a poll timing out.
const PROMPT: Duration = Duration::from_secs(3);

fn replica(db: &Path) -> (AppState, Router) {
    let toml = common::config_toml(db, "", &[("alice", ALICE, ""), ("bob", BOB, "")]);
    let state = common::open_state(&toml);
    (state.clone(), app(state))
}

/// Waits for the next live-feed event about `id` of `kind`.
async fn next_event(
    rx: &mut tokio::sync::broadcast::Receiver<countersign_approval::ReviewEvent>,
    id: &str,
    kind: &str,
) {
    let found = tokio::time::timeout(PROMPT, async {
        loop {
            let e = rx.recv().await.unwrap();
            if e.id == id && e.kind == kind {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "no {kind} event for {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: see common::NEEDS_POSTGRES"]
async fn a_decision_through_one_replica_releases_a_long_poll_on_another_at_once() {
    common::require_postgres();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let (state_a, a) = replica(&db);
    let (state_b, b) = replica(&db);
    let mut feed_b = state_b.subscribe_events();

    // Created on A: B's live feed hears of it.
    let id = common::create_review(&a, &[], common::review_request(json!({}))).await;
    next_event(&mut feed_b, &id, "created").await;
    let (status, v) = common::get_as(&b, ALICE, &format!("/api/reviews/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{v}");

    // Held on A, approved through B.
    let waiter = common::spawn_wait(&a, &id, 30_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    common::decide_ok(&b, &id, ALICE, "approve", json!({"reason": "ok"})).await;
    let (status, v) = tokio::time::timeout(PROMPT, waiter)
        .await
        .expect("the long poll on A was not woken by B's decision")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["status"], "approved", "{v}");
    assert_eq!(v["reviewer"], "alice");
    assert!(t.elapsed() < PROMPT, "{:?}", t.elapsed());

    // The other way round, with a rejection.
    let id2 = common::create_review(
        &b,
        &[],
        common::review_request(json!({"request_id": "req-2"})),
    )
    .await;
    let waiter = common::spawn_wait(&b, &id2, 30_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    common::decide_ok(&a, &id2, BOB, "reject", json!({"reason": "no"})).await;
    let (_, v) = tokio::time::timeout(PROMPT, waiter)
        .await
        .expect("the long poll on B was not woken by A's decision")
        .unwrap();
    assert_eq!(v["status"], "rejected", "{v}");

    // A replica does not hear its own changes twice.
    let mut feed_a = state_a.subscribe_events();
    let id3 = common::create_review(
        &a,
        &[],
        common::review_request(json!({"request_id": "req-3"})),
    )
    .await;
    next_event(&mut feed_a, &id3, "created").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(e) = feed_a.try_recv() {
        assert!(e.id != id3, "A heard its own change again: {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: see common::NEEDS_POSTGRES"]
async fn quorum_across_replicas_and_concurrent_decisions_have_one_winner() {
    common::require_postgres();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("quorum.db");
    let (_sa, a) = replica(&db);
    let (_sb, b) = replica(&db);

    // Two approvals needed: one through each replica.
    let id = common::create_review(
        &a,
        &[],
        common::review_request(json!({"required_approvals": 2})),
    )
    .await;
    let waiter = common::spawn_wait(&a, &id, 30_000);
    common::decide_ok(&a, &id, ALICE, "approve", json!({})).await;
    let (status, v) = common::decide(&b, &id, ALICE, "approve", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "same reviewer twice: {v}");
    common::decide_ok(&b, &id, BOB, "approve", json!({})).await;
    let (_, v) = tokio::time::timeout(PROMPT, waiter).await.unwrap().unwrap();
    assert_eq!(v["status"], "approved", "{v}");

    // Approve on A and reject on B at the same moment: one wins, the other
    // is told 409, and both replicas report the winner.
    for n in 0..10 {
        let id = common::create_review(
            &b,
            &[],
            common::review_request(json!({"request_id": format!("race-{n}")})),
        )
        .await;
        let (ra, rb) = tokio::join!(
            common::decide(&a, &id, ALICE, "approve", json!({})),
            common::decide(&b, &id, BOB, "reject", json!({"reason": "no"})),
        );
        let codes = [ra.0, rb.0];
        assert!(
            codes.contains(&StatusCode::OK) && codes.contains(&StatusCode::CONFLICT),
            "{codes:?}"
        );
        let winner = if ra.0 == StatusCode::OK {
            "approved"
        } else {
            "rejected"
        };
        for r in [&a, &b] {
            let (_, v) = common::wait(r, &id, Some(0)).await;
            assert_eq!(v["status"], winner, "{v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: see common::NEEDS_POSTGRES"]
async fn replicas_recover_from_lost_database_connections() {
    common::require_postgres();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lost.db");
    let (_sa, a) = replica(&db);
    let (_sb, b) = replica(&db);
    let id = common::create_review(&a, &[], common::review_request(json!({}))).await;
    let waiter = common::spawn_wait(&a, &id, 30_000);

    // Every connection of both replicas is cut (a failover, a restarted
    // server, an idle-connection reaper).
    let mut admin = common::RawDb::open(&db);
    admin
        .exec(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .unwrap();
    // Time for A's listener to notice and listen again.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // B reconnects on its next statement; A hears of the decision.
    common::decide_ok(&b, &id, ALICE, "approve", json!({})).await;
    let (status, v) = tokio::time::timeout(PROMPT, waiter)
        .await
        .expect("A missed the decision after its connections were cut")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["status"], "approved", "{v}");
}

/// A filter worker's id (`POST /v1/watch`).
const WATCHER: &str = "0123456789abcdef0123456789abcdef";

/// `POST /v1/watch` with `body` on a task of its own.
fn spawn_watch(
    app: &Router,
    body: serde_json::Value,
) -> tokio::task::JoinHandle<serde_json::Value> {
    let app = app.clone();
    tokio::spawn(async move {
        let (status, v) = common::call(&app, "POST", "/v1/watch", &[], Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: see common::NEEDS_POSTGRES"]
async fn a_change_through_one_replica_wakes_a_watch_on_another() {
    common::require_postgres();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("watch.db");
    let grace = "hold_grace_ms = 300";
    let reviewers = [("alice", ALICE, ""), ("bob", BOB, "")];
    let a = app(common::open_state(&common::config_toml(
        &db, grace, &reviewers,
    )));
    let b = app(common::open_state(&common::config_toml(
        &db, grace, &reviewers,
    )));
    // Holds are judged once the replicas' start lies a grace behind.
    tokio::time::sleep(Duration::from_millis(900)).await;

    // Created through B; the worker watches through A, listing it.
    let body = common::review_request(json!({"watcher": WATCHER}));
    let id = common::create_review(&b, &[], body).await;
    let first = spawn_watch(
        &a,
        json!({"watcher": WATCHER, "check": [id], "timeout_ms": 30_000}),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    common::decide_ok(&b, &id, ALICE, "approve", json!({})).await;
    let v = tokio::time::timeout(PROMPT, first)
        .await
        .expect("the watch on A was not woken by B's decision")
        .unwrap();
    assert_eq!(v["states"][0]["id"], id.as_str(), "{v}");
    assert_eq!(v["states"][0]["status"], "approved", "{v}");
    let epoch = v["epoch"].as_str().unwrap().to_string();

    // A review of an older filter (no watcher: its own long polls keep it
    // alive, and it had none) is abandoned through B: the watch on A that
    // lists it hears of that too.
    let body = common::review_request(json!({"request_id": "req-gone"}));
    let gone = common::create_review(&a, &[], body).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let second = spawn_watch(
        &a,
        json!({"watcher": WATCHER, "epoch": epoch, "after": v["next"],
               "check": [gone], "timeout_ms": 30_000}),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) = common::decide(&b, &gone, ALICE, "approve", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let v = tokio::time::timeout(PROMPT, second)
        .await
        .expect("the watch on A was not woken by the abandonment through B")
        .unwrap();
    assert_eq!(v["states"][0]["id"], gone.as_str(), "{v}");
    assert_eq!(v["states"][0]["status"], "abandoned", "{v}");

    // A review created through B while the worker's watch already waits on
    // A (so it is in no `check` of that watch): B's creation tells A whose
    // it is, and B's decision wakes the watch on A.
    let waiting = spawn_watch(
        &a,
        json!({"watcher": WATCHER, "epoch": epoch, "after": v["next"], "timeout_ms": 30_000}),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = common::review_request(json!({"watcher": WATCHER, "request_id": "req-later"}));
    let later = common::create_review(&b, &[], body).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    common::decide_ok(&b, &later, ALICE, "approve", json!({})).await;
    let v = tokio::time::timeout(PROMPT, waiting)
        .await
        .expect("the watch on A was not woken by B's decision of a review created through B")
        .unwrap();
    assert_eq!(v["states"][0]["id"], later.as_str(), "{v}");
    assert_eq!(v["states"][0]["status"], "approved", "{v}");

    // A's notifications may be lost (its connections cut): its watches
    // answer with a new epoch, and the filter checks everything again.
    let third = spawn_watch(
        &a,
        json!({"watcher": WATCHER, "epoch": epoch, "after": v["next"], "timeout_ms": 30_000}),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut admin = common::RawDb::open(&db);
    admin
        .exec(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .unwrap();
    let v = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("the watch on A did not hear that notifications may have been lost")
        .unwrap();
    assert_ne!(v["epoch"], epoch.as_str(), "{v}");
    assert_eq!(v["states"], json!([]), "{v}");
}
