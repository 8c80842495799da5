//! Answers the filter cannot read as every client does, through the whole
//! stream (`StreamFilter` on a mock host): an SSE line that is no field,
//! data that is not one strict JSON value, a duplicate key in a plain
//! answer; and Responses deltas masked across events. Found by an
//! attack-minded review of the answer side.
#![allow(clippy::unwrap_used, clippy::panic)]

use serde_json::{json, Value};

use crate::host::Action;
use crate::testing::{forwarded, response_record};

const EMAIL: &str = "jane@example.com";
const CONFIG: &str = r#"{"masking":{"profiles":{"default":{"detectors":{"email":"redact"}}}},"default_action":"allow","record_batch_ms":0}"#;
const CHAT: &str = "/v1/chat/completions";
const CHAT_REQ: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_STREAM_REQ: &str =
    r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// `request` to `path` under `config`, answered with `content_type` in
/// `chunks`: what the caller got, and the response part of the record.
fn exchange_under(
    config: &str,
    path: &str,
    request: &str,
    content_type: &str,
    chunks: &[&[u8]],
) -> (String, Value) {
    let (worker, mut host, mut stream) = forwarded(config, 7, path, request.as_bytes());
    host.response_headers = [(":status", "200"), ("content-type", content_type)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let head = stream.on_response_headers(&mut host, false);
    // Only a plain answer, judged whole, keeps its head back until then.
    if content_type != "application/json" {
        assert_eq!(head, Action::Continue, "{content_type}");
    }
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let end = i + 1 == chunks.len();
        host.response_chunk = c.to_vec();
        let action = stream.on_response_body(&mut host, c.len(), end);
        if action == Action::Continue {
            out.extend(host.response_chunk.clone());
        }
    }
    let record = response_record(&mut host, &worker, &mut stream);
    assert_eq!(host.violations.get(), 0);
    (String::from_utf8(out).unwrap(), record)
}

fn exchange(path: &str, request: &str, content_type: &str, chunks: &[&[u8]]) -> (String, Value) {
    exchange_under(CONFIG, path, request, content_type, chunks)
}

/// The stream ended with the API's error event, recorded as blocked.
fn assert_blocked(out: &str, record: &Value) {
    assert!(!out.contains(EMAIL), "LEAK: {out}");
    assert!(out.contains("\"response_blocked\""), "{out}");
    assert_eq!(record["blocked_by"], "uninspectable", "{record}");
    assert!(!record.to_string().contains(EMAIL), "{record}");
}

#[test]
fn a_plain_json_answer_labelled_as_an_event_stream_is_blocked() {
    let body =
        json!({"choices":[{"index":0,"message":{"role":"assistant","content":EMAIL}}]}).to_string();
    let (out, record) = exchange(CHAT, CHAT_REQ, "text/event-stream", &[body.as_bytes()]);
    assert_blocked(&out, &record);
}

#[test]
fn json_lines_labelled_as_an_event_stream_are_blocked() {
    let body = format!(
        "{}\n{}\n",
        json!({"model":"m","message":{"role":"assistant","content":EMAIL},"done":false}),
        json!({"model":"m","done":true})
    );
    let (out, record) = exchange(
        "/api/chat",
        CHAT_REQ,
        "text/event-stream",
        &[body.as_bytes()],
    );
    assert_blocked(&out, &record);
}

#[test]
fn an_indented_data_line_blocks_the_stream() {
    let ev = format!(
        " data: {}\n\ndata: [DONE]\n\n",
        json!({"choices":[{"index":0,"delta":{"content":EMAIL}}]})
    );
    let (out, record) = exchange(CHAT, CHAT_STREAM_REQ, "text/event-stream", &[ev.as_bytes()]);
    assert_blocked(&out, &record);
}

/// A byte-order mark before the first `data:` line is dropped, as
/// EventSource and its kin drop it, and the event is masked.
#[test]
fn a_byte_order_mark_before_the_first_event_is_dropped_and_the_event_masked() {
    let ev = format!(
        "\u{feff}data: {}\n\ndata: [DONE]\n\n",
        json!({"choices":[{"index":0,"delta":{"content":format!("mail {EMAIL}")}}]})
    );
    let bytes = ev.as_bytes();
    for at in [0, 1, 2, 3, 4, bytes.len()] {
        let (out, record) = exchange(
            CHAT,
            CHAT_STREAM_REQ,
            "text/event-stream",
            &[&bytes[..at], &bytes[at..]],
        );
        assert!(!out.contains(EMAIL), "LEAK at {at}: {out}");
        assert!(
            out.starts_with("data: {") && out.contains("[EMAIL]"),
            "{out}"
        );
        assert_eq!(record["blocked_by"], Value::Null);
        assert_eq!(record["body"], "mail [EMAIL]");
    }
}

/// Data that is not JSON is never masked one event at a time: it blocks.
#[test]
fn text_data_split_over_events_blocks_the_stream() {
    let s = "data: mail jane@exa\n\ndata: mple.com\n\n";
    let (out, record) = exchange(CHAT, CHAT_STREAM_REQ, "text/event-stream", &[s.as_bytes()]);
    assert!(
        !out.contains("jane@exa") && !out.contains("mple.com"),
        "{out}"
    );
    assert_blocked(&out, &record);
}

/// A duplicate key hides a member the filter would not walk: a plain
/// answer is withheld, an event blocks the stream.
#[test]
fn a_duplicate_key_withholds_the_answer_or_blocks_the_stream() {
    let body = format!(
        r#"{{"choices":[{{"index":0,"message":{{"role":"assistant","content":"{EMAIL}"}}}}],"choices":[]}}"#
    );
    let (out, record) = exchange(CHAT, CHAT_REQ, "application/json", &[body.as_bytes()]);
    assert!(!out.contains(EMAIL), "LEAK: {out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["code"], "response_uninspectable", "{out}");
    assert_eq!(record["blocked_by"], "unreadable_response");
    // Its head waited with it: the caller and the record see 502.
    assert_eq!(record["status"], 502, "{record}");
    assert!(!record.to_string().contains(EMAIL), "{record}");

    let ev = format!(
        "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{EMAIL}\"}}}}],\"choices\":[]}}\n\ndata: [DONE]\n\n"
    );
    let (out, record) = exchange(CHAT, CHAT_STREAM_REQ, "text/event-stream", &[ev.as_bytes()]);
    assert_blocked(&out, &record);
}

fn responses_event(v: Value) -> String {
    format!("event: {}\ndata: {v}\n\n", v["type"].as_str().unwrap())
}

/// Code-interpreter code and MCP arguments are masked across deltas and
/// recorded; so is a delta type the table does not list.
#[test]
fn responses_tool_input_deltas_are_masked_across_deltas_and_recorded() {
    let req = r#"{"model":"m","stream":true,"input":"hi"}"#;
    for (delta, done, field) in [
        (
            "response.code_interpreter_call_code.delta",
            "response.code_interpreter_call_code.done",
            "code",
        ),
        (
            "response.mcp_call_arguments.delta",
            "response.mcp_call_arguments.done",
            "arguments",
        ),
        (
            "response.newly_added_thing.delta",
            "response.newly_added_thing.done",
            "text",
        ),
    ] {
        let whole = "print('jane@example.com')";
        let mut s = String::new();
        s += &responses_event(
            json!({"type":"response.output_item.added","output_index":0,"item":{"type":"x","id":"t"}}),
        );
        s += &responses_event(
            json!({"type":delta,"output_index":0,"item_id":"t","delta":"print('jane@exa"}),
        );
        s += &responses_event(
            json!({"type":delta,"output_index":0,"item_id":"t","delta":"mple.com')"}),
        );
        s += &responses_event(json!({"type":done,"output_index":0,"item_id":"t",field:whole}));
        s += &responses_event(
            json!({"type":"response.completed","response":{"id":"r","status":"completed","output":[]}}),
        );
        let (out, record) = exchange("/v1/responses", req, "text/event-stream", &[s.as_bytes()]);
        assert!(
            !out.contains(EMAIL) && !out.contains("jane@"),
            "LEAK {delta}: {out}"
        );
        let mut sent = String::new();
        for line in out.lines().filter_map(|l| l.strip_prefix("data: ")) {
            let v: Value = serde_json::from_str(line).unwrap();
            if v["type"] == delta {
                sent += v["delta"].as_str().unwrap();
            }
        }
        assert_eq!(sent, "print('[EMAIL]')", "{delta}");
        assert_eq!(record["body"], "print('[EMAIL]')", "{delta}: {record}");
        assert_eq!(record["blocked_by"], Value::Null);
    }
}

/// Under a tool-call review with nothing else guarding the answer, an
/// event the hold cannot read ends the stream with an error: a tool call
/// in it would pass unheld.
#[test]
fn a_held_stream_ends_at_an_event_it_cannot_read() {
    let config = r#"{"default_action":"allow","record_batch_ms":0,"content_policy":{"response_rules":[
        {"name":"dangerous-tools","action":"review","tools":["delete_*"]}]}}"#;
    let call = json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",
        "function":{"name":"delete_file","arguments":"{}"}}]},"finish_reason":null}]});
    let dup = call
        .to_string()
        .replacen("{\"choices\"", "{\"choices\":[],\"choices\"", 1);
    for bad in [format!(" data: {call}\n\n"), format!("data: {dup}\n\n")] {
        let s = format!(
            "data: {}\n\n{bad}data: [DONE]\n\n",
            json!({"choices":[{"index":0,"delta":{"content":"Sure."}}]})
        );
        let (out, _) = exchange_under(
            config,
            CHAT,
            CHAT_STREAM_REQ,
            "text/event-stream",
            &[s.as_bytes()],
        );
        assert!(!out.contains("delete_file"), "{bad}: {out}");
        assert!(out.contains("response_uninspectable"), "{bad}: {out}");
    }
}

/// Where masking only monitors, a stream whose channels cannot be followed
/// (an index clients read otherwise, `1.0`) passes unread from there on.
/// Before: its later hits went uncounted and nothing said so, so the
/// record passed for a clean answer. Now the record says `unscanned`, the
/// hits before that point stay, and `countersign_responses_unscanned_total`
/// counts the stream once.
#[test]
fn a_monitored_stream_that_passes_unread_says_so_in_its_record_and_metric() {
    const MONITOR: &str = r#"{"masking":{"profiles":{"default":{"detectors":{"email":"monitor"}}}},"default_action":"allow","record_batch_ms":0}"#;
    let gemini = "/v1beta/models/m:streamGenerateContent?alt=sse";
    let request = r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#;
    let chunk = |index: Value, text: &str| {
        format!(
            "data: {}\n\n",
            json!({"candidates":[{"index":index,"content":{"role":"model","parts":[{"text":text}]}}]})
        )
    };
    let run = |chunks: &[String]| {
        let (worker, mut host, mut stream) =
            crate::testing::forwarded(MONITOR, 7, gemini, request.as_bytes());
        host.response_headers = [(":status", "200"), ("content-type", "text/event-stream")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            stream.on_response_headers(&mut host, false),
            Action::Continue
        );
        for (i, c) in chunks.iter().enumerate() {
            host.response_chunk = c.as_bytes().to_vec();
            stream.on_response_body(&mut host, c.len(), i + 1 == chunks.len());
        }
        let metric = host.metric("countersign_responses_unscanned_total");
        (response_record(&mut host, &worker, &mut stream), metric)
    };
    let hits = |record: &Value| {
        record["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["count"].as_u64().unwrap())
            .sum::<u64>()
    };

    let unfollowable = [
        chunk(json!(0), &format!("mail {EMAIL} ")),
        chunk(json!(1.0), "x"),
        chunk(json!(0), &format!("and {EMAIL}")),
        chunk(json!(0), &format!("and {EMAIL}")),
    ];
    let (record, metric) = run(&unfollowable);
    assert_eq!(record["unscanned"], true, "{record}");
    assert_eq!(metric, 1);
    // The hit before the point is counted; those after were not read.
    assert_eq!(hits(&record), 1, "{record}");
    assert!(record["blocked_by"].is_null(), "{record}");

    // A stream read to its end says nothing of the kind.
    let followed = [
        chunk(json!(0), &format!("mail {EMAIL} ")),
        chunk(json!(0), &format!("and {EMAIL}")),
    ];
    let (record, metric) = run(&followed);
    assert!(record.get("unscanned").is_none(), "{record}");
    assert_eq!(metric, 0);
    assert_eq!(hits(&record), 2, "{record}");
}
