//! The approval service's integration tests, one test binary: the helpers in
//! `common` are compiled and linked once, not once per test file. Each module
//! is one subject; run one with `cargo test -p countersign-approval --test
//! service -- records::` (a test's name starts with its module).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod api;
mod approvals;
mod assessors;
mod chain_export;
mod cli;
mod common;
mod config_reference;
mod follow_ups;
mod holds;
mod load;
mod metrics;
mod oidc;
mod postgres_schema;
mod postgres_tls;
mod records;
mod replay;
mod replicas;
mod slack;
mod sql_injection;
mod standing;
mod trusted_proxy;
mod ui;
mod watch;
