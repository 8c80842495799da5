//! Standing approvals over HTTP: the automatic decision when a review is
//! created ([`decide_if_standing`], the one entry point), and the reviewer
//! API that lists and revokes them (`/api/standing-approvals...`). They are
//! created by approving a review with `standing` terms
//! ([`super::reviews::approve`]); see [`crate::standing`].

use axum::extract::{Path, State};
use axum::Json;
use countersign_core::wire::{ReviewState, ReviewStatus};
use serde::{Deserialize, Serialize};

use super::auth::Reviewer;
use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::reviews::clean_reason;
use crate::standing::{Revoked, StandingApproval, StandingUse};
use crate::state::AppState;

/// Approves the new pending review `id` when a live standing approval
/// matches it, through the same decision path as a person; wakes its long
/// poll and announces it as a person's decision would. Returns the
/// approved state, or `None` (the review waits for people; also when the
/// lookup failed: failing closed means a person decides).
pub(crate) async fn decide_if_standing(state: &AppState, id: &str) -> Option<ReviewState> {
    let now = crate::now_ms();
    let lookup_id = id.to_string();
    // Its creators are checked against the reviewers in force now.
    let reviewers = state.reviewers();
    let outcome = state
        .db(move |s| s.decide_by_standing(&lookup_id, &reviewers, now))
        .await;
    let auto = match outcome {
        Ok(Some(auto)) => auto,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(review_id = %id, error = %e,
                "standing approvals could not be checked; the review waits for a person");
            return None;
        }
    };
    state.wake(id);
    state.publish(id, ReviewStatus::Approved);
    tracing::info!(
        review_id = %id,
        standing_approval = %auto.used.standing_id,
        use_no = auto.used.use_no,
        "review approved by a standing approval"
    );
    let summary = &auto.detail.summary;
    Some(ReviewState {
        id: summary.id.clone(),
        status: summary.status,
        expires_at_ms: summary.expires_at_ms,
        reviewer: summary.reviewer.clone(),
        reason: summary.reason.clone(),
        edited_body: auto.detail.edited_body.clone(),
    })
}

/// Query of `GET /api/standing-approvals`.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    /// At most this many (1..=500, default 100).
    #[serde(default = "default_limit")]
    pub limit: u32,
    /// Only the one proposed on this review (what the review page shows).
    #[serde(default)]
    pub review_id: Option<String>,
}

fn default_limit() -> u32 {
    100
}

/// Body of `GET /api/standing-approvals`.
#[derive(Debug, Serialize)]
pub struct StandingList {
    /// Newest first.
    pub standing_approvals: Vec<StandingApproval>,
}

/// `GET /api/standing-approvals` (`?review_id=`: the one of that review).
pub async fn list(
    State(state): State<AppState>,
    _reviewer: Reviewer,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<StandingList>, ApiError> {
    let limit = params.limit.clamp(1, 500);
    let now = crate::now_ms();
    let standing_approvals = match params.review_id {
        Some(review_id) => state
            .db(move |s| s.standing_of_review(&review_id, now))
            .await?
            .into_iter()
            .collect(),
        None => state.db(move |s| s.standing_list(limit, now)).await?,
    };
    let reviewers = state.reviewers();
    let standing_approvals = standing_approvals
        .into_iter()
        .map(|sa| sa.checked_against(&reviewers))
        .collect();
    Ok(Json(StandingList { standing_approvals }))
}

/// Body of `GET /api/standing-approvals/{id}`.
#[derive(Debug, Serialize)]
pub struct StandingDetail {
    /// The standing approval.
    #[serde(flatten)]
    pub standing_approval: StandingApproval,
    /// Every use, oldest first.
    pub used_by: Vec<StandingUse>,
}

fn not_found() -> ApiError {
    ApiError::NotFound("no such standing approval".into())
}

/// `GET /api/standing-approvals/{id}`.
pub async fn get(
    State(state): State<AppState>,
    _reviewer: Reviewer,
    Path(id): Path<String>,
) -> Result<Json<StandingDetail>, ApiError> {
    let now = crate::now_ms();
    let (standing_approval, used_by) = state
        .db(move |s| s.standing_detail(&id, now))
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(StandingDetail {
        standing_approval: standing_approval.checked_against(&state.reviewers()),
        used_by,
    }))
}

/// Body of `POST /api/standing-approvals/{id}/revoke`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    /// Why (optional).
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /api/standing-approvals/{id}/revoke`: takes effect at once, for
/// any member of its approver group (any reviewer when it has none).
pub async fn revoke(
    State(state): State<AppState>,
    reviewer: Reviewer,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<RevokeBody>,
) -> Result<Json<StandingApproval>, ApiError> {
    let reason = clean_reason(req.reason)?;
    let now = crate::now_ms();
    let who = reviewer.who;
    let name = who.name.clone();
    let revoked_id = id.clone();
    let outcome = state
        .db(move |s| s.revoke_standing(&revoked_id, &who, reason.as_deref(), now))
        .await?;
    match outcome {
        Revoked::Revoked(sa) => {
            tracing::info!(standing_approval = %id, reviewer = %name, "standing approval revoked");
            Ok(Json(sa.checked_against(&state.reviewers())))
        }
        Revoked::NotFound => Err(not_found()),
        Revoked::NotActive(sa) => Err(ApiError::Conflict(format!(
            "standing approval is already {}",
            serde_json::to_value(sa.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        ))),
        Revoked::NotInApproverGroup(group) => Err(ApiError::Forbidden(format!(
            "this standing approval can be revoked by a member of the {group:?} group"
        ))),
    }
}
