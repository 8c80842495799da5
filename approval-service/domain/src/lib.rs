//! The countersign approval service below HTTP.
//!
//! The service is layered, and each layer uses only the layers under it:
//!
//! 1. **Configuration** ([`config`], with [`token::TokenHash`]): the TOML
//!    file, parsed once into a validated [`Config`]; errors name the field.
//! 2. **Database** ([`db`]): one connection type over SQLite and
//!    PostgreSQL, and the whole schema ([`db::schema`]).
//! 3. **Domain**: the reviews ([`store`]), who may decide them and when
//!    they are approved ([`approvals`]), approval tokens
//!    ([`approval_tokens`]), reviewer sessions ([`session`]), the
//!    hash-chained session records ([`records`]), standing approvals
//!    ([`standing`]: the one entry point of their automatic decisions is
//!    [`store::Store::decide_by_standing`]), and the exchange of
//!    review changes between replicas ([`replicas`]); the reviewer load
//!    over a period ([`load`]); flagged audits ([`follow_ups`]).
//! 4. **State** ([`state::AppState`]): what the HTTP handlers share; runs
//!    the blocking database calls off the async runtime, wakes long polls,
//!    feeds the live event stream, expires reviews and applies record
//!    retention; and the Prometheus [`metrics`] it keeps.
//!
//! The HTTP layer (the `countersign-approval` crate) sits on top. This
//! crate does not depend on axum, so no HTTP request, response or status
//! type can reach down here: its errors are its own ([`db::DbError`],
//! [`db::OpenError`], [`state::StorageError`], [`records::RecordError`],
//! [`approvals::DecisionRefused`]), and the HTTP layer maps them to answers
//! in one place.

pub mod approval_tokens;
pub mod approvals;
pub mod assessment;
pub mod config;
pub mod db;
pub mod follow_ups;
pub mod json_text;
pub mod load;
pub mod metrics;
pub mod records;
pub mod replicas;
pub mod session;
pub mod slack_messages;
pub mod standing;
pub mod state;
pub mod store;
pub mod tls;
pub mod token;
pub mod watchers;

use std::time::{SystemTime, UNIX_EPOCH};

pub use config::{
    Config, ConfigError, ReviewerConfig, SqliteSynchronous, WebhookConfig, WebhookEvent,
    WebhookFormat,
};
pub use state::AppState;

/// Current Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
