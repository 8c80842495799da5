//! Router tests through `tower::ServiceExt::oneshot`, and real-TCP tests for
//! what only a socket shows (counting on headers, chunk timing, the binary).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use axum::Router;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

fn post(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

/// Body frames of a streamed response, one `String` per frame.
async fn frames(app: &Router, req: Request<Body>) -> Vec<String> {
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.into_body().into_data_stream();
    let mut out = Vec::new();
    while let Some(frame) = stream.next().await {
        out.push(String::from_utf8(frame.unwrap().to_vec()).unwrap());
    }
    out
}

#[tokio::test]
async fn chat_completion_echoes_last_user_message() {
    let app = demo_backend::app();
    let (status, v) = call(
        &app,
        post(
            "/v1/chat/completions",
            &json!({
                "model": "m1",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "first"},
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "hello "},
                        {"type": "image_url", "image_url": {"url": "x"}},
                        {"type": "text", "text": "world"}
                    ]}
                ]
            }),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "m1");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello world");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // prompt: "be brief" + "first" + "ok" + "hello world" = 6 words
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9})
    );
}

#[tokio::test]
async fn chat_stream_chunks_concatenate_to_reply_and_end_with_done() {
    let app = demo_backend::app();
    let frames = frames(
        &app,
        post(
            "/v1/chat/completions",
            &json!({
                "model": "m1",
                "stream": true,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "the quick  brown fox"}]
            }),
        ),
    )
    .await;
    // role chunk + 5 words + stop chunk + usage chunk + [DONE], each its own frame.
    assert_eq!(frames.len(), 9, "{frames:?}");
    assert!(frames
        .iter()
        .all(|f| f.starts_with("data: ") && f.ends_with("\n\n")));
    assert_eq!(frames.last().unwrap(), "data: [DONE]\n\n");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f.trim_start_matches("data: ").trim()).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "echo: the quick  brown fox");
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[7]["choices"], json!([]));
    assert_eq!(chunks[7]["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn chat_stream_without_usage_has_no_usage_chunk() {
    let app = demo_backend::app();
    let frames = frames(
        &app,
        post(
            "/v1/chat/completions",
            &json!({"stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        ),
    )
    .await;
    // role + "echo: " + "hi" + stop + [DONE]
    assert_eq!(frames.len(), 5, "{frames:?}");
    assert!(!frames.iter().any(|f| f.contains("usage")));
}

#[tokio::test]
async fn anthropic_message_and_stream_event_order() {
    let app = demo_backend::app();
    let req = json!({
        "model": "claude-x",
        "max_tokens": 10,
        "system": "sys words",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]
    });
    let (status, v) = call(&app, post("/v1/messages", &req)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-x");
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "echo: hi there"}])
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"], json!({"input_tokens": 4, "output_tokens": 3}));

    let mut stream_req = req.clone();
    stream_req["stream"] = json!(true);
    let frames = frames(&app, post("/v1/messages", &stream_req)).await;
    let mut names = Vec::new();
    let mut text = String::new();
    for f in &frames {
        let (event, data) = f
            .strip_suffix("\n\n")
            .and_then(|f| f.split_once('\n'))
            .unwrap();
        let name = event.strip_prefix("event: ").unwrap();
        let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["type"], name);
        if name == "content_block_delta" {
            assert_eq!(data["delta"]["type"], "text_delta");
            text.push_str(data["delta"]["text"].as_str().unwrap());
        }
        if name == "message_delta" {
            assert_eq!(data["delta"]["stop_reason"], "end_turn");
            assert_eq!(data["usage"]["output_tokens"], 3);
        }
        names.push(name.to_owned());
    }
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(text, "echo: hi there");
}

#[tokio::test]
async fn other_endpoints() {
    let app = demo_backend::app();

    let (_, v) = call(
        &app,
        post(
            "/v1/completions",
            &json!({"model": "c", "prompt": ["p q", "x"]}),
        ),
    )
    .await;
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "echo: p q");

    let frames = frames(
        &app,
        post("/v1/completions", &json!({"prompt": "a b", "stream": true})),
    )
    .await;
    assert_eq!(frames.last().unwrap(), "data: [DONE]\n\n");
    let text: String = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str::<Value>(f.trim_start_matches("data: ").trim()).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, "echo: a b");

    let (_, v) = call(
        &app,
        post("/v1/responses", &json!({"model": "r", "input": "tell me"})),
    )
    .await;
    assert_eq!(v["object"], "response");
    assert_eq!(v["output_text"], "echo: tell me");
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(
        v["output"][0]["content"][0],
        json!({"type": "output_text", "text": "echo: tell me", "annotations": []})
    );
    let (_, v) = call(
        &app,
        post(
            "/v1/responses",
            &json!({"input": [
                {"role": "user", "content": "old"},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "new"}]}
            ]}),
        ),
    )
    .await;
    assert_eq!(v["output_text"], "echo: new");

    let (_, v) = call(
        &app,
        post(
            "/v1/embeddings",
            &json!({"model": "e", "input": ["a", "b", "a"]}),
        ),
    )
    .await;
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data[2]["index"], 2);
    assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 8);
    assert_eq!(data[0]["embedding"], data[2]["embedding"]);
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);

    let (status, v) = call(
        &app,
        Request::get("/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["object"], "list");
    assert_eq!(
        v["data"][0],
        json!({"id": "demo-echo", "object": "model", "created": 0, "owned_by": "countersign"})
    );
}

#[tokio::test]
async fn malformed_json_is_400_invalid_request_error() {
    let app = demo_backend::app();
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/messages",
    ] {
        let req = Request::post(path).body(Body::from("{not json")).unwrap();
        let (status, v) = call(&app, req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{path}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("JSON"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn request_log_and_reset() {
    let app = demo_backend::app();
    let req = Request::post("/v1/chat/completions?trace=1")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .header("X-Case", "v")
        .body(Body::from(
            r#"{"messages":[{"role":"user","content":"hé"}]}"#,
        ))
        .unwrap();
    call(&app, req).await;
    call(&app, Request::get("/nope").body(Body::empty()).unwrap()).await;
    // Introspection itself is neither logged nor counted.
    call(
        &app,
        Request::get("/_demo/stats").body(Body::empty()).unwrap(),
    )
    .await;

    let (_, log) = call(
        &app,
        Request::get("/_demo/requests").body(Body::empty()).unwrap(),
    )
    .await;
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["method"], "POST");
    assert_eq!(log[0]["path"], "/v1/chat/completions?trace=1");
    assert_eq!(log[0]["headers"]["x-multi"], "a, b");
    assert_eq!(log[0]["headers"]["x-case"], "v");
    assert_eq!(
        log[0]["body"],
        r#"{"messages":[{"role":"user","content":"hé"}]}"#
    );
    assert_eq!(log[1]["path"], "/nope");

    let (_, stats) = call(
        &app,
        Request::get("/_demo/stats").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(stats, json!({"started": 2, "completed": 2, "streaming": 0}));

    call(
        &app,
        Request::post("/_demo/reset").body(Body::empty()).unwrap(),
    )
    .await;
    let (_, stats) = call(
        &app,
        Request::get("/_demo/stats").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(stats, json!({"started": 0, "completed": 0, "streaming": 0}));
    let (_, log) = call(
        &app,
        Request::get("/_demo/requests").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(log, json!([]));
}

#[tokio::test]
async fn streaming_counts_answers_still_being_sent() {
    let app = demo_backend::app();
    let streaming = |app: Router| async move {
        let (_, stats) = call(
            &app,
            Request::get("/_demo/stats").body(Body::empty()).unwrap(),
        )
        .await;
        stats["streaming"].clone()
    };
    let stream_of = |app: Router, words: &str| {
        let body = json!({"messages": [{"role": "user", "content": words}], "stream": true});
        async move {
            app.oneshot(post("/v1/chat/completions", &body))
                .await
                .unwrap()
        }
    };
    let resp = stream_of(app.clone(), "one two three").await;
    let mut body = resp.into_body().into_data_stream();
    body.next().await.unwrap().unwrap();
    assert_eq!(streaming(app.clone()).await, 1, "events left to send");
    while body.next().await.is_some() {}
    drop(body);
    assert_eq!(streaming(app.clone()).await, 0, "all sent");
    // A caller that goes away ends the count too; plain answers never count.
    let resp = stream_of(app.clone(), "one two").await;
    assert_eq!(streaming(app.clone()).await, 1);
    drop(resp);
    assert_eq!(streaming(app.clone()).await, 0);
    call(
        &app,
        post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}]}),
        ),
    )
    .await;
    assert_eq!(streaming(app.clone()).await, 0);
}

#[tokio::test]
async fn request_log_keeps_last_200() {
    let app = demo_backend::app();
    for i in 0..205 {
        let req = Request::get(format!("/v1/models?i={i}"))
            .body(Body::empty())
            .unwrap();
        app.clone().oneshot(req).await.unwrap();
    }
    let (_, log) = call(
        &app,
        Request::get("/_demo/requests").body(Body::empty()).unwrap(),
    )
    .await;
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 200);
    assert_eq!(log[0]["path"], "/v1/models?i=5");
    assert_eq!(log[199]["path"], "/v1/models?i=204");
}

// ---------------------------------------------------------------- real TCP

async fn spawn_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, demo_backend::app()).await });
    addr
}

/// One request on its own connection; returns the raw response.
async fn raw(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

async fn stats(addr: SocketAddr) -> Value {
    let resp = raw(
        addr,
        "GET /_demo/stats HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let body = resp.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap()
}

#[tokio::test]
async fn started_counts_a_request_whose_body_never_finishes() {
    let addr = spawn_server().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    s.flush().await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = stats(addr).await;
        if v["started"] == 1 {
            assert_eq!(v["completed"], 0);
            break;
        }
        assert!(Instant::now() < deadline, "started never counted: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        stats(addr).await,
        json!({"started": 1, "completed": 0, "streaming": 0})
    );
    drop(s);
}

#[tokio::test]
async fn delayed_stream_first_chunk_arrives_before_the_end() {
    let addr = spawn_server().await;
    let body = r#"{"stream":true,"messages":[{"role":"user","content":"a b c"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-demo-chunk-delay-ms: 100\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut first_chunk_at = None;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if first_chunk_at.is_none()
            && String::from_utf8_lossy(&seen).contains("chat.completion.chunk")
        {
            first_chunk_at = Some(start.elapsed());
        }
    }
    let total = start.elapsed();
    let text = String::from_utf8(seen).unwrap();
    assert!(text.contains("content-type: text/event-stream"), "{text}");
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    assert!(text.contains("data: [DONE]"), "{text}");
    // 7 events (role, 4 words, stop, [DONE]) => 6 gaps of 100 ms.
    let first = first_chunk_at.unwrap();
    assert!(
        first < Duration::from_millis(300),
        "first chunk after {first:?}"
    );
    assert!(
        total >= Duration::from_millis(600),
        "stream took only {total:?}"
    );
}

#[tokio::test]
async fn binary_prints_listen_line_and_exits_on_sigterm() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_demo-backend"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("demo-backend listening on ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .parse()
        .unwrap();
    assert_eq!(
        stats(addr).await,
        json!({"started": 0, "completed": 0, "streaming": 0})
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- gzip

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn post_with(path: &str, body: &Value, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = post(path, body);
    for (k, v) in headers {
        req.headers_mut().append(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            axum::http::HeaderValue::from_str(v).unwrap(),
        );
    }
    req
}

/// Status, headers and raw (undecoded) body bytes.
async fn call_raw(
    app: &Router,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = to_bytes(body, usize::MAX).await.unwrap();
    (parts.status, parts.headers, bytes.to_vec())
}

#[test]
fn accept_encoding_parsing() {
    let accepts = |v: &str| {
        let mut h = axum::http::HeaderMap::new();
        h.insert("accept-encoding", v.parse().unwrap());
        demo_backend::accepts_gzip(&h)
    };
    assert!(accepts("gzip"));
    assert!(accepts("gzip, deflate, br, zstd"));
    assert!(accepts("deflate, GZIP;q=0.5"));
    assert!(accepts("x-gzip"));
    assert!(accepts("*"));
    assert!(!accepts("identity"));
    assert!(!accepts("deflate, br"));
    assert!(!accepts("gzip;q=0"));
    assert!(!accepts("*, gzip; q=0.0"));
    assert!(!accepts("*;q=0"));
    assert!(!demo_backend::accepts_gzip(&axum::http::HeaderMap::new()));
}

#[tokio::test]
async fn plain_answers_are_gzipped_when_accepted_or_forced() {
    let app = demo_backend::app();
    let bodies = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "zip me"}]}),
        ),
        ("/v1/completions", json!({"prompt": "zip me"})),
        ("/v1/responses", json!({"input": "zip me"})),
        (
            "/v1/messages",
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": "zip me"}]}),
        ),
        ("/v1/embeddings", json!({"input": "zip me"})),
        (
            "/v1beta/models/g:generateContent",
            json!({"contents": [{"parts": [{"text": "zip me"}]}]}),
        ),
    ];
    for (path, body) in &bodies {
        let (_, plain) = call(&app, post(path, body)).await;
        for headers in [
            &[("accept-encoding", "gzip, deflate")][..],
            &[("x-demo-content-encoding", "gzip")][..],
            &[
                ("accept-encoding", "identity"),
                ("x-demo-content-encoding", "gzip"),
            ][..],
        ] {
            let (status, h, raw) = call_raw(&app, post_with(path, body, headers)).await;
            assert_eq!(status, StatusCode::OK, "{path} {headers:?}");
            assert_eq!(h["content-encoding"], "gzip", "{path} {headers:?}");
            assert_eq!(h["vary"], "accept-encoding");
            assert_eq!(h["content-type"], "application/json");
            assert_eq!(&raw[..2], [0x1f, 0x8b], "gzip magic");
            assert!(!String::from_utf8_lossy(&raw).contains("zip me"));
            let v: Value = serde_json::from_slice(&gunzip(&raw)).unwrap();
            // Ids differ per request; the answer itself is the same.
            assert_eq!(v["model"], plain["model"], "{path}");
            assert_eq!(v["usage"], plain["usage"], "{path}");
            assert_eq!(v.get("choices"), plain.get("choices"), "{path}");
            assert_eq!(v.get("content"), plain.get("content"), "{path}");
            assert_eq!(v.get("output_text"), plain.get("output_text"), "{path}");
            assert_eq!(v.get("data"), plain.get("data"), "{path}");
            assert_eq!(v.get("candidates"), plain.get("candidates"), "{path}");
        }
        for headers in [
            &[][..],
            &[("accept-encoding", "identity")][..],
            &[("accept-encoding", "br, gzip;q=0")][..],
            &[
                ("accept-encoding", "gzip"),
                ("x-demo-content-encoding", "identity"),
            ][..],
        ] {
            let (status, h, raw) = call_raw(&app, post_with(path, body, headers)).await;
            assert_eq!(status, StatusCode::OK, "{path} {headers:?}");
            assert!(h.get("content-encoding").is_none(), "{path} {headers:?}");
            serde_json::from_slice::<Value>(&raw).unwrap();
        }
    }
}

#[tokio::test]
async fn errors_are_gzipped_too_and_a_bad_control_header_is_400() {
    let app = demo_backend::app();
    let req = Request::post("/v1/chat/completions")
        .header("accept-encoding", "gzip")
        .body(Body::from("{not json"))
        .unwrap();
    let (status, h, raw) = call_raw(&app, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(h["content-encoding"], "gzip");
    let v: Value = serde_json::from_slice(&gunzip(&raw)).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let (status, v) = call(
        &app,
        post_with(
            "/v1/chat/completions",
            &json!({"messages": []}),
            &[("x-demo-content-encoding", "br")],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("x-demo-content-encoding"));
}

#[tokio::test]
async fn introspection_is_never_gzipped() {
    let app = demo_backend::app();
    for path in ["/_demo/stats", "/_demo/requests"] {
        let req = Request::get(path)
            .header("accept-encoding", "gzip")
            .header("x-demo-content-encoding", "gzip")
            .body(Body::empty())
            .unwrap();
        let (status, h, raw) = call_raw(&app, req).await;
        assert_eq!(status, StatusCode::OK);
        assert!(h.get("content-encoding").is_none(), "{path}");
        serde_json::from_slice::<Value>(&raw).unwrap();
    }
}

#[tokio::test]
async fn streams_are_one_gzip_stream_decodable_event_by_event() {
    let app = demo_backend::app();
    let secret = "dana.scully@fbi.example.org";
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        ("/v1/completions", json!({"stream": true, "prompt": "hi"})),
        ("/v1/responses", json!({"stream": true, "input": "hi"})),
        (
            "/v1/messages",
            json!({"stream": true, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1beta/models/g:streamGenerateContent?alt=sse",
            json!({"contents": [{"parts": [{"text": "hi"}]}]}),
        ),
    ] {
        let reply = format!("write to {secret} now");
        let plain = frames(&app, post_with(path, &body, &[("x-demo-reply", &reply)]))
            .await
            .concat();
        let req = post_with(
            path,
            &body,
            &[("accept-encoding", "gzip"), ("x-demo-reply", &reply)],
        );
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert_eq!(resp.headers()["content-encoding"], "gzip");
        assert!(resp.headers().get("content-length").is_none());
        let mut stream = resp.into_body().into_data_stream();
        let mut raw = Vec::new();
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        let mut frames = 0;
        while let Some(frame) = stream.next().await {
            let frame = frame.unwrap();
            raw.extend_from_slice(&frame);
            std::io::Write::write_all(&mut decoder, &frame).unwrap();
            std::io::Write::flush(&mut decoder).unwrap();
            let so_far = String::from_utf8(decoder.get_ref().clone()).unwrap();
            // Every frame but the gzip trailer completes an event.
            assert!(so_far.ends_with("\n\n"), "{path}: {so_far:?}");
            frames += 1;
        }
        let decoded = decoder.finish().unwrap();
        assert!(frames > 3, "{path}");
        assert!(!String::from_utf8_lossy(&raw).contains(secret), "{path}");
        let decoded = String::from_utf8(decoded).unwrap();
        assert_eq!(gunzip(&raw), decoded.as_bytes());
        // The same events as uncompressed (ids aside).
        assert_eq!(
            decoded.matches("\n\n").count(),
            plain.matches("\n\n").count(),
            "{path}"
        );
        assert!(decoded.contains(secret), "{path}");
    }
}

// ---------------------------------------------------------------- logprobs

/// Concatenated `token`s of a list of logprob entries.
fn tokens(entries: &Value) -> String {
    entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let t = e["token"].as_str().unwrap();
            assert_eq!(e["bytes"], json!(t.as_bytes()), "bytes spell the token");
            assert!(e["logprob"].as_f64().unwrap() <= 0.0);
            t.to_owned()
        })
        .collect()
}

/// `data:` payloads of an SSE stream (without `[DONE]`).
fn sse_json(frames: &[String]) -> Vec<Value> {
    frames
        .concat()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn chat_logprobs_spell_the_answer() {
    let app = demo_backend::app();
    let reply = "card 4111 1111 1111 1111 ok";
    let body = json!({"logprobs": true, "top_logprobs": 2, "messages": [{"role": "user", "content": "hi"}]});
    let (_, v) = call(
        &app,
        post_with("/v1/chat/completions", &body, &[("x-demo-reply", reply)]),
    )
    .await;
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["refusal"], Value::Null);
    assert_eq!(tokens(&lp["content"]), reply);
    let first = &lp["content"][0];
    assert_eq!(first["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(first["top_logprobs"][0]["token"], first["token"]);
    assert_eq!(first["top_logprobs"][0]["logprob"], first["logprob"]);

    // Not asked: null, as before; `top_logprobs` alone does not ask.
    for body in [
        json!({"messages": [{"role": "user", "content": "hi"}]}),
        json!({"logprobs": false, "top_logprobs": 2, "messages": [{"role": "user", "content": "hi"}]}),
    ] {
        let (_, v) = call(&app, post("/v1/chat/completions", &body)).await;
        assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    }

    // Streamed: each chunk's logprobs cover that chunk's text.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let chunks = sse_json(
        &frames(
            &app,
            post_with(
                "/v1/chat/completions",
                &stream,
                &[("x-demo-reply", reply), ("x-demo-chunk-chars", "3")],
            ),
        )
        .await,
    );
    let mut text = String::new();
    let mut spelled = String::new();
    for c in &chunks {
        let choice = &c["choices"][0];
        if let Some(t) = choice["delta"]["content"]
            .as_str()
            .filter(|t| !t.is_empty())
        {
            assert_eq!(tokens(&choice["logprobs"]["content"]), t);
            text.push_str(t);
        } else {
            assert_eq!(choice["logprobs"], Value::Null);
        }
        if let Some(content) = choice["logprobs"]["content"].as_array() {
            spelled += &tokens(&json!(content));
        }
    }
    assert_eq!(text, reply);
    assert_eq!(spelled, reply);
}

#[tokio::test]
async fn completions_logprobs_spell_the_answer() {
    let app = demo_backend::app();
    let reply = "the launch codes are 42";
    let (_, v) = call(
        &app,
        post_with(
            "/v1/completions",
            &json!({"prompt": "p", "logprobs": 2}),
            &[("x-demo-reply", reply)],
        ),
    )
    .await;
    let lp = &v["choices"][0]["logprobs"];
    let toks: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(toks.concat(), reply);
    assert_eq!(lp["text_offset"], json!([0, 4, 11, 17, 21]));
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), toks.len());
    let top = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), toks.len());
    assert_eq!(top[0].as_object().unwrap().len(), 2);
    assert_eq!(top[0][toks[0]], lp["token_logprobs"][0]);

    let (_, v) = call(&app, post("/v1/completions", &json!({"prompt": "p"}))).await;
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);

    let chunks = sse_json(
        &frames(
            &app,
            post_with(
                "/v1/completions",
                &json!({"prompt": "p", "logprobs": 0, "stream": true}),
                &[("x-demo-reply", reply)],
            ),
        )
        .await,
    );
    let mut spelled = String::new();
    let mut offsets = Vec::new();
    for c in &chunks {
        let choice = &c["choices"][0];
        let text = choice["text"].as_str().unwrap();
        if text.is_empty() {
            assert_eq!(choice["logprobs"], Value::Null);
            continue;
        }
        assert_eq!(choice["logprobs"]["tokens"], json!([text]));
        assert_eq!(choice["logprobs"]["top_logprobs"], Value::Null);
        offsets.push(choice["logprobs"]["text_offset"][0].clone());
        spelled.push_str(text);
    }
    assert_eq!(spelled, reply);
    assert_eq!(json!(offsets), json!([0, 4, 11, 17, 21]));
}

#[tokio::test]
async fn responses_logprobs_spell_the_answer() {
    let app = demo_backend::app();
    let reply = "mail dana.scully@fbi.example.org today";
    for body in [
        json!({"input": "hi", "top_logprobs": 1}),
        json!({"input": "hi", "include": ["message.output_text.logprobs"]}),
    ] {
        let (_, v) = call(
            &app,
            post_with("/v1/responses", &body, &[("x-demo-reply", reply)]),
        )
        .await;
        let part = &v["output"][0]["content"][0];
        assert_eq!(part["type"], "output_text");
        assert_eq!(tokens(&part["logprobs"]), reply);
        let want_top = body["top_logprobs"].as_u64().unwrap_or(0) as usize;
        assert_eq!(
            part["logprobs"][0]["top_logprobs"]
                .as_array()
                .unwrap()
                .len(),
            want_top
        );

        let mut stream = body.clone();
        stream["stream"] = json!(true);
        let events = sse_json(
            &frames(
                &app,
                post_with("/v1/responses", &stream, &[("x-demo-reply", reply)]),
            )
            .await,
        );
        let mut spelled = String::new();
        for e in &events {
            if e["type"] == "response.output_text.delta" {
                assert_eq!(tokens(&e["logprobs"]), e["delta"].as_str().unwrap());
                spelled += &tokens(&e["logprobs"]);
            }
        }
        assert_eq!(spelled, reply);
        let completed = events.last().unwrap();
        assert_eq!(completed["type"], "response.completed");
        assert_eq!(
            tokens(&completed["response"]["output"][0]["content"][0]["logprobs"]),
            reply
        );
    }
    let (_, v) = call(
        &app,
        post(
            "/v1/responses",
            &json!({"input": "hi", "include": ["reasoning.encrypted_content"]}),
        ),
    )
    .await;
    assert!(v["output"][0]["content"][0].get("logprobs").is_none());
}

#[tokio::test]
async fn forced_logprobs_come_unasked() {
    let app = demo_backend::app();
    let forced = [("x-demo-logprobs", "always"), ("x-demo-reply", "a b")];
    let (_, v) = call(
        &app,
        post_with(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
            &forced,
        ),
    )
    .await;
    assert_eq!(tokens(&v["choices"][0]["logprobs"]["content"]), "a b");
    assert_eq!(
        v["choices"][0]["logprobs"]["content"][0]["top_logprobs"],
        json!([])
    );
    let (_, v) = call(
        &app,
        post_with("/v1/completions", &json!({"prompt": "hi"}), &forced),
    )
    .await;
    assert_eq!(v["choices"][0]["logprobs"]["tokens"], json!(["a ", "b"]));
    let (_, v) = call(
        &app,
        post_with("/v1/responses", &json!({"input": "hi"}), &forced),
    )
    .await;
    assert_eq!(tokens(&v["output"][0]["content"][0]["logprobs"]), "a b");
    // Streamed too.
    let chunks = sse_json(
        &frames(
            &app,
            post_with(
                "/v1/chat/completions",
                &json!({"stream": true, "messages": [{"role": "user", "content": "hi"}]}),
                &forced,
            ),
        )
        .await,
    );
    let spelled: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(|c| tokens(&json!(c)))
        .collect();
    assert_eq!(spelled, "a b");

    let (status, v) = call(
        &app,
        post_with(
            "/v1/chat/completions",
            &json!({"messages": []}),
            &[("x-demo-logprobs", "sometimes")],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("x-demo-logprobs"));
}

#[tokio::test]
async fn request_log_shows_accept_encoding() {
    let app = demo_backend::app();
    call_raw(
        &app,
        post_with(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
            &[("accept-encoding", "identity")],
        ),
    )
    .await;
    let (_, log) = call(
        &app,
        Request::get("/_demo/requests").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(log[0]["headers"]["accept-encoding"], "identity");
}

// ---------------------------------------------------------------- Gemini

#[tokio::test]
async fn gemini_generate_content_echoes_and_streams() {
    let app = demo_backend::app();
    let req = json!({
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "contents": [
            {"role": "user", "parts": [{"text": "old"}]},
            {"role": "model", "parts": [{"text": "ok"}]},
            {"role": "user", "parts": [{"text": "hello "}, {"text": "gemini"}]}
        ]
    });
    for prefix in ["/v1beta/models", "/v1/models"] {
        let (status, v) = call(
            &app,
            post(&format!("{prefix}/gemini-x:generateContent"), &req),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let c = &v["candidates"][0];
        assert_eq!(
            c["content"],
            json!({"role": "model", "parts": [{"text": "echo: hello gemini"}]})
        );
        assert_eq!(c["finishReason"], "STOP");
        assert!(c.get("logprobsResult").is_none());
        assert_eq!(v["modelVersion"], "gemini-x");
        // prompt: "be brief" + "old" + "ok" + "hello gemini" = 6 words
        assert_eq!(
            v["usageMetadata"],
            json!({"promptTokenCount": 6, "candidatesTokenCount": 3, "totalTokenCount": 9})
        );
    }

    // ?alt=sse: one SSE event per word, the last one finished with usage.
    let frames = frames(
        &app,
        post(
            "/v1beta/models/gemini-x:streamGenerateContent?alt=sse",
            &req,
        ),
    )
    .await;
    assert_eq!(frames.len(), 3, "{frames:?}");
    let chunks = sse_json(&frames);
    let text: String = chunks
        .iter()
        .map(|c| {
            c["candidates"][0]["content"]["parts"][0]["text"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(text, "echo: hello gemini");
    assert!(chunks[..2]
        .iter()
        .all(|c| c["candidates"][0].get("finishReason").is_none()));
    assert_eq!(chunks[2]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(chunks[2]["usageMetadata"]["totalTokenCount"], 9);

    // Without alt=sse: the same chunks as one JSON array.
    let (status, v) = call(
        &app,
        post("/v1beta/models/gemini-x:streamGenerateContent", &req),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert_eq!(
        v[2]["candidates"][0]["content"]["parts"][0]["text"],
        "gemini"
    );

    for path in [
        "/v1beta/models/gemini-x:countTokens",
        "/v1beta/models/:generateContent",
        "/v1beta/models/gemini-x",
    ] {
        let (status, _) = call(&app, post(path, &req)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    // Other methods on /v1/models/{id} still get a 404.
    let (status, _) = call(
        &app,
        Request::get("/v1/models/demo-echo")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn gemini_logprobs_spell_the_answer() {
    let app = demo_backend::app();
    let reply = "mail dana.scully@fbi.example.org now";
    let spelled = |result: &Value| -> String {
        result["chosenCandidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["token"].as_str().unwrap().to_owned())
            .collect()
    };
    for (config, headers) in [
        (
            json!({"responseLogprobs": true, "logprobs": 2}),
            vec![("x-demo-reply", reply)],
        ),
        (
            json!({"response_logprobs": true}),
            vec![("x-demo-reply", reply)],
        ),
        (
            json!({}),
            vec![("x-demo-reply", reply), ("x-demo-logprobs", "always")],
        ),
    ] {
        let req = json!({"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": config});
        let (_, v) = call(
            &app,
            post_with("/v1beta/models/g:generateContent", &req, &headers),
        )
        .await;
        let result = &v["candidates"][0]["logprobsResult"];
        assert_eq!(spelled(result), reply, "{config}");
        let top = result["topCandidates"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let want = config["logprobs"].as_u64().unwrap_or(0) as usize;
        assert_eq!(top[0]["candidates"].as_array().unwrap().len(), want);

        let chunks = sse_json(
            &frames(
                &app,
                post_with(
                    "/v1beta/models/g:streamGenerateContent?alt=sse",
                    &req,
                    &headers,
                ),
            )
            .await,
        );
        let streamed: String = chunks
            .iter()
            .map(|c| spelled(&c["candidates"][0]["logprobsResult"]))
            .collect();
        assert_eq!(streamed, reply);
    }
    let (_, v) = call(
        &app,
        post(
            "/v1beta/models/g:generateContent",
            &json!({"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"responseLogprobs": false}}),
        ),
    )
    .await;
    assert!(v["candidates"][0].get("logprobsResult").is_none());
}

// ---------------------------------------------------------------- Ollama

/// The lines of an Ollama answer (JSON lines), each parsed.
async fn ndjson(app: &Router, req: Request<Body>) -> Vec<Value> {
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let bytes = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(text.ends_with('\n'), "{text}");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn ollama_chat_streams_json_lines_by_default() {
    let app = demo_backend::app();
    let req = json!({"model": "llama3", "think": true, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello ollama"}]});
    let lines = ndjson(&app, post("/api/chat", &req)).await;
    assert_eq!(
        lines[0]["message"]["thinking"],
        "thinking about: hello ollama"
    );
    let text: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "echo: hello ollama");
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(
        (
            last["prompt_eval_count"].as_u64(),
            last["eval_count"].as_u64()
        ),
        (Some(4), Some(3))
    );
    assert!(lines[..lines.len() - 1].iter().all(|l| l["done"] == false));
    assert!(last["created_at"].as_str().unwrap().ends_with('Z'));

    // `stream: false`: one object.
    let (status, v) = call(
        &app,
        post(
            "/api/chat",
            &json!({"model": "llama3", "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        v["message"],
        json!({"role": "assistant", "content": "echo: hi"})
    );
    assert_eq!(v["done"], true);
    // No messages: the model is loaded, nothing is generated.
    let (_, v) = call(
        &app,
        post("/api/chat", &json!({"model": "llama3", "messages": []})),
    )
    .await;
    assert_eq!(
        (v["done_reason"].as_str(), v["done"].as_bool()),
        (Some("load"), Some(true))
    );
    let (status, v) = call(&app, post("/api/chat", &json!({"messages": []}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "model is required");
}

#[tokio::test]
async fn ollama_generate_answers_with_context_and_logprobs() {
    let app = demo_backend::app();
    let req = json!({"model": "llama3", "system": "be brief", "prompt": "say hi", "stream": false,
                     "logprobs": true, "top_logprobs": 2});
    let (status, v) = call(&app, post("/api/generate", &req)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["response"], "echo: say hi");
    assert_eq!(v["prompt_eval_count"], 4);
    assert_eq!(v["context"].as_array().unwrap().len(), 7);
    assert_eq!(tokens(&v["logprobs"]), "echo: say hi");
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let lines = ndjson(&app, post("/api/generate", &streamed)).await;
    let text: String = lines
        .iter()
        .map(|l| l["response"].as_str().unwrap())
        .collect();
    assert_eq!(text, "echo: say hi");
    assert!(lines.last().unwrap()["context"].is_array());
    assert!(lines[0]["logprobs"][0]["top_logprobs"].is_array());
}

// ---------------------------------------------------------------- Azure OpenAI

#[tokio::test]
async fn azure_deployments_need_an_api_version_and_name_the_model() {
    let app = demo_backend::app();
    let req = json!({"model": "ignored", "messages": [{"role": "user", "content": "hi azure"}]});
    let (status, v) = call(
        &app,
        post("/openai/deployments/gpt-4o-prod/chat/completions", &req),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        v,
        json!({"error": {"code": "404", "message": "Resource not found"}})
    );
    let (status, v) = call(
        &app,
        post(
            "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21",
            &req,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["model"], "gpt-4o-prod");
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hi azure");
    assert_eq!(
        v["choices"][0]["content_filter_results"]["hate"]["severity"],
        "safe"
    );
    assert_eq!(v["prompt_filter_results"][0]["prompt_index"], 0);
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let chunks = sse_json(
        &frames(
            &app,
            post(
                "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21",
                &streamed,
            ),
        )
        .await,
    );
    assert_eq!(chunks[0]["choices"], json!([]));
    assert!(chunks[0]["prompt_filter_results"].is_array());
    let text: String = chunks[1..]
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "echo: hi azure");
    let (status, v) = call(
        &app,
        post(
            "/openai/deployments/ada/embeddings?api-version=2024-10-21",
            &json!({"input": "x"}),
        ),
    )
    .await;
    assert_eq!((status, v["model"].as_str()), (StatusCode::OK, Some("ada")));
    // The v1 paths take OpenAI's requests as they are.
    let (status, v) = call(&app, post("/openai/v1/chat/completions", &req)).await;
    assert_eq!(
        (status, v["model"].as_str()),
        (StatusCode::OK, Some("ignored"))
    );
}

// ---------------------------------------------------------------- AWS Bedrock

/// The messages of an AWS event-stream body, CRCs checked: (event type,
/// JSON payload).
fn event_stream(bytes: &[u8]) -> Vec<(String, Value)> {
    use demo_backend::crc32;
    // (The CRC-32 check value: of "123456789".)
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (total, header_len) = (be(&rest[0..4]), be(&rest[4..8]));
        let msg = &rest[..total];
        assert_eq!(be(&msg[8..12]) as u32, crc32(&msg[..8]), "prelude CRC");
        assert_eq!(
            be(&msg[total - 4..]) as u32,
            crc32(&msg[..total - 4]),
            "message CRC"
        );
        let mut h = &msg[12..12 + header_len];
        let mut event = String::new();
        while !h.is_empty() {
            let n = h[0] as usize;
            let name = std::str::from_utf8(&h[1..1 + n]).unwrap();
            assert_eq!(h[1 + n], 7);
            let len = u16::from_be_bytes([h[2 + n], h[3 + n]]) as usize;
            let value = std::str::from_utf8(&h[4 + n..4 + n + len]).unwrap();
            if name == ":event-type" {
                event = value.to_owned();
            }
            h = &h[4 + n + len..];
        }
        let payload = serde_json::from_slice(&msg[12 + header_len..total - 4]).unwrap();
        out.push((event, payload));
        rest = &rest[total..];
    }
    out
}

#[tokio::test]
async fn bedrock_converse_and_invoke_plain_and_streamed() {
    let app = demo_backend::app();
    let req = json!({"system": [{"text": "be brief"}],
                     "messages": [{"role": "user", "content": [{"text": "hello bedrock"}]}]});
    let (status, v) = call(
        &app,
        post(
            "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse",
            &req,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        v["output"]["message"]["content"][0]["text"],
        "echo: hello bedrock"
    );
    assert_eq!(
        v["usage"],
        json!({"inputTokens": 4, "outputTokens": 3, "totalTokens": 7})
    );
    assert_eq!(v["stopReason"], "end_turn");

    let resp = app
        .clone()
        .oneshot(post("/model/amazon.nova-lite-v1%3A0/converse-stream", &req))
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.amazon.eventstream"
    );
    let bytes = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let events = event_stream(&bytes);
    assert_eq!(events[0].0, "messageStart");
    let text: String = events
        .iter()
        .filter(|(e, _)| e == "contentBlockDelta")
        .map(|(_, p)| p["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "echo: hello bedrock");
    assert_eq!(events.last().unwrap().1["usage"]["totalTokens"], 7);

    let invoke = json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 20,
                        "messages": [{"role": "user", "content": "hello claude"}]});
    let (status, v) = call(
        &app,
        post(
            "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke",
            &invoke,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["model"], "anthropic.claude-3-haiku-20240307-v1:0");
    assert_eq!(v["content"][0]["text"], "echo: hello claude");
    let resp = app
        .clone()
        .oneshot(post("/model/m/invoke-with-response-stream", &invoke))
        .await
        .unwrap();
    let bytes = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let events = event_stream(&bytes);
    assert!(events
        .iter()
        .all(|(e, p)| e == "chunk" && p["bytes"].is_string()));

    let resp = app
        .clone()
        .oneshot(post("/model/m/invoke", &json!({"inputText": "hi"})))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.headers()["x-amzn-errortype"], "ValidationException");
}

#[tokio::test]
async fn moderations_answer_in_openai_s_format() {
    let app = demo_backend::app();
    let (status, v) = call(
        &app,
        post(
            "/v1/moderations",
            &json!({"model": "omni-moderation-latest", "input": ["how do I bake bread", "how to build a BOMB"]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(v["id"].as_str().unwrap().starts_with("modr-"));
    assert_eq!(v["model"], "omni-moderation-latest");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["flagged"], false);
    assert_eq!(results[1]["flagged"], true);
    assert_eq!(results[1]["categories"]["violence"], true);
    assert_eq!(results[1]["categories"]["hate"], false);
    assert!(results[1]["category_scores"]["violence"].as_f64().unwrap() > 0.9);
    assert!(results[0]["category_scores"]["violence"].as_f64().unwrap() < 0.01);
    assert_eq!(results[0]["categories"].as_object().unwrap().len(), 13);
    let (status, v) = call(
        &app,
        post("/v1/moderations", &json!({"input": "steal a car"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["results"][0]["categories"]["illicit"], true);
    let (status, _) = call(&app, post("/v1/moderations", &json!({"input": 3}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_guard_model_answers_safe_or_unsafe_with_category_codes() {
    let app = demo_backend::app();
    let ask = |text: &str| {
        post(
            "/v1/chat/completions",
            &json!({"model": "llama-guard-3-1b", "messages": [{"role": "user", "content": text}]}),
        )
    };
    let (status, v) = call(&app, ask("what is the capital of France?")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "safe");
    let (_, v) = call(&app, ask("kill him, you idiot")).await;
    assert_eq!(v["choices"][0]["message"]["content"], "unsafe\nS1,S10");
    // Other models still echo.
    let (_, v) = call(
        &app,
        post(
            "/v1/chat/completions",
            &json!({"model": "demo", "messages": [{"role": "user", "content": "kill"}]}),
        ),
    )
    .await;
    assert_eq!(v["choices"][0]["message"]["content"], "echo: kill");
}

/// Body frames of a response, raw, one entry per frame.
async fn raw_frames(app: &Router, req: Request<Body>) -> (String, Vec<Vec<u8>>) {
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    let mut stream = resp.into_body().into_data_stream();
    let mut out = Vec::new();
    while let Some(frame) = stream.next().await {
        out.push(frame.unwrap().to_vec());
    }
    (content_type, out)
}

#[tokio::test]
async fn scripted_answers_are_sent_verbatim_in_each_apis_framing() {
    let app = demo_backend::app();
    let answer = r#"{"choices":[{"message":{"content":"a\u0040b"}}]}"#;
    // A plain answer: the header's bytes, escapes and all.
    let (status, headers, body) = call_raw(
        &app,
        post_with(
            "/v1/chat/completions",
            &json!({"messages": []}),
            &[("x-demo-answer", answer)],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body, answer.as_bytes());

    let events = json!([{"type": "a", "n": 1}, r#"{"type":"b","t":"\u0040"}"#]).to_string();
    let script = [("x-demo-answer", events.as_str())];
    let stream = json!({"stream": true});
    let cases: [(&str, Value, &str, Vec<&str>); 6] = [
        (
            "/v1/chat/completions",
            stream.clone(),
            "text/event-stream",
            vec![
                "data: {\"n\":1,\"type\":\"a\"}\n\n",
                "data: {\"type\":\"b\",\"t\":\"\\u0040\"}\n\n",
            ],
        ),
        (
            "/v1/messages",
            stream.clone(),
            "text/event-stream",
            vec![
                "event: a\ndata: {\"n\":1,\"type\":\"a\"}\n\n",
                "event: b\ndata: {\"type\":\"b\",\"t\":\"\\u0040\"}\n\n",
            ],
        ),
        (
            "/openai/deployments/d1/responses",
            stream.clone(),
            "text/event-stream",
            vec![
                "event: a\ndata: {\"n\":1,\"type\":\"a\"}\n\n",
                "event: b\ndata: {\"type\":\"b\",\"t\":\"\\u0040\"}\n\n",
            ],
        ),
        (
            "/api/chat",
            json!({"model": "m"}),
            "application/x-ndjson",
            vec![
                "{\"n\":1,\"type\":\"a\"}\n",
                "{\"type\":\"b\",\"t\":\"\\u0040\"}\n",
            ],
        ),
        (
            "/v1beta/models/g:streamGenerateContent",
            json!({}),
            "application/json",
            vec![
                "[{\"n\":1,\"type\":\"a\"}",
                ",\r\n{\"type\":\"b\",\"t\":\"\\u0040\"}]",
            ],
        ),
        (
            "/v1beta/models/g:streamGenerateContent?alt=sse",
            json!({}),
            "text/event-stream",
            vec![
                "data: {\"n\":1,\"type\":\"a\"}\n\n",
                "data: {\"type\":\"b\",\"t\":\"\\u0040\"}\n\n",
            ],
        ),
    ];
    for (path, body, content_type, expected) in cases {
        let (ct, frames) = raw_frames(&app, post_with(path, &body, &script)).await;
        assert_eq!(ct, content_type, "{path}");
        let frames: Vec<String> = frames
            .into_iter()
            .map(|f| String::from_utf8(f).unwrap())
            .collect();
        assert_eq!(frames, expected, "{path}");
    }
    // Ollama with `stream: false` is plain.
    let (_, _, body) = call_raw(
        &app,
        post_with(
            "/api/generate",
            &json!({"stream": false}),
            &[("x-demo-answer", "{\"response\":\"x\"}")],
        ),
    )
    .await;
    assert_eq!(body, b"{\"response\":\"x\"}");

    // Bedrock: event-stream messages naming each event, and Anthropic
    // events base64 in `chunk` messages.
    let converse = json!([{"contentBlockDelta": {"delta": {"text": "hi"}}}]).to_string();
    let (ct, frames) = raw_frames(
        &app,
        post_with(
            "/model/m1/converse-stream",
            &json!({}),
            &[("x-demo-answer", &converse)],
        ),
    )
    .await;
    assert_eq!(ct, "application/vnd.amazon.eventstream");
    assert_eq!(
        frames,
        [demo_backend::event_stream_message(
            "contentBlockDelta",
            &json!({"delta": {"text": "hi"}})
        )
        .to_vec()]
    );
    let invoke = json!([{"type": "message_stop"}]).to_string();
    let (_, frames) = raw_frames(
        &app,
        post_with(
            "/model/m1/invoke-with-response-stream",
            &json!({}),
            &[("x-demo-answer", &invoke)],
        ),
    )
    .await;
    // base64 of {"type":"message_stop"}
    assert_eq!(
        frames,
        [demo_backend::event_stream_message(
            "chunk",
            &json!({"bytes": "eyJ0eXBlIjoibWVzc2FnZV9zdG9wIn0="})
        )
        .to_vec()]
    );

    // Compressed like any answer when asked.
    let (_, headers, body) = call_raw(
        &app,
        post_with(
            "/v1/chat/completions",
            &json!({}),
            &[
                ("x-demo-answer", answer),
                ("x-demo-content-encoding", "gzip"),
            ],
        ),
    )
    .await;
    assert_eq!(headers["content-encoding"], "gzip");
    assert_eq!(body[..2], [0x1f, 0x8b]);

    // Not JSON, or not an array for a stream: 400.
    for (body, script) in [(json!({}), "{nope"), (json!({"stream": true}), "{}")] {
        let (status, _) = call(
            &app,
            post_with("/v1/chat/completions", &body, &[("x-demo-answer", script)]),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{script}");
    }
}

#[tokio::test]
async fn the_content_type_can_be_relabelled() {
    let app = demo_backend::app();
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let req = post_with(
        "/v1/chat/completions",
        &body,
        &[("x-demo-content-type", "text/event-stream")],
    );
    let (status, headers, bytes) = call_raw(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hi");
}
