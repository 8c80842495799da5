//! The session records over HTTP (see [`crate::records`]): the filter's
//! write endpoints and the reviewer query and export API.
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

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use countersign_core::wire::{NewRecord, RecordCreated, RecordResponse};
use serde::Serialize;
use serde_json::Value;

use super::auth::{FilterAuth, Reviewer};
use super::error::ApiError;
use super::extract::{clean_text_filters, QueryParams, StrictJsonBody};
use super::spans;
use crate::records::{RecordQuery, MAX_PAGE};
use crate::state::AppState;

/// `POST /v1/records`.
pub async fn create_record(
    State(state): State<AppState>,
    _auth: FilterAuth,
    StrictJsonBody(rec): StrictJsonBody<NewRecord>,
) -> Result<(StatusCode, Json<RecordCreated>), ApiError> {
    let request_id = rec.request_id.clone();
    let decision = rec.decision.clone();
    let now = crate::now_ms();
    let w = state
        .write_record("request", move |s| s.write_request(rec, now))
        .await?;
    tracing::info!(
        record_id = %w.record_id,
        seq = w.seq,
        request_id = %request_id,
        decision = %decision,
        "record written"
    );
    spans::note("countersign.record.id", w.record_id.clone());
    spans::note("countersign.record.seq", w.seq);
    spans::note("countersign.request_id", request_id);
    Ok(created(w.record_id))
}

/// `POST /v1/records/{id}/response`.
pub async fn create_response(
    State(state): State<AppState>,
    _auth: FilterAuth,
    Path(id): Path<String>,
    StrictJsonBody(resp): StrictJsonBody<RecordResponse>,
) -> Result<(StatusCode, Json<RecordCreated>), ApiError> {
    let status = resp.status;
    let now = crate::now_ms();
    let ref_id = id.clone();
    let w = state
        .write_record("response", move |s| s.write_response(&ref_id, resp, now))
        .await?;
    tracing::info!(
        record_id = %w.record_id,
        seq = w.seq,
        request_record_id = %id,
        upstream_status = status,
        "record response written"
    );
    spans::note("countersign.record.seq", w.seq);
    Ok(created(w.record_id))
}

/// 201 with the id of the entry just written.
fn created(record_id: String) -> (StatusCode, Json<RecordCreated>) {
    (StatusCode::CREATED, Json(RecordCreated { record_id }))
}

/// The filters of a query string: text filters cleaned as everywhere (an
/// empty one counts as absent), the page size within bounds.
fn cleaned(mut q: RecordQuery) -> Result<RecordQuery, ApiError> {
    clean_text_filters([
        ("caller", &mut q.caller),
        ("model", &mut q.model),
        ("decision", &mut q.decision),
        ("review_id", &mut q.review_id),
        ("request_id", &mut q.request_id),
    ])?;
    q.limit = q.limit.clamp(1, MAX_PAGE);
    Ok(q)
}

/// Body of `GET /api/records`.
#[derive(Debug, Serialize)]
pub struct RecordPage {
    /// Merged records, oldest first.
    pub records: Vec<Value>,
    /// `after_seq` of the next page; null on the last page.
    pub next_after_seq: Option<i64>,
}

/// `GET /api/records`.
pub async fn list_records(
    State(state): State<AppState>,
    _reviewer: Reviewer,
    QueryParams(q): QueryParams<RecordQuery>,
) -> Result<Response, ApiError> {
    let q = cleaned(q)?;
    let page_q = q.clone();
    let records = state.records_db(move |s| s.query(&page_q)).await?;
    let next_after_seq = q.next_page(&records).and_then(|next| next.after_seq);
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
    let rec = state
        .records_db(move |s| s.get(&id))
        .await?
        .ok_or_else(|| ApiError::NotFound("no such record".into()))?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(rec)).into_response())
}

/// `GET /api/records/export`: every matching record as JSON Lines, read a
/// page at a time while streaming.
pub async fn export_records(
    State(state): State<AppState>,
    _reviewer: Reviewer,
    QueryParams(q): QueryParams<RecordQuery>,
) -> Result<Response, ApiError> {
    let mut q = cleaned(q)?;
    q.limit = MAX_PAGE;
    let stream = futures_util::stream::unfold(Some(q), move |next| {
        let state = state.clone();
        async move {
            let failed = || Some((Err(std::io::Error::other("record export failed")), None));
            let q = next?;
            let page_q = q.clone();
            let page = match state.records_db(move |s| s.query(&page_q)).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(error = %e, "record export failed");
                    return failed();
                }
            };
            let mut chunk = Vec::new();
            for rec in &page {
                if serde_json::to_writer(&mut chunk, rec).is_err() {
                    return failed();
                }
                chunk.push(b'\n');
            }
            Some((Ok(Bytes::from(chunk)), q.next_page(&page)))
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
