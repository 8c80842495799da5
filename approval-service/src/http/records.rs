//! The session records over HTTP (see [`crate::records`]): the filter's
//! write endpoints and the reviewer query and export API.
//!
//! * `POST /v1/records` (filter token): body [`NewRecord`]; 201
//!   [`RecordCreated`] once the entry is committed; 400 invalid (including a
//!   `body_sha256` that does not match `body`); 401 filter token; 503 when the
//!   database cannot take the write (the filter then refuses the request).
//! * `POST /v1/records/batch` (filter token): body `{"records": [NewRecord,
//!   ...]}` (at most [`MAX_BATCH`]), written in one transaction when they
//!   fit one group commit; 200 [`RecordBatchResults`], one result per record
//!   in order, each with the status `POST /v1/records` would have given it
//!   (201 and its `record_id`, 400 invalid, 503 database) and its `error`;
//!   400 when the body is not such a list.
//! * `POST /v1/records/responses` (filter token): body `{"responses":
//!   [{"record_id": ..., "response": RecordResponse}, ...]}` (at most
//!   [`MAX_BATCH`]), committed together; 200 [`RecordBatchResults`], one
//!   result per part in order, each with the status
//!   `POST /v1/records/{id}/response` would have given it (201 and the
//!   response entry's id, 404, 409, 503).
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
use countersign_core::wire::{
    NewRecord, RecordBatchResult, RecordBatchResults, RecordCreated, RecordResponse,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::{FilterAuth, Reviewer};
use super::error::ApiError;
use super::extract::{clean_text_filters, QueryParams, StrictJsonBody};
use super::spans;
use crate::records::{RecordError, RecordQuery, Written, MAX_PAGE};
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
        .write_record("request", state.records().submit_request(rec, now))
        .await?;
    log_record_written(&w, &request_id, &decision);
    spans::note("countersign.record.id", w.record_id.clone());
    spans::note("countersign.record.seq", w.seq);
    spans::note("countersign.request_id", request_id);
    Ok(created(w.record_id))
}

/// Most records in one `POST /v1/records/batch` (the filter sends at most
/// `countersign_core::worker::MAX_BATCH_RECORDS`).
pub const MAX_BATCH: usize = 1024;

/// Body of `POST /v1/records/batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordBatch {
    /// The request parts to write, each as `POST /v1/records` takes it.
    pub records: Vec<NewRecord>,
}

/// `POST /v1/records/batch`.
pub async fn create_records(
    State(state): State<AppState>,
    _auth: FilterAuth,
    StrictJsonBody(batch): StrictJsonBody<RecordBatch>,
) -> Result<Json<RecordBatchResults>, ApiError> {
    within_batch_limit("records", batch.records.len())?;
    let ids: Vec<(String, String)> = batch
        .records
        .iter()
        .map(|r| (r.request_id.clone(), r.decision.clone()))
        .collect();
    let now = crate::now_ms();
    let written = state
        // Timed as one append; a database error is counted per record.
        .write_record("request", async {
            Ok(state.records().submit_requests(batch.records, now).await)
        })
        .await?;
    Ok(batch_answer(written, ids, |w, (request_id, decision)| {
        log_record_written(w, request_id, decision);
    }))
}

fn log_record_written(w: &Written, request_id: &str, decision: &str) {
    tracing::info!(
        record_id = %w.record_id,
        seq = w.seq,
        request_id = %request_id,
        decision = %decision,
        "record written"
    );
}

fn log_response_written(w: &Written, request_record_id: &str, upstream_status: u16) {
    tracing::info!(
        record_id = %w.record_id,
        seq = w.seq,
        request_record_id = %request_record_id,
        upstream_status,
        "record response written"
    );
}

/// A batch of `len` in field `field` is refused beyond [`MAX_BATCH`].
fn within_batch_limit(field: &str, len: usize) -> Result<(), ApiError> {
    if len > MAX_BATCH {
        return Err(ApiError::BadRequest(format!(
            "{field}: at most {MAX_BATCH} in one batch"
        )));
    }
    Ok(())
}

/// One result of a batch: 201 and the id written, or the error's status
/// and message as the single call would have answered them.
fn batch_result(
    w: Result<Written, RecordError>,
    written: impl FnOnce(&Written),
) -> RecordBatchResult {
    match w {
        Ok(w) => {
            written(&w);
            RecordBatchResult {
                status: StatusCode::CREATED.as_u16(),
                record_id: Some(w.record_id),
                error: None,
            }
        }
        Err(e) => {
            let e = ApiError::from(e);
            RecordBatchResult {
                status: e.status().as_u16(),
                record_id: None,
                error: Some(e.public_message().to_string()),
            }
        }
    }
}

/// The answer to a batch: one result per item, in order; `written` logs
/// each item written, with what the caller keeps of it (`keys`).
fn batch_answer<K>(
    written: Vec<Result<Written, RecordError>>,
    keys: Vec<K>,
    log: impl Fn(&Written, &K),
) -> Json<RecordBatchResults> {
    let results: Vec<RecordBatchResult> = written
        .into_iter()
        .zip(keys)
        .map(|(w, key)| batch_result(w, |w| log(w, &key)))
        .collect();
    spans::note(
        "countersign.record.batch_size",
        i64::try_from(results.len()).unwrap_or(i64::MAX),
    );
    Json(RecordBatchResults { results })
}

/// One part of `POST /v1/records/responses`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponsePart {
    /// The request record it completes.
    pub record_id: String,
    /// The response part, as `POST /v1/records/{id}/response` takes it.
    pub response: RecordResponse,
}

/// Body of `POST /v1/records/responses`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseBatch {
    /// The parts to append.
    pub responses: Vec<ResponsePart>,
}

/// `POST /v1/records/responses`.
pub async fn create_responses(
    State(state): State<AppState>,
    _auth: FilterAuth,
    StrictJsonBody(batch): StrictJsonBody<ResponseBatch>,
) -> Result<Json<RecordBatchResults>, ApiError> {
    within_batch_limit("responses", batch.responses.len())?;
    let parts: Vec<(String, RecordResponse)> = batch
        .responses
        .into_iter()
        .map(|p| (p.record_id, p.response))
        .collect();
    let ids: Vec<(String, u16)> = parts.iter().map(|(id, r)| (id.clone(), r.status)).collect();
    let now = crate::now_ms();
    let written = state
        // Timed as one append; a database error is counted per record.
        .write_record("response", async {
            Ok(state.records().submit_responses(parts, now).await)
        })
        .await?;
    Ok(batch_answer(written, ids, |w, (id, status)| {
        log_response_written(w, id, *status);
    }))
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
    let w = state
        .write_record("response", state.records().submit_response(&id, resp, now))
        .await?;
    log_response_written(&w, &id, status);
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
