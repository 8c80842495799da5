//! Flagged audits: rejecting a spot check's audit marks its caller and rule
//! for follow-up (in the decision's transaction), which the API lists and
//! resolves and the metrics count; other decisions flag nothing.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::common::{self, call, decide_ok, get_as, ALICE, BOB, FILTER_HEADER};
use crate::metrics::{scrape, value};

fn service() -> common::Fixture {
    common::fixture("follow.db", |db| {
        common::config_toml(
            db,
            &common::filter_token_setting(),
            &[("alice", ALICE, ""), ("bob", BOB, "")],
        )
    })
}

async fn create(f: &common::Fixture, request_id: &str, fields: Value) -> String {
    let body = common::review_request(common::merged(
        json!({"request_id": request_id, "rule": "chat-allow", "caller": "svc-ci"}),
        fields,
    ));
    common::create_review(&f.app, &[FILTER_HEADER], body).await
}

async fn open_follow_ups(f: &common::Fixture) -> Value {
    let (status, v) = get_as(&f.app, ALICE, "/api/follow-ups").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

#[tokio::test]
async fn a_flagged_audit_marks_its_caller_and_rule_until_resolved() {
    let f = service();
    let audit = json!({"mode": "audit"});
    let flagged = create(&f, "req-1", audit.clone()).await;
    let fine = create(&f, "req-2", audit.clone()).await;
    let held = create(&f, "req-3", json!({})).await;
    decide_ok(&f.app, &fine, ALICE, "approve", json!({})).await;
    decide_ok(
        &f.app,
        &held,
        ALICE,
        "reject",
        json!({"reason": "not this"}),
    )
    .await;
    assert_eq!(open_follow_ups(&f).await["follow_ups"], json!([]));
    let s = scrape(&f.app).await;
    assert_eq!(value(&s, "countersign_follow_ups_open", &[]), 0.0);

    let reason = json!({"reason": "customer data in a prompt the rule allows"});
    decide_ok(&f.app, &flagged, BOB, "reject", reason).await;
    let v = open_follow_ups(&f).await;
    let list = v["follow_ups"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["review_id"], flagged.as_str());
    assert_eq!(list[0]["caller"], "svc-ci");
    assert_eq!(list[0]["rule"], "chat-allow");
    assert_eq!(list[0]["flagged_by"], "bob");
    assert_eq!(
        list[0]["reason"],
        "customer data in a prompt the rule allows"
    );
    assert_eq!(list[0]["resolved_at_ms"], Value::Null);
    assert_eq!(
        v["targets"],
        json!([{"caller": "svc-ci", "rule": "chat-allow", "open": 1,
                "last_flagged_at_ms": list[0]["flagged_at_ms"]}])
    );
    let s = scrape(&f.app).await;
    let rule = [("rule", "chat-allow")];
    assert_eq!(value(&s, "countersign_audits_flagged_total", &rule), 1.0);
    assert_eq!(value(&s, "countersign_follow_ups_open", &rule), 1.0);

    // Resolved once, by anyone; then it is no longer open.
    let uri = format!("/api/follow-ups/{flagged}/resolve");
    let auth = common::bearer(ALICE);
    let headers = [("authorization", auth.as_str())];
    let note = json!({"note": "rule narrowed to the support model"});
    let (status, v) = call(&f.app, "POST", &uri, &headers, Some(note.clone())).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["resolved_by"], "alice");
    assert_eq!(v["resolution"], "rule narrowed to the support model");
    let (status, v) = call(&f.app, "POST", &uri, &headers, Some(note)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let uri = format!("/api/follow-ups/{held}/resolve");
    let (status, v) = call(&f.app, "POST", &uri, &headers, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(open_follow_ups(&f).await["follow_ups"], json!([]));
    let (_, all) = get_as(&f.app, ALICE, "/api/follow-ups?status=all").await;
    assert_eq!(all["follow_ups"].as_array().unwrap().len(), 1, "{all}");
    let s = scrape(&f.app).await;
    assert_eq!(value(&s, "countersign_audits_flagged_total", &rule), 1.0);
    assert_eq!(value(&s, "countersign_follow_ups_open", &rule), 0.0);
}

#[tokio::test]
async fn follow_ups_need_a_reviewer_and_a_known_status() {
    let f = service();
    let (status, _) = call(&f.app, "GET", "/api/follow-ups", &[], None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, v) = get_as(&f.app, ALICE, "/api/follow-ups?status=closed").await;
    common::assert_bad_request(status, &v, "status");
}

/// A flag on an audit of one's own request (as its caller, or a caller one
/// sends as) is not one's own to close: resolving it would hide the
/// finding about oneself. Resolving follows the decision's rules: not by
/// the caller, and only by the audit's approver group.
#[tokio::test]
async fn a_flag_on_ones_own_request_is_resolved_by_someone_else() {
    let f = common::fixture("follow-own.db", |db| {
        common::config_toml(
            db,
            &common::filter_token_setting(),
            &[
                ("alice", ALICE, "groups = [\"security\"]"),
                ("bob", BOB, "groups = [\"security\"]"),
                (
                    "dana",
                    common::DANA,
                    "groups = [\"security\"]\ncallers = [\"svc-ci\"]",
                ),
                ("carol", common::CAROL, ""),
            ],
        )
    });
    let flagged = create(
        &f,
        "req-own",
        json!({"mode": "audit", "approver_group": "security"}),
    )
    .await;
    let reason = json!({"reason": "customer data in a prompt the rule allows"});
    decide_ok(&f.app, &flagged, BOB, "reject", reason).await;
    let uri = format!("/api/follow-ups/{flagged}/resolve");
    let resolve = |token: &'static str| {
        let app = f.app.clone();
        let uri = uri.clone();
        async move {
            let auth = common::bearer(token);
            call(
                &app,
                "POST",
                &uri,
                &[("authorization", auth.as_str())],
                Some(json!({"note": "nothing to see"})),
            )
            .await
        }
    };
    let (status, v) = resolve(common::DANA).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "self_approval", "{v}");
    let (status, v) = resolve(common::CAROL).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "not_in_approver_group", "{v}");
    assert_eq!(
        open_follow_ups(&f).await["follow_ups"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (status, v) = resolve(ALICE).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["resolved_by"], "alice");
}
