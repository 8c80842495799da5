#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Separation of duties, quorum, and approval tokens for asynchronous callers.

use crate::common;

use std::path::Path;
use std::time::Duration;

use crate::common::{
    assert_error, call, decide, get_as, spawn_wait, wait, Fixture, ALICE, BOB, CAROL, DANA,
    FILTER_HEADER, REVIEWERS,
};
use axum::http::StatusCode;
use axum::Router;
use countersign_approval::{app, Config};
use countersign_core::token::{body_hash, verify, Destination, TokenError, TokenKey};
use serde_json::{json, Value};

/// base64 of 32 bytes of `A` and of `B`.
/// The path of the requests `common` files reviews for.
const CHAT_PATH: &str = "/v1/chat/completions";

/// A request to `path` with no route and no authority (what reviews
/// created without them are for).
fn to(path: &str) -> Destination<'_> {
    Destination::path(path)
}
const SECRET_A: &str = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";
const SECRET_B: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";

const BODY: &str = common::REVIEW_BODY;

fn key_a() -> TokenKey {
    TokenKey {
        id: "k1".into(),
        secret: vec![b'A'; 32],
    }
}

fn key_b() -> TokenKey {
    TokenKey {
        id: "k2".into(),
        secret: vec![b'B'; 32],
    }
}

/// The `[[token_keys]]` table of [`key_a`].
fn key_a_table() -> String {
    format!("[[token_keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n")
}

/// `top`: top-level settings; `tables`: extra tables (e.g. `[[token_keys]]`).
fn config_toml(db: &Path, top: &str, tables: &str) -> String {
    common::config_toml(db, &format!("{top}\n{tables}"), &REVIEWERS)
}

fn fixture(top: &str, tables: &str) -> Fixture {
    common::fixture("test.db", |db| config_toml(db, top, tables))
}

/// A service with [`key_a`] signing approval tokens.
fn with_key(top: &str) -> Fixture {
    fixture(top, &key_a_table())
}

/// Creates a review; `extra` fields override the defaults.
async fn create(app: &Router, extra: Value) -> String {
    let fields = common::merged(json!({"caller_groups": ["bots", "team-a"]}), extra);
    common::create_review(app, &[], common::review_request(fields)).await
}

async fn detail(app: &Router, id: &str) -> Value {
    let (s, v) = get_as(app, ALICE, &format!("/api/reviews/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

async fn status_of(app: &Router, id: &str, caller: &str) -> (StatusCode, Value) {
    call(
        app,
        "GET",
        &format!("/v1/reviews/{id}/status?caller={caller}"),
        &[],
        None,
    )
    .await
}

async fn consume(app: &Router, id: &str, caller: &str, body: &str) -> (StatusCode, Value) {
    let req = json!({"caller": caller, "body_sha256": body_hash(body.as_bytes())});
    consume_request(app, id, req).await
}

async fn consume_request(app: &Router, id: &str, req: Value) -> (StatusCode, Value) {
    call(
        app,
        "POST",
        &format!("/v1/reviews/{id}/consume"),
        &[],
        Some(req),
    )
    .await
}

#[tokio::test]
async fn self_approval_is_refused_but_rejection_allowed() {
    let f = fixture("", "");
    for caller in ["dana", "DANA", "ci-dana"] {
        let id = create(&f.app, json!({"caller": caller})).await;
        let (s, v) = decide(&f.app, &id, DANA, "approve", json!({})).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{caller}: {v}");
        assert_error(&v, "self_approval");
        let (s, v) = decide(&f.app, &id, DANA, "edit", json!({"body": {"model": "m"}})).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{caller}: {v}");
        assert_error(&v, "self_approval");
        // Still pending, nothing recorded.
        let d = detail(&f.app, &id).await;
        assert_eq!(d["status"], "pending");
        assert_eq!(d["approvals"], json!([]));
        assert_eq!(d["edited_body"], Value::Null);
        // Someone else may approve it.
        let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({})).await;
        assert_eq!(
            (s, &v["status"]),
            (StatusCode::OK, &json!("approved")),
            "{v}"
        );
    }
    // The caller's own reviewer may reject their request.
    let id = create(&f.app, json!({"caller": "ci-dana"})).await;
    let (s, v) = decide(
        &f.app,
        &id,
        DANA,
        "reject",
        json!({"reason": "not mine to send"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "rejected");
    assert_eq!(v["reviewer"], "dana");
}

#[tokio::test]
async fn a_reviewer_taken_out_of_the_approver_group_by_a_reload_cannot_decide() {
    let f = fixture("", "");
    let id = create(&f.app, json!({"approver_group": "security"})).await;
    // carol leaves `security` (the file is edited and reloaded; her token stays).
    let reviewers: Vec<_> = REVIEWERS
        .iter()
        .map(|&(name, token, more)| (name, token, if name == "carol" { "" } else { more }))
        .collect();
    let reloaded = Config::from_toml_str(&common::config_toml(&f.db, "", &reviewers)).unwrap();
    f.state.reload_reviewers(reloaded);
    for action in ["approve", "reject"] {
        let (s, v) = decide(&f.app, &id, CAROL, action, json!({"reason": "r"})).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{action}: {v}");
        assert_error(&v, "not_in_approver_group");
    }
    assert_eq!(detail(&f.app, &id).await["status"], "pending");
    // Those still in the group can.
    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn approver_group_restricts_every_decision() {
    let f = fixture("", "");
    let id = create(&f.app, json!({"approver_group": "security"})).await;
    for action in ["approve", "reject"] {
        let (s, v) = decide(&f.app, &id, BOB, action, json!({"reason": "r"})).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{action}: {v}");
        assert_error(&v, "not_in_approver_group");
    }
    let (s, v) = decide(&f.app, &id, BOB, "edit", json!({"body": {"model": "m"}})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_error(&v, "not_in_approver_group");
    let d = detail(&f.app, &id).await;
    assert_eq!(d["approver_group"], "security");
    assert_eq!(d["caller_groups"], json!(["bots", "team-a"]));
    assert_eq!(d["status"], "pending");
    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "approved");
}

#[tokio::test]
async fn two_person_rule() {
    let f = fixture("", "");
    let id = create(&f.app, json!({"required_approvals": 2})).await;
    let waiter = spawn_wait(&f.app, &id, 10000);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let (s, v) = decide(
        &f.app,
        &id,
        ALICE,
        "approve",
        json!({"reason": "looks fine"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "pending");
    assert_eq!(v["required_approvals"], 2);
    assert_eq!(v["approval_count"], 1);
    assert_eq!(v["approvals"][0]["reviewer"], "alice");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "the filter keeps waiting after one approval"
    );

    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "already_approved");
    // Editing does not let one reviewer count twice either: the edit
    // discards the earlier approval, so the count stays at one.
    let (s, v) = decide(&f.app, &id, ALICE, "edit", json!({"body": BODY})).await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "an edit to the same body is a plain approval: {v}"
    );
    assert_error(&v, "already_approved");

    let (s, v) = decide(&f.app, &id, BOB, "approve", json!({"reason": "ok"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "approved");
    assert_eq!(v["reviewer"], "bob");
    assert_eq!(v["reason"], "alice: looks fine; bob: ok");
    assert_eq!(v["approval_count"], 2);
    let names: Vec<&str> = v["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["reviewer"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob"]);

    let (s, w) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(w["status"], "approved");
    assert_eq!(w["reviewer"], "bob");

    // A third approval is a conflict on a decided review.
    let (s, v) = decide(&f.app, &id, CAROL, "approve", json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "conflict");

    // A rejection by one reviewer ends a quorum review at once.
    let id = create(&f.app, json!({"required_approvals": 3})).await;
    let (s, _) = decide(&f.app, &id, ALICE, "approve", json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = decide(&f.app, &id, BOB, "reject", json!({"reason": "no"})).await;
    assert_eq!(
        (s, &v["status"]),
        (StatusCode::OK, &json!("rejected")),
        "{v}"
    );
}

#[tokio::test]
async fn quorum_counts_exclude_the_caller() {
    let f = fixture("", "");
    // dana sent it: only alice and carol of the security group may approve.
    let id = create(
        &f.app,
        json!({"caller": "ci-dana", "required_approvals": 2, "approver_group": "security"}),
    )
    .await;
    let (s, _) = decide(&f.app, &id, ALICE, "approve", json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = decide(&f.app, &id, DANA, "approve", json!({})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = decide(&f.app, &id, CAROL, "approve", json!({})).await;
    assert_eq!(
        (s, &v["status"]),
        (StatusCode::OK, &json!("approved")),
        "{v}"
    );
}

#[tokio::test]
async fn edit_discards_earlier_approvals() {
    let f = fixture("", "");
    let id = create(&f.app, json!({"required_approvals": 2})).await;
    let (s, _) = decide(&f.app, &id, ALICE, "approve", json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = decide(
        &f.app,
        &id,
        BOB,
        "edit",
        json!({"body": "{\"model\": \"small\", \"messages\": [{\"role\":\"user\",\"content\":\"hi\"}]}", "reason": "smaller"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "pending", "alice approved another body: {v}");
    assert_eq!(v["approval_count"], 1);
    assert_eq!(
        v["edited_body"],
        "{\"model\":\"small\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
    );
    assert_eq!(v["approvals"][0]["reviewer"], "alice");
    assert!(v["approvals"][0]["superseded_at_ms"].is_u64(), "{v}");
    assert_eq!(v["approvals"][1]["reviewer"], "bob");
    assert_eq!(v["approvals"][1]["edited"], true);
    assert_eq!(v["approvals"][1]["superseded_at_ms"], Value::Null);
    // The filter still waits.
    let (_, w) = wait(&f.app, &id, None).await;
    assert_eq!(w["status"], "pending");

    // An approval that does not say it saw the edit does not release it.
    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({"reason": "edit ok"})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "edit_not_shown");
    // alice approves the edited body now, having read it.
    let (s, v) = decide(
        &f.app,
        &id,
        ALICE,
        "approve",
        json!({"reason": "edit ok", "edits_seen": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "approved");
    assert_eq!(v["reason"], "bob: smaller; alice: edit ok");
    assert_eq!(v["approvals"].as_array().unwrap().len(), 3);
    let (_, w) = wait(&f.app, &id, None).await;
    assert_eq!(
        w["edited_body"],
        "{\"model\":\"small\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
    );
    assert_eq!(w["reviewer"], "alice");
}

/// An approval that says how many edits its approver was shown
/// (`edits_seen`, as the web UI always does) approves nothing when the
/// review holds another number: an edit came after the approver read it.
#[tokio::test]
async fn an_approval_that_saw_fewer_edits_is_refused() {
    let f = fixture("", "");
    let id = create(&f.app, json!({"required_approvals": 2})).await;
    let edited = "{\"model\": \"small\", \"messages\": [{\"role\":\"user\",\"content\":\"hi\"}]}";
    let (s, v) = decide(&f.app, &id, BOB, "edit", json!({"body": edited})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // alice read the review before bob's edit.
    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({"edits_seen": 0})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "edit_not_shown");
    let (_, v) = get_as(&f.app, ALICE, &format!("/api/reviews/{id}")).await;
    assert_eq!(
        (&v["status"], &v["approval_count"]),
        (&json!("pending"), &json!(1))
    );
    // Read again, she approves the edit she has seen.
    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({"edits_seen": 1})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "approved");
}

#[tokio::test]
async fn list_shows_quorum_fields() {
    let f = fixture("", "");
    let id = create(
        &f.app,
        json!({"required_approvals": 2, "approver_group": "security", "async_review": true}),
    )
    .await;
    decide(&f.app, &id, ALICE, "approve", json!({})).await;
    let (s, v) = get_as(&f.app, ALICE, "/api/reviews").await;
    assert_eq!(s, StatusCode::OK);
    let r = &v["reviews"][0];
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["required_approvals"], 2);
    assert_eq!(r["approval_count"], 1);
    assert_eq!(r["approver_group"], "security");
    assert_eq!(r["async_review"], true);
    assert_eq!(r["caller_groups"], json!(["bots", "team-a"]));
}

#[tokio::test]
async fn status_is_only_for_the_caller_and_carries_a_verifiable_token() {
    let f = with_key("");
    let id = create(
        &f.app,
        json!({"async_review": true, "route": "chat", "authority": "llm.internal"}),
    )
    .await;
    let at = |path| Destination {
        path,
        route: "chat",
        authority: "llm.internal",
    };
    for other in ["svc-b", "SVC-A", ""] {
        let (s, v) = status_of(&f.app, &id, other).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{other}: {v}");
    }
    let (s, _) = call(
        &f.app,
        "GET",
        &format!("/v1/reviews/{id}/status"),
        &[],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = status_of(&f.app, "rev_unknown", "svc-a").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, v) = status_of(&f.app, &id, "svc-a").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "pending");
    assert_eq!(v["approval_token"], Value::Null);
    assert_eq!(v["approved_body"], Value::Null);

    let (s, _) = decide(&f.app, &id, ALICE, "approve", json!({"reason": "fine"})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = status_of(&f.app, &id, "svc-a").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["status"], "approved");
    assert_eq!(v["reason"], "fine");
    assert_eq!(v["approvers"], json!(["alice"]));
    assert_eq!(v["approved_body"], BODY);
    let token = v["approval_token"].as_str().unwrap();
    let exp = v["token_expires_at_ms"].as_u64().unwrap();
    let decided = detail(&f.app, &id).await["decided_at_ms"].as_u64().unwrap();
    assert_eq!(exp, decided + 3_600_000);
    let now = countersign_approval::now_ms();
    let claims = verify(
        token,
        &[key_a()],
        "svc-a",
        &at(CHAT_PATH),
        BODY.as_bytes(),
        now,
    )
    .unwrap();
    assert_eq!(claims.rid, id);
    assert_eq!(
        verify(
            token,
            &[key_a()],
            "svc-a",
            &at(CHAT_PATH),
            b"{\"model\":\"other\"}",
            now
        ),
        Err(TokenError::WrongBody)
    );
    assert_eq!(
        verify(
            token,
            &[key_a()],
            "svc-b",
            &at(CHAT_PATH),
            BODY.as_bytes(),
            now
        ),
        Err(TokenError::WrongCaller)
    );
    // Bound to the path of the request the review was for.
    assert_eq!(
        verify(
            token,
            &[key_a()],
            "svc-a",
            &at("/api/chat"),
            BODY.as_bytes(),
            now
        ),
        Err(TokenError::WrongPath)
    );
    // And to its route and host: another route, where rules may ask more.
    for other in [
        Destination {
            route: "prod",
            ..at(CHAT_PATH)
        },
        Destination {
            authority: "other.internal",
            ..at(CHAT_PATH)
        },
        to(CHAT_PATH),
    ] {
        assert_eq!(
            verify(token, &[key_a()], "svc-a", &other, BODY.as_bytes(), now),
            Err(TokenError::WrongRoute),
            "{other:?}"
        );
    }
    assert_eq!(
        verify(
            token,
            &[key_a()],
            "svc-a",
            &at(CHAT_PATH),
            BODY.as_bytes(),
            exp
        ),
        Err(TokenError::Expired)
    );
    // Deterministic: the same token every time.
    let (_, again) = status_of(&f.app, &id, "svc-a").await;
    assert_eq!(again["approval_token"], token);

    // A synchronous review (the caller already got its answer) has no token.
    let sync_id = create(&f.app, json!({})).await;
    decide(&f.app, &sync_id, ALICE, "approve", json!({})).await;
    let (s, v) = status_of(&f.app, &sync_id, "svc-a").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "approved");
    assert_eq!(v["approval_token"], Value::Null);
    let (s, _) = consume(&f.app, &sync_id, "svc-a", BODY).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A rejection shows its reason and no body.
    let rej = create(&f.app, json!({"async_review": true})).await;
    decide(&f.app, &rej, BOB, "reject", json!({"reason": "nope"})).await;
    let (_, v) = status_of(&f.app, &rej, "svc-a").await;
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("rejected"), Some("nope"))
    );
    assert_eq!(v["approved_body"], Value::Null);
    assert_eq!(v["approval_token"], Value::Null);
}

#[tokio::test]
async fn no_keys_no_token() {
    let f = fixture("", "");
    let id = create(&f.app, json!({"async_review": true})).await;
    decide(&f.app, &id, ALICE, "approve", json!({})).await;
    let (s, v) = status_of(&f.app, &id, "svc-a").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["approved_body"], BODY);
    assert_eq!(v["approval_token"], Value::Null);
}

#[tokio::test]
async fn token_covers_the_edited_body() {
    let f = with_key("");
    let id = create(&f.app, json!({"async_review": true})).await;
    let (s, _) = decide(
        &f.app,
        &id,
        ALICE,
        "edit",
        json!({"body": "{\"model\": \"small\", \"messages\": [{\"role\":\"user\",\"content\":\"hi\"}]}"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = status_of(&f.app, &id, "svc-a").await;
    let edited = "{\"model\":\"small\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    assert_eq!(v["approved_body"], edited);
    let token = v["approval_token"].as_str().unwrap();
    let now = countersign_approval::now_ms();
    assert!(verify(
        token,
        &[key_a()],
        "svc-a",
        &to(CHAT_PATH),
        edited.as_bytes(),
        now
    )
    .is_ok());
    assert_eq!(
        verify(
            token,
            &[key_a()],
            "svc-a",
            &to(CHAT_PATH),
            BODY.as_bytes(),
            now
        ),
        Err(TokenError::WrongBody)
    );
    // Consumption follows the same body.
    let (s, _) = consume(&f.app, &id, "svc-a", BODY).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = consume(&f.app, &id, "svc-a", edited).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn consume_is_single_use() {
    let f = with_key("");
    let id = create(&f.app, json!({"async_review": true})).await;
    // Not approved yet.
    let (s, _) = consume(&f.app, &id, "svc-a", BODY).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    decide(&f.app, &id, ALICE, "approve", json!({})).await;
    // Another caller, no caller, another body, another review.
    for (id, caller, body) in [
        (id.as_str(), "svc-b", BODY),
        (&id, "", BODY),
        (&id, "svc-a", "{\"model\":\"other\"}"),
        ("rev_unknown", "svc-a", BODY),
    ] {
        let (s, v) = consume(&f.app, id, caller, body).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{id} {caller:?} {body}: {v}");
    }
    let (s, v) = call(
        &f.app,
        "POST",
        &format!("/v1/reviews/{id}/consume"),
        &[],
        Some(json!({"caller": "svc-a"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    let (s, v) = consume(&f.app, &id, "svc-a", BODY).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"id": id, "uses": 1}));
    let (s, v) = consume(&f.app, &id, "svc-a", BODY).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "conflict");
    assert_eq!(detail(&f.app, &id).await["token_uses"], 1);
}

/// [`consume`] with the filter's idempotency key.
async fn consume_keyed(
    app: &Router,
    id: &str,
    caller: &str,
    body: &str,
    key: &str,
) -> (StatusCode, Value) {
    let req = json!({"caller": caller, "body_sha256": body_hash(body.as_bytes()),
                     "idempotency_key": key});
    consume_request(app, id, req).await
}

#[tokio::test]
async fn a_repeated_consume_with_its_key_answers_the_same_use_without_spending_another() {
    let f = with_key("token_max_uses = 2");
    let id = create(&f.app, json!({"async_review": true})).await;
    decide(&f.app, &id, ALICE, "approve", json!({})).await;
    // The first answer is lost; the filter asks again with the same key.
    for _ in 0..3 {
        let (s, v) = consume_keyed(&f.app, &id, "svc-a", BODY, "req-1:01:consume").await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v, json!({"id": id, "uses": 1}));
    }
    assert_eq!(detail(&f.app, &id).await["token_uses"], 1);
    // The key is no pass: another caller or another body is still refused.
    let (s, v) = consume_keyed(&f.app, &id, "svc-b", BODY, "req-1:01:consume").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = consume_keyed(&f.app, &id, "svc-a", "{}", "req-1:01:consume").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    // Another request spends the second use; after that, a third request
    // (another key) is a replay, while each spent key still gets its answer.
    let (s, v) = consume_keyed(&f.app, &id, "svc-a", BODY, "req-2:02:consume").await;
    assert_eq!((s, v["uses"].clone()), (StatusCode::OK, json!(2)), "{v}");
    let (s, v) = consume_keyed(&f.app, &id, "svc-a", BODY, "req-3:03:consume").await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = consume(&f.app, &id, "svc-a", BODY).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    for (key, uses) in [("req-1:01:consume", 1), ("req-2:02:consume", 2)] {
        let (s, v) = consume_keyed(&f.app, &id, "svc-a", BODY, key).await;
        assert_eq!((s, v["uses"].clone()), (StatusCode::OK, json!(uses)), "{v}");
    }
    assert_eq!(detail(&f.app, &id).await["token_uses"], 2);
}

#[tokio::test]
async fn concurrent_consumes_with_one_key_spend_one_use() {
    let f = with_key("token_max_uses = 3");
    let id = create(&f.app, json!({"async_review": true})).await;
    decide(&f.app, &id, ALICE, "approve", json!({})).await;
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (app, id) = (f.app.clone(), id.clone());
            tokio::spawn(async move {
                consume_keyed(&app, &id, "svc-a", BODY, "req-9:09:consume").await
            })
        })
        .collect();
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert_eq!((s, v["uses"].clone()), (StatusCode::OK, json!(1)), "{v}");
    }
    assert_eq!(detail(&f.app, &id).await["token_uses"], 1);
}

#[tokio::test]
async fn concurrent_consumes_spend_each_use_once() {
    let f = with_key("token_max_uses = 3");
    let id = create(&f.app, json!({"async_review": true})).await;
    decide(&f.app, &id, ALICE, "approve", json!({})).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let app = f.app.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            consume(&app, &id, "svc-a", BODY).await.0
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 3);
}

#[tokio::test]
async fn n_uses() {
    let f = with_key("token_max_uses = 2");
    let id = create(&f.app, json!({"async_review": true})).await;
    decide(&f.app, &id, ALICE, "approve", json!({})).await;
    for n in 1..=2 {
        let (s, v) = consume(&f.app, &id, "svc-a", BODY).await;
        assert_eq!((s, &v["uses"]), (StatusCode::OK, &json!(n)), "{v}");
    }
    let (s, _) = consume(&f.app, &id, "svc-a", BODY).await;
    assert_eq!(s, StatusCode::CONFLICT);
}

#[tokio::test]
async fn expired_token_cannot_be_consumed() {
    let f = with_key("token_ttl_ms = 1");
    let id = create(&f.app, json!({"async_review": true})).await;
    decide(&f.app, &id, ALICE, "approve", json!({})).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (s, _) = consume(&f.app, &id, "svc-a", BODY).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn key_rotation_signs_with_the_last_key() {
    let tables = format!(
        "{}[[token_keys]]\nid = \"k2\"\nsecret_env = \"COUNTERSIGN_TEST_KEY_B\"\n",
        key_a_table()
    );
    std::env::set_var("COUNTERSIGN_TEST_KEY_B", SECRET_B);
    let f = fixture("", &tables);
    let id = create(&f.app, json!({"async_review": true})).await;
    decide(&f.app, &id, ALICE, "approve", json!({})).await;
    let (_, v) = status_of(&f.app, &id, "svc-a").await;
    let token = v["approval_token"].as_str().unwrap();
    assert!(token.starts_with("cs1.k2."), "{token}");
    let now = countersign_approval::now_ms();
    // The filter lists every key (old and new): verifies.
    assert!(verify(
        token,
        &[key_a(), key_b()],
        "svc-a",
        &to(CHAT_PATH),
        BODY.as_bytes(),
        now
    )
    .is_ok());
    // A filter that does not have the new key yet refuses it: add keys to
    // the filter first.
    assert_eq!(
        verify(
            token,
            &[key_a()],
            "svc-a",
            &to(CHAT_PATH),
            BODY.as_bytes(),
            now
        ),
        Err(TokenError::UnknownKey)
    );
}

#[tokio::test]
async fn filter_token_guards_status_and_consume() {
    let f = fixture(&common::filter_token_setting(), "");
    let request = json!({"request_id": "r", "model": "m", "prompt": [], "async_review": true});
    let id = common::create_review(&f.app, &[FILTER_HEADER], common::review_request(request)).await;
    let status_uri = format!("/v1/reviews/{id}/status?caller=svc-a");
    let consume_uri = format!("/v1/reviews/{id}/consume");
    let body = json!({"caller": "svc-a", "body_sha256": body_hash(BODY.as_bytes())});
    // With the token, consume is authorised but finds no approved review.
    for (headers, status, consumed) in [
        (&[][..], StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED),
        (&[FILTER_HEADER], StatusCode::OK, StatusCode::NOT_FOUND),
    ] {
        let (s, _) = call(&f.app, "GET", &status_uri, headers, None).await;
        assert_eq!(s, status, "{headers:?}");
        let (s, _) = call(&f.app, "POST", &consume_uri, headers, Some(body.clone())).await;
        assert_eq!(s, consumed, "{headers:?}");
    }
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("x.db");
    let cases = [
        ("token_ttl_ms = 0", "", "token_ttl_ms"),
        ("token_ttl_ms = 999999999999", "", "token_ttl_ms"),
        ("token_max_uses = 0", "", "token_max_uses"),
        ("", "[[token_keys]]\nid = \"k 1\"\nsecret = \"QUFB\"", "token_keys[0].id"),
        ("", "[[token_keys]]\nid = \"k1\"\nsecret = \"QUFB\"", "token_keys[0].secret"),
        ("", "[[token_keys]]\nid = \"k1\"\nsecret = \"not base64!\"", "token_keys[0].secret"),
        ("", "[[token_keys]]\nid = \"k1\"", "token_keys[0]"),
        ("", "[[token_keys]]\nid = \"k1\"\nsecret_env = \"COUNTERSIGN_TEST_UNSET_VAR\"", "token_keys[0].secret_env"),
        ("", "[[token_keys]]\nid = \"k1\"\nsecret = \"x\"\nsecrett = \"y\"", "secrett"),
        ("", &format!("[[token_keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n[[token_keys]]\nid = \"k1\"\nsecret = \"{SECRET_B}\""), "token_keys[1].id"),
    ];
    for (top, tables, field) in cases {
        let e = Config::from_toml_str(&config_toml(&db, top, tables))
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{top}{tables}: {e}");
    }
    let e = Config::from_toml_str("[[reviewers]]\nname = \"a\"\ntoken_sha256 = \"2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b\"\ncallers = [\" \"]")
        .unwrap_err()
        .to_string();
    assert!(e.contains("reviewers[0].callers[0]"), "{e}");

    let c = Config::from_toml_str(&config_toml(
        &db,
        "token_ttl_ms = 60000\ntoken_max_uses = 5",
        &key_a_table(),
    ))
    .unwrap();
    assert_eq!((c.token_ttl_ms, c.token_max_uses), (60_000, 5));
    assert_eq!(c.token_keys, vec![key_a()]);
    assert_eq!(c.reviewers[3].callers, vec!["ci-dana".to_string()]);
    let d = Config::default();
    assert_eq!(
        (d.token_ttl_ms, d.token_max_uses, d.token_keys.len()),
        (3_600_000, 1, 0)
    );
}

#[test]
fn sqlite_only_old_database_files_are_migrated() {
    // SQLite files of older releases; PostgreSQL has no older schema.
    common::require_sqlite();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    {
        // The schema of the previous release, with one pending review.
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE reviews (
                 id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at_ms INTEGER NOT NULL,
                 expires_at_ms INTEGER NOT NULL, decided_at_ms INTEGER, reviewer TEXT, reason TEXT,
                 edited_body TEXT, request_id TEXT NOT NULL, api TEXT NOT NULL, method TEXT NOT NULL,
                 path TEXT NOT NULL, authority TEXT NOT NULL, route TEXT, caller TEXT,
                 model TEXT NOT NULL, stream INTEGER NOT NULL, rule TEXT, prompt_json TEXT NOT NULL,
                 preview TEXT NOT NULL, body TEXT NOT NULL, hold_timeout_ms INTEGER NOT NULL);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO reviews VALUES ('rev_old', 'pending', 1, 9999999999999, NULL, NULL, NULL, NULL,
                 'r', 'openai_chat', 'POST', '/v1/chat/completions', '', NULL, 'svc-a', 'm', 0, NULL,
                 '[]', '', ?1, 60000)",
            [BODY],
        )
        .unwrap();
    }
    let text = config_toml(&db, "", "");
    let app = app(common::open_state(&text));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let d = detail(&app, "rev_old").await;
        assert_eq!(d["required_approvals"], 1);
        assert_eq!(d["caller_groups"], json!([]));
        assert_eq!(d["async_review"], false);
        let (s, v) = decide(&app, "rev_old", ALICE, "approve", json!({})).await;
        assert_eq!(
            (s, &v["status"]),
            (StatusCode::OK, &json!("approved")),
            "{v}"
        );
    });
    // Opening again (already migrated) works too.
    common::open_state(&text);
}

#[test]
fn self_approval_check_folds_unicode_case() {
    let reviewer = countersign_approval::approvals::Approver {
        name: "Åsa".into(),
        groups: vec![],
        callers: vec!["CI-Åsa".into()],
        assessor: false,
    };
    assert!(countersign_approval::approvals::is_self(
        &reviewer,
        Some("åsa")
    ));
    assert!(countersign_approval::approvals::is_self(
        &reviewer,
        Some("ci-åsa")
    ));
    assert!(!countersign_approval::approvals::is_self(
        &reviewer,
        Some("asa")
    ));
}

/// A review past its deadline that nothing has marked expired yet (no long
/// poll, no sweep: the fixture runs neither) is expired by the decision
/// itself: approve, edit, a quorum's last approval and a token consumption
/// are each refused, and the review reads `expired` afterwards. Runs on
/// SQLite and, in the PostgreSQL pass, on PostgreSQL.
#[tokio::test]
async fn nothing_approves_a_review_past_its_deadline_before_it_is_marked() {
    let f = with_key("");
    let overdue = |extra: Value| {
        create(
            &f.app,
            common::merged(json!({"hold_timeout_ms": 50}), extra),
        )
    };
    let edited =
        json!({"body": {"model": "gpt-x", "messages": [{"role": "user", "content": "edited"}]}});
    let plain = overdue(json!({})).await;
    let to_edit = overdue(json!({})).await;
    let quorum = overdue(json!({"required_approvals": 2})).await;
    let async_review = overdue(json!({"async_review": true})).await;
    // The first of a quorum's approvals lands in time.
    let (s, v) = decide(&f.app, &quorum, ALICE, "approve", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    tokio::time::sleep(Duration::from_millis(120)).await;

    for (id, who, action, body) in [
        (&plain, ALICE, "approve", json!({})),
        (&to_edit, ALICE, "edit", edited.clone()),
        (&quorum, BOB, "approve", json!({})),
        (&async_review, ALICE, "approve", json!({})),
    ] {
        let (s, v) = decide(&f.app, id, who, action, body).await;
        assert_eq!(s, StatusCode::CONFLICT, "{action} {id}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("expired"),
            "{action} {id}: {v}"
        );
        assert_eq!(detail(&f.app, id).await["status"], "expired", "{id}");
    }
    // The asynchronous caller's token was never issued, and nothing can be
    // spent: the service answers as for any review that is not approved.
    let (s, v) = consume(&f.app, &async_review, "svc-a", BODY).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (_, v) = status_of(&f.app, &async_review, "svc-a").await;
    assert_eq!(v["status"], "expired", "{v}");
    assert!(v.get("approval_token").is_none_or(Value::is_null), "{v}");
}
