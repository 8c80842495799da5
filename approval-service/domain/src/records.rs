//! Session records: one tamper-evident, append-only log entry per inference
//! request (reviewed, allowed by policy, or refused), plus the response part
//! appended once the response ended.
//!
//! # Storage
//!
//! The records live in the service's database (SQLite or PostgreSQL), in
//! tables of their own, reached through a second connection
//! ([`RecordStore`], its own mutex; on SQLite, WAL mode lets it coexist with
//! [`crate::store::Store`]'s connection):
//!
//! * `records(seq INTEGER PRIMARY KEY, record_id TEXT UNIQUE, kind,
//!   ref_record_id, created_at_ms, entry, prev_hash, hash)`: the log. `kind`
//!   is `request`, `response` (`ref_record_id` names the request) or
//!   `retention` (see below). `entry` is the compact JSON of the entry with
//!   sorted keys; it repeats `kind`, `record_id`, `ref_record_id` and
//!   `created_at_ms`, so the hash covers those columns too. A few virtual
//!   generated columns (`caller`, `model`, `decision`, `review_id`,
//!   `request_id`, `idempotency_key`, computed from `entry`; stored on
//!   PostgreSQL) serve the query filters and the idempotency lookup.
//!   NUL characters in any string of the entry are written as U+FFFD
//!   (PostgreSQL's `jsonb` refuses `\u0000`), on both databases.
//! * `hash = hex(SHA-256(prev_hash ‖ "\n" ‖ seq ‖ "\n" ‖ entry))` with `seq`
//!   in decimal; `prev_hash` is the previous entry's `hash`, 64 zeros for the
//!   very first entry. Appends run in one transaction that takes the chain's
//!   lock (SQLite's `BEGIN IMMEDIATE`, a PostgreSQL advisory lock) and then
//!   reads the last link, so they serialise (also across processes and
//!   replicas) and `seq` is always the previous `seq + 1`.
//! * Appends go through a queue ([`RecordStore::submit_requests`],
//!   [`RecordStore::submit_response`]): one writer at a time, on a blocking
//!   thread, drains it a group at a time, each group one transaction (group
//!   commit), and answers each append once its transaction committed (per
//!   `sqlite_synchronous` on SQLite). Callers await their answer instead of
//!   taking turns at the connection.
//! * Triggers make the log append-only in SQL: every `UPDATE` aborts, and a
//!   `DELETE` aborts unless `retention_gate.allow = 1`, which only the
//!   retention code sets, inside its own transaction (other connections
//!   never see it set). On PostgreSQL the same triggers are PL/pgSQL
//!   functions, and `TRUNCATE` is refused too.
//!
//! # Retention
//!
//! `record_retention_days` (0 = forever) removes the oldest *prefix* of the
//! chain, never a middle part: every entry up to the last one older than the
//! cutoff, in chunks of [`RETENTION_CHUNK`]. Each chunk, in one
//! transaction: deletes `seq <= K`, stores `(K, hash of K)` in the
//! append-only `chain_anchor` table, and appends a `retention` entry to the
//! chain recording `deleted_through_seq = K` and `anchor_hash`. The verifier
//! starts from the newest anchor (first `seq` must be `K + 1`, its
//! `prev_hash` the anchor hash) and requires that anchor to be attested by a
//! `retention` entry in the remaining chain, so deleting a prefix by hand
//! (and forging an anchor) is reported.
//!
//! # Limits of the tamper evidence
//!
//! The chain has no secret: someone with write access to the file who
//! recomputes every later hash, or who truncates the newest entries, is not
//! detectable from the file alone. Keep the `last hash` printed by
//! `verify-records` (or exported records) somewhere else to detect that.

mod diff;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use countersign_core::wire::{Evidence, NewRecord, RecordResponse, RecordedRefusal};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::assessment::AssessmentReport;
use crate::config::SqliteSynchronous;
use crate::db::group_commit::{self, GroupQueue, Reply, Writer};
use crate::db::schema::RECORD_QUERY_COLUMNS;
use crate::db::{Backend, Conn, DbError, DbResult, Location, Lock, Param, Row};
use crate::json_text;
use crate::params;
use crate::token::hex;

pub use diff::unified_diff;

/// `prev_hash` of the first entry of a chain.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Version of the entry format (`"v"` in every entry).
pub const ENTRY_VERSION: u64 = 1;

/// Most entries one retention transaction deletes (keeps the write lock short).
pub const RETENTION_CHUNK: usize = 2000;

/// How long a write waits for another connection's write lock before it
/// fails. Shorter than the filter's default callout timeout (5 s) so the
/// filter gets a clear 503 rather than a timeout.
pub const WRITE_BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Default and largest page of the query API.
pub const DEFAULT_PAGE: u32 = 50;
/// Largest page of the query API.
pub const MAX_PAGE: u32 = 500;

/// `hex(SHA-256(prev_hash ‖ "\n" ‖ seq ‖ "\n" ‖ entry))`.
pub fn chain_hash(prev_hash: &str, seq: i64, entry: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(seq.to_string().as_bytes());
    h.update(b"\n");
    h.update(entry.as_bytes());
    hex(&h.finalize())
}

/// A new record id for an entry created at `created_at_ms`: `rec_` + 32
/// hex digits, the first 12 that time (ms since the epoch; 12 digits last
/// until the year 10889) and the other 20 random bits (80 of them: as
/// unguessable as a token, and a clash of two ids in one millisecond is
/// out of reach).
///
/// Time first, so ids written one after another sort together: each new id
/// goes into the record-id index next to the last one, where fully random
/// ids land on a random page of it. A group commit of N appends then
/// rewrites about one page of that index (and of `ref_record_id`'s, which
/// response parts fill with these ids), not N of them: fewer pages written
/// to the WAL, copied back by the checkpoint and flushed. Nothing orders
/// records by id; `seq` is the chain's order.
fn new_record_id(created_at_ms: u64) -> DbResult<String> {
    let mut random = [0u8; 10];
    getrandom::fill(&mut random)
        .map_err(|e| DbError::Conversion(format!("no randomness for a record id: {e}")))?;
    // Masked to 12 digits, so the id keeps its length whatever the clock says.
    let time = created_at_ms & 0xffff_ffff_ffff;
    Ok(format!("rec_{time:012x}{}", hex(&random)))
}

/// Opens the database at `location` read-only where it can (for
/// `verify-records` and `export-records`): a SQLite file read-only, a
/// PostgreSQL session with read-only transactions.
pub fn open_read_only(location: &Location) -> DbResult<Conn> {
    match location {
        Location::Sqlite(path) => Conn::open_sqlite_read_only(path),
        Location::Postgres(url) => {
            let mut conn = Conn::connect_postgres(url, Duration::from_secs(5))?;
            conn.set_session("SET default_transaction_read_only = on")?;
            Ok(conn)
        }
    }
}

/// Whether `conn` has a `records` table.
pub fn has_records_table(conn: &mut Conn) -> DbResult<bool> {
    conn.table_exists("records")
}

// ---------------------------------------------------------------- entries

/// One reviewer's action on a review, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewerAction {
    /// Reviewer name.
    pub name: String,
    /// What they did (`approved`, `rejected`).
    pub action: String,
    /// When (Unix ms).
    pub at_ms: Option<u64>,
    /// Their reason.
    pub reason: Option<String>,
    /// Approved with an edit of the body.
    pub edited: bool,
    /// When a later edit discarded this approval (it approved another body).
    pub superseded_at_ms: Option<u64>,
}

/// The review behind a record, copied from the review row when the record
/// is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewSnapshot {
    /// Review id.
    pub id: String,
    /// Status at the time the record was written.
    pub status: String,
    /// When the review was created (Unix ms).
    pub created_at_ms: u64,
    /// When it left `pending` (Unix ms).
    pub decided_at_ms: Option<u64>,
    /// The decision's reason (or why it expired / was cancelled).
    pub reason: Option<String>,
    /// Every reviewer who acted on it, with time and reason.
    pub reviewers: Vec<ReviewerAction>,
    /// Approved with an edited body.
    pub edited: bool,
    /// base64url SHA-256 of the body the reviewers were shown.
    pub original_body_sha256: String,
    /// That body, when it differs from the recorded (forwarded) body.
    pub original_body: Option<String>,
    /// When edited: unified line diff from the original to the edited body
    /// (both laid out as pretty-printed JSON, as written: see
    /// [`json_text::pretty`]).
    pub edit_diff: Option<String>,
    /// What the filter found in the request besides its prompt.
    #[serde(default)]
    pub evidence: Evidence,
    /// What the assessors said and what came of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assessment: Option<AssessmentReport>,
    /// Decided by assessors, not a person.
    #[serde(default)]
    pub automatic: bool,
}

/// A request entry (`kind = "request"`), borrowing what it records.
#[derive(Debug, Serialize)]
struct RequestEntry<'a> {
    v: u64,
    kind: &'static str,
    record_id: &'a str,
    created_at_ms: u64,
    request: &'a NewRecord,
    review: Option<ReviewSnapshot>,
}

/// A response entry (`kind = "response"`), borrowing what it records.
#[derive(Debug, Serialize)]
struct ResponseEntry<'a> {
    v: u64,
    kind: &'static str,
    record_id: &'a str,
    ref_record_id: &'a str,
    created_at_ms: u64,
    response: &'a RecordResponse,
}

/// An entry as appended: its text, which the hash covers, and the values
/// of the record log's query columns read from it.
struct Entry {
    text: String,
    query: QueryColumns,
}

/// The query columns of an entry ([`RECORD_QUERY_COLUMNS`], in order): its
/// `request.<name>`, read as PostgreSQL's `#>>` reads it (a string as its
/// text, null or absent as NULL), so a response or retention entry has
/// none. SQLite computes them itself (virtual columns); on PostgreSQL the
/// service fills them in, where six `jsonb` generated columns parsed the
/// entry six times per append (the schema's `record_columns` part).
type QueryColumns = [Option<String>; RECORD_QUERY_COLUMNS.len()];

fn query_columns(entry: &Value) -> QueryColumns {
    let request = entry.get("request");
    RECORD_QUERY_COLUMNS.map(|name| match request.and_then(|r| r.get(name)) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    })
}

/// `v` as an entry: compact JSON with sorted keys (through
/// `serde_json::Value`, whose maps are ordered), with every NUL character
/// as U+FFFD: PostgreSQL's `text` and `jsonb` refuse `\u0000`, and a caller
/// can put one in a prompt; both databases store the same entry.
fn canonical<T: Serialize>(v: &T) -> DbResult<Entry> {
    let mut value = serde_json::to_value(v)?;
    without_nul(&mut value);
    Ok(Entry {
        text: serde_json::to_string(&value)?,
        query: query_columns(&value),
    })
}

fn without_nul(v: &mut Value) {
    let clean = |s: &str| s.replace('\0', "\u{FFFD}");
    match v {
        Value::String(s) if s.contains('\0') => *s = clean(s),
        Value::Array(items) => items.iter_mut().for_each(without_nul),
        Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                let old = std::mem::take(map);
                map.extend(old.into_iter().map(|(k, v)| (clean(&k), v)));
            }
            map.values_mut().for_each(without_nul);
        }
        _ => {}
    }
}

// ---------------------------------------------------------------- errors

/// Why a record could not be written.
#[derive(Debug)]
pub enum RecordError {
    /// The record is invalid (400); the message says why.
    BadRequest(String),
    /// No such request record (404).
    NotFound,
    /// The request record already has a response part (409).
    Conflict(String),
    /// The database refused (503 on the filter API).
    Db(DbError),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::BadRequest(m) | RecordError::Conflict(m) => f.write_str(m),
            RecordError::NotFound => f.write_str("no such record"),
            RecordError::Db(e) => write!(f, "database: {e}"),
        }
    }
}

impl std::error::Error for RecordError {}

impl From<DbError> for RecordError {
    fn from(e: DbError) -> Self {
        RecordError::Db(e)
    }
}

impl From<tokio::task::JoinError> for RecordError {
    fn from(e: tokio::task::JoinError) -> Self {
        RecordError::Db(DbError::Conversion(format!("blocking task failed: {e}")))
    }
}

// ---------------------------------------------------------------- metrics

/// Counters of the record store (exported on `/metrics`).
#[derive(Debug, Default)]
pub struct RecordCounters {
    /// Request entries written.
    pub requests: AtomicU64,
    /// Response entries written.
    pub responses: AtomicU64,
    /// Retention entries written.
    pub retentions: AtomicU64,
    /// Writes that failed in the database.
    pub write_failures: AtomicU64,
    /// Entries deleted by retention.
    pub retention_deleted: AtomicU64,
}

// ---------------------------------------------------------------- store

/// The record log: a connection of its own to the service's database.
pub struct RecordStore {
    log: Arc<Log>,
}

/// What the store and its writer share.
struct Log {
    conn: Mutex<Conn>,
    /// Appends waiting for the next group commit (see [`RecordStore::submit`]).
    queue: Arc<GroupQueue<Queued>>,
    counters: RecordCounters,
}

/// Most appends one group commit writes in one transaction.
pub const GROUP_COMMIT_MAX: usize = 256;

/// An append to the chain.
enum Append {
    Request(Box<NewRecord>),
    Response(String, Box<RecordResponse>),
}

/// `(written, newly appended)` of one append; `false` for an idempotent
/// repeat.
type Outcome = Result<(Written, bool), RecordError>;

/// The outcome of an append whose writer ended without answering (it
/// panicked, or the runtime shut down before it ran).
fn writer_failed() -> Outcome {
    Err(RecordError::Db(DbError::Conversion(
        "the record writer failed".into(),
    )))
}

/// An append waiting for a group commit, and where its outcome goes.
struct Queued {
    append: Append,
    now_ms: u64,
    reply: Reply<Outcome>,
}

impl group_commit::Queued for Queued {
    fn abandon(self) {
        self.reply.send(writer_failed());
    }
}

impl Log {
    fn conn(&self) -> MutexGuard<'_, Conn> {
        // Every change is one transaction, so no half-written entry is ever
        // committed (see `db::lock`).
        crate::db::lock(&self.conn)
    }
}

/// The last link of the chain: `(seq, hash)` of the newest entry, else of
/// the newest retention anchor, else `(0, GENESIS_HASH)`.
fn last_link(tx: &mut Conn) -> DbResult<(i64, String)> {
    let row = tx.query_opt(
        "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1",
        params![],
    )?;
    if let Some(r) = row {
        return Ok((r.get(0)?, r.get(1)?));
    }
    let anchor = tx.query_opt(
        "SELECT through_seq, hash FROM chain_anchor ORDER BY through_seq DESC LIMIT 1",
        params![],
    )?;
    match anchor {
        Some(r) => Ok((r.get(0)?, r.get(1)?)),
        None => Ok((0, GENESIS_HASH.to_string())),
    }
}

/// When an append goes in: the check that used to be a statement of its
/// own before the INSERT, made part of it (one round trip per append
/// instead of two; on PostgreSQL each is a round trip to the server, under
/// the chain's lock).
#[derive(Clone, Copy)]
enum Guard<'a> {
    /// Always.
    Always,
    /// Unless a request part with this request id and idempotency key is
    /// written already (a retry whose first answer was lost).
    NewRequest { request_id: &'a str, key: &'a str },
    /// Only when the entry's `ref_record_id` is a request part that has no
    /// response part yet.
    FirstResponse,
}

/// The INSERT of an entry after `guard`: its own columns, and on PostgreSQL
/// its query columns (SQLite computes those itself).
fn insert_sql(backend: Backend, guard: Guard<'_>) -> String {
    let mut columns =
        String::from("seq, record_id, kind, ref_record_id, created_at_ms, entry, prev_hash, hash");
    let mut n = 8;
    if backend == Backend::Postgres {
        for c in RECORD_QUERY_COLUMNS {
            columns.push_str(", ");
            columns.push_str(c);
        }
        n += RECORD_QUERY_COLUMNS.len();
    }
    let values: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
    let condition = match guard {
        Guard::Always => String::new(),
        // (`=`, not `IS NOT DISTINCT FROM`: a request id is never null, and
        // only `=` lets PostgreSQL use the `records_request` index.)
        Guard::NewRequest { .. } => format!(
            " WHERE NOT EXISTS (SELECT 1 FROM records WHERE request_id = ?{} \
             AND kind = 'request' AND idempotency_key = ?{})",
            n + 1,
            n + 2
        ),
        Guard::FirstResponse => " WHERE EXISTS (SELECT 1 FROM records \
             WHERE record_id = ?4 AND kind = 'request') \
             AND NOT EXISTS (SELECT 1 FROM records WHERE kind = 'response' AND ref_record_id = ?4)"
            .to_string(),
    };
    format!(
        "INSERT INTO records ({columns}) SELECT {}{condition}",
        values.join(", ")
    )
}

/// Appends `entry` after `tail` (the chain's last link, read once per
/// transaction under the chain's lock, then kept up to date here) unless
/// `guard` says no; returns its `seq`, or `None` when it was not appended.
#[allow(clippy::too_many_arguments)]
fn append(
    tx: &mut Conn,
    tail: &mut (i64, String),
    record_id: &str,
    kind: &str,
    ref_record_id: Option<&str>,
    created_at_ms: u64,
    entry: &Entry,
    guard: Guard<'_>,
) -> DbResult<Option<i64>> {
    let (last_seq, prev_hash) = (tail.0, &tail.1);
    let seq = last_seq + 1;
    let hash = chain_hash(prev_hash, seq, &entry.text);
    let backend = tx.backend();
    let mut values: Vec<Param<'_>> = params![
        seq,
        record_id,
        kind,
        ref_record_id,
        created_at_ms,
        entry.text.as_str(),
        prev_hash.as_str(),
        &hash
    ]
    .to_vec();
    if backend == Backend::Postgres {
        values.extend(entry.query.iter().map(Param::from));
    }
    if let Guard::NewRequest { request_id, key } = guard {
        values.extend([Param::from(request_id), Param::from(key)]);
    }
    if tx.execute(&insert_sql(backend, guard), &values)? == 0 {
        return Ok(None);
    }
    *tail = (seq, hash);
    Ok(Some(seq))
}

/// Every approval of a review (including ones a later edit superseded).
fn approvals_of(conn: &mut Conn, review_id: &str) -> DbResult<Vec<ReviewerAction>> {
    Ok(crate::store::approvals_of(conn, review_id)?
        .into_iter()
        .map(|a| ReviewerAction {
            name: a.reviewer,
            action: "approved".to_string(),
            at_ms: Some(a.approved_at_ms),
            reason: a.reason,
            edited: a.edited,
            superseded_at_ms: a.superseded_at_ms,
        })
        .collect())
}

/// The record's diff of an edit: `original` to `edited`, as
/// [`json_text::pretty`] lays them out (as written: re-parsing into a
/// `Value` rounded big numbers, sorted keys and kept one of two, and so hid
/// such an edit from the diff).
fn edit_diff(original: &str, edited: &str) -> String {
    unified_diff(&json_text::pretty(original), &json_text::pretty(edited))
}

/// The review row `review_id`, as recorded alongside a request whose
/// forwarded body is `body`.
fn review_snapshot(
    conn: &mut Conn,
    review_id: &str,
    body: Option<&str>,
) -> DbResult<Option<ReviewSnapshot>> {
    let row = conn.query_opt(
        "SELECT status, created_at_ms, decided_at_ms, reviewer, reason, body, edited_body,
             evidence_json, assessment_json, automatic
         FROM reviews WHERE id = ?1",
        params![review_id],
    )?;
    let Some(r) = row else {
        return Ok(None);
    };
    let status: String = r.get(0)?;
    let created_at_ms: u64 = r.get(1)?;
    let decided_at_ms: Option<u64> = r.get(2)?;
    let reviewer: Option<String> = r.get(3)?;
    let reason: Option<String> = r.get(4)?;
    let original: String = r.get(5)?;
    let edited_body: Option<String> = r.get(6)?;
    let evidence = serde_json::from_str(&r.get::<String>(7)?)?;
    let assessment = r
        .get::<Option<String>>(8)?
        .as_deref()
        .map(serde_json::from_str)
        .transpose()?;
    let automatic: bool = r.get(9)?;
    let mut reviewers = approvals_of(conn, review_id)?;
    // The reviewer column names who decided: the rejecter, or (for reviews
    // decided before approvals were kept per reviewer) the one approver.
    if let Some(name) = &reviewer {
        let listed = status == "approved" && !reviewers.is_empty();
        if !listed {
            reviewers.push(ReviewerAction {
                name: name.clone(),
                action: status.clone(),
                at_ms: decided_at_ms,
                reason: reason.clone(),
                edited: status == "approved" && edited_body.is_some(),
                superseded_at_ms: None,
            });
        }
    }
    let edit_diff = edited_body
        .as_deref()
        .map(|edited| edit_diff(&original, edited));
    Ok(Some(ReviewSnapshot {
        id: review_id.to_string(),
        status,
        created_at_ms,
        decided_at_ms,
        reason,
        reviewers,
        edited: edited_body.is_some(),
        original_body_sha256: countersign_core::token::body_hash(original.as_bytes()),
        original_body: (body != Some(original.as_str())).then_some(original),
        edit_diff,
        evidence,
        assessment,
        automatic,
    }))
}

/// Where a record write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Record id.
    pub record_id: String,
    /// Position in the chain.
    pub seq: i64,
}

/// Writes `group` in one transaction and answers every member (before the
/// caller lets go of the connection, so each submitter finds its answer).
fn write_group(conn: &mut Conn, group: Vec<Queued>) {
    if group.is_empty() {
        return;
    }
    let results = conn.transaction(Lock::RecordChain, |tx| {
        let mut results = Vec::with_capacity(group.len());
        let mut tail = last_link(tx)?;
        for q in &group {
            let r = match &q.append {
                Append::Request(rec) => append_request(tx, &mut tail, rec, q.now_ms),
                Append::Response(ref_id, resp) => {
                    append_response(tx, &mut tail, ref_id, resp, q.now_ms).map(|w| (w, true))
                }
            };
            match r {
                // The transaction is lost: the whole group fails.
                Err(RecordError::Db(e)) => return Err(e),
                other => results.push(other),
            }
        }
        Ok(results)
    });
    match results {
        Ok(results) => {
            for (q, r) in group.into_iter().zip(results) {
                q.reply.send(r);
            }
        }
        // One append the database refuses must not fail the others with
        // it: try each alone (an outage fails them all again, correctly).
        Err(_) if group.len() > 1 => {
            for q in group {
                write_group(conn, vec![q]);
            }
        }
        Err(e) => {
            if let Some(q) = group.into_iter().next() {
                q.reply.send(Err(RecordError::Db(e)));
            }
        }
    }
}

/// Appends the request part of a record (inside the group's transaction);
/// `false` when its idempotency key found the record already written.
fn append_request(
    tx: &mut Conn,
    tail: &mut (i64, String),
    rec: &NewRecord,
    now_ms: u64,
) -> Result<(Written, bool), RecordError> {
    if rec.refusal.is_some() {
        // A retry of this refusal, then the pre-forward record it may
        // complete (see `refusal_of_written_record`), in that order.
        if let Some(existing) = written_request(tx, rec)? {
            return Ok((existing, false));
        }
        if let Some(outcome) = refusal_of_written_record(tx, tail, rec, now_ms)? {
            return Ok((outcome, false));
        }
    }
    let review = match rec.review_id.as_deref().filter(|s| !s.is_empty()) {
        Some(id) => review_snapshot(tx, id, rec.body.as_deref())?,
        None => None,
    };
    let record_id = new_record_id(now_ms)?;
    let entry = canonical(&RequestEntry {
        v: ENTRY_VERSION,
        kind: "request",
        record_id: &record_id,
        created_at_ms: now_ms,
        request: rec,
        review,
    })?;
    // A retry after a lost answer carries the same key: it is answered
    // with the record already written instead of appending a second one.
    let guard = match rec.idempotency_key.as_deref() {
        Some(key) => Guard::NewRequest {
            request_id: &rec.request_id,
            key,
        },
        None => Guard::Always,
    };
    match append(tx, tail, &record_id, "request", None, now_ms, &entry, guard)? {
        Some(seq) => {
            // The filter gave up on this append (its answers were lost or
            // late) and its refusal reached the chain first: the request
            // was never forwarded, and this record says so at once.
            if rec.refusal.is_none() {
                if let Some(refusal) = refusal_written_first(tx, rec)? {
                    match append_response(tx, tail, &record_id, &not_forwarded(&refusal), now_ms) {
                        Ok(_) | Err(RecordError::Conflict(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok((Written { record_id, seq }, true))
        }
        None => match written_request(tx, rec)? {
            Some(existing) => Ok((existing, false)),
            None => Err(RecordError::Db(not_appended(&record_id))),
        },
    }
}

/// The request part already written under `rec`'s idempotency key, if any.
fn written_request(tx: &mut Conn, rec: &NewRecord) -> DbResult<Option<Written>> {
    match rec.idempotency_key.as_deref() {
        Some(key) => request_with_key(tx, &rec.request_id, key),
        None => Ok(None),
    }
}

/// The request part of request `request_id` written with idempotency key
/// `key`, if any.
fn request_with_key(tx: &mut Conn, request_id: &str, key: &str) -> DbResult<Option<Written>> {
    let row = tx.query_opt(
        "SELECT record_id, seq FROM records
         WHERE request_id = ?1 AND kind = 'request'
           AND idempotency_key = ?2",
        params![request_id, key],
    )?;
    row.map(|r| {
        Ok(Written {
            record_id: r.get(0)?,
            seq: r.get(1)?,
        })
    })
    .transpose()
}

/// A guarded append that found nothing to explain its refusal: cannot
/// happen while appends hold the chain's lock, so the transaction fails.
fn not_appended(record_id: &str) -> DbError {
    DbError::Conversion(format!(
        "record {record_id} was not appended and nothing already written explains why"
    ))
}

/// The filter refused a request after its pre-forward record was written
/// but every answer to that write was lost: the request was never
/// forwarded, and the record already written would say it was allowed with
/// no word of what happened. The refusal (whose idempotency key is the
/// pre-forward record's plus `:refusal`) then becomes that record's
/// response part (`completion: not_forwarded`, the refusal's status, code
/// and message), so one record tells the whole story. A retry of the
/// refusal finds the part already there and is answered with the record.
fn refusal_of_written_record(
    tx: &mut Conn,
    tail: &mut (i64, String),
    rec: &NewRecord,
    now_ms: u64,
) -> Result<Option<Written>, RecordError> {
    let (Some(key), Some(refusal)) = (rec.idempotency_key.as_deref(), &rec.refusal) else {
        return Ok(None);
    };
    let Some(forward_key) = key.strip_suffix(":refusal") else {
        return Ok(None);
    };
    let Some(written) = request_with_key(tx, &rec.request_id, forward_key)? else {
        return Ok(None);
    };
    match append_response(
        tx,
        tail,
        &written.record_id,
        &not_forwarded(refusal),
        now_ms,
    ) {
        Ok(_) | Err(RecordError::Conflict(_)) => Ok(Some(written)),
        Err(e) => Err(e),
    }
}

/// The response part saying a refused request was never forwarded.
fn not_forwarded(refusal: &RecordedRefusal) -> RecordResponse {
    RecordResponse {
        status: refusal.status,
        body: refusal.message.clone(),
        truncated: false,
        usage: None,
        ttfb_ms: None,
        total_ms: None,
        blocked_by: Some(refusal.code.clone()),
        hits: Vec::new(),
        unscanned: false,
        completion: "not_forwarded".into(),
        answer_review_id: None,
        answer_decision: None,
    }
}

/// The refusal of `rec`'s request already in the chain (written under
/// `rec`'s idempotency key plus `:refusal`), when it arrived before `rec`.
fn refusal_written_first(tx: &mut Conn, rec: &NewRecord) -> DbResult<Option<RecordedRefusal>> {
    let Some(key) = rec.idempotency_key.as_deref() else {
        return Ok(None);
    };
    let row = tx.query_opt(
        "SELECT entry FROM records
         WHERE request_id = ?1 AND kind = 'request'
           AND idempotency_key = ?2",
        params![&rec.request_id, &format!("{key}:refusal")],
    )?;
    let Some(row) = row else {
        return Ok(None);
    };
    let entry: serde_json::Value = serde_json::from_str(&row.get::<String>(0)?)?;
    Ok(serde_json::from_value(entry["request"]["refusal"].clone()).ok())
}

/// Appends the response part of request record `ref_id`.
fn append_response(
    tx: &mut Conn,
    tail: &mut (i64, String),
    ref_id: &str,
    resp: &RecordResponse,
    now_ms: u64,
) -> Result<Written, RecordError> {
    let record_id = new_record_id(now_ms)?;
    let entry = canonical(&ResponseEntry {
        v: ENTRY_VERSION,
        kind: "response",
        record_id: &record_id,
        ref_record_id: ref_id,
        created_at_ms: now_ms,
        response: resp,
    })?;
    let appended = append(
        tx,
        tail,
        &record_id,
        "response",
        Some(ref_id),
        now_ms,
        &entry,
        Guard::FirstResponse,
    )?;
    match appended {
        Some(seq) => Ok(Written { record_id, seq }),
        None => Err(why_no_response(tx, ref_id, &record_id)?),
    }
}

/// Why a response part for `ref_id` was not appended: no such request
/// part, or it has its response part already.
fn why_no_response(tx: &mut Conn, ref_id: &str, record_id: &str) -> DbResult<RecordError> {
    let Some(row) = tx.query_opt(
        "SELECT r.kind, (SELECT x.record_id FROM records x
                         WHERE x.kind = 'response' AND x.ref_record_id = r.record_id LIMIT 1)
         FROM records r WHERE r.record_id = ?1",
        params![ref_id],
    )?
    else {
        return Ok(RecordError::NotFound);
    };
    if row.get::<String>(0)? != "request" {
        return Ok(RecordError::NotFound);
    }
    match row.get::<Option<String>>(1)? {
        Some(existing) => Ok(RecordError::Conflict(format!(
            "record {ref_id} already has a response part ({existing})"
        ))),
        None => Err(not_appended(record_id)),
    }
}

/// Which part an append is (for the counters).
#[derive(Clone, Copy)]
enum AppendKind {
    Request,
    Response,
}

/// The append of request part `rec`, once checked: a decision, and a
/// `body_sha256` that matches `body` (computed when absent).
fn request_append(mut rec: NewRecord) -> Result<Append, RecordError> {
    if rec.decision.trim().is_empty() {
        return Err(RecordError::BadRequest("decision must not be empty".into()));
    }
    if let Some(body) = &rec.body {
        let computed = countersign_core::token::body_hash(body.as_bytes());
        match &rec.body_sha256 {
            Some(sent) if *sent != computed => {
                return Err(RecordError::BadRequest(
                    "body_sha256 does not match body".into(),
                ))
            }
            Some(_) => {}
            None => rec.body_sha256 = Some(computed),
        }
    }
    Ok(Append::Request(Box::new(rec)))
}

impl RecordStore {
    /// Opens a connection to the database at `location`, whose schema the
    /// review store has already created (see [`crate::db::schema`]).
    /// Blocking.
    pub fn open(location: &Location, synchronous: SqliteSynchronous) -> DbResult<RecordStore> {
        let conn = Conn::open(location, WRITE_BUSY_TIMEOUT, synchronous.pragma_value())?;
        Ok(RecordStore {
            log: Arc::new(Log {
                conn: Mutex::new(conn),
                queue: GroupQueue::new(GROUP_COMMIT_MAX),
                counters: RecordCounters::default(),
            }),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        self.log.conn()
    }

    /// Leaves the log's WAL checkpoints to `checkpointer` (SQLite).
    pub fn checkpoint_with(
        &self,
        checkpointer: &crate::db::checkpoint::Checkpointer,
    ) -> DbResult<()> {
        self.conn().checkpoint_with(checkpointer)
    }

    /// The counters.
    pub fn counters(&self) -> &RecordCounters {
        &self.log.counters
    }

    /// Counts what the writes of one call came to: appended request and
    /// response entries, database failures.
    fn count(&self, outcome: &Outcome, append: AppendKind) {
        let counters = self.counters();
        match (outcome, append) {
            (Ok((_, true)), AppendKind::Request) => {
                counters.requests.fetch_add(1, Ordering::Relaxed);
            }
            (Ok(_), AppendKind::Response) => {
                counters.responses.fetch_add(1, Ordering::Relaxed);
            }
            (Err(RecordError::Db(_)), _) => {
                counters.write_failures.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Writes the request part of a record; durable once this returns `Ok`.
    /// Blocking; the service writes with [`RecordStore::submit_requests`].
    pub fn write_request(&self, rec: NewRecord, now_ms: u64) -> Result<Written, RecordError> {
        let append = request_append(rec)?;
        let mut out = self.submit_blocking(vec![append], now_ms);
        let outcome = out.pop().unwrap_or_else(writer_failed);
        self.count(&outcome, AppendKind::Request);
        outcome.map(|(w, _)| w)
    }

    /// Appends the response part of request record `ref_id`; durable once
    /// this returns `Ok`. Blocking; the service writes with
    /// [`RecordStore::submit_response`].
    pub fn write_response(
        &self,
        ref_id: &str,
        resp: RecordResponse,
        now_ms: u64,
    ) -> Result<Written, RecordError> {
        let append = Append::Response(ref_id.to_string(), Box::new(resp));
        let mut out = self.submit_blocking(vec![append], now_ms);
        let outcome = out.pop().unwrap_or_else(writer_failed);
        self.count(&outcome, AppendKind::Response);
        outcome.map(|(w, _)| w)
    }

    /// Writes the request parts `recs` (in this order, one outcome each, in
    /// the same order); each is durable once its outcome is `Ok`. They join
    /// the queue together, so up to [`GROUP_COMMIT_MAX`] of them (with
    /// whatever else is waiting) are committed in one transaction. An
    /// invalid record is refused alone. Never blocks the runtime: a
    /// blocking thread writes.
    pub async fn submit_requests(
        &self,
        recs: Vec<NewRecord>,
        now_ms: u64,
    ) -> Vec<Result<Written, RecordError>> {
        let checked: Vec<Result<Append, RecordError>> =
            recs.into_iter().map(request_append).collect();
        let appends = checked.iter().filter(|c| c.is_ok()).count();
        let mut valid = Vec::with_capacity(appends);
        let mut slots = Vec::with_capacity(checked.len());
        for c in checked {
            match c {
                Ok(append) => {
                    valid.push(append);
                    slots.push(None);
                }
                Err(e) => slots.push(Some(Err(e))),
            }
        }
        let mut written = self.submit(valid, now_ms).await.into_iter();
        slots
            .into_iter()
            .map(|slot| {
                slot.unwrap_or_else(|| {
                    let outcome = written.next().unwrap_or_else(writer_failed);
                    self.count(&outcome, AppendKind::Request);
                    outcome.map(|(w, _)| w)
                })
            })
            .collect()
    }

    /// Appends the response parts `parts`, `(request record id, part)`, in
    /// this order, one outcome each, in the same order; queued together like
    /// [`RecordStore::submit_requests`]. Never blocks the runtime.
    pub async fn submit_responses(
        &self,
        parts: Vec<(String, RecordResponse)>,
        now_ms: u64,
    ) -> Vec<Result<Written, RecordError>> {
        let appends = parts
            .into_iter()
            .map(|(id, resp)| Append::Response(id, Box::new(resp)))
            .collect();
        self.submit(appends, now_ms)
            .await
            .into_iter()
            .map(|outcome| {
                self.count(&outcome, AppendKind::Response);
                outcome.map(|(w, _)| w)
            })
            .collect()
    }

    /// Writes the request part of a record; durable once this returns `Ok`.
    pub async fn submit_request(
        &self,
        rec: NewRecord,
        now_ms: u64,
    ) -> Result<Written, RecordError> {
        let mut out = self.submit_requests(vec![rec], now_ms).await;
        out.pop().unwrap_or_else(|| writer_failed().map(|(w, _)| w))
    }

    /// Appends the response part of request record `ref_id`; durable once
    /// this returns `Ok`.
    pub async fn submit_response(
        &self,
        ref_id: &str,
        resp: RecordResponse,
        now_ms: u64,
    ) -> Result<Written, RecordError> {
        let mut out = self
            .submit_responses(vec![(ref_id.to_string(), resp)], now_ms)
            .await;
        out.pop().unwrap_or_else(|| writer_failed().map(|(w, _)| w))
    }

    /// Appends through a group commit: the appends join the queue, and one
    /// writer at a time (on a blocking thread, started when none is at
    /// work) appends everything queued in one transaction (up to
    /// [`GROUP_COMMIT_MAX`]), then the next group, until the queue is empty.
    /// The chain is one sequence, so appends are serial anyway; one commit
    /// (one flush to disk) for many of them is what lets records keep up
    /// with traffic, and handing the appends to the writer rather than
    /// taking turns at the connection keeps each append to one wake-up.
    /// Each append still gets its own outcome, sent once its transaction
    /// committed: a refusal (bad request, no such record, conflict) is that
    /// append's alone, while a database error fails the whole group, whose
    /// callers retry.
    async fn submit(&self, appends: Vec<Append>, now_ms: u64) -> Vec<Outcome> {
        let (answers, writer) = self.enqueue(appends, now_ms, || {
            let (reply, answer) = tokio::sync::oneshot::channel();
            (Reply::Async(reply), answer)
        });
        if let Some(writer) = writer {
            let log = Arc::clone(&self.log);
            // Dropped unrun when the runtime is shutting down: the writer's
            // `Drop` answers what waits.
            drop(tokio::task::spawn_blocking(move || {
                writer.run(|group| write_group(&mut log.conn(), group));
            }));
        }
        let mut out = Vec::with_capacity(answers.len());
        for answer in answers {
            out.push(answer.await.unwrap_or_else(|_| writer_failed()));
        }
        out
    }

    /// [`RecordStore::submit`] on this thread: when no writer is at work,
    /// this thread becomes it until the queue is empty.
    fn submit_blocking(&self, appends: Vec<Append>, now_ms: u64) -> Vec<Outcome> {
        let (answers, writer) = self.enqueue(appends, now_ms, || {
            let (reply, answer) = std::sync::mpsc::channel();
            (Reply::Blocking(reply), answer)
        });
        if let Some(writer) = writer {
            writer.run(|group| write_group(&mut self.log.conn(), group));
        }
        answers
            .into_iter()
            .map(|answer| answer.recv().unwrap_or_else(|_| writer_failed()))
            .collect()
    }

    /// Queues `appends` together, each with a reply channel from `channel`;
    /// returns the receiving ends, in order, and the writer to run when
    /// none is at work.
    fn enqueue<A>(
        &self,
        appends: Vec<Append>,
        now_ms: u64,
        channel: impl Fn() -> (Reply<Outcome>, A),
    ) -> (Vec<A>, Option<Writer<Queued>>) {
        let mut answers = Vec::with_capacity(appends.len());
        let queued: Vec<Queued> = appends
            .into_iter()
            .map(|append| {
                let (reply, answer) = channel();
                answers.push(answer);
                Queued {
                    append,
                    now_ms,
                    reply,
                }
            })
            .collect();
        let writer = self.log.queue.push(queued);
        (answers, writer)
    }

    /// Deletes at most [`RETENTION_CHUNK`] of the oldest entries created
    /// before `cutoff_ms` (a prefix of the chain), anchoring the chain and
    /// appending a `retention` entry. Returns how many were deleted (0 when
    /// nothing is due).
    pub fn retention_chunk(&self, cutoff_ms: u64, now_ms: u64) -> DbResult<usize> {
        let deleted = self.conn().transaction(Lock::RecordChain, |tx| {
            retention_chunk_in(tx, cutoff_ms, now_ms)
        })?;
        if deleted > 0 {
            self.counters().retentions.fetch_add(1, Ordering::Relaxed);
            self.counters()
                .retention_deleted
                .fetch_add(u64::try_from(deleted).unwrap_or(0), Ordering::Relaxed);
        }
        Ok(deleted)
    }

    /// Applies retention until nothing more is due; returns how many entries
    /// were deleted.
    pub fn apply_retention(&self, cutoff_ms: u64, now_ms: u64) -> DbResult<usize> {
        let mut total = 0;
        loop {
            let n = self.retention_chunk(cutoff_ms, now_ms)?;
            total += n;
            if n < RETENTION_CHUNK {
                return Ok(total);
            }
        }
    }

    /// Appends a `retention` entry saying that retention dropped the prompt
    /// and bodies of `purged` reviews created before `cutoff_ms` (see
    /// [`crate::store::Store::purge_review_bodies`]): reviews are not part
    /// of the chain, so the chain keeps the word of what retention did.
    pub fn note_review_retention(
        &self,
        purged: usize,
        cutoff_ms: u64,
        now_ms: u64,
    ) -> DbResult<()> {
        let retention = json!({"review_bodies_purged": purged, "cutoff_ms": cutoff_ms});
        self.conn().transaction(Lock::RecordChain, |tx| {
            append_retention(tx, retention, now_ms).map(drop)
        })
    }

    /// One page of merged records.
    pub fn query(&self, q: &RecordQuery) -> DbResult<Vec<Value>> {
        query_records(&mut self.conn(), q)
    }

    /// The merged record `id` (a request record id, or the id of its
    /// response part).
    pub fn get(&self, id: &str) -> DbResult<Option<Value>> {
        get_record(&mut self.conn(), id)
    }

    /// Verifies the chain.
    pub fn verify(&self) -> DbResult<Result<ChainOk, ChainProblem>> {
        verify_chain(&mut self.conn())
    }

    /// The reviews by status, kind and mode, with the oldest of each (for
    /// metrics).
    pub fn review_load(&self) -> DbResult<crate::store::ReviewLoad> {
        let mut conn = self.conn();
        if !conn.table_exists("reviews")? {
            return Ok(crate::store::ReviewLoad::default());
        }
        let rows = conn.query(
            "SELECT status, kind, mode, async_review, count(*), min(created_at_ms) FROM reviews
             GROUP BY status, kind, mode, async_review ORDER BY status, kind, mode, async_review",
            params![],
        )?;
        let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
        let groups = rows
            .iter()
            .map(|r| {
                Ok(crate::store::ReviewGroup {
                    status: r.get(0)?,
                    kind: r.get(1)?,
                    mode: r.get(2)?,
                    async_review: r.get::<i64>(3)? != 0,
                    count: unsigned(r.get(4)?),
                    oldest_created_at_ms: unsigned(r.get(5)?),
                })
            })
            .collect::<DbResult<Vec<_>>>()?;
        let follow_ups = crate::follow_ups::counts(&mut conn)?;
        Ok(crate::store::ReviewLoad { groups, follow_ups })
    }

    /// Number of entries in the log.
    pub fn entry_count(&self) -> DbResult<u64> {
        let n: i64 = self
            .conn()
            .query_one("SELECT count(*) FROM records", params![])?
            .get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// One retention chunk inside the chain's transaction; see
/// [`RecordStore::retention_chunk`].
fn retention_chunk_in(tx: &mut Conn, cutoff_ms: u64, now_ms: u64) -> DbResult<usize> {
    let first: Option<i64> = tx
        .query_one("SELECT min(seq) FROM records", params![])?
        .get(0)?;
    let Some(first) = first else { return Ok(0) };
    let first_kept: Option<i64> = tx
        .query_one(
            "SELECT min(seq) FROM records WHERE created_at_ms >= ?1",
            params![cutoff_ms],
        )?
        .get(0)?;
    let last_due: i64 = match first_kept {
        Some(s) => s - 1,
        None => tx
            .query_one("SELECT max(seq) FROM records", params![])?
            .get::<Option<i64>>(0)?
            .unwrap_or(0),
    };
    let chunk = i64::try_from(RETENTION_CHUNK).unwrap_or(i64::MAX);
    let through = last_due.min(first.saturating_add(chunk - 1));
    if through < first {
        return Ok(0);
    }
    let Some(row) = tx.query_opt(
        "SELECT seq, hash FROM records WHERE seq <= ?1 ORDER BY seq DESC LIMIT 1",
        params![through],
    )?
    else {
        return Ok(0);
    };
    let (through, anchor_hash): (i64, String) = (row.get(0)?, row.get(1)?);
    tx.execute(
        "UPDATE retention_gate SET allow = 1 WHERE id = 1",
        params![],
    )?;
    let deleted = tx.execute("DELETE FROM records WHERE seq <= ?1", params![through])?;
    tx.execute(
        "UPDATE retention_gate SET allow = 0 WHERE id = 1",
        params![],
    )?;
    tx.execute(
        "INSERT INTO chain_anchor (through_seq, hash, created_at_ms) VALUES (?1, ?2, ?3)",
        params![through, &anchor_hash, now_ms],
    )?;
    let retention = json!({
        "deleted_through_seq": through,
        "anchor_hash": anchor_hash,
        "deleted": deleted,
        "cutoff_ms": cutoff_ms,
    });
    append_retention(tx, retention, now_ms)?;
    Ok(deleted)
}

/// Appends a `retention` entry saying `retention` (what it removed).
fn append_retention(tx: &mut Conn, retention: Value, now_ms: u64) -> DbResult<i64> {
    let record_id = new_record_id(now_ms)?;
    let entry = canonical(&json!({
        "v": ENTRY_VERSION,
        "kind": "retention",
        "record_id": record_id,
        "created_at_ms": now_ms,
        "retention": retention,
    }))?;
    let mut tail = last_link(tx)?;
    let seq = append(
        tx,
        &mut tail,
        &record_id,
        "retention",
        None,
        now_ms,
        &entry,
        Guard::Always,
    )?;
    seq.ok_or_else(|| not_appended(&record_id))
}

// ---------------------------------------------------------------- queries

/// Filters of the query API (its query string, field by field) and the
/// export. Exact matches; all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RecordQuery {
    /// Caller name.
    pub caller: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// Decision (`allowed`, `approved`, `rejected`, ...).
    pub decision: Option<String>,
    /// Review id.
    pub review_id: Option<String>,
    /// Envoy request id.
    pub request_id: Option<String>,
    /// Written at or after (Unix ms).
    pub since_ms: Option<u64>,
    /// Written before (Unix ms).
    pub until_ms: Option<u64>,
    /// Only records after this `seq` (paging: the previous page's
    /// `next_after_seq`).
    pub after_seq: Option<i64>,
    /// Page size, 1..=[`MAX_PAGE`] ([`DEFAULT_PAGE`] when not given);
    /// ignored by the export.
    #[serde(default = "default_page")]
    pub limit: u32,
}

fn default_page() -> u32 {
    DEFAULT_PAGE
}

impl RecordQuery {
    /// The query of the page after `page` (what this query returned), or
    /// `None` when `page` was the last one.
    pub fn next_page(&self, page: &[Value]) -> Option<RecordQuery> {
        let seq = page.last()?.get("seq")?.as_i64()?;
        (page.len() == self.limit as usize).then(|| RecordQuery {
            after_seq: Some(seq),
            ..self.clone()
        })
    }
}

const MERGED_SELECT: &str = "
SELECT q.seq, q.entry, q.prev_hash, q.hash, r.seq, r.entry, r.prev_hash, r.hash
FROM records q
LEFT JOIN records r ON r.seq = (
    SELECT min(x.seq) FROM records x WHERE x.kind = 'response' AND x.ref_record_id = q.record_id)";

fn merged_from_row(row: &Row) -> DbResult<Value> {
    let parse = |text: String| serde_json::from_str::<Value>(&text).map_err(DbError::from);
    let mut merged = parse(row.get(1)?)?;
    if let Value::Object(m) = &mut merged {
        m.insert("seq".into(), Value::from(row.get::<i64>(0)?));
        m.insert("prev_hash".into(), Value::String(row.get(2)?));
        m.insert("hash".into(), Value::String(row.get(3)?));
        let response = match row.get::<Option<i64>>(4)? {
            None => Value::Null,
            Some(seq) => {
                let entry = parse(row.get(5)?)?;
                let mut resp = entry.get("response").cloned().unwrap_or(Value::Null);
                if let Value::Object(r) = &mut resp {
                    for key in ["record_id", "created_at_ms"] {
                        if let Some(v) = entry.get(key) {
                            r.insert(key.into(), v.clone());
                        }
                    }
                    r.insert("seq".into(), Value::from(seq));
                    r.insert("prev_hash".into(), Value::String(row.get(6)?));
                    r.insert("hash".into(), Value::String(row.get(7)?));
                }
                resp
            }
        };
        m.insert("response".into(), response);
    }
    Ok(merged)
}

/// One page of merged request records, oldest first.
pub fn query_records(conn: &mut Conn, q: &RecordQuery) -> DbResult<Vec<Value>> {
    let sql = format!(
        "{MERGED_SELECT}
         WHERE q.kind = 'request'
           AND (?1 IS NULL OR q.caller = ?1)
           AND (?2 IS NULL OR q.model = ?2)
           AND (?3 IS NULL OR q.decision = ?3)
           AND (?4 IS NULL OR q.review_id = ?4)
           AND (?5 IS NULL OR q.request_id = ?5)
           AND (?6 IS NULL OR q.created_at_ms >= ?6)
           AND (?7 IS NULL OR q.created_at_ms < ?7)
           AND q.seq > ?8
         ORDER BY q.seq LIMIT ?9"
    );
    let rows = conn.query(
        &sql,
        params![
            &q.caller,
            &q.model,
            &q.decision,
            &q.review_id,
            &q.request_id,
            q.since_ms,
            q.until_ms,
            q.after_seq.unwrap_or(0),
            i64::from(q.limit),
        ],
    )?;
    rows.iter().map(merged_from_row).collect()
}

/// The merged record `id` (request id or its response's id).
pub fn get_record(conn: &mut Conn, id: &str) -> DbResult<Option<Value>> {
    let sql = format!(
        "{MERGED_SELECT}
         WHERE q.kind = 'request' AND (q.record_id = ?1 OR q.record_id =
             (SELECT ref_record_id FROM records WHERE record_id = ?1 AND kind = 'response'))"
    );
    conn.query_opt(&sql, params![id])?
        .as_ref()
        .map(merged_from_row)
        .transpose()
}

/// Writes every merged record matching `q` (ignoring its `limit`) as JSON
/// Lines to `out`, reading `page` records at a time. Returns the count.
pub fn export_jsonl(
    conn: &mut Conn,
    q: &RecordQuery,
    out: &mut dyn std::io::Write,
) -> Result<u64, Box<dyn std::error::Error>> {
    for_each_record(conn, q, |rec| -> Result<(), Box<dyn std::error::Error>> {
        serde_json::to_writer(&mut *out, &rec)?;
        out.write_all(b"\n")?;
        Ok(())
    })
}

/// Calls `each` with every merged record matching `q` (ignoring its
/// `limit`), oldest first, reading [`MAX_PAGE`] records at a time (SELECT
/// only). Returns the count.
pub fn for_each_record<E: From<DbError>>(
    conn: &mut Conn,
    q: &RecordQuery,
    mut each: impl FnMut(Value) -> Result<(), E>,
) -> Result<u64, E> {
    let mut q = q.clone();
    q.limit = MAX_PAGE;
    let mut n = 0;
    loop {
        let page = query_records(conn, &q)?;
        let next = q.next_page(&page);
        for rec in page {
            each(rec)?;
            n += 1;
        }
        match next {
            Some(next) => q = next,
            None => return Ok(n),
        }
    }
}

// ---------------------------------------------------------------- verification

/// An intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainOk {
    /// Entries checked.
    pub records: u64,
    /// `seq` of the newest entry (or of the anchor when the log is empty).
    pub last_seq: i64,
    /// Hash of the newest entry (what a later verification must still find).
    pub last_hash: String,
    /// Retention anchor `(through_seq, hash)` the chain starts from.
    pub anchor: Option<(i64, String)>,
}

impl fmt::Display for ChainOk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ok: {} records, chain intact, last hash {} (seq {})",
            self.records, self.last_hash, self.last_seq
        )?;
        if let Some((through, _)) = &self.anchor {
            write!(
                f,
                "; records through seq {through} were removed by retention"
            )?;
        }
        Ok(())
    }
}

/// The first problem found in a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainProblem {
    /// The entry's hash does not match its content (or its columns do not
    /// match the hashed entry).
    Altered {
        /// Position.
        seq: i64,
        /// Its record id.
        record_id: String,
        /// `hash mismatch` or what else is wrong.
        detail: &'static str,
    },
    /// Entries between `after` and `next` are gone.
    Missing {
        /// Last good `seq` (0: the start, or the retention anchor).
        after: i64,
        /// The next `seq` present.
        next: i64,
    },
    /// The entry does not link to the previous one: inserted, reordered, or
    /// the previous one was rewritten with a recomputed hash.
    Inserted {
        /// Position.
        seq: i64,
        /// Its record id.
        record_id: String,
        /// The previous entry's `seq`.
        after: i64,
    },
    /// The retention anchor is not attested by a `retention` entry: entries
    /// were deleted outside retention.
    UnattestedAnchor {
        /// The anchor's `through_seq`.
        through_seq: i64,
    },
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainProblem::Altered {
                seq,
                record_id,
                detail,
            } => write!(f, "altered: record seq {seq} ({record_id}) {detail}"),
            ChainProblem::Missing { after, next } => {
                write!(f, "missing: seq gap between {after} and {next}")
            }
            ChainProblem::Inserted {
                seq,
                record_id,
                after,
            } => write!(
                f,
                "inserted/reordered: record seq {seq} ({record_id}) prev_hash does not match \
                 (chain broken after seq {after})"
            ),
            ChainProblem::UnattestedAnchor { through_seq } => write!(
                f,
                "missing: records through seq {through_seq} were deleted outside retention \
                 (anchor not attested by a retention record)"
            ),
        }
    }
}

/// Whether the columns of a row agree with its hashed entry.
fn columns_match(
    entry: &str,
    record_id: &str,
    kind: &str,
    ref_record_id: Option<&str>,
    created_at_ms: i64,
) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(entry) else {
        return false;
    };
    v.get("record_id").and_then(Value::as_str) == Some(record_id)
        && v.get("kind").and_then(Value::as_str) == Some(kind)
        && v.get("ref_record_id").and_then(Value::as_str) == ref_record_id
        && v.get("created_at_ms").and_then(Value::as_i64) == Some(created_at_ms)
}

/// The `(deleted_through_seq, anchor_hash)` a retention entry attests.
fn attestation(entry: &str) -> Option<(i64, String)> {
    let v: Value = serde_json::from_str(entry).ok()?;
    let r = v.get("retention")?;
    Some((
        r.get("deleted_through_seq")?.as_i64()?,
        r.get("anchor_hash")?.as_str()?.to_string(),
    ))
}

/// Rows of the chain read per query by [`verify_chain`].
const VERIFY_PAGE: i64 = 1000;

/// One entry of the hash chain, as stored: the exported unit of
/// `export-chain` and what the verifier walks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    /// Position in the chain (the previous entry's `seq + 1`).
    pub seq: i64,
    /// The record's id (`rec_...`; a retention entry's own).
    pub record_id: String,
    /// `request`, `response` or `retention`.
    pub kind: String,
    /// A response's request record.
    pub ref_record_id: Option<String>,
    /// When it was appended, Unix ms.
    pub created_at_ms: i64,
    /// The hashed JSON text, byte for byte.
    pub entry: String,
    /// The previous entry's `hash` (the anchor's after retention; 64 zeros
    /// for the first entry).
    pub prev_hash: String,
    /// [`chain_hash`]`(prev_hash, seq, entry)`.
    pub hash: String,
}

/// Up to `limit` entries of the chain after `after_seq`, oldest first
/// (SELECT only). Appends commit in `seq` order (they serialise on the
/// chain's lock), so a reader never sees an entry before an earlier one.
pub fn chain_entries(conn: &mut Conn, after_seq: i64, limit: i64) -> DbResult<Vec<ChainEntry>> {
    conn.query(
        "SELECT seq, record_id, kind, ref_record_id, created_at_ms, entry, prev_hash, hash
         FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        params![after_seq, limit],
    )?
    .iter()
    .map(|row| {
        Ok(ChainEntry {
            seq: row.get(0)?,
            record_id: row.get(1)?,
            kind: row.get(2)?,
            ref_record_id: row.get(3)?,
            created_at_ms: row.get(4)?,
            entry: row.get(5)?,
            prev_hash: row.get(6)?,
            hash: row.get(7)?,
        })
    })
    .collect()
}

/// On PostgreSQL, the stored query columns of the page [`chain_entries`]
/// reads with the same arguments, by `seq`; on SQLite none (it computes
/// them from the entry itself, so they cannot differ).
fn stored_query_columns(
    conn: &mut Conn,
    after_seq: i64,
    limit: i64,
) -> DbResult<Vec<(i64, QueryColumns)>> {
    if conn.backend() != Backend::Postgres {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT seq, {} FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        RECORD_QUERY_COLUMNS.join(", ")
    );
    conn.query(&sql, params![after_seq, limit])?
        .iter()
        .map(|row| {
            let mut columns: QueryColumns = Default::default();
            for (i, column) in columns.iter_mut().enumerate() {
                *column = row.get(i + 1)?;
            }
            Ok((row.get(0)?, columns))
        })
        .collect()
}

/// The newest retention anchor `(through_seq, hash)`: the chain starts
/// after it. `None` when nothing was removed (or the table is missing).
pub fn newest_anchor(conn: &mut Conn) -> DbResult<Option<(i64, String)>> {
    if !conn.table_exists("chain_anchor")? {
        return Ok(None);
    }
    match conn.query_opt(
        "SELECT through_seq, hash FROM chain_anchor ORDER BY through_seq DESC LIMIT 1",
        params![],
    )? {
        Some(r) => Ok(Some((r.get(0)?, r.get(1)?))),
        None => Ok(None),
    }
}

/// Walks the whole chain in `seq` order and reports the first problem.
/// Reads only the stored columns (the triggers are not trusted), all in one
/// snapshot.
pub fn verify_chain(conn: &mut Conn) -> DbResult<Result<ChainOk, ChainProblem>> {
    conn.transaction(Lock::ReadSnapshot, verify_chain_in)
}

fn verify_chain_in(conn: &mut Conn) -> DbResult<Result<ChainOk, ChainProblem>> {
    let anchor = newest_anchor(conn)?;
    let (mut prev_seq, mut prev_hash) = anchor.clone().unwrap_or((0, GENESIS_HASH.to_string()));
    let mut attested = false;
    let mut count = 0u64;
    // Paged by `seq`, so a long log is never held in memory at once.
    let mut after = i64::MIN;
    // Both reads of a page are in the one snapshot, so their rows pair up
    // by `seq`; a row that does not is reported, never skipped.
    let postgres = conn.backend() == Backend::Postgres;
    loop {
        let page = chain_entries(conn, after, VERIFY_PAGE)?;
        let read = page.len();
        let mut stored = stored_query_columns(conn, after, VERIFY_PAGE)?.into_iter();
        for e in page {
            let ChainEntry {
                seq,
                record_id,
                kind,
                ref_record_id,
                created_at_ms,
                entry,
                prev_hash: row_prev,
                hash,
            } = e;
            after = seq;
            if seq > prev_seq + 1 {
                return Ok(Err(ChainProblem::Missing {
                    after: prev_seq,
                    next: seq,
                }));
            }
            if chain_hash(&row_prev, seq, &entry) != hash {
                return Ok(Err(ChainProblem::Altered {
                    seq,
                    record_id,
                    detail: "hash mismatch",
                }));
            }
            if seq <= prev_seq || row_prev != prev_hash {
                return Ok(Err(ChainProblem::Inserted {
                    seq,
                    record_id,
                    after: prev_seq,
                }));
            }
            if !columns_match(
                &entry,
                &record_id,
                &kind,
                ref_record_id.as_deref(),
                created_at_ms,
            ) {
                return Ok(Err(ChainProblem::Altered {
                    seq,
                    record_id,
                    detail: "columns do not match the hashed entry",
                }));
            }
            // On PostgreSQL the query columns are the service's copies,
            // not computed by the database: an edited one would hide a
            // record from the query API and the exports.
            if postgres {
                let matches = stored.next().is_some_and(|(at, columns)| {
                    at == seq
                        && serde_json::from_str::<Value>(&entry)
                            .is_ok_and(|v| query_columns(&v) == columns)
                });
                if !matches {
                    return Ok(Err(ChainProblem::Altered {
                        seq,
                        record_id,
                        detail: "query columns do not match the hashed entry",
                    }));
                }
            }
            if kind == "retention" && anchor.is_some() && attestation(&entry) == anchor {
                attested = true;
            }
            count += 1;
            prev_seq = seq;
            prev_hash = hash;
        }
        if i64::try_from(read).unwrap_or(i64::MAX) < VERIFY_PAGE {
            break;
        }
    }
    if let Some((through_seq, _)) = &anchor {
        if !attested {
            return Ok(Err(ChainProblem::UnattestedAnchor {
                through_seq: *through_seq,
            }));
        }
    }
    Ok(Ok(ChainOk {
        records: count,
        last_seq: prev_seq,
        last_hash: prev_hash,
        anchor,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// Every change an edit makes shows in the record's diff: digits beyond
    /// a float's precision, the order of keys, a key given twice (the last
    /// one counts to this parser, the first to others).
    #[test]
    fn an_edit_diff_never_hides_a_change() {
        let body = |rest: &str| {
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"pay"}}],{rest}}}"#)
        };
        for (from, to, shows) in [
            (
                "\"seed\":12345678901234567890123",
                "\"seed\":12345678901234567890999",
                "12345678901234567890999",
            ),
            ("\"n\":1.0", "\"n\":1", "\"n\": 1\n"),
            ("\"a\":1,\"b\":2", "\"b\":2,\"a\":1", "+  \"b\": 2,"),
            (
                "\"to\":\"x\"",
                "\"to\":\"evil\",\"to\":\"x\"",
                "+  \"to\": \"evil\",",
            ),
            // A real change next to one the parser would hide.
            (
                "\"seed\":12345678901234567890123,\"t\":1",
                "\"seed\":12345678901234567890999,\"t\":2",
                "12345678901234567890999",
            ),
        ] {
            let d = edit_diff(&body(from), &body(to));
            assert!(d.contains(shows), "{from} -> {to}: {d}");
        }
        // Laid out, not re-parsed: an object per line, as before, and
        // layout alone is no change.
        let d = edit_diff(
            &body("\"x\":[]"),
            "{\"model\": \"m\",\n \"messages\": [{\"role\": \"user\", \"content\": \"pay\"}], \"x\": [], \"y\": {}}",
        );
        assert!(
            d.contains("-  \"x\": []\n+  \"x\": [],\n+  \"y\": {}\n"),
            "{d}"
        );
        assert!(d.contains("      \"content\": \"pay\"\n"), "{d}");
        // Not JSON: the texts as they are.
        assert!(edit_diff("a\nb", "a\nc").contains("-b\n+c"));
    }

    #[test]
    fn chain_hash_formula() {
        let expected = hex(&Sha256::digest(
            format!("{GENESIS_HASH}\n1\n{{}}").as_bytes(),
        ));
        assert_eq!(chain_hash(GENESIS_HASH, 1, "{}"), expected);
        assert_eq!(GENESIS_HASH.len(), 64);
    }

    #[test]
    fn record_ids_are_their_time_then_80_random_bits() {
        let created_at_ms = 0x0193_a0b1_c2d3;
        let a = new_record_id(created_at_ms).unwrap();
        let b = new_record_id(created_at_ms).unwrap();
        assert_ne!(a, b, "the same millisecond still gives different ids");
        for id in [&a, &b] {
            assert_eq!(id.len(), 4 + 32);
            assert!(id.starts_with("rec_0193a0b1c2d3"), "{id}");
            assert!(id[4..]
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        }
        // Later ids sort after earlier ones: the index takes them at its end.
        assert!(new_record_id(created_at_ms + 1).unwrap() > a.max(b));
        // A clock past 12 digits keeps the length.
        assert_eq!(new_record_id(u64::MAX).unwrap().len(), 4 + 32);
    }

    #[test]
    fn query_columns_are_read_from_the_entry_as_postgres_reads_them() {
        let entry = canonical(&json!({
            "kind": "request",
            "request": {"caller": "ci\0bot", "model": null, "decision": "allowed",
                        "request_id": "req-1", "idempotency_key": "req-1:00ff"},
        }))
        .unwrap();
        // In RECORD_QUERY_COLUMNS' order; null and absent are NULL; the
        // NUL is U+FFFD, as in the entry.
        assert_eq!(
            entry.query,
            [
                Some("ci\u{FFFD}bot".to_string()),
                None,
                Some("allowed".to_string()),
                None,
                Some("req-1".to_string()),
                Some("req-1:00ff".to_string()),
            ]
        );
        let response =
            canonical(&json!({"kind": "response", "response": {"status": 200}})).unwrap();
        assert_eq!(response.query, [None, None, None, None, None, None]);
    }

    #[test]
    fn postgres_inserts_carry_the_query_columns_and_sqlite_leaves_them_to_it() {
        for guard in [
            Guard::Always,
            Guard::NewRequest {
                request_id: "r",
                key: "k",
            },
            Guard::FirstResponse,
        ] {
            let pg = insert_sql(Backend::Postgres, guard);
            let lite = insert_sql(Backend::Sqlite, guard);
            let columns = |sql: &str| sql.split(['(', ')']).nth(1).unwrap_or_default().to_string();
            for c in RECORD_QUERY_COLUMNS {
                assert!(columns(&pg).contains(c), "{pg}");
                assert!(!columns(&lite).contains(c), "{lite}");
            }
        }
    }
}
