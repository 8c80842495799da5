//! The reviews: the filter's API (`/v1/reviews...`: create, long poll,
//! expire, cancel), the reviewer API (`/api/me`, `/api/reviews...`: list,
//! read, approve, reject, edit) and its live feed (`/api/events`).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use countersign_core::wire::{valid_watcher_id, CreateReview, ReviewState, ReviewStatus};
use futures_util::Stream;
use opentelemetry::trace::FutureExt;
use opentelemetry::KeyValue;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::auth::{AuthMethod, FilterAuth, Reviewer};
use super::error::ApiError;
use super::extract::{clean_text_filters, JsonBody, QueryParams};
use super::spans;
use crate::approvals::{Approver, DecideOutcome, Decision};
use crate::config::MAX_HOLD_TIMEOUT_MS;
use crate::slack::interact::OutboundClient;
use crate::standing::StandingTerms;
use crate::state::AppState;
use crate::store::{
    Inserted, ListQuery, NewReview, ReviewDetail, ReviewSummary, CANCELLED_REASON, EXPIRED_REASON,
    MAX_LIST_LIMIT,
};

/// Longest accepted decision reason, in characters.
pub const MAX_REASON_CHARS: usize = 2000;

fn not_found() -> ApiError {
    ApiError::NotFound("no such review".into())
}

// ---------------------------------------------------------------- filter API

/// `POST /v1/reviews`: stores a new pending review.
pub async fn create_review(
    State(state): State<AppState>,
    _auth: FilterAuth,
    Extension(OutboundClient(client)): Extension<OutboundClient>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CreateReview>,
) -> Result<(StatusCode, Json<ReviewState>), ApiError> {
    if serde_json::from_str::<serde::de::IgnoredAny>(&req.body).is_err() {
        return Err(ApiError::BadRequest("body is not a JSON document".into()));
    }
    if req.watcher.as_deref().is_some_and(|w| !valid_watcher_id(w)) {
        return Err(ApiError::BadRequest(
            "watcher: must be 32 lowercase hexadecimal characters".into(),
        ));
    }
    let hold_timeout_ms = req.hold_timeout_ms.clamp(1, MAX_HOLD_TIMEOUT_MS);
    let created_at_ms = crate::now_ms();
    let new = NewReview {
        id: format!("rev_{}", uuid::Uuid::new_v4().simple()),
        created_at_ms,
        expires_at_ms: created_at_ms + hold_timeout_ms,
        hold_timeout_ms,
        request: req,
        trace_context: spans::caller_trace_context(&headers),
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
    match state.db(move |s| s.insert(stored)).await? {
        Inserted::New => {}
        // Our own id back: our insert committed and only its answer was
        // lost to a reconnect, so it is the new review.
        Inserted::Existing(e) if e.id == new.id => {}
        Inserted::Existing(existing) => {
            // A retry whose first attempt created the review (its answer
            // was lost): the same review, not a second one for reviewers.
            tracing::info!(review_id = %existing.id, request_id = %new.request.request_id,
                "review creation retried; answering with the existing review");
            // The first attempt may have been cut off before it said whose
            // watch the review goes to.
            if let Some(watcher) = &new.request.watcher {
                state.remember_watcher(&existing.id, watcher);
            }
            spans::note("countersign.review.id", existing.id.clone());
            return Ok((StatusCode::OK, Json(existing)));
        }
        Inserted::KeyOfAnotherRequest => {
            tracing::warn!(request_id = %new.request.request_id,
                "review creation refused: its idempotency key belongs to another request");
            return Err(ApiError::Conflict(
                "this idempotency key belongs to another request".into(),
            ));
        }
    }
    // Its changes go to its watcher's mailbox here (its watches through
    // other replicas list it in their `check`).
    if let Some(watcher) = &new.request.watcher {
        state.remember_watcher(&new.id, watcher);
    }
    state.metrics().observe_hits(&new.request.evidence.hits);
    spans::note("countersign.review.id", new.id.clone());
    spans::note("countersign.request_id", new.request.request_id.clone());
    spans::note("countersign.api", new.request.api.as_str());
    spans::note(
        "countersign.rule",
        new.request.rule.clone().unwrap_or_default(),
    );
    tracing::info!(
        review_id = %new.id,
        request_id = %new.request.request_id,
        model = %new.request.model,
        api = new.request.api.as_str(),
        rule = new.request.rule.as_deref().unwrap_or(""),
        hold_timeout_ms,
        "review created"
    );
    // With OIDC sign-in, who may approve is up to the provider: the
    // configured reviewers are not all there are.
    if state.config().oidc.is_none() {
        crate::approvals::warn_if_unreachable(&state.reviewers(), &new.id, &new.request);
    }
    // Webhooks and the Slack app hear of it through this event (`notify`),
    // the other replicas whose watch it goes to.
    state.publish_created(&new.id, new.request.watcher.as_deref());
    // A live standing approval of this shape decides it at once (the filter
    // takes an approved answer to its creation as the decision).
    if let Some(approved) = super::standing::decide_if_standing(&state, &new.id).await {
        return Ok((StatusCode::CREATED, Json(approved)));
    }
    // The assessors are asked in a task of their own: creation never waits.
    crate::auto_decision::spawn(&state, client, &new.id, &new.request);
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
    QueryParams(params): QueryParams<WaitParams>,
) -> Result<Json<ReviewState>, ApiError> {
    let budget = Duration::from_millis(params.timeout_ms.min(state.config().max_long_poll_ms));
    let deadline = tokio::time::Instant::now() + budget;
    // The hold is alive while this poll lasts and a grace after it; stored
    // for every replica (an approval may reach another one).
    let mut poll = HoldPoll::begin(&state, &id, budget).await?;
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
            return Ok(poll.answered(current));
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() || *shutdown.borrow() {
            return Ok(noted(current));
        }
        // Wake at expiry at the latest (plus a millisecond so the re-read
        // sees it as overdue).
        let until_expiry =
            Duration::from_millis(current.expires_at_ms.saturating_sub(crate::now_ms()) + 1);
        tokio::select! {
            pushed = guard.changed() => {
                // A decision made here comes with its committed state.
                if let Some(decided) = pushed.filter(|s| s.status.is_final()) {
                    return Ok(poll.answered((*decided).clone()));
                }
            }
            () = tokio::time::sleep(remaining.min(until_expiry)) => {}
            _ = shutdown.wait_for(|down| *down) => return Ok(noted(current)),
        }
    }
}

/// One long poll of a held request: marks its hold alive until the poll's
/// end plus `hold_grace_ms`, and, when dropped (answered, or cut off
/// because the filter's connection closed: Envoy may be gone), alive for
/// the grace from then.
struct HoldPoll {
    state: AppState,
    id: String,
    alive_until_ms: u64,
    /// The poll answered with the review's end: no hold is left to keep
    /// alive, so its end is not written (only a pending review's hold is
    /// ever judged gone).
    ended_review: bool,
}

impl HoldPoll {
    async fn begin(state: &AppState, id: &str, budget: Duration) -> Result<HoldPoll, ApiError> {
        let budget_ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX);
        let alive_until_ms = crate::now_ms()
            .saturating_add(budget_ms)
            .saturating_add(state.config().hold_grace_ms);
        let poll_id = id.to_string();
        state
            .db(move |s| s.hold_polled(&poll_id, alive_until_ms))
            .await?;
        Ok(HoldPoll {
            state: state.clone(),
            id: id.to_string(),
            alive_until_ms,
            ended_review: false,
        })
    }

    /// The poll's answer: `review`, which has ended.
    fn answered(&mut self, review: ReviewState) -> Json<ReviewState> {
        self.ended_review = true;
        noted(review)
    }
}

impl Drop for HoldPoll {
    fn drop(&mut self) {
        if self.ended_review {
            return;
        }
        let (state, id, until) = (self.state.clone(), self.id.clone(), self.alive_until_ms);
        // Drop cannot wait: the write runs on its own (a handler is always
        // dropped inside the runtime).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let now = crate::now_ms();
                let ended = state.db(move |s| s.hold_poll_ended(&id, until, now)).await;
                if let Err(e) = ended {
                    tracing::warn!(error = %e, "could not record the end of a long poll");
                }
            });
        }
    }
}

pub(crate) async fn finish_review(
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
    Ok(noted(current))
}

/// A review's state as the filter gets it, noted on the call's span: its
/// status and, once decided, by whom.
fn noted(current: ReviewState) -> Json<ReviewState> {
    spans::note("countersign.review.status", current.status.as_str());
    if let Some(reviewer) = &current.reviewer {
        spans::note("countersign.review.decided_by", reviewer.clone());
    }
    Json(current)
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
        AuthMethod::Bearer { .. } => None,
        AuthMethod::Session { csrf_token, .. } | AuthMethod::Proxy { csrf_token, .. } => {
            Some(csrf_token)
        }
    };
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(Me {
            name: reviewer.who.name,
            groups: reviewer.who.groups,
            csrf_token,
        }),
    )
        .into_response()
}

/// The `status` parameter of `GET /api/reviews`, parsed apart from the
/// other filters ([`ListQuery`]) so that an unknown status is answered with
/// the statuses there are.
#[derive(Debug, Deserialize)]
pub struct StatusParam {
    /// Only this status; empty counts as absent.
    pub status: Option<String>,
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
    QueryParams(mut q): QueryParams<ListQuery>,
    QueryParams(status): QueryParams<StatusParam>,
) -> Result<Json<ReviewList>, ApiError> {
    q.status = status
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            ReviewStatus::parse(s).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "status must be one of pending, approved, rejected, expired, cancelled, abandoned; got {s:?}"
                ))
            })
        })
        .transpose()?;
    q.limit = q.limit.clamp(1, MAX_LIST_LIMIT);
    clean_text_filters([
        ("caller", &mut q.caller),
        ("model", &mut q.model),
        ("reviewer", &mut q.reviewer),
        ("q", &mut q.search),
    ])?;
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
pub(crate) fn clean_reason(reason: Option<String>) -> Result<Option<String>, ApiError> {
    match reason {
        Some(r) if r.chars().count() > MAX_REASON_CHARS => Err(ApiError::BadRequest(format!(
            "reason is longer than {MAX_REASON_CHARS} characters"
        ))),
        Some(r) if r.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// The reason of a rejection: required, and checked as [`clean_reason`] does.
pub(crate) fn rejection_reason(reason: Option<String>) -> Result<String, ApiError> {
    clean_reason(reason)?
        .ok_or_else(|| ApiError::BadRequest("a rejection needs a non-empty reason".into()))
}

/// Records the decision of `who` on review `id` and announces the outcome.
/// Every path that decides (the reviewer API, the UI, the Slack app) comes
/// through here. `who` carries the groups and `callers` as authentication
/// found them (the configuration for a token or a Slack user, the
/// provider's groups for an OIDC session).
///
/// `edits_seen`: how many edits of the review the decider was shown
/// ([`Decision::edits_seen`]; Slack and assessors: `Some(0)`, the
/// reviewer API: what the client says).
pub(crate) async fn decide(
    state: AppState,
    id: String,
    who: Approver,
    status: ReviewStatus,
    reason: Option<String>,
    edited_body: Option<String>,
    edits_seen: Option<u32>,
) -> Result<ReviewDetail, ApiError> {
    let decision = Decision {
        status,
        reviewer: who.name.clone(),
        reason,
        edited_body,
        standing: None,
        standing_approval: None,
        edits_seen,
    };
    decide_as(state, id, who, decision).await
}

/// [`decide`] with a whole [`Decision`] (an approval with standing terms),
/// in a span of the caller's trace (`spans::decision_context`).
async fn decide_as(
    state: AppState,
    id: String,
    who: Approver,
    decision: Decision,
) -> Result<ReviewDetail, ApiError> {
    // A failed lookup costs the span its parent, never the decision.
    // Without `[otlp]` the tracer is the no-op one: no span, so no lookup
    // (a decision's path stays one read shorter).
    let stored = match state.config().otlp {
        Some(_) => state
            .db({
                let id = id.clone();
                move |s| s.trace_context(&id)
            })
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let cx = spans::decision_context(stored.as_ref(), &id);
    let reviewer = decision.reviewer.clone();
    let requested = decision.status;
    let result = decide_here(state, id, who, decision)
        .with_context(cx.clone())
        .await;
    let mut attributes = vec![
        KeyValue::new("countersign.review.decided_by", reviewer),
        KeyValue::new("countersign.review.decision", requested.as_str()),
    ];
    match &result {
        Ok(detail) => attributes.push(KeyValue::new(
            "countersign.review.status",
            detail.summary.status.as_str(),
        )),
        Err(e) => attributes.push(KeyValue::new("countersign.review.refused", e.code())),
    }
    spans::end_decision(&cx, attributes);
    result
}

async fn decide_here(
    state: AppState,
    id: String,
    who: Approver,
    decision: Decision,
) -> Result<ReviewDetail, ApiError> {
    let now = crate::now_ms();
    let lookup_id = id.clone();
    let d = decision.clone();
    let outcome = state
        .db(move |s| s.decide(&lookup_id, &d, &who, now))
        .await?;
    match &outcome {
        DecideOutcome::Decided(_, decided) => state.wake_final((**decided).clone()),
        // Wake in every case: a lost decision may have just persisted an
        // expiry, which the woken polls read.
        _ => state.wake(&id),
    }
    match outcome {
        DecideOutcome::Decided(detail, _) => {
            state.publish(&id, detail.summary.status);
            tracing::info!(
                review_id = %id,
                reviewer = %decision.reviewer,
                status = decision.status.as_str(),
                edited = decision.edited_body.is_some(),
                "review decided"
            );
            Ok(*detail)
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
            Ok(*detail)
        }
        DecideOutcome::Refused(refused) => {
            tracing::info!(
                review_id = %id,
                reviewer = %decision.reviewer,
                status = decision.status.as_str(),
                refused = refused.code(),
                "decision refused"
            );
            Err(refused.into())
        }
        DecideOutcome::Abandoned(detail) => {
            state.publish(&id, detail.summary.status);
            tracing::warn!(
                review_id = %id,
                reviewer = %decision.reviewer,
                "approval refused: the held request is gone; review abandoned"
            );
            Err(ApiError::Coded {
                status: StatusCode::CONFLICT,
                code: "review_abandoned",
                message: "the held request is gone (its gateway stopped waiting, e.g. Envoy \
                          restarted): nothing was released, and the review is now abandoned"
                    .into(),
            })
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

/// Body of `POST /api/reviews/{id}/approve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproveBody {
    /// Optional reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// Also agree to a standing approval of this request's shape.
    #[serde(default)]
    pub standing: Option<StandingTerms>,
    /// How many edits of the review the approver was shown (the `edited`
    /// entries of its `approvals`, superseded ones included): when the
    /// review holds another number, the approval is refused (409
    /// `edit_not_shown`). The web UI always sends it.
    #[serde(default)]
    pub edits_seen: Option<u32>,
}

/// `POST /api/reviews/{id}/approve`.
pub async fn approve(
    State(state): State<AppState>,
    reviewer: Reviewer,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ApproveBody>,
) -> Result<Json<ReviewDetail>, ApiError> {
    let reason = clean_reason(req.reason)?;
    let standing = req
        .standing
        .map(StandingTerms::validated)
        .transpose()
        .map_err(ApiError::BadRequest)?;
    let decision = Decision {
        status: ReviewStatus::Approved,
        reviewer: reviewer.who.name.clone(),
        reason,
        edited_body: None,
        standing,
        standing_approval: None,
        edits_seen: req.edits_seen,
    };
    decide_as(state, id, reviewer.who, decision).await.map(Json)
}

/// `POST /api/reviews/{id}/reject`.
pub async fn reject(
    State(state): State<AppState>,
    reviewer: Reviewer,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ReasonBody>,
) -> Result<Json<ReviewDetail>, ApiError> {
    let reason = rejection_reason(req.reason)?;
    decide(
        state,
        id,
        reviewer.who,
        ReviewStatus::Rejected,
        Some(reason),
        None,
        None,
    )
    .await
    .map(Json)
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
        Ok(serde_json::Value::Object(_)) => Ok(crate::json_text::minify(json_text)),
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
    JsonBody(req): JsonBody<EditBody>,
) -> Result<Json<ReviewDetail>, ApiError> {
    let edited = edited_body_text(&req.body)?;
    let reason = clean_reason(req.reason)?;
    decide(
        state,
        id,
        reviewer.who,
        ReviewStatus::Approved,
        reason,
        Some(edited),
        // Edits seen: none (counts as 0). The editor starts from the body
        // as sent, so after another reviewer's edit a second one would
        // drop it unseen: it is refused (409 `edit_not_shown`), and that
        // reviewer approves or rejects the edit instead.
        None,
    )
    .await
    .map(Json)
}

// ---------------------------------------------------------------- live feed

/// `GET /api/events`: server-sent events for the reviewer UI. Sends `hello`
/// at once, then a `review` event (`{"type","id","status"}`) for every
/// change, and `resync` when this subscriber fell behind and should
/// re-fetch. Ends when the server shuts down, and when the reviewer's
/// credential no longer holds (signed out, session expired, token or
/// sign-in configuration changed): checked before each event and every
/// [`FEED_RECHECK`]; a feed opened on the authenticating proxy's word ends
/// when that word's `session_seconds` are over ([`Reviewer::ends_at`]).
pub async fn events(
    State(state): State<AppState>,
    reviewer: Reviewer,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let feed = Feed {
        rx: state.subscribe_events(),
        shutdown: state.shutdown_receiver(),
        recheck: tokio::time::interval_at(tokio::time::Instant::now() + FEED_RECHECK, FEED_RECHECK),
        state,
        reviewer,
        first: true,
    };
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        let event = feed.next().await?;
        Some((Ok(event), feed))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// How often an idle live feed re-checks its reviewer's credential.
pub const FEED_RECHECK: Duration = Duration::from_secs(30);

/// One reviewer's live feed.
struct Feed {
    rx: tokio::sync::broadcast::Receiver<crate::state::ReviewEvent>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    recheck: tokio::time::Interval,
    state: AppState,
    reviewer: Reviewer,
    first: bool,
}

impl Feed {
    /// The next event to send, or `None` to end the feed.
    async fn next(&mut self) -> Option<Event> {
        if std::mem::take(&mut self.first) {
            return Some(Event::default().event("hello").data("{}"));
        }
        loop {
            if *self.shutdown.borrow() {
                return None;
            }
            // `None`: time to re-check only.
            let event = tokio::select! {
                received = self.rx.recv() => match received {
                    Ok(ev) => Some(match serde_json::to_string(&ev) {
                        Ok(json) => Event::default().event("review").data(json),
                        Err(_) => Event::default().event("resync").data("{}"),
                    }),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        Some(Event::default().event("resync").data("{}"))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                },
                down = self.shutdown.wait_for(|down| *down) => {
                    drop(down);
                    return None;
                }
                _ = self.recheck.tick() => None,
                // The sign-in's own end, to the moment (the recheck below
                // then finds it over).
                () = sleep_until_some(self.reviewer.ends_at()) => None,
            };
            if !self.reviewer.still_signed_in(&self.state).await {
                return None;
            }
            if event.is_some() {
                return event;
            }
        }
    }
}

/// Sleeps until `at`, or for ever when `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

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
