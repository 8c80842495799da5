//! Reviews of a plain answer's text (kind `response`): held, approved,
//! rejected, edited (and the edit guarded again), expired; rules on
//! phrases and on detectors; their configuration.
#![allow(clippy::unwrap_used, clippy::panic)]

use serde_json::{json, Value};

use super::tests::{
    answer_on, expire_held_answer, forwarded_answer, response_record, sent, state, CHAT, ID,
    REQUEST,
};
use crate::host::Action;
use crate::stream_filter::StreamFilter;
use crate::testing::{answer_last_call, answer_watch, MockHost};
use crate::worker::Worker;

/// Masking (emails redacted in answers, `ticket` only counted), a `review`
/// rule on a phrase and on the `ticket` detector, and a `block` rule.
fn config(rule_extra: &str) -> String {
    format!(
        r#"{{"default_action":"allow",
        "masking":{{"custom_detectors":[{{"name":"ticket","regex":"TICKET-[0-9]{{4}}"}}],
          "profiles":{{"default":{{"detectors":{{"email":"redact","ticket":"monitor"}}}}}}}},
        "content_policy":{{"response_rules":[
          {{"name":"review-answers","action":"review","phrases":["internal only"],
            "detectors":["ticket"],"streams":"block"{rule_extra}}},
          {{"name":"no-secrets","action":"block","phrases":["top secret"]}}]}}}}"#
    )
}

fn chat(text: &str) -> Value {
    json!({"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[{"index":0,
        "finish_reason":"stop","message":{"role":"assistant","content":text}}]})
}

fn content(answer: &Value) -> &str {
    answer["choices"][0]["message"]["content"].as_str().unwrap()
}

/// The answer's status, `x-countersign-answer-outcome` and
/// `x-countersign-answer-review-id`.
fn outcome(host: &MockHost) -> (&str, &str, &str) {
    let header = |name: &str| host.response_headers.get(name).map_or("", String::as_str);
    (
        header(":status"),
        header("x-countersign-answer-outcome"),
        header("x-countersign-answer-review-id"),
    )
}

/// `answer` held for a review under `config`, which is then `status`
/// (with `extra` fields).
fn decided(
    config: &str,
    answer: &Value,
    status: &str,
    extra: &str,
) -> (Worker, MockHost, StreamFilter) {
    let (worker, mut host, stream, _, _) = forwarded_answer(config, answer);
    answer_last_call(&mut host, &worker, 201, &state("pending", ""));
    answer_watch(&mut host, &worker, &[&state(status, extra)]);
    (worker, host, stream)
}

fn edit(text: &Value) -> String {
    format!(r#","edited_body":{}"#, json!(text.to_string()))
}

#[test]
fn a_matching_answer_waits_for_approval_then_leaves_masked() {
    let answer = chat("This is internal only: write to bob@example.com");
    let (worker, mut host, mut stream, head, last) = forwarded_answer(&config(""), &answer);
    assert_eq!((head, last), (Action::Pause, Action::Pause));
    assert_eq!(host.last_path(), "/v1/reviews");
    let (_, call) = host.dispatched.last().unwrap();
    let review: Value = serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
    assert_eq!(review["kind"], "response");
    assert_eq!(review["model"], "m");
    assert_eq!(review["rule"], "review-answers");
    assert!(review.get("tool_calls").is_none());
    assert_eq!(review["prompt"][0]["text"], "clean up");
    // The reviewer sees the answer as masked for the caller.
    let body: Value = serde_json::from_str(review["body"].as_str().unwrap()).unwrap();
    assert_eq!(content(&body), "This is internal only: write to [EMAIL]");
    answer_last_call(&mut host, &worker, 201, &state("pending", ""));
    worker.on_tick(&mut host);
    assert_eq!(host.last_path(), "/v1/watch");
    assert!(
        host.resumed_responses.is_empty(),
        "nothing leaves before the decision"
    );
    answer_watch(&mut host, &worker, &[&state("approved", "")]);
    assert_eq!(host.resumed_responses, [Some(ID)]);
    assert_eq!(outcome(&host), ("200", "approved", "rev_a"));
    assert_eq!(sent(&host), body);
    let record = response_record(&mut host, &worker, &mut stream);
    assert_eq!(record["answer_review_id"], "rev_a");
    assert_eq!(record["answer_decision"], "approved");
    assert!(record["body"].as_str().unwrap().contains("internal only"));
    assert_eq!(host.violations.get(), 0);
}

#[test]
fn a_rejected_answer_is_an_error_in_the_apis_format() {
    let answer = chat("internal only: the launch date");
    let (worker, mut host, mut stream) = decided(
        &config(""),
        &answer,
        "rejected",
        r#","reason":"leaks the plan""#,
    );
    assert_eq!(host.response_headers[":status"], "403");
    let error = sent(&host);
    assert_eq!(error["error"]["code"], "review_rejected");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("answer was rejected by alice") && message.contains("leaks the plan"),
        "{message}"
    );
    assert!(!host.response_chunk.windows(11).any(|w| w == b"launch date"));
    assert_eq!(outcome(&host).1, "rejected");
    let record = response_record(&mut host, &worker, &mut stream);
    assert_eq!(record["answer_decision"], "rejected");
    assert!(!record["body"].as_str().unwrap().contains("internal only"));
}

#[test]
fn an_expired_review_lets_nothing_of_the_answer_out() {
    let answer = chat("internal only");
    let (worker, mut host, _stream, _, _) =
        forwarded_answer(&config(r#","hold_timeout_ms":1000"#), &answer);
    expire_held_answer(&mut host, &worker);
    assert_eq!(host.response_headers[":status"], "504");
    assert_eq!(sent(&host)["error"]["code"], "review_timeout");
    assert_eq!(outcome(&host).1, "expired");
}

#[test]
fn an_edit_replaces_the_text_and_is_guarded_again() {
    let answer = chat("internal only: ask bob@example.com");
    // The edit is masked as the answer was.
    let edited = chat("Ask the help desk, carol@example.com");
    let (worker, mut host, mut stream) = decided(&config(""), &answer, "approved", &edit(&edited));
    assert_eq!(host.response_headers[":status"], "200");
    assert_eq!(content(&sent(&host)), "Ask the help desk, [EMAIL]");
    assert_eq!(outcome(&host).1, "edited");
    let record = response_record(&mut host, &worker, &mut stream);
    assert_eq!(record["answer_decision"], "edited");
    assert!(record["body"].as_str().unwrap().contains("help desk"));

    // An edit a `block` rule finds is refused, as such an answer would be.
    let edited = chat("it is top secret");
    let (_worker, host, _stream) = decided(&config(""), &answer, "approved", &edit(&edited));
    assert_eq!(host.response_headers[":status"], "403");
    let message = sent(&host)["error"]["message"].clone();
    assert!(
        message.as_str().unwrap().contains("no-secrets"),
        "{message}"
    );
    assert!(!host.response_chunk.windows(10).any(|w| w == b"top secret"));

    // Only the text may change: not the finish reason, not the role.
    for edited in [
        json!({"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[{"index":0,
            "finish_reason":"length","message":{"role":"assistant","content":"ok"}}]}),
        json!({"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[{"index":0,
            "finish_reason":"stop","message":{"role":"assistant","content":"ok",
            "tool_calls":[{"id":"c","type":"function","function":{"name":"x","arguments":"{}"}}]}}]}),
    ] {
        let (_worker, host, _stream) = decided(&config(""), &answer, "approved", &edit(&edited));
        assert_eq!(host.response_headers[":status"], "503");
        let message = sent(&host)["error"]["message"].clone();
        assert!(
            message.as_str().unwrap().contains("only the answer's text"),
            "{message}"
        );
        assert!(!host
            .response_chunk
            .windows(13)
            .any(|w| w == b"internal only"));
    }
}

#[test]
fn a_detector_finding_holds_the_answer() {
    let answer = chat("Your case is TICKET-1234.");
    let (worker, host, _stream, _, last) = forwarded_answer(&config(""), &answer);
    assert_eq!(last, Action::Pause);
    assert_eq!(host.last_path(), "/v1/reviews");
    let (_, call) = host.dispatched.last().unwrap();
    let review: Value = serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
    assert_eq!(review["kind"], "response");
    assert_eq!(
        review["evidence"]["hits"],
        json!([{"name":"ticket","action":"monitor","count":1}])
    );
    drop(worker);
}

#[test]
fn answers_no_rule_matches_leave_at_once() {
    // The phrase as written in look-alikes and across two texts still
    // matches; other answers pass.
    for (answer, held) in [
        (chat("all good"), false),
        (chat("write to bob@example.com"), false),
        (chat("INTERNAL  ONLY"), true),
        (
            json!({"id":"m","type":"message","role":"assistant","model":"m","stop_reason":"end_turn",
                "content":[{"type":"text","text":"inter"},{"type":"text","text":"nal only"}]}),
            true,
        ),
    ] {
        let (_worker, host, _stream, _, last) = forwarded_answer(&config(""), &answer);
        let paths = host.paths();
        assert_eq!(
            (
                last == Action::Pause,
                paths.last().unwrap() == "/v1/reviews"
            ),
            (held, held),
            "{answer}: {paths:?}"
        );
    }
}

#[test]
fn rules_on_the_answers_text_are_checked_at_load() {
    let masking = r#""masking":{"profiles":{"default":{"detectors":{"email":"monitor"}},
        "quiet":{"responses":false,"detectors":{"phone":"redact"}}}}"#;
    let load = |rule: &str| crate::testing::load_response_rule(&format!("{masking},"), rule);
    for ok in [
        r#"{"name":"r","action":"review","phrases":["p"],"streams":"block"}"#,
        r#"{"name":"r","action":"review","regex":["a+b"],"streams":"block"}"#,
        r#"{"name":"r","action":"review","detectors":["email"],"streams":"block"}"#,
    ] {
        assert!(load(ok).is_ok(), "{ok}: {:?}", load(ok));
    }
    for (rule, field, says) in [
        (
            r#"{"name":"r","action":"review","phrases":["p"]}"#,
            "content_policy.response_rules[0].streams",
            "first byte",
        ),
        // Buffering a whole stream for review is not supported (yet).
        (
            r#"{"name":"r","action":"review","phrases":["p"],"streams":"buffer"}"#,
            "content_policy.response_rules[0].streams",
            "unknown variant `buffer`",
        ),
        (
            r#"{"name":"r","action":"review","streams":"block"}"#,
            "content_policy.response_rules[0]",
            "no condition",
        ),
        (
            r#"{"name":"r","action":"review","phrases":["p"],"on_reject":"error","streams":"block"}"#,
            "content_policy.response_rules[0].on_reject",
            "always an error",
        ),
        (
            r#"{"name":"r","action":"review","tools":["x"],"detectors":["email"],"streams":"block"}"#,
            "content_policy.response_rules[0].tools",
            "not both",
        ),
        // No profile runs it over answers: it could never find one.
        (
            r#"{"name":"r","action":"review","detectors":["iban"],"streams":"block"}"#,
            "content_policy.response_rules[0].detectors[0]",
            "never find",
        ),
        (
            r#"{"name":"r","action":"review","detectors":["phone"],"streams":"block"}"#,
            "content_policy.response_rules[0].detectors[0]",
            "never find",
        ),
        (
            r#"{"name":"r","phrases":["p"],"detectors":["email"]}"#,
            "content_policy.response_rules[0].detectors",
            "`review`",
        ),
    ] {
        let got = load(rule);
        assert!(
            got.as_ref()
                .is_err_and(|(f, m)| f == field && m.contains(says)),
            "{rule}: {got:?}"
        );
    }
}

#[test]
fn held_answers_count_in_hold_limits_and_one_beyond_is_an_error() {
    let limits = r#""hold_limits":{"per_caller":1,"total":5,"retry_after_s":7},"#;
    let json = config("").replacen('{', &format!("{{{limits}"), 1);
    let answer = chat("internal only: the launch date");
    let (worker, mut host, _first, _, last) = forwarded_answer(&json, &answer);
    assert_eq!(last, Action::Pause);
    answer_last_call(&mut host, &worker, 201, &state("pending", ""));
    assert_eq!(worker.waiting_for_review(""), (1, 1));
    // A second held answer of the same caller in this worker: 429 in the
    // API's format instead of the answer, and no second review.
    let config = std::rc::Rc::new(crate::config::Config::from_json(json.as_bytes()).unwrap());
    let mut second =
        crate::testing::forwarded_on(&mut host, &worker, &config, ID + 1, (CHAT, REQUEST));
    let reviews = host.paths().iter().filter(|p| *p == "/v1/reviews").count();
    let (_, last) = answer_on(&mut host, &mut second, &answer);
    assert_eq!(last, Action::Continue);
    assert_eq!(
        host.paths().iter().filter(|p| *p == "/v1/reviews").count(),
        reviews
    );
    assert_eq!(host.response_headers[":status"], "429");
    assert_eq!(host.response_headers["retry-after"], "7");
    let error = sent(&host);
    assert_eq!(error["error"]["code"], "too_many_held_requests");
    assert!(!error.to_string().contains("launch date"));
    assert_eq!(worker.waiting_for_review(""), (1, 1));
    assert_eq!(host.violations.get(), 0);
}
