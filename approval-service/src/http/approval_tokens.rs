//! The approval-token calls of the filter API: an asynchronous caller's
//! status lookup (with its approval token once approved) and the spending of
//! one use of a token (see [`crate::approval_tokens`]).

use axum::extract::{Path, State};
use axum::Json;
use countersign_core::wire::{CallerReviewStatus, ConsumeToken, ReviewStatus};
use serde::{Deserialize, Serialize};

use super::auth::FilterAuth;
use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use crate::approval_tokens::{token_for, ConsumeOutcome};
use crate::state::AppState;

/// Query of `GET /v1/reviews/{id}/status`.
#[derive(Debug, Deserialize)]
pub struct StatusParams {
    /// The caller asking (its identity as the filter established it).
    #[serde(default)]
    pub caller: String,
}

fn no_such_review() -> ApiError {
    ApiError::NotFound("no such review for this caller".into())
}

/// `GET /v1/reviews/{id}/status?caller=NAME`: an asynchronous caller's view
/// of its own review; 404 for anyone else's.
pub async fn caller_status(
    State(state): State<AppState>,
    _auth: FilterAuth,
    Path(id): Path<String>,
    QueryParams(StatusParams { caller }): QueryParams<StatusParams>,
) -> Result<Json<CallerReviewStatus>, ApiError> {
    let now = crate::now_ms();
    let (lookup_id, lookup_caller) = (id.clone(), caller.clone());
    let (view, expired_now) = state
        .db(move |s| s.caller_view(&lookup_id, &lookup_caller, now))
        .await?
        .ok_or_else(no_such_review)?;
    if expired_now {
        state.announce_expiry(&id);
    }
    let approved = view.status == ReviewStatus::Approved;
    let config = state.config();
    let token = match approved && view.async_review {
        true => token_for(&config.token_keys, config.token_ttl_ms, &id, &caller, &view),
        false => None,
    };
    let decided = view.status.is_final();
    Ok(Json(CallerReviewStatus {
        id,
        status: view.status,
        expires_at_ms: view.expires_at_ms,
        reason: if decided { view.reason } else { None },
        approvers: if approved { view.approvers } else { Vec::new() },
        approved_body: approved.then_some(view.approved_body),
        token_expires_at_ms: token.as_ref().map(|(_, exp)| *exp),
        approval_token: token.map(|(t, _)| t),
    }))
}

/// Answer of `POST /v1/reviews/{id}/consume`.
#[derive(Debug, Serialize)]
pub struct Consumed {
    /// Review id.
    pub id: String,
    /// Uses spent so far, this one included.
    pub uses: u32,
}

/// `POST /v1/reviews/{id}/consume`: spends one use of an approval token.
pub async fn consume(
    State(state): State<AppState>,
    _auth: FilterAuth,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ConsumeToken>,
) -> Result<Json<Consumed>, ApiError> {
    let now = crate::now_ms();
    let (max_uses, ttl_ms) = (state.config().token_max_uses, state.config().token_ttl_ms);
    let lookup_id = id.clone();
    let caller = req.caller.clone();
    let outcome = state
        .db(move |s| {
            s.consume_token(
                &lookup_id,
                &req.caller,
                &req.body_sha256,
                req.idempotency_key.as_deref(),
                max_uses,
                ttl_ms,
                now,
            )
        })
        .await?;
    match outcome {
        ConsumeOutcome::Spent(uses) => {
            tracing::info!(review_id = %id, caller = %caller, uses, "approval token spent");
            Ok(Json(Consumed { id, uses }))
        }
        ConsumeOutcome::Repeated(uses) => {
            tracing::info!(review_id = %id, caller = %caller, uses,
                "approval token consumption repeated (its answer was lost); nothing more spent");
            Ok(Json(Consumed { id, uses }))
        }
        ConsumeOutcome::UsedUp => {
            tracing::warn!(review_id = %id, caller = %caller, "approval token replay refused");
            Err(ApiError::Conflict("approval token already used".into()))
        }
        ConsumeOutcome::NotFound => Err(ApiError::NotFound(
            "no approved asynchronous review of this caller for this body".into(),
        )),
    }
}
