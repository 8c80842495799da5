//! countersign approval service.
//!
//! The Envoy filter holds an inference request and asks this service for a
//! human decision (`/v1/reviews...`); reviewers list, approve, reject or edit
//! held requests in the web UI (`/`, [`http::ui`]; signed in with a reviewer
//! token or through the company's OpenID Connect provider, [`oidc`]) or
//! through the reviewer API (`/api/...`). Reviews, approvals, browser sessions and the session
//! records live in the database (a SQLite file for one replica, PostgreSQL
//! for several), so a restarted service still knows every pending review
//! and signed-in reviewer. Review events go to signed webhooks ([`webhook`])
//! and to a Slack app that also takes decisions ([`slack`]); both follow
//! the review events ([`notify`]) and call out through one HTTP client
//! ([`outbound`]). New reviews are shown to the `[[assessors]]`
//! ([`assess`]), whose report may let the rule decide automatically
//! ([`auto_decision`]).
//!
//! This crate is the top layer: HTTP ([`http`]: the router, extractors, the
//! mapping of domain errors to answers, the handlers), webhooks, the Slack
//! app and the binary. Everything below it (configuration, database, domain,
//! state) is the `countersign-approval-domain` crate, re-exported here under
//! the same paths (`countersign_approval::store`, `::db`, `::records`, ...).
//!
//! Entry points: [`Config`] (parsed once from TOML), [`AppState::open`],
//! [`app`] (the router, usable in tests with `tower::ServiceExt::oneshot`),
//! and [`run`] (serve until a shutdown future resolves).

pub mod assess;
pub mod auto_decision;
pub mod http;
pub mod notify;
pub mod oidc;
pub mod outbound;
pub mod slack;
pub mod telemetry;
pub mod webhook;

pub use countersign_approval_domain::{
    approval_tokens, approvals, assessment, config, db, follow_ups, json_text, load, metrics,
    now_ms, records, replicas, session, slack_messages, standing, state, store, token, watchers,
};

pub use config::{
    Config, ConfigError, ReviewerConfig, SqliteSynchronous, WebhookConfig, WebhookEvent,
    WebhookFormat,
};
pub use db::OpenError;
pub use http::error::ApiError;
pub use http::{app, run, run_split, MAX_BODY_BYTES};
pub use state::{AppState, ReviewEvent, StorageError, SWEEP_PERIOD};
pub use store::{ReviewDetail, ReviewSummary};
pub use token::TokenHash;
