//! `replay`: a draft plugin configuration tried on recorded requests. The
//! records are written through the service's API as the filter writes them
//! (allowed requests, reviews approved, edited and rejected, a refusal
//! without a body); the binary replays them under a stricter and a looser
//! draft, and the database is the same afterwards.

use crate::common;

use std::path::Path;
use std::process::Command;

use crate::common::{call, decide_ok, Fixture, ALICE, BOB, FILTER_HEADER};
use axum::http::StatusCode;
use axum::Router;
use countersign_approval::records;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_countersign-approval");

fn chat(model: &str, text: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": text}]}).to_string()
}

/// A request record as the filter writes it.
fn record(
    request_id: &str,
    decision: &str,
    caller: &str,
    model: &str,
    review_id: Option<&str>,
    body: Option<&str>,
) -> Value {
    json!({
        "request_id": request_id,
        "received_at_ms": countersign_approval::now_ms(),
        "caller": caller,
        "method": "POST",
        "path": "/v1/chat/completions",
        "api": "openai_chat",
        "model": model,
        "decision": decision,
        "rule": if review_id.is_some() { "default" } else { "open" },
        "review_id": review_id,
        "body": body,
    })
}

async fn write(app: &Router, rec: Value) {
    let (status, v) = call(app, "POST", "/v1/records", &[FILTER_HEADER], Some(rec)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
}

/// A review of `body` by `caller`, decided by `action` (`approve`, `edit`
/// with the edited body, `reject`).
async fn reviewed(
    app: &Router,
    request_id: &str,
    caller: &str,
    body: &str,
    action: &str,
) -> String {
    let review = common::review_request(json!({
        "request_id": request_id, "caller": caller, "body": body,
    }));
    let id = common::create_review(app, &[FILTER_HEADER], review).await;
    let decision = match action {
        "edit" => json!({"body": chat("gpt-x", "a politer question"), "reason": "tone"}),
        _ => json!({"reason": "checked"}),
    };
    decide_ok(
        app,
        &id,
        if action == "reject" { BOB } else { ALICE },
        action,
        decision,
    )
    .await;
    id
}

/// The records of the test, written through the API. Returns how many.
async fn recorded_traffic(app: &Router) -> u64 {
    // Allowed by a rule for `ci`; one mentions a launch code, one an address.
    write(
        app,
        record(
            "r-ci-1",
            "allowed",
            "ci",
            "gpt-x",
            None,
            Some(&chat("gpt-x", "summarise the build log")),
        ),
    )
    .await;
    write(
        app,
        record(
            "r-ci-2",
            "allowed",
            "ci",
            "gpt-x",
            None,
            Some(&chat("gpt-x", "what is the launch code")),
        ),
    )
    .await;
    write(
        app,
        record(
            "r-ci-3",
            "allowed",
            "ci",
            "gpt-x",
            None,
            Some(&chat("gpt-x", "mail bob@example.com the log")),
        ),
    )
    .await;
    // Reviewed: approved (a big model), edited, rejected (no body forwarded).
    let big = chat("big-1", "plan the migration");
    let id = reviewed(app, "r-dev-1", "dev", &big, "approve").await;
    write(
        app,
        record("r-dev-1", "approved", "dev", "big-1", Some(&id), Some(&big)),
    )
    .await;
    let asked = chat("gpt-x", "rewrite this rudely");
    let id = reviewed(app, "r-dev-2", "dev", &asked, "edit").await;
    let edited = chat("gpt-x", "a politer question");
    write(
        app,
        record(
            "r-dev-2",
            "edited",
            "dev",
            "gpt-x",
            Some(&id),
            Some(&edited),
        ),
    )
    .await;
    let id = reviewed(
        app,
        "r-dev-3",
        "dev",
        &chat("gpt-x", "drop the table"),
        "reject",
    )
    .await;
    let mut rejected = record("r-dev-3", "rejected", "dev", "gpt-x", Some(&id), None);
    rejected["refusal"] = json!({"status": 403, "code": "review_rejected", "message": "checked"});
    write(app, rejected).await;
    // Refused by policy before its body was recorded.
    let mut denied = record("r-x-1", "denied", "x", "o1", None, None);
    denied["refusal"] = json!({"status": 403, "code": "policy_denied", "message": "no"});
    write(app, denied).await;
    7
}

/// A service with a filter token, reviewed by alice and bob.
fn service(db_name: &str) -> Fixture {
    common::fixture(db_name, |db| {
        let settings = common::filter_token_setting();
        common::config_toml(db, &settings, &[("alice", ALICE, ""), ("bob", BOB, "")])
    })
}

/// The report of `replay --json` on `database` (a path or URL).
fn replay(database: &str, draft: &Path, extra: &[&str]) -> Value {
    let out = Command::new(BIN)
        .args(["replay", "--json", "--database", database])
        .arg("--plugin-config")
        .arg(draft)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `(request_id, from, to, to's rule)` of each flip.
fn flips(report: &Value) -> Vec<(String, String, String, String)> {
    report["flips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
            (
                s(&f["request_id"]),
                s(&f["from"]["outcome"]),
                s(&f["to"]["outcome"]),
                s(&f["to"]["rule"]),
            )
        })
        .collect()
}

fn flip(id: &str, from: &str, to: &str, rule: &str) -> (String, String, String, String) {
    (id.into(), from.into(), to.into(), rule.into())
}

fn chain(db: &Path) -> (records::ChainOk, u64) {
    let location = countersign_approval::db::Location::parse(&common::database_setting(db));
    std::thread::spawn(move || {
        let mut conn = records::open_read_only(&location).unwrap();
        let ok = records::verify_chain(&mut conn).unwrap().unwrap();
        let reviews: i64 = conn
            .query_one(
                "SELECT count(*) FROM reviews",
                countersign_approval_domain::params![],
            )
            .unwrap()
            .get(0)
            .unwrap();
        (ok, u64::try_from(reviews).unwrap())
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stricter_and_a_looser_draft_flip_the_expected_requests() {
    let f = service("replay.db");
    let written = recorded_traffic(&f.app).await;
    let before = chain(&f.db);
    let dir = f.dir.path();

    // Stricter: big models denied, a phrase denied, addresses blocked.
    let strict = dir.join("strict.json");
    std::fs::write(
        &strict,
        r#"{"rules":[{"name":"no-big","model":"big-*","action":"deny"},
                     {"name":"open","path":"/v1/chat/completions","model":"gpt-x","action":"allow"}],
            "default_action":"review",
            "content_policy":{"request_rules":[{"name":"launch","phrases":["launch code"]},
                                               {"name":"rude","phrases":["rudely"]}]},
            "masking":{"profiles":{"default":{"detectors":{"email":"block"}}}}}"#,
    )
    .unwrap();
    let report = replay(&common::database_setting(&f.db), &strict, &[]);
    assert_eq!(report["records"], written, "{report:#}");
    assert_eq!(report["replayed"], 6, "{report:#}");
    let skipped = report["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{report:#}");
    assert!(skipped[0]["reason"]
        .as_str()
        .unwrap()
        .contains("before its body was recorded"));
    assert_eq!(
        flips(&report),
        vec![
            flip("r-ci-2", "allow", "deny", "launch"),
            flip("r-ci-3", "allow", "block", "email"),
            flip("r-dev-1", "review", "deny", "no-big"),
            // The caller's words, as the reviewer saw them, not the edit.
            flip("r-dev-2", "review", "deny", "rude"),
            // Rejected, but gpt-x is allowed now.
            flip("r-dev-3", "review", "allow", "open"),
        ],
        "{report:#}"
    );
    assert_eq!(report["before"], json!({"allow": 3, "review": 3}));
    assert_eq!(
        report["after"],
        json!({"allow": 2, "deny": 3, "block": 1}),
        "{report:#}"
    );
    for (grouping, group) in [
        (
            "flips_by_rule",
            json!({"from": "review", "to": "deny", "key": "no-big", "count": 1}),
        ),
        (
            "flips_by_caller",
            json!({"from": "allow", "to": "deny", "key": "ci", "count": 1}),
        ),
        (
            "flips_by_model",
            json!({"from": "allow", "to": "deny", "key": "gpt-x", "count": 1}),
        ),
    ] {
        let groups = report[grouping].as_array().unwrap();
        assert!(groups.contains(&group), "{grouping}: {groups:#?}");
    }

    // Looser: everything allowed; only the reviewed requests flip.
    let loose = dir.join("loose.json");
    std::fs::write(&loose, r#"{"default_action":"allow"}"#).unwrap();
    let report = replay(&common::database_setting(&f.db), &loose, &[]);
    assert_eq!(
        flips(&report),
        vec![
            flip("r-dev-1", "review", "allow", "default"),
            flip("r-dev-2", "review", "allow", "default"),
            flip("r-dev-3", "review", "allow", "default"),
        ],
        "{report:#}"
    );
    // The same draft for one caller, over the last day.
    let report = replay(
        &common::database_setting(&f.db),
        &loose,
        &["--caller", "ci", "--since", "1d"],
    );
    assert_eq!(
        (report["records"].clone(), report["flips"].clone()),
        (json!(3), json!([]))
    );

    // Read-only: the chain is intact, with the same entries and last hash,
    // and the reviews are as many.
    assert_eq!(chain(&f.db), before);
}

#[test]
fn a_draft_that_does_not_parse_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let draft = dir.path().join("draft.json");
    std::fs::write(&draft, r#"{"rules":[{"action":"maybe"}]}"#).unwrap();
    let out = Command::new(BIN)
        .args(["replay", "--database"])
        .arg(dir.path().join("none.db"))
        .arg("--plugin-config")
        .arg(&draft)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rules[0]"), "{err}");
    assert!(!dir.path().join("none.db").exists());
}

/// On PostgreSQL, replay runs as a role that may only read the records: it
/// needs nothing else, so it writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: see common::NEEDS_POSTGRES"]
async fn on_postgres_replay_runs_as_a_role_that_may_only_select() {
    common::require_postgres();
    let f = service("replay-reader.db");
    recorded_traffic(&f.app).await;
    let url = common::database_setting(&f.db);
    let role = format!(
        "reader_{}",
        url.rsplit('/').next().unwrap().split('?').next().unwrap()
    );
    let admin = url.clone();
    let grant = format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;
         GRANT SELECT ON records TO {role};"
    );
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
        client.batch_execute(&grant).unwrap();
    })
    .join()
    .unwrap();
    let reader_url = url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(reader_url, url);
    let draft = f.dir.path().join("loose.json");
    std::fs::write(&draft, r#"{"default_action":"allow"}"#).unwrap();
    let report = replay(&reader_url, &draft, &[]);
    assert_eq!(flips(&report).len(), 3, "{report:#}");
}
