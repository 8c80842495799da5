//! The spans of the filter's calls (and of reviewers' decisions): one
//! server span per call, a child of the W3C `traceparent` the call carries
//! (the caller's, which the filter passes on: see
//! `countersign_core::trace_context`), named by what the call does. The
//! handlers add what they learn ([`note`]): review and record ids, the
//! decision. Exported over OTLP when `[otlp]` is set ([`crate::telemetry`]);
//! otherwise the tracer is OpenTelemetry's no-op one.

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{FutureExt, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The operation a route is, and the attribute its `{id}` goes into; `None`
/// for routes without a span.
fn operation(method: &Method, route: &str) -> Option<(&'static str, &'static str)> {
    const REVIEW: &str = "countersign.review.id";
    const RECORD: &str = "countersign.record.id";
    Some(match (method.as_str(), route) {
        ("POST", "/v1/reviews") => ("countersign.review.create", REVIEW),
        ("GET", "/v1/reviews/{id}/wait") => ("countersign.review.decision", REVIEW),
        ("POST", "/v1/reviews/{id}/expire") => ("countersign.review.expire", REVIEW),
        ("POST", "/v1/reviews/{id}/cancel") => ("countersign.review.cancel", REVIEW),
        ("GET", "/v1/reviews/{id}/status") => ("countersign.review.status", REVIEW),
        ("POST", "/v1/reviews/{id}/consume") => ("countersign.token.consume", REVIEW),
        ("POST", "/api/reviews/{id}/approve" | "/api/reviews/{id}/reject")
        | ("POST", "/api/reviews/{id}/edit") => ("countersign.review.decide", REVIEW),
        ("POST", "/v1/records") => ("countersign.record.append", RECORD),
        ("POST", "/v1/records/{id}/response") => ("countersign.record.append_response", RECORD),
        _ => return None,
    })
}

/// Middleware: the span of one call, around its handler.
pub async fn span(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let Some((name, id_key)) = route
        .as_deref()
        .and_then(|r| operation(request.method(), r))
    else {
        return next.run(request).await;
    };
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    let mut attributes = vec![
        KeyValue::new("http.request.method", request.method().as_str().to_string()),
        KeyValue::new("http.route", route.unwrap_or_default()),
    ];
    // `/v1/reviews/{id}/...`, `/api/reviews/{id}/...`, `/v1/records/{id}/...`
    if let Some(id) = request.uri().path().split('/').nth(3) {
        attributes.push(KeyValue::new(id_key, id.to_string()));
    }
    let tracer = opentelemetry::global::tracer(crate::telemetry::SCOPE);
    let span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    let cx = parent.with_span(span);
    let response = next.run(request).with_context(cx.clone()).await;
    let span = cx.span();
    let status = response.status();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status.as_u16()),
    ));
    if status.is_server_error() {
        span.set_status(Status::error(status.to_string()));
    }
    span.end();
    response
}

/// Adds `key = value` to the span of the call being handled (nothing
/// outside one).
pub fn note(key: &'static str, value: impl Into<Value>) {
    Context::map_current(|cx| cx.span().set_attribute(KeyValue::new(key, value)));
}
