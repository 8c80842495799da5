#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The PostgreSQL schema is written apart from SQLite's (whose tables grew
//! by migration steps): both must have the same tables and columns, or a
//! statement written once for both would fail on one of them.
//!
//! Runs in the PostgreSQL pass of the tests; returns at once otherwise.

use crate::common;
use countersign_approval::db::schema::RECORD_QUERY_COLUMNS;

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

#[test]
#[ignore = "needs PostgreSQL: see common::NEEDS_POSTGRES"]
fn query_columns_stop_being_generated_and_keep_their_values() {
    common::require_postgres();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("older.pg");
    let mut raw = common::RawDb::open(&db);
    // The record log as versions before the `record_columns` part made it:
    // every query column generated from the entry, one record written.
    let generated: Vec<String> = RECORD_QUERY_COLUMNS
        .iter()
        .map(|c| {
            format!("{c} TEXT GENERATED ALWAYS AS (entry::jsonb #>> '{{request,{c}}}') STORED")
        })
        .collect();
    raw.exec(&format!(
        "CREATE TABLE records (seq BIGINT PRIMARY KEY, record_id TEXT NOT NULL UNIQUE,
             kind TEXT NOT NULL, ref_record_id TEXT, created_at_ms BIGINT NOT NULL,
             entry TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL, {});
         INSERT INTO records (seq, record_id, kind, created_at_ms, entry, prev_hash, hash)
         VALUES (1, 'rec_old', 'request', 1, '{{\"request\":{{\"caller\":\"old-caller\",\
             \"request_id\":\"req-old\",\"decision\":\"allowed\"}}}}', 'g', 'h1')",
        generated.join(", ")
    ))
    .unwrap();

    let state = common::open_state(&common::config_toml(&db, "", &[]));
    let mut with_nul = crate::records::new_record("new\0caller");
    with_nul.idempotency_key = Some("req-allowed:7".into());
    state.records().write_request(with_nul, 2_000).unwrap();
    let response: countersign_core::wire::RecordResponse = serde_json::from_value(
        serde_json::json!({"status": 200, "body": "ok", "completion": "complete"}),
    )
    .unwrap();
    let request_id = raw.text("SELECT record_id FROM records WHERE seq = 2");
    state
        .records()
        .write_response(&request_id, response, 2_001)
        .unwrap();
    // A record appended without its query columns, as a service of an
    // older version writes it during a rolling upgrade.
    raw.exec(
        "INSERT INTO records (seq, record_id, kind, created_at_ms, entry, prev_hash, hash)
         VALUES (10, 'rec_rolling', 'request', 3, '{\"request\":{\"caller\":\"rolling\",\
             \"request_id\":\"req-rolling\",\"idempotency_key\":\"req-rolling:1\"}}', 'x', 'h10')",
    )
    .unwrap();

    assert_eq!(
        raw.text(
            "SELECT count(*)::text FROM information_schema.columns
             WHERE table_name = 'records' AND table_schema = current_schema()
               AND is_generated <> 'NEVER'"
        ),
        "0"
    );
    // Every row's columns hold what the generated columns held or would
    // have: the old record's, the service's (a NUL in the caller is stored
    // as U+FFFD in both), a response part's (none), the trigger's.
    for c in RECORD_QUERY_COLUMNS {
        let differing = raw.text(&format!(
            "SELECT coalesce(string_agg(record_id, ','), '') FROM records
             WHERE {c} IS DISTINCT FROM (entry::jsonb #>> '{{request,{c}}}')"
        ));
        assert_eq!(differing, "", "{c} differs from the entry in these records");
    }
    assert_eq!(
        raw.text("SELECT string_agg(coalesce(caller, '-'), ',' ORDER BY seq) FROM records"),
        "old-caller,new\u{FFFD}caller,-,rolling"
    );
    assert_eq!(
        raw.text("SELECT idempotency_key FROM records WHERE seq = 2"),
        "req-allowed:7"
    );
}
