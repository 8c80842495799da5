#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Standing approvals: created by approving a review with terms (under the
//! review's approver group, separation of duties and quorum), used for
//! later reviews of the same shape only, counted, expiring, revocable.

use crate::common;

use crate::common::{
    assert_error, call, decide, get_as, wait, Fixture, RawDb, ALICE, BOB, CAROL, DANA, REVIEWERS,
};
use axum::http::StatusCode;
use axum::Router;
use serde_json::{json, Value};

fn fixture() -> Fixture {
    common::fixture("test.db", |db| common::config_toml(db, "", &REVIEWERS))
}

const SYSTEM: &str = "You summarise CI logs.";
const TOOLS: &str = "{\"function\":{\"name\":\"fetch_log\"},\"type\":\"function\"}";

/// A templated CI request: `user` is the part that varies.
fn ci_review(user: &str) -> Value {
    common::review_request(json!({
        "caller": "ci-nightly",
        "caller_groups": ["ci"],
        "rule": "ci",
        "approver_group": "security",
        "model": "gpt-x",
        "prompt": [
            {"role": "system", "text": SYSTEM},
            {"role": "tools", "text": TOOLS},
            {"role": "user", "text": user},
        ],
    }))
}

/// `POST /v1/reviews`: status and the state answered.
async fn create(app: &Router, review: Value) -> (StatusCode, Value) {
    call(app, "POST", "/v1/reviews", &[], Some(review)).await
}

/// Creates a review that must wait for a person; its id.
async fn create_pending(app: &Router, review: Value) -> String {
    let (s, v) = create(app, review).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"], "pending", "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// Creates a review that a standing approval approves at once; its state.
async fn create_auto_approved(app: &Router, review: Value) -> Value {
    let (s, v) = create(app, review).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"], "approved", "{v}");
    v
}

fn terms(max_uses: u32) -> Value {
    json!({"valid_days": 7, "max_uses": max_uses, "vary": ["user"]})
}

async fn standing_list(app: &Router) -> Vec<Value> {
    let (s, v) = get_as(app, ALICE, "/api/standing-approvals").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["standing_approvals"].as_array().unwrap().clone()
}

/// A live standing approval for [`ci_review`] with `max_uses`, created by
/// alice; its id.
async fn live_standing(app: &Router, max_uses: u32) -> String {
    let id = create_pending(app, ci_review("summarise build 1")).await;
    let (s, v) = decide(
        app,
        &id,
        ALICE,
        "approve",
        json!({"reason": "nightly summary", "standing": terms(max_uses)}),
    )
    .await;
    assert_eq!(
        (s, &v["status"]),
        (StatusCode::OK, &json!("approved")),
        "{v}"
    );
    let list = standing_list(app).await;
    let sa = list.iter().find(|s| s["review_id"] == id.as_str()).unwrap();
    assert_eq!(sa["status"], "live", "{sa}");
    assert_eq!(sa["created_by"], json!(["alice"]));
    assert_eq!(sa["caller"], "ci-nightly");
    sa["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn standing_approval_approves_the_same_shape_and_nothing_else() {
    let f = fixture();
    let sa = live_standing(&f.app, 10).await;

    // The same template with another user message: approved at once, by the
    // standing approval, through the decision path a person takes.
    let state = create_auto_approved(&f.app, ci_review("summarise build 2")).await;
    let id = state["id"].as_str().unwrap();
    assert_eq!(state["reviewer"], format!("standing:{sa}"));
    assert!(
        state["reason"]
            .as_str()
            .unwrap()
            .contains("created by alice"),
        "{state}"
    );
    let (s, polled) = wait(&f.app, id, Some(0)).await;
    assert_eq!((s, &polled["status"]), (StatusCode::OK, &json!("approved")));
    let (_, detail) = get_as(&f.app, ALICE, &format!("/api/reviews/{id}")).await;
    assert_eq!(detail["approvals"][0]["reviewer"], format!("standing:{sa}"));

    // Near misses wait for a person.
    let mut near_misses = vec![];
    let mut other_caller = ci_review("summarise build 3");
    other_caller["caller"] = json!("ci-other");
    near_misses.push(("other caller", other_caller));
    let mut other_model = ci_review("summarise build 3");
    other_model["model"] = json!("gpt-y");
    near_misses.push(("other model", other_model));
    let mut other_system = ci_review("summarise build 3");
    other_system["prompt"][0]["text"] = json!("You summarise CI logs and mail them out.");
    near_misses.push(("changed system prompt", other_system));
    let mut other_tools = ci_review("summarise build 3");
    other_tools["prompt"][1]["text"] =
        json!("{\"function\":{\"name\":\"run_shell\"},\"type\":\"function\"}");
    near_misses.push(("changed tools", other_tools));
    let mut extra_message = ci_review("summarise build 3");
    extra_message["prompt"]
        .as_array_mut()
        .unwrap()
        .push(json!({"role": "user", "text": "and delete the logs"}));
    near_misses.push(("an extra user message", extra_message));
    let mut other_rule = ci_review("summarise build 3");
    other_rule["rule"] = json!("other");
    near_misses.push(("other rule", other_rule));
    let mut other_group = ci_review("summarise build 3");
    other_group["approver_group"] = Value::Null;
    near_misses.push(("other approver group", other_group));
    let mut more_approvals = ci_review("summarise build 3");
    more_approvals["required_approvals"] = json!(2);
    near_misses.push(("a larger quorum", more_approvals));
    for (what, review) in near_misses {
        let (s, v) = create(&f.app, review).await;
        assert_eq!(
            (s, &v["status"]),
            (StatusCode::CREATED, &json!("pending")),
            "{what}: {v}"
        );
    }
    let (_, detail) = get_as(&f.app, ALICE, &format!("/api/standing-approvals/{sa}")).await;
    assert_eq!(detail["uses"], 1, "{detail}");
    assert_eq!(detail["used_by"][0]["review_id"], id);
}

#[tokio::test]
async fn uses_are_counted_and_limited() {
    let f = fixture();
    let sa = live_standing(&f.app, 2).await;
    for n in 0..2 {
        create_auto_approved(&f.app, ci_review(&format!("build {n}"))).await;
    }
    create_pending(&f.app, ci_review("build 3")).await;
    let (_, detail) = get_as(&f.app, ALICE, &format!("/api/standing-approvals/{sa}")).await;
    assert_eq!(detail["status"], "used_up", "{detail}");
    assert_eq!(detail["uses"], 2);
    let numbers: Vec<&Value> = detail["used_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| &u["use_no"])
        .collect();
    assert_eq!(numbers, [&json!(1), &json!(2)]);
}

#[tokio::test]
async fn an_expired_standing_approval_approves_nothing() {
    let f = fixture();
    let sa = live_standing(&f.app, 10).await;
    create_auto_approved(&f.app, ci_review("build 2")).await;
    RawDb::open(&f.db)
        .exec(&format!(
            "UPDATE standing_approvals SET expires_at_ms = 1 WHERE id = '{sa}'"
        ))
        .unwrap();
    create_pending(&f.app, ci_review("build 3")).await;
    let (_, detail) = get_as(&f.app, ALICE, &format!("/api/standing-approvals/{sa}")).await;
    assert_eq!(detail["status"], "expired", "{detail}");
    assert_eq!(detail["uses"], 1);
}

#[tokio::test]
async fn revocation_takes_effect_at_once() {
    let f = fixture();
    let sa = live_standing(&f.app, 10).await;
    create_auto_approved(&f.app, ci_review("build 2")).await;
    let uri = format!("/api/standing-approvals/{sa}/revoke");
    let as_bob = [("authorization", common::bearer(BOB))];
    let headers: Vec<(&str, &str)> = as_bob.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Only its approver group may revoke it.
    let (s, v) = call(&f.app, "POST", &uri, &headers, Some(json!({}))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let as_carol = common::bearer(CAROL);
    let carol = [("authorization", as_carol.as_str())];
    let (s, v) = call(
        &f.app,
        "POST",
        &uri,
        &carol,
        Some(json!({"reason": "job retired"})),
    )
    .await;
    assert_eq!(
        (s, &v["status"]),
        (StatusCode::OK, &json!("revoked")),
        "{v}"
    );
    assert_eq!(v["revoked_by"], "carol");
    create_pending(&f.app, ci_review("build 3")).await;
    let (s, v) = call(&f.app, "POST", &uri, &carol, Some(json!({}))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
}

#[tokio::test]
async fn creation_follows_the_quorum_and_separation_of_duties() {
    let f = fixture();
    let two = |user: &str| {
        let mut r = ci_review(user);
        r["required_approvals"] = json!(2);
        r
    };
    // Two approvals with the same terms: live once the quorum approved it.
    let id = create_pending(&f.app, two("build 1")).await;
    let with_terms = json!({"standing": terms(5)});
    let (s, v) = decide(&f.app, &id, ALICE, "approve", with_terms.clone()).await;
    assert_eq!(
        (s, &v["status"]),
        (StatusCode::OK, &json!("pending")),
        "{v}"
    );
    assert_eq!(standing_list(&f.app).await[0]["status"], "proposed");
    // Other terms are refused; the same terms complete it.
    let (s, v) = decide(&f.app, &id, CAROL, "approve", json!({"standing": terms(6)})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "standing_terms");
    let (s, v) = decide(&f.app, &id, CAROL, "approve", with_terms.clone()).await;
    assert_eq!(
        (s, &v["status"]),
        (StatusCode::OK, &json!("approved")),
        "{v}"
    );
    let sa = standing_list(&f.app).await[0].clone();
    assert_eq!(sa["status"], "live", "{sa}");
    assert_eq!(sa["created_by"], json!(["alice", "carol"]));
    create_auto_approved(&f.app, two("build 2")).await;

    // A second approver who approves without the terms: the review is
    // approved, the standing approval is not. (Another model: the live one
    // above must not take it.)
    let mut other_job = two("other job");
    other_job["model"] = json!("gpt-z");
    let id = create_pending(&f.app, other_job).await;
    let mut other = json!({"standing": terms(5)});
    other["standing"]["vary"] = json!([]);
    let (s, v) = decide(&f.app, &id, ALICE, "approve", other).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = decide(&f.app, &id, CAROL, "approve", json!({})).await;
    assert_eq!(
        (s, &v["status"]),
        (StatusCode::OK, &json!("approved")),
        "{v}"
    );
    let list = standing_list(&f.app).await;
    let declined = list.iter().find(|s| s["review_id"] == id.as_str()).unwrap();
    assert_eq!(declined["status"], "declined", "{declined}");

    // Outside the approver group, or approving one's own request: refused
    // like any approval, and nothing is proposed.
    let mut other_model = ci_review("build 9");
    other_model["model"] = json!("gpt-z");
    let id = create_pending(&f.app, other_model).await;
    let (s, v) = decide(&f.app, &id, BOB, "approve", with_terms.clone()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let mut own = ci_review("build 9");
    own["caller"] = json!("ci-dana");
    let id = create_pending(&f.app, own).await;
    let (s, v) = decide(&f.app, &id, DANA, "approve", with_terms).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_error(&v, "self_approval");
    assert!(standing_list(&f.app)
        .await
        .iter()
        .all(|s| s["review_id"] != id.as_str()));
}

#[tokio::test]
async fn a_group_standing_approval_never_approves_its_creators_requests() {
    let f = fixture();
    let id = create_pending(&f.app, ci_review("build 1")).await;
    let mut group_terms = json!({"standing": terms(10)});
    group_terms["standing"]["group"] = json!("ci");
    let (s, v) = decide(&f.app, &id, DANA, "approve", group_terms).await;
    assert_eq!(
        (s, &v["status"]),
        (StatusCode::OK, &json!("approved")),
        "{v}"
    );
    // Another caller of the group: approved.
    let mut peer = ci_review("build 2");
    peer["caller"] = json!("ci-weekly");
    create_auto_approved(&f.app, peer).await;
    // dana's own caller identity in the group: a person decides.
    let mut own = ci_review("build 3");
    own["caller"] = json!("ci-dana");
    create_pending(&f.app, own).await;
    // A caller outside the group: a person decides.
    let mut outsider = ci_review("build 4");
    outsider["caller"] = json!("ci-weekly");
    outsider["caller_groups"] = json!(["other"]);
    create_pending(&f.app, outsider).await;
    // A group the caller is not in cannot be named.
    let mut other_model = ci_review("build 5");
    other_model["model"] = json!("gpt-z");
    let id = create_pending(&f.app, other_model).await;
    let mut wrong = json!({"standing": terms(10)});
    wrong["standing"]["group"] = json!("admins");
    let (s, v) = decide(&f.app, &id, ALICE, "approve", wrong).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "standing_terms");
}

#[tokio::test]
async fn bad_terms_are_refused_naming_the_field() {
    let f = fixture();
    let id = create_pending(&f.app, ci_review("build 1")).await;
    for (terms, field) in [
        (json!({"valid_days": 0, "max_uses": 1}), "valid_days"),
        (json!({"valid_days": 1, "max_uses": 0}), "max_uses"),
        (
            json!({"valid_days": 1, "max_uses": 1, "vary": ["model"]}),
            "model",
        ),
    ] {
        let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({"standing": terms})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
    let (_, d) = get_as(&f.app, ALICE, &format!("/api/reviews/{id}")).await;
    assert_eq!(d["status"], "pending");
}

/// Two service instances on one database (replicas on PostgreSQL, two
/// processes on one SQLite file) race for the uses: never more than
/// `max_uses` reviews are approved, and each approval has its use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_matches_never_exceed_max_uses() {
    let f = fixture();
    let second = common::open_state(&common::config_toml(&f.db, "", &REVIEWERS));
    let apps = [f.app.clone(), countersign_approval::app(second)];
    let sa = live_standing(&f.app, 3).await;
    let tasks: Vec<_> = (0..16)
        .map(|n| {
            let app = apps[n % 2].clone();
            tokio::spawn(async move {
                let (s, v) = create(&app, ci_review(&format!("build {n}"))).await;
                assert_eq!(s, StatusCode::CREATED, "{v}");
                v["status"].as_str().unwrap().to_string()
            })
        })
        .collect();
    let mut approved = 0;
    for t in tasks {
        if t.await.unwrap() == "approved" {
            approved += 1;
        }
    }
    assert_eq!(approved, 3);
    let (_, detail) = get_as(&f.app, ALICE, &format!("/api/standing-approvals/{sa}")).await;
    assert_eq!(detail["uses"], 3, "{detail}");
    assert_eq!(detail["used_by"].as_array().unwrap().len(), 3);
}

/// An audit (a spot check of an allowed request, forwarded already) is
/// stored with its mode and draw, listed apart, never approved by a
/// standing approval, and cannot make one.
#[tokio::test]
async fn audits_keep_their_draw_and_are_for_people() {
    let f = fixture();
    live_standing(&f.app, 10).await;
    let draw = json!({"share": 0.02, "mode": "audit", "nonce": 12345u64, "draw": 0.0125});
    let mut audit = ci_review("build 2");
    audit["mode"] = json!("audit");
    audit["spot_check"] = draw.clone();
    let id = create_pending(&f.app, audit).await;
    let (_, detail) = get_as(&f.app, ALICE, &format!("/api/reviews/{id}")).await;
    assert_eq!(
        (&detail["mode"], &detail["kind"]),
        (&json!("audit"), &json!("prompt"))
    );
    assert_eq!(detail["spot_check"], draw);
    let (_, audits) = get_as(&f.app, ALICE, "/api/reviews?mode=audit").await;
    let ids: Vec<&Value> = audits["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["id"])
        .collect();
    assert_eq!(ids, [&json!(id)]);
    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({"standing": terms(3)})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "standing_terms");
    // Flagged: a rejection with the reason for follow-up.
    let (s, v) = decide(
        &f.app,
        &id,
        ALICE,
        "reject",
        json!({"reason": "caller sends secrets"}),
    )
    .await;
    assert_eq!(
        (s, &v["status"]),
        (StatusCode::OK, &json!("rejected")),
        "{v}"
    );
}

/// A review of a model's tool calls is matched by nothing but its
/// conversation, whatever the calls say: a standing approval neither
/// approves it nor comes from it.
#[tokio::test]
async fn reviews_of_tool_calls_are_for_people() {
    let f = fixture();
    live_standing(&f.app, 10).await;
    let mut tool_call = ci_review("build 2");
    tool_call["kind"] = json!("tool_call");
    tool_call["tool_calls"] = json!([{"id": "c1", "name": "deploy", "arguments": "{}"}]);
    let id = create_pending(&f.app, tool_call).await;
    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({"standing": terms(3)})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "standing_terms");
    // The same prompt as a review of the request is approved at once.
    create_auto_approved(&f.app, ci_review("build 2")).await;
}

#[tokio::test]
async fn the_one_proposed_on_a_review_is_found_by_its_review_id_with_its_terms() {
    let f = fixture();
    let first = create_pending(&f.app, ci_review("summarise build 1")).await;
    let (s, v) = decide(
        &f.app,
        &first,
        ALICE,
        "approve",
        json!({"standing": {"valid_days": 3, "max_uses": 4, "vary": ["user"], "group": "ci"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut another_model = ci_review("summarise build 2");
    another_model["model"] = json!("gpt-y");
    let other = create_pending(&f.app, another_model).await;
    let app = &f.app;
    let of = |id: String| async move {
        let uri = format!("/api/standing-approvals?review_id={id}");
        let (s, v) = get_as(app, ALICE, &uri).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["standing_approvals"].as_array().unwrap().clone()
    };
    let [sa] = &of(first.clone()).await[..] else {
        panic!("one standing approval on {first}")
    };
    assert_eq!(sa["review_id"], first.as_str());
    assert_eq!(
        (
            &sa["valid_days"],
            &sa["max_uses"],
            &sa["group"],
            &sa["vary"]
        ),
        (&json!(3), &json!(4), &json!("ci"), &json!(["user"]))
    );
    assert!(of(other).await.is_empty());
}

/// A chat body whose user message carries an inline PNG (`png` is its
/// base64), as the filter sends it with the review.
fn body_with_image(png: &str) -> String {
    json!({"model": "gpt-x", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "describe the chart"},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}},
    ]}]})
    .to_string()
}

/// [`ci_review`] whose user message carries an image: the prompt shows it
/// as the filter's marker, which names type and size, never the content.
fn ci_review_with_image(png: &str) -> Value {
    let mut review = ci_review("describe the chart\n[image_url: inline image/png, 8 bytes]");
    review["body"] = json!(body_with_image(png));
    review["evidence"] = json!({"attachments": true});
    review
}

/// The shape of a standing approval reads the prompt as text, where an
/// image, audio or file is only a marker (type and size): two requests
/// with the same text and different images have one shape. So no standing
/// approval is made on a request with attachments, and none approves one:
/// a person sees every attachment.
#[tokio::test]
async fn attachments_are_never_approved_by_a_standing_approval() {
    let f = fixture();
    // Made on a request with an image: refused, the approval is not taken.
    let id = create_pending(&f.app, ci_review_with_image("AAAAAAAA")).await;
    let exact = json!({"valid_days": 7, "max_uses": 5, "vary": []});
    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({"standing": exact})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_error(&v, "standing_terms");
    assert!(standing_list(&f.app).await.is_empty());

    // A live one whose user message may vary does not take an image in it.
    live_standing(&f.app, 10).await;
    let id = create_pending(&f.app, ci_review_with_image("BBBBBBBB")).await;
    let (_, v) = get_as(&f.app, ALICE, &format!("/api/reviews/{id}")).await;
    assert_eq!(
        (&v["status"], &v["reviewer"]),
        (&json!("pending"), &Value::Null)
    );
}

/// Terms under which no message with text stays fixed (the default
/// `vary: ["user"]` on a prompt of user messages only) would approve any
/// later prompt with the same roles: refused, naming why, and nothing is
/// proposed. The review can still be approved without terms.
#[tokio::test]
async fn terms_that_keep_no_text_fixed_are_refused() {
    let f = fixture();
    let only_user = |caller: &str, text: &str| {
        common::review_request(json!({
            "caller": caller, "caller_groups": ["ci"], "rule": "ci",
            "approver_group": "security", "model": "gpt-x",
            "prompt": [{"role": "system", "text": " "}, {"role": "user", "text": text}],
        }))
    };
    let id = create_pending(&f.app, only_user("ci-nightly", "What is 2+2?")).await;
    for vary in [json!(["user"]), json!(["system", "user"])] {
        let blanket = json!({"valid_days": 90, "max_uses": 100000, "vary": vary, "group": "ci"});
        let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({"standing": blanket})).await;
        assert_eq!(s, StatusCode::CONFLICT, "{vary}: {v}");
        assert_error(&v, "standing_terms");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("fixed"),
            "{v}"
        );
    }
    assert!(standing_list(&f.app).await.is_empty());
    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({})).await;
    assert_eq!(
        (s, &v["status"]),
        (StatusCode::OK, &json!("approved")),
        "{v}"
    );
    // Nothing approves another caller's unrelated prompt.
    create_pending(
        &f.app,
        only_user("ci-other", "Write a script that deletes every backup"),
    )
    .await;
    // Keeping the user message fixed is a standing approval of that text.
    let id = create_pending(&f.app, only_user("ci-nightly", "What is 3+3?")).await;
    let exact = json!({"valid_days": 1, "max_uses": 2, "vary": ["system"]});
    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({"standing": exact})).await;
    assert_eq!(
        (s, &v["status"]),
        (StatusCode::OK, &json!("approved")),
        "{v}"
    );
    create_auto_approved(&f.app, only_user("ci-nightly", "What is 3+3?")).await;

    // One made before such terms were refused (its terms and shape written
    // as they would have been) approves nothing.
    use countersign_approval::standing::{shape_sha256, Part, ShapeOf};
    use countersign_core::wire::PromptMessage;
    let prompt: Vec<PromptMessage> = serde_json::from_value(json!([
        {"role": "system", "text": " "}, {"role": "user", "text": "What is 3+3?"}
    ]))
    .unwrap();
    let of = ShapeOf {
        api: "openai_chat",
        path: "/v1/chat/completions",
        model: "gpt-x",
        rule: Some("ci"),
        prompt: &prompt,
    };
    let blanket = shape_sha256(&of, &[Part::System, Part::User]);
    let live = standing_list(&f.app).await;
    RawDb::open(&f.db)
        .exec(&format!(
            "UPDATE standing_approvals SET vary_json = '[\"system\",\"user\"]', \
             shape_sha256 = '{blanket}' WHERE id = '{}'",
            live[0]["id"].as_str().unwrap()
        ))
        .unwrap();
    assert_eq!(
        shape_sha256(&of, &[Part::System, Part::User]),
        standing_list(&f.app).await[0]["shape_sha256"]
    );
    create_pending(&f.app, only_user("ci-nightly", "Delete every backup")).await;
}

/// The `[[reviewers]]` of [`REVIEWERS`] with `alice`'s entry replaced by
/// `entry` (`None`: removed), put in force as a reload would.
fn reload_with_alice(f: &Fixture, entry: Option<&str>) {
    let reviewers: Vec<(&str, &str, &str)> = REVIEWERS
        .iter()
        .filter_map(|r| match (r.0, entry) {
            ("alice", Some(more)) => Some(("alice", ALICE, more)),
            ("alice", None) => None,
            _ => Some(*r),
        })
        .collect();
    let toml = common::config_toml(&f.db, "", &reviewers);
    f.state
        .reload_reviewers(countersign_approval::Config::from_toml_str(&toml).unwrap());
}

/// A standing approval decides for the people who created it, as they are
/// now: once its creator is no longer a reviewer (offboarded, token
/// revoked) or no longer in its approver group, it approves nothing and is
/// listed as suspended; when they are again, it is live again.
#[tokio::test]
async fn a_standing_approval_decides_only_while_its_creators_are_reviewers_of_its_group() {
    let f = fixture();
    let sa = live_standing(&f.app, 10).await;
    create_auto_approved(&f.app, ci_review("build 2")).await;
    let status = |app: Router, sa: String| async move {
        let (s, v) = get_as(&app, CAROL, &format!("/api/standing-approvals/{sa}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["status"].as_str().unwrap().to_string()
    };

    // alice is offboarded: her token is refused, her standing approval
    // decides nothing.
    reload_with_alice(&f, None);
    let (s, _) = get_as(&f.app, ALICE, "/api/reviews").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    create_pending(&f.app, ci_review("build 3")).await;
    assert_eq!(status(f.app.clone(), sa.clone()).await, "suspended");

    // alice is a reviewer again, outside the approver group: still nothing.
    reload_with_alice(&f, Some(""));
    create_pending(&f.app, ci_review("build 4")).await;
    assert_eq!(status(f.app.clone(), sa.clone()).await, "suspended");

    // Back in the group (a new token for the same person counts too).
    reload_with_alice(&f, Some("groups = [\"security\"]"));
    assert_eq!(status(f.app.clone(), sa.clone()).await, "live");
    let v = create_auto_approved(&f.app, ci_review("build 5")).await;
    assert_eq!(v["reviewer"], format!("standing:{sa}"));
    let (_, detail) = get_as(&f.app, CAROL, &format!("/api/standing-approvals/{sa}")).await;
    assert_eq!(detail["uses"], 2, "{detail}");
}

/// Separation of duties is checked against the creators' caller identities
/// as they are now: one added to a creator after the standing approval was
/// made is theirs too, and the standing approval does not approve it.
#[tokio::test]
async fn a_standing_approval_never_approves_a_caller_its_creator_became() {
    let f = fixture();
    let id = create_pending(&f.app, ci_review("build 1")).await;
    let mut group_terms = json!({"standing": terms(10)});
    group_terms["standing"]["group"] = json!("ci");
    let (s, v) = decide(&f.app, &id, ALICE, "approve", group_terms).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let as_caller = |caller: &str, user: &str| {
        let mut r = ci_review(user);
        r["caller"] = json!(caller);
        r
    };
    create_auto_approved(&f.app, as_caller("ci-alice", "build 2")).await;

    // The operator records that alice sends as `ci-alice`; and, as a
    // sign-in name, `alice@example.com`.
    reload_with_alice(
        &f,
        Some("groups = [\"security\"]\ncallers = [\"ci-alice\"]\nsign_in_names = [\"alice@example.com\"]"),
    );
    // She may not approve those requests herself...
    let id = create_pending(&f.app, as_caller("ci-alice", "build 3")).await;
    let (s, v) = decide(&f.app, &id, ALICE, "approve", json!({})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_error(&v, "self_approval");
    // ...nor does her standing approval, under either name.
    create_pending(&f.app, as_caller("ci-alice", "build 4")).await;
    create_pending(&f.app, as_caller("Alice@Example.com", "build 5")).await;
    // Another caller of the group still is.
    create_auto_approved(&f.app, as_caller("ci-weekly", "build 6")).await;
}
