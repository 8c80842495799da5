//! `GET /metrics`: Prometheus text format. On the service's address:
//! public unless `metrics_public = false`, then reviewer authentication is
//! required; with `metrics_listen`, only on that address (and not on the
//! service's), without authentication.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::auth::Reviewer;
use super::error::ApiError;
use crate::state::AppState;

/// Review statuses always reported by `countersign_reviews_decided_total`.
const FINAL_STATUSES: [&str; 4] = ["approved", "rejected", "expired", "cancelled"];

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    for (labels, v) in samples {
        out.push_str(&format!("{name}{labels} {v}\n"));
    }
}

/// The metrics text (Prometheus exposition format 0.0.4).
pub async fn render_metrics(state: &AppState) -> Result<String, ApiError> {
    let counts = state.records_db(|s| s.review_counts()).await?;
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    let pending = counts
        .iter()
        .find(|(s, _)| s == "pending")
        .map_or(0, |(_, n)| *n);
    let mut decided: Vec<(String, u64)> = FINAL_STATUSES
        .iter()
        .map(|s| {
            let n = counts.iter().find(|(c, _)| c == s).map_or(0, |(_, n)| *n);
            (format!("{{status=\"{s}\"}}"), n)
        })
        .collect();
    for (s, n) in &counts {
        let known = s == "pending" || FINAL_STATUSES.contains(&s.as_str());
        // Status names come from our own database; keep them label-safe.
        if !known && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            decided.push((format!("{{status=\"{s}\"}}"), *n));
        }
    }
    let c = state.records().counters();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    metric(
        &mut out,
        "countersign_reviews_created_total",
        "counter",
        "Reviews created (counted from the database).",
        &[(String::new(), total)],
    );
    metric(
        &mut out,
        "countersign_reviews_decided_total",
        "counter",
        "Reviews that left pending, by final status (counted from the database).",
        &decided,
    );
    metric(
        &mut out,
        "countersign_reviews_pending",
        "gauge",
        "Reviews waiting for a decision.",
        &[(String::new(), pending)],
    );
    metric(
        &mut out,
        "countersign_records_written_total",
        "counter",
        "Session record entries written by this process, by kind.",
        &[
            ("{kind=\"request\"}".into(), load(&c.requests)),
            ("{kind=\"response\"}".into(), load(&c.responses)),
            ("{kind=\"retention\"}".into(), load(&c.retentions)),
        ],
    );
    metric(
        &mut out,
        "countersign_record_write_failures_total",
        "counter",
        "Session record writes the database refused (the filter refuses those requests).",
        &[(String::new(), load(&c.write_failures))],
    );
    metric(
        &mut out,
        "countersign_records_deleted_total",
        "counter",
        "Session record entries deleted by retention in this process.",
        &[(String::new(), load(&c.retention_deleted))],
    );
    metric(
        &mut out,
        "countersign_long_polls_waiting",
        "gauge",
        "Reviews with at least one filter long poll waiting on them.",
        &[(String::new(), state.waiting_reviews() as u64)],
    );
    Ok(out)
}

/// `GET /metrics` on the service's address (when `metrics_listen` is not
/// set).
pub async fn metrics(
    State(state): State<AppState>,
    reviewer: Result<Reviewer, ApiError>,
) -> Result<Response, ApiError> {
    if !state.config().metrics_public {
        reviewer?;
    }
    metrics_answer(&state).await
}

/// `GET /metrics` on `metrics_listen`, an address only the scraper reaches.
pub async fn metrics_only(State(state): State<AppState>) -> Result<Response, ApiError> {
    metrics_answer(&state).await
}

async fn metrics_answer(state: &AppState) -> Result<Response, ApiError> {
    let text = render_metrics(state).await?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response())
}
