//! `GET /api/stats/load`: the reviewer load over a period, counted from the
//! reviews table (on SQLite, and on PostgreSQL in its pass), for a known
//! set of reviews decided through the API and then moved to fixed times.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::common::{self, decide_ok, get_as, RawDb, ALICE, FILTER_HEADER};

/// A whole hour (Unix ms), so the buckets start at `T`.
const T: u64 = 1_764_000_000_000;
const MIN: u64 = 60_000;
const HOUR: u64 = 3_600_000;

fn service() -> common::Fixture {
    common::fixture("load.db", |db| {
        common::config_toml(db, &common::filter_token_setting(), &[("alice", ALICE, "")])
    })
}

/// Moves review `id` to `created` (and `decided`, when it has ended).
fn at(raw: &mut RawDb, id: &str, created: u64, decided: Option<u64>) {
    let decided = decided.map_or("NULL".to_string(), |d| d.to_string());
    raw.exec(&format!(
        "UPDATE reviews SET created_at_ms = {created}, decided_at_ms = {decided},
             expires_at_ms = {created} + 7200000 WHERE id = '{id}'"
    ))
    .unwrap();
}

fn column(v: &Value, key: &str) -> Vec<u64> {
    v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[key].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn load_counts_decisions_queue_times_and_the_work_sent_to_people() {
    let f = service();
    let mut ids = Vec::new();
    for (i, (rule, caller)) in [
        ("chat", "svc-a"),
        ("chat", "svc-a"),
        ("chat", "svc-b"),
        ("tools", "svc-b"),
        ("tools", "svc-b"),
        ("chat", "svc-old"),
    ]
    .into_iter()
    .enumerate()
    {
        let body = common::review_request(json!({
            "request_id": format!("req-{i}"), "rule": rule, "caller": caller,
        }));
        ids.push(common::create_review(&f.app, &[FILTER_HEADER], body).await);
    }
    decide_ok(&f.app, &ids[0], ALICE, "approve", json!({})).await;
    decide_ok(&f.app, &ids[1], ALICE, "reject", json!({"reason": "no"})).await;
    decide_ok(&f.app, &ids[5], ALICE, "approve", json!({})).await;
    let mut raw = RawDb::open(&f.db);
    // An assessor's approval and an expiry, as their paths store them.
    raw.exec(&format!(
        "UPDATE reviews SET status = 'approved', automatic = 1,
             reviewer = 'assessor:moderation' WHERE id = '{}';
         UPDATE reviews SET status = 'expired', reason = 'hold timeout' WHERE id = '{}'",
        ids[3], ids[4]
    ))
    .unwrap();
    // People: 10 min (bucket 0) and 1 h (bucket 1); one still pending; the
    // assessor in 50 ms; an expiry in bucket 2; one review before the period.
    at(&mut raw, &ids[0], T + 10 * MIN, Some(T + 20 * MIN));
    at(&mut raw, &ids[1], T + 30 * MIN, Some(T + 90 * MIN));
    at(&mut raw, &ids[2], T + 40 * MIN, None);
    at(&mut raw, &ids[3], T + 70 * MIN, Some(T + 70 * MIN + 50));
    at(&mut raw, &ids[4], T + 80 * MIN, Some(T + 140 * MIN));
    at(&mut raw, &ids[5], T - 5 * HOUR, Some(T - 4 * HOUR));
    drop(raw);

    let uri = format!(
        "/api/stats/load?since_ms={}&until_ms={}&bucket_ms={HOUR}",
        T + 5,
        T + 3 * HOUR
    );
    let (status, v) = get_as(&f.app, ALICE, &uri).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["since_ms"], T, "aligned to the bucket: {v}");
    assert_eq!(column(&v, "created"), [3, 2, 0]);
    assert_eq!(column(&v, "human"), [1, 1, 0]);
    assert_eq!(column(&v, "automatic"), [0, 1, 0]);
    assert_eq!(column(&v, "expired"), [0, 0, 1]);
    assert_eq!(column(&v, "pending_at_end"), [2, 2, 1]);
    assert_eq!(v["pending_at_end"], 1);
    assert_eq!(v["buckets"][0]["human_decision_ms"]["p50_ms"], 10 * MIN);
    assert_eq!(v["buckets"][1]["human_decision_ms"]["p99_ms"], HOUR);
    assert_eq!(v["buckets"][2]["human_decision_ms"], Value::Null);
    let t = &v["totals"];
    assert_eq!(
        [
            &t["created"],
            &t["to_people"],
            &t["human"],
            &t["automatic"],
            &t["expired"]
        ],
        [5, 4, 2, 1, 1]
    );
    assert_eq!(
        v["decision_ms"]["human"],
        json!({"count": 2, "p50_ms": 10 * MIN, "p90_ms": HOUR, "p99_ms": HOUR})
    );
    assert_eq!(v["decision_ms"]["automatic"]["p50_ms"], 50);
    assert_eq!(
        v["top_rules"],
        json!([{"name": "chat", "count": 3}, {"name": "tools", "count": 1}])
    );
    assert_eq!(
        v["top_callers"],
        json!([{"name": "svc-a", "count": 2}, {"name": "svc-b", "count": 2}])
    );
}

#[tokio::test]
async fn load_refuses_bad_periods_naming_the_field_and_strangers() {
    let f = service();
    let (status, v) = get_as(&f.app, ALICE, "/api/stats/load?bucket_ms=1000").await;
    common::assert_bad_request(status, &v, "bucket_ms");
    let (status, v) = get_as(&f.app, ALICE, "/api/stats/load?since_ms=10&until_ms=5").await;
    common::assert_bad_request(status, &v, "until_ms");
    let (status, _) = common::call(&f.app, "GET", "/api/stats/load", &[], None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The default: the last day, hourly (a day not aligned to the hour
    // spans 25 buckets).
    let (status, v) = get_as(&f.app, ALICE, "/api/stats/load").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["bucket_ms"], HOUR);
    assert!(
        matches!(v["buckets"].as_array().unwrap().len(), 24 | 25),
        "{v}"
    );
}
