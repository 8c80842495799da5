//! HTTP side of the session records: the filter's write endpoints, the
//! reviewer query and export API, Prometheus metrics, and the retention task.
//!
//! * `POST /v1/records` (filter token): body [`NewRecord`]; 201
//!   [`RecordCreated`] once the entry is committed; 400 invalid (including a
//!   `body_sha256` that does not match `body`); 401 filter token; 503 when the
//!   database cannot take the write (the filter then refuses the request).
//! * `POST /v1/records/{id}/response` (filter token): body [`RecordResponse`];
//!   201 [`RecordCreated`] (the response entry's id); 404 unknown request
//!   record; 409 already has a response part; 503 database.
//! * `GET /api/records?caller=&model=&decision=&review_id=&request_id=&since_ms=&until_ms=&limit=&after_seq=`
//!   (reviewer): `{"records":[merged...],"next_after_seq":N|null}`, oldest first.
//! * `GET /api/records/{id}` (reviewer): one merged record.
//! * `GET /api/records/export?...` (reviewer): the same filters, every match
//!   as JSON Lines (`application/x-ndjson`).
//! * `GET /metrics`: Prometheus text format; public unless
//!   `metrics_public = false`, then reviewer authentication is required.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use countersign_core::wire::{
    NewRecord, RecordCreated, RecordResponse, ServiceError, ServiceErrorDetail,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{RecordError, RecordQuery, RecordStore, DEFAULT_PAGE, MAX_PAGE};
use crate::api::{json_from_slice, parse_query, read_body, text_filter, FilterAuth, Reviewer};
use crate::error::ApiError;
use crate::state::AppState;

/// How often retention runs (it also runs at start).
pub const RETENTION_PERIOD: Duration = Duration::from_secs(3600);

const MS_PER_DAY: u64 = 86_400_000;

/// 503 `unavailable`: the record could not be stored.
fn unavailable() -> Response {
    let body = ServiceError {
        error: ServiceErrorDetail {
            code: "unavailable".into(),
            message: "the record could not be stored".into(),
        },
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

fn record_error(e: RecordError) -> Response {
    match e {
        RecordError::BadRequest(m) => ApiError::BadRequest(m).into_response(),
        RecordError::NotFound => ApiError::NotFound("no such record".into()).into_response(),
        RecordError::Conflict(m) => ApiError::Conflict(m).into_response(),
        RecordError::Db(e) => {
            tracing::error!(error = %e, "record write failed");
            unavailable()
        }
    }
}

/// Parses a JSON body (any content type), answering in the service's error
/// shape. Unlike [`crate::api::parse_json`], a blank body is not read as `{}`.
fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    json_from_slice(&read_body(body)?)
}

/// 201 with the id of the entry just written.
fn created(record_id: String) -> Response {
    (StatusCode::CREATED, Json(RecordCreated { record_id })).into_response()
}

async fn blocking<T, F>(store: &Arc<RecordStore>, f: F) -> Result<T, RecordError>
where
    T: Send + 'static,
    F: FnOnce(&RecordStore) -> Result<T, RecordError> + Send + 'static,
{
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(r) => r,
        Err(e) => Err(RecordError::Db(crate::db::DbError::Conversion(format!(
            "blocking task failed: {e}"
        )))),
    }
}

/// `POST /v1/records`.
pub async fn create_record(
    State(state): State<AppState>,
    _auth: FilterAuth,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let rec: NewRecord = match parse_json(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let request_id = rec.request_id.clone();
    let decision = rec.decision.clone();
    let now = crate::now_ms();
    match blocking(state.records(), move |s| s.write_request(rec, now)).await {
        Ok(w) => {
            tracing::info!(
                record_id = %w.record_id,
                seq = w.seq,
                request_id = %request_id,
                decision = %decision,
                "record written"
            );
            created(w.record_id)
        }
        Err(e) => record_error(e),
    }
}

/// `POST /v1/records/{id}/response`.
pub async fn create_response(
    State(state): State<AppState>,
    _auth: FilterAuth,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let resp: RecordResponse = match parse_json(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let status = resp.status;
    let now = crate::now_ms();
    let ref_id = id.clone();
    match blocking(state.records(), move |s| {
        s.write_response(&ref_id, resp, now)
    })
    .await
    {
        Ok(w) => {
            tracing::info!(
                record_id = %w.record_id,
                seq = w.seq,
                request_record_id = %id,
                upstream_status = status,
                "record response written"
            );
            created(w.record_id)
        }
        Err(e) => record_error(e),
    }
}

/// Query of `GET /api/records` and `/api/records/export`. Empty text values
/// count as absent.
#[derive(Debug, Default, Deserialize)]
pub struct RecordParams {
    /// Caller name (exact).
    pub caller: Option<String>,
    /// Model (exact).
    pub model: Option<String>,
    /// Decision (exact).
    pub decision: Option<String>,
    /// Review id.
    pub review_id: Option<String>,
    /// Envoy request id.
    pub request_id: Option<String>,
    /// Written at or after (Unix ms).
    pub since_ms: Option<u64>,
    /// Written before (Unix ms).
    pub until_ms: Option<u64>,
    /// Page size, 1..=500 (default 50); ignored by the export.
    pub limit: Option<u32>,
    /// Records after this `seq` (the previous page's `next_after_seq`).
    pub after_seq: Option<i64>,
}

impl RecordParams {
    /// The store query.
    pub fn to_query(self) -> Result<RecordQuery, ApiError> {
        Ok(RecordQuery {
            caller: text_filter("caller", self.caller)?,
            model: text_filter("model", self.model)?,
            decision: text_filter("decision", self.decision)?,
            review_id: text_filter("review_id", self.review_id)?,
            request_id: text_filter("request_id", self.request_id)?,
            since_ms: self.since_ms,
            until_ms: self.until_ms,
            after_seq: self.after_seq,
            limit: self.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE),
        })
    }
}

/// Body of `GET /api/records`.
#[derive(Debug, Serialize)]
pub struct RecordPage {
    /// Merged records, oldest first.
    pub records: Vec<Value>,
    /// `after_seq` of the next page; null on the last page.
    pub next_after_seq: Option<i64>,
}

async fn read<T, F>(state: &AppState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&RecordStore) -> crate::db::DbResult<T> + Send + 'static,
{
    let store = Arc::clone(state.records());
    Ok(tokio::task::spawn_blocking(move || f(&store)).await??)
}

/// `GET /api/records`.
pub async fn list_records(
    State(state): State<AppState>,
    _reviewer: Reviewer,
    query: Result<Query<RecordParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = parse_query(query)?.to_query()?;
    let limit = q.limit as usize;
    let records = read(&state, move |s| s.query(&q)).await?;
    let next_after_seq = if records.len() == limit {
        records
            .last()
            .and_then(|r| r.get("seq"))
            .and_then(Value::as_i64)
    } else {
        None
    };
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(RecordPage {
            records,
            next_after_seq,
        }),
    )
        .into_response())
}

/// `GET /api/records/{id}`.
pub async fn get_record(
    State(state): State<AppState>,
    _reviewer: Reviewer,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let rec = read(&state, move |s| s.get(&id))
        .await?
        .ok_or_else(|| ApiError::NotFound("no such record".into()))?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(rec)).into_response())
}

/// `GET /api/records/export`: every matching record as JSON Lines, read a
/// page at a time while streaming.
pub async fn export_records(
    State(state): State<AppState>,
    _reviewer: Reviewer,
    query: Result<Query<RecordParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let mut q = parse_query(query)?.to_query()?;
    q.limit = MAX_PAGE;
    let store = Arc::clone(state.records());
    let stream = futures_util::stream::unfold(Some(q), move |next| {
        let store = Arc::clone(&store);
        async move {
            let q = next?;
            let page_q = q.clone();
            let page = match tokio::task::spawn_blocking(move || store.query(&page_q)).await {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "record export failed");
                    return Some((Err(std::io::Error::other("record export failed")), None));
                }
                Err(e) => {
                    tracing::error!(error = %e, "record export failed");
                    return Some((Err(std::io::Error::other("record export failed")), None));
                }
            };
            let mut chunk = Vec::new();
            for rec in &page {
                if serde_json::to_writer(&mut chunk, rec).is_err() {
                    return Some((Err(std::io::Error::other("record export failed")), None));
                }
                chunk.push(b'\n');
            }
            let last = page
                .last()
                .and_then(|r| r.get("seq"))
                .and_then(Value::as_i64);
            let next = match last {
                Some(seq) if page.len() == MAX_PAGE as usize => Some(RecordQuery {
                    after_seq: Some(seq),
                    ..q
                }),
                _ => None,
            };
            Some((Ok(Bytes::from(chunk)), next))
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"records.jsonl\"",
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

// ---------------------------------------------------------------- metrics

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
    let counts = read(state, |s| s.review_counts()).await?;
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

/// `GET /metrics`.
pub async fn metrics(
    State(state): State<AppState>,
    reviewer: Result<Reviewer, ApiError>,
) -> Result<Response, ApiError> {
    if !state.config().metrics_public {
        reviewer?;
    }
    let text = render_metrics(&state).await?;
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

// ---------------------------------------------------------------- retention

/// Applies `record_retention_days` once; returns how many entries were
/// deleted (0 when retention is off).
pub async fn retention_once(state: &AppState) -> Result<usize, ApiError> {
    let days = state.config().record_retention_days;
    if days == 0 {
        return Ok(0);
    }
    let now = crate::now_ms();
    let cutoff = now.saturating_sub(days.saturating_mul(MS_PER_DAY));
    let deleted = read(state, move |s| s.apply_retention(cutoff, now)).await?;
    if deleted > 0 {
        tracing::info!(deleted, cutoff_ms = cutoff, "record retention applied");
    }
    Ok(deleted)
}

/// Starts the task applying retention at start and every `period` (does
/// nothing when `record_retention_days = 0`). Abort it on shutdown.
pub fn spawn_retention(state: &AppState, period: Duration) -> tokio::task::JoinHandle<()> {
    let state = state.clone();
    tokio::spawn(async move {
        if state.config().record_retention_days == 0 {
            return;
        }
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = retention_once(&state).await {
                tracing::error!(error = %e, "record retention failed");
            }
        }
    })
}
