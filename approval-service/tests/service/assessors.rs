//! Assessors and automatic decisions in-process: a stand-in speaking the
//! exact formats of an OpenAI moderation endpoint, a Llama-Guard-style chat
//! model and Presidio's analyzer answers according to the prompt; each
//! test checks what the service made of it (the e2e tests with a real
//! Envoy, the demo backend and Presidio are in tests/e2e/test_assessors.py).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::common::{self, Fixture, ALICE};

type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// The stand-in on port 0: answers by what the prompt says
/// (`violent`, `unsafe-s1`, `card 4111`, `nonsense`, `slow`, `down`);
/// records every `(path, request body)`.
async fn assessors() -> (String, Seen) {
    let seen: Seen = Seen::default();
    let recorded = seen.clone();
    let handler = move |uri: axum::http::Uri, body: String| {
        let recorded = recorded.clone();
        async move {
            let req: Value = serde_json::from_str(&body).unwrap();
            recorded
                .lock()
                .unwrap()
                .push((uri.path().to_string(), req.clone()));
            let text = req["input"]
                .as_str()
                .or(req["text"].as_str())
                .or(req["messages"][0]["content"].as_str())
                .unwrap_or("")
                .to_string();
            if text.contains("slow") {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            if text.contains("down") {
                return (StatusCode::SERVICE_UNAVAILABLE, "overloaded".to_string());
            }
            let answer = match uri.path() {
                _ if text.contains("nonsense") => json!({"status": "fine, probably"}),
                "/v1/moderations" => {
                    let violent = text.contains("violent");
                    json!({"id": "modr-1", "model": "omni-moderation-latest", "results": [{
                        "flagged": violent,
                        "categories": {"violence": violent, "harassment": false},
                        "category_scores": {"violence": if violent {0.93} else {0.01}, "harassment": 0.002}
                    }]})
                }
                "/v1/chat/completions" => {
                    let content = if text.contains("unsafe-s1") {
                        "unsafe\nS1"
                    } else {
                        "safe"
                    };
                    json!({"id": "c-1", "object": "chat.completion", "model": req["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": content}}]})
                }
                "/analyze" => match text.find("4111") {
                    Some(start) => json!([{"entity_type": "CREDIT_CARD", "start": start,
                                           "end": start + 19, "score": 1.0}]),
                    None => json!([]),
                },
                _ => json!({}),
            };
            (StatusCode::OK, answer.to_string())
        }
    };
    let router = axum::Router::new().fallback(axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (base, seen)
}

fn settings(base: &str) -> String {
    format!(
        r#"
[[assessors]]
name = "mod"
kind = "moderation"
url = "{base}/v1/moderations"
model = "omni-moderation-latest"
timeout_ms = 500

[[assessors]]
name = "guard"
kind = "guard_model"
url = "{base}/v1/chat/completions"
model = "llama-guard-3"
timeout_ms = 500

[[assessors]]
name = "pii"
kind = "presidio"
url = "{base}/analyze"
timeout_ms = 500
"#
    )
}

async fn service() -> (Fixture, Seen) {
    let (base, seen) = assessors().await;
    let f = common::fixture("a.db", |db| {
        common::config_toml(db, &settings(&base), &[("alice", ALICE, "")])
    });
    (f, seen)
}

fn policy() -> Value {
    json!({
        "approve": {"max_score": 0.5, "unless_hits": ["email"]},
        "deny": {"labels": ["S1"]}
    })
}

fn review(text: &str, fields: Value) -> Value {
    common::merged(
        common::review_request(json!({
            "prompt": [{"role": "user", "text": text}],
            "auto_decision": policy(),
            "evidence": {"hits": [], "tools": ["run_shell"], "attachments": false,
                         "prompt_messages": 1, "prompt_chars": text.chars().count()}
        })),
        fields,
    )
}

/// The review once the assessors' report is in.
async fn assessed(f: &Fixture, id: &str) -> Value {
    for _ in 0..500 {
        let (status, v) = common::get_as(&f.app, ALICE, &format!("/api/reviews/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        if !v["assessment"].is_null() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no assessment of {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_harmless_prompt_is_approved_by_the_assessors_and_released_through_the_long_poll() {
    let (f, seen) = service().await;
    // `run` follows the review events for the decision metrics.
    let server = common::serve(f.state.clone()).await;
    let id = common::create_review(&f.app, &[], review("what is 2+2?", json!({}))).await;
    let (status, state) = common::wait(&f.app, &id, Some(10_000)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(state["status"], "approved", "{state}");
    assert_eq!(state["reviewer"], "assessor:mod+guard+pii");
    let v = assessed(&f, &id).await;
    assert_eq!(v["automatic"], true);
    assert_eq!(v["assessment"]["outcome"]["decision"], "approve");
    let names: Vec<&str> = v["assessment"]["assessments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["assessor"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mod", "guard", "pii"]);
    assert_eq!(v["evidence"]["tools"], json!(["run_shell"]));
    // The metrics: each assessor's call timed, the decision counted as
    // the assessors'.
    let assessor = [("decider", "assessor")];
    let scraped = crate::metrics::until_decided(&f.app, &assessor, 1.0).await;
    for name in ["mod", "guard", "pii"] {
        let calls = [("assessor", name), ("result", "ok")];
        let n = crate::metrics::value(
            &scraped,
            "countersign_assessor_request_duration_seconds_count",
            &calls,
        );
        assert_eq!(n, 1.0, "{name}");
    }
    let by_assessor = [
        ("decider", "assessor"),
        ("outcome", "approved"),
        ("reviewer", "assessor:mod+guard+pii"),
    ];
    let n = crate::metrics::value(&scraped, "countersign_review_decisions_total", &by_assessor);
    assert_eq!(n, 1.0);
    // The exact request formats.
    let seen = seen.lock().unwrap().clone();
    let body_of = |path: &str| seen.iter().find(|(p, _)| p == path).unwrap().1.clone();
    assert_eq!(
        body_of("/v1/moderations"),
        json!({"model": "omni-moderation-latest", "input": "user: what is 2+2?"})
    );
    assert_eq!(
        body_of("/analyze"),
        json!({"text": "user: what is 2+2?", "language": "en"})
    );
    let chat = body_of("/v1/chat/completions");
    assert_eq!(chat["model"], "llama-guard-3");
    assert_eq!(
        chat["messages"],
        json!([{"role": "user", "content": "user: what is 2+2?"}])
    );
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagged_failing_or_late_assessors_leave_the_review_to_people_and_say_why() {
    let (f, _) = service().await;
    for (text, why) in [
        ("a violent plan", "flagged"),
        ("nonsense please", "failed"),
        ("slow answer", "no answer within 500 ms"),
        ("service down", "answered HTTP 503"),
        ("card 4111 1111 1111 1111", "scored `CREDIT_CARD` 1.00"),
    ] {
        let id = common::create_review(&f.app, &[], review(text, json!({}))).await;
        let v = assessed(&f, &id).await;
        assert_eq!(v["status"], "pending", "{text}: {v}");
        assert_eq!(v["automatic"], false);
        let outcome = &v["assessment"]["outcome"];
        assert_eq!(outcome["decision"], "for_people", "{text}: {outcome}");
        assert!(
            outcome["why"].as_str().unwrap().contains(why),
            "{text}: {outcome}"
        );
    }
    // A failure is shown on the assessor that failed.
    let id = common::create_review(&f.app, &[], review("nonsense", json!({}))).await;
    let v = assessed(&f, &id).await;
    let errors: Vec<&Value> = v["assessment"]["assessments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["error"])
        .collect();
    assert_eq!(errors.len(), 3);
    assert!(errors.iter().all(|e| e.is_string()), "{errors:?}");
    // People still decide as usual.
    common::decide_ok(&f.app, &id, ALICE, "approve", json!({})).await;
    let (_, state) = common::wait(&f.app, &id, None).await;
    assert_eq!(
        (state["status"].as_str(), state["reviewer"].as_str()),
        (Some("approved"), Some("alice"))
    );
}

/// A prompt longer than an assessor reads whole (`max_prompt_chars`; a
/// guard model's default is 8,000 characters, as Ollama serves one with a
/// few thousand tokens of context and drops the rest silently) is not sent
/// to it: a harmless start followed by anything would otherwise be
/// approved on the start alone. Its assessment fails, so people decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_an_assessor_reads_is_left_to_people() {
    let (f, seen) = service().await;
    let text = format!(
        "{} and then the real request",
        "a harmless question. ".repeat(400)
    );
    assert!(text.chars().count() > 8_000);
    let id = common::create_review(&f.app, &[], review(&text, json!({}))).await;
    let v = assessed(&f, &id).await;
    assert_eq!(v["status"], "pending", "{v}");
    let outcome = &v["assessment"]["outcome"];
    assert_eq!(outcome["decision"], "for_people", "{outcome}");
    assert!(
        outcome["why"]
            .as_str()
            .unwrap()
            .contains("max_prompt_chars"),
        "{outcome}"
    );
    // The guard model was not asked; the others read it whole and were.
    let paths: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    assert!(
        !paths.iter().any(|p| p == "/v1/chat/completions"),
        "{paths:?}"
    );
    assert!(paths.iter().any(|p| p == "/v1/moderations"), "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_label_rejects_automatically() {
    let (f, _) = service().await;
    let id = common::create_review(&f.app, &[], review("unsafe-s1 please", json!({}))).await;
    let (_, state) = common::wait(&f.app, &id, Some(10_000)).await;
    assert_eq!(state["status"], "rejected", "{state}");
    assert_eq!(state["reviewer"], "assessor:guard");
    assert!(
        state["reason"].as_str().unwrap().contains("`S1`"),
        "{state}"
    );
    let v = assessed(&f, &id).await;
    assert_eq!(v["automatic"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_automatic_approval_without_a_policy_with_masked_hits_or_for_a_quorum() {
    let (f, _) = service().await;
    let hits = json!({"evidence": {"hits": [{"name": "email", "action": "redact", "count": 2}]}});
    let no_policy = common::merged(review("hi", json!({})), json!({"auto_decision": null}));
    let quorum = json!({"required_approvals": 2});
    for (body, why) in [
        (review("hi", hits), "`email` fired"),
        (no_policy, "leaves every decision to people"),
        (review("hi", quorum), "several people"),
    ] {
        let id = common::create_review(&f.app, &[], body).await;
        let v = assessed(&f, &id).await;
        assert_eq!(v["status"], "pending", "{v}");
        assert!(
            v["assessment"]["outcome"]["why"]
                .as_str()
                .unwrap()
                .contains(why),
            "{v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_that_names_assessors_is_assessed_by_those_only() {
    let (base, seen) = assessors().await;
    let chosen = format!(
        "{}\n[rule_assessors]\nci = [\"guard\"]\nquiet = []\n",
        settings(&base)
    );
    let f = common::fixture("a.db", |db| {
        common::config_toml(db, &chosen, &[("alice", ALICE, "")])
    });
    let paths = |seen: &Seen| -> Vec<String> {
        let mut p: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect();
        p.sort();
        p
    };
    // Rule `ci` names the guard model: only it is asked, and it alone
    // approves.
    let ci = review("what is 2+2?", json!({"rule": "ci", "request_id": "r-ci"}));
    let id = common::create_review(&f.app, &[], ci).await;
    let v = assessed(&f, &id).await;
    assert_eq!(v["assessment"]["outcome"]["decision"], "approve", "{v}");
    assert_eq!(v["assessment"]["outcome"]["decider"], "assessor:guard");
    assert_eq!(v["assessment"]["assessments"].as_array().unwrap().len(), 1);
    assert_eq!(paths(&seen), ["/v1/chat/completions"]);
    // Rule `quiet` names none: nobody is asked, people decide.
    seen.lock().unwrap().clear();
    let quiet = review(
        "what is 2+2?",
        json!({"rule": "quiet", "request_id": "r-q"}),
    );
    let id = common::create_review(&f.app, &[], quiet).await;
    let v = assessed(&f, &id).await;
    assert_eq!(v["status"], "pending", "{v}");
    let why = v["assessment"]["outcome"]["why"].as_str().unwrap();
    assert!(
        why.contains("no assessor is configured for this rule"),
        "{v}"
    );
    assert!(paths(&seen).is_empty());
    // A rule not named is assessed by every assessor.
    let other = review(
        "what is 2+2?",
        json!({"rule": "other", "request_id": "r-o"}),
    );
    let id = common::create_review(&f.app, &[], other).await;
    let v = assessed(&f, &id).await;
    assert_eq!(
        v["assessment"]["outcome"]["decider"], "assessor:mod+guard+pii",
        "{v}"
    );
    assert_eq!(
        paths(&seen),
        ["/analyze", "/v1/chat/completions", "/v1/moderations"]
    );
}

#[test]
fn rule_assessors_name_configured_assessors_only() {
    let db = std::path::Path::new("/tmp/unused.db");
    let two = "[[assessors]]\nname = \"a\"\nkind = \"presidio\"\nurl = \"http://x\"\n\
               [[assessors]]\nname = \"b\"\nkind = \"moderation\"\nurl = \"http://x\"\n";
    for (table, field, says) in [
        (
            "ci = [\"a\", \"guard\"]",
            "rule_assessors.ci[1]",
            "\"guard\" is not an assessor",
        ),
        ("ci = [\"b\", \"b\"]", "rule_assessors.ci[1]", "named twice"),
    ] {
        let settings = format!("{two}[rule_assessors]\n{table}\n");
        match countersign_approval::Config::from_toml_str(&common::config_toml(db, &settings, &[]))
        {
            Err(countersign_approval::ConfigError::Invalid { field: f, message }) => {
                assert_eq!(f, field);
                assert!(message.contains(says), "{message}");
            }
            other => panic!("{table}: {other:?}"),
        }
    }
    let ok = format!("{two}[rule_assessors]\nci = [\"b\"]\n");
    let c =
        countersign_approval::Config::from_toml_str(&common::config_toml(db, &ok, &[])).unwrap();
    let names = |rule| -> Vec<String> {
        c.assessors_for(rule)
            .iter()
            .map(|a| a.name.clone())
            .collect()
    };
    assert_eq!(names(Some("ci")), ["b"]);
    assert_eq!(names(Some("other")), ["a", "b"]);
    assert_eq!(names(None), ["a", "b"]);
}

#[test]
fn assessor_settings_are_checked_naming_the_field() {
    let db = std::path::Path::new("/tmp/unused.db");
    for (table, field) in [
        ("name = \"a\"\nkind = \"guard_model\"\nurl = \"http://x/v1/chat/completions\"", "assessors[0].model"),
        ("name = \"a\"\nkind = \"presidio\"\nurl = \"ftp://x\"", "assessors[0].url"),
        ("name = \"a\"\nkind = \"presidio\"\nurl = \"http://x\"\ntimeout_ms = 0", "assessors[0].timeout_ms"),
        ("name = \"a\"\nkind = \"moderation\"\nurl = \"http://x\"\nlanguage = \"en\"", "assessors[0].language"),
        ("name = \"\"\nkind = \"moderation\"\nurl = \"http://x\"", "assessors[0].name"),
        ("name = \"a\"\nkind = \"moderation\"\nurl = \"http://x\"\napi_key_env = \"COUNTERSIGN_TEST_UNSET_KEY\"", "assessors[0].api_key_env"),
    ] {
        let toml = common::config_toml(db, &format!("[[assessors]]\n{table}\n"), &[]);
        match countersign_approval::Config::from_toml_str(&toml) {
            Err(countersign_approval::ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{table}: {other:?}"),
        }
    }
    let twice = "[[assessors]]\nname = \"a\"\nkind = \"presidio\"\nurl = \"http://x\"\n".repeat(2);
    match countersign_approval::Config::from_toml_str(&common::config_toml(db, &twice, &[])) {
        Err(countersign_approval::ConfigError::Invalid { field, .. }) => {
            assert_eq!(field, "assessors[1].name")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_say_automatic_when_the_assessors_decided() {
    let (base, _) = assessors().await;
    let (addr, received) = crate::ui::receiver(vec![]).await;
    let f = common::fixture("a.db", |db| {
        let settings = format!(
            "public_url = \"https://review.example.com\"\n{}\n[[webhooks]]\n\
             url = \"http://{addr}/hook\"\nformat = \"json\"\nevents = [\"review.decided\"]\n",
            settings(&base)
        );
        common::config_toml(db, &settings, &[("alice", ALICE, "")])
    });
    let notifier = countersign_approval::notify::spawn(&f.state, crate::ui::client()).unwrap();
    let auto = common::create_review(&f.app, &[], review("what is 2+2?", json!({}))).await;
    let got = crate::ui::wait_for(&received, 1).await;
    let data = &got[0].2["data"];
    assert_eq!(data["id"], auto.as_str());
    assert_eq!(data["reviewer"], "assessor:mod+guard+pii");
    assert_eq!(data["automatic"], true, "{data}");
    // Flagged by the moderation endpoint: a person decides.
    let flagged = review("a violent plan", json!({"request_id": "req-2"}));
    let by_alice = common::create_review(&f.app, &[], flagged).await;
    assessed(&f, &by_alice).await;
    common::decide_ok(&f.app, &by_alice, ALICE, "reject", json!({"reason": "no"})).await;
    let got = crate::ui::wait_for(&received, 2).await;
    assert_eq!(got[1].2["data"]["id"], by_alice.as_str());
    assert_eq!(got[1].2["data"]["automatic"], false);
    notifier.abort();
}
