//! The spans of the filter's calls (and of reviewers' decisions): one
//! server span per call, a child of the W3C `traceparent` the call carries
//! (the caller's, which the filter passes on: see
//! `countersign_core::trace_context`), named by what the call does. The
//! handlers add what they learn ([`note`]): review and record ids, the
//! decision. Exported over OTLP when `[otlp]` is set ([`crate::telemetry`]);
//! otherwise the tracer is OpenTelemetry's no-op one.
//!
//! A decision is also a span in the *caller's* trace: the trace context the
//! review's creation carried is stored with the review
//! ([`caller_trace_context`]), and every decision (API, UI, Slack, an
//! assessor) runs in an internal span `countersign.review.decided`, a child
//! of that caller's span, linked to the span of the request that decided
//! ([`decision_context`]). A child, not only a link: the held request waits
//! for exactly this decision, which is part of the caller's operation, so
//! the caller's trace shows who decided and when without a search. The
//! reviewer's HTTP request itself (`countersign.review.decide`) stays in the
//! trace it carried (or a new one): it is the reviewer's operation, a
//! browser or API client may trace it on its own, and one request cannot
//! have two parents; the link joins the two.

use axum::extract::{MatchedPath, Request};
use std::collections::HashMap;

use axum::http::{HeaderMap, Method};
use axum::response::Response;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Link, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;

use crate::store::TraceContext;

/// The operation a route is, and the attribute its `{id}` goes into; `None`
/// for routes without a span.
fn operation(method: &Method, route: &str) -> Option<(&'static str, &'static str)> {
    const REVIEW: &str = "countersign.review.id";
    const RECORD: &str = "countersign.record.id";
    Some(match (method.as_str(), route) {
        ("POST", "/v1/reviews") => ("countersign.review.create", REVIEW),
        ("GET", "/v1/reviews/{id}/wait") => ("countersign.review.decision", REVIEW),
        ("POST", "/v1/watch") => ("countersign.watch", REVIEW),
        ("POST", "/v1/reviews/{id}/expire") => ("countersign.review.expire", REVIEW),
        ("POST", "/v1/reviews/{id}/cancel") => ("countersign.review.cancel", REVIEW),
        ("GET", "/v1/reviews/{id}/status") => ("countersign.review.status", REVIEW),
        ("POST", "/v1/reviews/{id}/consume") => ("countersign.token.consume", REVIEW),
        ("POST", "/api/reviews/{id}/approve" | "/api/reviews/{id}/reject")
        | ("POST", "/api/reviews/{id}/edit") => ("countersign.review.decide", REVIEW),
        ("POST", "/v1/records") => ("countersign.record.append", RECORD),
        ("POST", "/v1/records/batch") => ("countersign.record.append_batch", RECORD),
        ("POST", "/v1/records/responses") => ("countersign.record.append_responses", RECORD),
        ("POST", "/v1/records/{id}/response") => ("countersign.record.append_response", RECORD),
        _ => return None,
    })
}

/// Starts the span of one call (`None` for routes without one): the
/// context its handler runs in, ended by [`finish`]. Part of
/// [`super::every_request`].
pub fn start(request: &Request) -> Option<Context> {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())?;
    let (name, id_key) = operation(request.method(), &route)?;
    let has_id = route.contains("{id}");
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    let mut attributes = vec![
        KeyValue::new("http.request.method", request.method().as_str().to_string()),
        KeyValue::new("http.route", route),
    ];
    // `/v1/reviews/{id}/...`, `/api/reviews/{id}/...`, `/v1/records/{id}/...`
    if let Some(id) = request.uri().path().split('/').nth(3).filter(|_| has_id) {
        attributes.push(KeyValue::new(id_key, id.to_string()));
    }
    let tracer = opentelemetry::global::tracer(crate::telemetry::SCOPE);
    let span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    Some(parent.with_span(span))
}

/// Ends the span of [`start`] with what came of the call.
pub fn finish(cx: &Context, response: &Response) {
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
}

/// Adds `key = value` to the span of the call being handled (nothing
/// outside one).
pub fn note(key: &'static str, value: impl Into<Value>) {
    Context::map_current(|cx| cx.span().set_attribute(KeyValue::new(key, value)));
}

/// The caller's trace context on `headers` (`traceparent`, `tracestate`),
/// as the W3C propagator reads it: `None` when there is no valid one.
pub fn caller_trace_context(headers: &HeaderMap) -> Option<TraceContext> {
    let propagator = TraceContextPropagator::new();
    let cx = propagator.extract(&HeaderExtractor(headers));
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut fields = HashMap::new();
    propagator.inject_context(&cx, &mut fields);
    Some(TraceContext {
        traceparent: fields.remove("traceparent")?,
        tracestate: fields.remove("tracestate").filter(|s| !s.is_empty()),
    })
}

/// The context of a decision on a review created under `stored`: a new
/// internal span `countersign.review.decided`, child of the caller's span,
/// with a link to the current span (the deciding request's), when it has
/// one; without a stored context, a child of the current span. The caller
/// ends it ([`end_decision`]).
pub fn decision_context(stored: Option<&TraceContext>, review_id: &str) -> Context {
    let current = Context::current();
    let tracer = opentelemetry::global::tracer(crate::telemetry::SCOPE);
    let mut builder = tracer
        .span_builder("countersign.review.decided")
        .with_kind(SpanKind::Internal)
        .with_attributes([KeyValue::new(
            "countersign.review.id",
            review_id.to_string(),
        )]);
    let parent = match stored {
        Some(t) => {
            let mut fields = HashMap::from([("traceparent".to_string(), t.traceparent.clone())]);
            if let Some(state) = &t.tracestate {
                fields.insert("tracestate".to_string(), state.clone());
            }
            let deciding = current.span().span_context().clone();
            if deciding.is_valid() {
                builder = builder.with_links(vec![Link::with_context(deciding)]);
            }
            TraceContextPropagator::new().extract(&fields)
        }
        None => current,
    };
    let span = builder.start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// Ends the span of [`decision_context`] with what came of the decision.
pub fn end_decision(cx: &Context, attributes: Vec<KeyValue>) {
    let span = cx.span();
    span.set_attributes(attributes);
    span.end();
}
