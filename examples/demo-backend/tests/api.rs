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
    assert_eq!(stats, json!({"started": 2, "completed": 2}));

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
    assert_eq!(stats, json!({"started": 0, "completed": 0}));
    let (_, log) = call(
        &app,
        Request::get("/_demo/requests").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(log, json!([]));
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
    assert_eq!(stats(addr).await, json!({"started": 1, "completed": 0}));
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
    assert_eq!(stats(addr).await, json!({"started": 0, "completed": 0}));

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
