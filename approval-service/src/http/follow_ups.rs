//! Follow-ups over HTTP (see [`crate::follow_ups`]): the flagged audits
//! (`GET /api/follow-ups`) and their resolution
//! (`POST /api/follow-ups/{review_id}/resolve`). An audit is flagged by
//! rejecting it ([`super::reviews::reject`]). Reviewer API calls like the
//! others.

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth::Reviewer;
use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::reviews::{clean_reason, MAX_REASON_CHARS};
use crate::follow_ups::{FollowUp, FollowUpTarget, Resolved};
use crate::state::AppState;

/// Query of `GET /api/follow-ups`.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    /// `open` (the default) or `all`.
    #[serde(default)]
    pub status: Option<String>,
    /// At most this many (1..=500, default 100).
    #[serde(default = "default_limit")]
    pub limit: u32,
}

fn default_limit() -> u32 {
    100
}

/// Body of `GET /api/follow-ups`.
#[derive(Debug, Serialize)]
pub struct FollowUpList {
    /// The flagged audits, newest first.
    pub follow_ups: Vec<FollowUp>,
    /// The callers and rules with open follow-ups, most first.
    pub targets: Vec<FollowUpTarget>,
}

/// `GET /api/follow-ups?status=open|all&limit=`.
pub async fn list(
    State(state): State<AppState>,
    _reviewer: Reviewer,
    QueryParams(p): QueryParams<ListParams>,
) -> Result<Json<FollowUpList>, ApiError> {
    let open_only = match p.status.as_deref() {
        None | Some("open") => true,
        Some("all") => false,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "status: must be \"open\" or \"all\"".into(),
            ))
        }
    };
    let limit = p.limit.clamp(1, 500);
    let (follow_ups, targets) = state
        .db(move |s| Ok((s.follow_ups(open_only, limit)?, s.follow_up_targets()?)))
        .await?;
    Ok(Json(FollowUpList {
        follow_ups,
        targets,
    }))
}

/// Body of `POST /api/follow-ups/{review_id}/resolve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// What was done (optional).
    #[serde(default)]
    pub note: Option<String>,
}

/// `POST /api/follow-ups/{review_id}/resolve`: a member of the audit's
/// approver group who is not its caller (403 `self_approval`,
/// `not_in_approver_group`).
pub async fn resolve(
    State(state): State<AppState>,
    reviewer: Reviewer,
    Path(review_id): Path<String>,
    JsonBody(req): JsonBody<ResolveBody>,
) -> Result<Json<FollowUp>, ApiError> {
    let note = clean_reason(req.note).map_err(|_| {
        ApiError::BadRequest(format!("note is longer than {MAX_REASON_CHARS} characters"))
    })?;
    let who = reviewer.who;
    let now = crate::now_ms();
    let outcome = state
        .db(move |s| s.resolve_follow_up(&review_id, &who, note.as_deref(), now))
        .await?;
    match outcome {
        Resolved::Resolved(f) => Ok(Json(f)),
        Resolved::NotFound => Err(ApiError::NotFound("no follow-up for this review".into())),
        Resolved::Refused(refused) => Err(refused.into()),
        Resolved::Already(f) => Err(ApiError::Conflict(format!(
            "follow-up already resolved by {}",
            f.resolved_by.unwrap_or_default()
        ))),
    }
}
