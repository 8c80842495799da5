#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The PostgreSQL schema is written apart from SQLite's (whose tables grew
//! by migration steps): both must have the same tables and columns, or a
//! statement written once for both would fail on one of them.
//!
//! Runs in the PostgreSQL pass of the tests; returns at once otherwise.

use crate::common;

use std::collections::BTreeMap;

type Columns = BTreeMap<String, Vec<String>>;

const TABLES: [&str; 13] = [
    "reviews",
    "sessions",
    "oidc_logins",
    "approvals",
    "token_consumptions",
    "records",
    "retention_gate",
    "chain_anchor",
    "slack_messages",
    "slack_requests_seen",
    "standing_approvals",
    "standing_uses",
    "follow_ups",
];

fn sqlite_columns(path: &std::path::Path) -> Columns {
    let conn = rusqlite::Connection::open(path).unwrap();
    TABLES
        .iter()
        .map(|t| {
            let mut stmt = conn
                .prepare("SELECT name FROM pragma_table_xinfo(?1) ORDER BY name")
                .unwrap();
            let names = stmt
                .query_map([t], |r| r.get::<_, String>(0))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            (t.to_string(), names)
        })
        .collect()
}

fn postgres_columns(url: String) -> Columns {
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        TABLES
            .iter()
            .map(|t| {
                let names = client
                    .query(
                        "SELECT column_name::text FROM information_schema.columns
                         WHERE table_name = $1 AND table_schema = current_schema()
                         ORDER BY column_name",
                        &[t],
                    )
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect();
                (t.to_string(), names)
            })
            .collect()
    })
    .join()
    .unwrap()
}

#[test]
#[ignore = "needs PostgreSQL: see common::NEEDS_POSTGRES"]
fn both_databases_have_the_same_tables_and_columns() {
    common::require_postgres();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("schema.sqlite");
    let config = |database: String| {
        countersign_approval::Config::from_toml_str(&format!("database = \"{database}\"\n"))
            .unwrap()
    };
    drop(countersign_approval::AppState::open(config(sqlite.display().to_string())).unwrap());
    let pg_url = common::database_setting(&dir.path().join("schema.pg"));
    drop(countersign_approval::AppState::open(config(pg_url.clone())).unwrap());

    let lite = sqlite_columns(&sqlite);
    let pg = postgres_columns(pg_url);
    for t in TABLES {
        assert!(!lite[t].is_empty(), "SQLite has no {t}");
        assert_eq!(lite[t], pg[t], "columns of {t}: SQLite vs PostgreSQL");
    }
}
