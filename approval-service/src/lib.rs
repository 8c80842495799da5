//! countersign approval service.
//!
//! The Envoy filter holds an inference request and asks this service for a
//! human decision (`/v1/reviews...`); reviewers list, approve, reject or edit
//! held requests through the reviewer API (`/api/...`). Reviews live in one
//! SQLite file so a restarted service still knows every pending review.
//!
//! Entry points: [`Config`] (parsed once from TOML), [`AppState::open`],
//! [`app`] (the router, usable in tests with `tower::ServiceExt::oneshot`),
//! and [`run`] (serve until a shutdown future resolves).

pub mod api;
pub mod config;
pub mod error;
pub mod state;
pub mod store;
pub mod token;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use config::{Config, ConfigError, ReviewerConfig, SqliteSynchronous};
pub use error::ApiError;
pub use state::AppState;
pub use store::{ReviewDetail, ReviewSummary, StoreError};
pub use token::TokenHash;

/// Largest accepted request body. The filter forwards whole inference
/// bodies (several MiB with images or long contexts) inside its JSON.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// How often the background sweeper expires overdue reviews.
pub const SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// Current Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The HTTP API.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/v1/reviews", post(api::create_review))
        .route("/v1/reviews/{id}/wait", get(api::wait_review))
        .route("/v1/reviews/{id}/expire", post(api::expire_review))
        .route("/v1/reviews/{id}/cancel", post(api::cancel_review))
        .route("/api/me", get(api::me))
        .route("/api/reviews", get(api::list_reviews))
        .route("/api/reviews/{id}", get(api::get_review))
        .route("/api/reviews/{id}/approve", post(api::approve))
        .route("/api/reviews/{id}/reject", post(api::reject))
        .route("/api/reviews/{id}/edit", post(api::edit))
        .fallback(api::fallback)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves [`app`] on `listener` with the expiry sweeper running, until
/// `shutdown` resolves; then pending long polls answer at once and in-flight
/// requests finish before this returns.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sweeper = state.spawn_sweeper(SWEEP_PERIOD);
    let on_shutdown = state.clone();
    let result = axum::serve(listener, app(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            on_shutdown.begin_shutdown();
        })
        .await;
    sweeper.abort();
    result
}
