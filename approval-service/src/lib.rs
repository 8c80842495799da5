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

pub mod approval_tokens;
pub mod approvals;
pub mod config;
pub mod db;
pub mod http;
pub mod records;
pub mod replicas;
pub mod session;
pub mod state;
pub mod store;
mod tls;
pub mod token;
pub mod webhook;

use std::time::{SystemTime, UNIX_EPOCH};

pub use config::{
    Config, ConfigError, ReviewerConfig, SqliteSynchronous, WebhookConfig, WebhookFormat,
};
pub use db::OpenError;
pub use http::error::ApiError;
pub use http::{app, run, MAX_BODY_BYTES};
pub use state::{AppState, ReviewEvent, StorageError, SWEEP_PERIOD};
pub use store::{ReviewDetail, ReviewSummary};
pub use token::TokenHash;

/// Current Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
