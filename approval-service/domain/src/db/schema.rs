//! The whole schema, in one place: reviews, sessions, approvals, approval
//! token uses, the session records and the Slack app's messages, on SQLite
//! and on PostgreSQL.
//!
//! Each table is written once for both databases; `{int}` and `{id}` stand
//! for what their dialects call a 64-bit integer and an integer key the
//! database assigns (`dialect`). What is not the same SQL is written per
//! database: the record log's query columns (computed from the JSON entry)
//! and its append-only triggers.
//!
//! SQLite files of older releases are upgraded in steps: `user_version` 1
//! (reviews) and 2 (sessions), then columns and tables added by a check of
//! what exists (approvals, token uses, idempotency keys), which composes
//! with any version. PostgreSQL has no older databases: it gets the same
//! tables after every step at once, in two parts (`reviews`, `records`)
//! whose versions live in `countersign_schema` (later ones, `slack`,
//! `oidc_recheck`, `assessments`, `standing`, `answer_reviews`, `follow_ups`, `trace_context` and `watchers`, are created on their own
//! when missing). Both databases end with the
//! same tables and columns (tested in `tests/postgres_schema.rs`), so a
//! statement is written once for both.
//!
//! The record tables are append-only in SQL: triggers refuse `UPDATE` and
//! `DELETE` (unless `retention_gate.allow = 1`, which only retention sets
//! inside its own transaction), and on PostgreSQL `TRUNCATE` too. See
//! [`crate::records`].

use super::{Backend, Conn, DbError, Lock, OpenError};
use crate::params;

/// Schema version stored in SQLite's `PRAGMA user_version`; bump it and add
/// a step to `migrate_sqlite` when the schema changes.
pub const SCHEMA_VERSION: i64 = 2;

/// The PostgreSQL schema version (table `countersign_schema`).
pub const POSTGRES_SCHEMA_VERSION: i64 = 1;

/// Creates the schema when missing and upgrades an older SQLite file;
/// refuses a database written by a newer version. Idempotent, and safe when
/// several processes open one database together.
pub fn migrate(conn: &mut Conn) -> Result<(), OpenError> {
    match conn.backend() {
        Backend::Sqlite => {
            migrate_sqlite(conn)?;
            create_sqlite_records(conn)?;
            conn.transaction(Lock::Schema, |tx| {
                tx.batch(&dialect(SLACK, Backend::Sqlite))?;
                tx.batch(&dialect(STANDING, Backend::Sqlite))?;
                tx.batch(&dialect(FOLLOW_UPS, Backend::Sqlite))?;
                tx.batch(&dialect(WATCHERS, Backend::Sqlite))?;
                let existing = sqlite_columns(tx, "reviews")?;
                let later = ANSWER_REVIEW_COLUMNS
                    .into_iter()
                    .chain(HOLD_COLUMNS)
                    .chain(RETENTION_COLUMNS)
                    .chain(TRACE_COLUMNS)
                    .chain(WATCH_COLUMNS);
                for (name, declaration) in SPOT_CHECK_COLUMNS.into_iter().chain(later) {
                    if !existing.iter().any(|c| c == name) {
                        tx.batch(&add_review_column(name, declaration, Backend::Sqlite))?;
                    }
                }
                if !existing.iter().any(|c| c == "mode") {
                    tx.batch(REVIEW_MODE_FROM_KIND)?;
                }
                if !sqlite_columns(tx, "token_consumptions")?
                    .iter()
                    .any(|c| c == "idempotency_key")
                {
                    tx.batch(CONSUME_KEYS)?;
                }
                Ok::<(), DbError>(())
            })?;
        }
        Backend::Postgres => {
            migrate_postgres(conn, "reviews", &postgres_reviews())?;
            migrate_postgres(
                conn,
                "sign_in",
                &sign_in(Backend::Postgres, &SESSION_COLUMNS),
            )?;
            migrate_postgres(conn, "records", &postgres_records())?;
            migrate_postgres(conn, "record_columns", &postgres_record_columns())?;
            migrate_postgres(conn, "slack", &dialect(SLACK, Backend::Postgres))?;
            migrate_postgres(
                conn,
                "oidc_recheck",
                &session_columns(Backend::Postgres, &SESSION_RECHECK_COLUMNS),
            )?;
            migrate_postgres(
                conn,
                "assessments",
                &postgres_review_columns(&ASSESSMENT_COLUMNS),
            )?;
            let spot_checks: String = SPOT_CHECK_COLUMNS
                .iter()
                .map(|(name, declaration)| add_review_column(name, declaration, Backend::Postgres))
                .collect();
            let standing = dialect(STANDING, Backend::Postgres);
            migrate_postgres(conn, "standing", &format!("{standing}{spot_checks}"))?;
            migrate_postgres(conn, "answer_reviews", &postgres_answer_reviews())?;
            migrate_postgres(conn, "holds", &postgres_review_columns(&HOLD_COLUMNS))?;
            migrate_postgres(conn, "consume_keys", CONSUME_KEYS)?;
            let retention = postgres_review_columns(&RETENTION_COLUMNS);
            migrate_postgres(conn, "review_retention", &retention)?;
            migrate_postgres(conn, "follow_ups", &dialect(FOLLOW_UPS, Backend::Postgres))?;
            let trace = postgres_review_columns(&TRACE_COLUMNS);
            migrate_postgres(conn, "trace_context", &trace)?;
            let watchers = dialect(WATCHERS, Backend::Postgres);
            let watch_columns = postgres_review_columns(&WATCH_COLUMNS);
            migrate_postgres(conn, "watchers", &format!("{watchers}{watch_columns}"))?;
        }
    }
    Ok(())
}

/// `template` in the dialect of `backend`: `{int}` is a 64-bit integer,
/// `{id}` an integer primary key the database assigns. (SQL text of this
/// module only: nothing user-supplied is ever spliced in.)
fn dialect(template: &str, backend: Backend) -> String {
    let (int, id) = match backend {
        Backend::Sqlite => ("INTEGER", "INTEGER PRIMARY KEY"),
        Backend::Postgres => ("BIGINT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
    };
    template.replace("{int}", int).replace("{id}", id)
}

// ---------------------------------------------------------------- tables

/// The reviews, as the first release made them ([`REVIEW_COLUMNS`] were
/// added since).
const REVIEWS: &str = "
CREATE TABLE IF NOT EXISTS reviews (
    id              TEXT PRIMARY KEY,
    status          TEXT NOT NULL,
    created_at_ms   {int} NOT NULL,
    expires_at_ms   {int} NOT NULL,
    decided_at_ms   {int},
    reviewer        TEXT,
    reason          TEXT,
    edited_body     TEXT,
    request_id      TEXT NOT NULL,
    api             TEXT NOT NULL,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    authority       TEXT NOT NULL,
    route           TEXT,
    caller          TEXT,
    model           TEXT NOT NULL,
    stream          {int} NOT NULL,
    rule            TEXT,
    prompt_json     TEXT NOT NULL,
    preview         TEXT NOT NULL,
    body            TEXT NOT NULL,
    hold_timeout_ms {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS reviews_created ON reviews (created_at_ms);
CREATE INDEX IF NOT EXISTS reviews_status_created ON reviews (status, created_at_ms);
";

/// Reviewer browser sessions (see [`crate::session`]).
const SESSIONS: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    id_sha256      TEXT PRIMARY KEY,
    reviewer       TEXT NOT NULL,
    token_sha256   TEXT NOT NULL,
    csrf_token     TEXT NOT NULL,
    created_at_ms  {int} NOT NULL,
    expires_at_ms  {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires_at_ms);
";

/// Columns added to `sessions` for OpenID Connect sign-in: how the session
/// was signed in (`token` or `oidc`) and the provider's groups.
const SESSION_COLUMNS: [(&str, &str); 2] = [
    ("kind", "TEXT NOT NULL DEFAULT 'token'"),
    ("groups_json", "TEXT NOT NULL DEFAULT '[]'"),
];

/// Columns added to `sessions` to re-check an OpenID Connect session's
/// groups with the provider: its refresh token, sealed (see
/// [`crate::session::seal`]; `''` when the provider gave none), and when
/// the provider last confirmed the groups (0: never, so an older session
/// is re-checked at its next request).
const SESSION_RECHECK_COLUMNS: [(&str, &str); 2] = [
    ("refresh_sealed", "TEXT NOT NULL DEFAULT ''"),
    ("checked_at_ms", "{int} NOT NULL DEFAULT 0"),
];

/// OpenID Connect sign-ins in progress (see [`crate::session::OidcLogin`]).
const OIDC_LOGINS: &str = "
CREATE TABLE IF NOT EXISTS oidc_logins (
    state_sha256   TEXT PRIMARY KEY,
    browser_sha256 TEXT NOT NULL,
    nonce          TEXT NOT NULL,
    pkce_verifier  TEXT NOT NULL,
    next           TEXT NOT NULL,
    expires_at_ms  {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS oidc_logins_expires ON oidc_logins (expires_at_ms);
";

/// The sign-in part: [`SESSION_COLUMNS`] and [`OIDC_LOGINS`] in `backend`'s
/// dialect.
fn sign_in(backend: Backend, missing: &[(&str, &str)]) -> String {
    format!(
        "{}{}",
        session_columns(backend, missing),
        dialect(OIDC_LOGINS, backend)
    )
}

/// `ALTER TABLE sessions ADD COLUMN` for each of `columns`.
fn session_columns(backend: Backend, columns: &[(&str, &str)]) -> String {
    columns
        .iter()
        .map(|(name, declaration)| {
            dialect(
                &format!("ALTER TABLE sessions ADD COLUMN {name} {declaration};\n"),
                backend,
            )
        })
        .collect()
}

/// Columns added to `reviews` for approvals and tokens: name and
/// declaration.
const REVIEW_COLUMNS: [(&str, &str); 6] = [
    ("caller_groups_json", "TEXT NOT NULL DEFAULT '[]'"),
    ("required_approvals", "{int} NOT NULL DEFAULT 1"),
    ("approver_group", "TEXT"),
    ("async_review", "{int} NOT NULL DEFAULT 0"),
    ("token_uses", "{int} NOT NULL DEFAULT 0"),
    // The filter's key for retried creations; see `Store::insert`.
    ("idempotency_key", "TEXT"),
];

/// Columns added to `reviews` for assessors and automatic decisions: the
/// filter's evidence and the rule's policy (JSON of
/// `countersign_core::wire::{Evidence, AutoDecision}`), the assessors'
/// report (JSON of `crate::assessment::AssessmentReport`, NULL until they
/// answered) and whether the decision was automatic.
const ASSESSMENT_COLUMNS: [(&str, &str); 4] = [
    ("evidence_json", "TEXT NOT NULL DEFAULT '{}'"),
    ("auto_decision_json", "TEXT"),
    ("assessment_json", "TEXT"),
    ("automatic", "{int} NOT NULL DEFAULT 0"),
];

/// Columns added to `reviews` for spot checks (added with the standing
/// approvals' part): what is reviewed (`prompt`, `tool_call`, `response`;
/// databases of the spot checks' first release kept `review` or `audit`
/// here, which [`REVIEW_MODE_FROM_KIND`] moves to `mode`), and the spot
/// check's draw.
const SPOT_CHECK_COLUMNS: [(&str, &str); 2] = [
    ("kind", "TEXT NOT NULL DEFAULT 'prompt'"),
    ("spot_check_json", "TEXT"),
];

/// Columns added to `reviews` for reviews of answers: whether the request
/// waits for the decision (`hold`) or was forwarded already (`audit`), and
/// an answer's tool calls (JSON of `countersign_core::wire::ToolCall`s).
const ANSWER_REVIEW_COLUMNS: [(&str, &str); 2] = [
    ("mode", "TEXT NOT NULL DEFAULT 'hold'"),
    ("tool_calls_json", "TEXT NOT NULL DEFAULT '[]'"),
];

/// Run once, when `mode` is added: the spot checks' first release stored
/// `review` or `audit` in `kind`; both were reviews of prompts.
const REVIEW_MODE_FROM_KIND: &str = "
UPDATE reviews SET mode = 'audit' WHERE kind = 'audit';
UPDATE reviews SET kind = 'prompt' WHERE kind IN ('review', 'audit');
";

/// Columns added to `reviews` to tell a live hold from a gone one (see
/// [`crate::store::Store::hold_polled`]): until when the held request
/// counts as alive; NULL when no hold is expected (asynchronous reviews,
/// spot-check audits).
const HOLD_COLUMNS: [(&str, &str); 1] = [("hold_alive_until_ms", "{int}")];

/// Columns added to `reviews` for retention: when its prompt and bodies
/// were dropped (see [`crate::store::Store::purge_review_bodies`]).
const RETENTION_COLUMNS: [(&str, &str); 1] = [("body_purged_at_ms", "{int}")];

/// Columns added to `reviews` for traces: the W3C trace context the
/// review's creation carried (the caller's), so the decision's span joins
/// the caller's trace (see `http::spans`). NULL when it carried none.
const TRACE_COLUMNS: [(&str, &str); 2] = [("traceparent", "TEXT"), ("tracestate", "TEXT")];

/// Columns added to `reviews` for `POST /v1/watch`: the filter worker
/// that holds the request and watches the review (`CreateReview::watcher`);
/// NULL when the filter long-polls the review on its own.
const WATCH_COLUMNS: [(&str, &str); 1] = [("watcher", "TEXT")];

/// The filter workers that watch their reviews with `POST /v1/watch`: until
/// when each counts as alive (its last watch's end plus `hold_grace_ms`),
/// which keeps every hold of that worker alive (see
/// [`crate::store::abandon_if_gone`]). Rows a day past their time are
/// deleted by the sweeper.
const WATCHERS: &str = "
CREATE TABLE IF NOT EXISTS watchers (
    id             TEXT PRIMARY KEY,
    alive_until_ms {int} NOT NULL
);
";

/// The filter's key of each token consumption (see
/// [`crate::approval_tokens`]): a repeat with the same key is answered
/// with the use it spent, not a second one.
const CONSUME_KEYS: &str = "
ALTER TABLE token_consumptions ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS token_consumptions_key
    ON token_consumptions (review_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
";

/// `ALTER TABLE reviews ADD COLUMN` for one of [`REVIEW_COLUMNS`],
/// [`ASSESSMENT_COLUMNS`], [`SPOT_CHECK_COLUMNS`],
/// [`ANSWER_REVIEW_COLUMNS`], [`HOLD_COLUMNS`], [`RETENTION_COLUMNS`], [`TRACE_COLUMNS`] or
/// [`WATCH_COLUMNS`].
fn add_review_column(name: &str, declaration: &str, backend: Backend) -> String {
    dialect(
        &format!("ALTER TABLE reviews ADD COLUMN {name} {declaration};\n"),
        backend,
    )
}

/// Every approval (see [`crate::approvals`]), the idempotency keys of
/// review creations, and the uses of approval tokens.
const APPROVALS: &str = "
CREATE TABLE IF NOT EXISTS approvals (
    id               {id},
    review_id        TEXT NOT NULL,
    reviewer         TEXT NOT NULL,
    approved_at_ms   {int} NOT NULL,
    reason           TEXT,
    edited_body      TEXT,
    superseded_at_ms {int}
);
CREATE INDEX IF NOT EXISTS approvals_review ON approvals (review_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS approvals_current
    ON approvals (review_id, reviewer) WHERE superseded_at_ms IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS reviews_idempotency
    ON reviews (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS token_consumptions (
    review_id   TEXT NOT NULL,
    use_no      {int} NOT NULL,
    used_at_ms  {int} NOT NULL,
    PRIMARY KEY (review_id, use_no)
);
";

/// The Slack app (see [`crate::slack_messages`]): the message posted for each
/// review, and the signatures of the interactivity requests taken (a
/// replayed request is refused).
const SLACK: &str = "
CREATE TABLE IF NOT EXISTS slack_messages (
    review_id  TEXT PRIMARY KEY,
    channel    TEXT NOT NULL,
    ts         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS slack_requests_seen (
    signature_sha256 TEXT PRIMARY KEY,
    seen_at_ms       {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS slack_requests_seen_at ON slack_requests_seen (seen_at_ms);
";

/// Standing approvals (see [`crate::standing`]): the terms reviewers
/// agreed to while approving a review, and every use, one row each (the
/// review it approved). `uses` counts them; the conditional
/// `UPDATE ... WHERE uses < max_uses` that spends one is what keeps
/// concurrent matches within `max_uses`.
const STANDING: &str = "
CREATE TABLE IF NOT EXISTS standing_approvals (
    id              TEXT PRIMARY KEY,
    review_id       TEXT NOT NULL UNIQUE,
    status          TEXT NOT NULL,
    created_at_ms   {int} NOT NULL,
    live_at_ms      {int},
    expires_at_ms   {int},
    valid_ms        {int} NOT NULL,
    max_uses        {int} NOT NULL,
    uses            {int} NOT NULL DEFAULT 0,
    scope_caller    TEXT,
    scope_group     TEXT,
    model           TEXT NOT NULL,
    rule            TEXT,
    approver_group  TEXT,
    vary_json       TEXT NOT NULL,
    shape_sha256    TEXT NOT NULL,
    approvers_json  TEXT NOT NULL,
    revoked_at_ms   {int},
    revoked_by      TEXT,
    revoke_reason   TEXT
);
CREATE INDEX IF NOT EXISTS standing_approvals_model ON standing_approvals (model, status);
CREATE TABLE IF NOT EXISTS standing_uses (
    standing_id  TEXT NOT NULL,
    use_no       {int} NOT NULL,
    review_id    TEXT NOT NULL UNIQUE,
    used_at_ms   {int} NOT NULL,
    PRIMARY KEY (standing_id, use_no)
);
";

/// Flagged audits (see [`crate::follow_ups`]): a spot check's audit a
/// reviewer rejected marks its caller and rule for follow-up, until
/// someone resolves it.
const FOLLOW_UPS: &str = "
CREATE TABLE IF NOT EXISTS follow_ups (
    review_id       TEXT PRIMARY KEY,
    caller          TEXT,
    rule            TEXT,
    flagged_by      TEXT NOT NULL,
    reason          TEXT,
    flagged_at_ms   {int} NOT NULL,
    resolved_at_ms  {int},
    resolved_by     TEXT,
    resolution      TEXT
);
CREATE INDEX IF NOT EXISTS follow_ups_flagged ON follow_ups (flagged_at_ms);
";

/// The record log (`{query_columns}`: see [`record_query_column`]), the
/// retention gate and the retention anchors.
const RECORDS: &str = "
CREATE TABLE IF NOT EXISTS records (
    seq           {int} PRIMARY KEY,
    record_id     TEXT NOT NULL UNIQUE,
    kind          TEXT NOT NULL,
    ref_record_id TEXT,
    created_at_ms {int} NOT NULL,
    entry         TEXT NOT NULL,
    prev_hash     TEXT NOT NULL,
    hash          TEXT NOT NULL,
{query_columns}
);
CREATE INDEX IF NOT EXISTS records_ref ON records (ref_record_id);
CREATE INDEX IF NOT EXISTS records_created ON records (created_at_ms);
CREATE INDEX IF NOT EXISTS records_caller ON records (caller, seq);
CREATE INDEX IF NOT EXISTS records_review ON records (review_id);
CREATE INDEX IF NOT EXISTS records_request ON records (request_id);
CREATE TABLE IF NOT EXISTS retention_gate (
    id    {int} PRIMARY KEY CHECK (id = 1),
    allow {int} NOT NULL
);
INSERT INTO retention_gate (id, allow) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS chain_anchor (
    through_seq   {int} PRIMARY KEY,
    hash          TEXT NOT NULL,
    created_at_ms {int} NOT NULL
);
";

/// The record log's query columns: each is the entry's `request.<name>`,
/// serving the query filters and the idempotency lookup.
pub const RECORD_QUERY_COLUMNS: [&str; 6] = [
    "caller",
    "model",
    "decision",
    "review_id",
    "request_id",
    "idempotency_key",
];

/// A query column of the record log, computed from the entry: virtual on
/// SQLite; on PostgreSQL created stored, then made a plain column that the
/// service fills in (the `record_columns` part: [`postgres_record_columns`]).
/// `entry` stays `TEXT` on both: the hash covers its exact bytes, which
/// `jsonb` would not keep.
fn record_query_column(name: &str, backend: Backend) -> String {
    match backend {
        Backend::Sqlite => format!(
            "{name} TEXT GENERATED ALWAYS AS (json_extract(entry, '$.request.{name}')) VIRTUAL"
        ),
        Backend::Postgres => format!(
            "{name} TEXT GENERATED ALWAYS AS (entry::jsonb #>> '{{request,{name}}}') STORED"
        ),
    }
}

/// The record tables with the query columns `columns`.
fn records(columns: &[&str], backend: Backend) -> String {
    let query_columns: Vec<String> = columns
        .iter()
        .map(|c| format!("    {}", record_query_column(c, backend)))
        .collect();
    dialect(RECORDS, backend).replace("{query_columns}", &query_columns.join(",\n"))
}

// ---------------------------------------------------------------- SQLite

fn migrate_sqlite(conn: &mut Conn) -> Result<(), OpenError> {
    let version: i64 = conn.query_one("PRAGMA user_version", params![])?.get(0)?;
    if version > SCHEMA_VERSION {
        return Err(OpenError::SchemaTooNew(version));
    }
    for (step, tables) in [(1, REVIEWS), (2, SESSIONS)] {
        if version < step {
            let tables = dialect(tables, Backend::Sqlite);
            conn.batch(&format!(
                "BEGIN;{tables}PRAGMA user_version = {step};\nCOMMIT;"
            ))?;
        }
    }
    add_approval_tables(conn)?;
    Ok(())
}

/// The columns of a SQLite table.
fn sqlite_columns(tx: &mut Conn, table: &str) -> Result<Vec<String>, DbError> {
    tx.query("SELECT name FROM pragma_table_info(?1)", params![table])?
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Adds the approval and token columns and tables, and the sign-in columns
/// and table, to a file that lacks them. Guarded by a column check rather than `user_version`, so it
/// composes with the other steps; idempotent, and run under `BEGIN
/// IMMEDIATE` so two processes opening one old file do not both alter it.
fn add_approval_tables(conn: &mut Conn) -> Result<(), DbError> {
    conn.transaction(Lock::Schema, |tx| {
        let existing = sqlite_columns(tx, "reviews")?;
        for (name, declaration) in REVIEW_COLUMNS.into_iter().chain(ASSESSMENT_COLUMNS) {
            if !existing.iter().any(|c| c == name) {
                tx.batch(&add_review_column(name, declaration, Backend::Sqlite))?;
            }
        }
        tx.batch(&dialect(APPROVALS, Backend::Sqlite))?;
        let existing = sqlite_columns(tx, "sessions")?;
        let missing = |columns: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
            columns
                .iter()
                .copied()
                .filter(|(name, _)| !existing.iter().any(|c| c == name))
                .collect()
        };
        tx.batch(&sign_in(Backend::Sqlite, &missing(&SESSION_COLUMNS)))?;
        tx.batch(&session_columns(
            Backend::Sqlite,
            &missing(&SESSION_RECHECK_COLUMNS),
        ))
    })
}

const SQLITE_RECORD_TRIGGERS: &str = "
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
BEGIN
    SELECT RAISE(ABORT, 'records are append-only');
END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
WHEN (SELECT allow FROM retention_gate WHERE id = 1) IS NOT 1
BEGIN
    SELECT RAISE(ABORT, 'records are append-only (only retention deletes)');
END;
CREATE TRIGGER IF NOT EXISTS chain_anchor_no_update BEFORE UPDATE ON chain_anchor
BEGIN
    SELECT RAISE(ABORT, 'chain anchors are append-only');
END;
CREATE TRIGGER IF NOT EXISTS chain_anchor_no_delete BEFORE DELETE ON chain_anchor
BEGIN
    SELECT RAISE(ABORT, 'chain anchors are append-only');
END;
";

/// Creates the record tables and triggers when missing (under the chain's
/// lock, so it never interleaves with an append), and adds
/// `records.idempotency_key` to files made before it existed (a virtual
/// column: nothing is rewritten, and the triggers, which refuse UPDATE and
/// DELETE, are not involved).
fn create_sqlite_records(conn: &mut Conn) -> Result<(), DbError> {
    conn.transaction(Lock::RecordChain, |tx| {
        tx.batch(&records(&RECORD_QUERY_COLUMNS, Backend::Sqlite))?;
        tx.batch(SQLITE_RECORD_TRIGGERS)?;
        let has_key = tx.query_one(
            "SELECT count(*) FROM pragma_table_xinfo('records') WHERE name = 'idempotency_key'",
            params![],
        )?;
        if has_key.get::<i64>(0)? == 0 {
            tx.batch(&format!(
                "ALTER TABLE records ADD COLUMN {}",
                record_query_column("idempotency_key", Backend::Sqlite)
            ))?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------- PostgreSQL

/// The `reviews` part: every table of the SQLite steps, at once.
fn postgres_reviews() -> String {
    let columns: String = REVIEW_COLUMNS
        .iter()
        .map(|(name, declaration)| add_review_column(name, declaration, Backend::Postgres))
        .collect();
    let tables = dialect(&format!("{REVIEWS}{SESSIONS}"), Backend::Postgres);
    let approvals = dialect(APPROVALS, Backend::Postgres);
    format!("{tables}{columns}{approvals}")
}

/// `columns` (the `assessments` part: [`ASSESSMENT_COLUMNS`]; `holds`:
/// [`HOLD_COLUMNS`]; `review_retention`: [`RETENTION_COLUMNS`]; `trace_context`: [`TRACE_COLUMNS`]) added to the reviews of a PostgreSQL database made before them.
fn postgres_review_columns(columns: &[(&str, &str)]) -> String {
    columns
        .iter()
        .map(|(name, declaration)| {
            dialect(
                &format!("ALTER TABLE reviews ADD COLUMN IF NOT EXISTS {name} {declaration};\n"),
                Backend::Postgres,
            )
        })
        .collect()
}

/// The `answer_reviews` part: [`ANSWER_REVIEW_COLUMNS`], and the spot
/// checks' `review`/`audit` moved from `kind` to `mode`.
fn postgres_answer_reviews() -> String {
    let columns: String = ANSWER_REVIEW_COLUMNS
        .iter()
        .map(|(name, declaration)| add_review_column(name, declaration, Backend::Postgres))
        .collect();
    format!("{columns}{REVIEW_MODE_FROM_KIND}ALTER TABLE reviews ALTER COLUMN kind SET DEFAULT 'prompt';\n")
}

const POSTGRES_RECORD_TRIGGERS: &str = "
CREATE FUNCTION countersign_records_no_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'records are append-only';
END $$;
CREATE FUNCTION countersign_records_no_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT allow FROM retention_gate WHERE id = 1) IS DISTINCT FROM 1 THEN
        RAISE EXCEPTION 'records are append-only (only retention deletes)';
    END IF;
    RETURN OLD;
END $$;
CREATE FUNCTION countersign_anchors_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'chain anchors are append-only';
END $$;
CREATE TRIGGER records_no_update BEFORE UPDATE ON records
    FOR EACH ROW EXECUTE FUNCTION countersign_records_no_update();
CREATE TRIGGER records_no_delete BEFORE DELETE ON records
    FOR EACH ROW EXECUTE FUNCTION countersign_records_no_delete();
CREATE TRIGGER records_no_truncate BEFORE TRUNCATE ON records
    FOR EACH STATEMENT EXECUTE FUNCTION countersign_records_no_update();
CREATE TRIGGER chain_anchor_no_update BEFORE UPDATE OR DELETE ON chain_anchor
    FOR EACH ROW EXECUTE FUNCTION countersign_anchors_append_only();
CREATE TRIGGER chain_anchor_no_truncate BEFORE TRUNCATE ON chain_anchor
    FOR EACH STATEMENT EXECUTE FUNCTION countersign_anchors_append_only();
";

/// The `records` part.
fn postgres_records() -> String {
    records(&RECORD_QUERY_COLUMNS, Backend::Postgres) + POSTGRES_RECORD_TRIGGERS
}

/// The `record_columns` part: the query columns stop being generated (six
/// `jsonb` parses of the entry per append cost PostgreSQL about five times
/// the rest of the INSERT); the service fills them in from the entry it
/// appends, the same values (`records::query_columns`), and rows keep the
/// ones they have. `DROP EXPRESSION` changes the catalogue only, without
/// rewriting the table. The trigger fills them in for an append that left
/// them out (a service of an older version during a rolling upgrade), so
/// the queries and the idempotency lookup still find its record.
fn postgres_record_columns() -> String {
    let drop: String = RECORD_QUERY_COLUMNS
        .iter()
        .map(|c| format!("ALTER TABLE records ALTER COLUMN {c} DROP EXPRESSION;\n"))
        .collect();
    let fill: String = RECORD_QUERY_COLUMNS
        .iter()
        .map(|c| format!("        NEW.{c} := request ->> '{c}';\n"))
        .collect();
    format!(
        "DO $$
BEGIN
    IF current_setting('server_version_num')::int < 130000 THEN
        RAISE EXCEPTION 'countersign needs PostgreSQL 13 or newer (found %)', current_setting('server_version');
    END IF;
END $$;
{drop}CREATE FUNCTION countersign_records_query_columns() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    request jsonb;
BEGIN
    IF NEW.kind = 'request' AND NEW.request_id IS NULL THEN
        request := NEW.entry::jsonb -> 'request';
{fill}    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER records_query_columns BEFORE INSERT ON records
    FOR EACH ROW EXECUTE FUNCTION countersign_records_query_columns();
"
    )
}

/// Creates the PostgreSQL schema part named `part` once, under an advisory
/// lock so replicas starting together do not race; refuses a database
/// written by a newer version.
fn migrate_postgres(conn: &mut Conn, part: &str, ddl: &str) -> Result<(), OpenError> {
    conn.transaction(Lock::Schema, |c| {
        // Checked first, not `CREATE ... IF NOT EXISTS`: that needs the
        // CREATE privilege on every start, and a service may be granted it
        // only for the first one.
        if !c.table_exists("countersign_schema")? {
            c.batch(
                "CREATE TABLE countersign_schema (
                     part    TEXT PRIMARY KEY,
                     version BIGINT NOT NULL
                 )",
            )?;
        }
        let found = c.query_opt(
            "SELECT version FROM countersign_schema WHERE part = ?1",
            params![part],
        )?;
        match found {
            Some(row) => {
                let version: i64 = row.get(0)?;
                if version > POSTGRES_SCHEMA_VERSION {
                    return Err(OpenError::SchemaTooNew(version));
                }
            }
            None => {
                c.batch(ddl)?;
                c.execute(
                    "INSERT INTO countersign_schema (part, version) VALUES (?1, ?2)",
                    params![part, POSTGRES_SCHEMA_VERSION],
                )?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn memory() -> Conn {
        Conn::from_sqlite(rusqlite::Connection::open_in_memory().unwrap())
    }

    #[test]
    fn approval_tables_are_added_to_old_files_once() {
        let mut conn = memory();
        conn.batch(
            "CREATE TABLE reviews (id TEXT PRIMARY KEY, status TEXT NOT NULL);
             INSERT INTO reviews VALUES ('rev_old', 'pending');
             CREATE TABLE sessions (id_sha256 TEXT PRIMARY KEY, reviewer TEXT NOT NULL);
             INSERT INTO sessions VALUES ('s', 'dana');",
        )
        .unwrap();
        add_approval_tables(&mut conn).unwrap();
        add_approval_tables(&mut conn).unwrap();
        let row = conn
            .query_one(
                "SELECT required_approvals, caller_groups_json, token_uses FROM reviews",
                params![],
            )
            .unwrap();
        let (req, groups, uses): (i64, String, i64) = (
            row.get(0).unwrap(),
            row.get(1).unwrap(),
            row.get(2).unwrap(),
        );
        assert_eq!((req, groups.as_str(), uses), (1, "[]", 0));
        let approvals = conn
            .query_one("SELECT count(*) FROM approvals", params![])
            .unwrap();
        assert_eq!(approvals.get::<i64>(0).unwrap(), 0);
        // An old session was signed in with a token.
        let session = conn
            .query_one("SELECT kind, groups_json FROM sessions", params![])
            .unwrap();
        let (kind, groups): (String, String) = (session.get(0).unwrap(), session.get(1).unwrap());
        assert_eq!((kind.as_str(), groups.as_str()), ("token", "[]"));
    }

    #[test]
    fn older_record_tables_gain_the_idempotency_column() {
        // The record tables as they were before `idempotency_key`.
        let old_schema = records(&RECORD_QUERY_COLUMNS[..5], Backend::Sqlite);
        assert!(!old_schema.contains("idempotency_key"));
        let mut conn = memory();
        conn.batch(&old_schema).unwrap();
        conn.batch(SQLITE_RECORD_TRIGGERS).unwrap();
        let columns = |c: &mut Conn| {
            c.query_one(
                "SELECT count(*) FROM pragma_table_xinfo('records') WHERE name = 'idempotency_key'",
                params![],
            )
            .unwrap()
            .get::<i64>(0)
            .unwrap()
        };
        assert_eq!(columns(&mut conn), 0);
        create_sqlite_records(&mut conn).unwrap();
        create_sqlite_records(&mut conn).unwrap();
        assert_eq!(columns(&mut conn), 1);
    }

    #[test]
    fn spot_checks_of_the_first_release_move_from_kind_to_mode() {
        let mut conn = memory();
        migrate(&mut conn).unwrap();
        // A file of the spot checks' first release: `kind` said `review` or
        // `audit`, and there was no `mode` (nor `tool_calls_json`).
        conn.batch(
            "ALTER TABLE reviews DROP COLUMN mode;
             ALTER TABLE reviews DROP COLUMN tool_calls_json;",
        )
        .unwrap();
        for (id, kind) in [("rev_held", "review"), ("rev_audit", "audit")] {
            conn.execute(
                "INSERT INTO reviews (id, status, created_at_ms, expires_at_ms, request_id, api,
                     method, path, authority, model, stream, prompt_json, preview, body,
                     hold_timeout_ms, kind)
                 VALUES (?1, 'pending', 1, 2, 'r', 'openai_chat', 'POST', '/', 'a', 'm', 0,
                     '[]', '', '{}', 1, ?2)",
                params![id, kind],
            )
            .unwrap();
        }
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let rows: Vec<(String, String, String)> = conn
            .query("SELECT id, kind, mode FROM reviews ORDER BY id", params![])
            .unwrap()
            .iter()
            .map(|r| (r.get(0).unwrap(), r.get(1).unwrap(), r.get(2).unwrap()))
            .collect();
        let expected = [
            ("rev_audit", "prompt", "audit"),
            ("rev_held", "prompt", "hold"),
        ];
        let rows: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
            .collect();
        assert_eq!(rows, expected);
    }

    #[test]
    fn a_new_file_gets_every_step_and_a_newer_one_is_refused() {
        let mut conn = memory();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        // One table of each step: first release, sessions, approvals, records.
        for table in [
            "reviews",
            "sessions",
            "token_consumptions",
            "chain_anchor",
            "standing_uses",
        ] {
            assert!(conn.table_exists(table).unwrap(), "{table}");
        }
        conn.batch("PRAGMA user_version = 3").unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(OpenError::SchemaTooNew(3))
        ));
    }

    #[test]
    fn a_file_of_the_last_release_gains_the_watchers() {
        let mut conn = memory();
        migrate(&mut conn).unwrap();
        // As the release before `POST /v1/watch` left it.
        conn.batch("DROP TABLE watchers; ALTER TABLE reviews DROP COLUMN watcher;")
            .unwrap();
        migrate(&mut conn).unwrap();
        assert!(conn.table_exists("watchers").unwrap());
        let columns = sqlite_columns(&mut conn, "reviews").unwrap();
        assert!(columns.iter().any(|c| c == "watcher"), "{columns:?}");
    }
}
