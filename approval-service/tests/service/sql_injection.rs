#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! SQL injection through every filter of the reviewer API: `' OR 1=1 --`
//! style values in each query parameter of `/api/reviews`, `/api/records`
//! and `/api/records/export`, and in every path id. No value may widen a
//! result (every filter here matches nothing legitimately), raise a 500, or
//! change the database.

use crate::common;

use std::path::Path;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use countersign_approval::{app, AppState, Config, TokenHash};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

const ALICE: &str = "alice-secret-token";
const FILTER: &str = "filter-secret";

const PAYLOADS: &[&str] = &[
    "' OR 1=1 --",
    "' OR '1'='1",
    "%' OR '1'='1' --",
    "x' UNION SELECT id, status FROM reviews --",
    "'; DROP TABLE reviews; --",
    "'; DELETE FROM records; --",
    "\") OR 1=1 --",
    "1 OR 1=1",
    "0; UPDATE reviews SET status='approved'",
    "%",
    "_",
    "%%",
    "\\",
    "\\' OR 1=1 --",
    "*",
    "NULL",
    "' OR status='pending' --",
    "svc-a' --",
];

fn config_toml(db: &Path) -> String {
    format!(
        r#"
database = "{}"
filter_token_sha256 = "{}"
[[reviewers]]
name = "alice"
token_sha256 = "{}"
"#,
        common::database_setting(db),
        TokenHash::of_token(FILTER).to_hex(),
        TokenHash::of_token(ALICE).to_hex(),
    )
}

/// Percent-encodes a query value (every byte outside unreserved).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn call(app: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Vec<u8>) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if uri.starts_with("/api/") {
        req = req.header("authorization", format!("Bearer {ALICE}"));
    } else {
        req = req.header("x-countersign-filter-token", FILTER);
    }
    let body = body.map_or_else(Body::empty, |v| Body::from(v.to_string()));
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    (
        status,
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
}

async fn json_call(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let (status, bytes) = call(app, method, uri, body).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn seed(app: &Router) {
    for (i, caller) in ["svc-a", "svc-b"].iter().enumerate() {
        let req = json!({
            "request_id": format!("req-{i}"),
            "api": "openai_chat",
            "method": "POST",
            "path": "/v1/chat/completions",
            "caller": caller,
            "model": "gpt-x",
            "prompt": [{"role": "user", "text": "hello"}],
            "body": r#"{"model":"gpt-x","messages":[{"role":"user","content":"hello"}]}"#,
            "hold_timeout_ms": 60_000
        });
        let (status, v) = json_call(app, "POST", "/v1/reviews", Some(req)).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let rec = json!({
            "request_id": format!("req-{i}"),
            "received_at_ms": 1_700_000_000_000u64,
            "caller": caller,
            "method": "POST",
            "path": "/v1/chat/completions",
            "api": "openai_chat",
            "model": "gpt-x",
            "stream": false,
            "decision": "allowed",
        });
        let (status, v) = json_call(app, "POST", "/v1/records", Some(rec)).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
    }
    let (_, list) = json_call(app, "GET", "/api/reviews", None).await;
    let id = list["reviews"][0]["id"].as_str().unwrap().to_string();
    let (status, v) = json_call(
        app,
        "POST",
        &format!("/api/reviews/{id}/reject"),
        Some(json!({"reason": "no"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

/// A text filter may only return rows that really contain the value
/// (`_` legitimately matches the `rev_` ids through the free-text search).
fn only_literal_matches(rows: &[Value], payload: &str, field: &str) {
    for row in rows {
        let text = row.to_string().to_lowercase();
        assert!(
            text.contains(&payload.to_lowercase()),
            "{field}={payload} matched a row that does not contain it: {row}"
        );
    }
}

/// Rows every endpoint returns without a filter.
async fn totals(app: &Router) -> (usize, usize, Vec<Value>) {
    let (_, reviews) = json_call(app, "GET", "/api/reviews?limit=500", None).await;
    let (_, records) = json_call(app, "GET", "/api/records?limit=500", None).await;
    let reviews = reviews["reviews"].as_array().unwrap().clone();
    (
        reviews.len(),
        records["records"].as_array().unwrap().len(),
        reviews,
    )
}

#[tokio::test]
async fn injection_in_every_filter_matches_nothing_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state =
        AppState::open(Config::from_toml_str(&config_toml(&dir.path().join("t.db"))).unwrap())
            .unwrap();
    let app = app(state);
    seed(&app).await;
    let (reviews_before, records_before, snapshot) = totals(&app).await;
    assert_eq!((reviews_before, records_before), (2, 2));

    let review_text = ["caller", "model", "reviewer", "q"];
    let review_typed = [
        "status",
        "limit",
        "before_ms",
        "since_ms",
        "until_ms",
        "edited",
    ];
    let record_text = ["caller", "model", "decision", "review_id", "request_id"];
    let record_typed = ["since_ms", "until_ms", "limit", "after_seq"];
    let mut checked = 0;
    for payload in PAYLOADS {
        let v = enc(payload);
        for f in review_text {
            let (status, body) =
                json_call(&app, "GET", &format!("/api/reviews?{f}={v}"), None).await;
            assert_eq!(status, StatusCode::OK, "{f}={payload}: {body}");
            only_literal_matches(body["reviews"].as_array().unwrap(), payload, f);
            checked += 1;
        }
        for f in review_typed {
            let (status, body) =
                json_call(&app, "GET", &format!("/api/reviews?{f}={v}"), None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{f}={payload}: {body}");
            checked += 1;
        }
        for path in ["/api/records", "/api/records/export"] {
            for f in record_text {
                let (status, bytes) = call(&app, "GET", &format!("{path}?{f}={v}"), None).await;
                assert_eq!(status, StatusCode::OK, "{path} {f}={payload}");
                let text = String::from_utf8(bytes).unwrap();
                if path == "/api/records" {
                    let body: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(
                        body["records"].as_array().unwrap().len(),
                        0,
                        "{f}={payload} matched: {body}"
                    );
                } else {
                    assert!(
                        text.trim().is_empty(),
                        "export {f}={payload} matched: {text}"
                    );
                }
                // Record filters are exact matches: nothing here equals a payload.
                checked += 1;
            }
            for f in record_typed {
                let (status, _) = call(&app, "GET", &format!("{path}?{f}={v}"), None).await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {f}={payload}");
                checked += 1;
            }
        }
        // Path ids.
        for uri in [
            format!("/api/reviews/{v}"),
            format!("/api/records/{v}"),
            format!("/v1/reviews/{v}/wait?timeout_ms=0"),
            format!("/v1/reviews/{v}/status?caller={v}"),
        ] {
            let (status, body) = json_call(&app, "GET", &uri, None).await;
            assert!(
                status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST,
                "{uri}: {status} {body}"
            );
            checked += 1;
        }
        for action in ["approve", "reject", "edit"] {
            let uri = format!("/api/reviews/{v}/{action}");
            let (status, body) =
                json_call(&app, "POST", &uri, Some(json!({"reason": payload}))).await;
            assert!(
                status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST,
                "{uri}: {status} {body}"
            );
        }
        for action in ["expire", "cancel"] {
            let (status, body) =
                json_call(&app, "POST", &format!("/v1/reviews/{v}/{action}"), None).await;
            assert!(
                status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST,
                "{action} {payload}: {status} {body}"
            );
        }
    }
    assert!(checked > 500, "{checked}");

    // Nothing changed: same rows, same statuses, and the chain still verifies.
    let (reviews_after, records_after, after) = totals(&app).await;
    assert_eq!(
        (reviews_after, records_after),
        (reviews_before, records_before)
    );
    assert_eq!(after, snapshot);
    // A value that is a legitimate substring still matches (the filters work).
    let (_, body) = json_call(&app, "GET", "/api/reviews?caller=svc-a", None).await;
    assert_eq!(body["reviews"].as_array().unwrap().len(), 1);
    let (_, body) = json_call(&app, "GET", "/api/records?caller=svc-b", None).await;
    assert_eq!(body["records"].as_array().unwrap().len(), 1);
}
