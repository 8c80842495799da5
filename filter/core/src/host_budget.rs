//! The host-call budget of the `allow` path (ARCHITECTURE.md, invariants).
//!
//! Every call from the VM into Envoy costs a crossing (and, for anything
//! that returns data, an allocation in the VM and a copy): on the `allow`
//! path they were most of the filter's cost. These tests drive one request
//! through [`StreamFilter`] and [`Worker`] with the demo configuration
//! (envoy/filter-config.json) and count the host calls per callback, so a
//! change that adds one fails here and has to raise the budget on purpose.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::rc::Rc;

use crate::config::Config;
use crate::hold::CalloutResult;
use crate::host::Action;
use crate::stream_filter::StreamFilter;
use crate::testing::MockHost;
use crate::worker::Worker;

/// The demo configuration, as shipped.
const DEMO: &str = include_str!("../../../envoy/filter-config.json");
/// A body the demo's `load-tests` rule (`demo-allow*`) allows.
const BODY: &[u8] =
    br#"{"model":"demo-allow-bench","messages":[{"role":"user","content":"Summarise the plan"}]}"#;
const ANSWER: &[u8] = br#"{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
const ID: u32 = 9;

/// The budget, per callback: the most host calls it may make.
struct Budget {
    request_headers: usize,
    request_body_chunk: usize,
    request_body_end: usize,
    /// Records on: the record's answer, on the worker (it resumes the stream).
    record_answer: usize,
    response_headers: usize,
    response_body_chunk: usize,
    log_and_drop: usize,
    /// Records on: the root context's tick that sends the response part,
    /// and its answer.
    response_record: usize,
}

/// The demo configuration with `overlay`'s top-level fields set.
fn demo(overlay: &str) -> Rc<Config> {
    let mut config: serde_json::Value = serde_json::from_str(DEMO).unwrap();
    let overlay: serde_json::Value = serde_json::from_str(overlay).unwrap();
    for (k, v) in overlay.as_object().unwrap() {
        config[k] = v.clone();
    }
    Rc::new(Config::from_json(config.to_string().as_bytes()).unwrap())
}

/// The request head as Envoy hands it over for a wrk request.
fn request(host: &mut MockHost) {
    host.request("POST", "/v1/chat/completions", BODY);
    for (name, value) in [
        (":scheme", "http"),
        ("content-length", "88"),
        ("x-forwarded-proto", "http"),
    ] {
        host.request_headers.insert(name.into(), value.into());
    }
}

/// The host calls of one callback, checked against its budget and added to
/// the request's total.
struct Tally {
    total: usize,
}

impl Tally {
    fn take(&mut self, what: &str, host: &MockHost, budget: usize) {
        let calls = host.take_calls();
        eprintln!("{what}: {} host calls {calls:?}", calls.len());
        assert!(
            calls.len() <= budget,
            "{what}: {} host calls, the budget is {budget}: {calls:?}",
            calls.len()
        );
        self.total += calls.len();
    }
}

/// Runs one allowed request through the filter and checks every callback
/// against `budget`; returns the total.
fn allowed_request(records: bool, budget: &Budget) -> usize {
    let overlay = if records {
        "{}"
    } else {
        r#"{"records":"off"}"#
    };
    let worker = Worker::new();
    let mut host = MockHost::new(&worker);
    let mut stream = StreamFilter::new(ID, Some(demo(overlay)), worker.clone());
    let mut tally = Tally { total: 0 };
    // Envoy 1.40 answers the route's name at its first place.
    host.properties
        .insert(vec!["xds".into(), "route_name".into()], b"model".to_vec());

    request(&mut host);
    assert_eq!(
        stream.on_request_headers(&mut host, false),
        Action::Continue
    );
    tally.take("request headers", &host, budget.request_headers);
    // The body arrives in two chunks; the first is only buffered.
    assert_eq!(stream.on_request_body(&mut host, 10, false), Action::Pause);
    tally.take("request body chunk", &host, budget.request_body_chunk);
    let verdict = stream.on_request_body(&mut host, BODY.len(), true);
    tally.take("request body end", &host, budget.request_body_end);
    if records {
        // Forwarded once the record is durable.
        assert_eq!(verdict, Action::Pause);
        // No record call in flight: the record goes at once, alone, as its
        // own `POST /v1/records` (with the trace), and no timer is set.
        assert_eq!(host.paths(), ["/v1/records"]);
        assert!(host.tick_periods.is_empty());
        host.answer = Some(CalloutResult {
            status: Some(201),
            body: br#"{"record_id":"rec_1"}"#.to_vec(),
        });
        host.effective = None;
        let token = host.last_token();
        worker.on_callout_response(&mut host, token, 48);
        assert_eq!(host.resumed, [Some(ID)]);
        tally.take("record answer", &host, budget.record_answer);
    } else {
        assert_eq!(verdict, Action::Continue);
        assert!(host.dispatched.is_empty());
    }
    assert_eq!(host.outcome().as_deref(), Some("allowed"));
    assert_eq!(host.metric("countersign_requests_allowed_total"), 1);
    // The header edits of an inspected request are made.
    assert!(!host.request_headers.contains_key("content-length"));
    assert_eq!(host.request_headers["accept-encoding"], "identity");

    // The model's answer: its head, then the body in two chunks.
    host.response_headers = [
        (":status", "200"),
        ("content-type", "application/json"),
        ("content-length", "190"),
        ("date", "Sat, 05 Dec 2026 07:00:00 GMT"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(
        stream.on_response_headers(&mut host, false),
        Action::Continue
    );
    tally.take("response headers", &host, budget.response_headers);
    assert_eq!(host.response_headers["x-countersign-outcome"], "allowed");
    // Nothing changes the answer's length: its content-length stays.
    assert_eq!(host.response_headers["content-length"], "190");
    let (first, rest) = ANSWER.split_at(40);
    for (piece, end) in [(first, false), (rest, true)] {
        host.response_chunk = piece.to_vec();
        assert_eq!(
            stream.on_response_body(&mut host, piece.len(), end),
            Action::Continue
        );
        // The answer passes as the model sent it.
        assert_eq!(host.response_chunk, piece);
        tally.take("response body chunk", &host, budget.response_body_chunk);
    }

    stream.on_log(&mut host);
    stream.on_drop(&mut host);
    tally.take("log and drop", &host, budget.log_and_drop);
    if records {
        // The root context's timer sends the response part of the record.
        worker.on_tick(&mut host);
        assert_eq!(host.last_path(), "/v1/records/rec_1/response");
        let (_, call) = host.dispatched.last().unwrap();
        let part: serde_json::Value =
            serde_json::from_slice(call.body.as_deref().unwrap()).unwrap();
        assert_eq!(part["completion"], "complete");
        assert_eq!(part["usage"]["total_tokens"], 4);
        host.answer = Some(CalloutResult {
            status: Some(201),
            body: b"{}".to_vec(),
        });
        host.effective = None;
        let token = host.last_token();
        worker.on_callout_response(&mut host, token, 2);
        assert_eq!(worker.queued(), (0, 0));
        tally.take("response record", &host, budget.response_record);
    }
    assert_eq!(host.violations.get(), 0);
    tally.total
}

// The budgets are the counts at the time they were set. Before the header
// maps were read whole and properties only when needed, the same requests
// made 23 host calls (records off) and 44 (records on); the request head
// alone made 18.

#[test]
fn the_allow_path_without_records_stays_within_its_host_call_budget() {
    let total = allowed_request(
        false,
        &Budget {
            // The header map; the clock; the nonce (no host call in Envoy:
            // the VM's own randomness); removing `content-length`, asking
            // for `accept-encoding: identity`.
            request_headers: 5,
            request_body_chunk: 0,
            // The body; the clock; the outcome's metric and filter state.
            request_body_end: 4,
            record_answer: 0,
            // `x-countersign-outcome`; the answer's head, once, for the
            // outcome headers an upstream may not set.
            response_headers: 2,
            response_body_chunk: 0,
            log_and_drop: 0,
            response_record: 0,
        },
    );
    assert!(total <= 11, "{total}");
}

#[test]
fn the_allow_path_with_records_stays_within_its_host_call_budget() {
    let total = allowed_request(
        true,
        &Budget {
            request_headers: 5,
            request_body_chunk: 0,
            // ... and the two properties the record carries, and the
            // record's call.
            request_body_end: 7,
            // The answer (status and body); the clock twice; back to the
            // stream; the outcome; resume.
            record_answer: 7,
            // `x-countersign-outcome`; the answer's head, once; the clock.
            response_headers: 3,
            // Each chunk is read for the record.
            response_body_chunk: 1,
            // The clock for the total time; the `held` gauge.
            log_and_drop: 2,
            response_record: 4,
        },
    );
    // A lone record is its own call, sent at once: no timer calls.
    assert!(total <= 29, "{total}");
}
