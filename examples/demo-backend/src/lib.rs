//! A small model stand-in speaking the OpenAI (and Azure OpenAI),
//! Anthropic, Gemini, Ollama and AWS Bedrock runtime protocols.
//!
//! Every endpoint echoes the prompt back (`"echo: " + prompt`), streams SSE
//! when asked to, and records what it received so end-to-end tests can check
//! what actually reached the upstream (see [`app`] and the `/_demo/*` routes).
//! Like a real server it compresses answers with gzip when the request
//! accepts it, and returns logprobs when asked for them; control headers
//! (`x-demo-*`) make it misbehave on purpose.
//!
//! The hot path holds no lock except one short push onto the request log;
//! counters are atomics.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flate2::write::GzEncoder;
use flate2::Compression;
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};

/// How many requests `/_demo/requests` keeps (oldest dropped first).
pub const REQUEST_LOG_CAPACITY: usize = 200;
/// Largest request body read; larger bodies get a 400 and are not `completed`.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Per-request header setting the pause between streamed events, in ms.
pub const CHUNK_DELAY_HEADER: &str = "x-demo-chunk-delay-ms";
/// Upper bound on the chunk delay a request may ask for.
const MAX_CHUNK_DELAY_MS: u64 = 60_000;
/// Model name used when a request names none.
pub const DEFAULT_MODEL: &str = "demo-echo";
/// Dimension of `/v1/embeddings` vectors.
pub const EMBEDDING_DIM: usize = 8;
/// `x-demo-content-encoding: gzip` compresses the answer whatever the
/// request's `accept-encoding` says (a backend that ignores it);
/// `identity` never compresses.
pub const CONTENT_ENCODING_HEADER: &str = "x-demo-content-encoding";
/// `x-demo-logprobs: always` adds logprobs to answers that did not ask for
/// them (a backend that returns them unasked).
pub const LOGPROBS_HEADER: &str = "x-demo-logprobs";
/// `x-demo-trailers` (any value) ends the answer with a trailer
/// `x-demo-finished: true` (sent over HTTP/2, and over HTTP/1.1 chunked
/// when the request says `te: trailers`), as gRPC-style servers do.
pub const TRAILERS_HEADER: &str = "x-demo-trailers";
/// `x-demo-answer: JSON` answers with exactly this instead of the echo: a
/// plain answer is the header's bytes verbatim; a streamed one is a JSON
/// array of events sent in the API's framing (see [`scripted_answer`]).
pub const ANSWER_HEADER: &str = "x-demo-answer";
/// `x-demo-content-type: TYPE` labels the answer TYPE whatever it is (a
/// backend that labels a plain answer, or JSON lines, as an event stream).
pub const CONTENT_TYPE_HEADER: &str = "x-demo-content-type";

/// Shared state: counters and the request log.
#[derive(Default)]
pub struct Demo {
    started: AtomicU64,
    completed: AtomicU64,
    /// Streamed answers whose last event has not been sent yet.
    streaming: AtomicU64,
    next_id: AtomicU64,
    log: Mutex<VecDeque<LoggedRequest>>,
}

/// One recorded request. Kept raw (cheap clones on the hot path) and turned
/// into JSON only when `/_demo/requests` is read.
struct LoggedRequest {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

type Shared = Arc<Demo>;

impl Demo {
    fn log(&self) -> MutexGuard<'_, VecDeque<LoggedRequest>> {
        // A panic while holding the lock cannot leave the deque inconsistent.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{n:012x}")
    }

    /// `started` and `completed` counters.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.started.load(Ordering::Relaxed),
            self.completed.load(Ordering::Relaxed),
        )
    }
}

/// The router with fresh state.
pub fn app() -> Router {
    app_with_state(Arc::new(Demo::default()))
}

/// The router over the given state (so a caller can read counters directly).
pub fn app_with_state(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/moderations", post(moderations))
        .route("/v1/messages", post(messages))
        .route("/v1/models", get(models))
        .route("/v1beta/models/{target}", post(gemini))
        // Only Gemini's POSTs; other methods get the 404 they always got.
        .route("/v1/models/{target}", post(gemini).get(not_found))
        .route(
            "/openai/deployments/{deployment}/{*operation}",
            post(azure_deployment),
        )
        // Azure's v1 paths take OpenAI's requests as they are.
        .route("/openai/v1/chat/completions", post(chat_completions))
        .route("/openai/v1/completions", post(completions))
        .route("/openai/v1/responses", post(responses))
        .route("/openai/v1/embeddings", post(embeddings))
        .route("/model/{model}/{operation}", post(bedrock))
        .route("/api/chat", post(ollama_chat))
        .route("/api/generate", post(ollama_generate))
        .route("/_demo/stats", get(stats))
        .route("/_demo/requests", get(requests))
        .route("/_demo/reset", post(reset))
        .fallback(not_found)
        .layer(middleware::from_fn(scripted_answer))
        .layer(middleware::from_fn(relabel))
        .layer(middleware::from_fn(encode))
        .layer(middleware::from_fn(trailers))
        // The tracking middleware has already read (and bounded) the body.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

fn is_introspection(path: &str) -> bool {
    path == "/_demo" || path.starts_with("/_demo/")
}

/// Counts a request as `started` as soon as its head arrives, then reads the
/// whole body, logs the request, runs the handler and counts it `completed`.
async fn track(State(demo): State<Shared>, req: Request, next: Next) -> Response {
    if is_introspection(req.uri().path()) {
        return next.run(req).await;
    }
    demo.started.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("could not read the request body: {e}"),
            )
        }
    };
    let entry = LoggedRequest {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
        body: bytes.clone(),
    };
    {
        let mut log = demo.log();
        if log.len() >= REQUEST_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(entry);
    }
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    demo.completed.fetch_add(1, Ordering::Relaxed);
    count_streaming(demo, response)
}

/// Counts an event stream in `streaming` until its body has been sent (or
/// dropped), so a test can tell that an event reached it while the model
/// was still answering.
fn count_streaming(demo: Shared, response: Response) -> Response {
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !is_stream {
        return response;
    }
    struct Sending(Shared);
    impl Drop for Sending {
        fn drop(&mut self) {
            self.0.streaming.fetch_sub(1, Ordering::Relaxed);
        }
    }
    demo.streaming.fetch_add(1, Ordering::Relaxed);
    let sending = Sending(demo);
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _ = &sending;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

// ---------------------------------------------------------------- gzip

/// How a request wants its answer encoded: `x-demo-content-encoding` if
/// given, else whether `accept-encoding` accepts gzip.
fn wants_gzip(headers: &HeaderMap) -> Result<bool, BadRequest> {
    if let Some(forced) = headers.get(CONTENT_ENCODING_HEADER) {
        return match forced.to_str().map(str::trim) {
            Ok(v) if v.eq_ignore_ascii_case("gzip") => Ok(true),
            Ok(v) if v.eq_ignore_ascii_case("identity") => Ok(false),
            _ => Err(BadRequest(format!(
                "{CONTENT_ENCODING_HEADER} must be `gzip` or `identity`"
            ))),
        };
    }
    Ok(accepts_gzip(headers))
}

/// Whether `accept-encoding` accepts gzip: `gzip` (or `x-gzip`) listed with
/// a non-zero quality, or else `*` with a non-zero quality.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    let items = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for item in items {
        let mut params = item.split(';');
        let coding = params.next().unwrap_or_default().trim();
        let accepted = params
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                k.trim().eq_ignore_ascii_case("q").then(|| v.trim())
            })
            .all(|q| q.parse::<f32>().map_or(true, |q| q > 0.0));
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(accepted);
        } else if coding == "*" {
            any = Some(accepted);
        }
    }
    gzip.or(any).unwrap_or(false)
}

/// Labels the answer with [`CONTENT_TYPE_HEADER`]'s type when the request
/// carries one.
async fn relabel(req: Request, next: Next) -> Response {
    let label = req.headers().get(CONTENT_TYPE_HEADER).cloned();
    let mut response = next.run(req).await;
    if let Some(label) = label {
        response.headers_mut().insert(header::CONTENT_TYPE, label);
    }
    response
}

/// Ends the answer with trailers when the request asks for them
/// ([`TRAILERS_HEADER`]).
async fn trailers(req: Request, next: Next) -> Response {
    let wanted = req.headers().contains_key(TRAILERS_HEADER);
    let response = next.run(req).await;
    if !wanted {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-demo-finished", HeaderValue::from_static("true"));
    let body = body.with_trailers(async move { Some(Ok(trailers)) });
    Response::from_parts(parts, Body::new(body))
}

/// Compresses model answers with gzip when the request asks for it (see
/// [`wants_gzip`]). `/_demo/*` answers are never compressed.
async fn encode(req: Request, next: Next) -> Response {
    if is_introspection(req.uri().path()) {
        return next.run(req).await;
    }
    let compress = match wants_gzip(req.headers()) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let response = next.run(req).await;
    if !compress || response.headers().contains_key(header::CONTENT_ENCODING) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let streamed = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    parts
        .headers
        .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    let body = if streamed {
        Body::from_stream(gzip_stream(body))
    } else {
        let compressed = match axum::body::to_bytes(body, usize::MAX).await {
            Ok(bytes) => gzip(&bytes),
            Err(e) => Err(io::Error::other(e)),
        };
        match compressed {
            Ok(bytes) => Body::from(bytes),
            Err(e) => {
                return error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("could not compress the answer: {e}"),
                )
            }
        }
    };
    Response::from_parts(parts, body)
}

/// `bytes` as one gzip member.
pub fn gzip(bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes)?;
    enc.finish()
}

/// A body stream as one gzip stream, sync-flushed after every frame so each
/// SSE event can be decoded as soon as it arrives; the gzip trailer is the
/// last frame.
fn gzip_stream(body: Body) -> impl Stream<Item = io::Result<Bytes>> {
    let state = Some((
        body.into_data_stream(),
        GzEncoder::new(Vec::new(), Compression::default()),
    ));
    futures_util::stream::unfold(state, |state| async move {
        let (mut frames, mut enc) = state?;
        match frames.next().await {
            Some(Ok(frame)) => {
                let out = enc
                    .write_all(&frame)
                    .and_then(|()| enc.flush())
                    .map(|()| Bytes::from(std::mem::take(enc.get_mut())));
                let next = out.is_ok().then_some((frames, enc));
                Some((out, next))
            }
            Some(Err(e)) => Some((Err(io::Error::other(e)), None)),
            None => Some((enc.finish().map(Bytes::from), None)),
        }
    })
}

// ---------------------------------------------------------------- scripted answers

/// How an API frames a streamed answer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    /// `data: EVENT` (OpenAI chat and completions, Gemini with `alt=sse`).
    Sse,
    /// `event: TYPE` then `data: EVENT`, TYPE being the event's `type`
    /// (Anthropic messages, the Responses API).
    NamedSse,
    /// One JSON value per line (Ollama).
    JsonLines,
    /// One JSON array, sent element by element (Gemini without `alt=sse`).
    JsonArray,
    /// AWS event-stream messages, each element `{"EVENT_TYPE": payload}`
    /// (Bedrock `converse-stream`).
    EventStream,
    /// AWS event-stream `chunk` messages carrying each element base64
    /// (Bedrock `invoke-with-response-stream`).
    EventStreamChunks,
}

/// The framing of a streamed answer to `path` with `query` and request
/// body `req`, or `None` for a plain answer.
fn framing(path: &str, query: Option<&str>, req: &Value) -> Option<Framing> {
    let streamed = wants_stream(req);
    if path == "/api/chat" || path == "/api/generate" {
        // Ollama streams unless told not to.
        return (req.get("stream").and_then(Value::as_bool) != Some(false))
            .then_some(Framing::JsonLines);
    }
    if path.starts_with("/model/") {
        return if path.ends_with("/converse-stream") {
            Some(Framing::EventStream)
        } else if path.ends_with("/invoke-with-response-stream") {
            Some(Framing::EventStreamChunks)
        } else {
            None
        };
    }
    if path.ends_with(":streamGenerateContent") {
        let sse = query.is_some_and(|q| q.split('&').any(|kv| kv == "alt=sse"));
        return Some(if sse {
            Framing::Sse
        } else {
            Framing::JsonArray
        });
    }
    if path.ends_with(":generateContent") || !streamed {
        return None;
    }
    if path.ends_with("/responses") || path == "/v1/messages" {
        Some(Framing::NamedSse)
    } else {
        Some(Framing::Sse)
    }
}

/// The text of one scripted event: a string element verbatim (so a test can
/// send exact JSON text, escapes included), anything else serialised.
fn event_text(event: &Value) -> String {
    match event {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// The body chunks of a scripted stream of `events` framed as `framing`.
fn scripted_chunks(framing: Framing, events: &[Value]) -> Result<Vec<Bytes>, BadRequest> {
    let count = events.len();
    events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            let text = event_text(event);
            Ok(match framing {
                Framing::Sse => Bytes::from(format!("data: {text}\n\n")),
                Framing::NamedSse => {
                    let parsed = serde_json::from_str::<Value>(&text).ok();
                    match parsed.as_ref().and_then(|v| v.get("type")?.as_str()) {
                        Some(name) => Bytes::from(format!("event: {name}\ndata: {text}\n\n")),
                        None => Bytes::from(format!("data: {text}\n\n")),
                    }
                }
                Framing::JsonLines => Bytes::from(format!("{text}\n")),
                Framing::JsonArray => {
                    let open = if i == 0 { "[" } else { ",\r\n" };
                    let close = if i + 1 == count { "]" } else { "" };
                    Bytes::from(format!("{open}{text}{close}"))
                }
                Framing::EventStream => match event.as_object() {
                    Some(one) if one.len() == 1 => {
                        let (kind, payload) = one.iter().next().ok_or_else(|| {
                            BadRequest(format!("{ANSWER_HEADER}: event {i} is empty"))
                        })?;
                        event_stream_message(kind, payload)
                    }
                    _ => {
                        return Err(BadRequest(format!(
                            "{ANSWER_HEADER}: event {i} must be {{\"EVENT_TYPE\": payload}}"
                        )))
                    }
                },
                Framing::EventStreamChunks => {
                    event_stream_message("chunk", &json!({"bytes": base64(text.as_bytes())}))
                }
            })
        })
        .collect()
}

/// Answers with [`ANSWER_HEADER`]'s script instead of the endpoint when the
/// request carries it: a plain answer is the header's bytes verbatim
/// (`application/json`, 200); a streamed one (as the endpoint would stream
/// that request) is a JSON array of events, each sent as its own body chunk
/// in the API's framing, `x-demo-chunk-delay-ms` apart. A script that is not
/// JSON (or, for a stream, not an array) gets a 400.
async fn scripted_answer(req: Request, next: Next) -> Response {
    let Some(script) = req.headers().get(ANSWER_HEADER).cloned() else {
        return next.run(req).await;
    };
    let delay = chunk_delay(req.headers());
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let body = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
        .await
        .unwrap_or_default();
    let asked = serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
    let parsed = match serde_json::from_slice::<Value>(script.as_bytes()) {
        Ok(v) => v,
        Err(e) => return BadRequest(format!("{ANSWER_HEADER} is not JSON: {e}")).into_response(),
    };
    let Some(framing) = framing(&path, query.as_deref(), &asked) else {
        let mut response = Response::new(Body::from(Bytes::copy_from_slice(script.as_bytes())));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return response;
    };
    let Value::Array(events) = parsed else {
        return BadRequest(format!(
            "{ANSWER_HEADER} must be a JSON array of events for a streamed answer"
        ))
        .into_response();
    };
    let chunks = match scripted_chunks(framing, &events) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    match framing {
        Framing::Sse | Framing::NamedSse => sse_response(chunks, delay),
        Framing::JsonLines => streamed_response("application/x-ndjson", chunks, delay),
        Framing::JsonArray => streamed_response("application/json", chunks, delay),
        Framing::EventStream | Framing::EventStreamChunks => {
            streamed_response("application/vnd.amazon.eventstream", chunks, delay)
        }
    }
}

// ---------------------------------------------------------------- logprobs

/// How many alternatives per token a request gets (`Some(0)`: logprobs
/// without alternatives), or `None` for no logprobs: what the request
/// `asked` for, or `Some(0)` when `x-demo-logprobs: always` forces them.
fn logprobs_for(headers: &HeaderMap, asked: Option<u64>) -> Result<Option<u64>, BadRequest> {
    match headers
        .get(LOGPROBS_HEADER)
        .map(|v| v.to_str().map(str::trim))
    {
        None => Ok(asked),
        Some(Ok(v)) if v.eq_ignore_ascii_case("always") => Ok(Some(asked.unwrap_or(0))),
        Some(_) => Err(BadRequest(format!("{LOGPROBS_HEADER} must be `always`"))),
    }
}

/// The demo's log-probability of the `i`-th token of an answer (exact in
/// binary, so it prints short).
fn token_logprob(i: usize) -> f64 {
    -0.0625 * ((i % 5) as f64 + 1.0)
}

/// The `top` most likely tokens at position `i`: the chosen token first, then
/// made-up alternatives.
fn alternatives(token: &str, i: usize, top: u64) -> Vec<(String, f64)> {
    (0..top)
        .map(|k| {
            let lp = token_logprob(i) - 0.5 * k as f64;
            if k == 0 {
                (token.to_owned(), lp)
            } else {
                (format!("alt{k}"), lp)
            }
        })
        .collect()
}

/// One token of OpenAI chat / Responses logprobs, numbered from `i`:
/// `{"token","logprob","bytes","top_logprobs":[{"token","logprob","bytes"}]}`.
fn token_entry(token: &str, i: usize, top: u64) -> Value {
    let top: Vec<Value> = alternatives(token, i, top)
        .into_iter()
        .map(|(t, lp)| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()}))
        .collect();
    json!({"token": token, "logprob": token_logprob(i), "bytes": token.as_bytes(), "top_logprobs": top})
}

/// Logprob entries for `tokens`, the first being token number `first`.
fn token_entries(tokens: &[&str], first: usize, top: u64) -> Vec<Value> {
    tokens
        .iter()
        .enumerate()
        .map(|(n, t)| token_entry(t, first + n, top))
        .collect()
}

/// `choices[].logprobs` of the chat API.
fn chat_logprobs(tokens: &[&str], first: usize, top: u64) -> Value {
    json!({"content": token_entries(tokens, first, top), "refusal": null})
}

/// `choices[].logprobs` of the legacy completions API, for `tokens` starting
/// at token number `first` and character `offset` of the answer.
fn completion_logprobs(tokens: &[&str], first: usize, offset: usize, top: u64) -> Value {
    let mut at = offset;
    let mut text_offset = Vec::with_capacity(tokens.len());
    let mut token_logprobs = Vec::with_capacity(tokens.len());
    let mut top_logprobs = Vec::with_capacity(tokens.len());
    for (n, t) in tokens.iter().enumerate() {
        text_offset.push(at);
        at += t.chars().count();
        token_logprobs.push(token_logprob(first + n));
        let alts: Map<String, Value> = alternatives(t, first + n, top)
            .into_iter()
            .map(|(t, lp)| (t, json!(lp)))
            .collect();
        top_logprobs.push(Value::Object(alts));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": if top == 0 { Value::Null } else { json!(top_logprobs) },
        "text_offset": text_offset,
    })
}

fn as_count(v: Option<&Value>) -> Option<u64> {
    v.and_then(Value::as_u64)
}

// ---------------------------------------------------------------- helpers

/// `{"error":{"message","type":"invalid_request_error"}}`, plus Anthropic's
/// top-level `"type":"error"` so both kinds of client can read it.
fn error_response(status: StatusCode, message: &str) -> Response {
    let kind = if status == StatusCode::NOT_FOUND {
        "not_found_error"
    } else {
        "invalid_request_error"
    };
    (
        status,
        Json(json!({
            "type": "error",
            "error": {"message": message, "type": kind, "param": null, "code": null}
        })),
    )
        .into_response()
}

/// A request body that is not a JSON object; answered with a 400.
struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        error_response(StatusCode::BAD_REQUEST, &self.0)
    }
}

// ---------------------------------------------------------------- assessors

/// Words that make the demo's moderation endpoint and guard model flag a
/// text: (word, moderation category, Llama Guard category code). Found
/// case-insensitively anywhere in the text.
pub const FLAGGED_WORDS: &[(&str, &str, &str)] = &[
    ("bomb", "violence", "S1"),
    ("kill", "violence", "S1"),
    ("steal", "illicit", "S2"),
    ("suicide", "self-harm", "S11"),
    ("idiot", "harassment", "S10"),
];

/// The categories OpenAI's `omni-moderation-latest` reports.
const MODERATION_CATEGORIES: &[&str] = &[
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

/// The flagged words of `text`: their moderation categories and guard codes.
fn flagged_in(text: &str) -> Vec<(&'static str, &'static str)> {
    let lower = text.to_lowercase();
    FLAGGED_WORDS
        .iter()
        .filter(|(word, _, _)| lower.contains(word))
        .map(|(_, category, code)| (*category, *code))
        .collect()
}

/// `POST /v1/moderations`, OpenAI's format: `input` is a string, a list
/// of strings, or a list of `{"type":"text","text"}` parts; one result per
/// input, with every category's flag and score.
async fn moderations(State(demo): State<Shared>, body: Bytes) -> Response {
    let req = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            })
            .collect(),
        _ => return BadRequest("`input` must be a string or a list".to_owned()).into_response(),
    };
    let results: Vec<Value> = inputs
        .iter()
        .map(|text| {
            let hits = flagged_in(text);
            let mut categories = Map::new();
            let mut scores = Map::new();
            let mut applied = Map::new();
            for c in MODERATION_CATEGORIES {
                let on = hits.iter().any(|(category, _)| category == c);
                categories.insert((*c).to_owned(), Value::Bool(on));
                scores.insert((*c).to_owned(), json!(if on { 0.97 } else { 0.0004 }));
                applied.insert((*c).to_owned(), json!(["text"]));
            }
            json!({
                "flagged": !hits.is_empty(),
                "categories": categories,
                "category_scores": scores,
                "category_applied_input_types": applied,
            })
        })
        .collect();
    Json(json!({
        "id": demo.id("modr-demo"),
        "model": req.get("model").and_then(Value::as_str).unwrap_or("omni-moderation-latest"),
        "results": results,
    }))
    .into_response()
}

/// A guard model's chat completion (any model whose name contains
/// `llama-guard`: not `guard` alone, which names other test models), as Llama Guard answers: `safe`, or `unsafe` and the violated
/// category codes on the next line (`unsafe\nS1,S10`), for the text of
/// every message.
fn guard_verdict(demo: &Demo, model: &str, messages: Option<&Value>) -> Response {
    let text: Vec<String> = messages
        .and_then(Value::as_array)
        .map(|ms| ms.iter().map(|m| content_text(m.get("content"))).collect())
        .unwrap_or_default();
    let mut codes: Vec<&str> = Vec::new();
    for (_, code) in flagged_in(&text.join("\n")) {
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    let verdict = if codes.is_empty() {
        "safe".to_owned()
    } else {
        format!("unsafe\n{}", codes.join(","))
    };
    Json(json!({
        "id": demo.id("chatcmpl-guard"),
        "object": "chat.completion",
        "created": now_secs(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": verdict, "refusal": null},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": openai_usage(messages_word_count(messages), 2),
    }))
    .into_response()
}

fn parse_body(body: &[u8]) -> Result<Value, BadRequest> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(BadRequest(
            "the request body must be a JSON object".to_owned(),
        )),
        Err(e) => Err(BadRequest(format!(
            "malformed JSON in the request body: {e}"
        ))),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn model_of(req: &Value) -> String {
    req.get("model")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_MODEL)
        .to_owned()
}

fn wants_stream(req: &Value) -> bool {
    req.get("stream").and_then(Value::as_bool).unwrap_or(false)
}

fn include_usage(req: &Value) -> bool {
    req.pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn chunk_delay(headers: &HeaderMap) -> Duration {
    let ms = headers
        .get(CHUNK_DELAY_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(MAX_CHUNK_DELAY_MS);
    Duration::from_millis(ms)
}

/// Text of a message `content`: a string, or the concatenated `text` of the
/// text parts of an array (`text`, and the Responses API's `input_text` /
/// `output_text`).
pub fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for part in parts {
                let is_text = matches!(
                    part.get("type").and_then(Value::as_str),
                    Some("text" | "input_text" | "output_text")
                );
                if let (true, Some(t)) = (is_text, part.get("text").and_then(Value::as_str)) {
                    out.push_str(t);
                }
            }
            out
        }
        _ => String::new(),
    }
}

/// Text of the last message whose role is `user`.
fn last_user_text(messages: Option<&Value>) -> String {
    messages
        .and_then(Value::as_array)
        .and_then(|ms| {
            ms.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .map(|m| content_text(m.get("content")))
        .unwrap_or_default()
}

/// Whitespace-separated word count: the demo's notion of a token.
pub fn word_count(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

fn messages_word_count(messages: Option<&Value>) -> u64 {
    messages
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .map(|m| word_count(&content_text(m.get("content"))))
                .sum()
        })
        .unwrap_or(0)
}

/// Splits `s` into one piece per word, each word keeping the whitespace that
/// follows it (leading whitespace stays with the first word), so the pieces
/// concatenate to `s` exactly.
pub fn split_words(s: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut prev_ws = false;
    let mut seen_word = false;
    for (i, c) in s.char_indices() {
        let ws = c.is_whitespace();
        if !ws && prev_ws && seen_word {
            pieces.push(&s[start..i]);
            start = i;
        }
        seen_word |= !ws;
        prev_ws = ws;
    }
    if start < s.len() {
        pieces.push(&s[start..]);
    }
    pieces
}

/// `x-demo-reply: TEXT` makes the model answer TEXT instead of the echo:
/// tests use it to put values into a response that never were in a prompt.
pub const REPLY_HEADER: &str = "x-demo-reply";
/// `x-demo-chunk-chars: N` streams the answer N characters per event instead
/// of one word per event (N = 1 splits every value across many events).
pub const CHUNK_CHARS_HEADER: &str = "x-demo-chunk-chars";

fn reply_for(headers: &HeaderMap, echoed: String) -> String {
    headers
        .get(REPLY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or(echoed)
}

/// The streamed pieces of `reply`: words, or fixed-size character runs.
fn pieces<'a>(reply: &'a str, headers: &HeaderMap) -> Vec<&'a str> {
    let n = headers
        .get(CHUNK_CHARS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|n| *n > 0);
    let Some(n) = n else {
        return split_words(reply);
    };
    let mut out = Vec::new();
    let mut start = 0;
    for (count, (i, _)) in reply.char_indices().enumerate() {
        if count > 0 && count % n == 0 {
            out.push(&reply[start..i]);
            start = i;
        }
    }
    if start < reply.len() {
        out.push(&reply[start..]);
    }
    out
}

fn echo(prompt: &str) -> String {
    let mut reply = String::with_capacity(prompt.len() + 6);
    reply.push_str("echo: ");
    reply.push_str(prompt);
    reply
}

fn sse_data(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn sse_event(name: &str, v: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {v}\n\n"))
}

/// A `text/event-stream` response sending each event as its own body chunk,
/// pausing `delay` between events.
fn sse_response(events: Vec<Bytes>, delay: Duration) -> Response {
    let mut response = streamed_response("text/event-stream", events, delay);
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// A response of `content_type` sending each of `chunks` as its own body
/// chunk, pausing `delay` between them.
fn streamed_response(content_type: &'static str, chunks: Vec<Bytes>, delay: Duration) -> Response {
    let stream = futures_util::stream::unfold(
        (chunks.into_iter(), true),
        move |(mut chunks, first)| async move {
            let chunk = chunks.next()?;
            if !first && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Some((Ok::<_, Infallible>(chunk), (chunks, false)))
        },
    );
    let mut response = Response::new(Body::from_stream(stream));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The tool call a request asks the demo model to make: with `tools` in
/// the request, a last user message `call NAME {JSON arguments}` makes the
/// answer call tool NAME with those arguments (`{}` when none are given).
fn requested_tool_call(req: &Value, messages: Option<&Value>) -> Option<(String, Value)> {
    req.get("tools")?;
    let text = last_user_text(messages);
    let rest = text.trim().strip_prefix("call ")?;
    let (name, arguments) = rest.split_once(' ').unwrap_or((rest, ""));
    let arguments = match arguments.trim() {
        "" => json!({}),
        a => serde_json::from_str(a).ok().filter(Value::is_object)?,
    };
    Some((name.to_string(), arguments))
}

// ---------------------------------------------------------------- OpenAI

/// The `usage` object of the OpenAI chat and completions APIs.
fn openai_usage(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

async fn chat_completions(State(demo): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    // `"logprobs": true`, with `top_logprobs` alternatives per token.
    let asked = (req.get("logprobs").and_then(Value::as_bool) == Some(true))
        .then(|| as_count(req.get("top_logprobs")).unwrap_or(0));
    let logprobs = match logprobs_for(&headers, asked) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let model = model_of(&req);
    let messages = req.get("messages");
    if model.contains("llama-guard") {
        return guard_verdict(&demo, &model, messages);
    }
    let reply = reply_for(&headers, echo(&last_user_text(messages)));
    let usage = openai_usage(messages_word_count(messages), word_count(&reply));
    let id = demo.id("chatcmpl-demo");
    let created = now_secs();

    if !wants_stream(&req) {
        if let Some((name, arguments)) = requested_tool_call(&req, messages) {
            return Json(json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": null, "refusal": null,
                        "tool_calls": [{"id": "call_demo_1", "type": "function",
                            "function": {"name": name, "arguments": arguments.to_string()}}]},
                    "logprobs": null,
                    "finish_reason": "tool_calls",
                }],
                "usage": usage,
                "system_fingerprint": null,
            }))
            .into_response();
        }
        let logprobs = logprobs.map_or(Value::Null, |top| {
            chat_logprobs(&split_words(&reply), 0, top)
        });
        return Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": reply, "refusal": null},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }],
            "usage": usage,
            "system_fingerprint": null,
        }))
        .into_response();
    }

    let with_usage = include_usage(&req);
    let chunk = |delta: Value, logprobs: Value, finish: Value| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        });
        if with_usage {
            c["usage"] = Value::Null;
        }
        sse_data(&c)
    };
    let words = pieces(&reply, &headers);
    let mut events = Vec::with_capacity(words.len() + 4);
    events.push(chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
        Value::Null,
    ));
    // Each chunk's logprobs cover that chunk's text, one token per chunk.
    for (i, w) in words.into_iter().enumerate() {
        let logprobs = logprobs.map_or(Value::Null, |top| chat_logprobs(&[w], i, top));
        events.push(chunk(json!({"content": w}), logprobs, Value::Null));
    }
    events.push(chunk(json!({}), Value::Null, json!("stop")));
    if with_usage {
        events.push(sse_data(&json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": [],
            "usage": usage,
        })));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    sse_response(events, chunk_delay(&headers))
}

async fn completions(State(demo): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let model = model_of(&req);
    let prompt = match req.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => match items.first() {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        },
        _ => String::new(),
    };
    // `"logprobs": N`: logprobs with N alternatives per token.
    let logprobs = match logprobs_for(&headers, as_count(req.get("logprobs"))) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let reply = reply_for(&headers, echo(&prompt));
    let usage = openai_usage(word_count(&prompt), word_count(&reply));
    let id = demo.id("cmpl-demo");
    let created = now_secs();

    if !wants_stream(&req) {
        let logprobs = logprobs.map_or(Value::Null, |top| {
            completion_logprobs(&split_words(&reply), 0, 0, top)
        });
        return Json(json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": reply, "index": 0, "logprobs": logprobs, "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }

    let chunk = |text: &str, logprobs: Value, finish: Value| {
        sse_data(&json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}],
        }))
    };
    let words = pieces(&reply, &headers);
    let mut events = Vec::with_capacity(words.len() + 3);
    let mut offset = 0;
    for (i, w) in words.into_iter().enumerate() {
        let logprobs =
            logprobs.map_or(Value::Null, |top| completion_logprobs(&[w], i, offset, top));
        offset += w.chars().count();
        events.push(chunk(w, logprobs, Value::Null));
    }
    events.push(chunk("", Value::Null, json!("stop")));
    if include_usage(&req) {
        events.push(sse_data(&json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        })));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    sse_response(events, chunk_delay(&headers))
}

/// Text of the Responses API `input`: a string, or the last user item.
fn responses_input_text(input: Option<&Value>) -> String {
    match input {
        Some(Value::String(s)) => s.clone(),
        Some(items @ Value::Array(_)) => last_user_text(Some(items)),
        _ => String::new(),
    }
}

fn responses_input_words(input: Option<&Value>) -> u64 {
    match input {
        Some(Value::String(s)) => word_count(s),
        Some(items @ Value::Array(_)) => messages_word_count(Some(items)),
        _ => 0,
    }
}

async fn responses(State(demo): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    // `top_logprobs: N`, or `include: ["message.output_text.logprobs"]`.
    let top = as_count(req.get("top_logprobs"));
    let included = req
        .get("include")
        .and_then(Value::as_array)
        .is_some_and(|i| i.iter().any(|x| x == "message.output_text.logprobs"));
    let asked = top.or(included.then_some(0));
    let logprobs = match logprobs_for(&headers, asked) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let model = model_of(&req);
    let reply = reply_for(&headers, echo(&responses_input_text(req.get("input"))));
    let input_tokens = responses_input_words(req.get("input"));
    let output_tokens = word_count(&reply);
    let id = demo.id("resp_demo");
    let msg_id = demo.id("msg_demo");
    let created = now_secs();
    let response_object = |status: &str, output: Value, output_text: &str, usage: Value| {
        json!({
            "id": id,
            "object": "response",
            "created_at": created,
            "status": status,
            "model": model,
            "output": output,
            "output_text": output_text,
            "usage": usage,
        })
    };
    let mut output_text = json!({"type": "output_text", "text": reply, "annotations": []});
    if let Some(top) = logprobs {
        output_text["logprobs"] = json!(token_entries(&split_words(&reply), 0, top));
    }
    let message = json!({
        "type": "message",
        "id": msg_id,
        "status": "completed",
        "role": "assistant",
        "content": [output_text],
    });
    let usage = json!({
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    });
    let done = response_object("completed", json!([message]), &reply, usage);

    if !wants_stream(&req) {
        return Json(done).into_response();
    }

    // Minimal Responses streaming: created, one text delta per word, done, completed.
    let words = pieces(&reply, &headers);
    let mut events = Vec::with_capacity(words.len() + 3);
    let mut seq = 0u64;
    let mut push = |events: &mut Vec<Bytes>, name: &str, mut v: Value| {
        v["type"] = json!(name);
        v["sequence_number"] = json!(seq);
        seq += 1;
        events.push(sse_event(name, &v));
    };
    push(
        &mut events,
        "response.created",
        json!({"response": response_object("in_progress", json!([]), "", Value::Null)}),
    );
    for (i, w) in words.into_iter().enumerate() {
        let mut delta =
            json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "delta": w});
        if let Some(top) = logprobs {
            delta["logprobs"] = json!(token_entries(&[w], i, top));
        }
        push(&mut events, "response.output_text.delta", delta);
    }
    push(
        &mut events,
        "response.output_text.done",
        json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "text": reply}),
    );
    push(&mut events, "response.completed", json!({"response": done}));
    sse_response(events, chunk_delay(&headers))
}

/// Deterministic unit vector of [`EMBEDDING_DIM`] values for `text`.
pub fn embed(text: &str) -> [f32; EMBEDDING_DIM] {
    let mut v = [0f32; EMBEDDING_DIM];
    for (d, slot) in v.iter_mut().enumerate() {
        // FNV-1a, seeded per dimension.
        let mut h: u64 =
            0xcbf2_9ce4_8422_2325 ^ ((d as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for b in text.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // Final mix so short inputs still spread over the range.
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        *slot = ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}

fn base64_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64(&bytes)
}

/// Standard base64, with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn embeddings(body: Bytes) -> Response {
    let req = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let model = model_of(&req);
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        // One token array is one input.
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => {
            vec![Value::Array(items.clone()).to_string()]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "`input` must be a string or an array",
            )
        }
    };
    let as_base64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let tokens: u64 = inputs.iter().map(|s| word_count(s)).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let v = embed(text);
            let embedding = if as_base64 {
                json!(base64_f32(&v))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

async fn models() -> Response {
    let model =
        |id: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "countersign"});
    Json(json!({
        "object": "list",
        "data": [model(DEFAULT_MODEL), model("demo-echo-anthropic"), model("demo-embed")],
    }))
    .into_response()
}

// ---------------------------------------------------------------- Anthropic

async fn messages(State(demo): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let model = model_of(&req);
    let messages = req.get("messages");
    let reply = reply_for(&headers, echo(&last_user_text(messages)));
    let input_tokens = messages_word_count(messages) + word_count(&content_text(req.get("system")));
    let output_tokens = word_count(&reply);
    let id = demo.id("msg_demo");

    if !wants_stream(&req) {
        if let Some((name, input)) = requested_tool_call(&req, messages) {
            return Json(json!({
                "id": id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "tool_use", "id": "toolu_demo_1", "name": name, "input": input}],
                "stop_reason": "tool_use",
                "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            }))
            .into_response();
        }
        return Json(json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": reply}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }))
        .into_response();
    }

    let words = pieces(&reply, &headers);
    let mut events = Vec::with_capacity(words.len() + 6);
    events.push(sse_event(
        "message_start",
        &json!({
            "type": "message_start",
            "message": {
                "id": id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1},
            },
        }),
    ));
    events.push(sse_event(
        "content_block_start",
        &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ));
    events.push(sse_event("ping", &json!({"type": "ping"})));
    for w in words {
        events.push(sse_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
        ));
    }
    events.push(sse_event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(sse_event(
        "message_delta",
        &json!({
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": output_tokens},
        }),
    ));
    events.push(sse_event("message_stop", &json!({"type": "message_stop"})));
    sse_response(events, chunk_delay(&headers))
}

// ---------------------------------------------------------------- Gemini

/// Gemini accepts each field under its camelCase or its snake_case name.
fn gemini_key<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    v.get(camel).or_else(|| v.get(snake))
}

/// Concatenated `text` of a Gemini `parts` list.
fn gemini_text(content: Option<&Value>) -> String {
    content
        .and_then(|c| c.get("parts"))
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

/// One `logprobsResult` of the Gemini API for `tokens`, the first being
/// token number `first`, with `top` candidates per token.
fn gemini_logprobs(tokens: &[&str], first: usize, top: u64) -> Value {
    let chosen: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(n, t)| json!({"token": t, "logProbability": token_logprob(first + n)}))
        .collect();
    let top: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(n, t)| {
            let candidates: Vec<Value> = alternatives(t, first + n, top)
                .into_iter()
                .map(|(t, lp)| json!({"token": t, "logProbability": lp}))
                .collect();
            json!({"candidates": candidates})
        })
        .collect();
    json!({"topCandidates": top, "chosenCandidates": chosen})
}

/// `POST /v1beta/models/{model}:generateContent` and
/// `:streamGenerateContent` (SSE with `?alt=sse`, else one JSON array of the
/// chunks), also under `/v1/models/`.
async fn gemini(
    State(demo): State<Shared>,
    Path(target): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (model, stream) = match target.rsplit_once(':') {
        Some((model, "generateContent")) if !model.is_empty() => (model.to_owned(), false),
        Some((model, "streamGenerateContent")) if !model.is_empty() => (model.to_owned(), true),
        _ => {
            return error_response(
                StatusCode::NOT_FOUND,
                &format!("demo-backend has no Gemini method {target}"),
            )
        }
    };
    let req = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    // `generationConfig.responseLogprobs`, with `logprobs` candidates per token.
    let config = gemini_key(&req, "generationConfig", "generation_config");
    let asked = config
        .and_then(|c| gemini_key(c, "responseLogprobs", "response_logprobs"))
        .and_then(Value::as_bool)
        .filter(|asked| *asked)
        .map(|_| as_count(config.and_then(|c| c.get("logprobs"))).unwrap_or(0));
    let logprobs = match logprobs_for(&headers, asked) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let contents: &[Value] = req
        .get("contents")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let prompt = contents
        .iter()
        .rev()
        .find(|c| c.get("role").and_then(Value::as_str).unwrap_or("user") == "user")
        .map(|c| gemini_text(Some(c)))
        .unwrap_or_default();
    let system = gemini_key(&req, "systemInstruction", "system_instruction");
    let prompt_tokens = contents
        .iter()
        .map(|c| word_count(&gemini_text(Some(c))))
        .sum::<u64>()
        + word_count(&gemini_text(system));
    let reply = reply_for(&headers, echo(&prompt));
    let reply_tokens = word_count(&reply);
    let usage = json!({
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": reply_tokens,
        "totalTokenCount": prompt_tokens + reply_tokens,
    });
    let id = demo.id("gemini-demo");
    let chunk = |text: &str, first: usize, tokens: &[&str], last: bool| {
        let mut candidate = json!({
            "content": {"role": "model", "parts": [{"text": text}]},
            "index": 0,
        });
        if last {
            candidate["finishReason"] = json!("STOP");
        }
        if let Some(top) = logprobs {
            candidate["logprobsResult"] = gemini_logprobs(tokens, first, top);
            candidate["avgLogprobs"] = json!(token_logprob(first));
        }
        let mut c = json!({"candidates": [candidate], "modelVersion": model, "responseId": id});
        if last {
            c["usageMetadata"] = usage.clone();
        }
        c
    };

    if !stream {
        return Json(chunk(&reply, 0, &split_words(&reply), true)).into_response();
    }
    let words = pieces(&reply, &headers);
    let count = words.len();
    let chunks: Vec<Value> = if count == 0 {
        vec![chunk("", 0, &[], true)]
    } else {
        words
            .into_iter()
            .enumerate()
            .map(|(i, w)| chunk(w, i, &[w], i + 1 == count))
            .collect()
    };
    let sse = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|kv| kv == "alt=sse"));
    if !sse {
        // One JSON array, sent element by element as Gemini does.
        let count = chunks.len();
        let elements = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let open = if i == 0 { "[" } else { ",\r\n" };
                let close = if i + 1 == count { "]" } else { "" };
                Bytes::from(format!("{open}{c}{close}"))
            })
            .collect();
        return streamed_response("application/json", elements, chunk_delay(&headers));
    }
    sse_response(chunks.iter().map(sse_data).collect(), chunk_delay(&headers))
}

// ---------------------------------------------------------------- Azure OpenAI

/// Azure's error body: `{"error": {"code", "message"}}`.
fn azure_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// What Azure's content filter says of a text it let through.
fn content_filter_results() -> Value {
    let safe = json!({"filtered": false, "severity": "safe"});
    json!({"hate": safe, "self_harm": safe, "sexual": safe, "violence": safe})
}

/// Azure OpenAI's `POST /openai/deployments/{deployment}/{operation}`:
/// OpenAI's bodies, the deployment as the model (a body's own `model` is
/// ignored, as Azure does). Without `api-version` the service answers 404
/// "Resource not found", as Azure does. Chat answers carry Azure's content
/// filter results: `prompt_filter_results` (streamed: in a first chunk
/// without choices) and each choice's `content_filter_results`.
async fn azure_deployment(
    State(demo): State<Shared>,
    Path((deployment, operation)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let versioned = query.as_deref().is_some_and(|q| {
        q.split('&').any(|kv| {
            kv.strip_prefix("api-version=")
                .is_some_and(|v| !v.is_empty())
        })
    });
    if !versioned {
        return azure_error(StatusCode::NOT_FOUND, "404", "Resource not found");
    }
    let mut req = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    req["model"] = json!(deployment);
    let body = Bytes::from(req.to_string());
    let answer = match operation.as_str() {
        "chat/completions" => chat_completions(State(demo), headers, body).await,
        "completions" => return completions(State(demo), headers, body).await,
        "embeddings" => return embeddings(body).await,
        _ => return azure_error(StatusCode::NOT_FOUND, "404", "Resource not found"),
    };
    with_content_filter_results(answer).await
}

async fn with_content_filter_results(answer: Response) -> Response {
    let prompt_results =
        json!([{"prompt_index": 0, "content_filter_results": content_filter_results()}]);
    let (parts, body) = answer.into_parts();
    if !parts.status.is_success() {
        return Response::from_parts(parts, body);
    }
    if parts.headers.get(header::CONTENT_TYPE)
        == Some(&HeaderValue::from_static("text/event-stream"))
    {
        let first = sse_data(&json!({
            "id": "", "object": "", "created": 0, "model": "", "choices": [],
            "prompt_filter_results": prompt_results,
        }));
        let rest = body.into_data_stream();
        let stream =
            futures_util::stream::once(async move { Ok::<_, axum::Error>(first) }).chain(rest);
        return Response::from_parts(parts, Body::from_stream(stream));
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not read the answer",
        );
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    v["prompt_filter_results"] = prompt_results;
    if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
        for c in choices {
            c["content_filter_results"] = content_filter_results();
        }
    }
    let mut parts = parts;
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(v.to_string()))
}

// ---------------------------------------------------------------- AWS Bedrock

/// Bedrock's error: `{"message"}`, its type in `x-amzn-errortype`.
fn bedrock_error(status: StatusCode, kind: &'static str, message: &str) -> Response {
    let mut r = (status, Json(json!({"message": message}))).into_response();
    r.headers_mut()
        .insert("x-amzn-errortype", HeaderValue::from_static(kind));
    r
}

/// The text of a converse message's content blocks.
fn converse_text(content: Option<&Value>) -> String {
    content
        .and_then(Value::as_array)
        .map(|blocks| {
            blocks
                .iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

/// CRC-32 (IEEE), as AWS event-stream frames carry it.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One AWS event-stream message (`application/vnd.amazon.eventstream`):
/// prelude (total and header lengths, CRC), string headers
/// `:event-type`, `:content-type`, `:message-type`, the JSON payload and
/// the message CRC.
pub fn event_stream_message(event_type: &str, payload: &Value) -> Bytes {
    let payload = payload.to_string();
    let mut headers = Vec::new();
    for (name, value) in [
        (":event-type", event_type),
        (":content-type", "application/json"),
        (":message-type", "event"),
    ] {
        headers.push(name.len() as u8);
        headers.extend_from_slice(name.as_bytes());
        headers.push(7); // a string
        headers.extend_from_slice(&(value.len() as u16).to_be_bytes());
        headers.extend_from_slice(value.as_bytes());
    }
    let total = 12 + headers.len() + payload.len() + 4;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    let prelude = crc32(&out);
    out.extend_from_slice(&prelude.to_be_bytes());
    out.extend_from_slice(&headers);
    out.extend_from_slice(payload.as_bytes());
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    Bytes::from(out)
}

/// Bedrock runtime's `POST /model/{modelId}/{operation}`: `converse` and
/// `converse-stream` (Converse's bodies), `invoke` and
/// `invoke-with-response-stream` (an Anthropic messages body). Streams are
/// AWS event-stream frames. The model id arrives percent-decoded.
async fn bedrock(
    State(demo): State<Shared>,
    Path((model, operation)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return bedrock_error(StatusCode::BAD_REQUEST, "ValidationException", &e.0),
    };
    match operation.as_str() {
        "converse" | "converse-stream" => {
            bedrock_converse(&req, operation == "converse-stream", &headers)
        }
        "invoke" | "invoke-with-response-stream" => {
            if req
                .get("anthropic_version")
                .and_then(Value::as_str)
                .is_none()
            {
                return bedrock_error(
                    StatusCode::BAD_REQUEST,
                    "ValidationException",
                    "Malformed input request: required key [anthropic_version] not found",
                );
            }
            let mut anthropic = req;
            anthropic["model"] = json!(model);
            let streamed = operation == "invoke-with-response-stream";
            anthropic["stream"] = json!(streamed);
            let answer = messages(
                State(demo),
                headers.clone(),
                Bytes::from(anthropic.to_string()),
            )
            .await;
            if !streamed {
                return answer;
            }
            // The Anthropic events, each base64 in a `chunk` message.
            let Ok(events) = axum::body::to_bytes(answer.into_body(), MAX_BODY_BYTES).await else {
                return bedrock_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerException",
                    "no answer",
                );
            };
            let chunks = String::from_utf8_lossy(&events)
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(|data| {
                    event_stream_message("chunk", &json!({"bytes": base64(data.as_bytes())}))
                })
                .collect();
            streamed_response(
                "application/vnd.amazon.eventstream",
                chunks,
                chunk_delay(&headers),
            )
        }
        _ => bedrock_error(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            "unknown operation",
        ),
    }
}

fn bedrock_converse(req: &Value, stream: bool, headers: &HeaderMap) -> Response {
    let messages: &[Value] = req
        .get("messages")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let prompt = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| converse_text(m.get("content")))
        .unwrap_or_default();
    let input_tokens = messages
        .iter()
        .map(|m| word_count(&converse_text(m.get("content"))))
        .sum::<u64>()
        + word_count(&converse_text(req.get("system")));
    let reply = reply_for(headers, echo(&prompt));
    let output_tokens = word_count(&reply);
    let usage = json!({"inputTokens": input_tokens, "outputTokens": output_tokens, "totalTokens": input_tokens + output_tokens});
    if !stream {
        return Json(json!({
            "output": {"message": {"role": "assistant", "content": [{"text": reply}]}},
            "stopReason": "end_turn",
            "usage": usage,
            "metrics": {"latencyMs": 0},
        }))
        .into_response();
    }
    let mut events = vec![event_stream_message(
        "messageStart",
        &json!({"role": "assistant"}),
    )];
    for w in pieces(&reply, headers) {
        events.push(event_stream_message(
            "contentBlockDelta",
            &json!({"contentBlockIndex": 0, "delta": {"text": w}}),
        ));
    }
    events.push(event_stream_message(
        "contentBlockStop",
        &json!({"contentBlockIndex": 0}),
    ));
    events.push(event_stream_message(
        "messageStop",
        &json!({"stopReason": "end_turn"}),
    ));
    events.push(event_stream_message(
        "metadata",
        &json!({"usage": usage, "metrics": {"latencyMs": 0}}),
    ));
    streamed_response(
        "application/vnd.amazon.eventstream",
        events,
        chunk_delay(headers),
    )
}

// ---------------------------------------------------------------- Ollama

/// Ollama's error body: `{"error": "..."}`, a string.
fn ollama_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// Days since 1970-01-01 as a civil date (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Now, as Ollama writes `created_at` (RFC 3339, nanoseconds, UTC).
fn ollama_time() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        t / 3600,
        t % 3600 / 60,
        t % 60,
        now.subsec_nanos()
    )
}

/// Which of Ollama's two native APIs an answer is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OllamaApi {
    Chat,
    Generate,
}

/// One Ollama answer to give.
struct OllamaTurn {
    api: OllamaApi,
    model: String,
    reply: String,
    /// With `think`: the model's thinking, given before the answer.
    thinking: Option<String>,
    prompt_tokens: u64,
    /// Generate: the token ids of the exchange (`context`).
    context: Option<Vec<u64>>,
    /// Log-probabilities with this many alternatives per token.
    logprobs: Option<u64>,
}

impl OllamaTurn {
    /// One line (or the whole answer): `text` and `thinking` in the API's
    /// place for them.
    fn line(&self, text: &str, thinking: Option<&str>, created_at: &str) -> Value {
        let mut v = json!({"model": self.model, "created_at": created_at});
        match self.api {
            OllamaApi::Chat => {
                let mut message = json!({"role": "assistant", "content": text});
                if let Some(t) = thinking {
                    message["thinking"] = json!(t);
                }
                v["message"] = message;
            }
            OllamaApi::Generate => {
                v["response"] = json!(text);
                if let Some(t) = thinking {
                    v["thinking"] = json!(t);
                }
            }
        }
        v["done"] = json!(false);
        v
    }

    /// Marks `v` as the last line: reason, counts, durations (the demo
    /// takes none) and generate's `context`.
    fn done(&self, mut v: Value) -> Value {
        v["done_reason"] = json!("stop");
        v["done"] = json!(true);
        for (k, n) in [
            ("total_duration", 0),
            ("load_duration", 0),
            ("prompt_eval_count", self.prompt_tokens),
            ("prompt_eval_duration", 0),
            ("eval_count", word_count(&self.reply)),
            ("eval_duration", 0),
        ] {
            v[k] = json!(n);
        }
        if let Some(ids) = &self.context {
            v["context"] = json!(ids);
        }
        v
    }

    fn respond(self, stream: bool, headers: &HeaderMap) -> Response {
        let created_at = ollama_time();
        if !stream {
            let mut v = self.done(self.line(&self.reply, self.thinking.as_deref(), &created_at));
            if let Some(top) = self.logprobs {
                v["logprobs"] = json!(token_entries(&split_words(&self.reply), 0, top));
            }
            return Json(v).into_response();
        }
        let mut lines = Vec::new();
        if let Some(t) = &self.thinking {
            lines.push(self.line("", Some(t), &created_at));
        }
        let words = pieces(&self.reply, headers);
        for (i, w) in words.iter().enumerate() {
            let mut v = self.line(w, None, &created_at);
            if let Some(top) = self.logprobs {
                v["logprobs"] = json!([token_entry(w, i, top)]);
            }
            lines.push(v);
        }
        lines.push(self.done(self.line("", None, &created_at)));
        let chunks = lines
            .iter()
            .map(|v| Bytes::from(format!("{v}\n")))
            .collect();
        streamed_response("application/x-ndjson", chunks, chunk_delay(headers))
    }
}

/// What an Ollama request asks for beyond its prompt: the model (required),
/// streaming (the default), thinking, log-probabilities.
struct OllamaAsk {
    model: String,
    stream: bool,
    think: bool,
    logprobs: Option<u64>,
}

/// An Ollama request and its asks, or the message of a 400.
fn ollama_request(headers: &HeaderMap, body: &[u8]) -> Result<(Value, OllamaAsk), String> {
    let req = parse_body(body).map_err(|e| e.0)?;
    let ask = ollama_ask(headers, &req)?;
    Ok((req, ask))
}

/// The request's asks, or the message of a 400.
fn ollama_ask(headers: &HeaderMap, req: &Value) -> Result<OllamaAsk, String> {
    let model = match req.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => m.to_owned(),
        _ => return Err("model is required".to_owned()),
    };
    let asked = (req.get("logprobs").and_then(Value::as_bool) == Some(true))
        .then(|| as_count(req.get("top_logprobs")).unwrap_or(0));
    let logprobs = logprobs_for(headers, asked).map_err(|e| e.0)?;
    Ok(OllamaAsk {
        model,
        stream: req.get("stream").and_then(Value::as_bool).unwrap_or(true),
        think: match req.get("think") {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(_)) => true,
            _ => false,
        },
        logprobs,
    })
}

/// A request without a prompt loads the model (`keep_alive: 0` unloads it).
fn ollama_load(api: OllamaApi, model: String, req: &Value) -> Response {
    let unload = req.get("keep_alive").and_then(Value::as_f64) == Some(0.0);
    let turn = OllamaTurn {
        api,
        model,
        reply: String::new(),
        thinking: None,
        prompt_tokens: 0,
        context: None,
        logprobs: None,
    };
    let mut v = turn.line("", None, &ollama_time());
    v["done_reason"] = json!(if unload { "unload" } else { "load" });
    v["done"] = json!(true);
    Json(v).into_response()
}

/// Ollama's native `POST /api/chat`: JSON lines (`application/x-ndjson`)
/// unless `stream` is `false`.
async fn ollama_chat(headers: HeaderMap, body: Bytes) -> Response {
    let (req, ask) = match ollama_request(&headers, &body) {
        Ok(r) => r,
        Err(m) => return ollama_error(StatusCode::BAD_REQUEST, &m),
    };
    let messages = req.get("messages");
    if messages.and_then(Value::as_array).is_none_or(Vec::is_empty) {
        return ollama_load(OllamaApi::Chat, ask.model, &req);
    }
    let prompt = last_user_text(messages);
    let turn = OllamaTurn {
        api: OllamaApi::Chat,
        model: ask.model,
        reply: reply_for(&headers, echo(&prompt)),
        thinking: ask.think.then(|| format!("thinking about: {prompt}")),
        prompt_tokens: messages_word_count(messages),
        context: None,
        logprobs: ask.logprobs,
    };
    turn.respond(ask.stream, &headers)
}

/// Ollama's native `POST /api/generate`: `system`, `prompt`, `suffix`; the
/// answer is `response`, with the exchange's token ids in `context`.
async fn ollama_generate(headers: HeaderMap, body: Bytes) -> Response {
    let (req, ask) = match ollama_request(&headers, &body) {
        Ok(r) => r,
        Err(m) => return ollama_error(StatusCode::BAD_REQUEST, &m),
    };
    let text = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let (prompt, system, suffix) = (text("prompt"), text("system"), text("suffix"));
    if prompt.is_empty() {
        return ollama_load(OllamaApi::Generate, ask.model, &req);
    }
    let reply = reply_for(&headers, echo(&format!("{prompt}{suffix}")));
    let prompt_tokens = word_count(&system) + word_count(&prompt) + word_count(&suffix);
    let ids = (1..=prompt_tokens + word_count(&reply))
        .map(|i| 1000 + i)
        .collect();
    let turn = OllamaTurn {
        api: OllamaApi::Generate,
        model: ask.model,
        reply,
        thinking: ask.think.then(|| format!("thinking about: {prompt}")),
        prompt_tokens,
        context: Some(ids),
        logprobs: ask.logprobs,
    };
    turn.respond(ask.stream, &headers)
}

// ---------------------------------------------------------------- fallback & introspection

async fn not_found(method: Method, uri: Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("demo-backend has no route for {method} {}", uri.path()),
    )
}

async fn stats(State(demo): State<Shared>) -> Response {
    let (started, completed) = demo.counts();
    let streaming = demo.streaming.load(Ordering::Relaxed);
    Json(json!({"started": started, "completed": completed, "streaming": streaming}))
        .into_response()
}

async fn requests(State(demo): State<Shared>) -> Response {
    let snapshot: Vec<(Method, Uri, HeaderMap, Bytes)> = demo
        .log()
        .iter()
        .map(|r| {
            (
                r.method.clone(),
                r.uri.clone(),
                r.headers.clone(),
                r.body.clone(),
            )
        })
        .collect();
    let list: Vec<Value> = snapshot
        .into_iter()
        .map(|(method, uri, headers, body)| {
            let mut hs = Map::new();
            for name in headers.keys() {
                let joined = headers
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect::<Vec<_>>()
                    .join(", ");
                hs.insert(name.as_str().to_owned(), Value::String(joined));
            }
            let path = uri
                .path_and_query()
                .map(|pq| pq.as_str().to_owned())
                .unwrap_or_else(|| uri.path().to_owned());
            json!({
                "method": method.as_str(),
                "path": path,
                "headers": hs,
                "body": String::from_utf8_lossy(&body),
            })
        })
        .collect();
    Json(Value::Array(list)).into_response()
}

async fn reset(State(demo): State<Shared>) -> Response {
    demo.log().clear();
    demo.started.store(0, Ordering::Relaxed);
    demo.completed.store(0, Ordering::Relaxed);
    Json(json!({"started": 0, "completed": 0})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_words_keeps_exact_text() {
        for s in [
            "echo: hello world",
            "echo:   a  b ",
            "  lead x",
            "one",
            "",
            "echo: ",
        ] {
            let pieces = split_words(s);
            assert_eq!(pieces.concat(), s);
            assert_eq!(
                pieces.len() as u64,
                word_count(s).max(u64::from(!s.is_empty()))
            );
        }
        assert_eq!(split_words("echo: hi there"), ["echo: ", "hi ", "there"]);
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embed("hello");
        assert_eq!(a, embed("hello"));
        assert_ne!(a, embed("hellp"));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn base64_matches_reference() {
        // 1.0f32 LE = 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 1.0]), "AACAPwAAgD8=");
    }

    #[test]
    fn content_text_handles_parts() {
        let v = json!([{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]);
        assert_eq!(content_text(Some(&v)), "ab");
        assert_eq!(content_text(Some(&json!("s"))), "s");
        assert_eq!(content_text(None), "");
    }
}
