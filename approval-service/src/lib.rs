//! countersign approval service.
//!
//! The Envoy filter holds an inference request and asks this service for a
//! human decision (`/v1/reviews...`); reviewers list, approve, reject or edit
//! held requests in the web UI (`/`, [`ui`]) or through the reviewer API
//! (`/api/...`). Reviews and browser sessions live in one SQLite file so a
//! restarted service still knows every pending review and signed-in
//! reviewer. New pending reviews can be announced to webhooks ([`webhook`]).
//!
//! Entry points: [`Config`] (parsed once from TOML), [`AppState::open`],
//! [`app`] (the router, usable in tests with `tower::ServiceExt::oneshot`),
//! and [`run`] (serve until a shutdown future resolves).

pub mod api;
pub mod approval_tokens;
pub mod approvals;
pub mod config;
pub mod db;
pub mod error;
pub mod records;
pub mod replicas;
pub mod session;
pub mod state;
pub mod store;
mod tls;
pub mod token;
pub mod ui;
pub mod webhook;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use config::{
    Config, ConfigError, ReviewerConfig, SqliteSynchronous, WebhookConfig, WebhookFormat,
};
pub use db::OpenError;
pub use error::ApiError;
pub use state::{AppState, ReviewEvent};
pub use store::{ReviewDetail, ReviewSummary};
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
        .route(
            "/v1/reviews/{id}/status",
            get(approval_tokens::caller_status),
        )
        .route("/v1/reviews/{id}/consume", post(approval_tokens::consume))
        .route("/api/me", get(api::me))
        .route("/api/reviews", get(api::list_reviews))
        .route("/api/reviews/{id}", get(api::get_review))
        .route("/api/reviews/{id}/approve", post(api::approve))
        .route("/api/reviews/{id}/reject", post(api::reject))
        .route("/api/reviews/{id}/edit", post(api::edit))
        .route("/api/events", get(api::events))
        .route("/v1/records", post(records::http::create_record))
        .route(
            "/v1/records/{id}/response",
            post(records::http::create_response),
        )
        .route("/api/records", get(records::http::list_records))
        .route("/api/records/export", get(records::http::export_records))
        .route("/api/records/{id}", get(records::http::get_record))
        .route("/metrics", get(records::http::metrics))
        .route("/", get(ui::queue_page))
        .route("/reviews/{id}", get(ui::review_page))
        .route("/history", get(ui::history_page))
        .route("/login", get(ui::login_page))
        .route("/ui/login", post(ui::login))
        .route("/ui/logout", post(ui::logout))
        .route("/ui/{asset}", get(ui::ui_asset))
        .fallback(api::fallback)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(ui::security_headers))
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
    let retention = records::http::spawn_retention(&state, records::http::RETENTION_PERIOD);
    let on_shutdown = state.clone();
    let result = axum::serve(listener, app(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            on_shutdown.begin_shutdown();
        })
        .await;
    sweeper.abort();
    retention.abort();
    result
}
