//! `GET /api/stats/load`: the reviewer load over a period, for the reviewer
//! UI's *Load* page (see [`crate::load`]). A reviewer API call like the
//! others (bearer token, proxy headers or session).

use axum::extract::State;
use axum::Json;
use serde::Deserialize;

use super::auth::Reviewer;
use super::error::ApiError;
use super::extract::QueryParams;
use crate::load::{LoadQuery, LoadReport};
use crate::state::AppState;

/// One day, the default period.
const DAY_MS: u64 = 24 * 3_600_000;

/// Query of `GET /api/stats/load`.
#[derive(Debug, Deserialize)]
pub struct LoadParams {
    /// Start of the period, Unix ms (default: a day before `until_ms`).
    pub since_ms: Option<u64>,
    /// End of the period, Unix ms (default: now).
    pub until_ms: Option<u64>,
    /// Length of a bucket, ms (default: one hour).
    #[serde(default = "default_bucket_ms")]
    pub bucket_ms: u64,
}

fn default_bucket_ms() -> u64 {
    3_600_000
}

/// `GET /api/stats/load?since_ms=&until_ms=&bucket_ms=`.
pub async fn load(
    State(state): State<AppState>,
    _reviewer: Reviewer,
    QueryParams(p): QueryParams<LoadParams>,
) -> Result<Json<LoadReport>, ApiError> {
    let until_ms = p.until_ms.unwrap_or_else(crate::now_ms);
    let since_ms = p.since_ms.unwrap_or(until_ms.saturating_sub(DAY_MS));
    let query = LoadQuery::new(since_ms, until_ms, p.bucket_ms)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(Json(state.db(move |s| s.load(&query)).await?))
}
