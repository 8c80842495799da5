//! HTTP handlers: the filter API (`/v1/reviews...`), the reviewer API
//! (`/api/...`, including the live feed `/api/events`) and health checks.
//!
//! The reviewer API accepts either `Authorization: Bearer <token>` (curl,
//! scripts) or the browser session cookie of the reviewer UI; with the
//! cookie, every state-changing call also needs the session's CSRF token in
//! `x-csrf-token` (see [`crate::session`]).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use countersign_core::wire::{CreateReview, ReviewState, ReviewStatus, FILTER_TOKEN_HEADER};
use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::approvals::{DecideOutcome, Decision};
use crate::config::MAX_HOLD_TIMEOUT_MS;
use crate::error::ApiError;
use crate::session::{csrf_matches, session_cookie, CSRF_HEADER};
use crate::state::AppState;
use crate::store::{
    ListQuery, NewReview, ReviewDetail, ReviewSummary, CANCELLED_REASON, EXPIRED_REASON,
};
use crate::token::TokenHash;

/// Longest accepted decision reason, in characters.
pub const MAX_REASON_CHARS: usize = 2000;

/// Default and maximum page size of `GET /api/reviews`.
const DEFAULT_LIST_LIMIT: u32 = 50;
const MAX_LIST_LIMIT: u32 = 500;

// ---------------------------------------------------------------- extractors

/// Proof that the caller is the filter: the configured filter token was
/// presented (or none is configured).
pub struct FilterAuth;

impl FromRequestParts<AppState> for FilterAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = state.config().filter_token_sha256 else {
            return Ok(FilterAuth);
        };
        let presented = parts
            .headers
            .get(FILTER_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::Unauthorized(format!("missing {FILTER_TOKEN_HEADER} header"))
            })?;
        if TokenHash::of_token(presented).ct_eq(&expected) {
            Ok(FilterAuth)
        } else {
            Err(ApiError::Unauthorized("invalid filter token".into()))
        }
    }
}

/// How a reviewer-API call authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMethod {
    /// `Authorization: Bearer <reviewer token>`.
    Bearer,
    /// The UI session cookie (and, for state-changing calls, its CSRF token).
    Session {
        /// SHA-256 of the session id.
        id_sha256: TokenHash,
        /// The session's CSRF token.
        csrf_token: String,
    },
}

/// The authenticated reviewer of a reviewer-API call.
pub struct Reviewer {
    /// Configured name.
    pub name: String,
    /// Configured groups.
    pub groups: Vec<String>,
    /// How the call authenticated.
    pub via: AuthMethod,
}

impl FromRequestParts<AppState> for Reviewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // An Authorization header always wins: a script's token must never
        // be overridden by a cookie the same client happens to hold.
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return bearer_reviewer(parts, state);
        }
        let Some(id) = session_cookie(&parts.headers) else {
            return Err(ApiError::Unauthorized(
                "missing bearer token (or sign-in session)".into(),
            ));
        };
        let (session, reviewer) = state.session(id).await?.ok_or_else(|| {
            ApiError::Unauthorized("session expired or signed out; sign in again".into())
        })?;
        if !parts.method.is_safe() {
            let presented = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if presented.is_empty() || !csrf_matches(presented, &session.csrf_token) {
                return Err(ApiError::Forbidden(format!(
                    "missing or invalid {CSRF_HEADER} header"
                )));
            }
        }
        Ok(Reviewer {
            name: reviewer.name,
            groups: reviewer.groups,
            via: AuthMethod::Session {
                id_sha256: TokenHash::of_token(id),
                csrf_token: session.csrf_token,
            },
        })
    }
}

fn bearer_reviewer(parts: &Parts, state: &AppState) -> Result<Reviewer, ApiError> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
    let token = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::Unauthorized("expected Authorization: Bearer <token>".into()))?;
    let reviewer = state
        .reviewer_for(&TokenHash::of_token(token))
        .ok_or_else(|| ApiError::Unauthorized("invalid token".into()))?;
    Ok(Reviewer {
        name: reviewer.name.clone(),
        groups: reviewer.groups.clone(),
        via: AuthMethod::Bearer,
    })
}

/// Parses a JSON body ourselves rather than with `axum::Json`, so errors
/// use our error shape and a missing `Content-Type` is not an error (the
/// filter's HTTP client may not set one). An empty body reads as `{}`.
pub(crate) fn parse_json<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = read_body(body)?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    json_from_slice(bytes)
}

/// The request body, or our error for one too large or unreadable.
pub(crate) fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge("request body too large".into())
        } else {
            ApiError::BadRequest("cannot read request body".into())
        }
    })
}

/// Deserialises JSON text, answering 400 with serde's message.
pub(crate) fn json_from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

pub(crate) fn parse_query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))
}

fn not_found() -> ApiError {
    ApiError::NotFound("no such review".into())
}

// ---------------------------------------------------------------- health

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /readyz`: the database answers.
pub async fn readyz(State(state): State<AppState>) -> Response {
    match state.db(|s| s.ping()).await {
        Ok(()) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"status": "unavailable"})),
            )
                .into_response()
        }
    }
}

/// Any unknown path.
pub async fn fallback() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

// ---------------------------------------------------------------- filter API

/// `POST /v1/reviews`: stores a new pending review.
pub async fn create_review(
    State(state): State<AppState>,
    _auth: FilterAuth,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ReviewState>), ApiError> {
    let req: CreateReview = parse_json(body)?;
    if serde_json::from_str::<serde::de::IgnoredAny>(&req.body).is_err() {
        return Err(ApiError::BadRequest("body is not a JSON document".into()));
    }
    let hold_timeout_ms = req.hold_timeout_ms.clamp(1, MAX_HOLD_TIMEOUT_MS);
    let created_at_ms = crate::now_ms();
    let new = NewReview {
        id: format!("rev_{}", uuid::Uuid::new_v4().simple()),
        created_at_ms,
        expires_at_ms: created_at_ms + hold_timeout_ms,
        hold_timeout_ms,
        request: req,
    };
    let state_out = ReviewState {
        id: new.id.clone(),
        status: ReviewStatus::Pending,
        expires_at_ms: new.expires_at_ms,
        reviewer: None,
        reason: None,
        edited_body: None,
    };
    let stored = new.clone();
    match state.db(move |s| s.insert(&stored)).await? {
        crate::store::Inserted::New => {}
        // Our own id back: our insert committed and only its answer was
        // lost to a reconnect, so it is the new review.
        crate::store::Inserted::Existing(e) if e.id == new.id => {}
        crate::store::Inserted::Existing(existing) => {
            // A retry whose first attempt created the review (its answer
            // was lost): the same review, not a second one for reviewers.
            tracing::info!(review_id = %existing.id, request_id = %new.request.request_id,
                "review creation retried; answering with the existing review");
            return Ok((StatusCode::OK, Json(existing)));
        }
        crate::store::Inserted::KeyOfAnotherRequest => {
            tracing::warn!(request_id = %new.request.request_id,
                "review creation refused: its idempotency key belongs to another request");
            return Err(ApiError::Conflict(
                "this idempotency key belongs to another request".into(),
            ));
        }
    }
    tracing::info!(
        review_id = %new.id,
        request_id = %new.request.request_id,
        model = %new.request.model,
        api = new.request.api.as_str(),
        rule = new.request.rule.as_deref().unwrap_or(""),
        hold_timeout_ms,
        "review created"
    );
    crate::approvals::warn_if_unreachable(&state.config().reviewers, &new.id, &new.request);
    state.publish(&new.id, ReviewStatus::Pending);
    crate::webhook::notify_pending(&state, &new);
    Ok((StatusCode::CREATED, Json(state_out)))
}

/// Query of `GET /v1/reviews/{id}/wait`.
#[derive(Debug, Deserialize)]
pub struct WaitParams {
    /// How long to wait for a decision; 0 (the default) answers at once.
    #[serde(default)]
    pub timeout_ms: u64,
}

/// `GET /v1/reviews/{id}/wait?timeout_ms=N`: long poll for a decision.
pub async fn wait_review(
    State(state): State<AppState>,
    _auth: FilterAuth,
    Path(id): Path<String>,
    query: Result<Query<WaitParams>, QueryRejection>,
) -> Result<Json<ReviewState>, ApiError> {
    let params = parse_query(query)?;
    let budget = Duration::from_millis(params.timeout_ms.min(state.config().max_long_poll_ms));
    let deadline = tokio::time::Instant::now() + budget;
    // Subscribe before the first read so no decision slips in between.
    let mut guard = state.subscribe(&id);
    let mut shutdown = state.shutdown_receiver();
    loop {
        let now = crate::now_ms();
        let lookup_id = id.clone();
        let (current, expired_now) = state
            .db(move |s| s.state_expiring(&lookup_id, now))
            .await?
            .ok_or_else(not_found)?;
        if expired_now {
            state.announce_expiry(&id);
        }
        if current.status.is_final() {
            return Ok(Json(current));
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() || *shutdown.borrow() {
            return Ok(Json(current));
        }
        // Wake at expiry at the latest (plus a millisecond so the re-read
        // sees it as overdue).
        let until_expiry =
            Duration::from_millis(current.expires_at_ms.saturating_sub(crate::now_ms()) + 1);
        tokio::select! {
            () = guard.changed() => {}
            () = tokio::time::sleep(remaining.min(until_expiry)) => {}
            _ = shutdown.wait_for(|down| *down) => return Ok(Json(current)),
        }
    }
}

async fn finish_review(
    state: AppState,
    id: String,
    status: ReviewStatus,
    reason: &'static str,
) -> Result<Json<ReviewState>, ApiError> {
    let now = crate::now_ms();
    let lookup_id = id.clone();
    let (current, changed) = state
        .db(move |s| s.finish(&lookup_id, status, reason, now))
        .await?
        .ok_or_else(not_found)?;
    if changed {
        tracing::info!(review_id = %id, status = status.as_str(), "review ended by filter");
        state.announce(&id, status);
    }
    Ok(Json(current))
}

/// `POST /v1/reviews/{id}/expire`: the filter's hold timed out.
pub async fn expire_review(
    State(state): State<AppState>,
    _auth: FilterAuth,
    Path(id): Path<String>,
) -> Result<Json<ReviewState>, ApiError> {
    finish_review(state, id, ReviewStatus::Expired, EXPIRED_REASON).await
}

/// `POST /v1/reviews/{id}/cancel`: the caller went away.
pub async fn cancel_review(
    State(state): State<AppState>,
    _auth: FilterAuth,
    Path(id): Path<String>,
) -> Result<Json<ReviewState>, ApiError> {
    finish_review(state, id, ReviewStatus::Cancelled, CANCELLED_REASON).await
}

// ---------------------------------------------------------------- reviewer API

/// Body of `GET /api/me`.
#[derive(Debug, Serialize)]
pub struct Me {
    /// Reviewer name.
    pub name: String,
    /// Reviewer groups.
    pub groups: Vec<String>,
    /// With a UI session: the CSRF token to send as `x-csrf-token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csrf_token: Option<String>,
}

/// `GET /api/me`.
pub async fn me(reviewer: Reviewer) -> Response {
    let csrf_token = match reviewer.via {
        AuthMethod::Bearer => None,
        AuthMethod::Session { csrf_token, .. } => Some(csrf_token),
    };
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(Me {
            name: reviewer.name,
            groups: reviewer.groups,
            csrf_token,
        }),
    )
        .into_response()
}

/// Query of `GET /api/reviews`. Empty values count as absent.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    /// Only this status.
    pub status: Option<String>,
    /// Page size, clamped to 1..=500 (default 50).
    pub limit: Option<u32>,
    /// Only reviews created before this time (Unix ms), for paging.
    pub before_ms: Option<u64>,
    /// Caller contains this (case-insensitive).
    pub caller: Option<String>,
    /// Model contains this (case-insensitive).
    pub model: Option<String>,
    /// Deciding reviewer contains this (case-insensitive).
    pub reviewer: Option<String>,
    /// `true`: only approvals with an edited body; `false`: only without.
    pub edited: Option<bool>,
    /// Only reviews created at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// Only reviews created before this time (Unix ms).
    pub until_ms: Option<u64>,
    /// Free-text search in the prompt, preview, ids, caller, model,
    /// reviewer and reason.
    pub q: Option<String>,
}

/// Longest accepted text filter, in characters.
const MAX_FILTER_CHARS: usize = 500;

/// A text filter of a query string: trimmed, blank as none, refused when
/// longer than [`MAX_FILTER_CHARS`].
pub(crate) fn text_filter(name: &str, v: Option<String>) -> Result<Option<String>, ApiError> {
    match v {
        Some(t) if t.chars().count() > MAX_FILTER_CHARS => Err(ApiError::BadRequest(format!(
            "{name} is longer than {MAX_FILTER_CHARS} characters"
        ))),
        Some(t) if t.trim().is_empty() => Ok(None),
        Some(t) => Ok(Some(t.trim().to_string())),
        None => Ok(None),
    }
}

/// Body of `GET /api/reviews`.
#[derive(Debug, Serialize)]
pub struct ReviewList {
    /// Newest first.
    pub reviews: Vec<ReviewSummary>,
}

/// `GET /api/reviews`.
pub async fn list_reviews(
    State(state): State<AppState>,
    _reviewer: Reviewer,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ReviewList>, ApiError> {
    let params = parse_query(query)?;
    let status = params
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            ReviewStatus::parse(s).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "status must be one of pending, approved, rejected, expired, cancelled; got {s:?}"
                ))
            })
        })
        .transpose()?;
    let q = ListQuery {
        status,
        before_ms: params.before_ms,
        limit: params
            .limit
            .unwrap_or(DEFAULT_LIST_LIMIT)
            .clamp(1, MAX_LIST_LIMIT),
        caller: text_filter("caller", params.caller)?,
        model: text_filter("model", params.model)?,
        reviewer: text_filter("reviewer", params.reviewer)?,
        edited: params.edited,
        since_ms: params.since_ms,
        until_ms: params.until_ms,
        search: text_filter("q", params.q)?,
    };
    // Expire overdue reviews first so the list never offers a review that
    // can no longer be approved (the sweeper may be up to a second behind).
    state.sweep_once().await?;
    let reviews = state.db(move |s| s.list(&q)).await?;
    Ok(Json(ReviewList { reviews }))
}

/// `GET /api/reviews/{id}`.
pub async fn get_review(
    State(state): State<AppState>,
    _reviewer: Reviewer,
    Path(id): Path<String>,
) -> Result<Json<ReviewDetail>, ApiError> {
    let now = crate::now_ms();
    let lookup_id = id.clone();
    let (detail, expired_now) = state
        .db(move |s| {
            let expired = s.state_expiring(&lookup_id, now)?.is_some_and(|(_, c)| c);
            Ok(s.detail(&lookup_id)?.map(|d| (d, expired)))
        })
        .await?
        .ok_or_else(not_found)?;
    if expired_now {
        state.announce(&id, ReviewStatus::Expired);
    }
    Ok(Json(detail))
}

/// Checks a reason's length; blank reasons count as none.
fn clean_reason(reason: Option<String>) -> Result<Option<String>, ApiError> {
    match reason {
        Some(r) if r.chars().count() > MAX_REASON_CHARS => Err(ApiError::BadRequest(format!(
            "reason is longer than {MAX_REASON_CHARS} characters"
        ))),
        Some(r) if r.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// Records `reviewer`'s decision on review `id` and announces the outcome.
async fn decide(
    state: AppState,
    id: String,
    reviewer: Reviewer,
    status: ReviewStatus,
    reason: Option<String>,
    edited_body: Option<String>,
) -> Result<Json<ReviewDetail>, ApiError> {
    let decision = Decision {
        status,
        reviewer: reviewer.name,
        reason,
        edited_body,
    };
    let now = crate::now_ms();
    let lookup_id = id.clone();
    let d = decision.clone();
    // Groups and `callers` come from the configuration (names are unique).
    let who = state
        .config()
        .reviewers
        .iter()
        .find(|r| r.name == decision.reviewer)
        .cloned()
        .ok_or_else(|| ApiError::Forbidden("reviewer is no longer configured".into()))?;
    let outcome = state
        .db(move |s| s.decide(&lookup_id, &d, &who, now))
        .await?;
    // Wake in every case: a lost decision may have just persisted an expiry.
    state.wake(&id);
    match outcome {
        DecideOutcome::Decided(detail) => {
            state.publish(&id, detail.summary.status);
            tracing::info!(
                review_id = %id,
                reviewer = %decision.reviewer,
                status = decision.status.as_str(),
                edited = decision.edited_body.is_some(),
                "review decided"
            );
            Ok(Json(*detail))
        }
        DecideOutcome::Partial(detail) => {
            state.publish_approval(&id);
            tracing::info!(
                review_id = %id,
                reviewer = %decision.reviewer,
                approvals = detail.summary.approval_count,
                required_approvals = detail.summary.required_approvals,
                edited = decision.edited_body.is_some(),
                "approval recorded; more needed"
            );
            Ok(Json(*detail))
        }
        DecideOutcome::Refused(refused) => {
            tracing::info!(
                review_id = %id,
                reviewer = %decision.reviewer,
                status = decision.status.as_str(),
                refused = refused.code(),
                "decision refused"
            );
            Err(refused.to_api_error())
        }
        DecideOutcome::NotFound => Err(not_found()),
        DecideOutcome::NotPending(why) => {
            // Tell live pages to re-read it (it may have just expired).
            if let Ok(Some(current)) = state
                .db({
                    let id = id.clone();
                    move |s| s.state(&id)
                })
                .await
            {
                state.publish(&id, current.status);
            }
            tracing::info!(
                review_id = %id,
                reviewer = %decision.reviewer,
                status = decision.status.as_str(),
                conflict = %why,
                "decision refused"
            );
            Err(ApiError::Conflict(why))
        }
    }
}

/// Body of `POST /api/reviews/{id}/approve` and `/reject`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    /// Optional for approvals, required for rejections.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /api/reviews/{id}/approve`.
pub async fn approve(
    State(state): State<AppState>,
    reviewer: Reviewer,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReviewDetail>, ApiError> {
    let req: ReasonBody = parse_json(body)?;
    let reason = clean_reason(req.reason)?;
    decide(state, id, reviewer, ReviewStatus::Approved, reason, None).await
}

/// `POST /api/reviews/{id}/reject`.
pub async fn reject(
    State(state): State<AppState>,
    reviewer: Reviewer,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReviewDetail>, ApiError> {
    let req: ReasonBody = parse_json(body)?;
    let reason = clean_reason(req.reason)?
        .ok_or_else(|| ApiError::BadRequest("a rejection needs a non-empty reason".into()))?;
    decide(
        state,
        id,
        reviewer,
        ReviewStatus::Rejected,
        Some(reason),
        None,
    )
    .await
}

/// Body of `POST /api/reviews/{id}/edit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditBody {
    /// The replacement request body: a JSON object, or a string holding one.
    pub body: Box<RawValue>,
    /// Optional reason.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Removes insignificant whitespace from valid JSON text. Done on the text
/// rather than by re-serialising a `Value`, which would reorder keys.
fn minify_json(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in s.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

/// The compact text of an edited body, which must be a JSON object.
fn edited_body_text(raw: &RawValue) -> Result<String, ApiError> {
    let text = raw.get();
    let owned;
    let json_text = if text.trim_start().starts_with('"') {
        owned = serde_json::from_str::<String>(text)
            .map_err(|_| ApiError::BadRequest("body must be a JSON object".into()))?;
        owned.as_str()
    } else {
        text
    };
    match serde_json::from_str::<serde_json::Value>(json_text) {
        Ok(serde_json::Value::Object(_)) => Ok(minify_json(json_text)),
        _ => Err(ApiError::BadRequest(
            "body must be a JSON object (or a string containing one)".into(),
        )),
    }
}

/// `POST /api/reviews/{id}/edit`: approve with a replacement body.
pub async fn edit(
    State(state): State<AppState>,
    reviewer: Reviewer,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReviewDetail>, ApiError> {
    let req: EditBody = parse_json(body)?;
    let edited = edited_body_text(&req.body)?;
    let reason = clean_reason(req.reason)?;
    decide(
        state,
        id,
        reviewer,
        ReviewStatus::Approved,
        reason,
        Some(edited),
    )
    .await
}

// ---------------------------------------------------------------- live feed

/// `GET /api/events`: server-sent events for the reviewer UI. Sends `hello`
/// at once, then a `review` event (`{"type","id","status"}`) for every
/// change, and `resync` when this subscriber fell behind and should
/// re-fetch. Ends when the server shuts down.
pub async fn events(
    State(state): State<AppState>,
    _reviewer: Reviewer,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = state.subscribe_events();
    let shutdown = state.shutdown_receiver();
    let stream = futures_util::stream::unfold(
        (rx, shutdown, true),
        |(mut rx, mut shutdown, first)| async move {
            if first {
                let hello = Event::default().event("hello").data("{}");
                return Some((Ok(hello), (rx, shutdown, false)));
            }
            if *shutdown.borrow() {
                return None;
            }
            let event = tokio::select! {
                received = rx.recv() => match received {
                    Ok(ev) => match serde_json::to_string(&ev) {
                        Ok(json) => Event::default().event("review").data(json),
                        Err(_) => Event::default().event("resync").data("{}"),
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        Event::default().event("resync").data("{}")
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                },
                _ = shutdown.wait_for(|down| *down) => return None,
            };
            Some((Ok(event), (rx, shutdown, false)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn minify_keeps_strings_and_order() {
        let s = "{ \"b\" : 1,\n \"a\": \"x y \\\" z\" , \"c\":[1, 2] }";
        assert_eq!(minify_json(s), "{\"b\":1,\"a\":\"x y \\\" z\",\"c\":[1,2]}");
    }

    #[test]
    fn edited_body_forms() {
        let obj: Box<RawValue> = serde_json::from_str("{ \"z\": 1, \"a\": 2 }").unwrap();
        assert_eq!(edited_body_text(&obj).unwrap(), "{\"z\":1,\"a\":2}");
        let s: Box<RawValue> = serde_json::from_str("\"{ \\\"m\\\": [1, 2] }\"").unwrap();
        assert_eq!(edited_body_text(&s).unwrap(), "{\"m\":[1,2]}");
        for bad in ["[1]", "\"not json\"", "\"[1]\"", "3", "null"] {
            let raw: Box<RawValue> = serde_json::from_str(bad).unwrap();
            assert!(edited_body_text(&raw).is_err(), "{bad}");
        }
    }
}
