//! `/metrics`: the values move with what the service does (reviews created
//! with evidence hits, decisions by a person, by the caller going away and
//! by expiry, record appends, HTTP requests), and `promtool check metrics`
//! accepts a real scrape.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use serde_json::json;

use crate::common::{self, call, decide_ok, send, Fixture, ALICE, FILTER_HEADER};

const DECISION_COUNT: &str = "countersign_review_decision_seconds_count";

/// One sample of a scrape: metric name, labels, value.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the text format's sample lines (labels without escapes, as ours
/// are in these tests).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {l}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').unwrap();
                    let labels = body
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").unwrap();
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
            };
            Sample {
                name,
                labels,
                value,
            }
        })
        .collect()
}

/// The sum of `name`'s samples whose labels include `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

pub async fn scrape_text(app: &Router) -> String {
    let r = send(app, "GET", "/metrics", &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    String::from_utf8(r.body.to_vec()).unwrap()
}

pub async fn scrape(app: &Router) -> Vec<Sample> {
    parse(&scrape_text(app).await)
}

/// Scrapes until `countersign_review_decision_seconds` has counted `count`
/// decisions with `labels` (the decision metrics are written by a task that
/// follows the review events); fails after 5 s.
pub async fn until_decided(app: &Router, labels: &[(&str, &str)], count: f64) -> Vec<Sample> {
    for _ in 0..250 {
        let samples = scrape(app).await;
        if value(&samples, DECISION_COUNT, labels) == count {
            return samples;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "no {count} decisions {labels:?} in\n{}",
        scrape_text(app).await
    );
}

/// A service; `settings` are more top-level keys.
fn service(settings: &str) -> Fixture {
    common::fixture("m.db", |db| {
        let settings = format!("{}\n{settings}", common::filter_token_setting());
        common::config_toml(db, &settings, &[("alice", ALICE, "")])
    })
}

fn held(request_id: &str, hold_timeout_ms: u64) -> serde_json::Value {
    common::review_request(json!({
        "request_id": request_id,
        "rule": "needs-review",
        "hold_timeout_ms": hold_timeout_ms,
        "evidence": {
            "hits": [
                {"name": "email", "action": "redact", "count": 2},
                {"name": "iban", "action": "pseudonymize", "count": 1},
                {"name": "watch-words", "action": "monitor", "count": 3}
            ],
            "tools": [], "attachments": false, "prompt_messages": 1, "prompt_chars": 5
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_reviews_decisions_and_records() {
    // Metrics on an address of their own: reviewers are named there.
    let f = service("metrics_listen = \"127.0.0.1:0\"");
    let metrics = countersign_approval::http::metrics_app(f.state.clone());
    // `run` follows the review events for the decision metrics; the
    // requests go to the router of the same state.
    let server = common::serve(f.state.clone()).await;
    let filter = [FILTER_HEADER];
    let before = scrape(&metrics).await;
    assert_eq!(
        value(&before, "countersign_reviews_pending", &[]),
        0.0,
        "fresh database"
    );

    // A held request with evidence: the queue, its age, the hits.
    let first = common::create_review(&f.app, &filter, held("req-1", 60_000)).await;
    let s = scrape(&metrics).await;
    let pending = [("kind", "prompt"), ("mode", "hold")];
    assert_eq!(value(&s, "countersign_reviews_pending", &pending), 1.0);
    assert_eq!(
        value(&s, "countersign_reviews_pending", &[("mode", "audit")]),
        0.0
    );
    let age = value(
        &s,
        "countersign_oldest_pending_review_age_seconds",
        &[("kind", "prompt"), ("mode", "hold")],
    );
    assert!((0.0..60.0).contains(&age), "{age}");
    assert_eq!(value(&s, "countersign_reviews_created_total", &[]), 1.0);
    let hits = |s: &[Sample], detector: &str, action: &str| {
        value(
            s,
            "countersign_masking_hits_total",
            &[("detector", detector), ("action", action)],
        )
    };
    assert_eq!(hits(&s, "email", "redact"), 2.0);
    assert_eq!(hits(&s, "iban", "pseudonymize"), 1.0);
    assert_eq!(
        value(
            &s,
            "countersign_policy_monitor_hits_total",
            &[("rule", "watch-words")]
        ),
        3.0
    );
    let created_route = [
        ("route", "/v1/reviews"),
        ("method", "POST"),
        ("code", "201"),
    ];
    assert_eq!(
        value(
            &s,
            "countersign_http_request_duration_seconds_count",
            &created_route
        ),
        1.0
    );

    // A person approves: time to decision, by decider, outcome, rule.
    decide_ok(&f.app, &first, ALICE, "approve", json!({"reason": "ok"})).await;
    let human = [
        ("decider", "human"),
        ("outcome", "approved"),
        ("rule", "needs-review"),
    ];
    let s = until_decided(&metrics, &human, 1.0).await;
    let inf = [
        ("decider", "human"),
        ("outcome", "approved"),
        ("le", "+Inf"),
    ];
    assert_eq!(
        value(&s, "countersign_review_decision_seconds_bucket", &inf),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "countersign_review_decisions_total",
            &[
                ("decider", "human"),
                ("outcome", "approved"),
                ("reviewer", "alice")
            ]
        ),
        1.0
    );
    assert_eq!(value(&s, "countersign_reviews_pending", &[]), 0.0);
    assert_eq!(
        value(
            &s,
            "countersign_reviews_decided_total",
            &[("status", "approved")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "countersign_oldest_pending_review_age_seconds",
            &[("kind", "prompt"), ("mode", "hold")]
        ),
        0.0
    );
    // The hits are counted once per review created, not per scrape.
    assert_eq!(hits(&s, "email", "redact"), 2.0);

    // The caller goes away: decided by the caller.
    let second = common::create_review(&f.app, &filter, held("req-2", 60_000)).await;
    let (status, v) = call(
        &f.app,
        "POST",
        &format!("/v1/reviews/{second}/cancel"),
        &filter,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let cancelled = [("decider", "caller"), ("outcome", "cancelled")];
    until_decided(&metrics, &cancelled, 1.0).await;

    // Nobody decides in time: decided by expiry (a read finds it overdue).
    let third = common::create_review(&f.app, &filter, held("req-3", 1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, v) = common::get_as(&f.app, ALICE, &format!("/api/reviews/{third}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["status"], "expired", "{v}");
    let expired = [("decider", "expiry"), ("outcome", "expired")];
    let s = until_decided(&metrics, &expired, 1.0).await;
    assert_eq!(hits(&s, "email", "redact"), 6.0);
    assert_eq!(value(&s, "countersign_reviews_created_total", &[]), 3.0);
    assert_eq!(value(&s, DECISION_COUNT, &[]), 3.0);
    assert_eq!(
        value(&s, "countersign_review_decisions_unobserved_total", &[]),
        0.0
    );

    // A record append: timed and counted.
    let record = json!({
        "request_id": "req-9", "received_at_ms": 1_700_000_000_000u64, "caller": "svc-a",
        "method": "POST", "path": "/v1/chat/completions", "api": "openai_chat",
        "model": "gpt-x", "stream": false, "decision": "allowed", "rule": "all"
    });
    let (status, v) = call(&f.app, "POST", "/v1/records", &filter, Some(record)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let s = scrape(&metrics).await;
    assert_eq!(
        value(
            &s,
            "countersign_record_append_duration_seconds_count",
            &[("kind", "request"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "countersign_records_written_total",
            &[("kind", "request")]
        ),
        1.0
    );
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standing_approval_is_counted_as_the_decider() {
    let f = common::fixture("m.db", |db| {
        common::config_toml(db, "metrics_listen = \"127.0.0.1:0\"", &common::REVIEWERS)
    });
    let metrics = countersign_approval::http::metrics_app(f.state.clone());
    let server = common::serve(f.state.clone()).await;
    let templated = |user: &str| {
        common::review_request(json!({
            "caller": "ci-nightly", "rule": "ci", "approver_group": "security",
            "prompt": [{"role": "system", "text": "Summarise CI logs."}, {"role": "user", "text": user}]
        }))
    };
    let first = common::create_review(&f.app, &[], templated("build 1")).await;
    let terms = json!({"valid_days": 7, "max_uses": 5, "vary": ["user"]});
    decide_ok(
        &f.app,
        &first,
        ALICE,
        "approve",
        json!({"reason": "nightly", "standing": terms}),
    )
    .await;
    let (status, v) = call(
        &f.app,
        "POST",
        "/v1/reviews",
        &[],
        Some(templated("build 2")),
    )
    .await;
    assert_eq!(
        (status, &v["status"]),
        (StatusCode::CREATED, &json!("approved")),
        "{v}"
    );
    let standing = [
        ("decider", "standing"),
        ("outcome", "approved"),
        ("rule", "ci"),
    ];
    let s = until_decided(&metrics, &standing, 1.0).await;
    assert_eq!(
        value(&s, DECISION_COUNT, &[("decider", "human"), ("rule", "ci")]),
        1.0
    );
    // Its decisions name no person.
    assert_eq!(
        value(
            &s,
            "countersign_review_decisions_total",
            &[("decider", "standing"), ("reviewer", "")]
        ),
        1.0
    );
    server.shut_down().await;
}

/// `promtool check metrics` on `text`: `Ok(())` when it accepts it, or its
/// complaints; `None` when promtool is not installed.
fn promtool_check(text: &str) -> Option<Result<(), String>> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Some(match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_real_scrape() {
    // Public metrics (the default): no reviewer's name in them.
    let f = service("");
    let server = common::serve(f.state.clone()).await;
    let filter = [FILTER_HEADER];
    // Every family with samples: a decision, hits, a failed request.
    let id = common::create_review(&f.app, &filter, held("req-1", 60_000)).await;
    decide_ok(&f.app, &id, ALICE, "reject", json!({"reason": "no"})).await;
    common::create_review(&f.app, &filter, held("req-2", 60_000)).await;
    let (status, _) = call(&f.app, "GET", "/no/such/path", &[], None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    until_decided(&f.app, &[("outcome", "rejected")], 1.0).await;
    let text = scrape_text(&f.app).await;
    server.shut_down().await;
    assert!(
        text.contains("route=\"unmatched\""),
        "an unknown path is one series: {text}"
    );
    assert!(
        text.contains("decider=\"human\",outcome=\"rejected\",reviewer=\"human\"")
            && !text.contains("alice"),
        "public metrics name no reviewer: {text}"
    );
    match promtool_check(&text) {
        Some(result) => result.unwrap_or_else(|e| panic!("promtool check metrics: {e}\n{text}")),
        // In CI promtool must be there (`./dev test` installs Debian's
        // `prometheus` package): a missing tool fails the test there.
        None if std::env::var_os("COUNTERSIGN_CI").is_some() => {
            panic!(
                "promtool is not installed (Debian package `prometheus`; ./dev test installs it)"
            )
        }
        None => eprintln!("promtool is not installed: the scrape was not linted"),
    }
}
