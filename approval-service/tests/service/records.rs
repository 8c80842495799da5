#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Session records: the filter's write endpoints, enrichment from reviews,
//! the query/export API, metrics, the hash chain and its verifier (also
//! against direct tampering with the SQLite file), retention, and the CLI.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{bearer, call, decide_ok, get_as, send, Fixture, ALICE, BOB, FILTER_HEADER};
use axum::http::StatusCode;
use axum::Router;
use countersign_approval::records::{self, chain_hash, ChainProblem};
use countersign_approval::AppState;
use countersign_core::wire::NewRecord;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_countersign-approval");
const DAY_MS: u64 = 86_400_000;

/// A filter token is required; alice and bob review.
fn config_toml(db: &Path, extra: &str) -> String {
    let settings = format!("{}\n{extra}", common::filter_token_setting());
    common::config_toml(db, &settings, &[("alice", ALICE, ""), ("bob", BOB, "")])
}

fn fixture(extra: &str) -> Fixture {
    common::fixture("records.db", |db| config_toml(db, extra))
}

const BODY: &str = r#"{"model":"gpt-x","messages":[{"role":"user","content":"hello"}]}"#;

fn record(decision: &str, caller: &str, review_id: Option<&str>, body: Option<&str>) -> Value {
    json!({
        "request_id": format!("req-{decision}"),
        "received_at_ms": 1_700_000_000_000u64,
        "caller": caller,
        "caller_groups": ["team-a"],
        "source_address": "10.0.0.7:5555",
        "route": "chat",
        "method": "POST",
        "path": "/v1/chat/completions",
        "api": "openai_chat",
        "model": "gpt-x",
        "stream": false,
        "decision": decision,
        "rule": "all",
        "review_id": review_id,
        "body": body,
        "hits": [{"name": "email", "action": "redact", "count": 2}],
        "held_ms": 1200
    })
}

/// `POST /v1/records` with the filter token.
async fn post_record(app: &Router, rec: Value) -> (StatusCode, Value) {
    call(app, "POST", "/v1/records", &[FILTER_HEADER], Some(rec)).await
}

/// `POST /v1/records/{id}/response` with the filter token.
async fn post_response(app: &Router, id: &str, resp: Value) -> (StatusCode, Value) {
    let uri = format!("/v1/records/{id}/response");
    call(app, "POST", &uri, &[FILTER_HEADER], Some(resp)).await
}

async fn write(app: &Router, rec: Value) -> String {
    let (status, v) = post_record(app, rec).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let id = v["record_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("rec_") && id.len() == 36, "{id}");
    id
}

async fn create_review(app: &Router, body: &str) -> String {
    let req = common::review_request(json!({"request_id": "req-r", "body": body}));
    common::create_review(app, &[FILTER_HEADER], req).await
}

fn verify(db: &Path) -> Result<records::ChainOk, ChainProblem> {
    let location = countersign_approval::db::Location::parse(&common::database_setting(db));
    // On a plain thread: the blocking PostgreSQL client may not run on a
    // tokio thread.
    std::thread::spawn(move || {
        let mut conn = records::open_read_only(&location).unwrap();
        records::verify_chain(&mut conn).unwrap()
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn records_written_enriched_queried_and_exported() {
    let f = fixture("");
    let app = &f.app;

    // Filter token on both write endpoints.
    let bad = ("x-countersign-filter-token", "nope");
    for (uri, headers, body) in [
        (
            "/v1/records",
            &[][..],
            record("allowed", "svc-a", None, None),
        ),
        (
            "/v1/records",
            &[bad],
            record("allowed", "svc-a", None, None),
        ),
        ("/v1/records/rec_x/response", &[], json!({})),
    ] {
        let (status, _) = call(app, "POST", uri, headers, Some(body)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri} {headers:?}");
    }

    // Invalid records.
    let (status, v) = post_record(app, json!({"request_id": "x"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let mut wrong_hash = record("allowed", "svc-a", None, Some(BODY));
    wrong_hash["body_sha256"] = json!("AAAA");
    let (status, v) = post_record(app, wrong_hash).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("body_sha256"),
        "{v}"
    );

    // 1. Allowed by policy, with an extra header-like field that must not be kept.
    let mut allowed = record("allowed", "svc-a", None, Some(BODY));
    allowed["headers"] = json!({"authorization": "Bearer sk-live-secret"});
    allowed["body_sha256"] = json!(countersign_core::token::body_hash(BODY.as_bytes()));
    let allowed_id = write(app, allowed).await;

    // 2. Approved by a reviewer.
    let approved_review = create_review(app, BODY).await;
    decide_ok(
        app,
        &approved_review,
        ALICE,
        "approve",
        json!({"reason": "looks fine"}),
    )
    .await;
    let approved_id = write(
        app,
        record("approved", "svc-a", Some(&approved_review), Some(BODY)),
    )
    .await;

    // 3. Edited by a reviewer.
    let edited_review = create_review(app, BODY).await;
    let edited_body =
        r#"{"model":"gpt-x","messages":[{"role":"user","content":"hello, politely"}]}"#;
    decide_ok(
        app,
        &edited_review,
        BOB,
        "edit",
        json!({"body": edited_body, "reason": "tone"}),
    )
    .await;
    let edited_id = write(
        app,
        record("edited", "svc-b", Some(&edited_review), Some(edited_body)),
    )
    .await;

    // 4. Refused (no body).
    let mut refused = record("denied", "svc-c", None, None);
    refused["refusal"] = json!({"status": 403, "code": "policy_denied", "message": "no"});
    let refused_id = write(app, refused).await;

    // Response part of the allowed request.
    let resp = json!({
        "status": 200, "body": "hi there", "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        "ttfb_ms": 40, "total_ms": 90, "completion": "complete"
    });
    let (status, v) = post_response(app, &allowed_id, resp.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let response_id = v["record_id"].as_str().unwrap().to_string();
    // A second response part, an unknown record, an incomplete response.
    for (id, resp, expected) in [
        (allowed_id.as_str(), resp.clone(), StatusCode::CONFLICT),
        ("rec_nope", resp, StatusCode::NOT_FOUND),
        (&allowed_id, json!({"status": 200}), StatusCode::BAD_REQUEST),
    ] {
        let (status, v) = post_response(app, id, resp).await;
        assert_eq!(status, expected, "{id}: {v}");
    }

    // Reviewer auth on the query API.
    let (status, _) = call(app, "GET", "/api/records", &[], None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(
        app,
        "GET",
        "/api/records/export",
        &[("authorization", "Bearer wrong")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, v) = get_as(app, ALICE, "/api/records").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let all = v["records"].as_array().unwrap();
    let ids: Vec<&str> = all
        .iter()
        .map(|r| r["record_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [&allowed_id, &approved_id, &edited_id, &refused_id]);
    assert!(v["next_after_seq"].is_null());

    // The allowed record, merged with its response.
    let a = &all[0];
    assert_eq!(a["kind"], "request");
    assert_eq!(a["request"]["caller"], "svc-a");
    assert_eq!(a["request"]["source_address"], "10.0.0.7:5555");
    assert_eq!(a["request"]["hits"][0]["name"], "email");
    assert_eq!(
        a["request"]["body_sha256"],
        countersign_core::token::body_hash(BODY.as_bytes())
    );
    assert!(a["review"].is_null());
    assert_eq!(a["response"]["record_id"], response_id.as_str());
    assert_eq!(a["response"]["usage"]["completion_tokens"], 2);
    assert_eq!(a["response"]["total_ms"], 90);
    assert_eq!(a["seq"], 1);
    assert_eq!(a["prev_hash"], records::GENESIS_HASH);
    assert!(!a.to_string().contains("sk-live-secret"), "{a}");
    assert!(a["request"].get("headers").is_none());

    // Approved: reviewer, time and reason copied from the review.
    let r = &all[1]["review"];
    assert_eq!(r["id"], approved_review.as_str());
    assert_eq!(r["status"], "approved");
    assert_eq!(r["reviewers"][0]["name"], "alice");
    assert_eq!(r["reviewers"][0]["reason"], "looks fine");
    assert!(r["reviewers"][0]["at_ms"].as_u64().unwrap() > 0);
    assert_eq!(r["edited"], false);
    assert!(r["edit_diff"].is_null());
    assert!(r["original_body"].is_null(), "same as forwarded");
    assert!(all[1]["request"]["body_sha256"].is_string());

    // Edited: the diff and the original body.
    let r = &all[2]["review"];
    assert_eq!(r["edited"], true);
    assert_eq!(r["reviewers"][0]["name"], "bob");
    assert_eq!(r["reviewers"][0]["reason"], "tone");
    assert_eq!(r["original_body"], BODY);
    let diff = r["edit_diff"].as_str().unwrap();
    assert!(diff.starts_with("--- original\n+++ edited\n@@ "), "{diff}");
    // Laid out as written: the keys in the body's order.
    assert!(
        diff.contains("       \"role\": \"user\",\n-      \"content\": \"hello\"\n"),
        "{diff}"
    );
    assert!(
        diff.contains("+      \"content\": \"hello, politely\"\n"),
        "{diff}"
    );

    // Refused.
    assert_eq!(all[3]["request"]["refusal"]["code"], "policy_denied");
    assert!(all[3]["request"]["body"].is_null());
    assert!(all[3]["response"].is_null());

    // Filters.
    for (query, expected) in [
        ("decision=approved", vec![&approved_id]),
        ("caller=svc-b", vec![&edited_id]),
        (
            &format!("review_id={edited_review}") as &str,
            vec![&edited_id],
        ),
        ("model=gpt-x&decision=denied", vec![&refused_id]),
        ("model=other", vec![]),
        ("request_id=req-allowed", vec![&allowed_id]),
        ("since_ms=1&until_ms=2", vec![]),
        (
            "caller=",
            vec![&allowed_id, &approved_id, &edited_id, &refused_id],
        ),
    ] {
        let (status, v) = get_as(app, ALICE, &format!("/api/records?{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {v}");
        let got: Vec<String> = v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["record_id"].as_str().unwrap().to_string())
            .collect();
        let expected: Vec<String> = expected.into_iter().cloned().collect();
        assert_eq!(got, expected, "{query}");
    }
    let (status, _) = get_as(app, ALICE, "/api/records?since_ms=abc").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Paging.
    let (_, p1) = get_as(app, ALICE, "/api/records?limit=3").await;
    assert_eq!(p1["records"].as_array().unwrap().len(), 3);
    let next = p1["next_after_seq"].as_i64().unwrap();
    let (_, p2) = get_as(
        app,
        ALICE,
        &format!("/api/records?limit=3&after_seq={next}"),
    )
    .await;
    assert_eq!(p2["records"].as_array().unwrap().len(), 1);
    assert_eq!(p2["records"][0]["record_id"], refused_id.as_str());
    assert!(p2["next_after_seq"].is_null());

    // One record, by its id or by its response's id.
    let (status, one) = get_as(app, ALICE, &format!("/api/records/{allowed_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one, all[0]);
    let (_, by_resp) = get_as(app, ALICE, &format!("/api/records/{response_id}")).await;
    assert_eq!(by_resp, all[0]);
    let (status, _) = get_as(app, ALICE, "/api/records/rec_unknown").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Export: JSON Lines of the same merged records.
    let auth = bearer(ALICE);
    let uri = "/api/records/export?caller=svc-a";
    let r = send(app, "GET", uri, &[("authorization", &auth)], "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), "application/x-ndjson");
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0], all[0]);
    assert_eq!(lines[1], all[1]);

    // Metrics.
    let r = send(app, "GET", "/metrics", &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    let ctype = r.header("content-type");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    for line in [
        "# TYPE countersign_reviews_created_total counter",
        "countersign_reviews_created_total 2",
        "countersign_reviews_decided_total{status=\"approved\"} 2",
        "countersign_reviews_decided_total{status=\"rejected\"} 0",
        "# TYPE countersign_reviews_pending gauge",
        "countersign_reviews_pending{kind=\"prompt\",mode=\"hold\"} 0",
        "countersign_records_written_total{kind=\"request\"} 4",
        "countersign_records_written_total{kind=\"response\"} 1",
        "countersign_record_write_failures_total 0",
        "countersign_long_polls_waiting 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = l.rsplit_once(' ').unwrap();
        assert!(name.starts_with("countersign_"), "{l}");
        value.parse::<f64>().unwrap();
    }

    // The chain verifies: 4 requests + 1 response.
    let ok = verify(&f.db).unwrap();
    assert_eq!(ok.records, 5);
    assert_eq!(ok.last_seq, 5);
    assert!(ok
        .to_string()
        .starts_with("ok: 5 records, chain intact, last hash "));
    drop(f.dir);
}

#[tokio::test]
async fn metrics_can_require_a_reviewer() {
    let f = fixture("metrics_public = false");
    let (status, _) = call(&f.app, "GET", "/metrics", &[], None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let auth = bearer(ALICE);
    let r = send(&f.app, "GET", "/metrics", &[("authorization", &auth)], "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(String::from_utf8(r.body.to_vec())
        .unwrap()
        .contains("countersign_reviews_pending{kind=\"prompt\",mode=\"hold\"} 0"));
}

#[tokio::test]
async fn metrics_listen_takes_metrics_off_the_service_address() {
    let f = fixture("metrics_listen = \"127.0.0.1:0\"");
    let auth = bearer(ALICE);
    let r = send(&f.app, "GET", "/metrics", &[("authorization", &auth)], "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let metrics = countersign_approval::http::metrics_app(f.state.clone());
    let r = send(&metrics, "GET", "/metrics", &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(String::from_utf8(r.body.to_vec())
        .unwrap()
        .contains("countersign_reviews_pending{kind=\"prompt\",mode=\"hold\"} 0"));
    // Nothing else is served there.
    let r = send(
        &metrics,
        "GET",
        "/api/records",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// Makes the database refuse every insert into `records` (as on a full
/// disk or a read-only file).
fn refuse_record_inserts(db: &Path) {
    let mut db = common::RawDb::open(db);
    let postgres = matches!(db, common::RawDb::Postgres(_));
    db.exec(if postgres {
        "CREATE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'disk full'; END $$;
         CREATE TRIGGER fail_insert BEFORE INSERT ON records
             FOR EACH ROW EXECUTE FUNCTION fail_insert();"
    } else {
        "CREATE TRIGGER fail_insert BEFORE INSERT ON records
         BEGIN SELECT RAISE(ABORT, 'disk full'); END;"
    })
    .unwrap();
}

#[tokio::test]
async fn write_failure_is_a_quick_503() {
    let f = fixture("");
    refuse_record_inserts(&f.db);
    let mut db = common::RawDb::open(&f.db);
    let postgres = matches!(db, common::RawDb::Postgres(_));
    let (status, v) = post_record(&f.app, record("allowed", "a", None, Some(BODY))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "unavailable");
    db.exec(if postgres {
        "DROP TRIGGER fail_insert ON records"
    } else {
        "DROP TRIGGER fail_insert"
    })
    .unwrap();

    // Another writer holds the lock (on PostgreSQL: another replica holds
    // the record chain's lock): the write gives up within the busy timeout
    // instead of hanging past the filter's callout timeout.
    let lock = format!(
        "BEGIN; SELECT pg_advisory_xact_lock({})",
        countersign_approval::db::ADVISORY_RECORD_CHAIN
    );
    db.exec(if postgres { &lock } else { "BEGIN IMMEDIATE" })
        .unwrap();
    let start = Instant::now();
    let (status, _) = post_record(&f.app, record("allowed", "a", None, Some(BODY))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        start.elapsed() < Duration::from_millis(4500),
        "{:?}",
        start.elapsed()
    );
    db.exec("ROLLBACK").unwrap();

    let r = send(&f.app, "GET", "/metrics", &[], "").await;
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(
        text.contains("countersign_record_write_failures_total 2"),
        "{text}"
    );
    // And it recovers.
    write(&f.app, record("allowed", "a", None, Some(BODY))).await;
    assert_eq!(verify(&f.db).unwrap().records, 1);
}

pub(crate) fn new_record(caller: &str) -> NewRecord {
    serde_json::from_value(record("allowed", caller, None, Some(BODY))).unwrap()
}

/// A database with `n` request records written at `at_ms`; returns its path.
pub(crate) fn chain(dir: &Path, n: usize, extra: &str) -> (AppState, PathBuf) {
    let db = dir.join("chain.db");
    let state = common::open_state(&config_toml(&db, extra));
    for k in 0..n {
        state
            .records()
            .write_request(new_record(&format!("svc-{k}")), 1_000 + k as u64)
            .unwrap();
    }
    (state, db)
}

fn verify_cli(db: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["verify-records", "--database"])
        .arg(common::database_setting(db))
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap() + &String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn triggers_refuse_update_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let (_state, db) = chain(dir.path(), 3, "");
    let mut conn = common::RawDb::open(&db);
    let e = conn
        .exec("UPDATE records SET entry = '{}' WHERE seq = 2")
        .unwrap_err();
    assert!(e.contains("append-only"), "{e}");
    let e = conn.exec("DELETE FROM records WHERE seq = 1").unwrap_err();
    assert!(e.contains("append-only"), "{e}");
    if common::on_postgres() {
        let e = conn.exec("TRUNCATE records").unwrap_err();
        assert!(e.contains("append-only"), "{e}");
    }
    assert_eq!(verify(&db).unwrap().records, 3);
    conn.exec("INSERT INTO chain_anchor (through_seq, hash, created_at_ms) VALUES (0, 'x', 0)")
        .unwrap();
    let e = conn.exec("DELETE FROM chain_anchor").unwrap_err();
    assert!(e.contains("append-only"), "{e}");
    let e = conn.exec("UPDATE chain_anchor SET hash = 'y'").unwrap_err();
    assert!(e.contains("append-only"), "{e}");
}

/// Drops the append-only trigger `name` on `table`, as someone with write
/// access to the database would before tampering.
fn drop_trigger(conn: &mut common::RawDb, name: &str, table: &str) {
    let sql = if common::on_postgres() {
        format!("DROP TRIGGER {name} ON {table}")
    } else {
        format!("DROP TRIGGER {name}")
    };
    conn.exec(&sql).unwrap();
}

/// Entry, previous hash and hash of record `seq`.
fn row(conn: &mut common::RawDb, seq: i64) -> (String, String, String) {
    let column = |conn: &mut common::RawDb, name: &str| {
        conn.text(&format!("SELECT {name} FROM records WHERE seq = {seq}"))
    };
    (
        column(conn, "entry"),
        column(conn, "prev_hash"),
        column(conn, "hash"),
    )
}

/// `value` as an SQL string literal (the test's own values only).
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// On PostgreSQL the query columns (`caller`, `model`, `decision`, ...)
/// are the service's copies of the entry's fields, not computed by the
/// database: someone who can write the table could change a record's
/// `caller` and hide it from `?caller=` and the exports without touching a
/// hash. The verifier compares them with the hashed entry. (On SQLite the
/// database computes them from the entry: they cannot be written.)
#[test]
fn verifier_finds_an_edited_query_column() {
    if !common::on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (state, db) = chain(dir.path(), 3, "");
    drop(state);
    let mut conn = common::RawDb::open(&db);
    drop_trigger(&mut conn, "records_no_update", "records");
    let id2 = conn.text("SELECT record_id FROM records WHERE seq = 2");
    conn.exec("UPDATE records SET caller = 'someone-else' WHERE seq = 2")
        .unwrap();
    assert_eq!(
        verify(&db).unwrap_err(),
        ChainProblem::Altered {
            seq: 2,
            record_id: id2,
            detail: "query columns do not match the hashed entry"
        }
    );
}

// Tampers with the database directly, on SQLite and on PostgreSQL: the
// verifier and the CLI must see every kind of change on both.
#[test]
fn verifier_finds_altered_missing_and_inserted_records() {
    // Altered entry (hash left as it was).
    let dir = tempfile::tempdir().unwrap();
    let (state, db) = chain(dir.path(), 5, "");
    drop(state);
    let (code, out) = verify_cli(&db);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("ok: 5 records, chain intact, last hash "),
        "{out}"
    );
    let mut conn = common::RawDb::open(&db);
    let id3 = conn.text("SELECT record_id FROM records WHERE seq = 3");
    drop_trigger(&mut conn, "records_no_update", "records");
    conn.exec("UPDATE records SET entry = replace(entry, 'svc-2', 'svc-X') WHERE seq = 3")
        .unwrap();
    assert_eq!(
        verify(&db).unwrap_err(),
        ChainProblem::Altered {
            seq: 3,
            record_id: id3.clone(),
            detail: "hash mismatch"
        }
    );
    let (code, out) = verify_cli(&db);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        format!("altered: record seq 3 ({id3}) hash mismatch")
    );

    // Altered with its own hash recomputed (and, on PostgreSQL, its copy
    // of the caller too, which the verifier also compares): the next link
    // breaks.
    if common::on_postgres() {
        conn.exec("UPDATE records SET caller = 'svc-X' WHERE seq = 3")
            .unwrap();
    }
    let (entry, prev, _) = row(&mut conn, 3);
    conn.exec(&format!(
        "UPDATE records SET hash = {} WHERE seq = 3",
        literal(&chain_hash(&prev, 3, &entry))
    ))
    .unwrap();
    assert!(matches!(
        verify(&db).unwrap_err(),
        ChainProblem::Inserted {
            seq: 4,
            after: 3,
            ..
        }
    ));

    // A column changed but not the hashed entry.
    let dir = tempfile::tempdir().unwrap();
    let (state, db) = chain(dir.path(), 3, "");
    drop(state);
    let mut conn = common::RawDb::open(&db);
    drop_trigger(&mut conn, "records_no_update", "records");
    conn.exec("UPDATE records SET created_at_ms = 5 WHERE seq = 2")
        .unwrap();
    assert!(matches!(
        verify(&db).unwrap_err(),
        ChainProblem::Altered {
            seq: 2,
            detail: "columns do not match the hashed entry",
            ..
        }
    ));

    // A deleted middle record.
    let dir = tempfile::tempdir().unwrap();
    let (state, db) = chain(dir.path(), 5, "");
    drop(state);
    let mut conn = common::RawDb::open(&db);
    drop_trigger(&mut conn, "records_no_delete", "records");
    conn.exec("DELETE FROM records WHERE seq = 3").unwrap();
    assert_eq!(
        verify(&db).unwrap_err(),
        ChainProblem::Missing { after: 2, next: 4 }
    );
    let (code, out) = verify_cli(&db);
    assert_eq!((code, out.trim()), (1, "missing: seq gap between 2 and 4"));

    // A forged record with a fabricated seq, correctly self-hashed but
    // linked to an older entry.
    let dir = tempfile::tempdir().unwrap();
    let (state, db) = chain(dir.path(), 4, "");
    drop(state);
    let mut conn = common::RawDb::open(&db);
    let (_, _, hash1) = row(&mut conn, 1);
    let entry =
        r#"{"created_at_ms":9,"kind":"request","record_id":"rec_forged","request":{},"v":1}"#;
    let forge = |seq: i64, record_id: &str, prev: &str| {
        format!(
            "INSERT INTO records (seq, record_id, kind, created_at_ms, entry, prev_hash, hash)
             VALUES ({seq}, {}, 'request', 9, {}, {}, {})",
            literal(record_id),
            literal(entry),
            literal(prev),
            literal(&chain_hash(prev, seq, entry))
        )
    };
    conn.exec(&forge(5, "rec_forged", &hash1)).unwrap();
    assert_eq!(
        verify(&db).unwrap_err(),
        ChainProblem::Inserted {
            seq: 5,
            record_id: "rec_forged".into(),
            after: 4
        }
    );
    let (code, out) = verify_cli(&db);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("inserted/reordered: record seq 5 (rec_forged) prev_hash does not match"),
        "{out}"
    );

    // A forged record slipped in before the first one.
    let dir = tempfile::tempdir().unwrap();
    let (state, db) = chain(dir.path(), 2, "");
    drop(state);
    let mut conn = common::RawDb::open(&db);
    conn.exec(&forge(0, "rec_zero", records::GENESIS_HASH))
        .unwrap();
    assert_eq!(
        verify(&db).unwrap_err(),
        ChainProblem::Inserted {
            seq: 0,
            record_id: "rec_zero".into(),
            after: 0
        }
    );

    // A prefix deleted by hand, with and without a forged anchor.
    let dir = tempfile::tempdir().unwrap();
    let (state, db) = chain(dir.path(), 5, "");
    drop(state);
    let mut conn = common::RawDb::open(&db);
    let (_, _, hash2) = row(&mut conn, 2);
    drop_trigger(&mut conn, "records_no_delete", "records");
    conn.exec("DELETE FROM records WHERE seq <= 2").unwrap();
    assert_eq!(
        verify(&db).unwrap_err(),
        ChainProblem::Missing { after: 0, next: 3 }
    );
    conn.exec(&format!(
        "INSERT INTO chain_anchor (through_seq, hash, created_at_ms) VALUES (2, {}, 0)",
        literal(&hash2)
    ))
    .unwrap();
    assert_eq!(
        verify(&db).unwrap_err(),
        ChainProblem::UnattestedAnchor { through_seq: 2 }
    );
}

// Synchronous: the store is called directly, which the blocking PostgreSQL
// client allows only off the async runtime.
#[test]
fn retention_deletes_a_prefix_and_the_chain_still_verifies() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ret.db");
    let state = common::open_state(&config_toml(
        &db,
        "record_retention_days = 1\nsqlite_synchronous = \"normal\"",
    ));
    let store = state.records();
    let now = countersign_approval::now_ms();
    let old = now - 3 * DAY_MS;
    // More old entries than one retention chunk, then a few recent ones.
    let n_old = records::RETENTION_CHUNK + 5;
    let mut first_old = String::new();
    for k in 0..n_old {
        let w = store
            .write_request(new_record("old"), old + k as u64)
            .unwrap();
        if k == 0 {
            first_old = w.record_id;
        }
    }
    let recent = store.write_request(new_record("new"), now).unwrap();
    store
        .write_response(
            &recent.record_id,
            serde_json::from_value(json!({"status": 200, "body": "", "completion": "complete"}))
                .unwrap(),
            now,
        )
        .unwrap();
    assert_eq!(verify(&db).unwrap().records, n_old as u64 + 2);

    let deleted = rt.block_on(state.retention_once()).unwrap();
    assert_eq!(deleted, n_old);
    let ok = verify(&db).unwrap();
    // Two chunks: two retention entries, plus the recent request and response.
    assert_eq!(ok.records, 4, "{ok}");
    assert_eq!(ok.anchor.as_ref().unwrap().0, n_old as i64);
    assert!(ok.to_string().contains("removed by retention"), "{ok}");
    assert!(store.get(&first_old).unwrap().is_none());
    assert!(store.get(&recent.record_id).unwrap().is_some());
    // Nothing more is due; the gate is closed again.
    assert_eq!(rt.block_on(state.retention_once()).unwrap(), 0);
    let mut conn = common::RawDb::open(&db);
    assert!(conn.exec("DELETE FROM records").is_err());
    let (code, out) = verify_cli(&db);
    assert_eq!(code, 0, "{out}");

    // Appends continue the chain from the anchor; a later retention that
    // removes everything (retention entries included) still verifies.
    store.write_request(new_record("later"), now + 1).unwrap();
    let later = now + DAY_MS;
    assert_eq!(store.apply_retention(later, later).unwrap(), 5);
    let ok = verify(&db).unwrap();
    assert_eq!(ok.records, 1, "{ok}");
    store.write_request(new_record("after"), later + 1).unwrap();
    assert_eq!(verify(&db).unwrap().records, 2);

    // Deleting the attesting retention entry by hand is reported.
    conn.exec(if common::on_postgres() {
        "DROP TRIGGER records_no_delete ON records; DELETE FROM records WHERE kind = 'retention';"
    } else {
        "DROP TRIGGER records_no_delete; DELETE FROM records WHERE kind = 'retention';"
    })
    .unwrap();
    assert!(verify(&db).is_err());
}

#[test]
fn review_retention_drops_old_bodies_and_the_chain_still_verifies() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("review-ret.db");
    let state = common::open_state(&config_toml(&db, "record_retention_days = 1"));
    let app = countersign_approval::app(state.clone());
    let secret =
        r#"{"model":"gpt-x","messages":[{"role":"user","content":"the old secret plan"}]}"#;
    let review = |request_id: &'static str| {
        let req = common::review_request(json!({"request_id": request_id, "body": secret,
            "prompt": [{"role": "user", "text": "the old secret plan"}]}));
        rt.block_on(common::create_review(&app, &[FILTER_HEADER], req))
    };
    // Old: one approved with an edit, one rejected, one still pending;
    // recent: one approved.
    let (edited, rejected, pending, recent) = (
        review("r-edit"),
        review("r-rej"),
        review("r-pend"),
        review("r-new"),
    );
    let edit = json!({"body": {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}});
    rt.block_on(decide_ok(&app, &edited, ALICE, "edit", edit));
    rt.block_on(decide_ok(
        &app,
        &rejected,
        ALICE,
        "reject",
        json!({"reason": "no"}),
    ));
    rt.block_on(decide_ok(&app, &recent, ALICE, "approve", json!({})));
    let old_record = rt.block_on(write(
        &app,
        record("approved", "svc", Some(&edited), Some(BODY)),
    ));
    let mut conn = common::RawDb::open(&db);
    let three_days = 3 * DAY_MS;
    for id in [&edited, &rejected, &pending] {
        conn.exec(&format!(
            "UPDATE reviews SET created_at_ms = created_at_ms - {three_days},
                 expires_at_ms = expires_at_ms + {three_days} WHERE id = '{id}'"
        ))
        .unwrap();
    }
    assert_eq!(verify(&db).unwrap().records, 1);

    let now = countersign_approval::now_ms();
    // The old record is younger than the cutoff: records keep it; only
    // the reviews' bodies go.
    assert_eq!(rt.block_on(state.retention_once()).unwrap(), 0);
    let detail = |id: &str| {
        rt.block_on(get_as(&app, ALICE, &format!("/api/reviews/{id}")))
            .1
    };
    for id in [&edited, &rejected] {
        let d = detail(id);
        assert_eq!(
            (d["body"].as_str(), d["prompt"].clone()),
            (Some(""), json!([])),
            "{d}"
        );
        assert_eq!(d["preview"], "", "{d}");
        assert!(d["body_purged_at_ms"].as_u64().unwrap() >= now, "{d}");
        assert!(!d.to_string().contains("secret plan"), "{d}");
    }
    // What was decided, by whom and why stays; so does the fact of an edit.
    let d = detail(&edited);
    assert_eq!(
        (d["status"].as_str(), d["reviewer"].as_str()),
        (Some("approved"), Some("alice"))
    );
    assert_eq!(
        (d["edited"].clone(), d["edited_body"].clone()),
        (json!(true), json!("")),
        "{d}"
    );
    assert_eq!(d["approvals"][0]["edited"], true, "{d}");
    assert_eq!(detail(&rejected)["reason"], "no");
    // A pending review and a recent one keep everything.
    for id in [&pending, &recent] {
        let d = detail(id);
        assert!(d["body"].as_str().unwrap().contains("secret plan"), "{d}");
        assert_eq!(d["body_purged_at_ms"], Value::Null, "{d}");
    }
    // The text search no longer finds the purged prompts.
    let (_, found) = rt.block_on(get_as(&app, ALICE, "/api/reviews?q=secret%20plan"));
    let mut ids: Vec<String> = found["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut kept = vec![pending.clone(), recent.clone()];
    kept.sort();
    assert_eq!(ids, kept);

    // The chain says so, and still verifies (library and CLI).
    let ok = verify(&db).unwrap();
    assert_eq!(ok.records, 2, "{ok}");
    let note = conn.text("SELECT entry FROM records WHERE kind = 'retention'");
    let note: Value = serde_json::from_str(&note).unwrap();
    assert_eq!(note["retention"]["review_bodies_purged"], 2, "{note}");
    assert!(state.records().get(&old_record).unwrap().is_some());
    let (code, out) = verify_cli(&db);
    assert_eq!(code, 0, "{out}");
    // Nothing more is due: no second note.
    assert_eq!(rt.block_on(state.retention_once()).unwrap(), 0);
    assert_eq!(verify(&db).unwrap().records, 2);
}

#[test]
fn sqlite_only_cli_export_and_errors() {
    // Names SQLite files on the command line.
    common::require_sqlite();
    let dir = tempfile::tempdir().unwrap();
    let (state, db) = chain(dir.path(), 3, "");
    drop(state);
    let out = Command::new(BIN)
        .args(["export-records", "--database"])
        .arg(&db)
        .args(["--since-ms", "1001"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["request"]["caller"], "svc-1");
    assert_eq!(lines[1]["seq"], 3);

    // --config names the database.
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, format!("database = \"{}\"\n", db.display())).unwrap();
    let out = Command::new(BIN)
        .args(["verify-records", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));

    // Usage and missing database: exit 2.
    let out = Command::new(BIN).arg("verify-records").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .args(["verify-records", "--database"])
        .arg(dir.path().join("missing.db"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!dir.path().join("missing.db").exists());
    let out = Command::new(BIN)
        .args(["export-records", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_retried_write_with_the_same_idempotency_key_returns_the_first_record() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _db) = chain(dir.path(), 0, "");
    let mut rec = new_record("svc");
    rec.request_id = "req-1".into();
    rec.idempotency_key = Some("req-1:00000000000000aa".into());
    let first = state.records().write_request(rec.clone(), 1_000).unwrap();
    let again = state.records().write_request(rec.clone(), 2_000).unwrap();
    assert_eq!(
        (first.record_id.clone(), first.seq),
        (again.record_id, again.seq)
    );
    // Another key (another attempt, or the refusal record) is a new record.
    rec.idempotency_key = Some("req-1:00000000000000aa:refusal".into());
    let refusal = state.records().write_request(rec, 3_000).unwrap();
    assert_ne!(refusal.record_id, first.record_id);
    assert_eq!(state.records().entry_count().unwrap(), 2);
}

/// Every answer to a pre-forward record write was lost, so the filter
/// refused the request it never forwarded: its refusal becomes the written
/// record's outcome, not a second record that contradicts it.
#[test]
fn a_refusal_after_a_lost_record_answer_completes_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _db) = chain(dir.path(), 0, "");
    let mut rec = new_record("svc");
    rec.request_id = "req-lost".into();
    rec.idempotency_key = Some("req-lost:00000000000000bb".into());
    let written = state.records().write_request(rec.clone(), 1_000).unwrap();
    let mut refusal = rec.clone();
    refusal.decision = "unavailable".into();
    refusal.idempotency_key = Some("req-lost:00000000000000bb:refusal".into());
    refusal.refusal = Some(countersign_core::wire::RecordedRefusal {
        status: 503,
        code: "audit_record_unavailable".into(),
        message: "the session record could not be written".into(),
    });
    let first = state
        .records()
        .write_request(refusal.clone(), 2_000)
        .unwrap();
    assert_eq!(first.record_id, written.record_id);
    // The refusal, retried after its own lost answer: still one record.
    let again = state.records().write_request(refusal, 3_000).unwrap();
    assert_eq!(again.record_id, written.record_id);
    let got = state.records().get(&written.record_id).unwrap().unwrap();
    assert_eq!(got["response"]["completion"], "not_forwarded", "{got}");
    assert_eq!(got["response"]["status"], 503, "{got}");
    assert_eq!(
        got["response"]["blocked_by"], "audit_record_unavailable",
        "{got}"
    );
    assert_eq!(
        state.records().entry_count().unwrap(),
        2,
        "request + outcome"
    );
}

/// The other order: the filter gave up on a pre-forward append that was
/// only late (queued behind a slow commit, or on another replica), and its
/// refusal was written first. The late record must not say `allowed` and
/// stop there: it is written with the refusal as its outcome.
#[test]
fn a_pre_forward_record_written_after_its_refusal_says_it_was_not_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _db) = chain(dir.path(), 0, "");
    let mut rec = new_record("svc");
    rec.request_id = "req-late".into();
    rec.idempotency_key = Some("req-late:00000000000000cc".into());
    let mut refusal = rec.clone();
    refusal.decision = "unavailable".into();
    refusal.idempotency_key = Some("req-late:00000000000000cc:refusal".into());
    refusal.refusal = Some(countersign_core::wire::RecordedRefusal {
        status: 503,
        code: "audit_record_unavailable".into(),
        message: "the session record could not be written".into(),
    });
    state.records().write_request(refusal, 1_000).unwrap();
    let late = state.records().write_request(rec.clone(), 2_000).unwrap();
    let got = state.records().get(&late.record_id).unwrap().unwrap();
    assert_eq!(got["response"]["completion"], "not_forwarded", "{got}");
    assert_eq!(
        got["response"]["blocked_by"], "audit_record_unavailable",
        "{got}"
    );
    // Its retry is the same record, still with one outcome.
    let again = state.records().write_request(rec, 3_000).unwrap();
    assert_eq!(again.record_id, late.record_id);
    assert_eq!(
        state.records().entry_count().unwrap(),
        3,
        "refusal + request + outcome"
    );
    // A record of another request keeps no outcome it did not have.
    let mut other = new_record("svc");
    other.request_id = "req-other".into();
    other.idempotency_key = Some("req-other:00000000000000dd".into());
    let other = state.records().write_request(other, 4_000).unwrap();
    let got = state.records().get(&other.record_id).unwrap().unwrap();
    assert!(got["response"].is_null(), "{got}");
}

/// A caller can put NUL characters in a prompt or a model name. PostgreSQL
/// text cannot hold them, and its `jsonb` refuses `\u0000`: the review and
/// its records must still be written (NUL kept as U+FFFD), on both
/// databases, or such a request would fail instead of being reviewed.
#[tokio::test]
async fn nul_characters_are_reviewed_and_recorded_like_any_text() {
    let f = fixture("");
    let body = r#"{"model":"gpt\u0000x","messages":[{"role":"user","content":"hi\u0000there"}]}"#;
    let req = common::review_request(json!({
        "request_id": "req-nul",
        "model": "gpt\u{0}x",
        "caller": "svc\u{0}a",
        "prompt": [{"role": "user", "text": "hi\u{0}there"}],
        "body": body,
    }));
    let id = common::create_review(&f.app, &[FILTER_HEADER], req).await;
    let (status, detail) = common::get_as(&f.app, ALICE, &format!("/api/reviews/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    // The body the reviewer sees is the JSON text as sent (its escapes are
    // text, not NUL characters).
    assert_eq!(detail["body"], body);
    assert!(
        detail["model"].as_str().unwrap().starts_with("gpt"),
        "{detail}"
    );

    let mut rec = record("approved", "svc\u{0}a", Some(&id), Some(body));
    rec["model"] = json!("gpt\u{0}x");
    let record_id = write(&f.app, rec).await;
    let (status, v) = post_response(
        &f.app,
        &record_id,
        json!({"status": 200, "body": "answer\u{0}with NUL", "completion": "complete"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (_, got) = common::get_as(&f.app, ALICE, &format!("/api/records/{record_id}")).await;
    assert_eq!(got["request"]["model"], "gpt\u{FFFD}x", "{got}");
    assert_eq!(got["response"]["body"], "answer\u{FFFD}with NUL", "{got}");
    assert_eq!(verify(&f.db).unwrap().records, 2);
}

/// Many writers at once share group commits: every one gets its own
/// record, the chain has no gap or fork, and two retries of one record
/// (same idempotency key) in one group still make one record.
#[test]
fn concurrent_writers_share_group_commits_and_the_chain_stays_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (state, db) = chain(dir.path(), 0, "");
    let store = state.records().clone();
    let threads: Vec<_> = (0..48)
        .map(|k| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut rec = new_record(&format!("svc-{k}"));
                rec.request_id = format!("req-{}", k % 40);
                // Threads 40..47 repeat the idempotency key of 0..7.
                rec.idempotency_key = Some(format!("key-{}", k % 40));
                let w = store.write_request(rec, 5_000).unwrap();
                let resp = serde_json::from_value(
                    json!({"status": 200, "body": "", "completion": "complete"}),
                );
                let r = store.write_response(&w.record_id, resp.unwrap(), 5_001);
                (k, w, r.is_ok())
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut by_key = std::collections::HashMap::new();
    for (k, w, _) in &results {
        let first = by_key.entry(k % 40).or_insert_with(|| w.record_id.clone());
        assert_eq!(*first, w.record_id, "one record per idempotency key");
    }
    // One response part per record: the repeat's is refused (409).
    let responses = results.iter().filter(|(_, _, ok)| *ok).count();
    assert_eq!(responses, 40);
    let ok = verify(&db).unwrap();
    assert_eq!(ok.records, 80, "{ok}");
    assert_eq!(ok.last_seq, 80);
}

/// `POST /v1/records/batch`: one result per record, in order, each as
/// `POST /v1/records` would have answered it; a repeated idempotency key
/// returns the record already written; then `POST /v1/records/responses`
/// appends the response parts, each with its own result.
#[tokio::test]
async fn a_batch_of_records_gets_one_result_per_record_in_order() {
    let f = fixture("");
    let app = &f.app;
    let batch = |records: Vec<Value>| json!({ "records": records });
    // The filter token is required.
    let (status, _) = call(
        app,
        "POST",
        "/v1/records/batch",
        &[],
        Some(batch(vec![record("allowed", "a", None, Some(BODY))])),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let mut first = record("allowed", "a", None, Some(BODY));
    first["idempotency_key"] = json!("req-a:01");
    let mut wrong_hash = record("approved", "b", None, Some(BODY));
    wrong_hash["body_sha256"] = json!("AAAA");
    let third = record("edited", "c", None, None);
    let (status, v) = call(
        app,
        "POST",
        "/v1/records/batch",
        &[FILTER_HEADER],
        Some(batch(vec![first.clone(), wrong_hash, third])),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{v}");
    assert_eq!(results[0]["status"], 201);
    assert_eq!(results[1]["status"], 400);
    assert!(results[1]["error"]
        .as_str()
        .unwrap()
        .contains("body_sha256"));
    assert!(results[1].get("record_id").is_none());
    assert_eq!(results[2]["status"], 201);
    let id_a = results[0]["record_id"].as_str().unwrap().to_string();
    let id_c = results[2]["record_id"].as_str().unwrap().to_string();
    assert_ne!(id_a, id_c);

    // A retry of the batch (its answer lost) returns the records written.
    let (_, v) = call(
        app,
        "POST",
        "/v1/records/batch",
        &[FILTER_HEADER],
        Some(batch(vec![first])),
    )
    .await;
    assert_eq!(v["results"][0]["record_id"], json!(id_a));
    assert_eq!(verify(&f.db).unwrap().records, 2);

    // Response parts: one new, one for an unknown record, one repeated.
    let part = |id: &str| json!({"record_id": id, "response": {"status": 200, "body": "ok", "completion": "complete"}});
    let parts = json!({"responses": [part(&id_a), part("rec_00"), part(&id_a)]});
    let (status, v) = call(
        app,
        "POST",
        "/v1/records/responses",
        &[FILTER_HEADER],
        Some(parts),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let codes: Vec<u64> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [201, 404, 409], "{v}");
    let (status, rec) = get_as(app, ALICE, &format!("/api/records/{id_a}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rec["response"]["status"], 200, "{rec}");

    // Not a list of records: 400, nothing written.
    let (status, _) = call(
        app,
        "POST",
        "/v1/records/batch",
        &[FILTER_HEADER],
        Some(json!({"records": {}})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(verify(&f.db).unwrap().records, 3);
}

/// The database refuses the batch: every record in it gets 503, as a
/// single write would, and nothing of it is written.
#[tokio::test]
async fn a_batch_the_database_refuses_is_503_for_each_record() {
    let f = fixture("");
    refuse_record_inserts(&f.db);
    let records = json!({"records": [
        record("allowed", "a", None, Some(BODY)),
        record("approved", "b", None, Some(BODY)),
    ]});
    let (status, v) = call(
        &f.app,
        "POST",
        "/v1/records/batch",
        &[FILTER_HEADER],
        Some(records),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    for r in v["results"].as_array().unwrap() {
        assert_eq!(r["status"], 503, "{v}");
    }
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
}
