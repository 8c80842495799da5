//! `GET /metrics`: Prometheus text format. On the service's address:
//! public unless `metrics_public = false`, then reviewer authentication is
//! required; with `metrics_listen`, only on that address (and not on the
//! service's), without authentication.

use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::auth::Reviewer;
use super::error::ApiError;
use crate::state::AppState;

/// The metrics text (Prometheus exposition format 0.0.4): this process's
/// instruments and the database's view of the reviews
/// ([`crate::metrics::Metrics::render`]).
pub async fn render_metrics(state: &AppState) -> Result<String, ApiError> {
    let load = state.records_db(|s| s.review_load()).await?;
    state
        .metrics()
        .render(
            &load,
            crate::now_ms(),
            state.records().counters(),
            state.waiting_reviews(),
        )
        .map_err(|e| ApiError::Internal(format!("metrics could not be written: {e}")))
}

/// The timing of one request, for `countersign_http_request_duration_seconds`,
/// by the route's path pattern (never the path itself: ids would make a
/// series each). Part of [`super::every_request`].
pub struct Timing {
    route: String,
    method: &'static str,
    started: std::time::Instant,
}

impl Timing {
    /// Starts timing `request`.
    pub fn start(request: &Request) -> Timing {
        let route = request
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map_or("unmatched", |p| p.as_str())
            .to_string();
        // Methods outside HTTP's own are one label value, so no client can
        // make a series per method it invents.
        let method = match request.method().as_str() {
            "GET" => "GET",
            "HEAD" => "HEAD",
            "POST" => "POST",
            "PUT" => "PUT",
            "PATCH" => "PATCH",
            "DELETE" => "DELETE",
            "OPTIONS" => "OPTIONS",
            _ => "other",
        };
        Timing {
            route,
            method,
            started: std::time::Instant::now(),
        }
    }

    /// Records the request, answered with `response`.
    pub fn finish(self, state: &AppState, response: &Response) {
        state.metrics().observe_http(
            &self.route,
            self.method,
            response.status().as_u16(),
            self.started.elapsed().as_secs_f64(),
        );
    }
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
